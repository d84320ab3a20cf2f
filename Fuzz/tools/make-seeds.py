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
