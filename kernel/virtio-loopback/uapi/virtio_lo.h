/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * virtio_lo.h - user-space ABI of the virtio-loopback ("virtio-lo") transport.
 *
 * A process opens /dev/virtio-lo and becomes the *device* side of one or
 * more virtio devices; the Linux virtio drivers (virtio_blk, virtio-rng, ...)
 * bind to them as to any other transport.  The kernel keeps the transport
 * state (status, features, config, split vrings).  User space learns the ring
 * physical addresses from ADDDEV, maps RAM with mmap(offset = physical
 * address), is told of driver kicks through per-queue eventfds and raises
 * used-buffer interrupts with VIRTIO_LO_KICK (or an interrupt eventfd, see
 * VIRTIO_LO_SET_IRQFD).
 *
 * The first five ioctls are binary compatible with the unified-hmi virtio-lo
 * driver (LP64 layout; 32-bit user space is not supported).  Everything
 * numbered 0x40 and up is an extension; the upstream driver answers those
 * with EINVAL (it answers ENOTTY only for other ioctl types; accept both),
 * so probe with VIRTIO_LO_GETEXT first.  On upstream, remove devices by
 * closing the fd, not with DELDEV: upstream's DELDEV (up to 2025) tears the
 * device down while holding a spinlock (kernel BUG, then a hang).
 *
 * Only <linux/types.h> and <linux/ioctl.h> are needed.
 */
#ifndef _UAPI_LINUX_VIRTIO_LO_H
#define _UAPI_LINUX_VIRTIO_LO_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define VIRTIO_LO_DEVICE_NODE "/dev/virtio-lo"

/* Limits enforced by this implementation (reported by VIRTIO_LO_GETEXT). */
#define VIRTIO_LO_MAX_QUEUES       64
#define VIRTIO_LO_MAX_QUEUE_SIZE   32768 /* queue sizes must be powers of two */
#define VIRTIO_LO_MAX_CONFIG_SIZE  4096

/*
 * Per-queue information, an array of devinfo.nqueues entries (32 bytes each).
 *  kickfd  IN   eventfd the kernel signals when the driver notifies this
 *               queue; -1 = none.
 *  size    IN   maximum ring size (power of two, 1..32768; anything else is
 *               rejected with EINVAL);  OUT  actual size (0 if the driver did
 *               not set up this queue).
 *  desc, avail, used  OUT  physical addresses of the split ring parts
 *               (desc is page aligned, avail = desc + 16*size, used is on the
 *               next page boundary).  0 if the queue was not set up.
 */
struct virtio_lo_qinfo {
	__s32 kickfd;
	__u32 size;
	__u64 desc;
	__u64 avail;
	__u64 used;
};

/*
 * VIRTIO_LO_ADDDEV argument (56 bytes).
 *  idx          OUT  device index, used by every other ioctl.
 *  device_id    IN   virtio device id (any non-zero id binds: 2 blk, 3 console,
 *                    4 rng, 18 input, 41 gpio, ...).
 *  vendor_id    IN   virtio vendor id.
 *  nqueues      IN   1..VIRTIO_LO_MAX_QUEUES.
 *  features     IN   device features; OUT features the driver accepted.
 *                    VIRTIO_F_RING_PACKED (34), VIRTIO_F_ACCESS_PLATFORM (33)
 *                    and VIRTIO_F_RING_RESET (40) are never offered.
 *  config_size  IN   0..VIRTIO_LO_MAX_CONFIG_SIZE.
 *  config_kick  IN   eventfd signalled when the driver writes config space
 *                    (and, extension DEVSTATUS, when the driver status
 *                    changes: reset, DRIVER_OK, FAILED); -1 = none.
 *  pool_kib     IN   extension RESTRICTED, with VIRTIO_LO_DEV_F_RESTRICTED:
 *                    KiB of the device's pool for buffers, beyond its rings
 *                    (0 = the module's default, parameter pool_kib); must be 0
 *                    without the flag.
 *  flags        IN   extension SYNC_CONFIG: VIRTIO_LO_DEV_F_* (below);
 *                    unknown bits are rejected with EINVAL.  Upstream calls
 *                    this field "padding" and ignores it (so does this module
 *                    with upstream_abi=1): set it only after GETEXT reported
 *                    VIRTIO_LO_EXT_SYNC_CONFIG, and zero it otherwise.
 *  config       IN   initial config (config_size bytes, NULL = zeros);
 *               OUT  config after the driver probed.
 *  qinfo        IN/OUT  array of nqueues struct virtio_lo_qinfo.
 * Returns once the driver has set DRIVER_OK.  ENOENT: no driver bound within
 * the probe timeout, or the driver's probe failed; the device is then gone.
 */
