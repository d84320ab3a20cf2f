// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-loopback: a virtio transport whose devices are implemented by a
 * user-space process through /dev/virtio-lo.  ABI compatible with the
 * unified-hmi "virtio-lo" driver; see uapi/virtio_lo.h for the ABI and the
 * extensions.
 *
 * Design notes
 *  - Every open() is an owner holding any number of devices (an IDR).
 *  - A device is a struct virtio_device registered directly on the virtio
 *    bus under the root device /sys/devices/virtio-lo, so any device id binds.
 *  - Registration (and so the driver's probe) runs in a work item: drivers
 *    such as virtio_blk do I/O in probe after DRIVER_OK, which only the
 *    user-space device (blocked in ADDDEV until DRIVER_OK) can serve.
 *  - Split rings are allocated here (physically contiguous), handed to
 *    vring_new_virtqueue() and only freed when no user mapping of this file
 *    remains (or at release()).
 *  - Every queue tracks which descriptor heads the driver has outstanding
 *    (avail entries seen minus used entries seen).  When a device is torn
 *    down (DELDEV, close, owner killed) the module becomes a failing device:
 *    it completes every outstanding request itself (len 0, virtio-blk status
 *    IOERR, virtio-i2c status ERR), on every later notify too, until the
 *    driver's remove() has reset the device.  So remove paths that wait for
 *    in-flight I/O (e.g. virtio_blk's del_gendisk) never hang.  Receive
 *    buffers (device-writable-only chains) stay with the driver: see
 *    vlo_fail_inflight().
 *  - Used-buffer interrupts (KICK ioctl, irqfd work, teardown) are
 *    serialised per device by irq_lock and run with interrupts disabled,
 *    like a hard interrupt handler.
 *  - Config reads are answered from the module's copy of the config space.
 *    Driver config writes update it and signal config_kick; for a device
 *    added with VIRTIO_LO_DEV_F_SYNC_CONFIG a write from process context is
 *    also recorded and the writer sleeps (killable, bounded) until user space
 *    has applied it to its device and stored the resulting config
 *    (CFG_GET/CFG_ACK, which name the device by its config eventfd: the
 *    driver's probe writes config while ADDDEV is still blocked).
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/version.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/file.h>
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/idr.h>
#include <linux/ioport.h>
#include <linux/eventfd.h>
#include <linux/poll.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <linux/kref.h>
#include <linux/log2.h>
#include <linux/uaccess.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_ids.h>
#include <linux/virtio_blk.h>
#include <linux/io.h>
#include <linux/rcupdate.h>
#include <linux/delay.h>
#include <linux/bitmap.h>
#include <linux/dma-mapping.h>
#include <linux/dma-map-ops.h>
#include <linux/scatterlist.h>
#include <linux/memory.h>
#include <linux/memory_hotplug.h>

#include "uapi/virtio_lo.h"

static unsigned int probe_timeout_ms = 3000;
module_param(probe_timeout_ms, uint, 0644);
MODULE_PARM_DESC(probe_timeout_ms, "ADDDEV: how long to wait for a driver to reach DRIVER_OK");

static unsigned int sync_config_timeout_ms = 1000;
module_param(sync_config_timeout_ms, uint, 0644);
MODULE_PARM_DESC(sync_config_timeout_ms, "SYNC_CONFIG devices: how long a driver config write waits for user space");

static bool mmap_ram_only = true;
module_param(mmap_ram_only, bool, 0644);
MODULE_PARM_DESC(mmap_ram_only, "Only allow mmap() of System RAM");

static unsigned int pool_kib = 4096;
module_param(pool_kib, uint, 0644);
MODULE_PARM_DESC(pool_kib, "Restricted devices: default KiB of buffer room in each device's pool (beyond its rings)");

static bool restricted_only;
module_param(restricted_only, bool, 0644);
MODULE_PARM_DESC(restricted_only, "Every open file may map device pools only (as after VIRTIO_LO_RESTRICT)");

/* set_dma_ops(): CONFIG_DMA_OPS up to 6.11, CONFIG_ARCH_HAS_DMA_OPS from 6.12. */
#if defined(CONFIG_DMA_OPS) || defined(CONFIG_ARCH_HAS_DMA_OPS)
#define VLO_HAVE_POOL 1
#else
#define VLO_HAVE_POOL 0
#endif

/*
 * Test aid: behave like the upstream unified-hmi virtio-lo driver on its ABI
 * surface, so user space can be tested against it without that driver.
 * Upstream answers every 'P' ioctl other than its five with EINVAL (ENOTTY
 * for other ioctl types) and rejects KICK with qidx -1 (signed/unsigned
 * comparison).  Its DELDEV (up to 2025) tears the device down while holding
 * a spinlock ("scheduling while atomic", then a hang); that is not emulated,
 * DELDEV is only counted in deldev_calls and logged, so a test can check
 * that user space which knows it is on upstream never calls it.
 */
static bool upstream_abi;
module_param(upstream_abi, bool, 0444);
MODULE_PARM_DESC(upstream_abi, "Emulate the upstream virtio-lo ABI surface: extension ioctls fail with EINVAL (test aid)");

static atomic_t vlo_deldev_calls = ATOMIC_INIT(0);

static int vlo_deldev_calls_get(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%d\n", atomic_read(&vlo_deldev_calls));
}

static const struct kernel_param_ops vlo_deldev_calls_ops = {
	.get = vlo_deldev_calls_get,
};
module_param_cb(deldev_calls, &vlo_deldev_calls_ops, NULL, 0444);
MODULE_PARM_DESC(deldev_calls, "Number of DELDEV ioctls since the module was loaded (read-only)");

/* Features this transport never offers. */
#define VLO_MASKED_FEATURES (BIT_ULL(VIRTIO_F_RING_PACKED) | \
			     BIT_ULL(VIRTIO_F_ACCESS_PLATFORM) | \
			     BIT_ULL(VIRTIO_F_RING_RESET))

#define VLO_MAX_RAM_RANGES 1024

static struct device *vlo_root;
static struct device_dma_parameters vlo_dma_parms;
static struct workqueue_struct *vlo_wq;

struct vlo_owner {
	bool restricted;		/* VIRTIO_LO_RESTRICT: pools only (one-way) */
	struct list_head node;		/* vlo_owners */
	struct address_space *mapping;	/* its file's: where its RAM mappings are found to be unmapped */
	spinlock_t idr_lock;		/* devs and sync_devs */
	struct idr devs;
	struct list_head sync_devs;	/* SYNC_CONFIG devices, from ADDDEV to teardown */
	spinlock_t grave_lock;		/* graveyard and nmaps */
	struct list_head grave;		/* struct vlo_ring waiting for munmap */
	unsigned int nmaps;
};

struct vlo_pool;

struct vlo_ring {
	struct list_head node;
	void *mem;
	size_t bytes;
	struct vlo_pool *pool;		/* restricted: mem is pool memory at offset off */
	unsigned long off;
};

/*
 * Restricted memory: a per-device pool (vmalloc_user, so it can be mapped to user space page by page) handed out
 * in 256-byte units.  Everything the device may touch is in it: the rings and a bounce copy of every buffer the
 * driver maps.  Book-keeping lives outside the pool (the device writes the pool at will): a bitmap of used units,
 * one of the first units of allocations, and per first unit what it bounces (original physical address, length,
 * direction).
 */
#define VLO_UNIT_SHIFT	8
#define VLO_UNIT	(1UL << VLO_UNIT_SHIFT)
#define VLO_MAX_MAP	(256 * 1024)	/* max_mapping_size: one segment */

struct vlo_bounce {
	phys_addr_t orig;		/* 0: a ring or coherent allocation, nothing to copy */
	u32 len;
	u8 dir;
};

struct vlo_pool {
	struct kref ref;		/* the device, each mapping of it */
	void *va;
	size_t size;
	unsigned long nunits;
	spinlock_t lock;
	unsigned long *used;
	unsigned long *starts;
	struct vlo_bounce *meta;
	unsigned long hint;
	bool full_warned;
	bool bad_warned;
};

/* The virtio device's parent when restricted: the struct device the DMA operations belong to. */
struct vlo_pdev {
	struct device dev;
	struct vlo_pool *pool;
	struct device_dma_parameters parms;	/* drivers that set or read segment limits (virtio-gpu) */
};

struct vlo_dev;

struct vlo_irqfd {
	struct vlo_dev *dev;
	int qidx;
	struct eventfd_ctx *ctx;
	wait_queue_entry_t wait;
	poll_table pt;
	struct work_struct work;
};

struct vlo_queue {
	struct vlo_dev *dev;
	unsigned int index;
	unsigned int max_size;
	struct eventfd_ctx *kick;
	struct vlo_irqfd *irqfd;	/* dev->irqfd_lock */

	/* Set/cleared under dev->irq_lock and track_lock. */
	struct virtqueue *vq;
	struct vlo_ring *ring;
	struct vring vr;
	unsigned int num;

	/* In-flight tracking, track_lock. */
	spinlock_t track_lock;
	u16 avail_seen;
	u16 used_seen;
	s16 *inflight;			/* per descriptor head */
};

struct vlo_dev {
	struct virtio_device vdev;	/* release() drops one ref */
	struct kref ref;
	struct vlo_owner *owner;
	u32 idx;
	u32 nqueues;
	u64 dev_features;

	spinlock_t cfg_lock;		/* status, config, generation */
	u8 status;
	u32 reset_count;
	u32 generation;
	u32 config_size;
	u8 *config;
	struct eventfd_ctx *config_kick;

	/* SYNC_CONFIG: the pending driver write (cfg_lock), writers serialised by cfg_mutex. */
	bool sync_config;
	bool cfg_warned;
	struct list_head sync_node;	/* owner->sync_devs, owner->idr_lock */
	struct mutex cfg_mutex;
	u32 cfg_seq;			/* last write recorded */
	u32 cfg_acked;			/* last write acked; == cfg_seq: none pending */
	u32 cfg_off;
	u32 cfg_len;
	u8 *cfg_wbuf;			/* the pending write's bytes (config_size) */

	struct vlo_pool *pool;		/* restricted (ADDDEV flag); a reference */
	struct vlo_pdev *pdev;		/* its DMA device, registered while the virtio device is */

	spinlock_t irq_lock;		/* serialises callbacks */
	bool vqs_live;			/* find_vqs done, no reset since */
	bool dying;
	bool in_drain;			/* vlo_drain is raising interrupts (irq_lock held) */
	bool user_broke;

	struct mutex irqfd_lock;
	struct work_struct register_work;
	struct delayed_work drain_work;
	wait_queue_head_t wait;
	bool reg_done;
	bool registered;

	struct vlo_queue q[];
};

#define to_vlo(v) container_of(v, struct vlo_dev, vdev)

/* ---------------------------------------------------------------------- */

static inline void vlo_signal(struct eventfd_ctx *ctx)
{
	if (!ctx)
		return;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
	eventfd_signal(ctx);
#else
	eventfd_signal(ctx, 1);
#endif
}

/* ---------------------------------------------------------------------- */
/* Restricted memory: the pool and its DMA operations                      */

static void vlo_pool_free(struct kref *ref)
{
	struct vlo_pool *p = container_of(ref, struct vlo_pool, ref);

	vfree(p->va);
	kvfree(p->used);
	kvfree(p->starts);
	kvfree(p->meta);
	kfree(p);
}

static void vlo_pool_put(struct vlo_pool *p)
{
	if (p)
		kref_put(&p->ref, vlo_pool_free);
}

static struct vlo_pool *vlo_pool_create(size_t size)
{
	struct vlo_pool *p = kzalloc(sizeof(*p), GFP_KERNEL);

	if (!p)
		return NULL;
	kref_init(&p->ref);
	spin_lock_init(&p->lock);
	p->size = PAGE_ALIGN(size);
	p->nunits = p->size >> VLO_UNIT_SHIFT;
	p->va = vmalloc_user(p->size);		/* zeroed, VM_USERMAP */
	p->used = kvcalloc(BITS_TO_LONGS(p->nunits), sizeof(long), GFP_KERNEL);
	p->starts = kvcalloc(BITS_TO_LONGS(p->nunits), sizeof(long), GFP_KERNEL);
	p->meta = kvcalloc(p->nunits, sizeof(*p->meta), GFP_KERNEL);
	if (!p->va || !p->used || !p->starts || !p->meta) {
		vlo_pool_put(p);
		return NULL;
	}
	return p;
}

/*
 * size bytes at an offset aligned to align (a power of two, >= VLO_UNIT), zeroed before it is handed out, so a
 * bounce buffer never shows the driver (or the device) what an earlier mapping held.  -1: the pool is full.
 */
static long vlo_pool_alloc(struct vlo_pool *p, size_t size, size_t align, phys_addr_t orig,
			   enum dma_data_direction dir)
{
	unsigned long n = DIV_ROUND_UP(size, VLO_UNIT), mask = (align >> VLO_UNIT_SHIFT) - 1;
	unsigned long start, flags;

	spin_lock_irqsave(&p->lock, flags);
	start = bitmap_find_next_zero_area(p->used, p->nunits, p->hint, n, mask);
	if (start + n > p->nunits)
		start = bitmap_find_next_zero_area(p->used, p->nunits, 0, n, mask);
	if (start + n > p->nunits) {
		spin_unlock_irqrestore(&p->lock, flags);
		return -1;
	}
	bitmap_set(p->used, start, n);
	__set_bit(start, p->starts);
	p->meta[start].orig = orig;
	p->meta[start].len = size;
	p->meta[start].dir = dir;
	p->hint = start + n < p->nunits ? start + n : 0;
	spin_unlock_irqrestore(&p->lock, flags);
	memset(p->va + (start << VLO_UNIT_SHIFT), 0, n << VLO_UNIT_SHIFT);
	return start << VLO_UNIT_SHIFT;
}

static void vlo_pool_release(struct vlo_pool *p, unsigned long u)
{
	unsigned long flags;

	spin_lock_irqsave(&p->lock, flags);
	bitmap_clear(p->used, u, DIV_ROUND_UP(p->meta[u].len, VLO_UNIT));
	__clear_bit(u, p->starts);
	memset(&p->meta[u], 0, sizeof(p->meta[u]));
	spin_unlock_irqrestore(&p->lock, flags);
}

/*
 * The allocation holding [addr, addr+size): its first unit, or -1.  exact: addr must be where it starts
 * (unmap, free).  Bounds come from the book-keeping, never from the pool's contents.
 */
static long vlo_pool_find(struct vlo_pool *p, dma_addr_t addr, size_t size, bool exact)
{
	unsigned long flags, u, start;
	long ret = -1;
	u64 off;

	if (addr < VIRTIO_LO_POOL_IOVA || addr - VIRTIO_LO_POOL_IOVA >= p->size)
		return -1;
	off = addr - VIRTIO_LO_POOL_IOVA;
	u = off >> VLO_UNIT_SHIFT;
	spin_lock_irqsave(&p->lock, flags);
	if (exact)
		start = (off & (VLO_UNIT - 1)) || !test_bit(u, p->starts) ? u + 1 : u;
	else
		start = find_last_bit(p->starts, u + 1);
	if (start <= u && test_bit(start, p->used) &&
	    size <= p->meta[start].len && off - (start << VLO_UNIT_SHIFT) <= p->meta[start].len - size)
		ret = start;
	spin_unlock_irqrestore(&p->lock, flags);
	return ret;
}

#if VLO_HAVE_POOL
static struct vlo_pool *vlo_dma_pool(struct device *d)
{
	return container_of(d, struct vlo_pdev, dev)->pool;
}

static void vlo_bad_dma(struct vlo_pool *p, struct device *d, const char *what, dma_addr_t addr, size_t size)
{
	if (!p->bad_warned) {
		p->bad_warned = true;
		dev_warn(d, "%s of 0x%llx (+%zu): not a mapping of this pool (logged once)\n",
			 what, (unsigned long long)addr, size);
	}
}

/*
 * Copy between a bounce buffer (from bytes into the allocation at unit u) and the driver's memory.  The original
 * is reached through the kernel's direct map: the module is 64-bit only (see uapi), so there is no highmem.
 */
static void vlo_bounce_copy(struct vlo_pool *p, unsigned long u, u64 from, size_t len, bool to_device)
{
	void *b = p->va + (u << VLO_UNIT_SHIFT) + from;
	void *o = phys_to_virt(p->meta[u].orig + from);

	if (!p->meta[u].orig || !len)
		return;
	if (to_device)
		memcpy(b, o, len);
	else
		memcpy(o, b, len);
}

static bool vlo_dir_to_device(int dir)
{
	return dir == DMA_TO_DEVICE || dir == DMA_BIDIRECTIONAL;
}

static bool vlo_dir_from_device(int dir)
{
	return dir == DMA_FROM_DEVICE || dir == DMA_BIDIRECTIONAL;
}

static dma_addr_t vlo_dma_map(struct device *d, phys_addr_t phys, size_t size, enum dma_data_direction dir,
			      unsigned long attrs)
{
	struct vlo_pool *p = vlo_dma_pool(d);
	long off;

	if (!size || size > VLO_MAX_MAP)
		return DMA_MAPPING_ERROR;
	/* Buffers of half a page or more start on a page (a device may do O_DIRECT I/O into them). */
	off = vlo_pool_alloc(p, size, size >= PAGE_SIZE / 2 ? PAGE_SIZE : VLO_UNIT,
			     phys, dir);
	if (off < 0) {
		/* virtio_ring fails the add with ENOMEM; virtio_blk requeues, others retry later. */
		if (!p->full_warned) {
			p->full_warned = true;
			dev_info(d, "pool of %zu bytes full: a buffer waits (logged once)\n", p->size);
		}
		return DMA_MAPPING_ERROR;
	}
	if (vlo_dir_to_device(dir) && !(attrs & DMA_ATTR_SKIP_CPU_SYNC))
		vlo_bounce_copy(p, off >> VLO_UNIT_SHIFT, 0, size, true);
	return VIRTIO_LO_POOL_IOVA + off;
}

/*
 * dma_map_ops took struct page + offset (map_page) up to 6.18; map_phys (a physical address) was added next to it and
 * map_page removed by 7.x (compiled against Debian's 7.3.4 headers; the cut-over version is an assumption: 6.19).
 * unmap_page and unmap_phys have the same arguments.
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 19, 0)
static dma_addr_t vlo_dma_map_page(struct device *d, struct page *page, unsigned long offset, size_t size,
				   enum dma_data_direction dir, unsigned long attrs)
{
	return vlo_dma_map(d, page_to_phys(page) + offset, size, dir, attrs);
}
#endif

static void vlo_dma_unmap(struct device *d, dma_addr_t addr, size_t size, enum dma_data_direction dir,
			  unsigned long attrs)
{
	struct vlo_pool *p = vlo_dma_pool(d);
	long u = vlo_pool_find(p, addr, 0, true);

	if (u < 0 || !p->meta[u].orig) {
		vlo_bad_dma(p, d, "unmap", addr, size);
		return;
	}
	if (size != p->meta[u].len)
		vlo_bad_dma(p, d, "unmap with another length", addr, size);
	/* Exactly the mapped length goes back (or less if the caller says less), never more. */
	if (vlo_dir_from_device(p->meta[u].dir) && !(attrs & DMA_ATTR_SKIP_CPU_SYNC))
		vlo_bounce_copy(p, u, 0, min_t(size_t, size, p->meta[u].len), false);
	vlo_pool_release(p, u);
}

static void vlo_dma_sync(struct device *d, dma_addr_t addr, size_t size, bool to_device)
{
	struct vlo_pool *p = vlo_dma_pool(d);
	long u = vlo_pool_find(p, addr, size, false);

	if (u < 0) {
		vlo_bad_dma(p, d, "sync", addr, size);
		return;
	}
	/* Only [addr, addr+size), checked inside the mapping by vlo_pool_find. */
	if (to_device ? vlo_dir_to_device(p->meta[u].dir) : vlo_dir_from_device(p->meta[u].dir))
		vlo_bounce_copy(p, u, addr - VIRTIO_LO_POOL_IOVA - ((u64)u << VLO_UNIT_SHIFT), size, to_device);
}

static void vlo_dma_sync_for_cpu(struct device *d, dma_addr_t addr, size_t size, enum dma_data_direction dir)
{
	vlo_dma_sync(d, addr, size, false);
}

static void vlo_dma_sync_for_device(struct device *d, dma_addr_t addr, size_t size, enum dma_data_direction dir)
{
	vlo_dma_sync(d, addr, size, true);
}

static void vlo_dma_unmap_sg(struct device *d, struct scatterlist *sgl, int nents, enum dma_data_direction dir,
			     unsigned long attrs)
{
	struct scatterlist *sg;
	int i;

	for_each_sg(sgl, sg, nents, i)
		vlo_dma_unmap(d, sg_dma_address(sg), sg_dma_len(sg), dir, attrs);
}

static int vlo_dma_map_sg(struct device *d, struct scatterlist *sgl, int nents, enum dma_data_direction dir,
			  unsigned long attrs)
{
	struct scatterlist *sg;
	int i;

	for_each_sg(sgl, sg, nents, i) {
		sg_dma_address(sg) = vlo_dma_map(d, sg_phys(sg), sg->length, dir, attrs);
		if (sg_dma_address(sg) == DMA_MAPPING_ERROR) {
			vlo_dma_unmap_sg(d, sgl, i, dir, attrs | DMA_ATTR_SKIP_CPU_SYNC);
			return -ENOMEM;
		}
		sg_dma_len(sg) = sg->length;
	}
	return nents;
}

static void *vlo_dma_alloc(struct device *d, size_t size, dma_addr_t *handle, gfp_t gfp, unsigned long attrs)
{
	struct vlo_pool *p = vlo_dma_pool(d);
	long off = size ? vlo_pool_alloc(p, size, PAGE_SIZE, 0, DMA_BIDIRECTIONAL) : -1;

	if (off < 0)
		return NULL;
	*handle = VIRTIO_LO_POOL_IOVA + off;
	return p->va + off;
}

static void vlo_dma_free(struct device *d, size_t size, void *vaddr, dma_addr_t handle, unsigned long attrs)
{
	struct vlo_pool *p = vlo_dma_pool(d);
	long u = vlo_pool_find(p, handle, 0, true);

	if (u < 0 || p->meta[u].orig)
		vlo_bad_dma(p, d, "free", handle, size);
	else
		vlo_pool_release(p, u);
}

static size_t vlo_dma_max_mapping_size(struct device *d)
{
	return VLO_MAX_MAP;
}

static const struct dma_map_ops vlo_dma_ops = {
	.alloc			= vlo_dma_alloc,
	.free			= vlo_dma_free,
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 19, 0)
	.map_page		= vlo_dma_map_page,
	.unmap_page		= vlo_dma_unmap,
#else
	.map_phys		= vlo_dma_map,
	.unmap_phys		= vlo_dma_unmap,
#endif
	.map_sg			= vlo_dma_map_sg,
	.unmap_sg		= vlo_dma_unmap_sg,
	.sync_single_for_cpu	= vlo_dma_sync_for_cpu,
	.sync_single_for_device	= vlo_dma_sync_for_device,
	.max_mapping_size	= vlo_dma_max_mapping_size,
};

