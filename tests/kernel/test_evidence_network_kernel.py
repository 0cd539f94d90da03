"""The network section of a bundle captured in a real forwarding namespace."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from helpers.kernelenv import needs_kernel, netns_pair
from helpers.paths import SRC
from helpers.policy import write_policy


@needs_kernel
def test_bundle_says_where_the_top_sources_arrive_and_whether_the_namespace_forwards(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, persist_mode=None, metrics=False, control=False)
    with netns_pair() as pair:
        pair.exec(pair.receiver, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        pair.exec(pair.receiver, "ip", "route", "add", "198.51.100.0/24", "via", pair.sender_addr)
        pair.flood_udp(50)
        r = subprocess.run([sys.executable, "-m", "ctguard", "--policy", str(policy), "capture", "--netns",
                            pair.receiver, "--reason", "net"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": SRC})
        assert r.returncode == 0, r.stderr
        folder = Path(r.stdout.strip().splitlines()[-1])
        veth = pair.exec(pair.receiver, "ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
        shown = subprocess.run([sys.executable, "-m", "ctguard", "--policy", str(policy), "bundles", "show", folder.name],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC})
    ev = tomllib.loads((folder / "evidence.toml").read_text())["network"]
    assert ev["forwarding"]["ipv4"] is True
    assert ev["verdict"].startswith("this namespace forwards (ipv4")
    by_name = {i["name"]: i for i in ev["interfaces"]}
    assert set(by_name) == {"lo", veth}, by_name
    assert f"{pair.receiver_addr}/30" in by_name[veth]["addresses"] and by_name[veth]["kind"] == "veth"
    assert {"family": "ipv4", "dst": "198.51.100.0/24", "via": pair.sender_addr, "dev": veth} in ev["routes"]
    assert ev["top_sources_arrive_on"] == {pair.sender_addr: veth}
    assert ev["top_sources_by_interface"] == {veth: 1}
    assert (folder / "network.json").exists()
    assert shown.returncode == 0 and f"top sources arrive on: {veth} (1 of them)" in shown.stdout, shown.stdout
    # Issue 24: forwarding is part of the one role sentence of the captured namespace.
    assert "Role: " in shown.stdout and ": it forwards;" in shown.stdout, shown.stdout
