#!/usr/bin/env bash
# Footprint of the release binary (issue "near the floor", item 3): stripped size, whether the standard library's
# regex/string-processing modules crept back in, start-up time from exec to READY=1 (systemd notify protocol: every
# device open and listening), idle RSS (total and anonymous) with three served devices, then per device type: the
# code and data its folder compiles to (Sources/Registry/TYPE/*.o of the release build, before linking) and the
# anonymous memory of a loopbackd serving one device of that type, idle (no front-end). Each start-up figure is
# the median of N runs. Usage: scripts/footprint.sh [BINARY] [RUNS]   (default .build/release/loopbackd, 20)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-.build/release/loopbackd}"); runs=${2:-20}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
strip -o "$tmp/loopbackd" "$bin"
echo "binary: $(stat -c %s "$bin") bytes, stripped $(stat -c %s "$tmp/loopbackd") bytes"
size -A "$tmp/loopbackd" | awk '$1 ~ /^\.(text|rodata|eh_frame|eh_frame_hdr|data|data\.rel\.ro)$/ {printf "  %-14s %9d\n", $1, $2}'
nm "$bin" | grep -q '_RegexParser\|_StringProcessing' && echo "  _StringProcessing/_RegexParser: linked" || echo "  _StringProcessing/_RegexParser: not linked"
cat > "$tmp/three.conf" <<CONF
[daemon]
transport = "none"
control = "none"
[device.rng0]
type = "rng"
serve = "$tmp/rng.sock"
[device.disk0]
type = "blk"
path = "$tmp/disk.img"
create-mib = 8
serve = "$tmp/blk.sock"
[device.con0]
type = "console"
console = "echo"
serve = "$tmp/con.sock"
CONF
"$tmp/loopbackd" --check -c "$tmp/three.conf" >/dev/null
python3 - "$tmp/loopbackd" "$tmp" "$runs" <<'PY'
import os, socket, subprocess, sys, time, statistics
binary, tmp, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
def start():
    path = os.path.join(tmp, "notify.sock")
    if os.path.exists(path): os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(path); s.settimeout(10)
    for f in ("rng.sock", "blk.sock", "con.sock"):
        p = os.path.join(tmp, f)
        if os.path.exists(p): os.unlink(p)
    env = dict(NOTIFY_SOCKET=path)
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "-c", os.path.join(tmp, "three.conf")], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        msg = s.recv(4096).decode()
        if "READY=1" in msg: break
    t = (time.monotonic() - t0) * 1000
    s.close()
    return p, t
times = []
for i in range(runs):
    p, t = start(); times.append(t)
    p.terminate(); p.wait()
times.sort()
print(f"start-up to READY=1 (3 served devices), {runs} runs: median {statistics.median(times):.1f} ms, "
      f"min {times[0]:.1f}, max {times[-1]:.1f} (includes fork+exec from Python)")
p, _ = start(); time.sleep(1.0)
st = {}
for line in open(f"/proc/{p.pid}/status"):
    k, v = line.split(":", 1); st[k] = v.strip()
print(f"idle RSS (3 served devices, 1 s after READY): {st['VmRSS']} total, {st['RssAnon']} anonymous, "
      f"{st['RssFile']} file (the binary's pages)")
p.terminate(); p.wait()
PY

# ---- per device type
objdir=$(dirname "$bin")/../x86_64-unknown-linux-gnu/release/Registry.build
[ -d "$objdir" ] || objdir=.build/x86_64-unknown-linux-gnu/release/Registry.build
declare -A extra=([rng]='' [blk]="path = \"$tmp/one.img\"
create-mib = 8" [console]='console = "echo"' [input]='simulated = true' [i2c]='simulated = true' [gpio]='simulated = true'
  [vsock]="guest-cid = 3
uds-path = \"$tmp/v.sock\"" [sound]='playback = "null"
capture = "null"' [can]='simulated = true' [gpu]='output = "none"')
declare -A folder=([rng]=Rng [blk]=Block [console]=Console [input]=Input [i2c]=I2C [gpio]=GPIO [vsock]=Vsock [sound]=Sound [can]=CAN [gpu]=GPU)
echo "per device type: code+data of Sources/Registry/TYPE (object files), anonymous RSS serving one idle device"
for t in rng blk console input i2c gpio vsock sound can gpu; do
  code=0
  if [ -d "$objdir" ]; then
    for f in Sources/Registry/${folder[$t]}/*.swift; do
      o=$objdir/$(basename "$f").o
      [ -f "$o" ] && code=$((code + $(size "$o" | awk 'NR==2 {print $1 + $2}')))
    done
  fi
  printf '[daemon]\ntransport = "none"\ncontrol = "none"\n[device.d0]\ntype = "%s"\n%s\nserve = "%s/one.sock"\n' "$t" "${extra[$t]}" "$tmp" > "$tmp/one.conf"
  rm -f "$tmp/one.sock"
  "$tmp/loopbackd" -c "$tmp/one.conf" > "$tmp/one.log" 2>&1 & p=$!
  for _ in $(seq 100); do [ -S "$tmp/one.sock" ] && break; sleep 0.02; done
  sleep 0.3
  anon=$(awk '/^RssAnon/ {print $2}' /proc/$p/status 2>/dev/null || echo "?")
  kill -TERM $p 2>/dev/null; wait $p 2>/dev/null || true
  printf '  %-8s code+data %7d B   anonymous RSS %6s kB\n' "$t" "$code" "$anon"
done