static void vlo_pdev_release(struct device *d)
{
	struct vlo_pdev *pd = container_of(d, struct vlo_pdev, dev);

	vlo_pool_put(pd->pool);
	kfree(pd);
}

static atomic_t vlo_pool_seq = ATOMIC_INIT(0);

/* The registered parent device whose DMA operations bounce through pool (takes a pool reference). */
static struct vlo_pdev *vlo_pdev_create(struct vlo_pool *pool)
{
	struct vlo_pdev *pd = kzalloc(sizeof(*pd), GFP_KERNEL);
	int err;

	if (!pd)
		return ERR_PTR(-ENOMEM);
	device_initialize(&pd->dev);
	pd->dev.parent = vlo_root;
	pd->dev.release = vlo_pdev_release;
	kref_get(&pool->ref);
	pd->pool = pool;
	pd->dev.coherent_dma_mask = DMA_BIT_MASK(64);
	pd->dev.dma_mask = &pd->dev.coherent_dma_mask;
	pd->parms.max_segment_size = VLO_MAX_MAP;
	pd->parms.segment_boundary_mask = ULONG_MAX;
	pd->dev.dma_parms = &pd->parms;
	set_dma_ops(&pd->dev, &vlo_dma_ops);
	err = dev_set_name(&pd->dev, "pool%u", atomic_inc_return(&vlo_pool_seq));
	if (!err)
		err = device_add(&pd->dev);
	if (err) {
		put_device(&pd->dev);
		return ERR_PTR(err);
	}
	return pd;
}
#endif /* VLO_HAVE_POOL */

