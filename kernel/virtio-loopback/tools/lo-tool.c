// SPDX-License-Identifier: GPL-2.0
/*
 * lo-tool: a tiny user-space device for /dev/virtio-lo, used to test the
 * virtio_loopback module without loopbackd.
 *
 *   lo-tool serve [--rng N] [--blk MIB]... [--ro] [--irqfd] [--stall-after N]
 *                 [--deldev-on-term] [--queue-size N]
 *       SIGUSR1 makes the device stop completing requests (a hung device).
 *       ADDDEV N virtio-rng devices and/or RAM-backed virtio-blk devices on
 *       one open file, print "READY" and serve them until SIGTERM/SIGINT.
 *   lo-tool ext          print VIRTIO_LO_GETEXT and the RAM ranges
 *   lo-tool bad          feed hostile arguments to every ioctl; exit 1 if the
 *                        module accepts one of them
 *   lo-tool adddel N     ADDDEV+DELDEV an unserved rng device N times
 *   lo-tool upstream     check the upstream virtio-lo ABI surface (module
 *                        loaded with upstream_abi=1): every extension ioctl
 *                        fails with EINVAL, other ioctl types with ENOTTY
 *   lo-tool syncconf [answer|silent|timeout|kill]
 *                        a minimal virtio-input device added with
 *                        VIRTIO_LO_DEV_F_SYNC_CONFIG (needs virtio_input):
 *                        answer: a second thread answers the driver's
 *                        select/subsel writes (CFG_GET/CFG_ACK) while ADDDEV
 *                        blocks; the input device gets our name and ids.
 *                        silent: nobody answers: ADDDEV must fail (probe
 *                        timeout), not hang.  timeout: nobody answers and
 *                        sync_config_timeout_ms is short: the driver goes on
 *                        with the module's copy (ADDDEV succeeds).
 *                        kill: a child that ADDDEVs
 *                        without answering is SIGKILLed; it must go at once.
 *
 *   lo-tool restricted   restricted memory (needs virtio-rng): a restricted
 *                        rng device's rings and posted buffers are pool
 *                        addresses, its pool maps and nothing past it does;
 *                        after VIRTIO_LO_RESTRICT RAM mmap, GET_RAM and an
 *                        unrestricted ADDDEV fail with EPERM
 *
 * Build: gcc -static -O2 -Wall -I.. -o lo-tool lo-tool.c -lpthread
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <pthread.h>
#include <time.h>
#include "uapi/virtio_lo.h"

#define MAXDEV 16
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define F_VERSION_1 (1ULL << 32)
#define F_INDIRECT (1ULL << 28)
#define F_BLK_RO (1ULL << 5)
#define F_BLK_FLUSH (1ULL << 9)

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct avail { uint16_t flags, idx, ring[]; };
struct used_elem { uint32_t id, len; };
struct used { uint16_t flags, idx; struct used_elem ring[]; };

struct ram { uint64_t start, size; uint8_t *va; };
static struct ram ram[64];
static int nram;

struct dev {
	int type;		/* 4 rng, 2 blk */
	uint32_t idx;
	int kickfd, irqfd;
	uint32_t num;
	struct desc *desc;
	struct avail *avail;
	struct used *used;
	uint16_t last_avail;
	uint8_t *disk;
	uint64_t disk_bytes;
	int ro;
	uint64_t served;
};

static int lofd = -1;
static struct dev devs[MAXDEV];
static int ndev;
static volatile sig_atomic_t stop, stall_now;
static long stall_after = -1;
static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;

