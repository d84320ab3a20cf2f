// sndtool: the sound guest case's ALSA end, through the kernel's PCM ioctls only (static, no alsa-lib).
//   sndtool pattern BYTES SEED OUT             raw bytes of a fixed pattern (the same bytes for the same seed)
//   sndtool mkwav RATE CH BYTES SEED OUT       a S16_LE WAV file whose data is `pattern BYTES SEED`
//   sndtool play DEV RATE CH PERIOD PERIODS RAW [SILENCE_BYTES]
//                                              plays RAW (S16_LE interleaved) on DEV (/dev/snd/pcmCxDyp), then
//                                              SILENCE_BYTES of zeros (rounded up to whole periods, as aplay pads),
//                                              then drains; prints "played N bytes in M ms"
//   sndtool stream DEV RATE CH PERIOD PERIODS SECONDS
//                                              plays a pattern on DEV for SECONDS the way a player that survives
//                                              xruns does: each EPIPE (underrun: the buffer ran empty) is counted and
//                                              recovered (PREPARE, write on); prints "streamed N frames in M ms,
//                                              xruns X, max write wait W ms"; exit 0 unless an ioctl fails otherwise
//   sndtool capture DEV RATE CH PERIOD PERIODS BYTES OUT
//                                              captures BYTES from DEV into OUT; prints "captured N bytes in M ms"
//   sndtool checkwav WAV RATE CH RAW...        the WAV is S16_LE RATE/CH with header sizes matching the file, and
//                                              its data is each RAW byte for byte, in order, each followed by zero
//                                              bytes only (the silence played after it); a RAW must not start with
//                                              a zero byte; prints "wav ok: N data bytes, Z zero bytes"
//   sndtool checkcap OUT RAW                   OUT starts with RAW byte for byte, only zeros follow
//   sndtool align OUT RAW FRAME                OUT holds RAW byte for byte after leading silence (a loopback
//                                              cable's capture): the first non-zero byte starts it, on a FRAME
//                                              boundary; prints "aligned at byte N"
// PERIOD is in frames. Exit status 0 on success, 1 with a message on stderr otherwise.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <sound/asound.h>

static void die(const char *what) { fprintf(stderr, "sndtool: %s: %s\n", what, strerror(errno)); exit(1); }
static void dief(const char *what) { fprintf(stderr, "sndtool: %s\n", what); exit(1); }

static uint64_t now_ms(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static unsigned char pat(size_t i, unsigned seed) { return (unsigned char)(i * 31 + seed * 7 + (i >> 8) + (i >> 16) * 3); }

static unsigned char *load(const char *path, size_t *n) {
	int fd = open(path, O_RDONLY);
	if (fd < 0) die(path);
	struct stat st;
	if (fstat(fd, &st) < 0) die(path);
	unsigned char *b = malloc(st.st_size + 1);
	size_t got = 0;
	while (got < (size_t)st.st_size) {
		ssize_t k = read(fd, b + got, st.st_size - got);
		if (k <= 0) die(path);
		got += k;
	}
	close(fd);
	*n = got;
	return b;
}

static void save(const char *path, const unsigned char *b, size_t n) {
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) die(path);
	size_t done = 0;
	while (done < n) {
		ssize_t k = write(fd, b + done, n - done);
		if (k <= 0) die(path);
		done += k;
	}
	close(fd);
}