/* What the device sees at [addr, addr+len): a pool address (restricted) or a RAM physical address.  NULL: neither. */
static bool vlo_phys_ok(u64 addr, u64 len);
static void *vlo_dev_ptr(struct vlo_dev *dev, u64 addr, u64 len)
{
	struct vlo_pool *p = dev->pool;

	if (p) {
		if (!len || addr < VIRTIO_LO_POOL_IOVA || addr - VIRTIO_LO_POOL_IOVA >= p->size ||
		    len > p->size - (addr - VIRTIO_LO_POOL_IOVA))
			return NULL;
		return p->va + (addr - VIRTIO_LO_POOL_IOVA);
	}
	return vlo_phys_ok(addr, len) ? phys_to_virt(addr) : NULL;
}

/* The address the device knows a ring part by. */
static u64 vlo_ring_addr(struct vlo_dev *dev, void *ptr)
{
	if (dev->pool)
		return VIRTIO_LO_POOL_IOVA + ((u8 *)ptr - (u8 *)dev->pool->va);
	return virt_to_phys(ptr);
}

static void vlo_dev_free(struct kref *ref)
{
	struct vlo_dev *dev = container_of(ref, struct vlo_dev, ref);
	unsigned int i;

	for (i = 0; i < dev->nqueues; i++)
		if (dev->q[i].kick)
			eventfd_ctx_put(dev->q[i].kick);
	if (dev->config_kick)
		eventfd_ctx_put(dev->config_kick);
	kfree(dev->cfg_wbuf);
	kfree(dev->config);
	vlo_pool_put(dev->pool);
	kfree(dev);
}

static void vlo_dev_put(struct vlo_dev *dev)
{
	kref_put(&dev->ref, vlo_dev_free);
}

static void vlo_vdev_release(struct device *d)
{
	vlo_dev_put(to_vlo(dev_to_virtio(d)));
}

/* Ring memory: free now, or when the owner's last mapping goes away. */
static void vlo_ring_free(struct vlo_ring *r)
{
	if (r->pool)
		vlo_pool_release(r->pool, r->off >> VLO_UNIT_SHIFT);
	else
		free_pages_exact(r->mem, r->bytes);
	kfree(r);
}

static void vlo_bury_ring(struct vlo_owner *o, struct vlo_ring *r)
{
	bool now;

	spin_lock(&o->grave_lock);
	now = o->nmaps == 0;
	if (!now)
		list_add_tail(&r->node, &o->grave);
	spin_unlock(&o->grave_lock);
	if (now)
		vlo_ring_free(r);
}

static void vlo_free_grave(struct list_head *list)
{
	struct vlo_ring *r, *t;

	list_for_each_entry_safe(r, t, list, node) {
		list_del(&r->node);
		vlo_ring_free(r);
	}
}

/* ---------------------------------------------------------------------- */
/* In-flight tracking and the failing-device mode                          */

static void vlo_track_locked(struct vlo_queue *q)
{
	struct virtio_device *vdev = &q->dev->vdev;
	unsigned int num = q->num;
	u16 a, u, h;

	if (!q->inflight)
		return;
	a = virtio16_to_cpu(vdev, READ_ONCE(q->vr.avail->idx));
	smp_rmb();
	if ((u16)(a - q->avail_seen) > num)
		q->avail_seen = a - num;
	for (; q->avail_seen != a; q->avail_seen++) {
		h = virtio16_to_cpu(vdev, READ_ONCE(q->vr.avail->ring[q->avail_seen & (num - 1)]));
		if (h < num && q->inflight[h] < S16_MAX)
			q->inflight[h]++;
	}
	u = virtio16_to_cpu(vdev, READ_ONCE(q->vr.used->idx));
	smp_rmb();
	if ((u16)(u - q->used_seen) > num)
		q->used_seen = u - num;
	for (; q->used_seen != u; q->used_seen++) {
		u32 id = virtio32_to_cpu(vdev, READ_ONCE(q->vr.used->ring[q->used_seen & (num - 1)].id));

		if (id < num && q->inflight[id] > S16_MIN)
			q->inflight[id]--;
	}
}

static void vlo_track(struct vlo_queue *q)
{
	unsigned long flags;

	spin_lock_irqsave(&q->track_lock, flags);
	vlo_track_locked(q);
	spin_unlock_irqrestore(&q->track_lock, flags);
}

static bool vlo_phys_ok(u64 addr, u64 len)
{
	if (!len || addr + len < addr)
		return false;
	return pfn_valid(PHYS_PFN(addr)) && pfn_valid(PHYS_PFN(addr + len - 1));
}

/*
 * Devices whose request status is the last byte of the last device-writable buffer, and the value that fails a
 * request there: virtio-blk (VIRTIO_BLK_S_IOERR) and virtio-i2c (VIRTIO_I2C_MSG_ERR). A request completed with
 * len 0 and that byte untouched reads as done: i2c-virtio checks only the byte (zeroed by its kcalloc, i.e.
 * VIRTIO_I2C_MSG_OK), so a read in flight when user space died returned zeroes as data. -1: none.
 */
#define VLO_VIRTIO_ID_I2C	34	/* VIRTIO_ID_I2C_ADAPTER */
#define VLO_I2C_MSG_ERR		1	/* VIRTIO_I2C_MSG_ERR */
static int vlo_fail_status(u32 device_id)
{
	switch (device_id) {
	case VIRTIO_ID_BLOCK:
		return VIRTIO_BLK_S_IOERR;
	case VLO_VIRTIO_ID_I2C:
		return VLO_I2C_MSG_ERR;
	}
	return -1;
}

/*
 * Walk the chain at head (bounded: at most one pass over its table, an indirect table checked like the driver's
 * own): does it hold a device-readable descriptor, and where is the last byte of its last device-writable one.
 * false if the chain cannot be walked (a bad indirect table).
 */
static bool vlo_walk_chain(struct vlo_queue *q, u16 head, bool *has_out, u64 *last_in)
{
	struct virtio_device *vdev = &q->dev->vdev;
	struct vring_desc *tbl = q->vr.desc;
	unsigned int n = q->num, i = head, steps;

	*has_out = false;
	*last_in = 0;
	if (virtio16_to_cpu(vdev, tbl[i].flags) & VRING_DESC_F_INDIRECT) {
		u64 addr = virtio64_to_cpu(vdev, tbl[i].addr);
		u32 len = virtio32_to_cpu(vdev, tbl[i].len);

		if (len < sizeof(*tbl) || len > 65536)
			return false;
		tbl = vlo_dev_ptr(q->dev, addr, len);
		if (!tbl)
			return false;
		n = len / sizeof(*tbl);
		i = 0;
	}
	for (steps = 0; steps < n && i < n; steps++) {
		u16 fl = virtio16_to_cpu(vdev, tbl[i].flags);

		if (fl & VRING_DESC_F_WRITE) {
			u64 addr = virtio64_to_cpu(vdev, tbl[i].addr);
			u32 len = virtio32_to_cpu(vdev, tbl[i].len);

			if (len && addr + len > addr)
				*last_in = addr + len - 1;
		} else {
			*has_out = true;
		}
		if (!(fl & VRING_DESC_F_NEXT))
			break;
		i = virtio16_to_cpu(vdev, tbl[i].next);
	}
	return true;
}

/*
 * Complete every outstanding request with len 0.  irq_lock held.
 *
 * Only requests: chains with a device-readable part (a block request, an output buffer, a control message the
 * driver sent).  A chain that is device-writable only is a receive buffer the driver lent the device (console and
 * control input, input events, vsock and CAN rx, rng): completing it would tell the driver data arrived, and some
 * drivers act on the buffer without looking at the used length: virtio_console's control handler re-ran the stale
 * PORT_ADD/PORT_REMOVE left in a control buffer while its remove() was unplugging the same ports (a kfree() panic
 * under DELDEV, 6.12), virtio_input would re-inject stale events.  No remove path waits for a receive buffer: the
 * driver takes them back with virtqueue_detach_unused_buf() after its reset (virtio_rng's remove completes its own
 * wait first).  They stay counted as outstanding here.
 *
 * track_lock serialises the used-ring writes (with the notify path and the drain work); no interrupt is raised
 * here, so it may run inside the driver's kick.  Returns the number of requests completed.
 */
static unsigned int vlo_fail_inflight(struct vlo_queue *q)
{
	struct vlo_dev *dev = q->dev;
	struct virtio_device *vdev = &dev->vdev;
	unsigned int num = q->num, h, done = 0;
	int status = vlo_fail_status(dev->vdev.id.device);
	unsigned long flags;
	u16 ui;

	spin_lock_irqsave(&q->track_lock, flags);
	if (!q->inflight)
		goto out;
	vlo_track_locked(q);
	ui = q->used_seen;
	for (h = 0; h < num; h++) {
		struct vring_used_elem *e;
		bool has_out;
		u64 last_in;

		if (q->inflight[h] <= 0) {
			q->inflight[h] = 0;
			continue;
		}
		if (!vlo_walk_chain(q, h, &has_out, &last_in))
			has_out = true;		/* unreadable chain: complete it, as before */
		else if (!has_out)
			continue;		/* a receive buffer: left with the driver */
		if (status >= 0 && last_in) {
			u8 *st = vlo_dev_ptr(dev, last_in, 1);

			if (st)
				*st = status;
		}
		e = &q->vr.used->ring[ui & (num - 1)];
		e->id = cpu_to_virtio32(vdev, h);
		e->len = cpu_to_virtio32(vdev, 0);
		ui++;
		done++;
		q->inflight[h] = 0;
	}
	smp_wmb();
	WRITE_ONCE(q->vr.used->idx, cpu_to_virtio16(vdev, ui));
	q->used_seen = ui;
	/* Make the driver notify us about everything from now on. */
	WRITE_ONCE(q->vr.used->flags, 0);
	vring_avail_event(&q->vr) = q->vr.avail->idx;
	smp_mb();
out:
	spin_unlock_irqrestore(&q->track_lock, flags);
	return done;
}

