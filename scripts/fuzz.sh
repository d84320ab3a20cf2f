#!/usr/bin/env bash
# libFuzzer targets (Fuzz/<target>/): builds them with swiftc -sanitize=fuzzer,address into .build-fuzz/ (never part
# of Package.swift or the loopbackd binary) and runs each for SECONDS on a scratch copy of its committed corpus
# (Fuzz/corpus/<target>/; new inputs are not written into the repository).
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]      default: all 60. SECONDS=0 only builds.
#   FUZZ_JOBS=1 FUZZ_ARGS="..." scripts/fuzz.sh split-ring 300
#
# Prints one line per target with its executions and exec/s, keeps a crashing input in .build-fuzz/artifacts/, and
# ends with "N passed, M failed" (N = targets that ran clean). Exit status non-zero on any crash or build failure.
# Reproduce a crash: .build-fuzz/bin/<target> <file>   (e.g. Fuzz/crashes/<target>/*).
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH=/opt/swift/usr/bin:$PATH
root=$PWD
targets_all=(split-ring vhost-user-decode gpu-display-decode vhost-user-server config kernel-link gpio-request vsock-packet console-control input-event sound-request can-request gpu-command)
what=${1:-all}
seconds=${2:-60}
B=${FUZZ_BUILD_DIR:-$root/.build-fuzz}
mkdir -p "$B/obj" "$B/mod" "$B/bin" "$B/include" "$B/artifacts" "$B/logs"

if [ "$what" = all ]; then targets=("${targets_all[@]}"); else targets=("$what"); fi
for t in "${targets[@]}"; do
    [ -d "Fuzz/$t" ] || { echo "unknown target $t (known: ${targets_all[*]})"; echo "0 passed, 1 failed"; exit 2; }
done

# Optimised (bounds and overflow checks stay on; exclusivity checks too), ASan, libFuzzer coverage.
SWIFTFLAGS=(-O -g -parse-as-library -swift-version 6 -sanitize=address -sanitize=fuzzer -I "$B/include" -I "$B/mod")
CFLAGS=(-O1 -g -D_GNU_SOURCE -fsanitize=address,fuzzer-no-link)

# newer OUT FILES...: true if OUT is missing or older than any input.
stale() { local out=$1; shift; [ -e "$out" ] || return 0; [ -n "$(find "$@" -newer "$out" -print -quit 2>/dev/null)" ]; }

build_c() {   # the C shims, as SwiftPM wires them (CLinux: _GNU_SOURCE; CURing links liburing, CGpiod libgpiod)
    cat > "$B/include/module.modulemap.new" <<EOF
module CLinux { header "$root/Sources/CLinux/include/clinux.h" export * }
module CURing { header "$root/Sources/CURing/include/curing.h" export * }
module CGpiod { header "$root/Sources/CGpiod/include/cgpiod.h" export * }
EOF
    cmp -s "$B/include/module.modulemap.new" "$B/include/module.modulemap" || mv "$B/include/module.modulemap.new" "$B/include/module.modulemap"
    rm -f "$B/include/module.modulemap.new"
    for m in CLinux CURing CGpiod; do   # every .c file of the shim, into one relocatable object per module
        local lc; lc=$(echo $m | tr A-Z a-z)
        if stale "$B/obj/$lc.o" Sources/$m; then
            local objs=() c
            for c in Sources/$m/*.c; do
                clang "${CFLAGS[@]}" -I Sources/$m/include -c "$c" -o "$B/obj/$m-$(basename "$c" .c).c.o" || return 1
                objs+=("$B/obj/$m-$(basename "$c" .c).c.o")
            done
            ld -r -o "$B/obj/$lc.o" "${objs[@]}" || return 1
        fi
    done
}

build_lib() {   # build_lib MODULE: Sources/MODULE/**/*.swift as a static library + swiftmodule
    local m=$1 deps=${2:-}
    local lib=$B/obj/lib$m.a
    if stale "$lib" Sources/$m $deps "$B/include/module.modulemap"; then
        echo "fuzz: building module $m"
        # From a snapshot: others edit Sources while this builds ("input file was modified during the build").
        local stamp=$B/obj/$m.stamp
        touch "$stamp"; rm -f "$lib"
        rm -rf "$B/src/$m"; mkdir -p "$B/src"; cp -r Sources/$m "$B/src/$m"
        mapfile -t srcs < <(find "$B/src/$m" -name '*.swift' | sort)
        swiftc "${SWIFTFLAGS[@]}" -wmo -num-threads 1 -module-name "$m" -enable-testing \
            -emit-module -emit-module-path "$B/mod/$m.swiftmodule" \
            -emit-library -static -o "$lib" "${srcs[@]}" 2>&1 | grep -vE "^(/usr/bin/ld|warning: Cannot export)"
        [ "${PIPESTATUS[0]}" -eq 0 ] && [ -e "$lib" ] || { rm -f "$lib"; echo "fuzz: module $m failed to build"; return 1; }
        touch -r "$stamp" "$lib"   # as old as the snapshot: a file edited meanwhile rebuilds next time
    fi
}

