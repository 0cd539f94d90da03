"""ctguard: keeps Linux connection tracking from running out of room."""

__version__ = "0.1.0"
