// ALSA PCM ioctls for the sound device's hw:CARD,DEV endpoint; see include/alsapcm.h.
#include "alsapcm.h"
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <sound/asound.h>

// virtio-snd format number -> ALSA format (little-endian layouts); -1: not mapped
static int alsa_format(int v) {
	switch (v) {
	case 3: return SNDRV_PCM_FORMAT_S8;
	case 4: return SNDRV_PCM_FORMAT_U8;
	case 5: return SNDRV_PCM_FORMAT_S16_LE;
	case 11: return SNDRV_PCM_FORMAT_S24_3LE;
	case 15: return SNDRV_PCM_FORMAT_S24_LE;
	case 17: return SNDRV_PCM_FORMAT_S32_LE;
	case 19: return SNDRV_PCM_FORMAT_FLOAT_LE;
	default: return -1;
	}
}

int lb_alsa_open(int card, int device, int playback) {
	char path[64];
	snprintf(path, sizeof(path), "/dev/snd/pcmC%dD%d%c", card, device, playback ? 'p' : 'c');
	int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
	return fd < 0 ? -errno : fd;
}

static struct snd_mask *mask(struct snd_pcm_hw_params *p, int param) { return &p->masks[param - SNDRV_PCM_HW_PARAM_FIRST_MASK]; }
static struct snd_interval *interval(struct snd_pcm_hw_params *p, int param) {
	return &p->intervals[param - SNDRV_PCM_HW_PARAM_FIRST_INTERVAL];
}

static void open_all(struct snd_pcm_hw_params *p) {
	memset(p, 0, sizeof(*p));
	for (int k = 0; k <= SNDRV_PCM_HW_PARAM_LAST_MASK - SNDRV_PCM_HW_PARAM_FIRST_MASK; k++) memset(&p->masks[k], 0xff, sizeof(p->masks[k]));
	for (int k = 0; k <= SNDRV_PCM_HW_PARAM_LAST_INTERVAL - SNDRV_PCM_HW_PARAM_FIRST_INTERVAL; k++) {
		p->intervals[k].min = 0;
		p->intervals[k].max = UINT_MAX;
	}
	p->rmask = ~0u;
	p->cmask = 0;
	p->info = ~0u;
}
static void only(struct snd_pcm_hw_params *p, int param, unsigned bit) {
	struct snd_mask *m = mask(p, param);
	memset(m, 0, sizeof(*m));
	m->bits[bit / 32] = 1u << (bit % 32);
}
static void exact(struct snd_pcm_hw_params *p, int param, unsigned v) {
	struct snd_interval *i = interval(p, param);
	i->min = i->max = v;
	i->openmin = i->openmax = 0;
	i->integer = 1;
}
static void within(struct snd_pcm_hw_params *p, int param, unsigned lo, unsigned hi) {
	struct snd_interval *i = interval(p, param);
	i->min = lo;
	i->max = hi;
	i->openmin = i->openmax = 0;
	i->integer = 1;
}

int lb_alsa_caps(int fd, uint64_t *formats, unsigned *ch_min, unsigned *ch_max) {
	struct snd_pcm_hw_params p;
	open_all(&p);
	only(&p, SNDRV_PCM_HW_PARAM_ACCESS, SNDRV_PCM_ACCESS_RW_INTERLEAVED);
	if (ioctl(fd, SNDRV_PCM_IOCTL_HW_REFINE, &p) < 0) return -errno;
	struct snd_mask *m = mask(&p, SNDRV_PCM_HW_PARAM_FORMAT);
	uint64_t f = 0;
	static const int candidates[] = { 3, 4, 5, 11, 15, 17, 19 };
	for (unsigned k = 0; k < sizeof(candidates) / sizeof(candidates[0]); k++) {
		int a = alsa_format(candidates[k]);
		if (a >= 0 && (m->bits[a / 32] & (1u << (a % 32)))) f |= 1ull << candidates[k];
	}
	*formats = f;
	*ch_min = interval(&p, SNDRV_PCM_HW_PARAM_CHANNELS)->min;
	*ch_max = interval(&p, SNDRV_PCM_HW_PARAM_CHANNELS)->max;
	return 0;
}

int lb_alsa_rate_ok(int fd, unsigned rate) {
	struct snd_pcm_hw_params p;
	open_all(&p);
	only(&p, SNDRV_PCM_HW_PARAM_ACCESS, SNDRV_PCM_ACCESS_RW_INTERLEAVED);
	exact(&p, SNDRV_PCM_HW_PARAM_RATE, rate);
	return ioctl(fd, SNDRV_PCM_IOCTL_HW_REFINE, &p) < 0 ? 0 : 1;
}