/* Fails every outstanding request of a dying device and interrupts the driver; returns the number failed. */
static unsigned int vlo_drain(struct vlo_dev *dev, bool *again)
{
	unsigned long flags;
	unsigned int i, done = 0;

	spin_lock_irqsave(&dev->irq_lock, flags);
	if (dev->user_broke && dev->vqs_live) {
		/* Queues broken by DEVSTATUS would swallow our completions. */
		__virtio_unbreak_device(&dev->vdev);
		dev->user_broke = false;
	}
	if (dev->vqs_live) {
		dev->in_drain = true;
		for (i = 0; i < dev->nqueues; i++) {
			struct vlo_queue *q = &dev->q[i];

			if (!q->vq)
				continue;
			done += vlo_fail_inflight(q);
			vring_interrupt(0, q->vq);
		}
		dev->in_drain = false;
	}
	*again = dev->dying;
	spin_unlock_irqrestore(&dev->irq_lock, flags);
	return done;
}

static void vlo_drain_work(struct work_struct *w)
{
	struct vlo_dev *dev = container_of(to_delayed_work(w), struct vlo_dev, drain_work);
	bool again;

	vlo_drain(dev, &again);
	/* Safety net for notifications we may not get. */
	if (again)
		queue_delayed_work(system_wq, &dev->drain_work, HZ / 10);
}

/* Used-buffer interrupt for one queue (qidx >= 0) or all (-1). */
static void vlo_interrupt(struct vlo_dev *dev, int qidx)
{
	unsigned long flags;
	unsigned int i;

	spin_lock_irqsave(&dev->irq_lock, flags);
	if (dev->vqs_live && !dev->dying) {
		for (i = 0; i < dev->nqueues; i++) {
			struct vlo_queue *q = &dev->q[i];

			if ((qidx >= 0 && i != qidx) || !q->vq)
				continue;
			vlo_track(q);
			vring_interrupt(0, q->vq);
		}
	}
	spin_unlock_irqrestore(&dev->irq_lock, flags);
}

/* ---------------------------------------------------------------------- */
/* virtio_config_ops                                                       */

static void vlo_get(struct virtio_device *vdev, unsigned int off, void *buf, unsigned int len)
{
	struct vlo_dev *dev = to_vlo(vdev);
	unsigned long flags;

	memset(buf, 0, len);
	spin_lock_irqsave(&dev->cfg_lock, flags);
	if (off < dev->config_size)
		memcpy(buf, dev->config + off, min(len, dev->config_size - off));
	spin_unlock_irqrestore(&dev->cfg_lock, flags);
}

static bool vlo_cfg_answered(struct vlo_dev *dev, u32 seq)
{
	return READ_ONCE(dev->cfg_acked) == seq || READ_ONCE(dev->dying);
}

/*
 * SYNC_CONFIG: record the write, signal user space and wait for its ack.
 * Only where sleeping is allowed: drivers write config from probe, work items
 * and sysfs (process context), but config_changed callbacks run under the
 * virtio core's config spinlock; those writes (and writes of a dying device)
 * stay asynchronous.  False: not handled here, use the asynchronous path.
 */
static bool vlo_set_sync(struct vlo_dev *dev, unsigned int off, const void *buf, unsigned int len)
{
	unsigned long flags;
	long left;
	u32 seq;

	if (!dev->sync_config || !len || off >= dev->config_size || READ_ONCE(dev->dying))
		return false;
	if (!IS_ENABLED(CONFIG_PREEMPT_COUNT) || !preemptible() || rcu_preempt_depth())
		return false;
	if (mutex_lock_killable(&dev->cfg_mutex))
		return false;
	len = min(len, dev->config_size - off);
	spin_lock_irqsave(&dev->cfg_lock, flags);
	memcpy(dev->config + off, buf, len);
	memcpy(dev->cfg_wbuf, buf, len);
	seq = dev->cfg_seq + 1;
	if (!seq)
		seq = 1;
	dev->cfg_seq = seq;
	dev->cfg_off = off;
	dev->cfg_len = len;
	spin_unlock_irqrestore(&dev->cfg_lock, flags);
	vlo_signal(dev->config_kick);
	left = wait_event_killable_timeout(dev->wait, vlo_cfg_answered(dev, seq),
					   msecs_to_jiffies(sync_config_timeout_ms));
	if (left == 0 && !vlo_cfg_answered(dev, seq) && !dev->cfg_warned) {
		dev->cfg_warned = true;
		dev_warn(&dev->vdev.dev,
			 "config write (offset %u, %u bytes) not acked by user space within %u ms; using the module's copy (logged once)\n",
			 off, len, sync_config_timeout_ms);
	}
	mutex_unlock(&dev->cfg_mutex);
	return true;
}

static void vlo_set(struct virtio_device *vdev, unsigned int off, const void *buf, unsigned int len)
{
	struct vlo_dev *dev = to_vlo(vdev);
	unsigned long flags;

	if (vlo_set_sync(dev, off, buf, len))
		return;
	spin_lock_irqsave(&dev->cfg_lock, flags);
	if (off < dev->config_size)
		memcpy(dev->config + off, buf, min(len, dev->config_size - off));
	spin_unlock_irqrestore(&dev->cfg_lock, flags);
	vlo_signal(dev->config_kick);
}

static u32 vlo_generation(struct virtio_device *vdev)
{
	return READ_ONCE(to_vlo(vdev)->generation);
}

static u8 vlo_get_status(struct virtio_device *vdev)
{
	return READ_ONCE(to_vlo(vdev)->status);
}

static void vlo_set_status(struct virtio_device *vdev, u8 status)
{
	struct vlo_dev *dev = to_vlo(vdev);
	unsigned long flags;
	u8 old;

	spin_lock_irqsave(&dev->cfg_lock, flags);
	old = dev->status;
	WRITE_ONCE(dev->status, status);
	spin_unlock_irqrestore(&dev->cfg_lock, flags);
	wake_up_all(&dev->wait);
	if (old != status)
		vlo_signal(dev->config_kick);
}

static void vlo_reset(struct virtio_device *vdev)
{
	struct vlo_dev *dev = to_vlo(vdev);
	unsigned long flags;
	u8 old;

	/* After reset no callback may run: take irq_lock to wait for one in progress. */
	spin_lock_irqsave(&dev->irq_lock, flags);
	dev->vqs_live = false;
	spin_unlock_irqrestore(&dev->irq_lock, flags);

	spin_lock_irqsave(&dev->cfg_lock, flags);
	old = dev->status;
	WRITE_ONCE(dev->status, 0);
	if (old)
		dev->reset_count++;
	spin_unlock_irqrestore(&dev->cfg_lock, flags);
	wake_up_all(&dev->wait);
	if (old)
		vlo_signal(dev->config_kick);
}

static void vlo_synchronize_cbs(struct virtio_device *vdev)
{
	struct vlo_dev *dev = to_vlo(vdev);
	unsigned long flags;

	spin_lock_irqsave(&dev->irq_lock, flags);
	spin_unlock_irqrestore(&dev->irq_lock, flags);
}

static u64 vlo_get_features(struct virtio_device *vdev)
{
	return to_vlo(vdev)->dev_features;
}

static int vlo_finalize_features(struct virtio_device *vdev)
{
	vring_transport_features(vdev);
	return 0;
}

static const char *vlo_bus_name(struct virtio_device *vdev)
{
	return "virtio-lo";
}

static bool vlo_notify(struct virtqueue *vq)
{
	struct vlo_queue *q = vq->priv;
	struct vlo_dev *dev = q->dev;

	vlo_track(q);
	if (READ_ONCE(dev->dying)) {
		/*
		 * Fail the request now, before the kick returns: a driver that spins for its completion
		 * (virtio_console's control and hvc output) gets it at once.  The interrupt comes from the work
		 * (a callback run from inside the driver's own kick could take a lock the kicker holds).
		 * Not when the kick comes from a callback of our own drain (in_drain, same CPU, irq_lock held): a
		 * stream driver that resubmits every completed buffer (virtio_snd) would find the new completion
		 * in the same callback loop and never leave it, interrupts off.  Those wait one jiffy for the work:
		 * a failing device completes a resubmitting stream at most HZ times a second.
		 */
		if (READ_ONCE(dev->in_drain))
			mod_delayed_work(system_wq, &dev->drain_work, 1);
		else if (vlo_fail_inflight(q))
			mod_delayed_work(system_wq, &dev->drain_work, 0);
	} else
		vlo_signal(q->kick);
	return true;
}

static void vlo_del_vqs(struct virtio_device *vdev)
{
	struct vlo_dev *dev = to_vlo(vdev);
	unsigned long flags;
	unsigned int i;

	for (i = 0; i < dev->nqueues; i++) {
		struct vlo_queue *q = &dev->q[i];
		struct virtqueue *vq;
		struct vlo_ring *ring;
		s16 *inflight;

		spin_lock_irqsave(&dev->irq_lock, flags);
		dev->vqs_live = false;
		spin_lock(&q->track_lock);
		vq = q->vq;
		ring = q->ring;
		inflight = q->inflight;
		q->vq = NULL;
		q->ring = NULL;
		q->inflight = NULL;
		q->num = 0;
		spin_unlock(&q->track_lock);
		spin_unlock_irqrestore(&dev->irq_lock, flags);

		if (vq)
			vring_del_virtqueue(vq);
		kvfree(inflight);
		if (ring && ring->pool)
			vlo_ring_free(ring);	/* pool memory: mapped only as part of the pool */
		else if (ring)
			vlo_bury_ring(dev->owner, ring);
	}
}

static struct virtqueue *vlo_setup_vq(struct vlo_dev *dev, unsigned int qi,
				      void (*callback)(struct virtqueue *vq),
				      const char *name, bool ctx)
{
	struct vlo_queue *q = &dev->q[qi];
	unsigned int num = q->max_size;
	struct vlo_ring *ring;
	struct virtqueue *vq;
	unsigned long flags;
	s16 *inflight;

	if (q->vq)
		return ERR_PTR(-EBUSY);
	ring = kzalloc(sizeof(*ring), GFP_KERNEL);
	inflight = kvcalloc(num, sizeof(*inflight), GFP_KERNEL);
	if (!ring || !inflight)
		goto nomem;
	ring->bytes = PAGE_ALIGN(vring_size(num, PAGE_SIZE));
	if (dev->pool) {
		/* Restricted: the rings are in the pool too (zeroed), at IOVAs (vlo_ring_addr). */
		long off = vlo_pool_alloc(dev->pool, ring->bytes, PAGE_SIZE, 0, DMA_BIDIRECTIONAL);

		if (off < 0)
			goto nomem;
		ring->pool = dev->pool;
		ring->off = off;
		ring->mem = dev->pool->va + off;
	} else {
		ring->mem = alloc_pages_exact(ring->bytes, GFP_KERNEL | __GFP_ZERO | __GFP_NOWARN);
	}
	if (!ring->mem)
		goto nomem;
	vq = vring_new_virtqueue(qi, num, PAGE_SIZE, &dev->vdev, true, ctx,
				 ring->mem, vlo_notify, callback, name);
	if (!vq) {
		vlo_ring_free(ring);
		ring = NULL;
		goto nomem;
	}
	vq->priv = q;

	spin_lock_irqsave(&dev->irq_lock, flags);
	spin_lock(&q->track_lock);
	vring_init(&q->vr, num, ring->mem, PAGE_SIZE);
	q->num = num;
	q->ring = ring;
	q->inflight = inflight;
	q->avail_seen = 0;
	q->used_seen = 0;
	q->vq = vq;
	spin_unlock(&q->track_lock);
	spin_unlock_irqrestore(&dev->irq_lock, flags);
	return vq;
nomem:
	kvfree(inflight);
	kfree(ring);
	return ERR_PTR(-ENOMEM);
}

