#!/usr/bin/env bash
# Installs everything Kestrel needs on a Debian machine, builds the
# workspace, the static guest agent and the guest image (kernel +
# initramfs), runs a busybox container through the agent in host mode and
# boots the guest image under QEMU to a serving agent. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    bc bison busybox-static build-essential ca-certificates containerd curl flex \
    linux-source-6.1 pkg-config qemu-system-x86 runc xz-utils >/dev/null

if ! command -v cargo >/dev/null; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

cargo build --workspace --locked
# rust-vmm's vhost-user vsock backend: only the vsock benchmark uses it, to
# compare with ours.
command -v vhost-device-vsock >/dev/null || cargo install --locked -q vhost-device-vsock
# The agent runs as the guest's /init: it must be one static binary.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --release --target x86_64-unknown-linux-gnu -p kestrel-agent

cargo run --locked -q -p kestrel-tests --example host_mode_demo -- \
    sh -c 'echo "hello from $(hostname), pid $$ in its own PID namespace"'

./target/debug/kestrel image build
./scripts/qemu-demo.sh
