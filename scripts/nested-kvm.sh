#!/usr/bin/env bash
# Runs a command inside an L1 Linux VM that has real KVM, on machines whose
# own /dev/kvm cannot run guest user space: QEMU's TCG emulates AMD SVM with
# nested paging (`-cpu max`), and Debian's stock kernel loads kvm_amd on it.
#
#   ./scripts/nested-kvm.sh [--memory MiB] [--cpus N] [--timeout S] -- CMD [ARG...]
#
# --timeout S (default none, or $KESTREL_NESTED_TIMEOUT): after S seconds in
# L1, print every L1 process with its state and what it waits on (wchan),
# then kill CMD (exit status 137), so a hang ends with its picture.
#
# L1 also writes a heartbeat every 5 s. If it stops for 120 s while QEMU
# still runs, L1 froze (its kernel stopped running, which no watchdog inside
# it can report): the script prints QEMU's view of L1's CPU (registers, the
# kernel function it is in), kills QEMU and exits 124. With --timeout S,
# an L1 still up 300 s after S is pictured and killed the same way (137).
#
# --cpus N (default 1, or $KESTREL_NESTED_CPUS) gives L1 N vCPUs, each a TCG
# thread of its own. One is faster here: the same suite took 80 s with 1 and
# 118 s with 2 on a 2-core machine (nested KVM's IPIs and TLB shootdowns
# under TCG cost more than the second thread gives).
#
# L1 sees this machine's files read-only through virtio-9p, with a tmpfs
# overlay on top where it writes, so installed programs and the workspace's
# binaries run as they are; CMD runs as root in the current directory, its
# output goes to this terminal and its exit status becomes this script's
# (125 when kvm_amd does not load in L1: a QEMU that does not emulate SVM).
# Debian's kernel package is fetched once (apt-get download) and cached with
# the initramfs under ${XDG_CACHE_HOME:-~/.cache}/kestrel/nested-kvm/.
set -euo pipefail

memory=2048
cpus=${KESTREL_NESTED_CPUS:-1}
limit=${KESTREL_NESTED_TIMEOUT:-0}
usage="usage: $0 [--memory MiB] [--cpus N] [--timeout S] -- CMD [ARG...]"
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) memory=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --timeout) limit=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }

qemu=${QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || { echo "nested-kvm: $qemu is not installed (apt-get install qemu-system-x86)" >&2; exit 1; }
if ! "$qemu" -accel tcg -cpu help 2>/dev/null | grep -qw max; then
    echo "nested-kvm: $qemu has no TCG '-cpu max', which the nested SVM needs" >&2
    exit 1
fi
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "nested-kvm: needs $busybox (apt-get install busybox-static)" >&2; exit 1; }