static int vlo_find_vqs_common(struct virtio_device *vdev, unsigned int nvqs,
			       struct virtqueue *vqs[],
			       void (*cb)(void *arg, unsigned int i, vq_callback_t **c,
					  const char **n, bool *ctx),
			       void *arg)
{
	struct vlo_dev *dev = to_vlo(vdev);
	unsigned long flags;
	unsigned int i, qi = 0;
	int err;

	for (i = 0; i < nvqs; i++) {
		vq_callback_t *callback;
		const char *name;
		bool ctx;

		cb(arg, i, &callback, &name, &ctx);
		if (!name) {
			vqs[i] = NULL;
			continue;
		}
		if (qi >= dev->nqueues) {
			err = -ENOENT;
			goto fail;
		}
		vqs[i] = vlo_setup_vq(dev, qi++, callback, name, ctx);
		if (IS_ERR(vqs[i])) {
			err = PTR_ERR(vqs[i]);
			goto fail;
		}
	}
	spin_lock_irqsave(&dev->irq_lock, flags);
	dev->vqs_live = true;
	spin_unlock_irqrestore(&dev->irq_lock, flags);
	return 0;
fail:
	vlo_del_vqs(vdev);
	return err;
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
static void vlo_vqi_cb(void *arg, unsigned int i, vq_callback_t **c, const char **n, bool *ctx)
{
	struct virtqueue_info *vqi = arg;

	*c = vqi[i].callback;
	*n = vqi[i].name;
	*ctx = vqi[i].ctx;
}

static int vlo_find_vqs(struct virtio_device *vdev, unsigned int nvqs,
			struct virtqueue *vqs[], struct virtqueue_info vqs_info[],
			struct irq_affinity *desc)
{
	return vlo_find_vqs_common(vdev, nvqs, vqs, vlo_vqi_cb, vqs_info);
}
#else
struct vlo_fvq_args {
	vq_callback_t **callbacks;
	const char * const *names;
	const bool *ctx;
};

static void vlo_fvq_cb(void *arg, unsigned int i, vq_callback_t **c, const char **n, bool *ctx)
{
	struct vlo_fvq_args *a = arg;

	*c = a->callbacks[i];
	*n = a->names[i];
	*ctx = a->ctx ? a->ctx[i] : false;
}

static int vlo_find_vqs(struct virtio_device *vdev, unsigned int nvqs,
			struct virtqueue *vqs[], vq_callback_t *callbacks[],
			const char * const names[], const bool *ctx,
			struct irq_affinity *desc)
{
	struct vlo_fvq_args a = { callbacks, names, ctx };

	return vlo_find_vqs_common(vdev, nvqs, vqs, vlo_fvq_cb, &a);
}
#endif

static const struct virtio_config_ops vlo_config_ops = {
	.get			= vlo_get,
	.set			= vlo_set,
	.generation		= vlo_generation,
	.get_status		= vlo_get_status,
	.set_status		= vlo_set_status,
	.reset			= vlo_reset,
	.find_vqs		= vlo_find_vqs,
	.del_vqs		= vlo_del_vqs,
	.synchronize_cbs	= vlo_synchronize_cbs,
	.get_features		= vlo_get_features,
	.finalize_features	= vlo_finalize_features,
	.bus_name		= vlo_bus_name,
};

/* ---------------------------------------------------------------------- */
/* irqfd                                                                   */

static void vlo_irqfd_work(struct work_struct *w)
{
	struct vlo_irqfd *irqfd = container_of(w, struct vlo_irqfd, work);

	vlo_interrupt(irqfd->dev, irqfd->qidx);
}

/* Runs under the eventfd's wait-queue lock, interrupts off: defer. */
static int vlo_irqfd_wakeup(wait_queue_entry_t *wait, unsigned int mode, int sync, void *key)
{
	struct vlo_irqfd *irqfd = container_of(wait, struct vlo_irqfd, wait);

	if (key_to_poll(key) & EPOLLIN) {
		u64 cnt;

		eventfd_ctx_do_read(irqfd->ctx, &cnt);
		queue_work(system_highpri_wq, &irqfd->work);
	}
	return 0;
}

static void vlo_irqfd_ptable(struct file *file, wait_queue_head_t *wqh, poll_table *pt)
{
	struct vlo_irqfd *irqfd = container_of(pt, struct vlo_irqfd, pt);

	add_wait_queue(wqh, &irqfd->wait);
}

static void vlo_irqfd_free(struct vlo_irqfd *irqfd)
{
	u64 cnt;

	if (!irqfd)
		return;
	eventfd_ctx_remove_wait_queue(irqfd->ctx, &irqfd->wait, &cnt);
	cancel_work_sync(&irqfd->work);
	eventfd_ctx_put(irqfd->ctx);
	kfree(irqfd);
}

static int vlo_irqfd_set(struct vlo_dev *dev, unsigned int qidx, int fd)
{
	struct vlo_irqfd *irqfd = NULL, *old;
	struct file *file = NULL;
	__poll_t events;
	int err = 0;

	if (qidx >= dev->nqueues)
		return -EINVAL;
	if (fd >= 0) {
		irqfd = kzalloc(sizeof(*irqfd), GFP_KERNEL);
		if (!irqfd)
			return -ENOMEM;
		file = fget(fd);
		if (!file) {
			kfree(irqfd);
			return -EBADF;
		}
		irqfd->ctx = eventfd_ctx_fileget(file);
		if (IS_ERR(irqfd->ctx)) {
			fput(file);
			kfree(irqfd);
			return -EINVAL;
		}
		irqfd->dev = dev;
		irqfd->qidx = qidx;
		INIT_WORK(&irqfd->work, vlo_irqfd_work);
		init_waitqueue_func_entry(&irqfd->wait, vlo_irqfd_wakeup);
		init_poll_funcptr(&irqfd->pt, vlo_irqfd_ptable);
	} else if (fd != -1) {
		return -EBADF;
	}

	mutex_lock(&dev->irqfd_lock);
	if (READ_ONCE(dev->dying)) {
		err = -ENODEV;
		old = irqfd;
		irqfd = NULL;
	} else {
		old = dev->q[qidx].irqfd;
		dev->q[qidx].irqfd = irqfd;
		if (irqfd) {
			events = vfs_poll(file, &irqfd->pt);
			if (events & EPOLLIN)
				queue_work(system_highpri_wq, &irqfd->work);
		}
	}
	mutex_unlock(&dev->irqfd_lock);
	if (fd >= 0)
		fput(file);
	if (old && err) {
		/* never hooked */
		eventfd_ctx_put(old->ctx);
		kfree(old);
	} else {
		vlo_irqfd_free(old);
	}
	return err;
}

/* ---------------------------------------------------------------------- */
/* Device creation and teardown                                            */

static void vlo_register_work(struct work_struct *w)
{
	struct vlo_dev *dev = container_of(w, struct vlo_dev, register_work);
	int err;

	kref_get(&dev->ref);		/* dropped by vlo_vdev_release */
	err = register_virtio_device(&dev->vdev);
	if (err) {
		dev_warn(vlo_root, "register_virtio_device: %d\n", err);
		put_device(&dev->vdev.dev);
	}
	spin_lock_irq(&dev->cfg_lock);
	dev->registered = !err;
	dev->reg_done = true;
	spin_unlock_irq(&dev->cfg_lock);
	wake_up_all(&dev->wait);
}

static void vlo_dev_teardown(struct vlo_dev *dev)
{
	unsigned int i;

	spin_lock(&dev->owner->idr_lock);
	list_del_init(&dev->sync_node);
	spin_unlock(&dev->owner->idr_lock);

	spin_lock_irq(&dev->irq_lock);
	WRITE_ONCE(dev->dying, true);
	spin_unlock_irq(&dev->irq_lock);
	/* A driver waiting for a SYNC_CONFIG ack goes on with the module's copy. */
	wake_up_all(&dev->wait);

	mutex_lock(&dev->irqfd_lock);
	for (i = 0; i < dev->nqueues; i++) {
		vlo_irqfd_free(dev->q[i].irqfd);
		dev->q[i].irqfd = NULL;
	}
	mutex_unlock(&dev->irqfd_lock);

	/*
	 * From here the module completes the driver's requests itself: the ones outstanding now before the driver's
	 * remove() starts (not from the work, which may run only when this thread sleeps inside remove()):
	 * virtio_console's remove() frees what it finds outstanding on its queues as its own buffers, and a control
	 * message in flight is not one (kfree() of the message's bytes: a panic under DELDEV, seen on 6.12).  A driver
	 * spinning for such a completion (with a lock held, on another CPU) must also have taken it before remove()
	 * looks: it is given a short, bounded moment, only when something was failed here.
	 */
	flush_work(&dev->register_work);
	{
		bool again;

		if (vlo_drain(dev, &again))
			msleep(20);
	}
	mod_delayed_work(system_wq, &dev->drain_work, 0);
	if (dev->registered)
		unregister_virtio_device(&dev->vdev);
	cancel_delayed_work_sync(&dev->drain_work);

	/* A driver that did not delete its queues (or none bound). */
	for (i = 0; i < dev->nqueues; i++) {
		if (dev->q[i].vq) {
			dev_warn(vlo_root, "device %u: queue %u left behind by the driver\n",
				 dev->idx, i);
			vlo_del_vqs(&dev->vdev);
			break;
		}
	}
#if VLO_HAVE_POOL
	/* Every buffer is unmapped now (the driver's remove, del_vqs); the pool stays while user space maps it. */
	if (dev->pdev) {
		device_unregister(&dev->pdev->dev);
		dev->pdev = NULL;
	}
#endif
	vlo_dev_put(dev);
}

static bool vlo_probe_settled(struct vlo_dev *dev)
{
	u8 st = READ_ONCE(dev->status);

	return (st & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED)) ||
	       (READ_ONCE(dev->reg_done) && !READ_ONCE(dev->registered));
}

static struct vlo_dev *vlo_get_dev(struct vlo_owner *o, u32 idx)
{
	struct vlo_dev *dev;

	spin_lock(&o->idr_lock);
	dev = idr_find(&o->devs, idx);
	if (dev)
		kref_get(&dev->ref);
	spin_unlock(&o->idr_lock);
	return dev;
}

/* SYNC_CONFIG device of this owner whose config_kick is eventfd fd (referenced). */
static struct vlo_dev *vlo_find_sync(struct vlo_owner *o, int fd)
{
	struct eventfd_ctx *ctx;
	struct vlo_dev *dev, *found = NULL;

	if (fd < 0)
		return ERR_PTR(-EBADF);
	ctx = eventfd_ctx_fdget(fd);
	if (IS_ERR(ctx))
		return ERR_CAST(ctx);
	spin_lock(&o->idr_lock);
	list_for_each_entry(dev, &o->sync_devs, sync_node) {
		if (dev->config_kick == ctx) {
			kref_get(&dev->ref);
			found = dev;
			break;
		}
	}
	spin_unlock(&o->idr_lock);
	eventfd_ctx_put(ctx);
	return found ? found : ERR_PTR(-ENODEV);
}

static int vlo_get_eventfd(int fd, struct eventfd_ctx **out)
{
	struct eventfd_ctx *ctx;

	*out = NULL;
	if (fd == -1)
		return 0;
	if (fd < 0)
		return -EBADF;
	ctx = eventfd_ctx_fdget(fd);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	*out = ctx;
	return 0;
}

