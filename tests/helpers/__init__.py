"""Shared test helpers: the kernel environment, journald, waiting, policies, the daemon runner, builders."""
