"""The operator's policy: frozen dataclasses loaded from TOML, every problem named by file and key.

An empty file is a valid policy (every key has a default). Unknown keys, wrong types,
out-of-range values and contradictions are errors; the loader collects all of them so the
operator fixes the file once, not one key per run.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_POLICY_PATH = Path("/etc/ctguard/policy.toml")

# The kernel stores nf_conntrack_max in an unsigned int and the sysctl handler rejects
# anything above INT_MAX; hashsize is an unsigned int too. Values past this are refused
# here, before they could ever reach the kernel.
KERNEL_UINT_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Watch:
    interval: float = 1.0
    fast_interval: float = 0.1
    namespaces: str = "all"


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
class Buckets:
    manage: bool = True
    ratio: int = 4


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


@dataclass(frozen=True)
class State:
    dir: Path = Path("/var/lib/ctguard")


@dataclass(frozen=True)
class Metrics:
    textfile: str = "/var/lib/prometheus/node-exporter/ctguard.prom"


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
    source: str = "<defaults>"

    @property
    def observe_only(self) -> bool:
        return self.mode == "observe"


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
    ("buckets", "ratio"): (int, _between(1, 64), "an integer between 1 and 64"),
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
    ("state", "dir"): (str, "abspath", "an absolute path"),
    ("metrics", "textfile"): (str, "abspath-or-empty", 'an absolute path, or "" to turn metrics off'),
}


def _type_name(t: type | tuple[type, ...]) -> str:
    if t == _NUM:
        return "a number"
    return {str: "a string", int: "an integer", bool: "true or false"}.get(t, str(t))  # type: ignore[arg-type]


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


def _cast(value: Any, default: Any) -> Any:
    # Integers are accepted where seconds/ratios are floats (interval = 1).
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    return value


def from_mapping(doc: dict[str, Any], source: str) -> Policy:
    """Build a Policy from a parsed TOML document, or raise PolicyError listing every problem."""
    problems: list[str] = []
    top: dict[str, Any] = {}
    built: dict[str, Any] = {}
    for key, value in doc.items():
        where = f"{source}: {key}"
        if key in _SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{source}: [{key}] must be a table, not {type(value).__name__}")
                continue
            cls = _SECTIONS[key]
            defaults = cls()
            known = {f.name for f in fields(cls)}
            values: dict[str, Any] = {}
            for sub, subvalue in value.items():
                subwhere = f"{source}: [{key}] {sub}"
                if sub not in known:
                    problems.append(f"{subwhere}: unknown key (known: {', '.join(sorted(known))})")
                    continue
                checked = _check_value(subwhere, key, sub, subvalue, problems)
                if checked is not None:
                    values[sub] = _cast(checked, getattr(defaults, sub))
            built[key] = cls(**values)
        elif key == "mode":
            checked = _check_value(where, "", "mode", value, problems)
            if checked is not None:
                top["mode"] = checked
        else:
            known_top = sorted(["mode", *_SECTIONS])
            problems.append(f"{where}: unknown key (known: {', '.join(known_top)})")
    policy = Policy(**top, **built, source=source)
    problems.extend(_contradictions(policy))
    if problems:
        raise PolicyError(problems)
    return policy


def _contradictions(p: Policy) -> list[str]:
    out = []
    src = p.source
    if p.thresholds.act < p.thresholds.warn:
        out.append(f"{src}: [thresholds] act: {p.thresholds.act} is below [thresholds] warn {p.thresholds.warn}; act must be >= warn")
    if p.watch.fast_interval > p.watch.interval:
        out.append(f"{src}: [watch] fast_interval: {p.watch.fast_interval} is above [watch] interval {p.watch.interval}")
    if p.state.dir == p.evidence.dir:
        out.append(f"{src}: [evidence] dir: must differ from [state] dir ({p.state.dir})")
    if p.persist.sysctl_file == p.persist.modprobe_file:
        out.append(f"{src}: [persist] modprobe_file: must differ from [persist] sysctl_file")
    return out


def load(path: Path | str) -> Policy:
    """Load and validate a policy file; PolicyError names the file and every bad key."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if path == DEFAULT_POLICY_PATH:
            # Installed without the package's conffile (pip, a source checkout): every key
            # has a default, so run on those rather than refuse to start.
            return Policy(source=f"built-in defaults ({source} does not exist)")
        raise PolicyError([f"{source}: no such file; create it (an empty file is a valid policy) or pass --policy"]) from None
    except OSError as exc:
        raise PolicyError([f"{source}: cannot read: {exc.strerror}"]) from None
    return loads(raw, source)


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
            f"{policy.source}: [bump] ceiling: {policy.bump.ceiling} is below the kernel's current "
            f"nf_conntrack_max {kernel_max}; ctguard will never bump (it never lowers max)"
        )
    if policy.bump.max_per_hour == 0 and policy.mode == "enforce":
        out.append(f"{policy.source}: [bump] max_per_hour: 0 means automatic bumps are off")
    return out


def summary(policy: Policy) -> str:
    p = policy
    persist = {
        "immediate": f"persisted at once to {p.persist.sysctl_file}",
        "stable": f"persisted to {p.persist.sysctl_file} once no drop was seen for {p.persist.stable_for:g} s",
        "never": "never persisted",
    }[p.persist.mode]
    horizon = f" or when growth fills the table within {p.thresholds.horizon:g} s" if p.thresholds.horizon else ""
    buckets = f"buckets kept at max/{p.buckets.ratio}" if p.buckets.manage else "buckets left alone"
    guard = (f"attack-shaped growth stops at {min(p.guard.ceiling, p.bump.ceiling)}" if p.guard.enabled
             else "no guard against attack-shaped growth")
    return (
        f"{p.source}: mode {p.mode}; sampling {p.watch.namespaces} namespaces every {p.watch.interval:g} s "
        f"({p.watch.fast_interval:g} s above {p.thresholds.warn:.0%}); warns after {p.thresholds.sustain:g} s above "
        f"{p.thresholds.warn:.0%}; bumps at {p.thresholds.act:.0%}{horizon}, by x{p.bump.factor:g} up to a ceiling of "
        f"{p.bump.ceiling} and {p.bump.memory_fraction:.0%} of memory, at most {p.bump.max_per_hour} per hour "
        f"{p.bump.cooldown:g} s apart; {guard}; {buckets}; {persist}; bundles in {p.evidence.dir} "
        f"(keep {p.evidence.keep}); state in {p.state.dir}; metrics "
        f"{'to ' + p.metrics.textfile if p.metrics.textfile else 'off'}."
    )
