#!/usr/bin/env bash
# The project's test command: unit and end-to-end tests (swift test), the release binary's checks, then the
# guest suites that boot Debian's kernel under QEMU (kernel module + loopbackd; QEMU as vhost-user frontend).
# Needs scripts/install-deps.sh to have run (as root). Ends with one "N passed, N failed" line over every test.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH=/opt/swift/usr/bin:$PATH
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
passed=0; failed=0
step() {   # step NAME COMMAND...: runs a step, keeps its output, adds its counts
    local name=$1; shift
    echo "=== $name"
    "$@" 2>&1 | tee "$log/$name.log"
    local rc=${PIPESTATUS[0]}
    local p f
    # XCTest: "Executed N tests, with M failures"; scripts: "N passed, M failed".
    if grep -q "Executed [0-9]* tests" "$log/$name.log"; then
        # "Executed N tests, with [S tests skipped and] F failures": passed = N - S - F.
        local line n s
        line=$(grep -E "Executed [0-9]+ tests" "$log/$name.log" | tail -1)
        n=$(echo "$line" | grep -oE "Executed [0-9]+" | grep -oE "[0-9]+")
        s=$(echo "$line" | grep -oE "[0-9]+ tests? skipped" | grep -oE "^[0-9]+"); s=${s:-0}
        f=$(echo "$line" | grep -oE "[0-9]+ failures?" | grep -oE "^[0-9]+"); f=${f:-0}
        p=$((n - s - f))
        [ "$s" -gt 0 ] && echo "=== $name: $s skipped"
    else
        p=$(grep -oE "^[0-9]+ passed, [0-9]+ failed" "$log/$name.log" | tail -1 | awk '{print $1}')
        f=$(grep -oE "^[0-9]+ passed, [0-9]+ failed" "$log/$name.log" | tail -1 | awk '{print $3}')
    fi
    p=${p:-0}; f=${f:-0}
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi   # a step that failed without counting counts once
    passed=$((passed + p)); failed=$((failed + f))
    echo "=== $name: rc=$rc, $p passed, $f failed"
}
swift build -c release --product loopbackd 2>&1 | grep -vE "warning: Using '(dlopen|getpwnam|getaddrinfo|getpwuid)'" | tail -5
[ -x .build/release/loopbackd ] || { echo "release build failed"; echo "0 passed, 1 failed"; exit 1; }
step unit swift test
step binary bash scripts/check-binary.sh
step packaging bash scripts/check-packaging.sh   # install.sh file list, systemd-analyze verify, man pages
step dkms bash scripts/check-dkms.sh             # dkms add/build/install/remove against the installed headers
step guest-setup bash -c 'Tests/guest/setup.sh >/dev/null && echo "1 passed, 0 failed"'
step guest bash Tests/guest/run.sh
[ -f Tests/guest/vhost-user.sh ] && step guest-vhost-user bash Tests/guest/vhost-user.sh
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