build_target() {
    local t=$1 exe=$B/bin/$1 libs=("$B/obj/libTransport.a") extra=()
    build_lib Transport || return 1
    if [ "$t" = config ] || [ "$t" = gpio-request ] || [ "$t" = vsock-packet ] || [ "$t" = console-control ] \
        || [ "$t" = input-event ] || [ "$t" = sound-request ] || [ "$t" = can-request ] || [ "$t" = gpu-command ]; then
        build_lib Registry "$B/obj/libTransport.a" || return 1
        libs=("$B/obj/libRegistry.a" "$B/obj/libTransport.a")
        extra=("$B/obj/curing.o" -luring "$B/obj/cgpiod.o" -lgpiod)
    fi
    if stale "$exe" Fuzz/$t Fuzz/Common "${libs[@]}"; then
        echo "fuzz: building $t"
        rm -f "$exe"
        swiftc "${SWIFTFLAGS[@]}" -module-name "Fuzz_${t//-/_}" Fuzz/Common/*.swift Fuzz/$t/*.swift \
            "${libs[@]}" "$B/obj/clinux.o" "${extra[@]}" -o "$exe" 2>&1 \
            | grep -vE "warning: Cannot export local symbol|^/usr/bin/ld.gold: warning" || true
        [ -x "$exe" ] || { echo "fuzz: $t failed to build"; return 1; }
    fi
}

passed=0; failed=0
build_c || { echo "fuzz: C shims failed to build"; echo "0 passed, ${#targets[@]} failed"; exit 1; }
for t in "${targets[@]}"; do
    if ! build_target "$t"; then
        echo "fuzz: $t: BUILD FAILED"; failed=$((failed + 1)); continue
    fi
    [ "$seconds" -gt 0 ] || { echo "fuzz: $t: built ($B/bin/$t)"; passed=$((passed + 1)); continue; }
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-$t.XXXXXX")
    [ -d "Fuzz/corpus/$t" ] && cp -r "Fuzz/corpus/$t/." "$scratch/"
    log=$B/logs/$t.log
    # -jobs/-workers only when asked (the machine is shared); the default runs one process in the foreground.
    jobargs=()
    [ -n "${FUZZ_JOBS:-}" ] && jobargs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
    # shellcheck disable=SC2086
    SWIFT_BACKTRACE=enable=no ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0} "$B/bin/$t" "$scratch" \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -print_pcs=0 \
        -artifact_prefix="$B/artifacts/$t-" "${jobargs[@]}" ${FUZZ_ARGS:-} >"$log" 2>&1
    rc=$?
    execs=$(grep -oE "stat::number_of_executed_units: *[0-9]+" "$log" | tail -1 | grep -oE "[0-9]+$")
    rate=$(grep -oE "stat::average_exec_per_sec: *[0-9]+" "$log" | tail -1 | grep -oE "[0-9]+$")
    cov=$(grep -oE "(DONE|pulse|NEW|REDUCE) +cov: [0-9]+ ft: [0-9]+" "$log" | tail -1 | grep -oE "cov: [0-9]+ ft: [0-9]+")
    rm -rf "$scratch"
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "fuzz: $t: ok, ${execs:-?} executions, ${rate:-?} exec/s, ${cov:-cov ?} (${seconds}s)"
    else
        failed=$((failed + 1))
        echo "fuzz: $t: CRASH (rc=$rc) after ${execs:-?} executions; log $log; artifact:"
        ls -1 "$B/artifacts/$t-"* 2>/dev/null | tail -3
        grep -E "ERROR: |Fatal error|SUMMARY|==ERROR|deadly signal|fuzz: " "$log" | head -8
    fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