static void die(const char *what)
{
	fprintf(stderr, "lo-tool: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void *pa(uint64_t addr, uint64_t len)
{
	for (int i = 0; i < nram; i++)
		if (addr >= ram[i].start && addr - ram[i].start + len <= ram[i].size &&
		    addr + len >= addr)
			return ram[i].va + (addr - ram[i].start);
	return NULL;
}

static void map_ram(void)
{
	struct virtio_lo_mem_range r[64];
	struct virtio_lo_ramlist l = { .count = 64, .ranges = (uint64_t)(uintptr_t)r };

	if (ioctl(lofd, VIRTIO_LO_GET_RAM, &l) < 0)
		die("GET_RAM");
	for (uint32_t i = 0; i < l.count; i++) {
		void *va = mmap(NULL, r[i].size, PROT_READ | PROT_WRITE, MAP_SHARED, lofd, r[i].start);
		if (va == MAP_FAILED)
			die("mmap RAM");
		ram[nram].start = r[i].start;
		ram[nram].size = r[i].size;
		ram[nram].va = va;
		nram++;
	}
}

static uint64_t xrand(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

struct seg { uint8_t *p; uint32_t len; int w; };

static int chain(struct dev *d, uint16_t head, struct seg *s, int max)
{
	struct desc *tbl = d->desc;
	uint32_t n = d->num, i = head;
	int k = 0;

	if (tbl[i].flags & VRING_DESC_F_INDIRECT) {
		tbl = pa(tbl[i].addr, tbl[i].len);
		if (!tbl)
			return -1;
		n = d->desc[head].len / sizeof(*tbl);
		i = 0;
	}
	for (uint32_t steps = 0; steps < n && i < n && k < max; steps++) {
		s[k].p = pa(tbl[i].addr, tbl[i].len);
		s[k].len = tbl[i].len;
		s[k].w = !!(tbl[i].flags & VRING_DESC_F_WRITE);
		if (!s[k].p)
			return -1;
		k++;
		if (!(tbl[i].flags & VRING_DESC_F_NEXT))
			break;
		i = tbl[i].next;
	}
	return k;
}

static uint32_t serve_rng(struct dev *d, struct seg *s, int n)
{
	uint32_t total = 0;

	for (int i = 0; i < n; i++) {
		if (!s[i].w)
			continue;
		for (uint32_t j = 0; j < s[i].len; j += 8) {
			uint64_t v = xrand();
			memcpy(s[i].p + j, &v, s[i].len - j < 8 ? s[i].len - j : 8);
		}
		total += s[i].len;
	}
	return total;
}

static uint32_t serve_blk(struct dev *d, struct seg *s, int n)
{
	struct { uint32_t type, reserved; uint64_t sector; } hdr;
	uint8_t *status;
	uint64_t off;
	uint32_t written = 0;

	if (n < 2 || s[0].len < 16 || !s[n - 1].w || !s[n - 1].len)
		return 0;
	memcpy(&hdr, s[0].p, 16);
	status = s[n - 1].p + s[n - 1].len - 1;
	s[n - 1].len--;		/* the status byte is not data */
	off = hdr.sector * 512;
	*status = 0;
	switch (hdr.type) {
	case 0: /* IN */
	case 1: /* OUT */
		for (int i = 1; i < n; i++) {
			if (!s[i].len)
				continue;
			if (off + s[i].len > d->disk_bytes || (hdr.type == 0) != s[i].w) {
				*status = 1;
				break;
			}
			if (hdr.type == 0) {
				memcpy(s[i].p, d->disk + off, s[i].len);
				written += s[i].len;
			} else if (d->ro) {
				*status = 1;
				break;
			} else {
				memcpy(d->disk + off, s[i].p, s[i].len);
			}
			off += s[i].len;
		}
		break;
	case 4: /* FLUSH */
		break;
	case 8: /* GET_ID */
		if (s[1].w && s[1].len)
			written = snprintf((char *)s[1].p, s[1].len, "lo-tool%u", d->idx);
		break;
	default:
		*status = 2;	/* UNSUPP */
	}
	return written + 1;
}

static void kick_driver(struct dev *d)
{
	if (d->irqfd >= 0) {
		uint64_t one = 1;
		if (write(d->irqfd, &one, 8) != 8)
			die("irqfd write");
	} else {
		struct virtio_lo_kick k = { d->idx, 0 };
		if (ioctl(lofd, VIRTIO_LO_KICK, &k) < 0)
			die("KICK");
	}
}

static void process(struct dev *d)
{
	struct seg s[260];
	int any = 0;

	for (;;) {
		uint16_t ai = __atomic_load_n(&d->avail->idx, __ATOMIC_ACQUIRE);
		if (ai == d->last_avail)
			break;
		while (d->last_avail != ai) {
			uint16_t head = d->avail->ring[d->last_avail % d->num];
			uint32_t len = 0;
			int n;

			if (stall_now || (stall_after >= 0 && (long)d->served >= stall_after))
				return;	/* simulate a hung device: never complete */
			n = chain(d, head, s, 260);
			if (n > 0)
				len = d->type == 4 ? serve_rng(d, s, n) : serve_blk(d, s, n);
			uint16_t ui = d->used->idx;
			d->used->ring[ui % d->num].id = head;
			d->used->ring[ui % d->num].len = len;
			__atomic_store_n(&d->used->idx, (uint16_t)(ui + 1), __ATOMIC_RELEASE);
			d->last_avail++;
			d->served++;
			any = 1;
		}
	}
	if (any)
		kick_driver(d);
}

static int adddev(int type, uint64_t features, void *cfg, uint32_t cfgsize, uint32_t qsize, struct dev *d)
{
	struct virtio_lo_qinfo q = { .kickfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), .size = qsize };
	struct virtio_lo_devinfo info = {
		.device_id = type, .vendor_id = 0x1af4, .nqueues = 1, .features = features,
		.config_size = cfgsize, .config_kick = -1, .config = cfg, .qinfo = &q,
	};

	if (ioctl(lofd, VIRTIO_LO_ADDDEV, &info) < 0)
		return -1;
	memset(d, 0, sizeof(*d));
	d->type = type;
	d->idx = info.idx;
	d->kickfd = q.kickfd;
	d->irqfd = -1;
	d->num = q.size;
	d->desc = pa(q.desc, 16ULL * q.size);
	d->avail = pa(q.avail, 4 + 2ULL * q.size);
	d->used = pa(q.used, 4 + 8ULL * q.size);
	if (!d->desc || !d->avail || !d->used) {
		fprintf(stderr, "lo-tool: ring outside mapped RAM\n");
		exit(1);
	}
	return 0;
}

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}


static void on_usr1(int sig)
{
	(void)sig;
	stall_now = 1;	/* stop completing requests from now on */
}

static int cmd_serve(int argc, char **argv)
{
	int nrng = 0, use_irqfd = 0, deldev = 0, ro = 0;
	uint32_t qsize = 64;
	uint64_t blk_mib[8];
	int nblk = 0;

	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--rng") && i + 1 < argc)
			nrng = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--blk") && i + 1 < argc && nblk < 8)
			blk_mib[nblk++] = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--ro"))
			ro = 1;
		else if (!strcmp(argv[i], "--irqfd"))
			use_irqfd = 1;
		else if (!strcmp(argv[i], "--deldev-on-term"))
			deldev = 1;
		else if (!strcmp(argv[i], "--stall-after") && i + 1 < argc)
			stall_after = atol(argv[++i]);
		else if (!strcmp(argv[i], "--queue-size") && i + 1 < argc)
			qsize = atoi(argv[++i]);
		else {
			fprintf(stderr, "lo-tool serve: bad argument %s\n", argv[i]);
			return 2;
		}
	}
	signal(SIGTERM, on_term);
	signal(SIGINT, on_term);
	signal(SIGUSR1, on_usr1);
	map_ram();
	for (int i = 0; i < nrng && ndev < MAXDEV; i++) {
		if (adddev(4, F_VERSION_1, NULL, 0, qsize, &devs[ndev]) < 0)
			die("ADDDEV rng");
		ndev++;
	}
	for (int i = 0; i < nblk && ndev < MAXDEV; i++) {
		uint8_t cfg[60] = { 0 };
		uint64_t bytes = blk_mib[i] << 20, sectors = bytes / 512;
		uint8_t *disk = calloc(1, bytes);

		if (!disk)
			die("calloc disk");
		memcpy(cfg, &sectors, 8);
		/* Fill the disk with a recognisable pattern. */
		for (uint64_t o = 0; o < bytes; o += 512)
			memcpy(disk + o, &o, 8);
		/* The driver reads the partition table during probe: serve
		 * from a second thread-less trick - ADDDEV returns at DRIVER_OK,
		 * the probe continues in the kernel and waits for us. */
		if (adddev(2, F_VERSION_1 | F_INDIRECT | F_BLK_FLUSH | (ro ? F_BLK_RO : 0),
			   cfg, sizeof(cfg), qsize, &devs[ndev]) < 0)
			die("ADDDEV blk");
		devs[ndev].disk = disk;
		devs[ndev].disk_bytes = bytes;
		devs[ndev].ro = ro;
		ndev++;
	}
	if (use_irqfd) {
		for (int i = 0; i < ndev; i++) {
			struct virtio_lo_irqfd a = { devs[i].idx, 0, eventfd(0, EFD_CLOEXEC), 0 };
			if (ioctl(lofd, VIRTIO_LO_SET_IRQFD, &a) < 0)
				die("SET_IRQFD");
			devs[i].irqfd = a.fd;
		}
	}
	printf("READY");
	for (int i = 0; i < ndev; i++)
		printf(" %s%u", devs[i].type == 4 ? "rng" : "blk", devs[i].idx);
	printf("\n");
	fflush(stdout);

	while (!stop) {
		struct pollfd p[MAXDEV];

		for (int i = 0; i < ndev; i++) {
			p[i].fd = devs[i].kickfd;
			p[i].events = POLLIN;
		}
		if (poll(p, ndev, 200) < 0 && errno != EINTR)
			die("poll");
		for (int i = 0; i < ndev; i++) {
			uint64_t v;
			if (read(devs[i].kickfd, &v, 8) < 0 && errno != EAGAIN)
				die("read kickfd");
			process(&devs[i]);
		}
	}
	if (deldev) {
		for (int i = 0; i < ndev; i++)
			if (ioctl(lofd, VIRTIO_LO_DELDEV, devs[i].idx) < 0)
				die("DELDEV");
		printf("DELETED\n");
	}
	return 0;
}

