#!/usr/bin/env python3
"""Benchmark: `ctguard capture` against the seed's shell playbook on the same table.

    python3 bench/bench_capture.py [--entries 262144] [--also-million] [--pyroute2-seconds 5]

Needs root. Fills a fresh namespace's table with N entries, every one from a distinct source
address (crafted UDP and TCP SYN datagrams from 100.64.0.0/10 through a raw socket), then in
the same run and on the same table times:

- the playbook: `conntrack -L | awk | sort | uniq -c` for protocol, TCP state and top
  destinations (three pipelines, as the seed playbook runs them), in the namespace;
- ctguard's capture, in a child process (interpreter start-up included), with its peak RSS;
- optionally pyroute2's generic parser (NFCTSocket.dump) for `--pyroute2-seconds`.

The global nf_conntrack_max / hashsize are raised inside kernelenv.saved_kernel_values() (it
takes the shared lock and restores them); the namespaces are deleted afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from helpers.kernelenv import HASHSIZE, get_max, netns_pair, saved_kernel_values, set_max  # noqa: E402

# Crafted packets: sources walk 100.64.0.0/10 (4M addresses) so every entry has its own source;
# destinations and ports are skewed so the top lists have something to show. One datagram per
# entry; TCP SYNs get no answer because the receiver drops its own RSTs before conntrack sees
# them (raw-priority output rule), so they stay SYN_SENT.
FILL = r"""
import socket, struct, sys
names = sys.argv[1].split(",")
dsts = [socket.inet_aton(a) for a in names]
n, first = int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
base = (100 << 24) | (64 << 16)
udp_ports = (53, 53, 53, 123, 443, 5353, 8080, 9999)
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t & 0xFFFF) + (t >> 16)
    t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
for i in range(first, first + n):
    src = struct.pack("!I", base + i)
    k = 0 if i % 3 else (i // 3) % len(dsts)
    dst = dsts[k]
    sport = 1024 + (i % 60000)
    if i % 8 == 7:  # TCP SYN, with a real checksum (conntrack drops bad ones as invalid)
        dport = 80 if i % 16 == 7 else 22
        hdr = struct.pack("!HHIIBBHHH", sport, dport, i, 0, 5 << 4, 0x02, 65535, 0, 0)
        c = csum(src + dst + struct.pack("!BBH", 0, 6, 20) + hdr)
        l4 = hdr[:16] + struct.pack("!H", c) + hdr[18:]
        proto = 6
    else:  # UDP, checksum 0 = none (valid in IPv4)
        l4 = struct.pack("!HHHH", sport, udp_ports[i % len(udp_ports)], 8, 0)
        proto = 17
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, src, dst)
    try:
        s.sendto(ip + l4, (names[k], 0))
    except OSError:
        pass
"""

PLAYBOOK = {
    "protocol": "conntrack -L 2>/dev/null | awk '{print $1}' | sort | uniq -c | sort -rn",
    "tcp state": "conntrack -L -p tcp 2>/dev/null | awk '{print $4}' | sort | uniq -c | sort -rn",
    "top destinations": (
        "conntrack -L 2>/dev/null | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^dst=/) {print $i; break}}'"
        " | sort | uniq -c | sort -rn | head -20"
    ),
}

CAPTURE_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from types import SimpleNamespace
t0 = time.monotonic()
from ctguard.evidence.bundle import capture
cfg = SimpleNamespace(dir=Path(sys.argv[1]), keep=5, max_bytes=1 << 30, top=20, budget=float(sys.argv[3]))
path = capture(cfg, reason="bench", netns_path=sys.argv[2], policy_text="", decision=None)
print(json.dumps({"path": str(path), "seconds_in_process": time.monotonic() - t0,
                  "rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PYROUTE2_CHILD = r"""
import sys, time
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket
limit = float(sys.argv[1])
s = NFCTSocket()
t0 = time.monotonic(); n = 0
for _msg in s.dump():
    n += 1
    if time.monotonic() - t0 > limit:
        break
