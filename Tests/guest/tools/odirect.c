// SPDX-License-Identifier: GPL-2.0
/*
 * odirect: O_DIRECT block I/O helper for the guest tests (busybox dd has no
 * oflag=direct).  Data is a pattern derived from (seed, byte offset).
 *   odirect write  DEV OFFSET SIZE SEED   O_DIRECT write, then fsync
 *   odirect check  DEV OFFSET SIZE SEED   O_DIRECT read, compare (exit 1 on mismatch)
 *   odirect checkb FILE OFFSET SIZE SEED  buffered read, compare (backing files)
 *   odirect mustfail-write DEV            exit 0 iff a 4 KiB O_DIRECT write fails
 *   odirect randread DEV SECONDS JOBS     JOBS processes of 4 KiB O_DIRECT reads at random 4 KiB-aligned
 *                                         offsets for SECONDS; prints "randread N reads in M ms" (exit 1 on
 *                                         an I/O error)
 *   odirect randlat DEV SIZE SECONDS QD   4 KiB O_DIRECT reads at random 4 KiB offsets in [0, SIZE), QD threads
 *                                         each with one read in flight, for SECONDS; prints
 *                                         "randlat qd=QD ios=N iops=N p50_us=X p99_us=Y" (the peer benchmark)
 * OFFSET/SIZE accept K/M suffixes and must be multiples of 4096.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>

#define CHUNK (1 << 20)

static unsigned long long num(const char *s)
{
	char *e;
	unsigned long long v = strtoull(s, &e, 0);
	if (*e == 'K' || *e == 'k') v <<= 10;
	else if (*e == 'M' || *e == 'm') v <<= 20;
	return v;
}

static void fill(uint8_t *b, size_t n, unsigned long long off, unsigned seed)
{
	for (size_t i = 0; i < n; i += 8) {
		uint64_t v = (off + i) * 0x9E3779B97F4A7C15ULL ^ ((uint64_t)seed << 32 | seed);
		memcpy(b + i, &v, 8);
	}
}

static uint64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* One job: reads until the deadline; returns the count (-1 on an I/O error). */
static long long randread_job(const char *dev, uint64_t deadline, unsigned seed)
{
	int fd = open(dev, O_RDONLY | O_DIRECT);
	if (fd < 0) { perror(dev); return -1; }
	off_t blocks = lseek(fd, 0, SEEK_END) / 4096;
	uint8_t *b;
	if (blocks <= 0 || posix_memalign((void **)&b, 4096, 4096)) return -1;
	uint64_t x = 0x9E3779B97F4A7C15ULL ^ seed;
	long long n = 0;
	while (now_ms() < deadline) {
		for (int k = 0; k < 64; k++) {
			x ^= x << 13; x ^= x >> 7; x ^= x << 17;
			if (pread(fd, b, 4096, (off_t)(x % blocks) * 4096) != 4096) { perror("pread"); return -1; }
			n++;
		}
	}
	close(fd);
	return n;
}

static int randread(const char *dev, unsigned seconds, unsigned jobs)
{
	int p[2];
	if (jobs < 1 || jobs > 64 || pipe(p) < 0) return 2;
	uint64_t t0 = now_ms(), deadline = t0 + seconds * 1000ULL;
	for (unsigned j = 0; j < jobs; j++) {
		if (fork() == 0) {
			long long n = randread_job(dev, deadline, j + 1);
			if (write(p[1], &n, sizeof(n)) != sizeof(n)) _exit(1);
			_exit(n < 0);
		}
	}
	close(p[1]);
	long long total = 0, n;
	int bad = 0;
	for (unsigned j = 0; j < jobs; j++) {
		if (read(p[0], &n, sizeof(n)) != sizeof(n) || n < 0) bad = 1;
		else total += n;
	}
	while (wait(NULL) > 0) {}
	printf("randread %lld reads in %llu ms (%u jobs)\n", total, (unsigned long long)(now_ms() - t0), jobs);
	return bad;
}

// ---- randread: latency histogram in 1 us buckets up to 100 ms (beyond: the last bucket)
#define NBUCKET 100000
static int rr_fd;
static unsigned long long rr_blocks;
static double rr_end;
static unsigned long long rr_hist[NBUCKET];
static unsigned long long rr_ios, rr_errors;
static pthread_mutex_t rr_lock = PTHREAD_MUTEX_INITIALIZER;

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void *rr_worker(void *arg)
{
	uint64_t x = 0x9E3779B97F4A7C15ULL * (uintptr_t)(arg + 1);
	uint8_t *b;
	static __thread unsigned long long h[NBUCKET];
	unsigned long long n = 0, errs = 0;
	if (posix_memalign((void **)&b, 4096, 4096)) return NULL;
	while (now_s() < rr_end) {
		x ^= x << 13; x ^= x >> 7; x ^= x << 17;   // xorshift64
		off_t off = (off_t)(x % rr_blocks) * 4096;
		double t0 = now_s();
		if (pread(rr_fd, b, 4096, off) != 4096) { errs++; continue; }
		unsigned long long us = (unsigned long long)((now_s() - t0) * 1e6);
		h[us < NBUCKET ? us : NBUCKET - 1]++;
		n++;
	}
	pthread_mutex_lock(&rr_lock);
	for (int i = 0; i < NBUCKET; i++) rr_hist[i] += h[i];
	rr_ios += n; rr_errors += errs;
	pthread_mutex_unlock(&rr_lock);
	return NULL;
}

