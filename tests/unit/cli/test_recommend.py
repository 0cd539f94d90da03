"""recommend from the peaks the daemon recorded."""

from __future__ import annotations

from ctguard.config import policy as policy_mod
from ctguard.store.state import Peak


def test_recommend_from_recorded_peaks() -> None:
    from ctguard.cli import recommend

    MB128 = 128 << 20       # the kernel's default here: 1,024 (the floor does not hide the peak sizing)
    p = policy_mod.loads("[bump]\nceiling = 65536", "t.toml")
    t = 1_800_000_000
    peaks = [Peak(t - 60 * i, 1000 + (i % 100), 8192, 0) for i in range(200)]
    a = recommend.advise(p, peaks, 8192, 2048, 256, t, mem_total=MB128)
    assert a["enough_history"] and a["p99_peak"] == 1098 and a["factor"] == 2
    # Buckets never below the live 2,048 (issue 11); issue 22: at the kernel's own ratio (1 since
    # 5.15), and an entry costs its extensions (128 B) beside the object.
    assert a["recommended_max"] == 3072 and a["recommended_buckets"] == 3072
    assert a["memory_bytes"] == 3072 * (256 + 128) + 3072 * 8
    assert a["sysctl_line"] == "net.netfilter.nf_conntrack_max = 3072"
    stormy = peaks + [Peak(t, 40000, 65536, 12)]
    b = recommend.advise(p, stormy, 8192, 2048, 256, t, mem_total=MB128)
    assert b["factor"] == 3 and b["above_ceiling"] is False
    assert "ABOVE the ceiling" in recommend.render(recommend.advise(p, [Peak(t, 30000, 8192, 1)] * 5, 8192, 2048, 256, t, mem_total=MB128))
    few = recommend.advise(p, peaks[:10], 8192, 2048, 256, t, mem_total=MB128)
    assert not few["enough_history"] and "Too little history" in recommend.render(few)
    old = recommend.advise(p, [Peak(t - 8 * 86400, 50000, 65536, 0)], 8192, 2048, 256, t, mem_total=MB128)
    assert old["p99_peak"] == 0, "peaks older than 7 days are ignored"
