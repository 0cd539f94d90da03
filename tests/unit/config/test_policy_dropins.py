"""Drop-ins: `<folder of the policy>/policy.d/*.toml`, merged in lexical order with provenance.

Configuration management ships site defaults in the package's policy file and writes per-host
values in a drop-in; these tests hold the loader and `check-policy --effective` to that (the
daemon's reload: tests/kernel/test_policy_dropins_kernel.py).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from ctguard.config import policy
from ctguard.config.policy import PolicyError
from helpers.daemon import ctguard


def tree(tmp: Path, main: str, **dropins: str) -> Path:
    p = tmp / "policy.toml"
    p.write_text(main)
    if dropins:
        (tmp / "policy.d").mkdir()
    for name, text in dropins.items():
        (tmp / "policy.d" / name).write_text(text)
    return p


def problems(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as e:
        policy.load(path)
    return e.value.problems


def test_later_drop_in_overrides_earlier_and_every_key_knows_its_file(tmp_path: Path) -> None:
    p = tree(tmp_path, "[bump]\nceiling = 65536\nfactor = 1.5\n[thresholds]\nwarn = 0.6\n",
             **{"50-site.toml": "[bump]\nceiling = 131072\n", "90-host.toml": "[bump]\nceiling = 262144\n",
                "10-early.toml": "[thresholds]\nact = 0.9\n[bump]\nceiling = 4096\n"})
    loaded = policy.load(p)
    d = tmp_path / "policy.d"
    assert loaded.dropins == (str(d / "10-early.toml"), str(d / "50-site.toml"), str(d / "90-host.toml"))
    assert loaded.bump.ceiling == 262144 and loaded.bump.factor == 1.5
    assert loaded.thresholds.warn == 0.6 and loaded.thresholds.act == 0.9
    assert loaded.origin("bump", "ceiling") == str(d / "90-host.toml")
    assert loaded.origin("bump", "factor") == str(p)
    assert loaded.origin("thresholds", "act") == str(d / "10-early.toml")
    assert loaded.origin("bump", "cooldown") == "built-in default"
    # Equality is about values, not where they were written.
    assert loaded == policy.loads("[bump]\nceiling = 262144\nfactor = 1.5\n[thresholds]\nwarn = 0.6\nact = 0.9\n",
                                  str(p))


def test_order_is_lexical_by_name_and_leftovers_are_not_read(tmp_path: Path) -> None:
    p = tree(tmp_path, "", **{
        "9-late.toml": "[bump]\nceiling = 9216\n",        # "9" sorts after "50": lexical, not numeric
        "50-mid.toml": "[bump]\nceiling = 5120\n",
        ".hidden.toml": "bogus = 1\n",                     # editor/dotfile: not read
        "50-mid.toml.dpkg-old": "bogus = 1\n",             # dpkg leftover: not read
        "README": "not toml at all [",
    })
    loaded = policy.load(p)
    assert loaded.bump.ceiling == 9216
    assert [Path(x).name for x in loaded.dropins] == ["50-mid.toml", "9-late.toml"]


def test_each_file_is_checked_on_its_own_and_every_error_names_its_file_and_key(tmp_path: Path) -> None:
    p = tree(tmp_path, "[bump]\nceiling = 'big'\n", **{
        "10-a.toml": "[bump]\nfactor = 0.5\n[watch]\nbogus = 1\n",
        "20-b.toml": "[thresholds\n",
        "30-c.toml": "colour = 'red'\n",
    })
    got = problems(p)
    d = tmp_path / "policy.d"
    assert any(x.startswith(f"{p}: [bump] ceiling: must be an integer") for x in got), got
    assert any(x.startswith(f"{d / '10-a.toml'}: [bump] factor: must be a number > 1") for x in got), got
    assert any(x.startswith(f"{d / '10-a.toml'}: [watch] bogus: unknown key") for x in got), got
    assert any(x.startswith(f"{d / '20-b.toml'}: not valid TOML") for x in got), got
    assert any(x.startswith(f"{d / '30-c.toml'}: colour: unknown key") for x in got), got
    assert len(got) == 5, got


def test_a_later_file_does_not_excuse_an_earlier_bad_value(tmp_path: Path) -> None:
    # Each file stands on its own: a typo in a drop-in is reported even when a later file
    # sets the same key correctly (otherwise removing the later file would break the host).
    p = tree(tmp_path, "", **{"10-a.toml": "[bump]\nceiling = -1\n", "20-b.toml": "[bump]\nceiling = 65536\n"})
    assert problems(p) == [f"{tmp_path / 'policy.d' / '10-a.toml'}: [bump] ceiling: must be an integer between "
                           f"1024 and 2147483647, not -1"]


def test_the_merged_result_is_checked_as_a_whole_naming_the_file_of_each_key(tmp_path: Path) -> None:
    # Each file is fine alone; together act < warn.
    p = tree(tmp_path, "[thresholds]\nwarn = 0.8\n", **{"50-host.toml": "[thresholds]\nact = 0.75\n"})
    got = problems(p)
    assert got == [f"{tmp_path / 'policy.d' / '50-host.toml'}: [thresholds] act: 0.75 is below [thresholds] warn 0.8 "
                   f"({p}); act must be >= warn"]
    # A later drop-in that fixes it makes the whole valid again.
    (tmp_path / "policy.d" / "60-fix.toml").write_text("[thresholds]\nact = 0.9\n")
    assert policy.load(p).thresholds.act == 0.9


def test_a_world_writable_drop_in_is_refused(tmp_path: Path) -> None:
    p = tree(tmp_path, "", **{"50-x.toml": "[bump]\nceiling = 65536\n"})
    f = tmp_path / "policy.d" / "50-x.toml"
    os.chmod(f, 0o666)
    got = problems(p)
    assert len(got) == 1 and got[0].startswith(f"{f}: writable by every user (mode 0666)") and "chmod o-w" in got[0]


def test_policy_d_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    p = tree(tmp_path, "")
    (tmp_path / "policy.d").write_text("")
    assert problems(p) == [f"{tmp_path / 'policy.d'}: not a folder; drop-ins go in a folder of that name"]


def test_no_policy_d_is_the_file_alone(tmp_path: Path) -> None:
    p = tree(tmp_path, "[bump]\nceiling = 65536\n")
    loaded = policy.load(p)
    assert loaded.dropins == () and loaded.bump.ceiling == 65536 and loaded.origin("bump", "ceiling") == str(p)


def test_check_policy_effective_prints_the_merged_policy_with_provenance(tmp_path: Path) -> None:
    p = tree(tmp_path, "[bump]\nceiling = 65536\n[evidence]\ndir = \"/srv/b\"\n",
             **{"50-host.toml": "mode = \"observe\"\n[bump]\nceiling = 131072\n"})
    r = ctguard("check-policy", "--effective", str(p))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    host = str(tmp_path / "policy.d" / "50-host.toml")
    lines = out.splitlines()
    assert lines[0] == f"# effective policy: {p}, then {host}"
    assert any(x.startswith("ceiling = 131072 ") and x.endswith(f"# {host}") for x in lines), out
    assert any(x.startswith('mode = "observe" ') and x.endswith(f"# {host}") for x in lines), out
    assert any(x.startswith('dir = "/srv/b" ') and x.endswith(f"# {p}") for x in lines), out
    assert any(x.startswith("cooldown = 30.0 ") and x.endswith("# built-in default") for x in lines), out
    # The output is itself a policy holding the same values (diffable between hosts).
    assert policy.loads(out, str(p)) == policy.load(p)
    assert set(tomllib.loads(out)) == set(policy.known_keys()) - {""} | set(policy.known_keys()[""])
    # A bad drop-in: exit 1, the file and the key named.
    (tmp_path / "policy.d" / "60-bad.toml").write_text("[bump]\nceilin = 1\n")
    r = ctguard("check-policy", "--effective", str(p))
    assert r.returncode == 1 and f"{tmp_path / 'policy.d' / '60-bad.toml'}: [bump] ceilin: unknown key" in r.stdout


def test_check_policy_summary_names_the_drop_ins(tmp_path: Path) -> None:
    p = tree(tmp_path, "", **{"50-host.toml": "[bump]\nceiling = 2147483647\n"})
    r = ctguard("check-policy", str(p))
    assert r.returncode == 0 and r.stdout.startswith(f"{p} + {tmp_path / 'policy.d' / '50-host.toml'}: mode enforce")


