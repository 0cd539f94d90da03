"""The policy file the tests and benchmarks give a daemon: every path ctguard writes lies under
the test's own folder, so nothing of the host's (state, bundles, sysctl.d, modprobe.d, metrics,
control socket) is touched.

The keyword arguments leave a table or key out where a test needs ctguard's default instead.
"""

from __future__ import annotations

from pathlib import Path


def write_policy(tmp: Path, extra: str = "", persist_mode: str | None = "immediate", *, defend: bool | None = False,
                 ceiling: int | None = None, budget: float | None = None, stable_for: float | None = None,
                 evidence_dir: Path | None = None, boot_files: bool = True, metrics: bool = True,
                 control: bool = True) -> Path:
    """Write `tmp/policy.toml`: `extra` (top-level keys and whole tables) first, then

    [bump] ceiling (only when given); [state] dir and [evidence] dir (+ budget when given);
    [persist] mode (none with persist_mode=None), stable_for when given, `defend = false` unless
    defend is None, the sysctl and modprobe files under tmp/etc (boot_files); [metrics] textfile
    tmp/ctguard.prom (metrics); [control] socket tmp/run/control.sock (control).
    """
    out = [extra]
    if ceiling is not None:
        out += ["[bump]", f"ceiling = {ceiling}"]
    out += ["[state]", f'dir = "{tmp}/state"', "[evidence]", f'dir = "{evidence_dir or f"{tmp}/bundles"}"']
    if budget is not None:
        out.append(f"budget = {budget}")
    if persist_mode is not None:
        out += ["[persist]", f'mode = "{persist_mode}"']
        if stable_for is not None:
            out.append(f"stable_for = {stable_for}")
        if defend is not None:
            # Tests lower the shared max by hand (under the kernel lock) while daemons run, some
            # of which do not hold the lock: a daemon must not set another test's max back
            # (test_persist_kernel turns it on).
            out.append(f"defend = {str(defend).lower()}")
        if boot_files:
            out += [f'sysctl_file = "{tmp}/etc/sysctl.d/90-ctguard.conf"',
                    f'modprobe_file = "{tmp}/etc/modprobe.d/ctguard.conf"']
    if metrics:
        out += ["[metrics]", f'textfile = "{tmp}/ctguard.prom"']
    if control:
        out += ["[control]", f'socket = "{tmp}/run/control.sock"']
    p = tmp / "policy.toml"
    p.write_text("\n".join(out) + "\n")
    return p
