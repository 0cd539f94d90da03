"""Someone else lowered nf_conntrack_max: the pure verdict, table-driven."""

from __future__ import annotations

import pytest

from ctguard.config.policy import Policy, loads
from ctguard.core.lowered import MaxWatch, defended, judge
from helpers.builders import at

ENFORCE = loads("[bump]\ncooldown = 30\nceiling = 262144\n")
OFF = loads("[bump]\ncooldown = 30\n[persist]\ndefend = false\n")
OBSERVE = loads('mode = "observe"\n')

# (policy, known, defended_at, current, upper, now) -> (verdict or None, target of the SetMax or None)
CASES = {
    "first look only remembers": (ENFORCE, None, None, 65536, 262144, 0, None, None),
    "same value: nothing": (ENFORCE, 65536, None, 65536, 262144, 0, None, None),
    "raised by someone: nothing (and remembered)": (ENFORCE, 65536, None, 131072, 262144, 0, None, None),
    "lowered: set back": (ENFORCE, 131072, None, 65536, 262144, 100, "defend", 131072),
    "lowered below, old above the bound: set back to the bound": (ENFORCE, 524288, None, 65536, 262144, 100,
                                                                   "defend", 262144),
    "lowered, but already at the bound": (ENFORCE, 524288, None, 262144, 262144, 100, "at-bound", None),
    "lowered again inside the cooldown: give up": (ENFORCE, 131072, 90, 65536, 262144, 100, "gave-up", None),
    "lowered again after the cooldown: set back again": (ENFORCE, 131072, 50, 65536, 262144, 100, "defend", 131072),
    "defend = false": (OFF, 131072, None, 65536, 262144, 100, "not-defended", None),
    "observe mode": (OBSERVE, 131072, None, 65536, 262144, 100, "observe", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_judge(name: str) -> None:
    policy, known, defended_at, current, upper, now, verdict, target = CASES[name]
    watch = MaxWatch(known=known, defended_at=None if defended_at is None else at(defended_at))
    got, after = judge(policy, watch, current, upper, at(now))
    assert (got.verdict if got else None) == verdict
    assert (got.action.new if got and got.action else None) == target
    if got is None:
        assert after.known == max(current, known or 0) and after.lowered_total == 0
    else:
        assert (got.old, got.new) == (known, current)
        assert after.lowered_total == 1 and after.known == current
        assert (after.defended_at == at(now)) == (verdict == "defend")
        if got.action:
            assert got.action.old == current and got.action.new <= upper   # never above the bound


def test_a_fight_is_one_defence_then_one_give_up() -> None:
    """A tool that lowers max every 5 s: ctguard sets it back once, gives up (saying so) when it is
    lowered again inside the cooldown, and then stays quiet: the journal holds two lines."""
    kernel, watch, said = 131072, MaxWatch(known=131072), []
    for t in range(0, 120, 5):
        kernel = 65536                 # the other tool
        got, watch = judge(ENFORCE, watch, kernel, 262144, at(t))
        said.append(got.verdict if got else None)
        if got and got.action:
            kernel = got.action.new
            watch = defended(watch, True, kernel)
    assert said[:2] == ["defend", "gave-up"] and set(said[2:]) == {None}
    assert watch.defended_total == 1 and watch.lowered_total == 2


def test_a_tool_that_lowers_once_a_minute_gets_one_answer_each_time() -> None:
    kernel, watch, said = 131072, MaxWatch(known=131072), []
    for t in range(0, 240, 60):
        got, watch = judge(ENFORCE, watch, 65536, 262144, at(t))
        said.append(got.verdict)
        watch = defended(watch, True, got.action.new)
    assert said == ["defend"] * 4 and watch.defended_total == 4


def test_policy_keys() -> None:
    assert Policy().persist.defend is True and Policy().persist.update_initramfs is False
    from ctguard.config.policy import PolicyError
    with pytest.raises(PolicyError, match=r"\[persist\] defend: must be true or false"):
        loads("[persist]\ndefend = 1\n", "p.toml")
    with pytest.raises(PolicyError, match=r"p.toml: \[persist\] update_initramfs"):
        loads('[persist]\nupdate_initramfs = "yes"\n', "p.toml")