static unsigned long long rr_pct(double p)
{
	unsigned long long want = (unsigned long long)(rr_ios * p), seen = 0;
	for (int i = 0; i < NBUCKET; i++) { seen += rr_hist[i]; if (seen > want) return i; }
	return NBUCKET;
}

static int randlat(const char *dev, unsigned long long size, double secs, int qd)
{
	rr_fd = open(dev, O_RDONLY | O_DIRECT);
	if (rr_fd < 0) { perror(dev); return 1; }
	rr_blocks = size / 4096;
	if (rr_blocks == 0 || qd < 1 || qd > 256) { fprintf(stderr, "randlat: bad size or qd\n"); return 2; }
	pthread_t t[256];
	double start = now_s();
	rr_end = start + secs;
	for (int i = 0; i < qd; i++) pthread_create(&t[i], NULL, rr_worker, (void *)(uintptr_t)i);
	for (int i = 0; i < qd; i++) pthread_join(t[i], NULL);
	double el = now_s() - start;
	printf("randlat qd=%d ios=%llu iops=%.0f p50_us=%llu p99_us=%llu errors=%llu\n", qd, rr_ios, rr_ios / el,
	       rr_pct(0.50), rr_pct(0.99), rr_errors);
	return rr_errors || !rr_ios ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc == 6 && !strcmp(argv[1], "randlat"))
		return randlat(argv[2], num(argv[3]), atof(argv[4]), atoi(argv[5]));
	uint8_t *buf, *want;
	if (argc == 5 && !strcmp(argv[1], "randread")) return randread(argv[2], atoi(argv[3]), atoi(argv[4]));
	if (argc == 3 && !strcmp(argv[1], "mustfail-write")) {
		int fd = open(argv[2], O_WRONLY | O_DIRECT);
		if (fd < 0) { printf("open for write failed: %s\n", strerror(errno)); return 0; }
		if (posix_memalign((void **)&buf, 4096, 4096)) return 2;
		memset(buf, 0xa5, 4096);
		ssize_t r = pwrite(fd, buf, 4096, 0);
		if (r < 0) { printf("write failed: %s\n", strerror(errno)); return 0; }
		if (fsync(fd) < 0) { printf("fsync failed: %s\n", strerror(errno)); return 0; }
		printf("write succeeded\n");
		return 1;
	}
	if (argc != 6) {
		fprintf(stderr, "usage: odirect write|check|checkb DEV OFFSET SIZE SEED | mustfail-write DEV | randread DEV SECONDS JOBS | randlat DEV SIZE SECONDS QD\n");
		return 2;
	}
	const char *cmd = argv[1];
	unsigned long long off = num(argv[3]), size = num(argv[4]);
	unsigned seed = (unsigned)num(argv[5]);
	int wr = !strcmp(cmd, "write"), direct = strcmp(cmd, "checkb") != 0;
	int fd = open(argv[2], (wr ? O_WRONLY : O_RDONLY) | (direct ? O_DIRECT : 0));
	if (fd < 0) { perror(argv[2]); return 1; }
	if (posix_memalign((void **)&buf, 4096, CHUNK) || posix_memalign((void **)&want, 4096, CHUNK))
		return 2;
	for (unsigned long long done = 0; done < size; done += CHUNK) {
		size_t n = size - done < CHUNK ? size - done : CHUNK;
		if (wr) {
			fill(buf, n, off + done, seed);
			if (pwrite(fd, buf, n, off + done) != (ssize_t)n) { perror("pwrite"); return 1; }
		} else {
			fill(want, n, off + done, seed);
			if (pread(fd, buf, n, off + done) != (ssize_t)n) { perror("pread"); return 1; }
			if (memcmp(buf, want, n)) {
				for (size_t i = 0; i < n; i++)
					if (buf[i] != want[i]) {
						printf("mismatch at byte %llu\n", off + done + i);
						break;
					}
				return 1;
			}
		}
	}
	if (wr && fsync(fd) < 0) { perror("fsync"); return 1; }
	printf("%s ok %llu bytes\n", cmd, size);
	return 0;
}
