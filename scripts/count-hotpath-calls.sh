#!/usr/bin/env bash
# Counts Swift runtime calls on the request path of the release binary: swift_retain (ARC) and swift_beginAccess
# (dynamic exclusivity checks), with a gdb breakpoint count over two `loopbackd bench` runs of different lengths;
# the difference divided by the extra requests is the per-request figure (set-up cost cancels out).
# Usage: scripts/count-hotpath-calls.sh [DEVICE...]   (needs gdb; devices from a temporary config: rng0, disk0)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.build/release/loopbackd
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/c.conf" <<CONF
[device.rng0]
type = "rng"
[device.disk0]
type = "blk"
path = "$tmp/disk.img"
create-mib = 16
CONF
hits() {   # hits SYMBOL DEVICE REQUESTS
    printf 'set pagination off\nbreak %s\ncommands\nsilent\ncontinue\nend\nrun\ninfo breakpoints\n' "$1" > "$tmp/g"
    local n
    n=$(gdb -batch -x "$tmp/g" --args "$bin" bench -c "$tmp/c.conf" --device "$2" --requests "$3" --json 2>&1 \
        | grep -oE "already hit [0-9]+" | grep -oE "[0-9]+" || true)
    echo "${n:-0}"
}
for dev in "${@:-rng0 disk0}"; do
    for sym in swift_retain swift_beginAccess; do
        a=$(hits $sym "$dev" 1000); b=$(hits $sym "$dev" 3000)
        # bench runs each row (notify, poll) with N requests plus 10% warm-up: 2 x 1.1 x 2000 extra requests.
        echo "$dev $sym: $(( (b - a) * 100 / 4400 ))/100 per request ($a -> $b)"
    done
done
