#!/usr/bin/env bash
# Stops a cluster made by scripts/ha/up.sh DIR: kills each node's init (the pid up.sh recorded, after
# checking that it is still that process), which ends every process of the node with it (Corosync,
# Pacemaker, the perfplus agent and its VMs, resource agents), and deletes the network namespaces.
# Safe to run on a partly built cluster and more than once. DIR itself is left for the caller.
set -uo pipefail

DIR=${1:?usage: down.sh DIR}
[ -d "$DIR" ] || exit 0
PREFIX=$(cat "$DIR/prefix" 2>/dev/null) || exit 0
SELF_PIDNS=$(readlink /proc/self/ns/pid)

for n in n1 n2; do
    N=$DIR/$n
    for f in init unshare; do
        P=$(cat "$N/$f.pid" 2>/dev/null) || continue
        # Only the process up.sh started: an init is `sleep` in a PID namespace of its own.
        case "$f:$(cat "/proc/$P/comm" 2>/dev/null)" in
        init:sleep) [ "$(readlink "/proc/$P/ns/pid")" != "$SELF_PIDNS" ] || continue ;;
        unshare:unshare) ;;
        *) continue ;;
        esac
        kill -KILL "$P" 2>/dev/null
    done
done
for n in n1 n2; do
    for f in init unshare; do
        P=$(cat "$DIR/$n/$f.pid" 2>/dev/null) || continue
        for _ in $(seq 100); do
            [ -d "/proc/$P" ] || break
            sleep 0.1
        done
        rm -f "$DIR/$n/$f.pid"
    done
done
# Deleting a namespace deletes the veth pair in it too.
for n in n1 n2; do
    ip netns del "$PREFIX$n" 2>/dev/null
done
rm -f "$DIR/prefix"
exit 0
