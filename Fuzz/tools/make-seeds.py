#!/usr/bin/env python3
"""Writes the seed corpora in Fuzz/corpus/<target>/ (small, hand-built inputs that reach the interesting states:
valid rings with direct, chained and indirect descriptors; a full vhost-user handshake that starts the rings;
the shipped config shapes; /proc/iomem text). The input formats are the ones the harnesses read (Fuzz/*/)."""
import os, struct
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")

def put(target, name, data):
    d = os.path.join(root, target); os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), "wb").write(bytes(data))

u8 = lambda v: struct.pack("<B", v & 0xff)
u16 = lambda v: struct.pack("<H", v & 0xffff)
u32 = lambda v: struct.pack("<I", v & 0xffffffff)
u64 = lambda v: struct.pack("<Q", v & 0xffffffffffffffff)

# ---- split-ring -------------------------------------------------------------------------------------------------
def desc(addr, ln, flags, nxt): return u64(addr) + u32(ln) + u16(flags) + u16(nxt)
G = 0x1_0000_0000
def ring_seed(two_regions, indirect, ops):
    b = b""
    if two_regions:
        b += u8(1)                              # 2 regions
        b += u8(0) + u8(1) + u8(7)              # region 0: 4096 bytes, guard after, guest 0x1_0000_0000
        b += u8(0) + u8(0) + u8(0)              # region 1: 4096 bytes, guard before, adjacent
    else:
        b += u8(0) + u8(3) + u8(1) + u8(7)      # 1 region of 64 KiB
    b += u8(0x13 if indirect else 0x11)         # eventIdx (+indirect), eventfd interrupt
    b += u8(3)                                  # size 8
    b += u8(0) + u16(0x000) + u8(0) + u16(0x080) + u8(0) + u16(0x100)   # desc, avail, used offsets in region 0
    mem = bytearray(0x300)
    d = [desc(G + 0x200, 16, 1, 1), desc(G + 0x210, 32, 2, 0),           # chain 0: readable -> writable
         desc(G + 0x240, 32, 4, 0),                                       # chain 2: indirect table at 0x240
         desc(G + 0x2f0 if not two_regions else G + 0xff0, 0x40, 2, 0)]  # chain 3: writable (across regions)
    for i, x in enumerate(d): mem[16 * i:16 * i + 16] = x
    mem[0x240:0x260] = desc(G + 0x280, 8, 1, 1) + desc(G + 0x290, 8, 2, 0)
    mem[0x80:0x82] = u16(0); mem[0x82:0x84] = u16(3)
    mem[0x84:0x8a] = u16(0) + u16(2) + u16(3)
    b += u16(len(mem)) + bytes(mem)
    if two_regions: b += u16(0)
    return b + bytes(ops)

put("split-ring", "chains", ring_seed(False, True, [0, 0x80, 0, 3, 4, 5, 6]))
put("split-ring", "drain", ring_seed(False, True, [4, 3, 9, 0, 0, 4]))
put("split-ring", "adjacent", ring_seed(True, False, [0, 0, 0, 2, 0, 0, 0, 0, 3]))
put("split-ring", "driver", ring_seed(False, True, [10, 1, 0, 0x10, 0, 0x80, 2, 0, 9, 1, 0, 0, 0x80, 3]))

# ---- vhost-user-decode ------------------------------------------------------------------------------------------
def dec(req, payload, fds=0, queues=2):
    return u8(queues - 1) + b"".join(u8(8) for _ in range(queues)) + u8(fds) + u32(req) + u32(1) + u32(len(payload)) + payload