static int cmd_ext(void)
{
	struct virtio_lo_ext e;
	struct virtio_lo_mem_range r[64];
	struct virtio_lo_ramlist l = { .count = 64, .ranges = (uint64_t)(uintptr_t)r };

	if (ioctl(lofd, VIRTIO_LO_GETEXT, &e) < 0)
		die("GETEXT");
	printf("version %u max_queues %u max_queue_size %u max_config_size %u extensions 0x%llx\n",
	       e.version, e.max_queues, e.max_queue_size, e.max_config_size,
	       (unsigned long long)e.extensions);
	if (ioctl(lofd, VIRTIO_LO_GET_RAM, &l) < 0)
		die("GET_RAM");
	for (uint32_t i = 0; i < l.count; i++)
		printf("ram %#llx-%#llx\n", (unsigned long long)r[i].start,
		       (unsigned long long)(r[i].start + r[i].size - 1));
	return 0;
}

static int failures;

static void expect_fail(const char *what, int ret, int want_errno)
{
	if (ret >= 0) {
		printf("BAD accepted: %s\n", what);
		failures++;
	} else if (want_errno && errno != want_errno) {
		printf("BAD %s: errno %d (%s), wanted %d\n", what, errno, strerror(errno), want_errno);
		failures++;
	} else {
		printf("ok %s: %s\n", what, strerror(errno));
	}
}

static int try_add(uint32_t id, uint32_t nq, uint32_t qsize, uint32_t cfgsize, int cfgkick, int kickfd)
{
	struct virtio_lo_qinfo q[2] = { { .kickfd = kickfd, .size = qsize }, { .kickfd = -1, .size = 64 } };
	static uint8_t cfg[8192];
	struct virtio_lo_devinfo info = {
		.device_id = id, .vendor_id = 0x1af4, .nqueues = nq, .features = F_VERSION_1,
		.config_size = cfgsize, .config_kick = cfgkick, .config = cfg, .qinfo = q,
	};
	int r = ioctl(lofd, VIRTIO_LO_ADDDEV, &info);
	return r < 0 ? r : (int)info.idx;
}

