#!/usr/bin/env bash
# Installs everything Kestrel needs on a Debian machine, builds the
# workspace and the static guest agent, and runs a busybox container
# through the agent in host mode. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    busybox-static build-essential ca-certificates containerd curl pkg-config runc >/dev/null

if ! command -v cargo >/dev/null; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

cargo build --workspace --locked
# The agent runs as the guest's /init: it must be one static binary.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --release --target x86_64-unknown-linux-gnu -p kestrel-agent

cargo run --locked -q -p kestrel-tests --example host_mode_demo -- \
    sh -c 'echo "hello from $(hostname), pid $$ in its own PID namespace"'