region = lambda g, s, u, o: u64(g) + u64(s) + u64(u) + u64(o)
put("vhost-user-decode", "get-features", dec(1, b""))
put("vhost-user-decode", "set-features", dec(2, u64(1 << 32 | 1 << 30)))
put("vhost-user-decode", "mem-table", dec(5, u32(2) + u32(0) + region(0, 0x10000, 0x7f0000000000, 0) + region(0x10000, 0x1000, 0x7f0010000000, 0), fds=2))
put("vhost-user-decode", "vring-num", dec(8, u32(1) + u32(128)))
put("vhost-user-decode", "vring-addr", dec(9, u32(0) + u32(0) + u64(0x1000) + u64(0x3000) + u64(0x2000) + u64(0)))
put("vhost-user-decode", "vring-kick", dec(12, u64(0), fds=1))
put("vhost-user-decode", "vring-call-nofd", dec(13, u64(0x101)))
put("vhost-user-decode", "get-config", dec(24, u32(0) + u32(8) + u32(0) + bytes(8)))
put("vhost-user-decode", "set-config", dec(25, u32(4) + u32(4) + u32(0) + b"abcd"))
put("vhost-user-decode", "add-mem-reg", dec(37, u64(0) + region(0x20000, 0x1000, 0x7f0020000000, 0x1000), fds=1))
put("vhost-user-decode", "set-status", dec(39, u64(15)))

# ---- gpu-display-decode -----------------------------------------------------------------------------------------
# sel (0x20: a reply), scanout limit - 1, fd count, pending request - 1, then header (request, flags, size), payload.
def gd(req, payload, sel=0, fds=0, pending=0, flags=0):
    return bytes([sel, 0, fds, pending]) + u32(req) + u32(flags) + u32(len(payload)) + payload
put("gpu-display-decode", "cursor-pos", gd(4, u32(0) + u32(10) + u32(20)))
put("gpu-display-decode", "update-2x2", gd(8, u32(0) + u32(1) + u32(2) + u32(2) + u32(2) + bytes(range(16))))
put("gpu-display-decode", "cursor-update", gd(6, u32(0) + u32(1) + u32(2) + u32(3) + u32(4) + bytes(16384)))
put("gpu-display-decode", "scanout", gd(7, u32(0) + u32(800) + u32(600)))
put("gpu-display-decode", "dmabuf-scanout2", gd(12, u32(0) * 3 + u32(4) * 4 + u32(16) + u32(0) + u32(0x34325258) + u64(0), fds=1))
put("gpu-display-decode", "reply-features", gd(1, u64(3), sel=0x20, flags=4))
put("gpu-display-decode", "reply-display-info", gd(3, u32(0x1101) + bytes(20) + u32(0) + u32(0) + u32(1280) + u32(800) + u32(1) + u32(0) + bytes(15 * 24), sel=0x20, pending=2, flags=4))
put("gpu-display-decode", "reply-edid", gd(11, u32(0x1104) + bytes(20) + u32(128) + u32(0) + bytes(1024), sel=0x20, pending=10, flags=4))

# ---- vhost-user-server ------------------------------------------------------------------------------------------
# op % 16 in 0...9: a request: request index into VhostUserRequest.allCases (declaration order), ring (0-2), fields.
REQ = [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40]
ri = lambda r: REQ.index(r)
def msg(req, *fields, op=0): return bytes([op, ri(req)]) + b"".join(fields)

