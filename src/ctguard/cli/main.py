"""The command line: argparse front for run, check-policy, status, capture, bundles, recommend, bump."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from ctguard import __version__
from ctguard.boot import report as bootreport
from ctguard.cli import recommend
from ctguard.cli import status as status_cli
from ctguard.cli.bundles import add_commands
from ctguard.config import policy as policy_mod
from ctguard.config.policy import DEFAULT_POLICY_PATH, Policy, PolicyError, Thresholds
from ctguard.control import client
from ctguard.control import status
from ctguard.core.exitcodes import EX_CONFIG, EX_FAIL, EX_OK
from ctguard.daemon import main as daemon_main
from ctguard.evidence.review import last_bundle
from ctguard.host import hostrole
from ctguard.host.clock import Clock
from ctguard.host.kernel import ConntrackNotLoaded, Kernel
from ctguard.host.observe import Observer
from ctguard.store.relief import ReliefStore
from ctguard.store.state import StateStore


def _load_or_report(path: Path, code: int) -> Policy | int:
    try:
        return policy_mod.load(path)
    except PolicyError as exc:
        print("ctguard: the policy has problems:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return code


def cmd_run(args: argparse.Namespace) -> int:
    return daemon_main.run(Path(args.policy))


def cmd_check_policy(args: argparse.Namespace) -> int:
    path = Path(args.file or args.policy)
    try:
        policy = policy_mod.load(path)
    except PolicyError as exc:
        for p in exc.problems:
            print(p)
        return EX_FAIL
    try:
        kernel_max: int | None = Kernel().read_max()
    except OSError:
        kernel_max = None
    if args.effective:
        print(policy_mod.effective(policy), end="")
    else:
        print(policy_mod.summary(policy))
    # --effective output is itself a policy (diffable, loadable): its warnings are TOML comments.
    prefix = "# warning: " if args.effective else "warning: "
    for w in policy_mod.warnings_for(policy, kernel_max):
        print(f"{prefix}{w}")
    boot = _boot_report(policy)
    if boot is not None:
        for w in boot.warnings(policy):
            print(f"{prefix}{w}")
    return EX_OK


def _live(policy: Policy):
    clock = Clock()
    observer = Observer(Kernel(), clock, policy.watch.namespaces)
    try:
        return observer.sample(), clock.now(), observer.readers.refs
    finally:
        observer.close()


def _boot_report(policy: Policy):
    """What the next boot keeps (sysctl.d/modprobe.d order, initramfs, kube-proxy); None if unreadable."""
    try:
        return bootreport.build(policy)
    except OSError as exc:
        print(f"warning: cannot model the boot values: {exc}", file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    path = Path(args.policy)
    policy, problems = client.load(path)
    # The running daemon answers first (its policy in force, its history, even while the file
    # on disk is broken after a rejected reload); read directly only when none answers.
    answered = client.status_from_daemon(path, policy, problems)
    if answered is not None:
        view, hour = answered
        worst = view.data["namespaces"][0]["inode"] if view.data.get("namespaces") else None
        role, timeouts = hostrole.role_and_timeouts(None if worst is None else str(worst))
        view.data["host_role"] = role.as_dict()
        view.data["raised_timeouts"] = [t.as_dict() for t in timeouts]
        if policy is not None:
            _add_last_bundle(view, policy)
            boot = _boot_report(policy)
            if boot is not None:
                view = status.with_boot(view, boot, policy)
        thresholds = policy.thresholds if policy is not None else None
        return _print_status(args, view, hour, view.data["daemon"].get("sample_age"), thresholds)
    if policy is None:
        _load_or_report(path, status.UNKNOWN)
        print("CTGUARD UNKNOWN - the policy cannot be read")
        return status.UNKNOWN
    try:
        sample, now, refs = _live(policy)
    except (ConntrackNotLoaded, OSError) as exc:
        print(f"CTGUARD UNKNOWN - cannot read conntrack: {exc}")
        return status.UNKNOWN
    store = StateStore(policy.state.dir, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    history = store.load_history()
    relief_store = ReliefStore(policy.state.dir)
    relief_store.load(warn=lambda m: print(f"warning: {m}", file=sys.stderr), set_aside=False)
    history = replace(history, relief=relief_store.state())
    # The namespaces the sample just found: no second /proc scan.
    worst = sample.worst
    ref = next((r for r in refs if worst is not None and r.inode == worst.inode), None)
    role, timeouts = hostrole.role_and_timeouts(ref if ref is not None else (str(worst.inode) if worst else None))
    view = status.build(policy, sample, history, now, role, timeouts, boot=_boot_report(policy))
    view.data["daemon"] = None
    _add_last_bundle(view, policy)
    return _print_status(args, view, store.load_hour() if sys.stdout.isatty() and not args.json else {},
                         None, policy.thresholds)


def _add_last_bundle(view, policy: Policy) -> None:
    """The newest bundle's id and its top finding (ctguard.evidence.review)."""
    try:
        view.data["last_bundle"] = last_bundle(policy.evidence.dir)
    except OSError:
        view.data["last_bundle"] = None


