#!/usr/bin/env bash
# Fuzzes perfplus's decoders (fuzz/: frame, handshake, page_batch, vm_state, multiboot).
#
#   scripts/fuzz.sh --ci [SECONDS]          every target for SECONDS (default 20) with the stable
#                                           mutation fuzzer; what scripts/test.sh runs
#   scripts/fuzz.sh [TARGET...] [--seconds S | --executions N]
#                                           the stable fuzzer, longer (default: every target, 10 M each)
#   scripts/fuzz.sh --libfuzzer TARGET [S]  coverage-guided, with cargo-fuzz and libFuzzer (needs a
#                                           nightly toolchain and cargo-fuzz; not for CI)
#
# The stable fuzzer starts from the committed seeds (fuzz/corpus/TARGET), stops at the first panic
# or over-allocation, saves that input under fuzz/artifacts/TARGET/ and exits non-zero. A finding
# becomes a regression input in fuzz/regressions/TARGET/ once fixed (fuzz/tests/corpus.rs replays them).
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(frame handshake page_batch vm_state multiboot)

if [ "${1:-}" = "--libfuzzer" ]; then
    target=${2:?usage: scripts/fuzz.sh --libfuzzer TARGET [SECONDS]}
    seconds=${3:-600}
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}/libfuzzer
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # New inputs go to the scratch folder (first), the committed seeds are read only.
    cargo +nightly fuzz run --fuzz-dir fuzz/libfuzzer -s none "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -malloc_limit_mb=64 -rss_limit_mb=2048 -print_final_stats=1
    exit
fi

source scripts/setup.sh

budget=(--executions 10000000)
selected=()
ci=""
while [ $# -gt 0 ]; do
    case "$1" in
        --ci)
            ci=1
            seconds=20
            if [[ "${2:-}" =~ ^[0-9]+$ ]]; then
                seconds=$2
                shift
            fi
            budget=(--seconds "$seconds")
            ;;
        --seconds | --executions) budget=("$1" "$2"); shift ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) selected+=("$1") ;;
    esac
    shift
done
[ ${#selected[@]} -gt 0 ] || selected=("${targets[@]}")

# The fuzz profile: optimised, with overflow checks and debug assertions (see Cargo.toml).
cargo build --quiet -p perfplus-fuzz --profile fuzz
bin="${CARGO_TARGET_DIR:-target}/fuzz/perfplus-fuzz"
failed=0
for target in "${selected[@]}"; do
    # A different seed for each CI run explores new inputs; it is printed, so a finding can be re-run.
    seed=${PERFPLUS_FUZZ_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
    echo "fuzz: $target, seed $seed"
    "$bin" run "$target" "${budget[@]}" --seed "$seed" || failed=1
done
if [ -n "$ci" ]; then
    echo "fuzz: every target ran ${budget[1]} s"
fi
exit $failed
