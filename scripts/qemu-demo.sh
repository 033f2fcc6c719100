#!/usr/bin/env bash
# Boots the guest image (`kestrel image build`) under QEMU with TCG, with
# our own vsock device (`kestrel-vmm vhost-user-vsock`) giving the host a
# hybrid vsock socket, and asks the agent inside whether it serves. Run as
# root after setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

image=$(./target/debug/kestrel image build --json)
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$image" "$1"; }
dir=$(mktemp -d)
./target/debug/kestrel-vmm vhost-user-vsock --socket "$dir/vhost.sock" --uds "$dir/vm.vsock" 2>/dev/null &
backend=$!
qemu=
stop() {
    # QEMU first: it complains when its vhost-user backend vanishes under it.
    if [ -n "$qemu" ]; then kill "$qemu" 2>/dev/null; wait "$qemu" 2>/dev/null; fi
    kill "$backend" 2>/dev/null
    rm -rf "$dir"
}
trap stop EXIT
while [ ! -S "$dir/vhost.sock" ]; do sleep 0.05; done
qemu-system-x86_64 -M microvm,acpi=off,memory-backend=mem0 -accel tcg -m 256M \
    -object memory-backend-memfd,id=mem0,size=256M,share=on \
    -kernel "$(field bzimage)" -initrd "$(field initrd)" -append "console=ttyS0 panic=-1" \
    -chardev socket,id=vsock0,path="$dir/vhost.sock" -device vhost-user-vsock-device,chardev=vsock0 \
    -display none -monitor none -no-reboot -serial file:"$dir/console.log" 2>"$dir/qemu.log" &
qemu=$!

for _ in $(seq 1 100); do
    if ./target/debug/kestrel agent check --timeout 2 --address "hvsock://$dir/vm.vsock:1024" 2>/dev/null; then
        grep -m1 "Linux version" "$dir/console.log"
        exit 0
    fi
    sleep 0.2
done
echo "the guest's agent did not answer; console:" >&2
cat "$dir/console.log" >&2
exit 1
