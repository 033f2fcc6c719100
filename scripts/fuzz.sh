#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 30), one
# after another, and prints per target executions per second, total
# executions and crashes, then a summary table. Exits non-zero if any
# target crashed; the inputs are kept under fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Installs cargo-fuzz (from crates.io) on first use. cargo-fuzz needs
# nightly-only compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# take them, so no second toolchain is needed. New corpus entries
# go to fuzz/corpus/TARGET (not committed); fuzz/seeds/TARGET is read only.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
cargo fuzz --version >/dev/null 2>&1 || cargo install --locked -q cargo-fuzz

seconds=${1:-30}
shift || true
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# Release with debug assertions (cargo-fuzz's default), AddressSanitizer.
cargo fuzz build -O

results=()
failed=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    seeds=()
    [ -d "seeds/$target" ] && seeds=("seeds/$target")
    log=$(mktemp)
    wrap=()
    # The agent target serves requests as root; its own mount and network
    # namespaces keep whatever they mount or configure away from the host.
    if [ "$target" = agent_ttrpc ] && [ "$(id -u)" = 0 ]; then
        wrap=(unshare --mount --net --propagation private)
    fi
    before=$(find "artifacts/$target" -type f | wc -l)
    echo "== $target: ${seconds}s"
    set +e
    "${wrap[@]}" cargo fuzz run -O "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    after=$(find "artifacts/$target" -type f | wc -l)
    crashes=$((after - before))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        echo "$target did not run (exit status $status):"
        failed=1
        tail -40 "$log"
    elif [ "$crashes" -gt 0 ]; then
        failed=1
        tail -40 "$log"
        find "artifacts/$target" -type f -newer "$log" -printf '  input: fuzz/%p\n' || true
    fi
    echo "$target: ${rate:-?} exec/s, ${runs:-?} executions, $crashes crashes"
    results+=("$(printf '%-18s %10s %12s %8s' "$target" "${rate:-?}" "${runs:-?}" "$crashes")")
    rm -f "$log"
done

echo
printf '%-18s %10s %12s %8s\n' target exec/s executions crashes
printf '%s\n' "${results[@]}"
exit "$failed"
