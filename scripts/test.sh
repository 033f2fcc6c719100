#!/usr/bin/env bash
# Builds everything the tests drive (the binaries and the static agent)
# and runs the whole test suite. Run as root: container tests need
# namespaces, mounts and cgroups, and print why they skip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --locked
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --release --target x86_64-unknown-linux-gnu -p kestrel-agent
cargo test --workspace --locked
