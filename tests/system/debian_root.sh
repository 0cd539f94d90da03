#!/bin/bash
# Keep a debootstrapped Debian root (13 trixie, or 12 bookworm) in a cache for the system test.
#
#   debian_root.sh [CACHE_DIR [SUITE]]   prints the path of a ready root folder (SUITE: trixie,
#                                        the default, or bookworm)
#
# The root is made once (debootstrap, minbase + systemd as PID 1 + the tools the test
# drives inside) and reused while it is younger than CTGUARD_ROOT_MAX_AGE_DAYS (default 14).
# A flock on CACHE_DIR/lock keeps two runs from building one at once; the root is built in
# a temporary folder and renamed into place, so an interrupted run never leaves half a root
# behind. Downloaded .debs go to CACHE_DIR/apt-archives, from which the test seeds each
# container's own /var/cache/apt/archives (hard links) and into which it collects what apt
# downloaded there, so later runs download nothing twice (one folder for both suites: a
# name_version_arch.deb is the same file whichever suite it came from).
#
# Environment: CTGUARD_DEBIAN_MIRROR (default http://deb.debian.org/debian),
#              CTGUARD_ROOT_MAX_AGE_DAYS (default 14).
set -euo pipefail

cache=${1:-/var/cache/ctguard-tests}
mirror=${CTGUARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
max_age=${CTGUARD_ROOT_MAX_AGE_DAYS:-14}
suite=${2:-trixie}
case "$suite" in
    trixie|bookworm) ;;
    *) echo "debian_root.sh: unknown suite $suite (trixie or bookworm)" >&2; exit 2 ;;
esac
root="$cache/$suite-base"
stamp="$root/.ctguard-root-ready"

# What the test needs inside besides minbase: systemd as init, D-Bus for systemctl's
# friends, iproute2 + nftables for the flood namespaces, python3 for the flood sender.
include=systemd-sysv,dbus,iproute2,nftables,python3,procps,ca-certificates

mkdir -p "$cache" "$cache/apt-archives/partial"
exec 9>"$cache/lock"
flock 9

# Bump when the recipe below changes: a cached root made by another recipe is rebuilt.
recipe=2
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "recipe $recipe" ] &&
   [ -n "$(find "$stamp" -mtime -"$max_age" 2>/dev/null)" ]; then
    echo "$root"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "debootstrap is not installed" >&2; exit 2; }

tmp="$cache/.$suite-build.$$"
trap 'rm -rf --one-file-system "$tmp"' EXIT
rm -rf --one-file-system "$cache"/.$suite-build.*
echo "debootstrap $suite from $mirror into $tmp" >&2
debootstrap --variant=minbase --include="$include" --cache-dir="$cache/apt-archives" \
    "$suite" "$tmp" "$mirror" >&2

# A root that boots quietly under systemd-nspawn and lets apt work offline from the cache.
echo "ctguard-test" >"$tmp/etc/hostname"
rm -f "$tmp/etc/machine-id" && : >"$tmp/etc/machine-id"   # systemd makes one at boot
printf 'deb %s %s main\n' "$mirror" "$suite" >"$tmp/etc/apt/sources.list"
# Keep what apt downloads: the test collects it into CACHE_DIR/apt-archives.
echo 'Binary::apt::APT::Keep-Downloaded-Packages "true";' >"$tmp/etc/apt/apt.conf.d/90ctguard-keep"
echo 'APT::Install-Recommends "false";' >"$tmp/etc/apt/apt.conf.d/90ctguard-norecommends"
# Nothing in the container may try to manage the host's network, time or kernel settings:
# it shares the host's kernel and network namespace, and /proc/sys is writable in it, so
# systemd-sysctl would apply trixie's sysctl.d defaults (kernel.pid_max, core_pattern...)
# to the host.
for unit in systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
            systemd-sysctl.service; do
    ln -sf /dev/null "$tmp/etc/systemd/system/$unit"
done
rm -f "$tmp/var/cache/apt/archives"/*.deb

echo "recipe $recipe" >"$tmp/.ctguard-root-ready"
rm -rf --one-file-system "$root"
mv "$tmp" "$root"
trap - EXIT
echo "$root"