cache=${XDG_CACHE_HOME:-$HOME/.cache}/kestrel/nested-kvm
package=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9.-]*-amd64\)$/\1/p' | head -n1)
[ -n "$package" ] || { echo "nested-kvm: apt knows no linux-image-amd64 (run apt-get update)" >&2; exit 1; }
# The initramfs is built from this script: a changed script builds anew.
kdir=$cache/$package-$(sha256sum "$0" | cut -c1-12)
if [ ! -f "$kdir/initrd.gz" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download "$package" >/dev/null 2>&1) \
        || { echo "nested-kvm: could not fetch $package with apt-get download" >&2; exit 1; }
    dpkg-deb -x "$tmp"/"$package"_*.deb "$tmp/pkg"
    kver=${package#linux-image-}
    mods=$tmp/pkg/lib/modules/$kver/kernel
    mkdir -p "$tmp/rd/bin" "$tmp/rd/modules" "$tmp/rd/proc" "$tmp/rd/sys" "$tmp/rd/dev" \
        "$tmp/rd/host" "$tmp/rd/ctl" "$tmp/rd/rw" "$tmp/rd/root"
    cp "$busybox" "$tmp/rd/bin/busybox"
    # In load order: virtio-pci and 9p to see the host, overlay to write on
    # it, then KVM (kvm-amd needs ccp).
    for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_modern_dev \
        virtio/virtio_pci_legacy_dev virtio/virtio_pci; do
        cp "$mods/drivers/$m.ko" "$tmp/rd/modules/"
    done
    cp "$mods/fs/netfs/netfs.ko" "$mods/fs/fscache/fscache.ko" "$mods/net/9p/9pnet.ko" \
        "$mods/net/9p/9pnet_virtio.ko" "$mods/fs/9p/9p.ko" "$mods/fs/overlayfs/overlay.ko" \
        "$mods/virt/lib/irqbypass.ko" "$mods/arch/x86/kvm/kvm.ko" \
        "$mods/drivers/crypto/ccp/ccp.ko" "$mods/arch/x86/kvm/kvm-amd.ko" "$tmp/rd/modules/"
    # A pod network in L1, as CNI's bridge plugin makes it (the CRI tests),
    # and what mirrors it into a VM: taps and tc's ingress, u32 and mirred.
    cp "$mods/net/llc/llc.ko" "$mods/net/802/stp.ko" "$mods/net/bridge/bridge.ko" \
        "$mods/drivers/net/veth.ko" "$mods/drivers/net/tun.ko" "$mods/net/sched/sch_ingress.ko" \
        "$mods/net/sched/cls_u32.ko" "$mods/net/sched/act_mirred.ko" "$tmp/rd/modules/"
    cat >"$tmp/rd/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
    netfs fscache 9pnet 9pnet_virtio 9p overlay irqbypass kvm ccp kvm-amd llc stp bridge veth \
    tun sch_ingress cls_u32 act_mirred; do
    insmod /modules/$m.ko 2>/dev/null || echo "nested-kvm: insmod $m failed" >/dev/console
done
opts=trans=virtio,version=9p2000.L,msize=262144
# The host's files do not change under a run: cache them (cache=loose), or
# every exec re-reads its binary over 9p (a debug shim is 170 MB, and the
# 12336 loops exec ctr thousands of times).
mount -t 9p -o "$opts,ro,cache=loose" host /host
mount -t 9p -o "$opts" ctl /ctl
# The host tells a frozen L1 from a busy one by this file's age.
(while :; do echo >/ctl/alive; sleep 5; done) &
# Debian's System.map is a stub: L1's own symbols (nokaslr: fixed addresses)
# name the function a frozen L1 is stuck in.
grep ' [tT] ' /proc/kallsyms >/ctl/kallsyms &
mount -t tmpfs tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /root
mount -t proc proc /root/proc
mount -t sysfs sysfs /root/sys
# cgroup v2, as a booted Debian mounts it: runc (the CRI tests' reference
# runtime, also in L1) refuses to run without a cgroup mount.
mount -t cgroup2 cgroup2 /root/sys/fs/cgroup
mount --rbind /dev /root/dev
# A fresh /run, as on a machine that just booted; /tmp and the rest are the
# host's, written to the overlay.
mount -t tmpfs tmpfs /root/run
mkdir -p /root/ctl && mount --bind /ctl /root/ctl
if [ -e /dev/kvm ]; then
    chroot /root /bin/sh /ctl/run </dev/console >/dev/console 2>&1
    echo $? >/ctl/status
else
    echo "nested-kvm: kvm_amd did not load in L1: this QEMU does not emulate SVM" >/dev/console
    echo 125 >/ctl/status
fi
sync
poweroff -f
INIT
    chmod 755 "$tmp/rd/init"
    mkdir -p "$kdir"
    (cd "$tmp/rd" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$kdir/initrd.gz.tmp"
    cp "$tmp/pkg/boot/vmlinuz-$kver" "$kdir/vmlinuz"
    mv "$kdir/initrd.gz.tmp" "$kdir/initrd.gz"
    rm -rf "$tmp"
    trap - EXIT
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ctl=$work/ctl
mkdir "$ctl"
{
    echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    printf 'export HOME=%q\n' "${HOME:-/root}"
    printf 'cd %q\n' "$PWD"
    printf '%q ' "$@"
    echo '&'
    echo 'cmd=$!'
    if [ "$limit" -gt 0 ]; then
        cat <<WATCHDOG
(
    sleep $limit
    echo "nested-kvm: the command ran past ${limit} s; every process (pid, state, wchan, command):"
    for d in /proc/[0-9]*; do
        echo "\${d#/proc/} \$(cut -d' ' -f3 \$d/stat 2>/dev/null) \$(cat \$d/wchan 2>/dev/null) \$(tr '\\0' ' ' <\$d/cmdline 2>/dev/null | cut -c1-160)"
    done
    kill -KILL \$cmd
) &
watchdog=\$!
WATCHDOG
    fi
    echo 'wait $cmd; status=$?'
    [ "$limit" -gt 0 ] && echo 'kill $watchdog 2>/dev/null'
    echo 'exit $status'
} >"$ctl/run"

# QEMU's monitor on a pair of FIFOs: how a frozen L1 is looked at.
mkfifo "$work/monitor.in" "$work/monitor.out"
"$qemu" -accel tcg,thread=multi -cpu max -m "$memory" -smp "$cpus" -M q35 -nodefaults -display none -serial stdio \
    -no-reboot \
    -kernel "$kdir/vmlinuz" -initrd "$kdir/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1 nokaslr" \
    -virtfs "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap" \
    -virtfs "local,path=$ctl,mount_tag=ctl,security_model=passthrough" \
    -chardev "pipe,id=monitor,path=$work/monitor" -mon chardev=monitor,mode=readline \
    </dev/null &
qemu_pid=$!

# The kernel function holding address $1 (16 hex digits), from L1's symbols.
symbol() {
    [ -s "$ctl/kallsyms" ] || { echo "?"; return; }
    sort "$ctl/kallsyms" | awk -v want="$1" '$1 <= want { best = $3 " " $4 } END { print best }'
}

# Asks QEMU's monitor, prints the answer.
monitor() {
    echo "$1" >"$work/monitor.in"
    timeout 5 cat "$work/monitor.out" | tr -d '\r' | grep -v '^(qemu)' || true
}

# Prints why ($1) and QEMU's view of L1's CPU, then kills QEMU.
picture() {
    {
        echo "nested-kvm: $1. QEMU's view of L1's CPU:"
        regs=$(monitor "info registers")
        sed '/^EFER=/q' <<<"$regs"
        rip=$(sed -n 's/.*RIP=\([0-9a-f]*\).*/\1/p' <<<"$regs" | head -n1)
        [ -z "$rip" ] || echo "nested-kvm: L1 is at $rip, in $(symbol "$rip")"
    } >&2
    kill -KILL "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
}

started=$(date +%s)
while kill -0 "$qemu_pid" 2>/dev/null; do
    sleep 2
    now=$(date +%s)
    if [ -e "$ctl/alive" ]; then
        quiet=$((now - $(stat -c %Y "$ctl/alive")))
    else
        quiet=$((now - started))
    fi
    if [ "$quiet" -ge 120 ]; then
        picture "L1 froze: no heartbeat for $quiet s while QEMU runs"
        exit 124
    fi
    # The watchdog in L1 ends CMD at the limit; an L1 that is still up
    # long after it would hold its caller forever.
    if [ "$limit" -gt 0 ] && [ $((now - started)) -ge $((limit + 300)) ]; then
        picture "L1 is still up $((now - started)) s after it started, 300 s past the limit"
        exit 137
    fi
done
wait "$qemu_pid" || true
if [ ! -s "$ctl/status" ]; then
    echo "nested-kvm: the L1 VM ended without running the command" >&2
    exit 1
fi
exit "$(cat "$ctl/status")"