def _print_status(args: argparse.Namespace, view, hour, _age, thresholds) -> int:
    t = thresholds or Thresholds()
    if args.json:
        print(status_cli.render_json(view))
    elif sys.stdout.isatty():
        print(status_cli.render_tty(view, hour, time.time(), t.warn, t.act))
    else:
        print(status_cli.render_text(view))
    return view.code


def cmd_bump(args: argparse.Namespace) -> int:
    return client.bump(Path(args.policy), args.to, args.lower)


def cmd_reload(args: argparse.Namespace) -> int:
    return client.reload(Path(args.policy), args.pid)


def cmd_recommend(args: argparse.Namespace) -> int:
    loaded = _load_or_report(Path(args.policy), EX_CONFIG)
    if isinstance(loaded, int):
        return loaded
    return recommend.main(loaded, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's copy of --policy must not overwrite one given before it.
    common.add_argument("--policy", default=argparse.SUPPRESS, metavar="P",
                        help=f"policy file (default {DEFAULT_POLICY_PATH})")
    parser = argparse.ArgumentParser(prog="ctguard", parents=[common],
                                     description="Keeps Linux connection tracking from running out of room.")
    parser.add_argument("--version", action="version", version=f"ctguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", parents=[common], help="the daemon, in the foreground")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check-policy", parents=[common], help="validate a policy")
    p.add_argument("file", nargs="?", help="policy to check (default: --policy)")
    p.add_argument("--effective", action="store_true",
                   help="print the policy merged with its policy.d drop-ins, each key with the file it came from")
    p.set_defaults(func=cmd_check_policy)
    p = sub.add_parser("status", parents=[common], help="live fill per namespace; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("bump", parents=[common], help="an operator's increase, held to the same ceiling")
    p.add_argument("--to", type=_positive_int, required=True, metavar="N")
    p.add_argument("--lower", action="store_true",
                   help="allow N below the current max (undo a bump); refused below the live count / thresholds.act")
    p.set_defaults(func=cmd_bump)
    p = sub.add_parser("reload", parents=[common],
                       help="make the running daemon reload its policy now; exit 1 when it rejects the file")
    p.add_argument("--pid", type=_positive_int, metavar="PID",
                   help="signal this daemon (SIGHUP) when it has no control socket (ExecReload passes $MAINPID)")
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser("recommend", parents=[common], help="sizing advice from recorded peaks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recommend)
    add_commands(sub, parents=[common])
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 < value <= policy_mod.KERNEL_UINT_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..{policy_mod.KERNEL_UINT_LIMIT}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "policy"):
        args.policy = str(DEFAULT_POLICY_PATH)
    func = args.func
    # The evidence commands (ctguard.cli.bundles) take the loaded policy as a second argument.
    if getattr(args, "with_policy", False):
        if args.command == "capture" and getattr(args, "decision_file", None) is None:
            # A broken policy file (a rejected reload) need not stop a capture the daemon can make.
            if client.load(Path(args.policy))[0] is None:
                code = client.capture(Path(args.policy), None, args.reason, args.netns)
                if code is not None:
                    return code
        loaded = _load_or_report(Path(args.policy), EX_CONFIG)
        if isinstance(loaded, int):
            return loaded
        return func(args, loaded)
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