static int cmd_bad(void)
{
	int efd = eventfd(0, EFD_CLOEXEC);
	int notefd = open("/proc/self/stat", O_RDONLY);
	uint8_t buf[16];

	expect_fail("nqueues 0", try_add(4, 0, 64, 0, -1, -1), EINVAL);
	expect_fail("nqueues 1000", try_add(4, 1000, 64, 0, -1, -1), EINVAL);
	expect_fail("queue size 100", try_add(4, 1, 100, 0, -1, -1), EINVAL);
	expect_fail("queue size 0", try_add(4, 1, 0, 0, -1, -1), EINVAL);
	expect_fail("queue size 65536", try_add(4, 1, 65536, 0, -1, -1), EINVAL);
	expect_fail("config_size huge", try_add(4, 1, 64, 0x7fffffff, -1, -1), EINVAL);
	expect_fail("config_size 8192", try_add(4, 1, 64, 8192, -1, -1), EINVAL);
	expect_fail("device id 0", try_add(0, 1, 64, 0, -1, -1), EINVAL);
	expect_fail("config_kick bad fd", try_add(4, 1, 64, 0, 987, -1), EBADF);
	expect_fail("config_kick -5", try_add(4, 1, 64, 0, -5, -1), EBADF);
	expect_fail("config_kick not eventfd", try_add(4, 1, 64, 0, notefd, -1), EINVAL);
	expect_fail("kickfd bad fd", try_add(4, 1, 64, 0, -1, 987), EBADF);
	expect_fail("kickfd not eventfd", try_add(4, 1, 64, 0, -1, notefd), EINVAL);
	expect_fail("unknown device id 0x7777 (no driver)", try_add(0x7777, 1, 64, 0, -1, -1), ENOENT);
	{
		struct virtio_lo_devinfo info = { .device_id = 4, .nqueues = 1, .qinfo = (void *)16 };
		expect_fail("qinfo bad pointer", ioctl(lofd, VIRTIO_LO_ADDDEV, &info), EFAULT);
	}
	expect_fail("ADDDEV bad arg pointer", ioctl(lofd, VIRTIO_LO_ADDDEV, (void *)16), EFAULT);
	expect_fail("DELDEV unknown", ioctl(lofd, VIRTIO_LO_DELDEV, 12345), ENODEV);
	expect_fail("DELDEV huge", ioctl(lofd, VIRTIO_LO_DELDEV, 0xffffffffUL), 0);
	{
		struct virtio_lo_kick k = { 999, 0 };
		expect_fail("KICK unknown idx", ioctl(lofd, VIRTIO_LO_KICK, &k), ENODEV);
	}
	{
		struct virtio_lo_config c = { .idx = 999, .len = 4, .config = buf };
		expect_fail("GCONF unknown idx", ioctl(lofd, VIRTIO_LO_GCONF, &c), ENODEV);
	}
	expect_fail("unknown ioctl", ioctl(lofd, _IO('P', 0x7f), 0), ENOTTY);

	{
		/*
		 * SYNC_CONFIG: flags, the eventfd as device name, ack rules.  Before the
		 * long-lived rng device below: an unserved rng device keeps the hwrng
		 * core's reading mutex, so a second rng device's registration (and its
		 * teardown) would wait for it.
		 */
		int sfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		struct virtio_lo_qinfo q = { .kickfd = -1, .size = 64 };
		struct virtio_lo_devinfo info = {
			.device_id = 4, .vendor_id = 0x1af4, .nqueues = 1, .features = F_VERSION_1,
			.config_size = 16, .config_kick = sfd, .flags = 4, .qinfo = &q,
		};
		struct virtio_lo_cfgwrite w = { .fd = -1, .len = sizeof(buf), .data = (uint64_t)(uintptr_t)buf };
		int sidx;

		expect_fail("ADDDEV unknown flag", ioctl(lofd, VIRTIO_LO_ADDDEV, &info), EINVAL);
		info.flags = VIRTIO_LO_DEV_F_SYNC_CONFIG;
		info.config_kick = -1;
		expect_fail("ADDDEV SYNC_CONFIG without config_kick", ioctl(lofd, VIRTIO_LO_ADDDEV, &info), EINVAL);
		expect_fail("CFG_GET fd -1", ioctl(lofd, VIRTIO_LO_CFG_GET, &w), EBADF);
		w.fd = 987;
		expect_fail("CFG_GET bad fd", ioctl(lofd, VIRTIO_LO_CFG_GET, &w), EBADF);
		w.fd = notefd;
		expect_fail("CFG_GET not eventfd", ioctl(lofd, VIRTIO_LO_CFG_GET, &w), EINVAL);
		w.fd = efd;
		expect_fail("CFG_GET eventfd of no SYNC device", ioctl(lofd, VIRTIO_LO_CFG_GET, &w), ENODEV);
		expect_fail("CFG_ACK eventfd of no SYNC device", ioctl(lofd, VIRTIO_LO_CFG_ACK, &w), ENODEV);
		info.config_kick = sfd;
		if (ioctl(lofd, VIRTIO_LO_ADDDEV, &info) < 0) {
			printf("BAD ADDDEV SYNC_CONFIG rng: %s\n", strerror(errno));
			failures++;
		} else {
			sidx = info.idx;
			expect_fail("ADDDEV second SYNC_CONFIG device, same eventfd", ioctl(lofd, VIRTIO_LO_ADDDEV, &info), EBUSY);
			w.fd = sfd;
			w.len = sizeof(buf);
			if (ioctl(lofd, VIRTIO_LO_CFG_GET, &w) < 0 || w.seq != 0) {
				printf("BAD CFG_GET idle: %s seq %u\n", strerror(errno), w.seq);
				failures++;
			}
			w.seq = 1;
			w.offset = 0;
			w.len = 4;
			expect_fail("CFG_ACK nothing pending", ioctl(lofd, VIRTIO_LO_CFG_ACK, &w), ESTALE);
			w.offset = 12;
			w.len = 8;
			expect_fail("CFG_ACK past end", ioctl(lofd, VIRTIO_LO_CFG_ACK, &w), EINVAL);
			w.offset = 0xfffffff0;
			w.len = 0x20;
			expect_fail("CFG_ACK offset wrap", ioctl(lofd, VIRTIO_LO_CFG_ACK, &w), EINVAL);
			w.offset = 0;
			w.len = 4;
			w.data = 16;
			expect_fail("CFG_ACK bad pointer", ioctl(lofd, VIRTIO_LO_CFG_ACK, &w), EFAULT);
			expect_fail("CFG_GET bad arg pointer", ioctl(lofd, VIRTIO_LO_CFG_GET, (void *)16), EFAULT);
			w.data = (uint64_t)(uintptr_t)buf;
			if (ioctl(lofd, VIRTIO_LO_DELDEV, sidx) < 0) {
				printf("BAD DELDEV SYNC_CONFIG: %s\n", strerror(errno));
				failures++;
			}
			expect_fail("CFG_GET after DELDEV", ioctl(lofd, VIRTIO_LO_CFG_GET, &w), ENODEV);
		}
		close(sfd);
	}


	/* A live rng device (ADDDEV returns at DRIVER_OK, nobody serves it). */
	int idx = try_add(4, 1, 64, 16, efd, -1);
	if (idx < 0) {
		printf("BAD ADDDEV good rng failed: %s\n", strerror(errno));
		return 1;
	}
	{
		struct virtio_lo_kick k = { idx, 1 };
		expect_fail("KICK qidx 1 of 1", ioctl(lofd, VIRTIO_LO_KICK, &k), EINVAL);
		k.qidx = -2;
		expect_fail("KICK qidx -2", ioctl(lofd, VIRTIO_LO_KICK, &k), EINVAL);
		k.qidx = INT32_MIN;
		expect_fail("KICK qidx INT_MIN", ioctl(lofd, VIRTIO_LO_KICK, &k), EINVAL);
		k.qidx = INT32_MAX;
		expect_fail("KICK qidx INT_MAX", ioctl(lofd, VIRTIO_LO_KICK, &k), EINVAL);
		k.qidx = -1;
		if (ioctl(lofd, VIRTIO_LO_KICK, &k) < 0) {
			printf("BAD KICK all: %s\n", strerror(errno));
			failures++;
		}
	}
	{
		struct virtio_lo_config c = { .idx = idx, .offset = 12, .len = 8, .config = buf };
		expect_fail("GCONF past end", ioctl(lofd, VIRTIO_LO_GCONF, &c), EINVAL);
		c.offset = 0xfffffff0;
		c.len = 0x20;
		expect_fail("GCONF offset wrap", ioctl(lofd, VIRTIO_LO_GCONF, &c), EINVAL);
		c.offset = 4;
		c.len = 0xfffffffc;
		expect_fail("GCONF len wrap", ioctl(lofd, VIRTIO_LO_GCONF, &c), EINVAL);
		expect_fail("SCONF len wrap", ioctl(lofd, VIRTIO_LO_SCONF, &c), EINVAL);
		c.offset = 17;
		c.len = 0;
		expect_fail("GCONF offset past end, len 0", ioctl(lofd, VIRTIO_LO_GCONF, &c), EINVAL);
		c.offset = 0;
		c.len = 4;
		c.config = (void *)16;
		expect_fail("SCONF bad pointer", ioctl(lofd, VIRTIO_LO_SCONF, &c), EFAULT);
		c.config = buf;
		if (ioctl(lofd, VIRTIO_LO_SCONF, &c) < 0 || ioctl(lofd, VIRTIO_LO_GCONF, &c) < 0) {
			printf("BAD SCONF/GCONF valid: %s\n", strerror(errno));
			failures++;
		}
	}
	{
		struct virtio_lo_irqfd a = { idx, 5, efd, 0 };
		expect_fail("SET_IRQFD qidx 5", ioctl(lofd, VIRTIO_LO_SET_IRQFD, &a), EINVAL);
		a.qidx = 0xffffffff;
		expect_fail("SET_IRQFD qidx 0xffffffff", ioctl(lofd, VIRTIO_LO_SET_IRQFD, &a), EINVAL);
		a.qidx = 0;
		a.fd = notefd;
		expect_fail("SET_IRQFD not eventfd", ioctl(lofd, VIRTIO_LO_SET_IRQFD, &a), EINVAL);
		a.fd = 999;
		expect_fail("SET_IRQFD bad fd", ioctl(lofd, VIRTIO_LO_SET_IRQFD, &a), EBADF);
		a.fd = efd;
		a.flags = 1;
		expect_fail("SET_IRQFD flags", ioctl(lofd, VIRTIO_LO_SET_IRQFD, &a), EINVAL);
		a.flags = 0;
		if (ioctl(lofd, VIRTIO_LO_SET_IRQFD, &a) < 0) {
			printf("BAD SET_IRQFD valid: %s\n", strerror(errno));
			failures++;
		}
		/* leave it installed: teardown must remove it */
	}
	{
		struct virtio_lo_devstatus s = { .idx = idx, .flags = 0x80 };
		expect_fail("DEVSTATUS bad flags", ioctl(lofd, VIRTIO_LO_DEVSTATUS, &s), EINVAL);
		s.flags = 0;
		if (ioctl(lofd, VIRTIO_LO_DEVSTATUS, &s) < 0 || !(s.status & 4)) {
			printf("BAD DEVSTATUS: %s status %#x\n", strerror(errno), s.status);
			failures++;
		} else {
			printf("ok DEVSTATUS status %#x features %#llx\n", s.status,
			       (unsigned long long)s.features);
		}
		s.flags = VIRTIO_LO_STATUS_F_NEEDS_RESET;
		if (ioctl(lofd, VIRTIO_LO_DEVSTATUS, &s) < 0 || !(s.status & 0x40)) {
			printf("BAD DEVSTATUS NEEDS_RESET: %s status %#x\n", strerror(errno), s.status);
			failures++;
		}
	}
	{
		struct virtio_lo_queue q = { .idx = idx, .qidx = 0 };
		if (ioctl(lofd, VIRTIO_LO_GET_QUEUE, &q) < 0 || q.size != 64 || !q.desc) {
			printf("BAD GET_QUEUE: %s\n", strerror(errno));
			failures++;
		}
		q.qidx = 1;
		expect_fail("GET_QUEUE qidx 1", ioctl(lofd, VIRTIO_LO_GET_QUEUE, &q), EINVAL);
		q.qidx = 0xffffffff;
		expect_fail("GET_QUEUE qidx 0xffffffff", ioctl(lofd, VIRTIO_LO_GET_QUEUE, &q), EINVAL);
	}
	{
		static struct virtio_lo_mem_range r[1024];
		struct virtio_lo_ramlist l = { .count = 4, .ranges = 16 };

		expect_fail("GET_RAM bad ranges pointer", ioctl(lofd, VIRTIO_LO_GET_RAM, &l), EFAULT);
		/* A huge count must not make the module write more than it has. */
		l.count = 0xffffffff;
		l.ranges = (uint64_t)(uintptr_t)r;
		if (ioctl(lofd, VIRTIO_LO_GET_RAM, &l) < 0 || l.count > l.total || l.count > 1024) {
			printf("BAD GET_RAM count 0xffffffff: %s count %u total %u\n", strerror(errno), l.count, l.total);
			failures++;
		}
	}
	expect_fail("mmap offset wrap", mmap(NULL, 8192, PROT_READ, MAP_SHARED, lofd, 0x7ffffffffffff000LL) == MAP_FAILED ? -1 : 0, 0);
	/* mmap outside RAM, private, and of an address far beyond memory. */
	expect_fail("mmap private", mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, lofd, 0x100000) == MAP_FAILED ? -1 : 0, EINVAL);
	expect_fail("mmap non-RAM (0xfee00000)", mmap(NULL, 4096, PROT_READ, MAP_SHARED, lofd, 0xfee00000UL) == MAP_FAILED ? -1 : 0, EPERM);
	expect_fail("mmap beyond RAM", mmap(NULL, 4096, PROT_READ, MAP_SHARED, lofd, 1ULL << 45) == MAP_FAILED ? -1 : 0, EPERM);

	if (ioctl(lofd, VIRTIO_LO_DELDEV, idx) < 0) {
		printf("BAD DELDEV: %s\n", strerror(errno));
		failures++;
	}
	expect_fail("DELDEV twice", ioctl(lofd, VIRTIO_LO_DELDEV, idx), ENODEV);

	/* A device whose queues user space broke must still tear down. */
	idx = try_add(4, 1, 64, 0, -1, -1);
	if (idx < 0) {
		printf("BAD ADDDEV for BREAK: %s\n", strerror(errno));
		failures++;
	} else {
		struct virtio_lo_devstatus s = { .idx = idx, .flags = VIRTIO_LO_STATUS_F_BREAK };
		if (ioctl(lofd, VIRTIO_LO_DEVSTATUS, &s) < 0 || !(s.status & 0x40)) {
			printf("BAD DEVSTATUS BREAK: %s\n", strerror(errno));
			failures++;
		}
		if (ioctl(lofd, VIRTIO_LO_DELDEV, idx) < 0) {
			printf("BAD DELDEV after BREAK: %s\n", strerror(errno));
			failures++;
		} else {
			printf("ok DELDEV after BREAK\n");
		}
	}
	printf("bad-input failures: %d\n", failures);
	return failures ? 1 : 0;
}

