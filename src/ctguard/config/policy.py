"""The operator's policy: frozen dataclasses loaded from TOML, every problem named by file and key.

An empty file is a valid policy (every key has a default). Unknown keys, wrong types,
out-of-range values and contradictions are errors; the loader collects all of them so the
operator fixes the file once, not one key per run.

Drop-ins: `<folder of the policy>/policy.d/*.toml` are read after the policy file in lexical
order of their names, a later file's key overriding an earlier one's (configuration
management ships site defaults in the package's file and writes per-host values in a
drop-in). Each file is checked on its own (keys, types, ranges: an error names that file);
the merged result is checked as a whole (contradictions between keys, each named with the
file it came from). The Policy remembers where every key it holds came from.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from ctguard.core.timeouts import ENFORCE_CLASSES, RELIEF_TIMEOUTS, sysctl_name  # noqa: F401  (the policy's keys; re-exported)

DEFAULT_POLICY_PATH = Path("/etc/ctguard/policy.toml")
DROPIN_FOLDER = "policy.d"          # beside the policy file
DEFAULT_ORIGIN = "built-in default"

# The kernel stores nf_conntrack_max in an unsigned int and the sysctl handler rejects
# anything above INT_MAX; hashsize is an unsigned int too. Values past this are refused
# here, before they could ever reach the kernel.
KERNEL_UINT_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Watch:
    interval: float = 1.0
    fast_interval: float = 0.1
    namespaces: str = "all"
    guard_rate: float = 100000.0    # new flows/s a table with headroom is sampled fast enough to catch


@dataclass(frozen=True)
class Thresholds:
    warn: float = 0.70
    sustain: float = 60.0
    act: float = 0.85
    horizon: float = 10.0
    calm: float = 60.0


@dataclass(frozen=True)
class Bump:
    factor: float = 2.0
    ceiling: int = 1048576
    memory_fraction: float = 0.10
    cooldown: float = 30.0
    max_per_hour: int = 6


@dataclass(frozen=True)
class Guard:
    """Growth shaped like an attack (half-open TCP or unanswered flows from many sources, or
    `invalid` climbing with the drops) gets no more table than `ceiling`: a bigger table
    only feeds a flood and costs every legitimate flow memory."""

    enabled: bool = True
    ceiling: int = 262144
    suspicious_share: float = 0.5
    min_sources: int = 256
    sample_budget: float = 0.05


@dataclass(frozen=True)
class Relief:
    """Past the ceiling, shorten the timeouts holding the entries that fill one namespace (and
    the remaining time of those entries), in that namespace only; put them back once calm."""

    # "enforce" writes only the classes in `enforce`; the others are advised (journaled, never
    # written). The traffic lab (bench/README.md, relief past the ceiling) served 1.000x the ideal
    # in a DNS storm behind a NAT gateway and 0.999x in a flash crowd past the ceiling, 0 drops,
    # a long-lived VPN-like UDP flow never cut: hence enforce by default, for those classes only.
    mode: str = "enforce"
    enforce: tuple[str, ...] = ENFORCE_CLASSES
    calm_for: float = 300.0
    timeouts: tuple[tuple[str, int], ...] = tuple(
        (k, v) for k, (v, _) in RELIEF_TIMEOUTS.items() if v is not None)
    # Graduated early aging between watermarks (fill ratios; 0 = the default named):
    high: float = 0.0       # relief's steps start here; 0: [thresholds] act
    low: float = 0.0        # steps back up only below this; 0: [thresholds] warn
    steps: int = 4          # levels between the original timeouts and the emergency values
    restore: str = "predicted"  # step back up only when the fill predicted there stays below low; "calm": when calm

    def emergency(self, key: str) -> int | None:
        return dict(self.timeouts).get(key)

    def enforces(self, key: str) -> bool:
        """Whether relief writes `key`'s timeout (mode enforce and the class listed), not only advises it."""
        return self.mode == "enforce" and key in self.enforce

    def high_mark(self, thresholds: "Thresholds") -> float:
        return self.high or thresholds.act

    def low_mark(self, thresholds: "Thresholds") -> float:
        if self.low:
            return self.low
        high = self.high_mark(thresholds)
        return thresholds.warn if thresholds.warn < high else round(max(0.0, high - 0.05), 4)


