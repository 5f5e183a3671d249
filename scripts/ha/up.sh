#!/usr/bin/env bash
# Brings up a two-node Pacemaker/Corosync cluster on this machine, for tests and demos of the
# perfplus resource agent (ocf/perfplus-vm).
#
#   scripts/ha/up.sh DIR        DIR: an empty scratch directory that holds everything of the cluster
#   scripts/ha/on DIR n1 CMD…   runs CMD on node n1 (or n2)
#   scripts/ha/down.sh DIR      stops everything up.sh started and deletes the namespaces
#
# Each node (n1 10.88.0.1, n2 10.88.0.2) is a network namespace joined to the other by a veth pair,
# plus its own mount, UTS and PID namespaces, held by one "init" process (`sleep`): Corosync, Pacemaker,
# the perfplus agent and every resource agent run inside them, so that down.sh ends them all by
# killing that one process it started, and nothing leaks onto the host. In the node's mount namespace
# /etc/corosync, /etc/pacemaker, /var/lib/{corosync,pacemaker}, /var/log and /etc/hosts are the node's
# own directories under DIR, /run and /dev/shm private tmpfs (Pacemaker's IPC is libqb over abstract
# sockets, private to the network namespace, and shared memory in /dev/shm), and the resource agent
# is added to /usr/lib/ocf/resource.d as ocf:perfplus:vm by a read-only overlay.
# There is no systemd here: Corosync and pacemakerd are started directly.
#
# With PERFPLUS (the binary) and PERFPLUS_CA (a cluster CA directory, `perfplus ca init`) set, a
# perfplus agent listens on 0.0.0.0:7001 in each node with a certificate named after the node
# (credentials, state and log in DIR/nI/perfplus/).
#
# Test configuration (a real cluster needs fencing): stonith-enabled=false, no-quorum-policy=ignore,
# Corosync's two_node, resource-stickiness=100, and dc-deadtime=2s so that the first DC election
# does not wait the default 20 s. The namespace names carry this script's pid: runs side by side do
# not collide.
set -euo pipefail