static int cmd_adddel(int n)
{
	for (int i = 0; i < n; i++) {
		int idx = try_add(4, 1, 64, 0, -1, -1);
		if (idx < 0)
			die("ADDDEV");
		if (ioctl(lofd, VIRTIO_LO_DELDEV, idx) < 0)
			die("DELDEV");
	}
	printf("adddel %d ok\n", n);
	return 0;
}

/* The module loaded with upstream_abi=1 answers like upstream virtio-lo. */
static int cmd_upstream(void)
{
	struct virtio_lo_ext e;
	struct virtio_lo_irqfd a = { 0, 0, -1, 0 };
	struct virtio_lo_mem_range r[4];
	struct virtio_lo_ramlist l = { .count = 4, .ranges = (uint64_t)(uintptr_t)r };
	struct virtio_lo_devstatus s = { 0 };
	struct virtio_lo_queue q = { 0 };

	expect_fail("GETEXT", ioctl(lofd, VIRTIO_LO_GETEXT, &e), EINVAL);
	expect_fail("SET_IRQFD", ioctl(lofd, VIRTIO_LO_SET_IRQFD, &a), EINVAL);
	expect_fail("GET_RAM", ioctl(lofd, VIRTIO_LO_GET_RAM, &l), EINVAL);
	expect_fail("DEVSTATUS", ioctl(lofd, VIRTIO_LO_DEVSTATUS, &s), EINVAL);
	expect_fail("GET_QUEUE", ioctl(lofd, VIRTIO_LO_GET_QUEUE, &q), EINVAL);
	{
		struct virtio_lo_cfgwrite w = { .fd = -1 };

		expect_fail("CFG_GET", ioctl(lofd, VIRTIO_LO_CFG_GET, &w), EINVAL);
		expect_fail("CFG_ACK", ioctl(lofd, VIRTIO_LO_CFG_ACK, &w), EINVAL);
	}
	expect_fail("unknown 'P' ioctl", ioctl(lofd, _IO('P', 0x7f), 0), EINVAL);
	expect_fail("other ioctl type", ioctl(lofd, _IO('Q', 1), 0), ENOTTY);
	printf("upstream %s\n", failures ? "FAILED" : "ok");
	return failures ? 1 : 0;
}