@dataclass(frozen=True)
class Buckets:
    manage: bool = True
    ratio: int = 0          # max / buckets; 0: the kernel's own (1 since Linux 5.15, 4 before)
    resize: str = "calm"    # when the run-time resize happens: "calm", "at-once", "never"


@dataclass(frozen=True)
class Persist:
    mode: str = "stable"
    stable_for: float = 600.0
    sysctl_file: Path = Path("/etc/sysctl.d/90-ctguard.conf")
    modprobe_file: Path = Path("/etc/modprobe.d/ctguard.conf")
    update_initramfs: bool = False  # run update-initramfs -u after writing the modprobe file (nf_conntrack in the initramfs)
    defend: bool = True             # set a max another tool lowered back (enforce mode, once per [bump] cooldown)


@dataclass(frozen=True)
class Evidence:
    dir: Path = Path("/var/lib/ctguard/bundles")
    keep: int = 50
    max_bytes: int = 268435456
    top: int = 20
    budget: float = 15.0
    incident_captures: int = 6      # bundles per incident: the first bump, each worse moment (refused, drops, relief, grown), its end


@dataclass(frozen=True)
class State:
    dir: Path = Path("/var/lib/ctguard")


@dataclass(frozen=True)
class Metrics:
    textfile: str = "/var/lib/prometheus/node-exporter/ctguard.prom"


@dataclass(frozen=True)
class Control:
    """Where the daemon listens for `ctguard status`, `bump`, `capture` (root only)."""

    socket: Path = Path("/run/ctguard/control.sock")


@dataclass(frozen=True)
class Policy:
    mode: str = "enforce"
    watch: Watch = field(default_factory=Watch)
    thresholds: Thresholds = field(default_factory=Thresholds)
    bump: Bump = field(default_factory=Bump)
    guard: Guard = field(default_factory=Guard)
    buckets: Buckets = field(default_factory=Buckets)
    persist: Persist = field(default_factory=Persist)
    evidence: Evidence = field(default_factory=Evidence)
    state: State = field(default_factory=State)
    metrics: Metrics = field(default_factory=Metrics)
    control: Control = field(default_factory=Control)
    relief: Relief = field(default_factory=Relief)
    source: str = "<defaults>"
    # Where each key's value came from: ((section, key, file), ...), section "" for the top
    # level; keys not listed hold their built-in default. Not part of equality: two policies
    # holding the same values are the same policy wherever the values were written.
    origins: tuple[tuple[str, str, str], ...] = field(default=(), compare=False)
    dropins: tuple[str, ...] = field(default=(), compare=False)

    @property
    def observe_only(self) -> bool:
        return self.mode == "observe"

    def origin(self, section: str, key: str) -> str:
        """The file that set `[section] key` (section "" for the top level), or "built-in default"."""
        for s, k, f in self.origins:
            if (s, k) == (section, key):
                return f
        return DEFAULT_ORIGIN