print(n, time.monotonic() - t0)
"""


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def fill(pair, target: int, extra_dsts: list[str]) -> float:
    """Send crafted flows until the receiver tracks `target` entries; returns seconds."""
    t0 = time.monotonic()
    dsts = ",".join([pair.receiver_addr, *extra_dsts])
    sent = 0
    chunk = 65536
    while True:
        have = pair.count()
        if have >= target:
            break
        need = target - have
        # Split the work over the CPUs: the kernel side of each send is most of the cost.
        procs = []
        workers = max(1, min(os.cpu_count() or 1, 4))
        per = min(chunk * workers, need) // workers + 1
        for w in range(workers):
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", pair.sender, sys.executable, "-c", FILL, dsts, str(per), str(sent + w * per)]
            ))
        for p in procs:
            if p.wait() != 0:
                raise SystemExit("the filler failed")
        sent += per * workers
        if sent > target * 2:
            raise SystemExit(f"sent {sent} flows but the table holds only {pair.count()}: datagrams are being lost")
    return time.monotonic() - t0


def prepare(pair, entries: int) -> list[str]:
    extra = []
    third = pair.receiver_addr.split(".")[2]
    for k in range(1, 4):
        addr = f"10.232.{third}.{k}"
        extra.append(addr)
        dev = sh("ip", "-n", pair.receiver, "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
        sh("ip", "-n", pair.receiver, "addr", "add", f"{addr}/32", "dev", dev)
        sdev = sh("ip", "-n", pair.sender, "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
        sh("ip", "-n", pair.sender, "route", "add", f"{addr}/32", "dev", sdev)
    # The receiver keeps every entry for the whole run, and never answers a SYN with a RST
    # that conntrack would see (that would close the entry).
    for knob, value in (
        ("net.netfilter.nf_conntrack_udp_timeout", "3600"),
        ("net.netfilter.nf_conntrack_tcp_timeout_syn_sent", "3600"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.icmp_ratelimit", "100000"),
    ):
        pair.exec(pair.receiver, "sysctl", "-qw", f"{knob}={value}")
    for dev in sh("ip", "-n", pair.receiver, "-o", "link").stdout.splitlines():
        name = dev.split(":")[1].strip().split("@")[0]
        pair.exec(pair.receiver, "sysctl", "-qw", f"net.ipv4.conf.{name}.rp_filter=0", check=False)
    nft = (
        "table inet ctgbench {\n"
        "  chain out { type filter hook output priority -300; tcp flags & rst == rst drop; }\n"
        "}\n"
    )
    subprocess.run(["ip", "netns", "exec", pair.receiver, "nft", "-f", "-"], input=nft, text=True, check=True)
    return extra


# The same three answers from a single `conntrack -L` saved to a file: what an operator who
# knows the table is huge might do. Reported beside the playbook for honesty, not as the goal.
ONE_DUMP = (
    "f=$(mktemp) && conntrack -L > \"$f\" 2>/dev/null"
    " && awk '{print $1}' \"$f\" | sort | uniq -c | sort -rn > /dev/null"
    " && awk '$1 == \"tcp\" {print $4}' \"$f\" | sort | uniq -c | sort -rn > /dev/null"
    " && awk '{for (i = 1; i <= NF; i++) if ($i ~ /^dst=/) {print $i; break}}' \"$f\" | sort | uniq -c | sort -rn | head -20 > /dev/null;"
    " rm -f \"$f\""
)


def time_playbook(pair) -> dict[str, float]:
    out = {}
    for name, pipeline in PLAYBOOK.items():
        t0 = time.monotonic()
        # The playbook is a shell pipeline by nature; the benchmark runs it as the operator would.
        res = sh("ip", "netns", "exec", pair.receiver, "sh", "-c", pipeline)
        out[name] = time.monotonic() - t0
        out[name + " (first lines)"] = res.stdout.strip().splitlines()[:3]  # type: ignore[assignment]
    t0 = time.monotonic()
    sh("ip", "netns", "exec", pair.receiver, "sh", "-c", ONE_DUMP)
    out["one dump"] = time.monotonic() - t0
    return out


def time_capture(pair, budget: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ctgbench") as tmp:
        env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", CAPTURE_CHILD, tmp, f"/run/netns/{pair.receiver}", str(budget)],
            stdout=subprocess.PIPE, env=env,
        )
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        out = json.loads(proc.stdout.read())  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("the capture child failed")
        import tomllib
        manifest = tomllib.loads((Path(out["path"]) / "manifest.toml").read_text())
        evidence = tomllib.loads((Path(out["path"]) / "evidence.toml").read_text())
        table = evidence["table"]
        return {
            "wall": wall,
            # wait4's figure is the largest of the process and the commands it ran (each forked
            # from it, so at least its size until exec); the capture's own is its getrusage.
            "rss_mb": usage.ru_maxrss / 1024,
            "rss_self_mb": out["rss_self_mb"],
            "dump_seconds": table["seconds"],
            "entries": table["entries"],
            "cut_short": manifest["cut_short"],
            "by_proto": table["by_proto"],
            "by_tcp_state": table["by_tcp_state"],
            "top_destination": table["top_destinations"]["rows"][0],
            "sources_exact": table["top_sources"]["exact"],
            "sources_max_error": max((r["error"] for r in table["top_sources"]["rows"]), default=0),
        }


def time_pyroute2(pair, seconds: float) -> tuple[int, float]:
    res = sh("ip", "netns", "exec", pair.receiver, sys.executable, "-c", PYROUTE2_CHILD, str(seconds))
    n, took = res.stdout.split()
    return int(n), float(took)


def run_one(entries: int, pyroute2_seconds: float, budget: float) -> dict[str, object]:
    with saved_kernel_values():
        need = int(entries * 1.05) + 4096
        if get_max() < need:
            set_max(need)
        if int(HASHSIZE.read_text()) < entries // 4:
            HASHSIZE.write_text(str(entries // 4))
        with netns_pair(prefix="ctgb") as pair:
            extra = prepare(pair, entries)
            fill_s = fill(pair, entries, extra)
            count = pair.count()
            row: dict[str, object] = {"entries": count, "fill_seconds": fill_s}
            play = time_playbook(pair)
            row["playbook"] = play
            row["playbook_total"] = sum(play[k] for k in PLAYBOOK)
            row["capture"] = time_capture(pair, budget)
            if pyroute2_seconds > 0:
                row["pyroute2"] = time_pyroute2(pair, pyroute2_seconds)
            row["count_after"] = pair.count()
            return row


def report(rows: list[dict[str, object]]) -> str:
    lines = [
        "| entries (distinct sources) | playbook: protocol | tcp state | top dst | playbook total | ctguard capture (wall, child) | of which dump | ratio capture/playbook | capture peak RSS | one-dump playbook variant (ratio) | pyroute2 generic parser |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["playbook"]
        c = r["capture"]
        py = r.get("pyroute2")
        py_txt = f"{py[0] / py[1]:,.0f} entries/s" if py else "-"
        lines.append(
            f"| {r['entries']:,} | {p['protocol']:.2f} s | {p['tcp state']:.2f} s | {p['top destinations']:.2f} s "
            f"| {r['playbook_total']:.2f} s | {c['wall']:.2f} s | {c['dump_seconds']:.2f} s "
            f"({c['entries'] / c['dump_seconds']:,.0f} entries/s) | {c['wall'] / r['playbook_total']:.2f}x "
            f"| {c['rss_self_mb']:.1f} MB | {p['one dump']:.2f} s ({c['wall'] / p['one dump']:.2f}x) | {py_txt} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=262144)
    ap.add_argument("--also-million", action="store_true", help="then repeat with 1,000,000 entries")
    ap.add_argument("--pyroute2-seconds", type=float, default=5.0, help="time pyroute2's parser this long (0: skip)")
    ap.add_argument("--budget", type=float, default=120.0, help="capture budget (large: the full table is timed)")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_capture needs root (namespaces, nf_conntrack_max)", file=sys.stderr)
        return 2
    sizes = [args.entries] + ([1_000_000] if args.also_million else [])
    rows = []
    for n in sizes:
        print(f"filling {n:,} entries...", file=sys.stderr)
        row = run_one(n, args.pyroute2_seconds, args.budget)
        rows.append(row)
        print(json.dumps(row, indent=2, default=str), file=sys.stderr)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, nproc {os.cpu_count()}, "
          f"kernel {os.uname().release}, python {sys.version.split()[0]}")
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