static long vlo_ioctl_adddev(struct vlo_owner *o, void __user *uarg)
{
	struct virtio_lo_devinfo info;
	struct virtio_lo_qinfo *qinfo = NULL;
	struct vlo_dev *dev = NULL;
	unsigned long flags;
	unsigned int i;
	long left;
	int err, id;
	u32 dflags;

	if (copy_from_user(&info, uarg, sizeof(info)))
		return -EFAULT;
	if (!info.device_id || !info.nqueues || info.nqueues > VIRTIO_LO_MAX_QUEUES ||
	    info.config_size > VIRTIO_LO_MAX_CONFIG_SIZE)
		return -EINVAL;
	dflags = upstream_abi ? 0 : info.flags;	/* upstream's "padding": ignored there */
	if (upstream_abi)
		info.pool_kib = 0;			/* upstream's hole */
	if ((dflags & ~(VIRTIO_LO_DEV_F_SYNC_CONFIG | VIRTIO_LO_DEV_F_RESTRICTED)) ||
	    ((dflags & VIRTIO_LO_DEV_F_SYNC_CONFIG) && info.config_kick < 0))
		return -EINVAL;
	if (dflags & VIRTIO_LO_DEV_F_RESTRICTED) {
		if (!VLO_HAVE_POOL)
			return -EOPNOTSUPP;
		/* ACCESS_PLATFORM is a feature of virtio 1.x devices (virtio 1.2 section 6). */
		if (!(info.features & BIT_ULL(VIRTIO_F_VERSION_1)) || info.pool_kib > VIRTIO_LO_POOL_MAX_KIB)
			return -EINVAL;
	} else if (info.pool_kib) {
		return -EINVAL;
	} else if (READ_ONCE(o->restricted)) {
		return -EPERM;			/* this opener may expose pools only */
	}
	if (!info.qinfo)
		return -EFAULT;
	qinfo = memdup_user((void __user *)info.qinfo, info.nqueues * sizeof(*qinfo));
	if (IS_ERR(qinfo))
		return PTR_ERR(qinfo);
	for (i = 0; i < info.nqueues; i++) {
		if (!qinfo[i].size || qinfo[i].size > VIRTIO_LO_MAX_QUEUE_SIZE ||
		    !is_power_of_2(qinfo[i].size)) {
			err = -EINVAL;
			goto out_free;
		}
	}

	dev = kzalloc(struct_size(dev, q, info.nqueues), GFP_KERNEL);
	if (!dev) {
		err = -ENOMEM;
		goto out_free;
	}
	kref_init(&dev->ref);
	dev->owner = o;
	dev->nqueues = info.nqueues;
	dev->dev_features = info.features & ~VLO_MASKED_FEATURES;
	if (dflags & VIRTIO_LO_DEV_F_RESTRICTED)
		dev->dev_features |= BIT_ULL(VIRTIO_F_ACCESS_PLATFORM);
	dev->config_size = info.config_size;
	spin_lock_init(&dev->cfg_lock);
	spin_lock_init(&dev->irq_lock);
	INIT_LIST_HEAD(&dev->sync_node);
	mutex_init(&dev->cfg_mutex);
	dev->sync_config = dflags & VIRTIO_LO_DEV_F_SYNC_CONFIG;
	mutex_init(&dev->irqfd_lock);
	init_waitqueue_head(&dev->wait);
	INIT_WORK(&dev->register_work, vlo_register_work);
	INIT_DELAYED_WORK(&dev->drain_work, vlo_drain_work);
	for (i = 0; i < info.nqueues; i++) {
		struct vlo_queue *q = &dev->q[i];

		q->dev = dev;
		q->index = i;
		q->max_size = qinfo[i].size;
		spin_lock_init(&q->track_lock);
	}
	dev->config = kzalloc(max_t(u32, info.config_size, 1), GFP_KERNEL);
	if (!dev->config) {
		err = -ENOMEM;
		goto out_dev;
	}
	if (info.config_size && info.config &&
	    copy_from_user(dev->config, (void __user *)info.config, info.config_size)) {
		err = -EFAULT;
		goto out_dev;
	}
	err = vlo_get_eventfd(info.config_kick, &dev->config_kick);
	if (err)
		goto out_dev;
	for (i = 0; i < info.nqueues; i++) {
		err = vlo_get_eventfd(qinfo[i].kickfd, &dev->q[i].kick);
		if (err)
			goto out_dev;
	}

	dev->vdev.id.device = info.device_id;
	dev->vdev.id.vendor = info.vendor_id;
	dev->vdev.config = &vlo_config_ops;
	dev->vdev.dev.parent = vlo_root;
	dev->vdev.dev.release = vlo_vdev_release;

#if VLO_HAVE_POOL
	if (dflags & VIRTIO_LO_DEV_F_RESTRICTED) {
		size_t bytes = (size_t)(info.pool_kib ? info.pool_kib : min(pool_kib, VIRTIO_LO_POOL_MAX_KIB)) << 10;
		struct vlo_pdev *pd;

		for (i = 0; i < info.nqueues; i++)
			bytes += PAGE_ALIGN(vring_size(qinfo[i].size, PAGE_SIZE));
		dev->pool = vlo_pool_create(bytes);
		if (!dev->pool) {
			err = -ENOMEM;
			goto out_dev;
		}
		pd = vlo_pdev_create(dev->pool);
		if (IS_ERR(pd)) {
			err = PTR_ERR(pd);
			goto out_dev;
		}
		dev->pdev = pd;
		/* virtio_ring maps through the parent's DMA operations (vring_dma_dev). */
		dev->vdev.dev.parent = &pd->dev;
	}
#endif

	if (dev->sync_config) {
		struct vlo_dev *other;

		err = 0;
		dev->cfg_wbuf = kzalloc(max_t(u32, info.config_size, 1), GFP_KERNEL);
		if (!dev->cfg_wbuf) {
			err = -ENOMEM;
			goto out_dev;
		}
		/* The config eventfd names the device (CFG_GET/CFG_ACK): one per device. */
		spin_lock(&o->idr_lock);
		list_for_each_entry(other, &o->sync_devs, sync_node) {
			if (other->config_kick == dev->config_kick) {
				err = -EBUSY;
				break;
			}
		}
		if (!err)
			list_add_tail(&dev->sync_node, &o->sync_devs);
		spin_unlock(&o->idr_lock);
		if (err)
			goto out_dev;
	}

	queue_work(vlo_wq, &dev->register_work);
	left = wait_event_interruptible_timeout(dev->wait, vlo_probe_settled(dev),
						msecs_to_jiffies(probe_timeout_ms));
	if (!(READ_ONCE(dev->status) & VIRTIO_CONFIG_S_DRIVER_OK)) {
		err = left < 0 ? -EINTR : -ENOENT;
		goto out_teardown;
	}

	idr_preload(GFP_KERNEL);
	spin_lock(&o->idr_lock);
	id = idr_alloc(&o->devs, dev, 0, INT_MAX, GFP_NOWAIT);
	if (id >= 0)
		dev->idx = id;
	spin_unlock(&o->idr_lock);
	idr_preload_end();
	if (id < 0) {
		err = id;
		goto out_teardown;
	}

	info.idx = dev->idx;
	info.features = dev->vdev.features;
	spin_lock_irqsave(&dev->irq_lock, flags);
	for (i = 0; i < info.nqueues; i++) {
		struct vlo_queue *q = &dev->q[i];

		if (q->vq) {
			qinfo[i].size = q->num;
			qinfo[i].desc = vlo_ring_addr(dev, q->vr.desc);
			qinfo[i].avail = vlo_ring_addr(dev, q->vr.avail);
			qinfo[i].used = vlo_ring_addr(dev, q->vr.used);
		} else {
			qinfo[i].size = 0;
			qinfo[i].desc = qinfo[i].avail = qinfo[i].used = 0;
		}
	}
	spin_unlock_irqrestore(&dev->irq_lock, flags);
	err = 0;
	if (copy_to_user((void __user *)info.qinfo, qinfo, info.nqueues * sizeof(*qinfo)) ||
	    copy_to_user(uarg, &info, sizeof(info)))
		err = -EFAULT;
	if (!err && info.config_size && info.config) {
		u8 *tmp = kmalloc(info.config_size, GFP_KERNEL);

		if (!tmp) {
			err = -ENOMEM;
		} else {
			spin_lock_irqsave(&dev->cfg_lock, flags);
			memcpy(tmp, dev->config, info.config_size);
			spin_unlock_irqrestore(&dev->cfg_lock, flags);
			if (copy_to_user((void __user *)info.config, tmp, info.config_size))
				err = -EFAULT;
			kfree(tmp);
		}
	}
	if (err) {
		spin_lock(&o->idr_lock);
		idr_remove(&o->devs, dev->idx);
		spin_unlock(&o->idr_lock);
		goto out_teardown;
	}
	kfree(qinfo);
	return 0;

out_teardown:
	kfree(qinfo);
	vlo_dev_teardown(dev);
	return err;
out_dev:
#if VLO_HAVE_POOL
	if (dev->pdev)
		device_unregister(&dev->pdev->dev);
#endif
	vlo_dev_put(dev);
out_free:
	kfree(qinfo);
	return err;
}

static long vlo_ioctl_deldev(struct vlo_owner *o, unsigned long idx)
{
	struct vlo_dev *dev;

	atomic_inc(&vlo_deldev_calls);
	if (upstream_abi)
		pr_notice("virtio-lo: upstream_abi: DELDEV %lu (the upstream driver removes the device in atomic context here)\n",
			  idx);
	if (idx > INT_MAX)
		return -EINVAL;
	spin_lock(&o->idr_lock);
	dev = idr_remove(&o->devs, idx);
	spin_unlock(&o->idr_lock);
	if (!dev)
		return -ENODEV;
	vlo_dev_teardown(dev);
	return 0;
}

static long vlo_ioctl_conf(struct vlo_owner *o, void __user *uarg, bool write)
{
	struct virtio_lo_config c;
	struct vlo_dev *dev;
	unsigned long flags;
	u8 *tmp;
	long err = 0;

	if (copy_from_user(&c, uarg, sizeof(c)))
		return -EFAULT;
	dev = vlo_get_dev(o, c.idx);
	if (!dev)
		return -ENODEV;
	if (c.offset > dev->config_size || c.len > dev->config_size - c.offset) {
		err = -EINVAL;
		goto out;
	}
	if (!c.len)
		goto out;
	tmp = kmalloc(c.len, GFP_KERNEL);
	if (!tmp) {
		err = -ENOMEM;
		goto out;
	}
	if (write) {
		if (copy_from_user(tmp, (void __user *)c.config, c.len)) {
			err = -EFAULT;
		} else {
			spin_lock_irqsave(&dev->cfg_lock, flags);
			memcpy(dev->config + c.offset, tmp, c.len);
			dev->generation++;
			spin_unlock_irqrestore(&dev->cfg_lock, flags);
			virtio_config_changed(&dev->vdev);
		}
	} else {
		spin_lock_irqsave(&dev->cfg_lock, flags);
		memcpy(tmp, dev->config + c.offset, c.len);
		spin_unlock_irqrestore(&dev->cfg_lock, flags);
		if (copy_to_user((void __user *)c.config, tmp, c.len))
			err = -EFAULT;
	}
	kfree(tmp);
out:
	vlo_dev_put(dev);
	return err;
}

static long vlo_ioctl_cfgwrite(struct vlo_owner *o, void __user *uarg, bool ack)
{
	struct virtio_lo_cfgwrite w;
	struct vlo_dev *dev;
	unsigned long flags;
	u32 n = 0;
	u8 *tmp;
	long err = 0;

	if (copy_from_user(&w, uarg, sizeof(w)))
		return -EFAULT;
	dev = vlo_find_sync(o, w.fd);
	if (IS_ERR(dev))
		return PTR_ERR(dev);
	tmp = kmalloc(max_t(u32, dev->config_size, 1), GFP_KERNEL);
	if (!tmp) {
		err = -ENOMEM;
		goto out;
	}
	if (ack) {
		if (w.offset > dev->config_size || w.len > dev->config_size - w.offset) {
			err = -EINVAL;
			goto out_free;
		}
		if (w.len && copy_from_user(tmp, u64_to_user_ptr(w.data), w.len)) {
			err = -EFAULT;
			goto out_free;
		}
		spin_lock_irqsave(&dev->cfg_lock, flags);
		if (dev->cfg_seq == dev->cfg_acked || w.seq != dev->cfg_seq) {
			err = -ESTALE;
		} else {
			if (w.len && memcmp(dev->config + w.offset, tmp, w.len)) {
				memcpy(dev->config + w.offset, tmp, w.len);
				dev->generation++;
			}
			WRITE_ONCE(dev->cfg_acked, w.seq);
		}
		spin_unlock_irqrestore(&dev->cfg_lock, flags);
		if (!err)
			wake_up_all(&dev->wait);
		goto out_free;
	}
	spin_lock_irqsave(&dev->cfg_lock, flags);
	if (dev->cfg_seq != dev->cfg_acked) {
		w.seq = dev->cfg_seq;
		w.offset = dev->cfg_off;
		n = min(w.len, dev->cfg_len);
		w.len = dev->cfg_len;
		memcpy(tmp, dev->cfg_wbuf, n);
	} else {
		w.seq = 0;
		w.offset = 0;
		w.len = 0;
	}
	spin_unlock_irqrestore(&dev->cfg_lock, flags);
	if ((n && copy_to_user(u64_to_user_ptr(w.data), tmp, n)) ||
	    copy_to_user(uarg, &w, sizeof(w)))
		err = -EFAULT;
out_free:
	kfree(tmp);
out:
	vlo_dev_put(dev);
	return err;
}

