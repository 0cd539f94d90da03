"""`ctguard capture` and `ctguard bundles list|show|export`.

`add_commands(subparsers)` registers them on the main parser; each handler has the signature
`func(args, policy) -> int` and reads `policy.evidence` (dir, keep, max_bytes, top, budget).
The daemon starts `ctguard capture --reason R --netns N --decision-file F` in a low-priority
child, so a capture never holds up the loop.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctguard.control import client
from ctguard.control import protocol as control
from ctguard.config.policy import effective
from ctguard.evidence import bundle, report, review
from ctguard.host.netns import NetnsError, resolve
from ctguard.store.files import atomic_write, read_text_nofollow


def add_commands(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register the commands; `parents` (e.g. the one holding --policy) go on every (sub)command."""
    parents = list(parents)
    cap = subparsers.add_parser("capture", parents=parents, help="capture an evidence bundle now and print its path")
    cap.add_argument("--netns", metavar="N", help="namespace: a name under /run/netns, an inode number, or a PID (default: ctguard's own)")
    cap.add_argument("--reason", metavar="R", default="manual", help="why (becomes part of the folder name)")
    cap.add_argument("--decision-file", metavar="PATH", type=Path, help="JSON object: the decision that led to this capture")
    cap.add_argument("--timeline-file", metavar="PATH", type=Path,
                     help="JSON object: the flight recorder's window (the daemon passes it; by hand it is asked for)")
    cap.set_defaults(func=cmd_capture, with_policy=True)

    bun = subparsers.add_parser("bundles", parents=parents, help="review evidence bundles")
    sub = bun.add_subparsers(dest="bundles_command", metavar="{list,show,report,export}")
    sub.required = True
    lst = sub.add_parser("list", parents=parents, help="list bundles, oldest first")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=cmd_list, with_policy=True)
    shw = sub.add_parser("show", parents=parents, help="a readable summary of one bundle")
    shw.add_argument("id", metavar="ID")
    shw.add_argument("--json", action="store_true", help="the same content as JSON (verdict, findings, timeline)")
    shw.set_defaults(func=cmd_show, with_policy=True)
    rep = sub.add_parser("report", parents=parents, help="one self-contained HTML report (charts as inline SVG)")
    rep.add_argument("id", metavar="ID")
    rep.add_argument("-o", "--output", metavar="FILE", type=Path, required=True, help="the .html file to write")
    rep.set_defaults(func=cmd_report, with_policy=True)
    exp = sub.add_parser("export", parents=parents, help="write one bundle as a .tar.gz")
    exp.add_argument("id", metavar="ID")
    exp.add_argument("-o", "--output", metavar="FILE", type=Path, help="file or folder (default: ./ID.tar.gz)")
    exp.add_argument("--redact", action="store_true",
                     help="replace every IP address by a pseudonym keyed for this export (the bundle stays as it is)")
    exp.set_defaults(func=cmd_export, with_policy=True)


def _fail(message: str) -> int:
    print(f"ctguard: {message}", file=sys.stderr)
    return 1


def _policy_text(args: argparse.Namespace, policy: Any = None) -> str:
    if getattr(policy, "dropins", ()):
        # Drop-ins in force: the merged policy, each key with the file it came from.
        return effective(policy)
    path = getattr(args, "policy", None)
    if not path:
        return ""
    try:
        return read_text_nofollow(path)
    except FileNotFoundError:
        return f"# {path} does not exist: the built-in defaults were in force\n"
    except OSError as exc:
        return f"# {path} could not be read: {exc}\n"


