"""The decision file a capture child is given keeps every field of every action: the class goes
under `action`, so an action's own `kind` (a Refuse's bound, a Warn's kind) survives, and every
reader of the bundle's decision (review's sentences, the HTML report, diagnosis) reads both the
new shape and the one bundles were written in before (the class in `kind`)."""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from ctguard.core.diagnose import BundleData, action_name, diagnose, facts, refusal_bound
from ctguard.core.model import Capture, Refuse, SetMax, ShortenTimeout, TrimEntries, Warn
from ctguard.daemon.captures import ACTION_KEY, jsonable
from ctguard.evidence.collect import tomlable
from ctguard.evidence.report import report
from ctguard.evidence.review import decision_sentences, show, show_json

REFUSE = Refuse(wanted=65536, current=4096, kind="guard", trigger="fill", netns=7, fill=0.97,
                reason="fill 97% reached act; attack-shaped growth: 96% of 4000 sampled entries unanswered "
                       "or half-open, from 1900 or more sources; max 4096 is already at the [guard] ceiling")
ACTIONS = (REFUSE, Warn("table-full", 7, 1.0, "the kernel reported: table full, dropping packet"),
           Capture("refused-guard", 7),
           ShortenTimeout(7, "gw", "tcp_syn_sent", 120, 30, "refused (guard)"),
           TrimEntries(7, "gw", (("tcp_syn_sent", 30),), "relief"))


def decision_file(actions=ACTIONS) -> dict:
    """What Captures.launch writes, read back as the capture child reads it."""
    return json.loads(json.dumps({"summary": "x", "actions": jsonable(actions), "worst_netns": 7,
                                  "worst_fill": 0.97, "rate": 900.0}))


def test_an_actions_own_kind_survives_beside_its_class() -> None:
    got = decision_file()["actions"]
    assert [a[ACTION_KEY] for a in got] == ["Refuse", "Warn", "Capture", "ShortenTimeout", "TrimEntries"]
    assert got[0]["kind"] == "guard" and got[1]["kind"] == "table-full"
    assert "kind" not in got[2], "a class without a kind field gets none"
    assert got[4]["timeouts"] == [["tcp_syn_sent", 30]]
    assert [action_name(a) for a in got] == [a[ACTION_KEY] for a in got]
    assert refusal_bound(got[0]) == "guard" and refusal_bound(got[1]) == ""


def test_the_readers_take_the_new_shape_and_the_old() -> None:
    new = decision_file()
    old = {**new, "actions": [{**{k: v for k, v in a.items() if k != ACTION_KEY}, "kind": a[ACTION_KEY]}
                              for a in new["actions"]]}
    said_new, said_old = decision_sentences(new), decision_sentences(old)
    assert said_new[1].startswith("ctguard did not raise nf_conntrack_max to 65,536 (refused by the guard):")
    assert said_old[1].startswith("ctguard did not raise nf_conntrack_max to 65,536:")
    assert said_new[2:] == said_old[2:] and any("started this capture" in s for s in said_new)
    # diagnosis reads the refusal's bound from the decision when the timeline has none
    f_new = facts(BundleData(manifest={"decision": tomlable(new)}))
    f_old = facts(BundleData(manifest={"decision": tomlable(old)}))
    assert [r["reason"] for r in f_new.refusals] == ["guard"]
    assert [r["reason"] for r in f_old.refusals] == [""]
    assert f_new.guard and f_old.guard, "the guard's words are in the reason either way"


def test_a_bump_clipped_at_the_guard_is_the_guards_judgement() -> None:
    bump = SetMax(8192, 65536, "fill", 7, 0.98, "fill 98% reached act; 8192 -> 65536", clipped_by="guard")
    f = facts(BundleData(manifest={"decision": tomlable(decision_file((bump,)))}))
    assert f.guard == "growth held at [guard] ceiling"


def test_a_bundle_with_the_new_decision_renders_in_every_view(tmp_path: Path) -> None:
    name = "20260101T000000Z-refused-guard"
    folder = tmp_path / name
    folder.mkdir(mode=0o700)
    manifest = {"id": name, "files": [], "reason": "refused-guard", "decision": tomlable(decision_file())}
    (folder / "manifest.toml").write_text(tomli_w.dumps(manifest))
    (folder / "evidence.toml").write_text(tomli_w.dumps({"table": {"entries": 4000}}))
    text = show(tmp_path, name)
    assert "(refused by the guard)" in text and "'kind'" not in text
    assert any("(refused by the guard)" in s for s in json.loads(show_json(tmp_path, name))["decision"])
    assert "(refused by the guard)" in report(tmp_path, name)
    diagnose(BundleData(manifest=manifest))       # reads without error
