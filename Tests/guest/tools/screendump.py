#!/usr/bin/env python3
# Host side of a guest case's display check (run.sh starts it for a case that prints GUEST-SCREENDUMP): watches the
# case's console log; for each line "GUEST-SCREENDUMP TAG W H SEED|black [PW PH OX OY]" it takes QEMU's QMP
# `screendump` of the guest's display (a P6 PPM of the console's surface: 8-bit R, G, B of each pixel, whatever the
# surface's format) into CDIR/screendump-TAG.ppm and checks it: W x H and equal to gputool's pattern(SEED)
# (`gputool check`), or all black; with PW PH OX OY: a PW x PH picture of pattern(SEED) at (OX, OY), black around. The screendump is retried for up to 20 s until it matches (the guest's update may not have reached
# the display yet); the verdict goes to the guest on its second serial port (ttyS1): "SCREENDUMP TAG PASS|FAIL why".
#   screendump.py CDIR GPUTOOL      (CDIR holds console.log, qmp.sock, ack.sock)
import json, os, socket, subprocess, sys, time

cdir, gputool = sys.argv[1], sys.argv[2]
log = os.path.join(cdir, 'console.log')

def connect(path):
    for _ in range(600):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); return s
        except OSError:
            time.sleep(0.1)
    sys.exit('screendump.py: cannot connect to %s' % path)

ack = connect(os.path.join(cdir, 'ack.sock'))
q = connect(os.path.join(cdir, 'qmp.sock')); f = q.makefile('rw')

def cmd(c, args=None):
    f.write(json.dumps({'execute': c, 'arguments': args or {}}) + '\n'); f.flush()
    while True:
        line = f.readline()
        if not line: sys.exit('screendump.py: QMP closed')
        r = json.loads(line)
        if 'return' in r: return None
        if 'error' in r: return r['error'].get('desc', str(r['error']))

json.loads(f.readline()); cmd('qmp_capabilities')

def check(path, w, h, seed):
    if seed != 'black':
        r = subprocess.run([gputool, 'check', path, w, h, seed], capture_output=True, text=True)
        return r.returncode == 0, (r.stdout + r.stderr).strip()
    with open(path, 'rb') as fh: d = fh.read()
    head = d.split(b'\n', 3)
    if len(head) < 4 or head[0] != b'P6' or head[1] != ('%s %s' % (w, h)).encode() or head[2] != b'255':
        return False, 'not a %sx%s P6: %r' % (w, h, d[:20])
    px = head[3]
    if len(px) != int(w) * int(h) * 3: return False, 'size %d' % len(px)
    n = len(px) - px.count(0)
    return n == 0, 'black' if n == 0 else '%d bytes not black' % n

def pattern(x, y, seed):   # gputool.c's pattern()
    return bytes((x & 255, y & 255, (((x >> 8) | (y >> 8) << 4) ^ seed) & 255))

def check_placed(path, w, h, seed, pw, ph, ox, oy):
    with open(path, 'rb') as fh: d = fh.read()
    head = d.split(b'\n', 3)
    if len(head) < 4 or head[0] != b'P6' or head[1] != ('%d %d' % (w, h)).encode() or head[2] != b'255':
        return False, 'not a %dx%d P6: %r' % (w, h, d[:20])
    px = head[3]
    if len(px) != w * h * 3: return False, 'size %d' % len(px)
    black = bytes(3)
    for y in range(h):
        row = px[y * w * 3:(y + 1) * w * 3]
        if oy <= y < oy + ph:
            want = black * ox + b''.join(pattern(x, y - oy, seed) for x in range(pw)) + black * (w - ox - pw)
        else:
            want = black * w
        if row != want:
            x = next(i for i in range(w) if row[3 * i:3 * i + 3] != want[3 * i:3 * i + 3])
            return False, 'row %d differs from x %d: %s, want %s' % (y, x, row[3 * x:3 * x + 3].hex(), want[3 * x:3 * x + 3].hex())
    return True, 'OK %dx%d at (%d,%d) in %dx%d, black around' % (pw, ph, ox, oy, w, h)

pos, rest = 0, b''
while True:
    try:
        with open(log, 'rb') as fh:
            fh.seek(pos); data = fh.read()
    except OSError:
        data = b''
    if not data:
        time.sleep(0.1); continue
    pos += len(data)
    lines = (rest + data).split(b'\n'); rest = lines.pop()
    for raw in lines:
        line = raw.decode('latin-1').strip('\r')
        if line.startswith('GUEST-QMP '):
            parts = line.split(None, 3)
            if len(parts) < 3: continue
            try: args = json.loads(parts[3]) if len(parts) == 4 else {}
            except ValueError as e: args, err = None, 'bad JSON: %s' % e
            if args is not None: err = cmd(parts[2], args)
            print('screendump.py: QMP %s %s: %s' % (parts[1], parts[2], err or 'OK'), file=sys.stderr)
            ack.sendall(('QMP %s %s\n' % (parts[1], 'FAIL ' + err if err else 'OK')).encode())
            continue
        if not line.startswith('GUEST-SCREENDUMP '): continue
        parts = line.split()
        if len(parts) not in (5, 9): continue
        tag, w, h, seed = parts[1:5]
        placed = [int(v) for v in parts[5:]]
        out = os.path.join(cdir, 'screendump-%s.ppm' % tag)
        ok, why, end, tries = False, '', time.time() + 20, 0
        while not ok and time.time() < end:
            tries += 1
            e = cmd('screendump', {'filename': out})
            if e: why = 'screendump: ' + e
            elif placed: ok, why = check_placed(out, int(w), int(h), int(seed), *placed)
            else: ok, why = check(out, w, h, seed)
            if not ok: time.sleep(0.5)
        print('screendump.py: %s: %s after %d screendumps: %s' % (tag, 'PASS' if ok else 'FAIL', tries, why), file=sys.stderr)
        ack.sendall(('SCREENDUMP %s %s %s (%d screendumps)\n' % (tag, 'PASS' if ok else 'FAIL', why.replace('\n', ' | '), tries)).encode())