struct virtio_lo_devinfo {
	__u32 idx;
	__u32 device_id;
	__u32 vendor_id;
	__u32 nqueues;
	__u64 features;
	__u32 config_size;
	__s32 config_kick;
	__u32 flags;            /* upstream: padding */
	__u32 pool_kib;         /* RESTRICTED: buffer room; upstream: hole */
	__u8 *config;
	struct virtio_lo_qinfo *qinfo;
};

/* GCONF/SCONF argument (24 bytes): config[offset, offset+len) <-> *config. */
struct virtio_lo_config {
	__u32 idx;
	__u32 offset;
	__u32 len;
	__u32 __hole;
	__u8 *config;
};

/* KICK argument (8 bytes): used-buffer interrupt on queue qidx, -1 = all. */
struct virtio_lo_kick {
	__u32 idx;
	__s32 qidx;
};

#define VIRTIO_LO_ADDDEV _IOWR('P', 1, struct virtio_lo_devinfo)   /* 0xC0385001 */
/* DELDEV: the device index is the ioctl argument itself (by value). */
#define VIRTIO_LO_DELDEV _IOW('P', 2, unsigned int)                /* 0x40045002 */
#define VIRTIO_LO_GCONF  _IOR('P', 20, struct virtio_lo_config)    /* 0x80185014 */
/* SCONF also bumps the config generation and raises a config interrupt. */
#define VIRTIO_LO_SCONF  _IOW('P', 21, struct virtio_lo_config)    /* 0x40185015 */
/* KICK: the number encodes sizeof(struct virtio_lo_config) (upstream quirk),
 * the argument is a struct virtio_lo_kick. */
#define VIRTIO_LO_KICK   _IOW('P', 30, struct virtio_lo_config)    /* 0x4018501E */

/* ------------------------------------------------------------------------
 * Extensions.
 * ------------------------------------------------------------------------ */

#define VIRTIO_LO_ABI_VERSION 1

/* VIRTIO_LO_SET_IRQFD / VIRTIO_LO_KICK with qidx -1 */
#define VIRTIO_LO_EXT_IRQFD          (1ULL << 0)
/* VIRTIO_LO_GET_RAM */
#define VIRTIO_LO_EXT_RAMLIST        (1ULL << 1)
/* VIRTIO_LO_DEVSTATUS, config_kick signalled on status changes */
#define VIRTIO_LO_EXT_DEVSTATUS      (1ULL << 2)
/* VIRTIO_LO_GET_QUEUE */
#define VIRTIO_LO_EXT_GETQUEUE       (1ULL << 3)
/* mmap() is restricted to System RAM (module parameter mmap_ram_only) */
#define VIRTIO_LO_EXT_MMAP_RAM_ONLY  (1ULL << 4)
/* DELDEV/close/owner death fail the driver's in-flight requests */
#define VIRTIO_LO_EXT_ABORT_INFLIGHT (1ULL << 5)
/* KICK with qidx == -1 interrupts every queue */
#define VIRTIO_LO_EXT_KICK_ALL       (1ULL << 6)
/* ADDDEV flag VIRTIO_LO_DEV_F_SYNC_CONFIG, VIRTIO_LO_CFG_GET, VIRTIO_LO_CFG_ACK */
#define VIRTIO_LO_EXT_SYNC_CONFIG    (1ULL << 7)

/* ADDDEV flag VIRTIO_LO_DEV_F_RESTRICTED, VIRTIO_LO_GET_POOL, VIRTIO_LO_RESTRICT */
#define VIRTIO_LO_EXT_RESTRICTED     (1ULL << 8)

/*
 * Memory hot-plug: RAM mappings follow the memory's online state.  A memory block going offline or online is
 * unmapped from every RAM mapping (its pages are mapped again on the next access: the real page while the block is
 * online, a scratch page while it is not, never SIGBUS), and GET_RAM lists hot-added RAM, so user space re-reads
 * GET_RAM and maps the new range when a driver's buffer lies outside what it mapped.
 */
#define VIRTIO_LO_EXT_RAM_HOTPLUG    (1ULL << 9)

/* VIRTIO_LO_GETEXT (24 bytes, all OUT). */
struct virtio_lo_ext {
	__u32 version;          /* VIRTIO_LO_ABI_VERSION */
	__u32 max_queues;
	__u32 max_queue_size;
	__u32 max_config_size;
	__u64 extensions;       /* VIRTIO_LO_EXT_* */
};
#define VIRTIO_LO_GETEXT _IOR('P', 0x40, struct virtio_lo_ext)      /* 0x80185040 */