def handshake(features):
  return (
    msg(1, u8(0)) +                                     # GET_FEATURES
    msg(15, u8(0)) +                                    # GET_PROTOCOL_FEATURES
    msg(2, u8(0), u8(features)) +                       # SET_FEATURES: bits 28.. from the low nibble, 32, 0
    msg(16, u8(0), u8(1)) +                             # SET_PROTOCOL_FEATURES: the offered set
    msg(5, u8(0), u8(0), u8(1), u8(2)) +                # SET_MEM_TABLE: 1 region, memfd 1 (16 KiB) whole, guest 0
    msg(8, u8(0), u8(3)) +                              # SET_VRING_NUM 0: 8
    msg(9, u8(0), u8(1), u16(0), u16(0x200), u16(0x200)) +   # SET_VRING_ADDR 0 in memfd 1
    msg(10, u8(0), u8(0)) +                             # SET_VRING_BASE 0: 0
    msg(13, u8(0), u8(0xff)) +                          # SET_VRING_CALL 0 (eventfd)
    msg(12, u8(0), u8(0xff)) +                          # SET_VRING_KICK 0 (eventfd): rings start
    msg(18, u8(0), u8(1)) +                             # SET_VRING_ENABLE 0: 1
    bytes([13, 0, 0]) + u16(0x100) + u16(64) + u8(2) + u8(0) +   # driver: a writable chain, kick
    bytes([13, 0, 1]) + u16(0x110) + u16(16) + u8(0) + u8(0) +
    msg(11, u8(0), u8(0)) +                              # GET_VRING_BASE 0
    msg(24, u8(0), u8(0), u8(8), u8(0), bytes(8), op=0x10) +      # GET_CONFIG
    msg(34, u8(0))                                      # RESET_DEVICE
)
put("vhost-user-server", "handshake", handshake(0x37))        # eventIdx, indirect, protocol features
put("vhost-user-server", "handshake-noproto", handshake(0x33))
put("vhost-user-server", "mem-reg", msg(16, u8(0), u8(1)) + msg(37, u8(0), u8(0), u8(2)) + msg(36, u8(0)) + msg(38, u8(0), u8(0), u8(2)))
put("vhost-user-server", "raw", bytes([10, 24]) + u32(1) + u32(1) + u32(8) + u64(0) + bytes([10, 12]) + u32(3) + u32(9) + u32(4096))

# ---- config -----------------------------------------------------------------------------------------------------
put("config", "rng", b'[daemon]\ntransport = "sim"\nlog-level = "info"\n\n[device.rng0]\ntype = "rng"\n')
put("config", "blk", b'# comment\n[daemon]\ntransport = "virtio-lo"\npoll-us = 50\n\n[device.disk]\ntype = "blk"\npath = "/var/lib/disk.img"\nqueues = 2\nqueue-size = 128\ncreate-mib = 64\nreadonly = false\n')
put("config", "serve", b'[daemon]\ntransport = "none"\n[device."r-1"]\ntype = "rng"\nserve = "/run/rng.sock"\nsource = \'/dev/hwrng\'\n')
put("config", "vhost", b'[device.v]\ntype = "blk"\nbackend = "vhost-user:/run/blk.sock"\nreconnect = "reset"\n')
put("config", "values", b'[a]\nx = [1, 0x1f, 0o7, 0b1, -5, +3, 1_000]\ny = ["s\\u00e9\\n", \'lit\']\nz = true\n[a."b c"]\nq = []\n')

# ---- kernel-link ------------------------------------------------------------------------------------------------
put("kernel-link", "iomem", u8(0) + b"00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n000a0000-000bffff : PCI Bus 0000:00\n00100000-bffdffff : System RAM\n  01000000-01ffffff : Kernel code\n100000000-23fffffff : System RAM\n")
put("kernel-link", "ramlist", u8(1) + u32(3) + u32(3) + u16(64) + u64(0x1000) + u64(0x9f000) + u64(0x100000) + u64(0xbfee0000))
put("kernel-link", "queues", u8(2) + u8(1) + u8(8) + u8(8) + u8(1) + u8(8) + u64(0x10000) + u64(0x10800) + u64(0x11000) + u8(0x40) + u64(0) + u64(0) + u64(0) + u32(0) + u32(1) + u64(0))

# ---- console-control --------------------------------------------------------------------------------------------
# The harness reads a stream of values (Fuzz/console-control/ConsoleControlFuzz.swift); below(n) takes one byte for
# n <= 256 and four otherwise; most choices take the common case on a byte below 200.
B = lambda *v: bytes(x & 0xff for x in v)
def con_port(console, name_kind, long_name=0, room=None, connected=True, size=None):
    # name_kind 0: none, 1-2: "portN", 3: 100 + long_name bytes; size: (cols, rows) of a terminal
    return (B(0 if console else 200, name_kind) + (B(long_name) if name_kind == 3 else b"") +
            (B(0) if room is None else B(255, room)) + B(0 if connected else 255) +
            (B(255) if size is None else B(0) + u32(size[0]) + B(size[1])))
