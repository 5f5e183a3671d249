#!/usr/bin/env bash
# Installs what perfplus needs to build and test on a fresh machine of this kind (Debian, rustup, root).
# Idempotent, and quick when everything is already there. Sourced by the other scripts.
set -euo pipefail

need_target() {
    rustup target list --installed 2>/dev/null | grep -qx "$1" || rustup target add "$1"
}
need_component() {
    rustup component list --installed 2>/dev/null | grep -q "^$1" || rustup component add "$1"
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is missing; this project expects the machine's rustup toolchain" >&2
    exit 1
fi
# The built-in guest is a no_std kernel for x86_64-unknown-none, built by perfplus-user/build.rs.
need_target x86_64-unknown-none
need_component rustfmt
need_component clippy

# The userfaultfd crate generates its bindings with bindgen at build time, which needs libclang.
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang-*.so* >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev
fi
if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is absent; VMs cannot run here" >&2
fi