static long vlo_ioctl_kick(struct vlo_owner *o, void __user *uarg)
{
	struct virtio_lo_kick k;
	struct vlo_dev *dev;
	long err = 0;

	if (copy_from_user(&k, uarg, sizeof(k)))
		return -EFAULT;
	dev = vlo_get_dev(o, k.idx);
	if (!dev)
		return -ENODEV;
	if (k.qidx < -1 || (k.qidx >= 0 && (u32)k.qidx >= dev->nqueues) ||
	    (k.qidx == -1 && upstream_abi))
		err = -EINVAL;
	else
		vlo_interrupt(dev, k.qidx);
	vlo_dev_put(dev);
	return err;
}

static long vlo_ioctl_irqfd(struct vlo_owner *o, void __user *uarg)
{
	struct virtio_lo_irqfd a;
	struct vlo_dev *dev;
	long err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.flags)
		return -EINVAL;
	dev = vlo_get_dev(o, a.idx);
	if (!dev)
		return -ENODEV;
	err = vlo_irqfd_set(dev, a.qidx, a.fd);
	vlo_dev_put(dev);
	return err;
}

struct vlo_ramwalk {
	struct virtio_lo_mem_range *r;
	u32 n;
};

static int vlo_ram_cb(struct resource *res, void *arg)
{
	struct vlo_ramwalk *w = arg;
	u64 start = PAGE_ALIGN(res->start);
	u64 end = (res->end + 1) & PAGE_MASK;

	if (end <= start)
		return 0;
	/* Nested System RAM resources (kernel code/data) overlap their parent. */
	if (w->n && start < w->r[w->n - 1].start + w->r[w->n - 1].size) {
		struct virtio_lo_mem_range *l = &w->r[w->n - 1];

		if (end > l->start + l->size)
			l->size = end - l->start;
		return 0;
	}
	if (w->n >= VLO_MAX_RAM_RANGES)
		return 0;
	w->r[w->n].start = start;
	w->r[w->n].size = end - start;
	w->n++;
	return 0;
}

static long vlo_ioctl_getram(struct vlo_owner *o, void __user *uarg)
{
	struct virtio_lo_ramlist l;
	struct vlo_ramwalk w = { };
	long err = 0;
	u32 n;

	if (READ_ONCE(o->restricted))
		return -EPERM;
	if (copy_from_user(&l, uarg, sizeof(l)))
		return -EFAULT;
	w.r = kvcalloc(VLO_MAX_RAM_RANGES, sizeof(*w.r), GFP_KERNEL);
	if (!w.r)
		return -ENOMEM;
	walk_iomem_res_desc(IORES_DESC_NONE, IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY,
			    0, -1, &w, vlo_ram_cb);
	n = min(l.count, w.n);
	if (n && copy_to_user(u64_to_user_ptr(l.ranges), w.r, n * sizeof(*w.r)))
		err = -EFAULT;
	l.count = n;
	l.total = w.n;
	if (!err && copy_to_user(uarg, &l, sizeof(l)))
		err = -EFAULT;
	kvfree(w.r);
	return err;
}

static long vlo_ioctl_devstatus(struct vlo_owner *o, void __user *uarg)
{
	struct virtio_lo_devstatus s;
	struct vlo_dev *dev;
	unsigned long flags;

	if (copy_from_user(&s, uarg, sizeof(s)))
		return -EFAULT;
	if (s.flags & ~(VIRTIO_LO_STATUS_F_NEEDS_RESET | VIRTIO_LO_STATUS_F_BREAK))
		return -EINVAL;
	dev = vlo_get_dev(o, s.idx);
	if (!dev)
		return -ENODEV;
	if (s.flags & VIRTIO_LO_STATUS_F_BREAK) {
		spin_lock_irqsave(&dev->irq_lock, flags);
		if (!dev->dying) {
			dev->user_broke = true;
			virtio_break_device(&dev->vdev);
		}
		spin_unlock_irqrestore(&dev->irq_lock, flags);
	}
	if (s.flags & (VIRTIO_LO_STATUS_F_NEEDS_RESET | VIRTIO_LO_STATUS_F_BREAK)) {
		spin_lock_irqsave(&dev->cfg_lock, flags);
		WRITE_ONCE(dev->status, dev->status | VIRTIO_CONFIG_S_NEEDS_RESET);
		spin_unlock_irqrestore(&dev->cfg_lock, flags);
		virtio_config_changed(&dev->vdev);
	}
	spin_lock_irqsave(&dev->cfg_lock, flags);
	s.status = dev->status;
	s.reset_count = dev->reset_count;
	s.generation = dev->generation;
	spin_unlock_irqrestore(&dev->cfg_lock, flags);
	s.features = dev->vdev.features;
	s.reserved = 0;
	vlo_dev_put(dev);
	return copy_to_user(uarg, &s, sizeof(s)) ? -EFAULT : 0;
}

static long vlo_ioctl_getqueue(struct vlo_owner *o, void __user *uarg)
{
	struct virtio_lo_queue a;
	struct vlo_dev *dev;
	unsigned long flags;
	struct vlo_queue *q;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	dev = vlo_get_dev(o, a.idx);
	if (!dev)
		return -ENODEV;
	if (a.qidx >= dev->nqueues) {
		vlo_dev_put(dev);
		return -EINVAL;
	}
	q = &dev->q[a.qidx];
	a.size = 0;
	a.flags = 0;
	a.desc = a.avail = a.used = 0;
	spin_lock_irqsave(&dev->irq_lock, flags);
	if (q->vq) {
		a.size = q->num;
		a.flags = dev->vqs_live ? VIRTIO_LO_QUEUE_F_ACTIVE : 0;
		a.desc = vlo_ring_addr(dev, q->vr.desc);
		a.avail = vlo_ring_addr(dev, q->vr.avail);
		a.used = vlo_ring_addr(dev, q->vr.used);
	}
	spin_unlock_irqrestore(&dev->irq_lock, flags);
	vlo_dev_put(dev);
	return copy_to_user(uarg, &a, sizeof(a)) ? -EFAULT : 0;
}

static long vlo_ioctl_getpool(struct vlo_owner *o, void __user *uarg)
{
	struct virtio_lo_pool a;
	struct vlo_dev *dev;
	long err = 0;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	dev = vlo_get_dev(o, a.idx);
	if (!dev)
		return -ENODEV;
	if (!dev->pool) {
		err = -EINVAL;
	} else if (a.idx >= (1U << 30)) {
		err = -ERANGE;		/* mmap offsets stay below 2^63 */
	} else {
		a.flags = 0;
		a.iova = VIRTIO_LO_POOL_IOVA;
		a.size = dev->pool->size;
		a.mmap_offset = VIRTIO_LO_POOL_MMAP_BASE + ((u64)a.idx << VIRTIO_LO_POOL_MMAP_SHIFT);
		if (copy_to_user(uarg, &a, sizeof(a)))
			err = -EFAULT;
	}
	vlo_dev_put(dev);
	return err;
}

static long vlo_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct vlo_owner *o = file->private_data;
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case VIRTIO_LO_ADDDEV:
		return vlo_ioctl_adddev(o, uarg);
	case VIRTIO_LO_DELDEV:
		return vlo_ioctl_deldev(o, arg);
	case VIRTIO_LO_GCONF:
		return vlo_ioctl_conf(o, uarg, false);
	case VIRTIO_LO_SCONF:
		return vlo_ioctl_conf(o, uarg, true);
	case VIRTIO_LO_KICK:
		return vlo_ioctl_kick(o, uarg);
	}
	if (upstream_abi)
		return _IOC_TYPE(cmd) == _IOC_TYPE(VIRTIO_LO_ADDDEV) ? -EINVAL : -ENOTTY;
	switch (cmd) {
	case VIRTIO_LO_GETEXT: {
		struct virtio_lo_ext e = {
			.version = VIRTIO_LO_ABI_VERSION,
			.max_queues = VIRTIO_LO_MAX_QUEUES,
			.max_queue_size = VIRTIO_LO_MAX_QUEUE_SIZE,
			.max_config_size = VIRTIO_LO_MAX_CONFIG_SIZE,
			.extensions = VIRTIO_LO_EXT_IRQFD | VIRTIO_LO_EXT_RAMLIST |
				      VIRTIO_LO_EXT_DEVSTATUS | VIRTIO_LO_EXT_GETQUEUE |
				      VIRTIO_LO_EXT_ABORT_INFLIGHT | VIRTIO_LO_EXT_KICK_ALL |
				      VIRTIO_LO_EXT_SYNC_CONFIG |
				      (IS_ENABLED(CONFIG_MEMORY_HOTPLUG) ? VIRTIO_LO_EXT_RAM_HOTPLUG : 0) |
				      (VLO_HAVE_POOL ? VIRTIO_LO_EXT_RESTRICTED : 0) |
				      (mmap_ram_only ? VIRTIO_LO_EXT_MMAP_RAM_ONLY : 0),
		};
		return copy_to_user(uarg, &e, sizeof(e)) ? -EFAULT : 0;
	}
	case VIRTIO_LO_SET_IRQFD:
		return vlo_ioctl_irqfd(o, uarg);
	case VIRTIO_LO_GET_RAM:
		return vlo_ioctl_getram(o, uarg);
	case VIRTIO_LO_DEVSTATUS:
		return vlo_ioctl_devstatus(o, uarg);
	case VIRTIO_LO_GET_QUEUE:
		return vlo_ioctl_getqueue(o, uarg);
	case VIRTIO_LO_CFG_GET:
		return vlo_ioctl_cfgwrite(o, uarg, false);
	case VIRTIO_LO_CFG_ACK:
		return vlo_ioctl_cfgwrite(o, uarg, true);
	case VIRTIO_LO_GET_POOL:
		return vlo_ioctl_getpool(o, uarg);
	case VIRTIO_LO_RESTRICT:
		WRITE_ONCE(o->restricted, true);
		return 0;
	}
	return -ENOTTY;
}

/* ---------------------------------------------------------------------- */
/* mmap                                                                    */

static void vlo_vm_open(struct vm_area_struct *vma)
{
	struct vlo_owner *o = vma->vm_private_data;

	spin_lock(&o->grave_lock);
	o->nmaps++;
	spin_unlock(&o->grave_lock);
}

static void vlo_vm_close(struct vm_area_struct *vma)
{
	struct vlo_owner *o = vma->vm_private_data;
	LIST_HEAD(list);

	spin_lock(&o->grave_lock);
	if (!--o->nmaps)
		list_splice_init(&o->grave, &list);
	spin_unlock(&o->grave_lock);
	vlo_free_grave(&list);
}