def _decision(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    value = json.loads(read_text_nofollow(path, limit=1 << 20))
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object (the decision), not {type(value).__name__}")
    return value


def _progress_printer():
    if not sys.stderr.isatty():
        return None

    def show(message: str) -> None:
        # One line, rewritten in place: progress is for a watching operator, not for logs.
        sys.stderr.write("\r\033[K" + message)
        if message.startswith("bundle written"):
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _timeline(args: argparse.Namespace, policy: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The flight recorder's window: from the daemon's file, else asked of the running daemon."""
    if args.timeline_file is not None:
        # The daemon's window: a missing or damaged one costs the bundle its timeline, not the capture.
        try:
            value = json.loads(read_text_nofollow(args.timeline_file, limit=64 << 20))
        except (OSError, ValueError) as exc:
            return None, f"no timeline: the daemon's window could not be read ({exc})"
        if not isinstance(value, dict):
            return None, f"no timeline: {args.timeline_file} does not hold a JSON object"
        return value, None
    path = getattr(getattr(policy, "control", None), "socket", None) or "/run/ctguard/control.sock"
    try:
        answer = control.request(str(path), "timeline", {})
    except Exception as exc:  # the daemon said no, or answered nonsense: the capture goes on
        return None, f"no timeline: the daemon did not give its window ({exc})"
    if answer is None:
        return None, "no timeline: no ctguard daemon answered (the flight recorder lives in the daemon)"
    window = answer.get("timeline") if isinstance(answer, dict) else None
    if not isinstance(window, dict):
        return None, "no timeline: the daemon's answer held none"
    return window, None


def cmd_capture(args: argparse.Namespace, policy: Any) -> int:
    if args.decision_file is None:
        # An operator's capture goes through the running daemon when one answers (ctguard.control.client);
        # the daemon's own capture child passes --decision-file and captures here.
        code = client.capture(Path(args.policy), policy, args.reason, args.netns)
        if code is not None:
            return code
    try:
        decision = _decision(args.decision_file)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot use --decision-file: {exc}")
    timeline, timeline_note = _timeline(args, policy)
    if timeline_note:
        print(f"note: {timeline_note}", file=sys.stderr)
    netns_path = None
    if args.netns:
        try:
            netns_path = resolve(args.netns).path
        except NetnsError as exc:
            return _fail(exc.strerror or str(exc))
    try:
        path = bundle.capture(
            policy.evidence,
            reason=args.reason,
            netns_path=netns_path,
            policy_text=_policy_text(args, policy),
            decision=decision,
            progress=_progress_printer(),
            timeline=timeline,
            timeline_note=timeline_note,
        )
    except (OSError, bundle.BundleError) as exc:
        return _fail(f"capture failed: {exc} (the bundle folder is [evidence] dir = {policy.evidence.dir})")
    print(path)
    return 0


def cmd_list(args: argparse.Namespace, policy: Any) -> int:
    bundles = bundle.list_bundles(policy.evidence.dir)
    if args.json:
        print(json.dumps([b.as_json() for b in bundles], indent=2))
        return 0
    if not bundles:
        print(f"no bundles in {policy.evidence.dir}")
        return 0
    # Every column says its unit: the size in KiB, the capture's duration in seconds.
    # Which incident each bundle belongs to: its first bump, its worse moments, its end.
    print(f"{'ID':<44} {'SIZE (KiB)':>10} {'TOOK (s)':>8}  NOTES")
    for b in bundles:
        notes = []
        if b.incident:
            notes.append(f"{b.incident}" + (" (still open when taken)" if b.incident_open else ""))
        if not b.complete:
            notes.append("incomplete (running or crashed)")
        if b.cut_short:
            notes.append("cut short")
        if b.errors:
            notes.append(f"{b.errors} collector(s) failed")
        print(f"{b.id:<44} {b.bytes / 1024:>10.1f} {b.seconds:>8.2f}  {', '.join(notes)}")
    return 0


def cmd_show(args: argparse.Namespace, policy: Any) -> int:

    try:
        if args.json:
            sys.stdout.write(review.show_json(policy.evidence.dir, args.id) + "\n")
        else:
            sys.stdout.write(review.show(policy.evidence.dir, args.id, tty=sys.stdout.isatty()))
    except (OSError, bundle.BundleError) as exc:
        return _fail(str(exc))
    return 0


def cmd_report(args: argparse.Namespace, policy: Any) -> int:

    try:
        text = report.report(policy.evidence.dir, args.id)
        out = args.output / f"{args.id}.html" if args.output.is_dir() else args.output
        # 0600 like the bundle: the report names addresses too.
        atomic_write(out, text, 0o600)
    except (OSError, bundle.BundleError) as exc:
        return _fail(str(exc))
    print(out)
    return 0


def cmd_export(args: argparse.Namespace, policy: Any) -> int:
    try:
        out = bundle.export(policy.evidence.dir, args.id, args.output, redact=args.redact)
    except (OSError, bundle.BundleError) as exc:
        return _fail(str(exc))
    print(out)
    return 0