/* ---- SYNC_CONFIG with the real virtio_input driver ---- */

#define VIRTIO_ID_INPUT 18
#define VI_ID_NAME 0x01
#define VI_ID_DEVIDS 0x03
#define VI_EV_BITS 0x11
#define SC_NAME "lo-tool sync input"

struct vi_config {		/* struct virtio_input_config, 136 bytes */
	uint8_t select, subsel, size, reserved[5];
	uint8_t u[128];
};

static struct vi_config vi_cfg;
static int vi_kick = -1;
static volatile int vi_stop;
static int vi_writes, vi_acks;

/* The device's answer to select/subsel, like a virtio-input device computes it. */
static void vi_answer(void)
{
	memset(vi_cfg.u, 0, sizeof(vi_cfg.u));
	vi_cfg.size = 0;
	if (vi_cfg.select == VI_ID_NAME) {
		vi_cfg.size = strlen(SC_NAME);
		memcpy(vi_cfg.u, SC_NAME, vi_cfg.size);
	} else if (vi_cfg.select == VI_ID_DEVIDS) {
		uint16_t ids[4] = { 0x06, 0x1234, 0x5678, 0x0001 };

		memcpy(vi_cfg.u, ids, sizeof(ids));
		vi_cfg.size = sizeof(ids);
	} else if (vi_cfg.select == VI_EV_BITS && vi_cfg.subsel == 1) {
		vi_cfg.u[30 / 8] |= 1 << (30 % 8);	/* EV_KEY: KEY_A */
		vi_cfg.size = 4;
	}
}

static void *vi_loop(void *arg)
{
	(void)arg;
	while (!vi_stop) {
		struct pollfd p = { .fd = vi_kick, .events = POLLIN };
		uint8_t data[sizeof(vi_cfg)];
		struct virtio_lo_cfgwrite w = { .fd = vi_kick, .len = sizeof(data), .data = (uint64_t)(uintptr_t)data };
		uint64_t cnt;

		if (poll(&p, 1, 100) <= 0)
			continue;
		if (read(vi_kick, &cnt, sizeof(cnt)) < 0 && errno != EAGAIN)
			break;
		if (ioctl(lofd, VIRTIO_LO_CFG_GET, &w) < 0) {
			if (errno == ENODEV)
				continue;	/* not yet / no longer a SYNC device */
			perror("CFG_GET");
			break;
		}
		if (!w.seq)
			continue;
		vi_writes++;
		if (w.offset < sizeof(vi_cfg) && w.len <= sizeof(vi_cfg) - w.offset) {
			memcpy((uint8_t *)&vi_cfg + w.offset, data, w.len);
			if (w.offset <= 1)	/* select or subsel */
				vi_answer();
		}
		w.offset = 0;
		w.len = sizeof(vi_cfg);
		w.data = (uint64_t)(uintptr_t)&vi_cfg;
		if (ioctl(lofd, VIRTIO_LO_CFG_ACK, &w) < 0)
			fprintf(stderr, "CFG_ACK seq %u: %s\n", w.seq, strerror(errno));
		else
			vi_acks++;
	}
	return NULL;
}

static int vi_adddev(void)
{
	struct virtio_lo_qinfo q[2] = {
		{ .kickfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), .size = 64 },
		{ .kickfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), .size = 64 },
	};
	struct virtio_lo_devinfo info = {
		.device_id = VIRTIO_ID_INPUT, .vendor_id = 0x1af4, .nqueues = 2, .features = F_VERSION_1,
		.config_size = sizeof(vi_cfg), .config_kick = vi_kick, .flags = VIRTIO_LO_DEV_F_SYNC_CONFIG,
		.config = (uint8_t *)&vi_cfg, .qinfo = q,
	};
	int r = ioctl(lofd, VIRTIO_LO_ADDDEV, &info);

	return r < 0 ? r : (int)info.idx;
}

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

/* The input device's name under /sys/devices/virtio-lo (first match). */
static int vi_sysfs_name(char *out, size_t n)
{
	char cmd[] = "cat /sys/devices/virtio-lo/virtio*/input/input*/name 2>/dev/null";
	FILE *f = popen(cmd, "r");
	int ok = 0;

	if (!f)
		return 0;
	if (fgets(out, n, f)) {
		out[strcspn(out, "\n")] = 0;
		ok = 1;
	}
	pclose(f);
	return ok;
}

