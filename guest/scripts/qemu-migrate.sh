#!/usr/bin/env bash
# End-to-end check of the guest's self-verification: boot it under QEMU, live-migrate it (pre-copy) to
# a second QEMU on the same host, and show the destination's console and status page.
#
#   guest/scripts/qemu-migrate.sh [ELF] [CMDLINE] [SECONDS_BEFORE_MIGRATION]
#
# POSTCOPY=1 switches to post-copy one second into the migration (bandwidth limited to 64 MiB/s so
# that pre-copy is still running then).
#
# Needs qemu-system-x86_64 (apt-get install -y qemu-system-x86) and python3. Booting takes ~7 s here
# (SeaBIOS runs in emulated ring 0).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
elf=${1:-$here/target/x86_64-unknown-none/release/perfplus-guest}
tsc_khz=$(awk '/^cpu MHz/ {printf "%d", $4 * 1000; exit}' /proc/cpuinfo)
append=${2:-"working-set=64M rate=5k tsc_khz=$tsc_khz"}
settle=${3:-15}
port=${PORT:-4444}
work=$(mktemp -d)
trap 'kill "${src:-}" "${dst:-}" 2>/dev/null || true' EXIT

# Sends HMP commands to a QEMU monitor socket and prints the replies.
hmp() {
    python3 - "$@" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
time.sleep(0.3)
s.recv(65536)
for cmd in sys.argv[2:]:
    s.send((cmd + "\n").encode())
    time.sleep(0.5)
    out = s.recv(1 << 20).decode(errors="replace").replace("\r", "")
    print("\n".join(l for l in out.split("\n") if not l.startswith(("(qemu)", cmd[:4]))))
PY
}

qemu=(qemu-system-x86_64 -enable-kvm -m 512 -kernel "$elf" -append "$append" -display none -no-reboot)
"${qemu[@]}" -serial "file:$work/src.txt" -monitor "unix:$work/src.sock,server,nowait" \
    </dev/null >"$work/src.err" 2>&1 &
src=$!
"${qemu[@]}" -serial "file:$work/dst.txt" -monitor "unix:$work/dst.sock,server,nowait" \
    -incoming "tcp:127.0.0.1:$port" </dev/null >"$work/dst.err" 2>&1 &
dst=$!
sleep "$settle"
echo "--- source console"
cat "$work/src.txt"
if [ "${POSTCOPY:-0}" = 1 ]; then
    hmp "$work/dst.sock" "migrate_set_capability postcopy-ram on" >/dev/null
    hmp "$work/src.sock" "migrate_set_capability postcopy-ram on" "migrate_set_parameter max-bandwidth 64M" \
        "migrate -d tcp:127.0.0.1:$port" >/dev/null
    sleep 1
    hmp "$work/src.sock" "migrate_start_postcopy" >/dev/null
else
    hmp "$work/src.sock" "migrate_set_parameter max-bandwidth 4G" "migrate_set_parameter downtime-limit 300" \
        "migrate -d tcp:127.0.0.1:$port" >/dev/null
fi
for _ in $(seq 60); do
    sleep 1
    if hmp "$work/src.sock" "info migrate" | grep -qE "^Migration status: (completed|failed)"; then break; fi
done
echo "--- migration"
hmp "$work/src.sock" "info migrate" | grep -E "^(Migration status|total time|downtime|transferred ram|postcopy request count)"
sleep 5
echo "--- destination console"
cat "$work/dst.txt"
echo "--- destination status page (0x7000)"
hmp "$work/dst.sock" "xp /20gx 0x7000" | grep '^0'
