#!/usr/bin/env bash
# Installs the Debian packages in scripts/packages.txt (apt-get update first),
# and cargo-fuzz for scripts/fuzz.sh where cargo is already installed.
# Used by scripts/setup.sh and .ci/run so the two never drift apart.
set -euo pipefail
list="$(dirname "$0")/packages.txt"
mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$list")
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

# scripts/fuzz.sh (run by .ci/run) needs cargo-fuzz; setup.sh calls this
# before it installs Rust, and needs no fuzzer.
if command -v cargo >/dev/null && ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked -q cargo-fuzz
fi
