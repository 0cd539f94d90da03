"""What the next boot will set: nf_conntrack_max from sysctl.d, the hash size from modprobe.d and
the kernel command line, and which file sets each. Pure over a root path (tests use temp trees).

systemd-sysctl (systemd 252 and 257, checked against `systemd-analyze cat-config sysctl.d`):
every `*.conf` in /etc/sysctl.d, /run/sysctl.d, /usr/local/lib/sysctl.d, /usr/lib/sysctl.d and
/lib/sysctl.d; a name found in several folders is read from the first of them only (so a
/etc/sysctl.d/x.conf linked to /dev/null, or empty, masks /usr/lib/sysctl.d/x.conf); the
survivors are read in the lexical order of their names, whatever their folder, and a later
assignment of a key replaces an earlier one. /etc/sysctl.conf is not read by systemd-sysctl
itself: Debian 12's procps links /etc/sysctl.d/99-sysctl.conf to it, which makes it one more file
in that order (`sysctl --system` also reads it last; that is reported separately).

kmod (modprobe): every `*.conf` in /etc/modprobe.d, /run/modprobe.d, /usr/local/lib/modprobe.d,
/usr/lib/modprobe.d and /lib/modprobe.d with the same first-folder-wins rule and the same order;
`options` lines for a module are concatenated in that order and the kernel takes the last value
of a parameter; `module.param=value` words of /proc/cmdline are appended after every file
(libkmod parses the command line last), so the command line beats both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SYSCTL_DIRS = ("etc/sysctl.d", "run/sysctl.d", "usr/local/lib/sysctl.d", "usr/lib/sysctl.d", "lib/sysctl.d")
MODPROBE_DIRS = ("etc/modprobe.d", "run/modprobe.d", "usr/local/lib/modprobe.d", "usr/lib/modprobe.d",
                 "lib/modprobe.d")
MAX_KEY = "net.netfilter.nf_conntrack_max"
BUCKETS_KEY = "net.netfilter.nf_conntrack_buckets"
MODULE = "nf_conntrack"
READ_LIMIT = 1 << 20        # a config file bigger than this is not a config file
_MAX_LINKS = 32


@dataclass(frozen=True)
class ConfFile:
    """One file in the order the boot reads them."""

    path: str                # as the host names it ("/etc/sysctl.d/99-sysctl.conf")
    target: str | None       # where a symlink leads ("/etc/sysctl.conf"), None for a plain file
    masked: bool             # linked to /dev/null or empty: reads as nothing, hides lower folders' file
    shadows: tuple[str, ...] = ()   # same-name files in later folders that this one hides


@dataclass(frozen=True)
class Setting:
    """A value one file gives a key."""

    path: str
    value: str
    line: int
    via: str | None = None   # the symlink's target, when the setting was read through one


@dataclass(frozen=True)
class Effective:
    """What the boot applies for one key: the last setting wins; every setting in order."""

    key: str
    settings: tuple[Setting, ...]

    @property
    def winner(self) -> Setting | None:
        return self.settings[-1] if self.settings else None

    @property
    def value(self) -> str | None:
        return self.settings[-1].value if self.settings else None


def _host_path(root: Path, p: Path) -> str:
    rel = os.path.relpath(p, root)
    return "/" + rel if rel != "." else "/"


def resolve(root: Path, path: Path) -> tuple[Path | None, str | None]:
    """Follow symlinks the way the booted system would, inside `root`.

    Returns (file to read or None when dangling/looping, host path of the final target or None
    when `path` is not a link). "/dev/null" comes back as the target when that is where it ends."""
    current = path
    target_name: str | None = None
    for _ in range(_MAX_LINKS):
        if not current.is_symlink():
            return (current if current.exists() else None), target_name
        link = os.readlink(current)
        if link.startswith("/"):
            host = PurePosixPath(os.path.normpath(link))
        else:
            host = PurePosixPath(os.path.normpath(PurePosixPath(_host_path(root, current.parent)) / link))
        target_name = str(host)
        if target_name == "/dev/null":
            return None, target_name
        current = root / str(host).lstrip("/")
    return None, target_name


def _read(p: Path) -> str:
    with open(p, "rb") as f:
        return f.read(READ_LIMIT).decode("utf-8", errors="replace")


def conf_files(root: Path | str, dirs: tuple[str, ...]) -> list[ConfFile]:
    """The `*.conf` files the boot reads, in its order, masks included (systemd's conf_files_list)."""
    root = Path(root)
    chosen: dict[str, tuple[Path, list[str]]] = {}
    for d in dirs:
        folder = root / d
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".conf") or name.startswith("."):
                continue
            p = folder / name
            if p.is_dir():
                continue
            if not p.is_symlink() and not p.exists():
                continue
            if name in chosen:
                # A same-name file in a folder of lower priority: hidden by the first one.
                chosen[name][1].append(_host_path(root, p))
                continue
            if p.is_symlink():
                real, target = resolve(root, p)
                if real is None and target != "/dev/null":
                    continue   # dangling: systemd cannot stat it and skips it, hiding nothing
            chosen[name] = (p, [])
    out = []
    for name in sorted(chosen):
        p, hidden = chosen[name]
        real, target = resolve(root, p)
        masked = target == "/dev/null" or real is None
        if not masked:
            try:
                masked = real.stat().st_size == 0 if real.is_file() else False
            except OSError:
                masked = True
        out.append(ConfFile(_host_path(root, p), target, masked, tuple(hidden)))
    return out


