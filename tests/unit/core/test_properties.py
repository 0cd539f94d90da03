"""Property-based tests: whatever TOML an operator (or a fuzzer) writes, the loader answers
with a valid policy or a clean PolicyError that names the file, never a traceback; and the
decision core never proposes a max above its bounds or below the current one."""

from __future__ import annotations

import math

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctguard.config import policy as policy_mod
from ctguard.config.policy import _CHECKS, Policy, PolicyError
from ctguard.core.decide import decide, upper_bound
from ctguard.core.model import BumpRecord, History, Instant, KernelLimits, NamespaceReading, Sample, SetBuckets, SetMax

SECTIONS = sorted({s for s, _ in _CHECKS if s})
KEYS = {s: sorted(k for sec, k in _CHECKS if sec == s) for s in SECTIONS}

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["enforce", "observe", "all", "host", "stable", "never", "immediate", "/var/lib/x", ""]),
    st.lists(st.integers(), max_size=3),
)


@st.composite
def documents(draw) -> dict:
    doc: dict = {}
    if draw(st.booleans()):
        doc["mode"] = draw(scalars)
    for section in draw(st.lists(st.sampled_from(SECTIONS + ["bogus"]), max_size=5, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            doc[section] = draw(scalars)          # a section that is not a table
            continue
        keys = KEYS.get(section, []) + ["unknown_key"]
        doc[section] = {k: draw(scalars) for k in draw(st.lists(st.sampled_from(keys), max_size=6, unique=True))}
    return doc


def _load(text: str) -> Policy | PolicyError:
    try:
        return policy_mod.loads(text, "fuzz.toml")
    except PolicyError as exc:
        return exc


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_any_toml_document_gives_a_policy_or_a_named_error(doc: dict) -> None:
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):
        return  # not representable as TOML (e.g. NaN inside arrays): nothing an operator can write
    result = _load(text)
    if isinstance(result, PolicyError):
        assert result.problems
        assert all(p.startswith("fuzz.toml") for p in result.problems), result.problems
    else:
        assert isinstance(result, Policy)
        assert result.thresholds.warn <= result.thresholds.act
        assert result.watch.fast_interval <= result.watch.interval
        assert 1024 <= result.bump.ceiling <= policy_mod.KERNEL_UINT_LIMIT


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_any_text_gives_a_policy_or_a_named_error(text: str) -> None:
    result = _load(text)
    assert isinstance(result, (Policy, PolicyError))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_give_a_policy_or_a_named_error(raw: bytes) -> None:
    try:
        result: Policy | PolicyError = policy_mod.loads(raw, "fuzz.toml")
    except PolicyError as exc:
        result = exc
    assert isinstance(result, (Policy, PolicyError))


@settings(max_examples=500)
@given(
    max_=st.integers(1024, 4_000_000),
    counts=st.lists(st.integers(0, 5_000_000), min_size=1, max_size=4),
    before=st.integers(0, 5_000_000),
    ceiling=st.integers(1024, 8_000_000),
    mem_gib=st.integers(1, 512),
    obj=st.one_of(st.none(), st.integers(128, 1024)),
    factor=st.floats(1.01, 64),
    fraction=st.floats(0.001, 0.9),
    bumps_ago=st.lists(st.floats(0, 7200), max_size=8),
)
def test_never_above_the_bounds_never_lowers(max_, counts, before, ceiling, mem_gib, obj, factor, fraction, bumps_ago):
    p = policy_mod.loads(f"[bump]\nceiling = {ceiling}\nfactor = {factor}\nmemory_fraction = {fraction}\n"
                         "cooldown = 0\nmax_per_hour = 1000", "t.toml")
    now = Instant(1e9 + 7200, 7200.0, "b")
    ns = tuple(NamespaceReading(i + 1, f"n{i}", c, ()) for i, c in enumerate(counts))
    limits = KernelLimits(max_, math.ceil(max_ / 4), obj, mem_gib << 30, mem_gib << 29)
    history = History(bumps=tuple(BumpRecord(Instant(1e9 + 7200 - a, 7200.0 - a, "b"), 1, 2, "fill") for a in bumps_ago),
                      points=((7199.0, ((1, before),)),))
    d = decide(p, Sample(now, limits, ns), history, now)
    upper, _ = upper_bound(p, limits)
    for a in d.of(SetMax):
        assert max_ < a.new <= min(upper, ceiling)
    for b in d.of(SetBuckets):
        assert b.new > b.old
