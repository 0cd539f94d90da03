"""Evidence bundles: what filled the conntrack table, captured at the moment of pressure.

Public API (wired into the daemon and the CLI by their owners):

- `capture(cfg, *, reason, netns_path, policy_text, decision, progress=None, proc_root, sys_root) -> Path`
- `list_bundles(dir) -> list[BundleInfo]`, `show(dir, id) -> str`, `export(dir, id, out) -> Path`
- `prune(dir, keep, max_bytes, protect)`
- `ctguard.cli.bundles.add_commands(subparsers)` for `capture` and `bundles ...`

`cfg` is anything with the attributes dir, keep, max_bytes, top, budget (`policy.evidence`).
"""

from ctguard.evidence.bundle import BundleError, BundleInfo, capture, export, list_bundles, prune, show

__all__ = ["BundleError", "BundleInfo", "capture", "export", "list_bundles", "prune", "show"]
