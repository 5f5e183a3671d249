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
# The built-in guest is a no_std kernel for x86_64-unknown-none, built by perfplus-vmm/build.rs.
need_target x86_64-unknown-none
need_component rustfmt
need_component clippy

# libclang: the userfaultfd crate needed it for bindgen; no crate in Cargo.lock does any more (the
# userfaultfd wrapper is perfplus-vmm's own). Kept until a fresh machine shows bpf-linker builds without it.
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang-*.so* >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev
fi

# eBPF programs (perfplus-ebpf, built by perfplus-user/build.rs through aya-build): the bpfel target
# needs core built from source (rust-src, with RUSTC_BOOTSTRAP=1 on the stable toolchain) and the
# bpf-linker, which must be linked against LLVM 22 (rustc 1.95's LLVM); without LLVM_PREFIX it finds
# Debian's LLVM 14 and fails.
PERFPLUS_BPF_LINKER_VERSION=0.13.0
PERFPLUS_LLVM_PREFIX=/usr/lib/llvm-22
need_component rust-src
if [ ! -e "$PERFPLUS_LLVM_PREFIX/bin/llvm-config" ]; then
    if ! apt-cache show llvm-22-dev >/dev/null 2>&1; then
        apt-get update -qq
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq llvm-22-dev >/dev/null
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! bpf-linker --version 2>/dev/null | grep -q " $PERFPLUS_BPF_LINKER_VERSION\$"; then
    echo "setup: installing bpf-linker $PERFPLUS_BPF_LINKER_VERSION (LLVM 22; takes a minute or two)" >&2
    LLVM_PREFIX=$PERFPLUS_LLVM_PREFIX cargo install bpf-linker --version "$PERFPLUS_BPF_LINKER_VERSION" \
        --locked --no-default-features --features llvm-22 --quiet
fi
# aya loads the programs through tracefs; some machines do not mount it.
if [ "$(id -u)" = 0 ] && [ -d /sys/kernel/tracing ] && [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi

# The high-availability test (tests/pacemaker.rs, scripts/ha/): Corosync, Pacemaker and its command-line
# tools, the OCF shell functions and ocf-tester (resource-agents), xmllint for ocf-tester's meta-data
# check. Debian's maintainer scripts would start Corosync and Pacemaker on the host, where nothing
# wants them (the test runs its own, in namespaces): service starts are refused while installing.
PERFPLUS_HA_TOOLS="corosync pacemakerd crm_mon cibadmin crm_standby ocf-tester xmllint"
perfplus_ha_missing() {
    local tool
    for tool in $PERFPLUS_HA_TOOLS; do
        command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || return 0
    done
    return 1
}
if perfplus_ha_missing; then
    echo "setup: installing Corosync, Pacemaker and resource-agents (Debian's packages)" >&2
    perfplus_policy_added=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        perfplus_policy_added=1
    fi
    if ! apt-cache show pacemaker >/dev/null 2>&1; then
        apt-get update -qq
    fi
    perfplus_ha_rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        corosync pacemaker pacemaker-cli-utils resource-agents libxml2-utils >/dev/null || perfplus_ha_rc=$?
    if [ -n "$perfplus_policy_added" ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [ "$perfplus_ha_rc" != 0 ]; then
        echo "setup: installing the high-availability packages failed" >&2
        exit 1
    fi
fi

# tests/service.rs checks the systemd unit with `systemd-analyze verify`, which runs without systemd as
# PID 1. Debian ships it in the systemd package; its maintainer scripts start nothing here.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "setup: installing systemd-analyze (Debian's systemd package)" >&2
    if ! apt-cache show systemd >/dev/null 2>&1; then
        apt-get update -qq
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is absent; VMs cannot run here" >&2
fi