static int cmd_syncconf(const char *mode)
{
	struct virtio_lo_ext e;
	pthread_t th;
	double t0;
	int idx;

	if (ioctl(lofd, VIRTIO_LO_GETEXT, &e) < 0 || !(e.extensions & VIRTIO_LO_EXT_SYNC_CONFIG)) {
		printf("BAD no SYNC_CONFIG extension\n");
		return 1;
	}
	vi_kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (!strcmp(mode, "answer")) {
		char name[128] = "";

		pthread_create(&th, NULL, vi_loop, NULL);
		t0 = now_s();
		idx = vi_adddev();
		if (idx < 0) {
			printf("BAD ADDDEV input SYNC_CONFIG: %s (writes %d acks %d)\n", strerror(errno), vi_writes, vi_acks);
			return 1;
		}
		printf("ADDDEV returned in %.3fs after %d config writes, %d acked\n", now_s() - t0, vi_writes, vi_acks);
		for (int i = 0; i < 50 && !vi_sysfs_name(name, sizeof(name)); i++)
			usleep(100000);
		if (strcmp(name, SC_NAME)) {
			printf("BAD input name '%s', wanted '%s'\n", name, SC_NAME);
			failures++;
		} else {
			printf("ok input name '%s'\n", name);
		}
		if (vi_writes < 4 || vi_acks != vi_writes) {
			printf("BAD writes %d acks %d\n", vi_writes, vi_acks);
			failures++;
		}
		if (ioctl(lofd, VIRTIO_LO_DELDEV, idx) < 0) {
			printf("BAD DELDEV: %s\n", strerror(errno));
			failures++;
		}
		vi_stop = 1;
		pthread_join(th, NULL);
	} else if (!strcmp(mode, "silent")) {
		t0 = now_s();
		idx = vi_adddev();
		printf("ADDDEV without answers: %s after %.3fs\n", idx < 0 ? strerror(errno) : "ok", now_s() - t0);
		if (idx >= 0 || errno != ENOENT) {
			printf("BAD ADDDEV without answers must fail with ENOENT\n");
			failures++;
		}
	} else if (!strcmp(mode, "timeout")) {
		t0 = now_s();
		idx = vi_adddev();
		printf("ADDDEV without answers (short timeout): %s after %.3fs\n", idx < 0 ? strerror(errno) : "ok", now_s() - t0);
		if (idx < 0) {
			printf("BAD the driver must go on with the module's copy after the timeouts\n");
			failures++;
		} else if (ioctl(lofd, VIRTIO_LO_DELDEV, idx) < 0) {
			printf("BAD DELDEV: %s\n", strerror(errno));
			failures++;
		}
	} else if (!strcmp(mode, "kill")) {
		int st;
		pid_t c = fork();

		if (c == 0) {
			vi_adddev();
			_exit(0);
		}
		usleep(500000);
		t0 = now_s();
		kill(c, SIGKILL);
		waitpid(c, &st, 0);
		printf("child SIGKILLed during ADDDEV, gone after %.3fs\n", now_s() - t0);
		if (now_s() - t0 > 2.0) {
			printf("BAD SIGKILL took too long\n");
			failures++;
		}
	} else {
		fprintf(stderr, "syncconf answer|silent|timeout|kill\n");
		return 2;
	}
	printf("syncconf %s %s\n", mode, failures ? "FAILED" : "ok");
	return failures ? 1 : 0;
}

/* ---- restricted memory (extension RESTRICTED) ---- */

#define F_ACCESS_PLATFORM (1ULL << 33)

static int add_restricted(uint64_t features, uint32_t pool_kib, uint32_t flags, int kickfd,
			  struct virtio_lo_qinfo *q, uint64_t *got)
{
	struct virtio_lo_devinfo info = {
		.device_id = 4, .vendor_id = 0x1af4, .nqueues = 1, .features = features,
		.flags = flags, .pool_kib = pool_kib, .config_kick = -1, .qinfo = q,
	};
	q->kickfd = kickfd;
	q->size = 64;
	int r = ioctl(lofd, VIRTIO_LO_ADDDEV, &info);
	if (got)
		*got = info.features;
	return r < 0 ? r : (int)info.idx;
}

static int in_pool(uint64_t a, uint64_t len, const struct virtio_lo_pool *p)
{
	return a >= p->iova && a - p->iova < p->size && len <= p->size - (a - p->iova);
}

static void check(const char *what, int ok)
{
	printf("%s %s\n", ok ? "ok" : "BAD", what);
	if (!ok)
		failures++;
}

/*
 * The hostile check of restricted mode (needs virtio-rng loaded): a restricted rng device's rings and buffers are
 * pool addresses; its pool maps, nothing beyond it does; after RESTRICT no RAM, no RAM list, no unrestricted device.
 */
