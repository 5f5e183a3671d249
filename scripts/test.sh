#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test (unit and end-to-end, on real KVM).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# QEMU 7.2 (Debian's): the QEMU relay tests (perfplus-qemu's, tests/qemu_relay.rs) migrate real QEMU guests.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
# Release: the end-to-end tests migrate real guests, and MD5 in a debug build is ten times slower.
cargo test --workspace --release -- --test-threads 2 "$@"
# Every fuzz target for 20 s on the stable mutation fuzzer (fuzz/, issue 10): a short bounded run that
# fails on a panic or an over-allocation in a decoder.
bash scripts/fuzz.sh --ci 20
