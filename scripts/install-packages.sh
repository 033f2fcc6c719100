#!/usr/bin/env bash
# Installs the Debian packages in scripts/packages.txt (apt-get update first).
# Used by scripts/setup.sh and .ci/run so the two never drift apart.
set -euo pipefail
list="$(dirname "$0")/packages.txt"
mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$list")
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