int lb_alsa_setup(int fd, int vformat, unsigned channels, unsigned rate, unsigned *period, unsigned *buffer, unsigned start) {
	int a = alsa_format(vformat);
	if (a < 0) return -EINVAL;
	ioctl(fd, SNDRV_PCM_IOCTL_DROP);
	ioctl(fd, SNDRV_PCM_IOCTL_HW_FREE);
	struct snd_pcm_hw_params p;
	open_all(&p);
	only(&p, SNDRV_PCM_HW_PARAM_ACCESS, SNDRV_PCM_ACCESS_RW_INTERLEAVED);
	only(&p, SNDRV_PCM_HW_PARAM_FORMAT, (unsigned)a);
	only(&p, SNDRV_PCM_HW_PARAM_SUBFORMAT, SNDRV_PCM_SUBFORMAT_STD);
	exact(&p, SNDRV_PCM_HW_PARAM_CHANNELS, channels);
	exact(&p, SNDRV_PCM_HW_PARAM_RATE, rate);
	struct snd_pcm_hw_params keep = p;
	exact(&p, SNDRV_PCM_HW_PARAM_PERIOD_SIZE, *period);
	exact(&p, SNDRV_PCM_HW_PARAM_BUFFER_SIZE, *buffer);
	int ok = ioctl(fd, SNDRV_PCM_IOCTL_HW_PARAMS, &p) == 0;
	if (!ok) {
		// near the asked sizes: at least them, at most four times (the kernel's choice: smallest period,
		// largest buffer in range)
		p = keep;
		within(&p, SNDRV_PCM_HW_PARAM_PERIOD_SIZE, *period, *period * 4);
		within(&p, SNDRV_PCM_HW_PARAM_BUFFER_SIZE, *buffer, *buffer * 4);
		ok = ioctl(fd, SNDRV_PCM_IOCTL_HW_PARAMS, &p) == 0;
	}
	if (!ok) {
		// the hardware's sizes may not reach the asked ones: let the kernel choose them
		open_all(&p);
		only(&p, SNDRV_PCM_HW_PARAM_ACCESS, SNDRV_PCM_ACCESS_RW_INTERLEAVED);
		only(&p, SNDRV_PCM_HW_PARAM_FORMAT, (unsigned)a);
		only(&p, SNDRV_PCM_HW_PARAM_SUBFORMAT, SNDRV_PCM_SUBFORMAT_STD);
		exact(&p, SNDRV_PCM_HW_PARAM_CHANNELS, channels);
		exact(&p, SNDRV_PCM_HW_PARAM_RATE, rate);
		if (ioctl(fd, SNDRV_PCM_IOCTL_HW_PARAMS, &p) < 0) return -errno;
	}
	*period = interval(&p, SNDRV_PCM_HW_PARAM_PERIOD_SIZE)->min;
	*buffer = interval(&p, SNDRV_PCM_HW_PARAM_BUFFER_SIZE)->min;
	struct snd_pcm_sw_params s;
	memset(&s, 0, sizeof(s));
	s.tstamp_mode = SNDRV_PCM_TSTAMP_NONE;
	s.period_step = 1;
	s.avail_min = 1;
	s.start_threshold = start < 1 ? 1 : (start > *buffer ? *buffer : start);
	s.stop_threshold = *buffer;
	s.boundary = *buffer;
	while (s.boundary * 2 <= LONG_MAX - *buffer) s.boundary *= 2;
	if (ioctl(fd, SNDRV_PCM_IOCTL_SW_PARAMS, &s) < 0) return -errno;
	return ioctl(fd, SNDRV_PCM_IOCTL_PREPARE) < 0 ? -errno : 0;
}

int lb_alsa_prepare(int fd) { return ioctl(fd, SNDRV_PCM_IOCTL_PREPARE) < 0 ? -errno : 0; }
int lb_alsa_start(int fd) { return ioctl(fd, SNDRV_PCM_IOCTL_START) < 0 ? -errno : 0; }
int lb_alsa_drop(int fd) { return ioctl(fd, SNDRV_PCM_IOCTL_DROP) < 0 ? -errno : 0; }
int lb_alsa_hw_free(int fd) { return ioctl(fd, SNDRV_PCM_IOCTL_HW_FREE) < 0 ? -errno : 0; }

long lb_alsa_writei(int fd, const void *buf, unsigned long frames) {
	struct snd_xferi x = { .result = 0, .buf = (void *)buf, .frames = frames };
	if (ioctl(fd, SNDRV_PCM_IOCTL_WRITEI_FRAMES, &x) < 0) return -errno;
	return (long)x.result;
}
long lb_alsa_readi(int fd, void *buf, unsigned long frames) {
	struct snd_xferi x = { .result = 0, .buf = buf, .frames = frames };
	if (ioctl(fd, SNDRV_PCM_IOCTL_READI_FRAMES, &x) < 0) return -errno;
	return (long)x.result;
}
long lb_alsa_delay(int fd) {
	snd_pcm_sframes_t d = 0;
	ioctl(fd, SNDRV_PCM_IOCTL_HWSYNC);
	if (ioctl(fd, SNDRV_PCM_IOCTL_DELAY, &d) < 0) return -errno;
	return (long)d;
}
int lb_alsa_state(int fd) {
	struct snd_pcm_status st;
	memset(&st, 0, sizeof(st));
	if (ioctl(fd, SNDRV_PCM_IOCTL_STATUS, &st) < 0) return -errno;
	return (int)st.state;
}