static void put32(unsigned char *p, uint32_t v) { p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24; }
static void put16(unsigned char *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static uint32_t get32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t get16(const unsigned char *p) { return p[0] | p[1] << 8; }

// hw_params: everything open, then the access, format, channels, rate, period size and periods pinned; the
// kernel refines and chooses (SNDRV_PCM_IOCTL_HW_PARAMS does both).
static void set_mask(struct snd_pcm_hw_params *p, int param, unsigned bit) {
	struct snd_mask *m = &p->masks[param - SNDRV_PCM_HW_PARAM_FIRST_MASK];
	memset(m, 0, sizeof(*m));
	m->bits[bit / 32] = 1u << (bit % 32);
}
static void set_int(struct snd_pcm_hw_params *p, int param, unsigned v) {
	struct snd_interval *i = &p->intervals[param - SNDRV_PCM_HW_PARAM_FIRST_INTERVAL];
	i->min = i->max = v;
	i->openmin = i->openmax = 0;
	i->integer = 1;
}

static int open_pcm(const char *dev, unsigned rate, unsigned ch, unsigned period, unsigned periods, unsigned *buffer) {
	int fd = open(dev, O_RDWR);
	if (fd < 0) die(dev);
	struct snd_pcm_hw_params p;
	memset(&p, 0, sizeof(p));
	for (int k = 0; k <= SNDRV_PCM_HW_PARAM_LAST_MASK - SNDRV_PCM_HW_PARAM_FIRST_MASK; k++)
		memset(&p.masks[k], 0xff, sizeof(p.masks[k]));
	for (int k = 0; k <= SNDRV_PCM_HW_PARAM_LAST_INTERVAL - SNDRV_PCM_HW_PARAM_FIRST_INTERVAL; k++) {
		p.intervals[k].min = 0;
		p.intervals[k].max = UINT_MAX;
	}
	p.rmask = ~0u;
	set_mask(&p, SNDRV_PCM_HW_PARAM_ACCESS, SNDRV_PCM_ACCESS_RW_INTERLEAVED);
	set_mask(&p, SNDRV_PCM_HW_PARAM_FORMAT, SNDRV_PCM_FORMAT_S16_LE);
	set_mask(&p, SNDRV_PCM_HW_PARAM_SUBFORMAT, SNDRV_PCM_SUBFORMAT_STD);
	set_int(&p, SNDRV_PCM_HW_PARAM_CHANNELS, ch);
	set_int(&p, SNDRV_PCM_HW_PARAM_RATE, rate);
	set_int(&p, SNDRV_PCM_HW_PARAM_PERIOD_SIZE, period);
	set_int(&p, SNDRV_PCM_HW_PARAM_PERIODS, periods);
	if (ioctl(fd, SNDRV_PCM_IOCTL_HW_PARAMS, &p) < 0) die("HW_PARAMS");
	*buffer = period * periods;
	struct snd_pcm_sw_params s;
	memset(&s, 0, sizeof(s));
	s.tstamp_mode = SNDRV_PCM_TSTAMP_NONE;
	s.period_step = 1;
	s.avail_min = period;
	s.start_threshold = period;          // start once a period is there
	s.stop_threshold = *buffer;          // stop on a real xrun only
	s.silence_threshold = 0;
	s.silence_size = 0;
	s.boundary = *buffer;
	while (s.boundary * 2 <= LONG_MAX - *buffer) s.boundary *= 2;
	if (ioctl(fd, SNDRV_PCM_IOCTL_SW_PARAMS, &s) < 0) die("SW_PARAMS");
	if (ioctl(fd, SNDRV_PCM_IOCTL_PREPARE) < 0) die("PREPARE");
	return fd;
}

static int play(int argc, char **argv) {
	if (argc < 8) dief("usage: play DEV RATE CH PERIOD PERIODS RAW [SILENCE_BYTES]");
	unsigned rate = atoi(argv[3]), ch = atoi(argv[4]), period = atoi(argv[5]), periods = atoi(argv[6]), buffer;
	size_t n, silence = argc > 8 ? strtoul(argv[8], 0, 0) : 0;
	unsigned char *raw = load(argv[7], &n);
	unsigned frame = 2 * ch;
	size_t total = n + silence;
	// whole periods: a driver may send only full periods (the last partial one would never be played)
	total = (total + (size_t)period * frame - 1) / ((size_t)period * frame) * ((size_t)period * frame);
	unsigned char *all = calloc(total + frame, 1);
	memcpy(all, raw, n);
	int fd = open_pcm(argv[2], rate, ch, period, periods, &buffer);
	uint64_t t0 = now_ms();
	size_t frames = total / frame, done = 0;
	while (done < frames) {
		struct snd_xferi x = { .buf = all + done * frame, .frames = frames - done > period ? period : frames - done };
		if (ioctl(fd, SNDRV_PCM_IOCTL_WRITEI_FRAMES, &x) < 0) {
			if (errno == EINTR) continue;
			die("WRITEI_FRAMES");
		}
		done += x.result;
	}
	uint64_t tw = now_ms();
	if (ioctl(fd, SNDRV_PCM_IOCTL_DRAIN) < 0) {
		int e = errno;
		struct snd_pcm_status st;
		memset(&st, 0, sizeof(st));
		ioctl(fd, SNDRV_PCM_IOCTL_STATUS, &st);
		fprintf(stderr, "sndtool: DRAIN after writes of %llu ms, drain %llu ms: state %d hw_ptr %lu appl_ptr %lu avail %lu delay %ld\n",
			(unsigned long long)(tw - t0), (unsigned long long)(now_ms() - tw), st.state, (unsigned long)st.hw_ptr,
			(unsigned long)st.appl_ptr, (unsigned long)st.avail, (long)st.delay);
		errno = e;
		die("DRAIN");
	}
	uint64_t t1 = now_ms();
	printf("played %zu bytes in %llu ms\n", done * frame, (unsigned long long)(t1 - t0));
	close(fd);
	return 0;
}

static int stream(int argc, char **argv) {
	if (argc != 8) dief("usage: stream DEV RATE CH PERIOD PERIODS SECONDS");
	unsigned rate = atoi(argv[3]), ch = atoi(argv[4]), period = atoi(argv[5]), periods = atoi(argv[6]), buffer;
	unsigned seconds = atoi(argv[7]), frame = 2 * ch;
	unsigned char *b = malloc((size_t)period * frame);
	for (size_t i = 0; i < (size_t)period * frame; i++) b[i] = pat(i, 5) | 1;
	int fd = open_pcm(argv[2], rate, ch, period, periods, &buffer);
	uint64_t t0 = now_ms(), frames = (uint64_t)rate * seconds, done = 0, xruns = 0, maxwait = 0;
	while (done < frames) {
		struct snd_xferi x = { .buf = b, .frames = period };
		uint64_t a = now_ms();
		if (ioctl(fd, SNDRV_PCM_IOCTL_WRITEI_FRAMES, &x) < 0) {
			if (errno == EINTR) continue;
			if (errno != EPIPE) die("WRITEI_FRAMES");
			xruns++;   // the buffer ran empty: recover the way alsa-lib's snd_pcm_recover does
			if (ioctl(fd, SNDRV_PCM_IOCTL_PREPARE) < 0) die("PREPARE after EPIPE");
			continue;
		}
		if (now_ms() - a > maxwait) maxwait = now_ms() - a;
		done += x.result;
	}
	if (ioctl(fd, SNDRV_PCM_IOCTL_DRAIN) < 0 && errno != EPIPE) die("DRAIN");
	printf("streamed %llu frames in %llu ms, xruns %llu, max write wait %llu ms\n", (unsigned long long)done,
	       (unsigned long long)(now_ms() - t0), (unsigned long long)xruns, (unsigned long long)maxwait);
	close(fd);
	return 0;
}

static int capture(int argc, char **argv) {
	if (argc < 9) dief("usage: capture DEV RATE CH PERIOD PERIODS BYTES OUT");
	unsigned rate = atoi(argv[3]), ch = atoi(argv[4]), period = atoi(argv[5]), periods = atoi(argv[6]), buffer;
	size_t want = strtoul(argv[7], 0, 0);
	unsigned frame = 2 * ch;
	unsigned char *b = calloc(want + frame, 1);
	int fd = open_pcm(argv[2], rate, ch, period, periods, &buffer);
	uint64_t t0 = now_ms();
	if (ioctl(fd, SNDRV_PCM_IOCTL_START) < 0) die("START");
	size_t frames = want / frame, done = 0;
	while (done < frames) {
		struct snd_xferi x = { .buf = b + done * frame, .frames = frames - done > period ? period : frames - done };
		if (ioctl(fd, SNDRV_PCM_IOCTL_READI_FRAMES, &x) < 0) {
			if (errno == EINTR) continue;
			int e = errno;
			struct snd_pcm_status st;
			memset(&st, 0, sizeof(st));
			ioctl(fd, SNDRV_PCM_IOCTL_STATUS, &st);
			fprintf(stderr, "sndtool: READI after %zu frames, %llu ms: state %d hw_ptr %lu appl_ptr %lu avail %lu\n", done,
				(unsigned long long)(now_ms() - t0), st.state, (unsigned long)st.hw_ptr, (unsigned long)st.appl_ptr, (unsigned long)st.avail);
			errno = e;
			die("READI_FRAMES");
		}
		done += x.result;
	}
	uint64_t t1 = now_ms();
	if (ioctl(fd, SNDRV_PCM_IOCTL_DROP) < 0) die("DROP");
	close(fd);
	save(argv[8], b, done * frame);
	printf("captured %zu bytes in %llu ms\n", done * frame, (unsigned long long)(t1 - t0));
	return 0;
}

// data starts with raw, then only zeros (at most `maxzeros`)
static int prefix_then_zeros(const unsigned char *d, size_t dn, const unsigned char *raw, size_t rn, size_t maxzeros, const char *what) {
	if (dn < rn) { fprintf(stderr, "sndtool: %s: %zu data bytes, fewer than the %zu played\n", what, dn, rn); return 1; }
	for (size_t i = 0; i < rn; i++)
		if (d[i] != raw[i]) { fprintf(stderr, "sndtool: %s: byte %zu is 0x%02x, want 0x%02x\n", what, i, d[i], raw[i]); return 1; }
	for (size_t i = rn; i < dn; i++)
		if (d[i]) { fprintf(stderr, "sndtool: %s: byte %zu after the data is 0x%02x, not silence\n", what, i, d[i]); return 1; }
	if (dn - rn > maxzeros) { fprintf(stderr, "sndtool: %s: %zu bytes of silence after the data (more than %zu)\n", what, dn - rn, maxzeros); return 1; }
	return 0;
}

int main(int argc, char **argv) {
	if (argc < 2) dief("usage: sndtool pattern|mkwav|play|capture|checkwav|checkcap ...");
	const char *c = argv[1];
	if (!strcmp(c, "pattern") && argc == 5) {
		size_t n = strtoul(argv[2], 0, 0);
		unsigned seed = atoi(argv[3]);
		unsigned char *b = malloc(n + 1);
		for (size_t i = 0; i < n; i++) b[i] = pat(i, seed);
		save(argv[4], b, n);
		return 0;
	}
	if (!strcmp(c, "mkwav") && argc == 7) {
		unsigned rate = atoi(argv[2]), ch = atoi(argv[3]), seed = atoi(argv[5]);
		size_t n = strtoul(argv[4], 0, 0);
		unsigned char *b = malloc(44 + n);
		memcpy(b, "RIFF", 4); put32(b + 4, 36 + n); memcpy(b + 8, "WAVEfmt ", 8); put32(b + 16, 16);
		put16(b + 20, 1); put16(b + 22, ch); put32(b + 24, rate); put32(b + 28, rate * ch * 2); put16(b + 32, ch * 2);
		put16(b + 34, 16); memcpy(b + 36, "data", 4); put32(b + 40, n);
		for (size_t i = 0; i < n; i++) b[44 + i] = pat(i, seed);
		save(argv[6], b, 44 + n);
		return 0;
	}
	if (!strcmp(c, "play")) return play(argc, argv);
	if (!strcmp(c, "capture")) return capture(argc, argv);
	if (!strcmp(c, "stream")) return stream(argc, argv);
	if (!strcmp(c, "checkwav") && argc >= 6) {
		size_t wn;
		unsigned char *w = load(argv[2], &wn);
		unsigned rate = atoi(argv[3]), ch = atoi(argv[4]);
		if (wn < 44 || memcmp(w, "RIFF", 4) || memcmp(w + 8, "WAVEfmt ", 8) || memcmp(w + 36, "data", 4)) dief("checkwav: not a canonical WAV");
		if (get16(w + 20) != 1 || get16(w + 22) != ch || get32(w + 24) != rate || get16(w + 34) != 16 || get16(w + 32) != 2 * ch)
			dief("checkwav: format is not S16_LE at the rate and channels played");
		size_t dn = get32(w + 40);
		if (dn != wn - 44 || get32(w + 4) != 36 + dn) {
			fprintf(stderr, "sndtool: checkwav: header sizes %u/%zu, file has %zu data bytes\n", get32(w + 4), dn, wn - 44);
			return 1;
		}
		const unsigned char *d = w + 44;
		size_t at = 0, zeros = 0;
		for (int k = 5; k < argc; k++) {
			size_t rn;
			unsigned char *raw = load(argv[k], &rn);
			if (rn == 0 || raw[0] == 0) dief("checkwav: a RAW must start with a non-zero byte");
			if (k > 5) while (at < dn && d[at] == 0) { at++; zeros++; }
			if (dn - at < rn) { fprintf(stderr, "sndtool: checkwav: %s: only %zu data bytes left at %zu, want %zu\n", argv[k], dn - at, at, rn); return 1; }
			for (size_t i = 0; i < rn; i++)
				if (d[at + i] != raw[i]) { fprintf(stderr, "sndtool: checkwav: %s: data byte %zu is 0x%02x, want 0x%02x\n", argv[k], at + i, d[at + i], raw[i]); return 1; }
			at += rn;
		}
		for (; at < dn; at++, zeros++)
			if (d[at]) { fprintf(stderr, "sndtool: checkwav: data byte %zu after the last RAW is 0x%02x, not silence\n", at, d[at]); return 1; }
		printf("wav ok: %zu data bytes, %zu zero bytes\n", dn, zeros);
		return 0;
	}
	if (!strcmp(c, "checkcap") && argc == 4) {
		size_t on, rn;
		unsigned char *o = load(argv[2], &on), *raw = load(argv[3], &rn);
		if (prefix_then_zeros(o, on, raw, rn, 1 << 24, "checkcap")) return 1;
		printf("capture ok: %zu bytes, the first %zu the file's\n", on, rn);
		return 0;
	}
	if (!strcmp(c, "align") && argc == 5) {
		size_t on, rn, frame = strtoul(argv[4], 0, 0);
		unsigned char *o = load(argv[2], &on), *raw = load(argv[3], &rn);
		if (rn == 0 || raw[0] == 0) dief("align: RAW must start with a non-zero byte");
		size_t at = 0;
		while (at < on && o[at] == 0) at++;
		if (at == on) dief("align: OUT is all silence");
		at -= at % frame;   // the first frame may start with zero bytes of its own
		if (on - at < rn) { fprintf(stderr, "sndtool: align: only %zu bytes after offset %zu, want %zu\n", on - at, at, rn); return 1; }
		for (size_t i = 0; i < rn; i++)
			if (o[at + i] != raw[i]) { fprintf(stderr, "sndtool: align: byte %zu after offset %zu is 0x%02x, want 0x%02x\n", i, at, o[at + i], raw[i]); return 1; }
		printf("aligned at byte %zu: %zu bytes equal\n", at, rn);
		return 0;
	}
	dief("bad command or arguments");
	return 1;
}
