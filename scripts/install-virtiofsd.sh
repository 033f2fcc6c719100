#!/usr/bin/env bash
# Installs virtiofsd (the Rust one, from crates.io), which serves a
# sandbox's shared directory to the guest over virtio-fs. Debian 12 has no
# package of it (QEMU's old C virtiofsd in /usr/lib/qemu is not it). Its
# build needs libseccomp-dev and libcap-ng-dev (scripts/packages.txt).
#
# Idempotent: does nothing when /usr/local/bin/virtiofsd is already this
# version. Used by scripts/setup.sh and .ci/run. About 1.5 minutes on two
# cores.
set -euo pipefail
version=1.14.0
root=/usr/local
if [ -x "$root/bin/virtiofsd" ] && [ "$("$root/bin/virtiofsd" --version)" = "virtiofsd $version" ]; then
    exit 0
fi
cargo install --locked --quiet --root "$root" --version "$version" virtiofsd
"$root/bin/virtiofsd" --version
