"""Every rule the diagnosis suggests passes `nft -c` (issue 24: rules safe to paste), checked in
a network namespace of its own: root, and a namespace, so this is the kernel tier."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers.causes import all_rules, nft_blocks


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables (apt-get install nftables)")
@pytest.mark.skipif(os.geteuid() != 0, reason="nft -c needs root (CAP_NET_ADMIN) for its checks")
def test_every_nft_rule_passes_nft_check() -> None:
    """`nft -c -f` of every suggested rule set, in a fresh network namespace of its own (no
    ruleset of this host is read or touched)."""
    blocks = [(n, i, b) for n, i, r in all_rules() for b in nft_blocks(r)]
    assert blocks
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, fid, block) in enumerate(blocks):
            path = Path(tmp) / f"rule{k}.nft"
            path.write_text(block + "\n")
            res = subprocess.run(["unshare", "-n", "nft", "-c", "-f", str(path)], capture_output=True, text=True,
                                 timeout=30)
            assert res.returncode == 0, (name, fid, block, res.stderr)
