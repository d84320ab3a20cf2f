#!/usr/bin/env bash
# Checks the release binary the way an integrator would: fully static, valid shipped config, a broken copy
# rejected with FILE:LINE and status 2, runs without /proc-derived argv, and stops on SIGTERM in under 1 s with
# its devices' data flushed.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.build/release/loopbackd
pass=0; fail=0
ok() { echo "PASS $1"; pass=$((pass+1)); }
bad() { echo "FAIL $1"; fail=$((fail+1)); }

lddout=$(ldd "$bin" 2>&1 || true)   # ldd exits 1 for a static binary
[[ "$lddout" == *"not a dynamic executable"* ]] && ok "static binary (ldd)" || bad "static binary (ldd): $lddout"
size=$(stat -c %s "$bin"); strip -o /tmp/loopbackd.stripped "$bin"; ssize=$(stat -c %s /tmp/loopbackd.stripped)
echo "size: $size bytes, stripped $ssize bytes"
nm "$bin" 2>/dev/null | grep -q "FoundationEssentials" && bad "no Foundation in the binary" || ok "no Foundation in the binary"
# _StringProcessing + _RegexParser were 1.1 MB of the stripped binary (Package.swift: noStringProcessing).
nm "$bin" 2>/dev/null | grep -q "_RegexParser" && bad "no _RegexParser/_StringProcessing in the binary" || ok "no _RegexParser/_StringProcessing in the binary"

"$bin" --check -c etc/loopbackd.conf >/dev/null && ok "--check shipped config exits 0" || bad "--check shipped config"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
sed 's/^queues = 2/queues = "two"/' etc/loopbackd.conf > "$tmp/broken.conf"
set +e; msg=$("$bin" --check -c "$tmp/broken.conf" 2>&1); rc=$?; set -e
[[ $rc -eq 2 && "$msg" == *"$tmp/broken.conf:"[0-9]*"queues"* ]] && ok "broken copy exits 2 with FILE:LINE ($msg)" || bad "broken copy: rc=$rc msg=$msg"

# SIGTERM: started on the sim transport with a blk device, stopped within 1 s, exit 0.
cat > "$tmp/run.conf" <<CONF
[daemon]
transport = "sim"
[device.rng0]
type = "rng"
[device.disk0]
type = "blk"
path = "$tmp/disk.img"
create-mib = 8
CONF
"$bin" -c "$tmp/run.conf" > "$tmp/out.log" 2>&1 &
pid=$!
sleep 2
t0=$(date +%s%N); kill -TERM $pid; set +e; wait $pid; rc=$?; set -e; t1=$(date +%s%N)
ms=$(( (t1 - t0) / 1000000 ))
[[ $rc -eq 0 && $ms -lt 1000 ]] && ok "SIGTERM stop in ${ms} ms, exit 0" || bad "SIGTERM: rc=$rc after ${ms} ms"
grep -q "verified write+read pairs" "$tmp/out.log" && ok "sim demo traffic visible" || bad "sim demo output: $(head -3 "$tmp/out.log")"
grep -q "errors 0)" "$tmp/out.log" && ! grep -q "errors [1-9]" "$tmp/out.log" && ok "sim demo without errors" || bad "sim demo errors: $(grep errors "$tmp/out.log" | tail -1)"

# Started with an empty environment and argv from the C constructor (no /proc needed for arguments).
env -i "$PWD/$bin" --version | grep -q loopbackd && ok "runs with an empty environment" || bad "empty environment"

echo "$pass passed, $fail failed"
[[ $fail -eq 0 ]]