static int cmd_restricted(void)
{
	struct virtio_lo_ext e;
	struct virtio_lo_qinfo q = { 0 };
	struct virtio_lo_pool p = { 0 };
	struct virtio_lo_mem_range r[4];
	struct virtio_lo_ramlist l = { .count = 4, .ranges = (uint64_t)(uintptr_t)r };
	uint64_t feats = 0;
	int kick = eventfd(0, EFD_CLOEXEC), idx, plain;
	uint8_t *m;

	if (ioctl(lofd, VIRTIO_LO_GETEXT, &e) < 0)
		die("GETEXT");
	check("GETEXT reports RESTRICTED", !!(e.extensions & VIRTIO_LO_EXT_RESTRICTED));
	if (ioctl(lofd, VIRTIO_LO_GET_RAM, &l) < 0 || l.count == 0)
		die("GET_RAM");
	expect_fail("restricted without VERSION_1", add_restricted(0, 0, VIRTIO_LO_DEV_F_RESTRICTED, -1, &q, NULL), EINVAL);
	expect_fail("pool_kib without RESTRICTED", add_restricted(F_VERSION_1, 64, 0, -1, &q, NULL), EINVAL);
	expect_fail("pool_kib too large", add_restricted(F_VERSION_1, VIRTIO_LO_POOL_MAX_KIB + 1,
							 VIRTIO_LO_DEV_F_RESTRICTED, -1, &q, NULL), EINVAL);
	plain = try_add(4, 1, 64, 0, -1, -1);
	if (plain < 0)
		die("ADDDEV (unrestricted rng; is virtio-rng loaded?)");
	p.idx = plain;
	expect_fail("GET_POOL of an unrestricted device", ioctl(lofd, VIRTIO_LO_GET_POOL, &p), EINVAL);
	if (ioctl(lofd, VIRTIO_LO_DELDEV, plain) < 0)
		die("DELDEV");

	idx = add_restricted(F_VERSION_1, 64, VIRTIO_LO_DEV_F_RESTRICTED, kick, &q, &feats);
	if (idx < 0)
		die("ADDDEV restricted");
	check("driver accepted ACCESS_PLATFORM", !!(feats & F_ACCESS_PLATFORM));
	p.idx = idx;
	if (ioctl(lofd, VIRTIO_LO_GET_POOL, &p) < 0)
		die("GET_POOL");
	printf("pool: iova 0x%llx size %llu offset 0x%llx\n", (unsigned long long)p.iova,
	       (unsigned long long)p.size, (unsigned long long)p.mmap_offset);
	check("pool holds 64 KiB and the ring", p.size >= 64 * 1024 + 4096 && p.size % 4096 == 0);
	check("rings are pool addresses", in_pool(q.desc, 16 * 64, &p) && in_pool(q.avail, 6 + 2 * 64, &p) &&
	      in_pool(q.used, 6 + 8 * 64, &p));
	m = mmap(NULL, p.size, PROT_READ | PROT_WRITE, MAP_SHARED, lofd, p.mmap_offset);
	check("mmap of the whole pool", m != MAP_FAILED);
	if (m == MAP_FAILED)
		return 1;
	{
		/* virtio-rng posts its buffer at probe: it must be a pool address too, zeroed. */
		struct avail *av = (struct avail *)(m + (q.avail - p.iova));
		struct desc *d = (struct desc *)(m + (q.desc - p.iova));
		int ok = 1, n = 0;

		for (int t = 0; t < 50 && !av->idx; t++)
			usleep(20000);
		for (uint16_t i = 0; i < av->idx && i < 64; i++) {
			struct desc *x = &d[av->ring[i] % 64];
			ok &= in_pool(x->addr, x->len, &p);
			if (ok)
				for (uint32_t b = 0; b < x->len; b++)
					ok &= m[x->addr - p.iova + b] == 0;
			n++;
		}
		printf("driver posted %d buffer(s)\n", n);
		check("posted buffers are zeroed pool addresses", ok);
	}
	{
		void *x = mmap(NULL, p.size + 4096, PROT_READ, MAP_SHARED, lofd, p.mmap_offset);
		expect_fail("mmap one page past the pool", x == MAP_FAILED ? -1 : 0, EINVAL);
		x = mmap(NULL, 4096, PROT_READ, MAP_SHARED, lofd, p.mmap_offset + p.size);
		expect_fail("mmap at the pool's end", x == MAP_FAILED ? -1 : 0, EINVAL);
		x = mmap(NULL, 4096, PROT_READ, MAP_SHARED, lofd, p.mmap_offset + (1ULL << VIRTIO_LO_POOL_MMAP_SHIFT));
		expect_fail("mmap of another device's pool", x == MAP_FAILED ? -1 : 0, ENODEV);
		x = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, lofd, p.mmap_offset);
		expect_fail("private mmap of the pool", x == MAP_FAILED ? -1 : 0, EINVAL);
	}
	if (ioctl(lofd, VIRTIO_LO_RESTRICT) < 0)
		die("RESTRICT");
	{
		void *x = mmap(NULL, 4096, PROT_READ, MAP_SHARED, lofd, r[0].start);
		expect_fail("mmap of System RAM after RESTRICT", x == MAP_FAILED ? -1 : 0, EPERM);
		x = mmap(NULL, 4096, PROT_READ, MAP_SHARED, lofd, 0);
		expect_fail("mmap of physical page 0 after RESTRICT", x == MAP_FAILED ? -1 : 0, EPERM);
		expect_fail("GET_RAM after RESTRICT", ioctl(lofd, VIRTIO_LO_GET_RAM, &l), EPERM);
		expect_fail("unrestricted ADDDEV after RESTRICT", try_add(4, 1, 64, 0, -1, -1), EPERM);
		x = mmap(NULL, 4096, PROT_READ, MAP_SHARED, lofd, p.mmap_offset);
		check("the pool still maps after RESTRICT", x != MAP_FAILED);
		if (x != MAP_FAILED)
			munmap(x, 4096);
	}
	/* The device goes while its pool is mapped: the mapping stays valid until munmap. */
	if (ioctl(lofd, VIRTIO_LO_DELDEV, idx) < 0)
		die("DELDEV restricted");
	{
		volatile uint8_t *v = m;
		uint8_t sum = 0;

		for (uint64_t o = 0; o < p.size; o += 4096)
			sum += v[o];
		printf("pool readable after DELDEV (%u)\n", sum);
	}
	munmap(m, p.size);
	printf("restricted %s\n", failures ? "FAILED" : "ok");
	return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	const char *node = getenv("VIRTIO_LO_NODE") ? getenv("VIRTIO_LO_NODE") : VIRTIO_LO_DEVICE_NODE;

	if (argc < 2) {
		fprintf(stderr, "usage: lo-tool serve|ext|bad|adddel|upstream|syncconf|restricted ...\n");
		return 2;
	}
	lofd = open(node, O_RDWR | O_CLOEXEC);
	if (lofd < 0)
		die(node);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(argv[1], "serve"))
		return cmd_serve(argc - 2, argv + 2);
	if (!strcmp(argv[1], "ext"))
		return cmd_ext();
	if (!strcmp(argv[1], "bad"))
		return cmd_bad();
	if (!strcmp(argv[1], "adddel"))
		return cmd_adddel(argc > 2 ? atoi(argv[2]) : 10);
	if (!strcmp(argv[1], "upstream"))
		return cmd_upstream();
	if (!strcmp(argv[1], "restricted"))
		return cmd_restricted();
	if (!strcmp(argv[1], "syncconf"))
		return cmd_syncconf(argc > 2 ? argv[2] : "answer");
	fprintf(stderr, "unknown command %s\n", argv[1]);
	return 2;
}