DIR=${1:?usage: up.sh DIR}
DIR=$(cd "$DIR" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
NODES="n1 n2"
PREFIX=ppha$$-
echo "$PREFIX" >"$DIR/prefix"
START=$(date +%s.%N)

say() { echo "ha up: +$(awk -v s="$START" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')s $*" >&2; }
addr() { echo "10.88.0.${1#n}"; }

for tool in corosync pacemakerd crm_mon cibadmin corosync-keygen unshare nsenter; do
    command -v "$tool" >/dev/null || { echo "ha up: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

# Network: a veth pair made inside the namespaces (no interface name on the host to collide).
for n in $NODES; do ip netns add "$PREFIX$n"; done
ip -n "${PREFIX}n1" link add ha0 type veth peer name ha0 netns "${PREFIX}n2"
for n in $NODES; do
    ip -n "$PREFIX$n" addr add "$(addr "$n")/24" dev ha0
    ip -n "$PREFIX$n" link set lo up
    ip -n "$PREFIX$n" link set ha0 up
done

# Corosync's key, shared by both nodes; the resource agent, added to the OCF tree by an overlay.
corosync-keygen -l -k "$DIR/authkey" >/dev/null 2>&1
chmod 400 "$DIR/authkey"
install -D -m 755 "$REPO/ocf/perfplus-vm" "$DIR/ocf/perfplus/vm"

for n in $NODES; do
    N=$DIR/$n
    mkdir -p "$N"/{etc-corosync,etc-pacemaker,var-lib-corosync} \
        "$N"/var-lib-pacemaker/{cib,pengine,blackbox,cores} "$N"/var-log/{pacemaker/bundles,corosync}
    cp -a /etc/corosync/uidgid.d "$N/etc-corosync/" 2>/dev/null || true
    cp -a /etc/pacemaker/. "$N/etc-pacemaker/"
    install -m 400 "$DIR/authkey" "$N/etc-corosync/authkey"
    {
        echo "127.0.0.1 localhost"
        for m in $NODES; do echo "$(addr "$m") $m"; done
    } >"$N/hosts"
    cat >"$N/etc-corosync/corosync.conf" <<CONF
totem {
    version: 2
    cluster_name: perfplus-ha
    transport: knet
    crypto_cipher: aes256
    crypto_hash: sha256
    token: 3000
}
nodelist {
$(for m in $NODES; do printf '    node {\n        ring0_addr: %s\n        name: %s\n        nodeid: %s\n    }\n' "$(addr "$m")" "$m" "${m#n}"; done)
}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
logging {
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    to_stderr: no
    to_syslog: no
    timestamp: on
}
CONF
    # The first CIB: the test's cluster properties are there before the first election.
    cat >"$N/var-lib-pacemaker/cib/cib.xml" <<'CIB'
<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="opt-stonith-enabled" name="stonith-enabled" value="false"/>
        <nvpair id="opt-no-quorum-policy" name="no-quorum-policy" value="ignore"/>
        <nvpair id="opt-dc-deadtime" name="dc-deadtime" value="2s"/>
        <nvpair id="opt-cluster-name" name="cluster-name" value="perfplus-ha"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources/>
    <constraints/>
    <rsc_defaults>
      <meta_attributes id="rsc-options">
        <nvpair id="rsc-options-resource-stickiness" name="resource-stickiness" value="100"/>
      </meta_attributes>
    </rsc_defaults>
  </configuration>
  <status/>
</cib>
CIB
    chown -R hacluster:haclient "$N/var-lib-pacemaker" "$N/var-log/pacemaker"
    chmod 750 "$N"/var-lib-pacemaker/*
    chmod 770 "$N/var-log/pacemaker"
    chmod 600 "$N/var-lib-pacemaker/cib/cib.xml"

    # The node's init: private mount, UTS and PID namespaces inside the network namespace, the node's
    # own directories mounted where Corosync and Pacemaker look, then it waits.
    ip netns exec "$PREFIX$n" unshare --mount --uts --pid --fork --kill-child --mount-proc \
        --propagation private /bin/sh -ec "
        hostname $n
        mount --bind $N/etc-corosync      /etc/corosync
        mount --bind $N/etc-pacemaker     /etc/pacemaker
        mount --bind $N/var-lib-corosync  /var/lib/corosync
        mount --bind $N/var-lib-pacemaker /var/lib/pacemaker
        mount --bind $N/var-log           /var/log
        mount --bind $N/hosts             /etc/hosts
        mount -t overlay -o lowerdir=$DIR/ocf:/usr/lib/ocf/resource.d overlay /usr/lib/ocf/resource.d
        mount -t tmpfs -o mode=755 tmpfs  /run
        mount -t tmpfs -o mode=1777 tmpfs /dev/shm
        mkdir -p /run/crm /run/resource-agents /run/lock
        exec sleep infinity" </dev/null >"$N/init.out" 2>&1 &
    echo $! >"$N/unshare.pid"
done

# Each node's init is the child of its unshare; it is ready once it has become `sleep`.
for n in $NODES; do
    N=$DIR/$n
    U=$(cat "$N/unshare.pid")
    for _ in $(seq 100); do
        I=$(cat "/proc/$U/task/$U/children" 2>/dev/null | awk '{print $1}')
        [ -n "$I" ] && [ "$(cat "/proc/$I/comm" 2>/dev/null)" = sleep ] && break
        I=""
        sleep 0.1
    done
    [ -n "$I" ] || { echo "ha up: node $n did not come up: $(cat "$N/init.out")" >&2; exit 1; }
    echo "$I" >"$N/init.pid"
done
say "namespaces up"

for n in $NODES; do
    "$HERE/on" "$DIR" "$n" setsid -f corosync -f </dev/null >"$DIR/$n/corosync.out" 2>&1
done
for n in $NODES; do
    for _ in $(seq 100); do
        "$HERE/on" "$DIR" "$n" corosync-cfgtool -s >/dev/null 2>&1 && break
        sleep 0.1
    done
done
say "corosync up"
for n in $NODES; do
    "$HERE/on" "$DIR" "$n" setsid -f pacemakerd </dev/null >"$DIR/$n/pacemakerd.out" 2>&1
done

if [ -n "${PERFPLUS:-}" ] && [ -n "${PERFPLUS_CA:-}" ]; then
    for n in $NODES; do
        mkdir -p "$DIR/$n/perfplus"
        # The node's agent certificate, named after the node (the OCF agent checks that name).
        "$PERFPLUS" cert issue --ca-dir "$PERFPLUS_CA" --agent "$n" --out "$DIR/$n/perfplus/tls" >/dev/null
        "$HERE/on" "$DIR" "$n" setsid -f "$PERFPLUS" --tls-dir "$DIR/$n/perfplus/tls" agent \
            --listen 0.0.0.0:7001 --state-dir "$DIR/$n/perfplus/state" --page-store-size 64M \
            </dev/null >"$DIR/$n/perfplus/agent.log" 2>&1
    done
    for n in $NODES; do
        for _ in $(seq 100); do
            grep -q "perfplus agent listening" "$DIR/$n/perfplus/agent.log" && break
            sleep 0.1
        done
        grep -q "perfplus agent listening" "$DIR/$n/perfplus/agent.log" ||
            { echo "ha up: the perfplus agent of $n did not start:" >&2; cat "$DIR/$n/perfplus/agent.log" >&2; exit 1; }
    done
    say "perfplus agents up"
fi

# Up once both nodes are online and a DC is elected, as each node sees it.
online() {
    local xml
    xml=$("$HERE/on" "$DIR" "$1" crm_mon --one-shot --output-as=xml 2>/dev/null) || return 1
    grep -q '<current_dc present="true"' <<<"$xml" || return 1
    for m in $NODES; do grep -q "<node name=\"$m\" [^>]*online=\"true\"" <<<"$xml" || return 1; done
}
for _ in $(seq 120); do
    online n1 && online n2 && break
    sleep 0.5
done
if ! { online n1 && online n2; }; then
    echo "ha up: the cluster did not form:" >&2
    "$HERE/on" "$DIR" n1 crm_mon --one-shot >&2 || true
    exit 1
fi
say "cluster up: $("$HERE/on" "$DIR" n1 crm_mon --one-shot | grep -E 'Current DC|Online' | tr -s ' ' | paste -sd ';')"