class PolicyError(Exception):
    """A policy that cannot be used; `problems` lists every one, each naming file and key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# key -> (type accepted, range check or choices, human description of the range)
_Check = tuple[type | tuple[type, ...], Any, str]

_SECTIONS: dict[str, type] = {
    "watch": Watch,
    "thresholds": Thresholds,
    "bump": Bump,
    "guard": Guard,
    "buckets": Buckets,
    "persist": Persist,
    "evidence": Evidence,
    "state": State,
    "metrics": Metrics,
    "control": Control,
    "relief": Relief,
}


def _between(lo: float, hi: float, lo_open: bool = False):
    def ok(v: float) -> bool:
        return (v > lo if lo_open else v >= lo) and v <= hi
    return ok


_NUM = (int, float)
_CHECKS: dict[tuple[str, str], _Check] = {
    ("", "mode"): (str, {"enforce", "observe"}, 'one of "enforce", "observe"'),
    ("watch", "interval"): (_NUM, _between(0, 3600, True), "a number of seconds > 0 and <= 3600"),
    ("watch", "fast_interval"): (_NUM, _between(0.01, 3600), "a number of seconds >= 0.01 and <= 3600"),
    ("watch", "namespaces"): (str, {"all", "host"}, 'one of "all", "host"'),
    ("watch", "guard_rate"): (_NUM, _between(0, 10_000_000), "new flows per second between 0 (off) and 10000000"),
    ("thresholds", "warn"): (_NUM, _between(0, 1, True), "a fill ratio > 0 and <= 1"),
    ("thresholds", "sustain"): (_NUM, _between(0, 86400), "seconds between 0 and 86400"),
    ("thresholds", "act"): (_NUM, _between(0, 1, True), "a fill ratio > 0 and <= 1"),
    ("thresholds", "horizon"): (_NUM, _between(0, 86400), "seconds between 0 (off) and 86400"),
    ("thresholds", "calm"): (_NUM, _between(0, 86400), "seconds between 0 and 86400"),
    ("bump", "factor"): (_NUM, lambda v: 1 < v <= 64, "a number > 1 and <= 64"),
    ("bump", "ceiling"): (int, _between(1024, KERNEL_UINT_LIMIT), f"an integer between 1024 and {KERNEL_UINT_LIMIT}"),
    ("bump", "memory_fraction"): (_NUM, _between(0, 0.9, True), "a fraction > 0 and <= 0.9"),
    ("bump", "cooldown"): (_NUM, _between(0, 86400), "seconds between 0 and 86400"),
    ("bump", "max_per_hour"): (int, _between(0, 3600), "an integer between 0 and 3600"),
    ("guard", "enabled"): (bool, None, "true or false"),
    ("guard", "ceiling"): (int, _between(1024, KERNEL_UINT_LIMIT), f"an integer between 1024 and {KERNEL_UINT_LIMIT}"),
    ("guard", "suspicious_share"): (_NUM, _between(0, 1, True), "a share > 0 and <= 1"),
    ("guard", "min_sources"): (int, _between(1, 1 << 20), "an integer between 1 and 1048576"),
    ("guard", "sample_budget"): (_NUM, _between(0.001, 5), "seconds between 0.001 and 5"),
    ("buckets", "manage"): (bool, None, "true or false"),
    ("buckets", "ratio"): (int, _between(0, 64), "an integer between 0 (the kernel's own) and 64"),
    ("buckets", "resize"): (str, {"calm", "at-once", "never"}, 'one of "calm", "at-once", "never"'),
    ("persist", "mode"): (str, {"immediate", "stable", "never"}, 'one of "immediate", "stable", "never"'),
    ("persist", "stable_for"): (_NUM, _between(0, 7 * 86400), "seconds between 0 and 604800"),
    ("persist", "sysctl_file"): (str, "abspath", "an absolute path"),
    ("persist", "modprobe_file"): (str, "abspath", "an absolute path"),
    ("persist", "update_initramfs"): (bool, None, "true or false"),
    ("persist", "defend"): (bool, None, "true or false"),
    ("evidence", "dir"): (str, "abspath", "an absolute path"),
    ("evidence", "keep"): (int, _between(1, 100000), "an integer between 1 and 100000"),
    ("evidence", "max_bytes"): (int, _between(1 << 20, 1 << 50), "bytes, at least 1048576"),
    ("evidence", "top"): (int, _between(1, 10000), "an integer between 1 and 10000"),
    ("evidence", "budget"): (_NUM, _between(0.1, 3600), "seconds between 0.1 and 3600"),
    ("evidence", "incident_captures"): (int, _between(1, 100), "an integer between 1 and 100"),
    ("state", "dir"): (str, "abspath", "an absolute path"),
    ("metrics", "textfile"): (str, "abspath-or-empty", 'an absolute path, or "" to turn metrics off'),
    ("control", "socket"): (str, "abspath", "an absolute path"),
    ("relief", "mode"): (str, {"off", "advise", "enforce"}, 'one of "off", "advise", "enforce"'),
    ("relief", "enforce"): (list, "relief-classes", "a list of relief classes"),
    ("relief", "calm_for"): (_NUM, _between(0, 86400), "seconds between 0 and 86400"),
    ("relief", "timeouts"): (dict, "relief-timeouts", "a table of timeout name = seconds"),
    ("relief", "high"): (_NUM, _between(0, 1), "a fill ratio between 0 ([thresholds] act) and 1"),
    ("relief", "low"): (_NUM, _between(0, 1), "a fill ratio between 0 ([thresholds] warn) and 1"),
    ("relief", "steps"): (int, _between(1, 20), "an integer between 1 and 20"),
    ("relief", "restore"): (str, {"predicted", "calm"}, 'one of "predicted", "calm"'),
}


def known_keys() -> dict[str, list[str]]:
    """Every key the loader accepts: {"": top-level keys, section: its keys}, in file order."""
    keys: dict[str, list[str]] = {"": [k for (s, k) in _CHECKS if s == ""]}
    for section, cls in _SECTIONS.items():
        keys[section] = [f.name for f in fields(cls)]
    return keys


def _type_name(t: type | tuple[type, ...]) -> str:
    if t == _NUM:
        return "a number"
    return {str: "a string", int: "an integer", bool: "true or false", dict: "a table",
            list: "a list"}.get(t, str(t))  # type: ignore[arg-type]  # type: ignore[arg-type]


def _check_value(where: str, section: str, key: str, value: Any, problems: list[str]) -> Any:
    expected, check, described = _CHECKS[(section, key)]
    # TOML booleans are Python ints; never let `true` pass as a number or a number as a bool.
    if isinstance(value, bool) and expected is not bool:
        problems.append(f"{where}: must be {_type_name(expected)}, not a boolean")
        return None
    if not isinstance(value, expected):
        problems.append(f"{where}: must be {_type_name(expected)}, not {type(value).__name__} {value!r}")
        return None
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{where}: must be a finite number, not {value!r}")
        return None
    if check is None:
        return value
    if check == "relief-timeouts":
        return _relief_timeouts(where, value, problems)
    if check == "relief-classes":
        return _relief_classes(where, value, problems)
    if check in ("abspath", "abspath-or-empty"):
        if check == "abspath-or-empty" and value == "":
            return value
        if not value.startswith("/") or "\0" in value:
            problems.append(f"{where}: must be {described}, not {value!r}")
            return None
        if "/../" in value + "/":
            problems.append(f"{where}: must not contain '..' ({value!r})")
            return None
        return Path(value) if key != "textfile" else value
    if isinstance(check, set):
        if value not in check:
            problems.append(f"{where}: must be {described}, not {value!r}")
            return None
        return value
    if not check(value):
        problems.append(f"{where}: must be {described}, not {value!r}")
        return None
    return value


def _relief_timeouts(where: str, table: dict, problems: list[str]) -> tuple[tuple[str, int], ...] | None:
    """[relief.timeouts]: the keys it names replace the defaults; each at or above its floor."""
    values = {k: v for k, (v, _) in RELIEF_TIMEOUTS.items() if v is not None}
    bad = False
    for key, value in table.items():
        here = f"{where.replace('] timeouts', '.timeouts]')} {key}"
        if key not in RELIEF_TIMEOUTS:
            problems.append(f"{here}: unknown timeout (known: {', '.join(RELIEF_TIMEOUTS)})")
            bad = True
            continue
        floor = RELIEF_TIMEOUTS[key][1]
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{here}: must be an integer number of seconds, not {value!r}")
            bad = True
        elif value < floor or value > 432000:
            problems.append(f"{here}: {value} is below the floor of {floor} s for {sysctl_name(key)} "
                            f"(see ctguard-policy(5) for why)" if value < floor
                            else f"{here}: {value} is above 432000 s, longer than any kernel default")
            bad = True
        else:
            values[key] = value
    return None if bad else tuple(values.items())


def _relief_classes(where: str, names: list, problems: list[str]) -> tuple[str, ...] | None:
    """[relief] enforce: the classes relief may write, each one [relief.timeouts] can name."""
    bad = False
    for name in names:
        if not isinstance(name, str) or name not in RELIEF_TIMEOUTS:
            problems.append(f"{where}: unknown relief class {name!r} (known: {', '.join(RELIEF_TIMEOUTS)})")
            bad = True
    # Order kept, duplicates dropped: `check-policy --effective` prints it back as written.
    return None if bad else tuple(dict.fromkeys(names))


def _cast(value: Any, default: Any) -> Any:
    # Integers are accepted where seconds/ratios are floats (interval = 1).
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    return value


def _checked_values(doc: dict[str, Any], source: str, problems: list[str]) -> dict[tuple[str, str], Any]:
    """One file's keys, each checked on its own: {(section, key): value}; problems name `source`."""
    values: dict[tuple[str, str], Any] = {}
    for key, value in doc.items():
        where = f"{source}: {key}"
        if key in _SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{source}: [{key}] must be a table, not {type(value).__name__}")
                continue
            cls = _SECTIONS[key]
            defaults = cls()
            known = {f.name for f in fields(cls)}
            for sub, subvalue in value.items():
                subwhere = f"{source}: [{key}] {sub}"
                if sub not in known:
                    problems.append(f"{subwhere}: unknown key (known: {', '.join(sorted(known))})")
                    continue
                checked = _check_value(subwhere, key, sub, subvalue, problems)
                if checked is not None:
                    values[(key, sub)] = _cast(checked, getattr(defaults, sub))
        elif key == "mode":
            checked = _check_value(where, "", "mode", value, problems)
            if checked is not None:
                values[("", "mode")] = checked
        else:
            known_top = sorted(["mode", *_SECTIONS])
            problems.append(f"{where}: unknown key (known: {', '.join(known_top)})")
    return values