def con_activate(queues, multiport=True, size=True, emerg=True):
    return B(1, 0, 1 if size else 0, 0 if multiport else 255, 1 if emerg else 0, 255) + bytes(queues)
def con_op(op, *args, port=0): return B(0, port, op) + b"".join(args)
con_ctl = lambda id, ev, value, ln=8: con_op(0, B(0, id, 0, ev, 0, value) + (B(0) if ln == 8 else B(255, ln)) + B(255) + (B(0) if ln else b"") + (B(255) if ln else b""))
con_cbufs = lambda n, size=64: con_op(3, B(n - 1) + B(0, size - 8, 255, 0, 255) * n)
con_rx = lambda port, n, size=100: con_op(4, B(n - 1) + (B(255, 0) + u32(size - 1) + B(0, 255)) * n, port=port)
con_tx = lambda port, size: con_op(6, B(0) + u32(size - 1) + B(0, 255, 255), port=port)
con_feed = lambda port, n: con_op(8, B(0, n - 1), port=port)
con_room = lambda port: con_op(9, B(0), port=port)
con_toggle = lambda port: con_op(10, port=port)
con_handshake = lambda nports: con_op(15, B(0, 56, 255, 0, 255) * 4 + B(0, 255) + (B(0, 56, 255, 0, 255) * 2 + B(0, 255) * 2) * nports)
# Port 0 (console, connected) and port 3 (named "port3"), 10 queues of 16.
two_ports = B(0, 1, 3) + con_port(True, 0) + con_port(False, 1)
put("console-control", "handshake-data", two_ports + con_activate([0] * 10) + con_handshake(2) +
    con_rx(0, 2) + con_rx(1, 2) + con_feed(0, 150) + con_feed(1, 50) + con_tx(0, 300) + con_tx(1, 40) +
    con_toggle(1) + con_tx(1, 20) + con_cbufs(2) + con_toggle(1) + con_room(1) +
    con_op(14, B(8, 0, 0x41)) + con_op(12) + con_op(13, B(0, 255) + con_activate([0] * 10)) + con_handshake(2))
put("console-control", "single-port", B(0, 0) + con_port(True, 0) + con_activate([0] * 2, multiport=False) +
    con_rx(0, 3, 40) + con_feed(0, 100) + con_tx(0, 200) + con_toggle(0) + con_tx(0, 30) + con_toggle(0) +
    con_feed(0, 10) + con_rx(0, 1) + con_op(13, B(0, 255) + con_activate([0] * 2, multiport=False)) + con_rx(0, 1))
put("console-control", "bogus-control", two_ports + con_activate([0] * 10) + con_cbufs(3, 8) + con_ctl(0, 1, 1) +
    con_ctl(0, 0, 1) + con_ctl(9, 3, 1) + con_ctl(1, 3, 1) + con_ctl(3, 3, 2) + con_ctl(3, 42, 1) + con_ctl(3, 3, 1, 5) +
    con_ctl(3, 3, 1) + con_ctl(3, 6, 1) + con_ctl(0, 3, 0) + con_cbufs(1, 9) + con_ctl(3, 6, 0))
put("console-control", "slow-reader", B(0, 0) + con_port(True, 3, long_name=40, room=5, size=(80, 24)) + con_activate([0] * 4) +
    con_handshake(1) + con_tx(0, 500) + con_tx(0, 500) + con_rx(0, 2) + con_feed(0, 30) + con_room(0) + con_feed(0, 30))

