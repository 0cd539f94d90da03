"""The bundle's network section (pyroute2, in the capture child): interfaces, addresses, routes,
forwarding, and the interface the top sources arrive on, read inside the inspected namespace
(tests/kernel/test_evidence_network_kernel.py); here: pyroute2 stays out of every process but
the capture's."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers.paths import SRC


def test_pyroute2_is_imported_by_no_module_but_used_in_the_capture() -> None:
    # Importing every ctguard module (the daemon's included) must not import pyroute2: only
    # calling evidence.netinfo.network() does (about 15-25 MB of RSS the daemon does not carry).
    code = (
        "import pkgutil, importlib, sys, ctguard\n"
        "for m in pkgutil.walk_packages(ctguard.__path__, 'ctguard.'):\n"
        "    if m.name != 'ctguard.__main__': importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.startswith('ctguard.')).__len__(), 'pyroute2' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert r.returncode == 0, r.stderr
    count, imported = r.stdout.split()
    assert int(count) > 20 and imported == "False", r.stdout


