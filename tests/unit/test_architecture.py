"""The house's rules, read from the source (scripts/module_graph.py): no import circle, no arrow
upwards between the packages, no I/O in the pure core. Like kube-proxy's import restrictions:
a file of rules and a check that fails the build."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "module_graph.py"


def _graph():
    spec = importlib.util.spec_from_file_location("module_graph", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["module_graph"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_source_keeps_the_rules() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for name, text in {"ctguard/__init__.py": "", **files}.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        init = p.parent / "__init__.py"
        if not init.exists():
            init.write_text("")
    return src


@pytest.mark.parametrize("files, expected", [
    ({"ctguard/core/a.py": "from ctguard.core import b\n", "ctguard/core/b.py": "from ctguard.core.a import x\n"},
     "import circle: ctguard.core.a -> ctguard.core.b -> ctguard.core.a"),
    ({"ctguard/core/a.py": "def f():\n    from ctguard.daemon import loop\n", "ctguard/daemon/loop.py": ""},
     "arrow upwards: ctguard.core.a (line 2, core) imports ctguard.daemon.loop"),
    ({"ctguard/core/a.py": "import time\n"}, "I/O in the pure core: ctguard.core.a (line 1) imports time"),
    ({"ctguard/core/a.py": "from pathlib import Path\n"}, "I/O in the pure core: ctguard.core.a (line 1) imports pathlib"),
    ({"ctguard/host/a.py": "from ctguard.cli import main\n", "ctguard/cli/main.py": ""},
     "arrow upwards: ctguard.host.a (line 1, host) imports ctguard.cli.main"),
])
def test_the_check_names_each_broken_rule(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    mg = _graph()
    modules, edges = mg.read(_tree(tmp_path, files))
    found = mg.problems(modules, edges)
    assert any(p.startswith(expected) for p in found), found


def test_typing_only_imports_are_not_arrows(tmp_path: Path) -> None:
    mg = _graph()
    src = _tree(tmp_path, {
        "ctguard/core/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ctguard.config.policy import P\n",
        "ctguard/config/policy.py": "",
    })
    assert mg.problems(*mg.read(src)) == []