# ---- input-event ------------------------------------------------------------------------------------------------
# Fuzz/input-event/InputEventFuzz.swift: capabilities (255: the fake keyboard+touch), ring size, queue sizes, ops.
def inp_ring(ring=None, q0=None):   # ring: the device's event ring (8..71; None: 1024); q0: eventq size 1, 2, 4, 8 (None: 16)
    return (B(255) if ring is None else B(0, ring - 8)) + B(0, 0) + (B(0) if q0 is None else B(250, [1, 2, 4, 8].index(q0))) + B(0)
inp_head = lambda ring=None, q0=None: B(255) + inp_ring(ring, q0)
def inp_caps(name, codes, axes, props):
    # fuzzed capabilities: name of "x"/NUL/"é"/"Z" (indices), no serial, ids, (type, code) bits, (axis, min, max) axes
    return (B(0, len(name)) + bytes(name) + B(0) + u16(3) + u16(0x1234) + u16(0x5678) + u16(1) +
            B(len(codes)) + b"".join(B(t) + u32(c) for t, c in codes) +
            B(len(axes)) + b"".join(B(a) + u32(lo) + u32(hi) + B(1, 2, 3) for a, lo, hi in axes) +
            B(len(props)) + bytes(props))
inp_bufs = lambda n: B(0, n - 1) + B(255, 0, 0, 255) * n
def inp_burst(evs, syn_end=True):
    # evs: list of (type index into KEY ABS REL MSC SYN, code) or "syn"; the last is SYN_REPORT when syn_end.
    out = B(4, 0, len(evs) - 1, 0 if syn_end else 255)
    for i, e in enumerate(evs):
        if i == len(evs) - 1 and syn_end: break
        out += B(0) if e == "syn" else B(255, 0, e[0], e[1])
    return out
inp_status = lambda tidx, code, value=1: B(3, 0, tidx, 0, code) + u32(value) + B(0, 0, 255, 255)
inp_cfg = lambda sel_idx, sub: B(8, 0, 0, 1, 0, sel_idx, 0, sub, 0, 7)
key_group = [(0, 30), (0, 48), "syn"]
put("input-event", "groups", inp_head() + inp_bufs(6) + inp_burst(key_group) + inp_burst([(1, 0), (1, 1), (3, 4), "syn"]) +
    inp_bufs(4) + inp_cfg(0, 0) + inp_cfg(4, 1) + inp_cfg(5, 0x35) + inp_status(0, 1) + inp_burst([(0, 30), "syn"]) +
    B(9) + B(10, 0) + B(0, 0) + inp_bufs(3) + inp_burst(key_group))
put("input-event", "ring-full", inp_head(ring=8) + inp_burst([(0, 1)] * 5 + ["syn"]) + inp_burst([(1, 0)] * 3 + ["syn"]) +
    inp_burst([(0, 2)] * 9, syn_end=False) + inp_bufs(6) + inp_bufs(6) + inp_burst(["syn"]) + B(7) + inp_bufs(2) + B(7))
put("input-event", "long-group", inp_head(q0=4) + inp_bufs(2) + inp_burst([(0, 5)] * 9 + ["syn"]) + inp_bufs(4) +
    inp_bufs(4) + inp_bufs(4) + inp_burst([(2, 0), "syn"]))
put("input-event", "caps-config", inp_caps([0] * 130 + [2, 1, 3], [(1, 1), (1, 1023), (0x11, 0), (0x11, 1), (2, 0), (0x15, 0x50)],
                                         [(0, 0, 100), (0x35, 0xffffffff, 7), (0x3f, 1, 2), (0x40, 1, 2)], [0, 5]) +
    inp_ring() + inp_cfg(0, 0) + inp_cfg(1, 0) + inp_cfg(2, 0) + inp_cfg(4, 1) + inp_cfg(4, 0x11) + inp_cfg(4, 0x15) +
    inp_cfg(5, 0) + inp_cfg(5, 0x35) + inp_cfg(5, 0x3f) + inp_cfg(5, 0x40) + inp_cfg(3, 0) + inp_status(0, 1) +
    inp_status(2, 0x50) + inp_status(0, 7))
