#!/usr/bin/env bash
# Benchmarks, with the peer (QEMU) installed for the comparison. Method: perfplus-user/benches/*.rs.
#   scripts/bench.sh                 # migration: hashing on/off and QEMU, same guest, same run
#   scripts/bench.sh hashing         # page hashing speeds
#   scripts/bench.sh shaped          # perfplus vs QEMU over a tbf-shaped link, felt stall from outside
#   scripts/bench.sh soak            # 100 ping-pong migrations of one guest: all verified, fds/RSS flat
#   scripts/bench.sh tls             # pages/s through TLS against clear, on loopback and a 1 Gbit/s link
#   scripts/bench.sh ha              # the Perf+ papers' experiment: 4 and 8 VMs drained off a node, hashing
#                                    # on and off, over a 1 Gbit/s link; table and SVG charts in
#                                    # target/bench-results/ha/
#   scripts/bench.sh guest_ram       # the guest with and without shmem huge pages (sets shmem_enabled, restores it)
#   scripts/bench.sh qemu            # QEMU's own migration plain and through perfplus (perfplus qemu migrate)
#                                    # over a 1 Gbit/s link: mixed, unique, return leg, two VMs; tables in
#                                    # target/bench-results/qemu/
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v iperf3 >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 iperf3 >/dev/null
fi
cargo bench -p perfplus --bench "${1:-migration}"
