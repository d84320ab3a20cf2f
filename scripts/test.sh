#!/usr/bin/env bash
# The project's test command: unit and end-to-end tests (swift test), the release binary's checks, then the
# minimal image (built and booted once), then the guest suites that boot Debian's 6.1 and bookworm-backports'
# 6.12 kernels under QEMU (kernel module + loopbackd; QEMU as vhost-user frontend).
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
step guest-setup bash -c 'Tests/guest/setup.sh 6.1 6.12 >/dev/null && echo "1 passed, 0 failed"'
# The minimal image (scripts/mkimage.sh, Debian 12's kernel), booted from its bzImage: the kernel's virtio-rng
# through the module and loopbackd reads 64 KiB from /dev/hwrng, and disk0 appears as /dev/vda.
image_check='w() { i=0; until "$@" 2>/dev/null; do i=$((i+1)); [ $i -gt 200 ] && echo "timeout: $*" && exit 1; usleep 100000; done; }; w grep -q virtio_rng /sys/class/misc/hw_random/rng_current; w test -b /dev/vda; n=$(dd if=/dev/hwrng bs=1024 count=64 2>/dev/null | wc -c); echo "hwrng: $n bytes from $(cat /sys/class/misc/hw_random/rng_current)"; [ "$n" = 65536 ]'
step image bash -c 'scripts/mkimage.sh --kernel 6.1 && scripts/run-image.sh --kernel 6.1 --bzimage --timeout 120 -- "$1" && echo "1 passed, 0 failed"' _ "$image_check"
# The whole guest suite on both kernels: Debian 12's 6.1 and bookworm-backports' 6.12. On 6.12 every loopbackd of
# the suite runs under the seccomp allow-list (GUEST_SECCOMP=kill: a missing system call fails CI, naming it).
for gk in 6.1 6.12; do
    sfx=-$gk; [ $gk = 6.1 ] && sfx=
    sc=; [ $gk = 6.12 ] && sc=kill
    step guest$sfx env GUEST_KERNEL=$gk GUEST_SECCOMP=$sc bash Tests/guest/run.sh
    [ -f Tests/guest/vhost-user.sh ] && step guest-vhost-user$sfx env GUEST_KERNEL=$gk bash Tests/guest/vhost-user.sh
done
step fuzz bash scripts/fuzz.sh all 15
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
