#!/usr/bin/env python3
"""ctguard's module graph, read from its own source, and the rules the house keeps.

    python3 scripts/module_graph.py            the graph: each package's modules and what they import
    python3 scripts/module_graph.py --packages the graph between packages, with counts
    python3 scripts/module_graph.py --check    exit 1 and name every broken rule

Rules (docs: ../shared/ARCHITECTURE.md, README "Layout"):
- no import circle between modules;
- no arrow upwards: core <- config <- host, boot, store <- daemon, control, evidence <- cli
  (a module imports its own layer or lower ones; `if TYPE_CHECKING:` imports are types only,
  never executed, and do not count);
- the pure core imports only pure standard-library modules (PURE_STDLIB), nothing that does I/O.

Imports are read with `ast`, inside functions too, so a lazy import is an arrow like any other.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LAYERS = {"core": 0, "config": 1, "host": 2, "boot": 2, "store": 2,
          "daemon": 3, "control": 3, "evidence": 3, "cli": 4, "": 5}
# What the pure core may import: computation only. Not os, time, subprocess, socket, select,
# selectors, pathlib, threading, signal, shutil, tempfile, fcntl, ctypes, io, sys, systemd, pyroute2.
PURE_STDLIB = frozenset({
    "__future__", "abc", "array", "bisect", "collections", "dataclasses", "enum", "functools", "heapq",
    "ipaddress", "itertools", "math", "operator", "re", "statistics", "string", "typing",
})


@dataclass(frozen=True)
class Import:
    source: str         # the importing module, dotted
    target: str         # the imported module (ctguard.*) or top-level name (stdlib, third party)
    line: int
    typing_only: bool


def module_name(src: Path, path: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _typing_blocks(tree: ast.AST) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(src: Path, path: Path, modules: set[str]) -> list[Import]:
    me = module_name(src, path)
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_lines = _typing_blocks(tree)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from ctguard.x import y`: y is a module when one exists by that name
            for a in node.names:
                sub = f"{base}.{a.name}"
                targets.append(sub if sub in modules else base)
        for t in targets:
            out.append(Import(me, t, node.lineno, node.lineno in typing_lines))
    return out


def read(src: Path) -> tuple[set[str], list[Import]]:
    files = sorted((src / "ctguard").rglob("*.py"))
    modules = {module_name(src, f) for f in files}
    edges = [i for f in files for i in imports_of(src, f, modules)]
    return modules, edges


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    pkg = parts[1] if len(parts) > 2 else ""
    return pkg, LAYERS.get(pkg, LAYERS[""])


def circles(modules: Iterable[str], edges: Iterable[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        if not e.typing_only and e.target.startswith("ctguard") and e.target != e.source:
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    return found


def problems(modules: set[str], edges: list[Import]) -> list[str]:
    out = []
    for comp in circles(modules, edges):
        out.append("import circle: " + " -> ".join(comp + [comp[0]]))
    for e in edges:
        if e.typing_only:
            continue
        src_pkg, src_layer = layer(e.source)
        if e.target.startswith("ctguard"):
            if e.target == "ctguard" or e.target in ("ctguard.__main__",):
                continue        # the package's version string
            dst_pkg, dst_layer = layer(e.target)
            if dst_layer > src_layer:
                out.append(f"arrow upwards: {e.source} (line {e.line}, {src_pkg or 'top'}) imports {e.target} "
                           f"({dst_pkg}): move the shared piece down, or the caller up")
        elif src_pkg == "core" and e.target.split(".")[0] not in PURE_STDLIB:
            out.append(f"I/O in the pure core: {e.source} (line {e.line}) imports {e.target}: pass the value in "
                       "from an adapter (host/, boot/, store/) instead")
    return out


def print_graph(modules: set[str], edges: list[Import], packages: bool) -> None:
    if packages:
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for e in edges:
            if e.target.startswith("ctguard.") and not e.typing_only:
                a, b = layer(e.source)[0] or "top", layer(e.target)[0] or "top"
                if a != b:
                    counts[(a, b)] += 1
        order = sorted(LAYERS, key=lambda p: (LAYERS[p], p))
        for a in order:
            outs = [f"{b or 'top'} ({counts[(a or 'top', b or 'top')]})" for b in order
                    if counts.get((a or "top", b or "top"))]
            print(f"{a or 'top':9} [{LAYERS[a]}] -> {', '.join(outs) if outs else '(nothing of ctguard)'}")
        return
    by_module: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        if e.target.startswith("ctguard.") and not e.typing_only:
            by_module[e.source].add(e.target.removeprefix("ctguard."))
    for m in sorted(modules):
        deps = sorted(by_module.get(m, ()))
        print(f"{m.removeprefix('ctguard.') or 'ctguard'}: {' '.join(deps) if deps else '-'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent / "src")
    ap.add_argument("--packages", action="store_true", help="the graph between packages")
    ap.add_argument("--check", action="store_true", help="exit 1 when a rule is broken")
    args = ap.parse_args(argv)
    modules, edges = read(args.src)
    if args.check:
        found = problems(modules, edges)
        for p in found:
            print(p)
        print(f"{len(modules)} modules, {sum(1 for e in edges if e.target.startswith('ctguard'))} imports of "
              f"ctguard's own: {len(found)} problem(s)")
        return 1 if found else 0
    print_graph(modules, edges, args.packages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