def _build(values: dict[tuple[str, str], Any], origins: dict[tuple[str, str], str], source: str,
           dropins: tuple[str, ...] = ()) -> Policy:
    top = {k: v for (s, k), v in values.items() if s == ""}
    built = {}
    for section, cls in _SECTIONS.items():
        mine = {k: v for (s, k), v in values.items() if s == section}
        if mine:
            built[section] = cls(**mine)
    return Policy(**top, **built, source=source, dropins=dropins,
                  origins=tuple((s, k, f) for (s, k), f in origins.items()))


def from_mapping(doc: dict[str, Any], source: str) -> Policy:
    """Build a Policy from a parsed TOML document, or raise PolicyError listing every problem."""
    problems: list[str] = []
    values = _checked_values(doc, source, problems)
    policy = _build(values, {k: source for k in values}, source)
    problems.extend(_contradictions(policy))
    if problems:
        raise PolicyError(problems)
    return policy


def _at(p: Policy, section: str, key: str) -> str:
    """`FILE: [section] key` for an error about a key, FILE being where its value came from."""
    origin = p.origin(section, key)
    name = f"[{section}] {key}" if section else key
    return f"{p.source if origin == DEFAULT_ORIGIN else origin}: {name}"


def _contradictions(p: Policy) -> list[str]:
    out: list[str] = []
    if p.thresholds.act < p.thresholds.warn:
        out.append(f"{_at(p, 'thresholds', 'act')}: {p.thresholds.act} is below [thresholds] warn {p.thresholds.warn} "
                   f"({p.origin('thresholds', 'warn')}); act must be >= warn")
    if p.watch.fast_interval > p.watch.interval:
        out.append(f"{_at(p, 'watch', 'fast_interval')}: {p.watch.fast_interval} is above [watch] interval "
                   f"{p.watch.interval} ({p.origin('watch', 'interval')})")
    high, low = p.relief.high_mark(p.thresholds), p.relief.low_mark(p.thresholds)
    if (p.relief.high or p.relief.low) and low >= high:
        key = "low" if p.relief.low else "high"
        out.append(f"{_at(p, 'relief', key)}: the low watermark {low} must be below the high watermark {high} "
                   f"([relief] high, 0 = [thresholds] act; [relief] low, 0 = [thresholds] warn)")
    if p.state.dir == p.evidence.dir:
        out.append(f"{_at(p, 'evidence', 'dir')}: must differ from [state] dir ({p.state.dir})")
    if p.persist.sysctl_file == p.persist.modprobe_file:
        out.append(f"{_at(p, 'persist', 'modprobe_file')}: must differ from [persist] sysctl_file")
    return out


