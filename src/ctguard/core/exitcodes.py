"""ctguard's exit codes, in one place.

`ctguard status` is a monitoring plugin (Nagios/Icinga convention: 0 OK, 1 WARNING, 2 CRITICAL,
3 UNKNOWN); the other commands exit 0 on success and 1 on failure, 2 on a usage error
(argparse's own), 77 when they lack the privilege (EX_NOPERM) and 78 on a bad policy
(EX_CONFIG, sysexits.h; the unit's RestartPreventExitStatus=78).
"""

from __future__ import annotations

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
EX_OK, EX_FAIL, EX_USAGE = 0, 1, 2
EX_NOPERM = 77
EX_CONFIG = 78
