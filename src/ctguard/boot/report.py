"""What the next boot keeps of ctguard's work, in one place for `status`, `check-policy`,
`recommend` and the daemon: the boot-order model, the initramfs and kube-proxy."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ctguard.boot import values as bootvalues
from ctguard.boot import initramfs
from ctguard.boot import writers
from ctguard.config.policy import Policy


@dataclass(frozen=True)
class BootReport:
    view: bootvalues.BootView
    initramfs: initramfs.InitramfsState | None
    kube_proxies: tuple[writers.KubeProxy, ...]
    cpus: int

    def as_dict(self) -> dict:
        d = self.view.as_dict()
        i = self.initramfs
        d["initramfs"] = None if i is None else {
            "image": i.image, "contains_nf_conntrack": i.contains, "listed": i.listed,
            "older_than_modprobe_file": i.older_than_modprobe, "how": i.how, "advice": i.advice()}
        d["kube_proxy"] = [{"pid": k.pid, "source": k.source, "conntrack": dict(k.settings),
                            "sets_max": k.max_it_sets(self.cpus), "text": k.describe(self.cpus)}
                           for k in self.kube_proxies]
        return d

    def warnings(self, policy: Policy | None = None) -> list[str]:
        out = [s.message() for s in self.view.shadows]
        advice = self.initramfs.advice() if self.initramfs is not None else None
        if advice and policy is not None and policy.buckets.manage and not policy.persist.update_initramfs:
            out.append(advice)
        for k in self.kube_proxies:
            if k.max_it_sets(self.cpus) is not None:
                out.append(f"{k.describe(self.cpus)}: it lowers a bumped max whenever it restarts; leave max to "
                           "ctguard with --conntrack-max-per-core=0 (conntrack.maxPerCore: 0 in its config)")
        return out

    def text_lines(self, buckets_managed: bool) -> list[str]:
        lines = bootvalues.text_lines(self.view)
        advice = self.initramfs.advice() if self.initramfs is not None else None
        if advice and buckets_managed:
            lines.append(advice)
        for k in self.kube_proxies:
            lines.append(k.describe(self.cpus) + ("" if k.max_it_sets(self.cpus) is None else
                         "; leave max to ctguard: --conntrack-max-per-core=0 (conntrack.maxPerCore: 0)"))
        return lines


def build(policy: Policy, root: Path | str = "/", proc_root: Path | str = "/proc",
          with_initramfs: bool = True) -> BootReport:
    root = Path(root)
    view = bootvalues.boot_view(root, policy.persist.sysctl_file, policy.persist.modprobe_file,
                                proc_root=proc_root)
    state = None
    if with_initramfs:
        cache = policy.state.dir if os.access(policy.state.dir, os.W_OK) else None
        state = initramfs.detect(root, initramfs.release(proc_root), cache, policy.persist.modprobe_file)
    return BootReport(view, state, tuple(writers.kube_proxies(proc_root)), os.cpu_count() or 1)