def dropin_folder(path: Path | str) -> Path:
    return Path(path).parent / DROPIN_FOLDER


def dropin_files(path: Path | str) -> list[Path]:
    """The drop-ins that apply to the policy at `path`, in the order they are read.

    Names ending in `.toml` and not starting with a dot (editor and dpkg leftovers such as
    `.50-x.toml.swp` or `50-x.toml.dpkg-old` are not read), sorted by name as bytes.
    """
    folder = dropin_folder(path)
    try:
        names = sorted(os.listdir(folder), key=os.fsencode)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise PolicyError([f"{folder}: not a folder; drop-ins go in a folder of that name"]) from None
    except OSError as exc:
        raise PolicyError([f"{folder}: cannot read the drop-in folder: {exc.strerror}"]) from None
    return [folder / n for n in names if n.endswith(".toml") and not n.startswith(".")]


def _read_doc(path: Path, problems: list[str]) -> dict[str, Any] | None:
    source = str(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        problems.append(f"{source}: a folder, not a file; a drop-in must be a TOML file")
        return None
    except OSError as exc:
        problems.append(f"{source}: cannot read: {exc.strerror}")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{source}: not UTF-8 text (byte {exc.start})")
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{source}: not valid TOML: {exc}")
        return None


def load(path: Path | str) -> Policy:
    """Load and validate a policy file and its drop-ins; PolicyError names the file and every bad key."""
    path = Path(path)
    source = str(path)
    problems: list[str] = []
    values: dict[tuple[str, str], Any] = {}
    origins: dict[tuple[str, str], str] = {}
    try:
        path.stat()
    except FileNotFoundError:
        if path != DEFAULT_POLICY_PATH:
            raise PolicyError([f"{source}: no such file; create it (an empty file is a valid policy) or pass --policy"]) from None
        # Installed without the package's conffile (pip, a source checkout): every key
        # has a default, so run on those (and on any drop-ins) rather than refuse to start.
        source = f"built-in defaults ({source} does not exist)"
    except OSError as exc:
        raise PolicyError([f"{source}: cannot read: {exc.strerror}"]) from None
    else:
        doc = _read_doc(path, problems)
        if doc is None:
            raise PolicyError(problems)
        values = _checked_values(doc, source, problems)
        origins = {k: source for k in values}
    dropins = dropin_files(path)
    for dropin in dropins:
        try:
            mode = dropin.stat().st_mode
        except OSError as exc:
            problems.append(f"{dropin}: cannot read: {exc.strerror}")
            continue
        if mode & 0o002:
            # ctguard runs as root and the policy says where it writes: a file anyone may
            # change must not steer it.
            problems.append(f"{dropin}: writable by every user (mode {mode & 0o777:04o}); "
                            f"run `chmod o-w {dropin}`")
            continue
        doc = _read_doc(dropin, problems)
        if doc is None:
            continue
        mine = _checked_values(doc, str(dropin), problems)
        values.update(mine)
        origins.update({k: str(dropin) for k in mine})
    if problems:
        raise PolicyError(problems)
    policy = _build(values, origins, source, tuple(str(d) for d in dropins))
    problems = _contradictions(policy)
    if problems:
        raise PolicyError(problems)
    return policy


def loads(raw: bytes | str, source: str = "<string>") -> Policy:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError([f"{source}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        doc = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([f"{source}: not valid TOML: {exc}"]) from None
    return from_mapping(doc, source)


def warnings_for(policy: Policy, kernel_max: int | None) -> list[str]:
    """Problems that do not stop ctguard but that the operator should hear about."""
    out = []
    if kernel_max is not None and policy.bump.ceiling < kernel_max:
        out.append(
            f"{_at(policy, 'bump', 'ceiling')}: {policy.bump.ceiling} is below the kernel's current "
            f"nf_conntrack_max {kernel_max}; ctguard will never bump (it never lowers max)"
        )
    if policy.bump.max_per_hour == 0 and policy.mode == "enforce":
        out.append(f"{_at(policy, 'bump', 'max_per_hour')}: 0 means automatic bumps are off")
    return out


def summary(policy: Policy) -> str:
    p = policy
    persist = {
        "immediate": f"persisted at once to {p.persist.sysctl_file}",
        "stable": f"persisted to {p.persist.sysctl_file} once no drop was seen for {p.persist.stable_for:g} s",
        "never": "never persisted",
    }[p.persist.mode]
    horizon = f" or when growth fills the table within {p.thresholds.horizon:g} s" if p.thresholds.horizon else ""
    buckets = ((f"buckets kept at max/{p.buckets.ratio}" if p.buckets.ratio else "buckets kept at the kernel's own ratio")
               if p.buckets.manage else "buckets left alone")
    guard = (f"attack-shaped growth stops at {min(p.guard.ceiling, p.bump.ceiling)}" if p.guard.enabled
             else "no guard against attack-shaped growth")
    relief = {
        "off": "no timeout relief",
        "advise": "timeout relief advised, never made",
        "enforce": (f"timeouts of what fills a namespace the ceiling cannot save ({', '.join(p.relief.enforce) or 'no class'}; "
                    f"others advised) aged early in {p.relief.steps} steps from "
                    f"{p.relief.high_mark(p.thresholds):.0%}, back up below {p.relief.low_mark(p.thresholds):.0%} "
                    f"(each after {p.relief.calm_for / p.relief.steps:g} s calm"
                    + (" and only when the fill predicted there stays below it)" if p.relief.restore == "predicted" else ")")),
    }[p.relief.mode]
    source = p.source + "".join(f" + {d}" for d in p.dropins)
    return (
        f"{source}: mode {p.mode}; sampling {p.watch.namespaces} namespaces every {p.watch.interval:g} s "
        f"({p.watch.fast_interval:g} s above {p.thresholds.warn:.0%}); warns after {p.thresholds.sustain:g} s above "
        f"{p.thresholds.warn:.0%}; bumps at {p.thresholds.act:.0%}{horizon}, by x{p.bump.factor:g} up to a ceiling of "
        f"{p.bump.ceiling} and {p.bump.memory_fraction:.0%} of memory, at most {p.bump.max_per_hour} per hour "
        f"{p.bump.cooldown:g} s apart; {guard}; {relief}; {buckets}; {persist}; bundles in {p.evidence.dir} "
        f"(keep {p.evidence.keep}); state in {p.state.dir}; metrics "
        f"{'to ' + p.metrics.textfile if p.metrics.textfile else 'off'}."
    )



def _toml_value(value: Any) -> str:

    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple) and value and all(isinstance(x, tuple) and len(x) == 2 for x in value):
        # [relief] timeouts: an inline table of name = seconds (loadable as it is printed)
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value) + "}"
    if isinstance(value, tuple) and all(isinstance(x, str) for x in value):
        # [relief] enforce: a list of class names on one line, like the table above
        return "[" + ", ".join(_toml_value(x) for x in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[len("v = "):]


def effective(policy: Policy) -> str:
    """The merged policy as TOML, every key with the file its value came from.

    What `ctguard check-policy --effective` prints: loadable as a policy itself, so an operator
    can diff two hosts' effective policies.
    """
    p = policy
    files = [p.source, *p.dropins]
    lines = [f"# effective policy: {', then '.join(files)}"]

    def key_line(section: str, name: str, value: Any) -> str:
        text = f"{name} = {_toml_value(value)}"
        return f"{text:<48} # {p.origin(section, name)}"

    for f in fields(Policy):
        if f.name in ("source", "origins", "dropins") or f.name in _SECTIONS:
            continue
        lines.append(key_line("", f.name, getattr(p, f.name)))
    for section in _SECTIONS:
        lines.append(f"\n[{section}]")
        value = getattr(p, section)
        for g in fields(value):
            lines.append(key_line(section, g.name, getattr(value, g.name)))
    return "\n".join(lines) + "\n"
