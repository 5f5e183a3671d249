#!/usr/bin/env bash
# The main job on an embedded default: two agents on localhost, one built-in guest, one live migration,
# the report. Usage: scripts/demo.sh [--json] [--tracker dirty-log|dirty-ring|uffd-wp]
#   [--mode precopy|postcopy|hybrid (default hybrid: pre-copy, then post-copy if it cannot converge)]
#   [any other `perfplus migrate` option, e.g. --no-hashing]
#   MEMORY=1G WORKLOAD=dirtier:working-set=256M,rate=20k,... scripts/demo.sh
# --tracker goes to `vm start` too (a dirty-ring VM must be created in ring mode).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

MEMORY=${MEMORY:-1G}
WORKLOAD=${WORKLOAD:-dirtier:working-set=256M,rate=20k,mix=unique:40,dup:30,zero:10,same:20}
json=0
tracker=dirty-log
prev=
for arg in "$@"; do
    [ "$arg" = "--json" ] && json=1
    [ "$prev" = "--tracker" ] && tracker=$arg
    case $arg in --tracker=*) tracker=${arg#--tracker=} ;; esac
    prev=$arg
done

cargo build --release --quiet -p perfplus
bin=$PWD/target/release/perfplus
work=$(mktemp -d /tmp/perfplus-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
say() { [ "$json" = 1 ] && echo "$*" >&2 || echo "$*"; }

# TLS, as always: a cluster CA, a certificate per agent, an operator's for this shell's CLI.
"$bin" ca init --dir "$work/ca" --cluster demo >/dev/null
for holder in "--agent a" "--agent b" "--operator demo"; do
    "$bin" cert issue --ca-dir "$work/ca" $holder --out "$work/tls-${holder##* }" >/dev/null
done
export PERFPLUS_TLS_DIR=$work/tls-demo

start_agent() { # name -> starts the agent in the background; sets $addr to its address
    local name=$1
    "$bin" --tls-dir "$work/tls-$name" agent --listen 127.0.0.1:0 --state-dir "$work/$name" \
        >"$work/$name.out" 2>"$work/$name.log" &
    pids+=($!)
    for _ in $(seq 100); do
        addr=$(sed -n 's/.*listening on //p' "$work/$name.out" 2>/dev/null)
        [ -n "$addr" ] && return
        sleep 0.1
    done
    echo "agent $name did not start:" >&2
    cat "$work/$name.log" >&2
    exit 1
}
# Not in $(...): the agents must be children of this shell, so that the trap can stop them.
start_agent a
a=$addr
start_agent b
b=$addr
say "agents: A on $a, B on $b, TLS 1.3 with certificates of the demo's CA (logs in $work while the demo runs)"

"$bin" vm start --agent "$a" --name web1 --memory "$MEMORY" --workload "$WORKLOAD" --tracker "$tracker" >/dev/null
say "started web1 ($MEMORY, $WORKLOAD, tracker $tracker) on A; waiting for its workload to run"
for _ in $(seq 600); do
    state=$("$bin" vm status web1 --agent "$a" --json | sed -n 's/.*"verify_sweeps": *\([0-9]*\).*/\1/p')
    [ "${state:-0}" -ge 1 ] && break
    sleep 0.1
done
sleep 1
"$bin" migrate web1 --from "$a" --to "$b" --to-agent b "$@"