/*
 * Memory hot-plug.  A RAM mapping is made with remap_pfn_range() (every page present from the start), but a memory
 * block that goes offline (and may then be removed, physically on real hardware) must not stay mapped into user
 * space, and a block coming online must not keep whatever was mapped while it was offline.  The notifier unmaps the
 * block from every owner's RAM mappings (unmap_mapping_range on the file's address_space: the mmap offset is the
 * physical address); the next access faults into vlo_ram_fault, which maps the real page while the block is online
 * and a scratch page while it is not.  A device process therefore never gets SIGBUS: only a driver bug (a buffer in
 * memory being offlined; its pages are migrated or it cannot go offline) would make it read scratch data.
 * Unmapped at GOING_* and again after the change (ONLINE/OFFLINE), so a fault racing the state change is undone.
 */
static LIST_HEAD(vlo_owners);
static DEFINE_MUTEX(vlo_owners_lock);
static struct page *vlo_scratch;
static atomic_long_t vlo_ram_refaults = ATOMIC_LONG_INIT(0), vlo_ram_scratch_faults = ATOMIC_LONG_INIT(0);

static int vlo_ram_faults_get(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%ld %ld\n", atomic_long_read(&vlo_ram_refaults), atomic_long_read(&vlo_ram_scratch_faults));
}

static const struct kernel_param_ops vlo_ram_faults_ops = {
	.get = vlo_ram_faults_get,
};
module_param_cb(ram_faults, &vlo_ram_faults_ops, NULL, 0444);
MODULE_PARM_DESC(ram_faults, "RAM pages mapped again after a memory block changed state: online, then scratch (offline) (read-only)");

static vm_fault_t vlo_ram_fault(struct vm_fault *vmf)
{
	struct vm_area_struct *vma = vmf->vma;
	unsigned long pfn = vma->vm_pgoff + ((vmf->address - vma->vm_start) >> PAGE_SHIFT);

	if (pfn_to_online_page(pfn)) {
		atomic_long_inc(&vlo_ram_refaults);
	} else {
		atomic_long_inc(&vlo_ram_scratch_faults);
		pfn = page_to_pfn(vlo_scratch);
	}
	return vmf_insert_pfn(vma, vmf->address & PAGE_MASK, pfn);
}

static const struct vm_operations_struct vlo_vm_ops = {
	.open = vlo_vm_open,
	.close = vlo_vm_close,
	.fault = vlo_ram_fault,
};

#ifdef CONFIG_MEMORY_HOTPLUG
static int vlo_memory_notify(struct notifier_block *nb, unsigned long action, void *arg)
{
	struct memory_notify *mn = arg;
	struct vlo_owner *o;

	switch (action) {
	case MEM_GOING_ONLINE:
	case MEM_ONLINE:
	case MEM_GOING_OFFLINE:
	case MEM_OFFLINE:
	case MEM_CANCEL_ONLINE:
	case MEM_CANCEL_OFFLINE:
		break;
	default:
		return NOTIFY_OK;
	}
	mutex_lock(&vlo_owners_lock);
	list_for_each_entry(o, &vlo_owners, node)
		unmap_mapping_range(o->mapping, (loff_t)PFN_PHYS(mn->start_pfn), (loff_t)PFN_PHYS(mn->nr_pages), 1);
	mutex_unlock(&vlo_owners_lock);
	return NOTIFY_OK;
}

static struct notifier_block vlo_memory_nb = {
	.notifier_call = vlo_memory_notify,
};
#endif

static void vlo_pool_vm_open(struct vm_area_struct *vma)
{
	struct vlo_pool *p = vma->vm_private_data;

	kref_get(&p->ref);
}

static void vlo_pool_vm_close(struct vm_area_struct *vma)
{
	vlo_pool_put(vma->vm_private_data);
}

static const struct vm_operations_struct vlo_pool_vm_ops = {
	.open = vlo_pool_vm_open,
	.close = vlo_pool_vm_close,
};

/* A restricted device's pool, from rel = mmap offset - VIRTIO_LO_POOL_MMAP_BASE (device index, offset inside). */
static int vlo_mmap_pool(struct vlo_owner *o, struct vm_area_struct *vma, u64 rel, unsigned long size)
{
	u64 idx = rel >> VIRTIO_LO_POOL_MMAP_SHIFT, inner = rel & ((1ULL << VIRTIO_LO_POOL_MMAP_SHIFT) - 1);
	struct vlo_dev *dev;
	int err;

	if (idx >= (1U << 30))
		return -EINVAL;
	dev = vlo_get_dev(o, idx);
	if (!dev)
		return -ENODEV;
	if (!dev->pool || inner >= dev->pool->size || size > dev->pool->size - inner) {
		err = -EINVAL;
	} else {
		/* Only the pool's own pages (vm_insert_page of each), never a page beyond it. */
		err = remap_vmalloc_range(vma, dev->pool->va, inner >> PAGE_SHIFT);
		if (!err) {
			kref_get(&dev->pool->ref);
			vma->vm_private_data = dev->pool;
			vma->vm_ops = &vlo_pool_vm_ops;
		}
	}
	vlo_dev_put(dev);
	return err;
}

static int vlo_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct vlo_owner *o = file->private_data;
	unsigned long size = vma->vm_end - vma->vm_start;
	u64 start = (u64)vma->vm_pgoff << PAGE_SHIFT;
	int err;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	if ((start >> PAGE_SHIFT) != vma->vm_pgoff || start + size < start)
		return -EINVAL;
	if (start >= VIRTIO_LO_POOL_MMAP_BASE)
		return vlo_mmap_pool(o, vma, start - VIRTIO_LO_POOL_MMAP_BASE, size);
	if (READ_ONCE(o->restricted))
		return -EPERM;			/* VIRTIO_LO_RESTRICT, restricted_only: pools only */
	if (mmap_ram_only &&
	    region_intersects(start, size, IORESOURCE_SYSTEM_RAM, IORES_DESC_NONE) !=
	    REGION_INTERSECTS)
		return -EPERM;
	vma->vm_ops = &vlo_vm_ops;
	vma->vm_private_data = o;
	err = remap_pfn_range(vma, vma->vm_start, vma->vm_pgoff, size, vma->vm_page_prot);
	if (err)
		return err;
	vlo_vm_open(vma);
	return 0;
}

/* ---------------------------------------------------------------------- */

static int vlo_open(struct inode *inode, struct file *file)
{
	struct vlo_owner *o = kzalloc(sizeof(*o), GFP_KERNEL);

	if (!o)
		return -ENOMEM;
	o->restricted = READ_ONCE(restricted_only);
	spin_lock_init(&o->idr_lock);
	idr_init(&o->devs);
	INIT_LIST_HEAD(&o->sync_devs);
	spin_lock_init(&o->grave_lock);
	INIT_LIST_HEAD(&o->grave);
	o->mapping = file->f_mapping;
	file->private_data = o;
	mutex_lock(&vlo_owners_lock);
	list_add(&o->node, &vlo_owners);
	mutex_unlock(&vlo_owners_lock);
	return 0;
}

static int vlo_release(struct inode *inode, struct file *file)
{
	struct vlo_owner *o = file->private_data;
	struct vlo_dev *dev;
	int id;

	mutex_lock(&vlo_owners_lock);
	list_del(&o->node);
	mutex_unlock(&vlo_owners_lock);
	for (;;) {
		spin_lock(&o->idr_lock);
		id = 0;
		dev = idr_get_next(&o->devs, &id);
		if (dev)
			idr_remove(&o->devs, id);
		spin_unlock(&o->idr_lock);
		if (!dev)
			break;
		vlo_dev_teardown(dev);
	}
	idr_destroy(&o->devs);
	/* No mapping can exist any more: each holds a file reference. */
	WARN_ON(o->nmaps);
	vlo_free_grave(&o->grave);
	kfree(o);
	return 0;
}

static const struct file_operations vlo_fops = {
	.owner		= THIS_MODULE,
	.open		= vlo_open,
	.release	= vlo_release,
	.unlocked_ioctl	= vlo_ioctl,
	.mmap		= vlo_mmap,
	.llseek		= noop_llseek,
};

static struct miscdevice vlo_misc = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "virtio-lo",
	.fops	= &vlo_fops,
	.mode	= 0600,
};

static int __init vlo_init(void)
{
	int err;

	BUILD_BUG_ON(sizeof(struct virtio_lo_devinfo) != 56);
	BUILD_BUG_ON(sizeof(struct virtio_lo_qinfo) != 32);
	BUILD_BUG_ON(sizeof(struct virtio_lo_config) != 24);
	BUILD_BUG_ON(sizeof(struct virtio_lo_kick) != 8);
	BUILD_BUG_ON(sizeof(struct virtio_lo_cfgwrite) != 24);
	BUILD_BUG_ON(VIRTIO_LO_CFG_GET != 0xC0185045);
	BUILD_BUG_ON(VIRTIO_LO_CFG_ACK != 0x40185046);
	BUILD_BUG_ON(VIRTIO_LO_ADDDEV != 0xC0385001);
	BUILD_BUG_ON(VIRTIO_LO_DELDEV != 0x40045002);
	BUILD_BUG_ON(VIRTIO_LO_GCONF != 0x80185014);
	BUILD_BUG_ON(VIRTIO_LO_SCONF != 0x40185015);
	BUILD_BUG_ON(VIRTIO_LO_KICK != 0x4018501E);
	BUILD_BUG_ON(sizeof(struct virtio_lo_pool) != 32);
	BUILD_BUG_ON(VIRTIO_LO_GET_POOL != 0xC0205047);

	vlo_root = root_device_register("virtio-lo");
	if (IS_ERR(vlo_root))
		return PTR_ERR(vlo_root);
	/*
	 * Drivers that map their buffers through the DMA API of the virtio device's parent (virtio-gpu: DRM's shmem
	 * helper does dma_map_sgtable() on it, and 6.12's probe sets its max segment size) need a DMA mask and DMA
	 * parameters there, else the mapping fails with a WARN. The devices reach all of RAM by physical address
	 * (loopbackd maps System RAM), and the root device has no DMA ops: direct mapping, DMA address = physical
	 * address, 64 bits, no segment limits.
	 */
	vlo_dma_parms.max_segment_size = UINT_MAX;
	vlo_dma_parms.segment_boundary_mask = ULONG_MAX;
	vlo_root->dma_parms = &vlo_dma_parms;
	err = dma_coerce_mask_and_coherent(vlo_root, DMA_BIT_MASK(64));
	if (err)
		goto out_root;
	vlo_scratch = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!vlo_scratch) {
		err = -ENOMEM;
		goto out_root;
	}
	vlo_wq = alloc_workqueue("virtio-lo", WQ_UNBOUND, 0);
	if (!vlo_wq) {
		err = -ENOMEM;
		goto out_scratch;
	}
#ifdef CONFIG_MEMORY_HOTPLUG
	err = register_memory_notifier(&vlo_memory_nb);
	if (err)
		goto out_wq;
#endif
	err = misc_register(&vlo_misc);
	if (err)
		goto out_notifier;
	return 0;
out_notifier:
#ifdef CONFIG_MEMORY_HOTPLUG
	unregister_memory_notifier(&vlo_memory_nb);
out_wq:
#endif
	destroy_workqueue(vlo_wq);
out_scratch:
	__free_page(vlo_scratch);
out_root:
	root_device_unregister(vlo_root);
	return err;
}

static void __exit vlo_exit(void)
{
	misc_deregister(&vlo_misc);
#ifdef CONFIG_MEMORY_HOTPLUG
	unregister_memory_notifier(&vlo_memory_nb);
#endif
	destroy_workqueue(vlo_wq);
	__free_page(vlo_scratch);
	root_device_unregister(vlo_root);
}

module_init(vlo_init);
module_exit(vlo_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("virtio-loopback: virtio devices implemented in user space (virtio-lo ABI)");