/*
 * VIRTIO_LO_SET_IRQFD (16 bytes, IN): interrupt eventfd for queue (idx, qidx).
 * The kernel watches fd (like KVM's irqfd); every signal drains the counter
 * and runs the queue's used-buffer interrupt, exactly as VIRTIO_LO_KICK would,
 * so a vhost-user back-end's call eventfd can be handed over directly.
 * fd = -1 removes the queue's irqfd.  Replaces any previous one.
 * Errors: EINVAL (bad idx/qidx, fd not an eventfd, flags != 0), EBADF.
 */
struct virtio_lo_irqfd {
	__u32 idx;
	__u32 qidx;
	__s32 fd;
	__u32 flags;            /* must be 0 */
};
#define VIRTIO_LO_SET_IRQFD _IOW('P', 0x41, struct virtio_lo_irqfd) /* 0x40105041 */

/*
 * VIRTIO_LO_GET_RAM (16 bytes, IN/OUT): the "System RAM" ranges, each rounded
 * inwards to whole pages, i.e. exactly what mmap() accepts.
 *  count   IN capacity of *ranges;  OUT number of entries written.
 *  total   OUT number of ranges that exist (call again if total > count).
 *  ranges  IN user pointer to an array of struct virtio_lo_mem_range.
 */
struct virtio_lo_mem_range {
	__u64 start;            /* physical address, page aligned */
	__u64 size;             /* bytes, multiple of the page size */
};
struct virtio_lo_ramlist {
	__u32 count;
	__u32 total;
	__u64 ranges;           /* (struct virtio_lo_mem_range *) as integer */
};
#define VIRTIO_LO_GET_RAM _IOWR('P', 0x42, struct virtio_lo_ramlist) /* 0xC0105042 */

/*
 * VIRTIO_LO_DEVSTATUS (32 bytes, IN/OUT): driver-side state of device idx,
 * optionally signalling a device error.
 *  flags        IN  VIRTIO_LO_STATUS_F_* below (0 = query only).
 *  status       OUT driver status byte (ACKNOWLEDGE 1, DRIVER 2, DRIVER_OK 4,
 *                   FEATURES_OK 8, DEVICE_NEEDS_RESET 0x40, FAILED 0x80).
 *  reset_count  OUT number of driver-initiated resets since ADDDEV
 *                   (a change means the rings were re-created: re-read them
 *                   with VIRTIO_LO_GET_QUEUE once status has DRIVER_OK).
 *  features     OUT features the driver accepted.
 *  generation   OUT config generation.
 * config_kick (ADDDEV) is signalled whenever status changes.
 */
#define VIRTIO_LO_STATUS_F_NEEDS_RESET (1U << 0) /* set NEEDS_RESET (0x40), config interrupt */
#define VIRTIO_LO_STATUS_F_BREAK       (1U << 1) /* also mark all queues broken (virtio_break_device) */
struct virtio_lo_devstatus {
	__u32 idx;
	__u32 flags;
	__u32 status;
	__u32 reset_count;
	__u64 features;
	__u32 generation;
	__u32 reserved;
};
#define VIRTIO_LO_DEVSTATUS _IOWR('P', 0x43, struct virtio_lo_devstatus) /* 0xC0205043 */

/*
 * VIRTIO_LO_GET_QUEUE (40 bytes, IN idx/qidx, OUT the rest): current ring of
 * one queue, e.g. after a driver reset re-created it.
 *  flags OUT VIRTIO_LO_QUEUE_F_ACTIVE when the driver has the queue set up.
 */
#define VIRTIO_LO_QUEUE_F_ACTIVE (1U << 0)
struct virtio_lo_queue {
	__u32 idx;
	__u32 qidx;
	__u32 size;
	__u32 flags;
	__u64 desc;
	__u64 avail;
	__u64 used;
};
#define VIRTIO_LO_GET_QUEUE _IOWR('P', 0x44, struct virtio_lo_queue) /* 0xC0285044 */

