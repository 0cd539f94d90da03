from pathlib import Path

import pytest

from ctguard.config import policy
from ctguard.config.policy import Policy, PolicyError


def test_empty_file_is_the_default_policy(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("")
    p = policy.load(f)
    assert p.mode == "enforce"
    assert p.watch.interval == 1.0 and p.watch.fast_interval == 0.1 and p.watch.namespaces == "all"
    assert (p.thresholds.warn, p.thresholds.sustain, p.thresholds.act, p.thresholds.horizon) == (0.70, 60, 0.85, 10)
    assert (p.bump.factor, p.bump.ceiling, p.bump.memory_fraction, p.bump.cooldown, p.bump.max_per_hour) == (2.0, 1048576, 0.10, 30, 6)
    assert p.buckets.manage and p.buckets.ratio == 0  # issue 22: 0 = the kernel's own ratio
    assert p.persist.mode == "stable" and p.persist.stable_for == 600
    assert p.persist.sysctl_file == Path("/etc/sysctl.d/90-ctguard.conf")
    assert p.persist.modprobe_file == Path("/etc/modprobe.d/ctguard.conf")
    assert p.evidence.dir == Path("/var/lib/ctguard/bundles")
    assert (p.evidence.keep, p.evidence.max_bytes, p.evidence.top, p.evidence.budget) == (50, 268435456, 20, 15)
    assert p.state.dir == Path("/var/lib/ctguard")
    assert p.metrics.textfile == "/var/lib/prometheus/node-exporter/ctguard.prom"
    assert p.source == str(f)


def test_every_key_can_be_set() -> None:
    p = policy.loads(
        """
mode = "observe"
[watch]
interval = 2
fast_interval = 0.5
namespaces = "host"
[thresholds]
warn = 0.5
sustain = 10
act = 0.9
horizon = 0
[bump]
factor = 1.5
ceiling = 65536
memory_fraction = 0.05
cooldown = 5
max_per_hour = 3
[buckets]
manage = false
ratio = 8
[persist]
mode = "never"
stable_for = 60
sysctl_file = "/tmp/x.conf"
modprobe_file = "/tmp/y.conf"
[evidence]
dir = "/tmp/b"
keep = 3
max_bytes = 10485760
top = 5
budget = 2.5
[state]
dir = "/tmp/s"
[metrics]
textfile = ""
""",
        "t.toml",
    )
    assert p.observe_only and p.watch.interval == 2.0 and isinstance(p.watch.interval, float)
    assert p.bump.ceiling == 65536 and p.buckets.ratio == 8 and not p.buckets.manage
    assert p.persist.sysctl_file == Path("/tmp/x.conf") and p.metrics.textfile == ""


@pytest.mark.parametrize(
    "text, expected",
    [
        ("colour = 1", "t.toml: colour: unknown key"),
        ("[bump]\nceilin = 5", "t.toml: [bump] ceilin: unknown key"),
        ("[bump]\nceiling = 'big'", "t.toml: [bump] ceiling: must be an integer"),
        ("[bump]\nceiling = 10.5", "t.toml: [bump] ceiling: must be an integer"),
        ("[bump]\nceiling = 4294967296", "t.toml: [bump] ceiling: must be an integer between 1024 and 2147483647"),
        ("[bump]\nceiling = true", "t.toml: [bump] ceiling: must be an integer, not a boolean"),
        ("[bump]\nfactor = 1.0", "t.toml: [bump] factor: must be a number > 1"),
        ("[bump]\nmemory_fraction = 0", "t.toml: [bump] memory_fraction"),
        ("[bump]\nmax_per_hour = -1", "t.toml: [bump] max_per_hour"),
        ("[thresholds]\nwarn = 1.5", "t.toml: [thresholds] warn: must be a fill ratio"),
        ("[thresholds]\nact = nan", "t.toml: [thresholds] act: must be a finite number"),
        ("[thresholds]\nwarn = 0.9\nact = 0.8", "t.toml: [thresholds] act: 0.8 is below [thresholds] warn 0.9"),
        ("[watch]\ninterval = 1\nfast_interval = 2", "t.toml: [watch] fast_interval: 2.0 is above [watch] interval 1.0"),
        ("[watch]\nnamespaces = 'some'", "t.toml: [watch] namespaces: must be one of"),
        ("[watch]\ninterval = 0", "t.toml: [watch] interval"),
        ("mode = 'yolo'", "t.toml: mode: must be one of"),
        ("[persist]\nmode = 'sometimes'", "t.toml: [persist] mode"),
        ("[persist]\nsysctl_file = 'relative.conf'", "t.toml: [persist] sysctl_file: must be an absolute path"),
        ("[persist]\nsysctl_file = '/etc/../tmp/x'", "t.toml: [persist] sysctl_file: must not contain '..'"),
        ("[evidence]\ndir = '/var/lib/ctguard'", "t.toml: [evidence] dir: must differ from [state] dir"),
        ("[buckets]\nmanage = 1", "t.toml: [buckets] manage: must be true or false"),
        ("bump = 3", "t.toml: [bump] must be a table"),
        ("[metrics]\ntextfile = 'x.prom'", "t.toml: [metrics] textfile"),
        ("[bump\n", "t.toml: not valid TOML"),
    ],
)
def test_bad_policies_name_file_and_key(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy.loads(text, "t.toml")
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(PolicyError) as info:
        policy.loads("x = 1\n[bump]\nceiling = 'a'\nfactor = 0\n[watch]\nbogus = 1", "t.toml")
    assert len(info.value.problems) == 4


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file"):
        policy.load(tmp_path / "absent.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"mode = '\xe9'")
    with pytest.raises(PolicyError, match="not UTF-8"):
        policy.load(bad)


def test_ceiling_below_kernel_max_is_a_warning_not_an_error() -> None:
    p = policy.loads("[bump]\nceiling = 4096", "t.toml")
    warnings = policy.warnings_for(p, kernel_max=262144)
    assert any("[bump] ceiling" in w and "below" in w for w in warnings)
    assert policy.warnings_for(p, kernel_max=2048) == []


def test_summary_mentions_the_bounds() -> None:
    s = policy.summary(Policy())
    assert "1048576" in s and "6 per hour" in s and "stable" not in s or "no drop" in s