def normalize_key(key: str) -> str:
    """sysctl keys may be written with '/' (then '.' is part of a name) or '.' separators."""
    key = key.strip()
    if key.startswith("-"):
        key = key[1:].strip()   # "-key = v": a failure to write it is ignored; still an assignment
    slash, dot = key.find("/"), key.find(".")
    if slash != -1 and (dot == -1 or slash < dot):
        key = key.strip("/").replace(".", "\0").replace("/", ".").replace("\0", "/")
    return key


def sysctl_assignments(text: str) -> list[tuple[int, str, str]]:
    """(line number, normalized key, value) for each assignment, as systemd-sysctl parses."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if "=" not in line:
            continue
        key, _, value = line.partition("=")
        out.append((n, normalize_key(key), value.strip()))
    return out


def _file_settings(root: Path, files: list[ConfFile], parse) -> list[tuple[ConfFile, int, str, str]]:
    found = []
    for cf in files:
        if cf.masked:
            continue
        real, _ = resolve(root, root / cf.path.lstrip("/"))
        if real is None:
            continue
        try:
            text = _read(real)
        except OSError:
            continue
        for n, key, value in parse(text):
            found.append((cf, n, key, value))
    return found


def sysctl_effective(root: Path | str, key: str = MAX_KEY) -> Effective:
    root = Path(root)
    files = conf_files(root, SYSCTL_DIRS)
    settings = tuple(Setting(cf.path, v, n, cf.target) for cf, n, k, v in _file_settings(root, files, sysctl_assignments)
                     if k == key)
    return Effective(key, settings)


def sysctl_conf_setting(root: Path | str, key: str = MAX_KEY) -> Setting | None:
    """The last assignment of `key` in /etc/sysctl.conf (read by `sysctl --system`, last)."""
    p = Path(root) / "etc/sysctl.conf"
    try:
        text = _read(p)
    except OSError:
        return None
    last = None
    for n, k, v in sysctl_assignments(text):
        if k == key:
            last = Setting("/etc/sysctl.conf", v, n)
    return last


def modprobe_options(text: str, module: str = MODULE) -> list[tuple[int, str, str]]:
    """(line, parameter, value) of `options <module> ...` lines, continuation lines joined."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start = i + 1
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i]
        i += 1
        line = line.split("#", 1)[0].strip()
        words = line.split()
        if len(words) < 3 or words[0] != "options" or words[1].replace("-", "_") != module:
            continue
        for w in words[2:]:
            name, eq, value = w.partition("=")
            if eq:
                out.append((start, name.replace("-", "_"), value.strip('"')))
    return out