/*
 * Synchronous config writes (extension SYNC_CONFIG), for devices whose config
 * reads depend on config writes (virtio-input: the driver writes select and
 * subsel, then reads size and the union at once).
 *
 * A device added with VIRTIO_LO_DEV_F_SYNC_CONFIG (which needs a config_kick
 * eventfd, not shared with another such device of the same open file) handles
 * each driver config write like this: the module applies it to its config
 * copy, records it (sequence number, offset, bytes), signals config_kick and
 * waits until user space acks that sequence number with VIRTIO_LO_CFG_ACK,
 * which also stores the device's resulting config into the module's copy; the
 * driver's next config read sees it.  The wait is killable and bounded by the
 * module parameter sync_config_timeout_ms (default 1000): on timeout the driver
 * goes on with the module's copy (logged once per device) and the write stays
 * pending until user space fetches it or the driver's next write replaces it.
 * It ends at once when the device is removed or its owner goes (DELDEV,
 * close, process killed).  Writes from atomic context (a driver's
 * config_changed callback runs under a spinlock) and writes while the device
 * is being removed stay asynchronous: the config copy is updated and
 * config_kick signalled, nothing is recorded (user space sees them with GCONF,
 * as without the flag).
 *
 * Both ioctls name the device by its config_kick eventfd (fd), not by idx:
 * the driver's probe writes config while ADDDEV is still blocked (it returns
 * at DRIVER_OK), before user space knows idx.
 *
 * VIRTIO_LO_CFG_GET (24 bytes, IN/OUT): the pending write.
 *  fd      IN   the device's config_kick eventfd.
 *  seq     OUT  its sequence number (never 0); 0 = no write pending.
 *  offset  OUT  config offset written.
 *  len     IN   capacity of *data;  OUT  bytes written by the driver (if
 *               larger than the capacity, only the capacity is copied: call
 *               again with a buffer of config_size bytes).
 *  data    IN   user pointer (as integer) receiving the written bytes.
 * VIRTIO_LO_CFG_ACK (24 bytes, IN): the write seq is applied to the device;
 * config[offset, offset+len) := *data (the device's config after the write;
 * len 0 = unchanged), then the driver resumes.  Does not raise a config
 * interrupt.
 * Errors: EBADF (fd), EINVAL (not an eventfd, range outside config_size),
 * ENODEV (no live SYNC_CONFIG device of this open file has this eventfd),
 * ESTALE (ACK: seq is not the pending write; nothing stored), EFAULT.
 */
#define VIRTIO_LO_DEV_F_SYNC_CONFIG (1U << 0)
struct virtio_lo_cfgwrite {
	__s32 fd;
	__u32 seq;
	__u32 offset;
	__u32 len;
	__u64 data;             /* (__u8 *) as integer */
};
#define VIRTIO_LO_CFG_GET _IOWR('P', 0x45, struct virtio_lo_cfgwrite) /* 0xC0185045 */
#define VIRTIO_LO_CFG_ACK _IOW('P', 0x46, struct virtio_lo_cfgwrite)  /* 0x40185046 */

/*
 * Restricted memory (extension RESTRICTED).
 *
 * A device added with VIRTIO_LO_DEV_F_RESTRICTED offers VIRTIO_F_ACCESS_PLATFORM
 * (virtio 1.2 section 6.1: the device accesses memory through the platform's
 * translation), which its driver always accepts (the virtio core keeps that
 * transport bit), so virtio_ring maps every buffer through the DMA API.  The
 * module gives the device DMA operations that bounce through a pool of its own
 * (pool_kib of buffer room plus its rings), zeroed on every allocation: a
 * device-readable buffer is copied in at map time (exactly its length), a
 * device-writable one out at unmap time (exactly the mapped length; a partial
 * sync copies only that part of the mapping).  Ring and descriptor addresses
 * are then pool addresses (IOVAs): VIRTIO_LO_POOL_IOVA + offset in the pool,
 * the same for every device (each device has its own pool).  The device never
 * sees a kernel address, and user space maps the pool, nothing else:
 *
 * VIRTIO_LO_GET_POOL (32 bytes, IN idx, OUT the rest): where device idx's pool
 * is.  mmap(MAP_SHARED, offset = mmap_offset, length <= size) maps it from
 * IOVA iova (a page-aligned offset into the pool maps from there on).  Errors:
 * ENODEV (no such device), EINVAL (not restricted).
 *
 * VIRTIO_LO_RESTRICT (no argument): from now on this open file may map pools
 * only: mmap() of anything else fails with EPERM, ADDDEV without
 * VIRTIO_LO_DEV_F_RESTRICTED and GET_RAM fail with EPERM.  One-way.  The
 * module parameter restricted_only=1 makes every open file start so.
 */
#define VIRTIO_LO_DEV_F_RESTRICTED  (1U << 1)
#define VIRTIO_LO_POOL_IOVA         0x10000000000ULL    /* 1 TiB */
#define VIRTIO_LO_POOL_MMAP_BASE    (1ULL << 60)
#define VIRTIO_LO_POOL_MMAP_SHIFT   32                  /* offset = base + (idx << shift) */
#define VIRTIO_LO_POOL_MAX_KIB      (1U << 20)          /* 1 GiB of buffers */
struct virtio_lo_pool {
	__u32 idx;
	__u32 flags;            /* OUT 0 */
	__u64 iova;
	__u64 size;             /* bytes, page multiple */
	__u64 mmap_offset;
};
#define VIRTIO_LO_GET_POOL  _IOWR('P', 0x47, struct virtio_lo_pool) /* 0xC0205047 */
#define VIRTIO_LO_RESTRICT  _IO('P', 0x48)                          /* 0x00005048 */

#endif /* _UAPI_LINUX_VIRTIO_LO_H */
