"""`ctguard run`: load the policy, build the daemon, run it; the exit code systemd sees."""

from __future__ import annotations

import errno
import logging
import resource
import sys
from pathlib import Path

from ctguard.config import policy as policy_mod
from ctguard.config.policy import PolicyError
from ctguard.core.exitcodes import EX_CONFIG, EX_NOPERM
from ctguard.daemon.loop import Daemon
from ctguard.daemon.paths import Paths


def run(policy_path: Path, paths: Paths | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="ctguard: %(message)s", stream=sys.stderr)
    try:
        policy = policy_mod.load(policy_path)
    except PolicyError as exc:
        print("ctguard: refusing to start, the policy has problems:\n" + "\n".join(f"  {p}" for p in exc.problems),
              file=sys.stderr)
        return EX_CONFIG
    _raise_open_files()
    try:
        daemon = Daemon(policy_path, policy, paths)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            print(f"ctguard: {exc}; run as root", file=sys.stderr)
            return EX_NOPERM
        raise
    return daemon.run()


def _raise_open_files() -> None:
    """One descriptor is kept open per network namespace (ctguard.host.netns.StatReaders): lift
    the soft limit to the hard one, or a host with ~1,000 namespaces meets systemd's default soft
    limit of 1,024 (the loop polls with epoll, so descriptors above 1,024 are fine)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        pass    # kept as it is: the namespaces past it are reported as problems at discovery