def cmdline_options(cmdline: str, module: str = MODULE) -> list[tuple[str, str]]:
    out = []
    for word in cmdline.split():
        if word == "--":
            break   # the rest belongs to init
        left, eq, value = word.partition("=")
        mod, dot, param = left.partition(".")
        if eq and dot and mod.replace("-", "_") == module:
            out.append((param.replace("-", "_"), value.strip('"')))
    return out


def hashsize_effective(root: Path | str, proc_root: Path | str | None = None) -> Effective:
    """`hashsize` of nf_conntrack when the module loads: modprobe.d in order, then /proc/cmdline."""
    root = Path(root)
    files = conf_files(root, MODPROBE_DIRS)
    settings = [Setting(cf.path, v, n, cf.target) for cf, n, k, v in _file_settings(root, files, modprobe_options)
                if k == "hashsize"]
    cmdline_path = Path(proc_root) / "cmdline" if proc_root is not None else root / "proc/cmdline"
    try:
        cmdline = _read(cmdline_path)
    except OSError:
        cmdline = ""
    settings += [Setting("/proc/cmdline", v, 1) for k, v in cmdline_options(cmdline) if k == "hashsize"]
    return Effective("hashsize", tuple(settings))


def in_boot_dirs(path: Path | str, dirs: tuple[str, ...]) -> bool:
    p = PurePosixPath(str(path))
    return str(p.parent).lstrip("/") in dirs and p.name.endswith(".conf")


@dataclass(frozen=True)
class Shadow:
    """Another file decides what the boot sets, not ctguard's."""

    key: str
    file: str
    value: str
    ours: str
    ours_value: str | None
    fix: str

    def message(self) -> str:
        mine = f"ctguard's {self.ours_value}" if self.ours_value is not None else "ctguard's value"
        return (f"{self.file} sets {self.key} = {self.value} and is applied after {self.ours}: the next boot sets "
                f"{self.value}, not {mine}; {self.fix}")


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def shadowing(eff: Effective, ours: Path | str, dirs: tuple[str, ...], what: str) -> Shadow | None:
    """The winning setting when it is not in ctguard's own file (and differs from ctguard's)."""
    ours = str(ours)
    if not in_boot_dirs(ours, dirs) or eff.winner is None:
        return None
    win = eff.winner
    mine = [s for s in eff.settings if s.path == ours]
    ours_value = mine[-1].value if mine else None
    if win.path == ours or (ours_value is not None and _int(win.value) == _int(ours_value)):
        return None
    if not mine:
        return None     # ctguard has not written its file (or wrote nothing for this key)
    later = sorted({s.path for s in eff.settings[eff.settings.index(mine[-1]) + 1:] if s.path != ours})
    where = win.path if win.via is None else f"{win.path} (-> {win.via})"
    if win.path == "/proc/cmdline":
        fix = (f"remove {MODULE}.{eff.key}= from the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, "
               "then update-grub)")
    else:
        target = win.via or win.path
        name = PurePosixPath(ours).name
        fix = (f"remove the {what} line from {target}" + (f" (and {', '.join(p for p in later if p != win.path)})"
                                                          if len(later) > 1 else "")
               + f", or set [persist] {'sysctl_file' if dirs is SYSCTL_DIRS else 'modprobe_file'} to a name that "
               f"sorts after {PurePosixPath(win.path).name} (now {name}; e.g. "
               f"{PurePosixPath(ours).parent}/zz-{name.split('-', 1)[-1] if name[:2].isdigit() else name})")
    return Shadow(eff.key, where, win.value, ours, ours_value, fix)


