#!/usr/bin/env bash
# Installs everything Kestrel needs on a Debian machine, builds the
# workspace, the static guest agent and the guest image (kernel +
# initramfs), then boots a VM and runs a busybox container in it with
# `kestrel run`. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-packages.sh

if ! command -v cargo >/dev/null; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

cargo build --workspace --locked
# rust-vmm's vhost-user vsock backend: only the vsock benchmark uses it, to
# compare with ours.
command -v vhost-device-vsock >/dev/null || cargo install --locked -q vhost-device-vsock
# virtiofsd serves a sandbox's shared directory (virtio-fs).
./scripts/install-virtiofsd.sh
# The agent runs as the guest's /init: it must be one static binary.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --release --target x86_64-unknown-linux-gnu -p kestrel-agent

./target/debug/kestrel image build

# The main job: boot a VM (the builtin VMM where KVM runs guests natively,
# QEMU otherwise: `kestrel doctor` says which) and run a busybox container
# in it.
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs/bin" && cp /bin/busybox "$rootfs/bin/" && ln -s busybox "$rootfs/bin/sh"
./target/debug/kestrel run --rm --rootfs "$rootfs" demo -- \
    sh -c 'echo "hello from a container in a VM: kernel $(busybox uname -r), hostname $(busybox hostname)"'

