"""Scale of the host (issue 21 item 5): ctguard's idle cost and the cost of one full sample with
1, 50, 250 and 1,000 network namespaces, and container churn (namespaces created and deleted
at 20/s).

    sudo python3 bench/bench_scale.py                      # counts 1,50,250,1000; 30 s idle each; 30 s churn
    sudo python3 bench/bench_scale.py --quick              # counts 1,50; 5 s idle; 5 s churn
    git archive main src | tar -x -C /tmp/base             # another tree as "before", same invocation:
    sudo python3 bench/bench_scale.py --baseline /tmp/base/src [--rounds 3]

Each namespace is `ip netns add` plus one nftables `ct state new` rule (so it has a conntrack
table). The daemon runs `mode = "observe"` (it never writes nf_conntrack_max, so it cannot
disturb other sessions' tests), the packaged policy otherwise, with its paths in a temporary
folder.

- Idle: the daemon sees only the benchmark's namespaces (its own mount and PID namespaces, as
  in the lab); CPU = utime + stime of the daemon (and children) from /proc/PID/stat over the
  window (clock ticks: 10 ms, so 20 s resolve 0.5 ms/s). A calm host gets count-only ticks
  every `watch.interval` (1 s) and a full sample every 5 s (ctguard.core.ticks; before issue 21
  item 5, a full sample every second); "first look" is the time from the daemon's start to a
  status listing every namespace. With `--baseline`, each count's namespaces are made once and
  the two trees' daemons measured in turn on them (`--rounds` times, interleaved; the median).
- Churn: `--churn-base` namespaces stay; new ones are created at `--churn-rate`/s and each is
  deleted `--churn-life` s after its creation. The daemon sees the host's whole /run/netns
  (a fixed view cannot show namespaces created after the start; other sessions' namespaces are
  visible to it too). Its view is read over the control socket (`status`, docs/contract.md)
  every 0.25 s. Reported: errors in its log, its open descriptors before and after (all
  churned namespaces deleted, two rediscoveries later), whether it is still running, and for
  each churned namespace the delay from creation to the first status listing it (a namespace
  "missed for more than one sample" is one alive for longer than 2 s that was listed later
  than 2 s after creation, or never).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import lab  # noqa: E402

RULE = "table inet scale {\n  chain c { type filter hook prerouting priority 0; ct state new counter; }\n}\n"


class Daemon:
    def __init__(self, folder: Path, names: list[str] | None, src: Path = lab.SRC) -> None:
        self.folder = folder
        self.policy = lab.lab_policy(folder, 1_048_576, {"mode": "observe"})
        self.sock = folder / "run" / "control.sock"
        env = {**os.environ, "PYTHONPATH": str(src)}
        for k in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "PYTHONDONTWRITEBYTECODE"):
            env.pop(k, None)
        self.log = folder / "daemon.log"
        self._logf = open(self.log, "w")
        cmd = [sys.executable, "-m", "ctguard", "run", "--policy", str(self.policy)]
        if names is not None:
            cmd = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", sys.executable, "-c", lab._ISOLATE,
                   str(folder / "netns-view"), *names, "--", *cmd]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._logf, env=env)
        self.pid = self.proc.pid
        if names is not None:
            path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            for _ in range(1000):
                kids = path.read_text().split() if path.exists() else []
                if kids:
                    self.pid = int(kids[0])
                    break
                time.sleep(0.01)

    def status(self) -> dict | None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.sock))
                s.sendall(json.dumps({"cmd": "status", "args": {"policy": str(self.policy)}}).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    buf += chunk
            ans = json.loads(buf)
            return ans.get("result") if ans.get("ok") else None
        except (OSError, ValueError):
            return None

    def names(self) -> set[str]:
        st = self.status()
        if not st:
            return set()
        return {n.get("name") for n in st.get("view", {}).get("namespaces", [])}

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def errors(self) -> list[str]:
        return [ln for ln in self.log.read_text(errors="replace").splitlines()
                if "Traceback" in ln or " error" in ln.lower() or "exception" in ln.lower()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()


def batch(lines: list[str]) -> None:
    subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                   capture_output=True, check=False)


def make(names: list[str], rule: Path) -> None:
    for i in range(0, len(names), 200):
        chunk = names[i:i + 200]
        batch([f"netns add {n}" for n in chunk] + [f"netns exec {n} nft -f {rule}" for n in chunk])


def delete(names: list[str]) -> None:
    batch([f"netns del {n}" for n in names])


def idle_one(names: list[str], seconds: float, src: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"ctguard-scale-{len(names)}-"))
    d = None
    try:
        d = Daemon(folder, names, src)
        want = set(names)
        first = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if want <= d.names():
                first = time.monotonic() - d.t0
                break
            time.sleep(0.2)
        time.sleep(3)   # settle: first captures, caches
        c0, w0 = lab.tree_cpu(d.pid), time.monotonic()
        time.sleep(seconds)
        c1, w1 = lab.tree_cpu(d.pid), time.monotonic()
        st = d.status() or {}
        pct = 100 * (c1 - c0) / (w1 - w0)
        return {"namespaces": len(names), "first_look_s": round(first, 2) if first else None,
                "cpu_pct": round(pct, 3), "ms_per_s": round(1000 * (c1 - c0) / (w1 - w0), 2),
                "rss_mb": round(d.rss_mb(), 1), "fds": d.fds(), "sample_age": st.get("sample_age"),
                "errors": len(d.errors())}
    finally:
        if d:
            d.stop()
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def idle(count: int, seconds: float, rule: Path, tag: str, arms: list[tuple[str, Path]], rounds: int) -> dict:
    """Each arm `rounds` times, interleaved (A B A B ...) on the same namespaces; the median CPU."""
    names = [f"{tag}i{i}" for i in range(count)]
    try:
        t = time.monotonic()
        make(names, rule)
        made = time.monotonic() - t
        runs: dict[str, list[dict]] = {label: [] for label, _ in arms}
        for _ in range(rounds):
            for label, src in arms:
                runs[label].append(idle_one(names, seconds, src))
        out = {}
        for label, rs in runs.items():
            mid = sorted(rs, key=lambda r: r["ms_per_s"])[len(rs) // 2]
            out[label] = {**mid, "create_s": round(made, 1), "runs_ms_per_s": [r["ms_per_s"] for r in rs],
                          "errors": sum(r["errors"] for r in rs)}
        return out
    finally:
        delete(names)


def churn(base: int, rate: float, life: float, seconds: float, rule: Path, tag: str, src: Path = lab.SRC) -> dict:
    basenames = [f"{tag}b{i}" for i in range(base)]
    folder = Path(tempfile.mkdtemp(prefix="ctguard-churn-"))
    d = None
    created: dict[str, float] = {}
    deleted: dict[str, float] = {}
    seen: dict[str, float] = {}
    ip = None
    try:
        make(basenames, rule)
        d = Daemon(folder, None, src)
        lab.wait_for(lambda: set(basenames) <= d.names(), 60, 0.2)
        time.sleep(6)
        fd0 = d.fds()
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                now = time.monotonic()
                for n in d.names():
                    if n in created and n not in seen:
                        seen[n] = now
                stop.wait(0.25)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        ip = subprocess.Popen(["ip", "-force", "-batch", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, text=True)
        t0 = time.monotonic()
        k = 0
        pending: list[str] = []
        while time.monotonic() < t0 + seconds:
            now = time.monotonic()
            while t0 + k / rate <= now:
                n = f"{tag}c{k}"
                ip.stdin.write(f"netns add {n}\nnetns exec {n} nft -f {rule}\n")
                created[n] = time.monotonic()
                pending.append(n)
                k += 1
            while pending and created[pending[0]] + life <= now:
                n = pending.pop(0)
                ip.stdin.write(f"netns del {n}\n")
                deleted[n] = time.monotonic()
            ip.stdin.flush()
            time.sleep(0.01)
        for n in pending:
            ip.stdin.write(f"netns del {n}\n")
            deleted[n] = time.monotonic()
        ip.stdin.close()
        ip.wait(60)
        time.sleep(12)      # two rediscoveries after the last deletion
        stop.set()
        poller.join(3)
        fd1 = d.fds()
        alive = d.proc.poll() is None
        delays = [seen[n] - created[n] for n in created if n in seen]
        long_lived = [n for n in created if deleted.get(n, 0) - created[n] > 2.0]
        missed = [n for n in long_lived if n not in seen or seen[n] - created[n] > 2.0]
        never = [n for n in long_lived if n not in seen]
        return {"base": base, "rate": rate, "life_s": life, "seconds": seconds, "churned": len(created),
                "listed": len(delays), "delay_p50_s": round(statistics.median(delays), 2) if delays else None,
                "delay_max_s": round(max(delays), 2) if delays else None,
                "missed_over_2s": len(missed), "never_listed": len(never), "of_alive_over_2s": len(long_lived),
                "fds_before": fd0, "fds_after": fd1, "running": alive, "errors": d.errors()[:5]}
    finally:
        if ip and ip.poll() is None:
            ip.kill()
        if d:
            d.stop()
        delete(basenames + [n for n in created])
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1,50,250,1000")
    ap.add_argument("--idle", type=float, default=30)
    ap.add_argument("--churn", type=float, default=30, help="seconds of churn (0: none)")
    ap.add_argument("--churn-rate", type=float, default=20)
    ap.add_argument("--churn-life", type=float, default=5)
    ap.add_argument("--churn-base", type=int, default=50)
    ap.add_argument("--max", type=int, default=262144,
                    help="nf_conntrack_max held (under the tests' kernel lock) while measuring: the idle "
                         "sampling period follows it (count-only ticks below ~262,144)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline", type=Path,
                    help="another ctguard's src folder (e.g. `git archive main src | tar -x -C DIR`, then DIR/src): "
                         "measured as 'before' beside this tree's 'after', interleaved on the same namespaces")
    ap.add_argument("--rounds", type=int, default=1, help="idle runs of each arm per count (the median is shown)")
    a = ap.parse_args()
    # SIGTERM/SIGINT unwind through the lab's `finally` blocks: namespaces deleted, servers
    # stopped, nf_conntrack_max, hashsize and timeouts restored.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _f: (_ for _ in ()).throw(SystemExit(128 + signum)))
    if a.quick:
        a.counts, a.idle, a.churn = "1,50", 5, 5
    why = lab.kernelenv.kernel_ready()
    if why:
        print(f"bench_scale: cannot run: {why}", file=sys.stderr)
        return 1
    arms = ([("before", a.baseline.resolve())] if a.baseline else []) + [("after" if a.baseline else "this", lab.SRC)]
    tag = f"scl{os.getpid() % 10000}"
    with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as fh:
        fh.write(RULE)
    rule = Path(fh.name)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, kernel {os.uname().release}, {os.cpu_count()} cores, "
          f"nf_conntrack_max {lab.kernelenv.get_max()}; {' '.join(sys.argv[1:]) or '(defaults)'}", flush=True)
    rows = []
    try:
        for c in [int(x) for x in a.counts.split(",")]:
            with lab.kernelenv.saved_kernel_values():
                lab.kernelenv.set_max(a.max)
                r = idle(c, a.idle, rule, tag, arms, a.rounds)
            rows.append(r)
            print("  ", json.dumps(r), flush=True)
        print("\n| namespaces | arm | create s | first look s | idle % of a core | CPU ms per s | added us per namespace "
              "| RSS MB | fds | errors |" + (" after / before |" if a.baseline else ""))
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if a.baseline else ""))
        for r in rows:
            for label, _ in arms:
                x, first = r[label], rows[0][label]
                per = ((x["ms_per_s"] - first["ms_per_s"]) * 1000 / (x["namespaces"] - first["namespaces"])
                       if r is not rows[0] else None)
                ratio = (f" {x['ms_per_s'] / r['before']['ms_per_s']:.2f}x |" if a.baseline and label != "before"
                         else " |" if a.baseline else "")
                print(f"| {x['namespaces']:,} | {label} | {x['create_s']} | {x['first_look_s']} | {x['cpu_pct']:.2f}% | "
                      f"{x['ms_per_s']} | {'-' if per is None else f'{per:.0f}'} | {x['rss_mb']} | {x['fds']} | "
                      f"{x['errors']} |{ratio}")
        if a.churn:
            for label, src in arms:
                with lab.kernelenv.saved_kernel_values():
                    lab.kernelenv.set_max(a.max)
                    r = churn(a.churn_base, a.churn_rate, a.churn_life, a.churn, rule, tag + label[0], src)
                print(f"\nchurn ({label}):", json.dumps(r), flush=True)
    finally:
        rule.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