@dataclass(frozen=True)
class BootView:
    max: Effective
    hashsize: Effective
    buckets_sysctl: Effective
    sysctl_conf: Setting | None       # /etc/sysctl.conf's own value (`sysctl --system` reads it last)
    sysctl_conf_linked: bool          # some sysctl.d entry links to /etc/sysctl.conf (Debian 12's 99-sysctl.conf)
    max_shadow: Shadow | None
    hashsize_shadow: Shadow | None
    sysctl_file_read_at_boot: bool
    modprobe_file_read_at_boot: bool

    @property
    def shadows(self) -> list[Shadow]:
        return [s for s in (self.max_shadow, self.hashsize_shadow) if s is not None]

    def as_dict(self) -> dict:
        def eff(e: Effective) -> dict:
            w = e.winner
            return {"value": _int(e.value) if _int(e.value) is not None else e.value,
                    "file": w.path if w else None, "via": w.via if w else None,
                    "settings": [{"file": s.path, "value": s.value, "line": s.line, "via": s.via} for s in e.settings]}

        return {
            "max": eff(self.max),
            "hashsize": eff(self.hashsize),
            "buckets_sysctl": eff(self.buckets_sysctl),
            "sysctl_conf": None if self.sysctl_conf is None else {"value": self.sysctl_conf.value,
                                                                  "line": self.sysctl_conf.line},
            "sysctl_conf_linked": self.sysctl_conf_linked,
            "sysctl_file_read_at_boot": self.sysctl_file_read_at_boot,
            "modprobe_file_read_at_boot": self.modprobe_file_read_at_boot,
            "shadowed": [{"key": s.key, "file": s.file, "value": s.value, "ours": s.ours, "ours_value": s.ours_value,
                          "fix": s.fix} for s in self.shadows],
        }


def boot_view(root: Path | str, sysctl_file: Path | str, modprobe_file: Path | str,
              proc_root: Path | str | None = None) -> BootView:
    """Everything above for ctguard's two files. `sysctl_file`/`modprobe_file` are host paths."""
    root = Path(root)
    mx = sysctl_effective(root, MAX_KEY)
    hs = hashsize_effective(root, proc_root)
    files = conf_files(root, SYSCTL_DIRS)
    linked = any(cf.target == "/etc/sysctl.conf" and not cf.masked for cf in files)
    return BootView(
        max=mx, hashsize=hs, buckets_sysctl=sysctl_effective(root, BUCKETS_KEY),
        sysctl_conf=sysctl_conf_setting(root), sysctl_conf_linked=linked,
        max_shadow=shadowing(mx, sysctl_file, SYSCTL_DIRS, MAX_KEY),
        hashsize_shadow=shadowing(hs, modprobe_file, MODPROBE_DIRS, f"options {MODULE} hashsize="),
        sysctl_file_read_at_boot=in_boot_dirs(sysctl_file, SYSCTL_DIRS),
        modprobe_file_read_at_boot=in_boot_dirs(modprobe_file, MODPROBE_DIRS),
    )


def text_lines(view: BootView) -> list[str]:
    """For `status` and `check-policy`."""
    lines = []
    w = view.max.winner
    lines.append("next boot: nf_conntrack_max " + (f"{w.value} from {w.path}" + (f" (-> {w.via})" if w.via else "")
                                                   if w else "left at the kernel default (no sysctl.d file sets it)"))
    h = view.hashsize.winner
    lines.append("next boot: hashsize " + (f"{h.value} from {h.path}" if h else "left at the kernel default"))
    for s in view.shadows:
        lines.append(f"SHADOWED: {s.message()}")
    if view.sysctl_conf is not None and not view.sysctl_conf_linked:
        lines.append(f"note: /etc/sysctl.conf sets nf_conntrack_max = {view.sysctl_conf.value}; the boot does not read "
                     "it (no sysctl.d link to it) but `sysctl --system` applies it last")
    return lines
