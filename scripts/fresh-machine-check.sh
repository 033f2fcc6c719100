#!/usr/bin/env bash
# Proves scripts/packages.txt on a bare Debian 12, not on a machine that may
# have had packages installed by hand: debootstraps a minimal bookworm
# chroot, installs only the listed packages (as install-packages.sh does),
# then runs `kestrel image build` in it: the prerequisite check, the kernel
# configure step and the whole kernel build, objtool included.
#
#   ./scripts/fresh-machine-check.sh [DIR]     # as root, after setup.sh
#
# DIR/base keeps the bare debootstrap between runs; every run works on a
# fresh copy of it in DIR/work. The mirror is the one this machine's apt
# already uses.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/var/tmp/kestrel-fresh}
base=$dir/base
root=$dir/work

export DEBIAN_FRONTEND=noninteractive
command -v debootstrap >/dev/null || {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}
mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
[ -n "$mirror" ] || mirror=$(sed -n 's/^deb \([^ ]*\) bookworm .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n1)
[ -n "$mirror" ] || { echo "no bookworm mirror found in this machine's apt sources" >&2; exit 1; }

if [ ! -x "$base/usr/bin/apt-get" ]; then
    rm -rf "$base"
    debootstrap --variant=minbase bookworm "$base" "$mirror" >/dev/null
fi
rm -rf "$root"
cp -a "$base" "$root"

mount_all() {
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
}
umount_all() {
    umount -R "$root/dev" 2>/dev/null || true
    umount "$root/proc" 2>/dev/null || true
}
trap umount_all EXIT
mount_all

# Before: the check names what is missing, with packages, and fails.
install -D -m 755 target/debug/kestrel "$root/opt/kestrel/kestrel"
install -D -m 755 target/x86_64-unknown-linux-gnu/release/kestrel-agent "$root/opt/kestrel/kestrel-agent"
echo "== bare chroot: kestrel image build must name what is missing"
if chroot "$root" /opt/kestrel/kestrel image build --agent /opt/kestrel/kestrel-agent --out /tmp/img; then
    echo "kestrel image build succeeded on a bare system" >&2
    exit 1
fi

# Then: only the listed packages, installed the way setup.sh installs them.
install -D -m 755 scripts/install-packages.sh "$root/opt/kestrel/scripts/install-packages.sh"
install -D -m 644 scripts/packages.txt "$root/opt/kestrel/scripts/packages.txt"
chroot "$root" /opt/kestrel/scripts/install-packages.sh
echo "== with scripts/packages.txt installed: kestrel image build"
chroot "$root" /opt/kestrel/kestrel image build --agent /opt/kestrel/kestrel-agent \
    --out /tmp/img --jobs "$(nproc)"
echo "fresh-machine check passed in $root"
