// The kernel's ALSA PCM interface (/dev/snd/pcmC*D*[pc], SNDRV_PCM_IOCTL_*) for the sound device's hw:CARD,DEV
// endpoint, without alsa-lib (the binary is fully static; Debian has no libasound.a). Every call returns 0 or a
// count on success and -errno on failure. Formats are virtio-snd format numbers (VIRTIO_SND_PCM_FMT_*).
#ifndef LB_ALSAPCM_H
#define LB_ALSAPCM_H
#include <stdint.h>

// Opens the PCM node of card/device in the given direction, non-blocking, close-on-exec; returns the fd.
int lb_alsa_open(int card, int device, int playback);
// What the hardware accepts with everything else open (HW_REFINE): a bit mask of virtio formats it takes (of
// U8, S16, S24_3, S24, S32, FLOAT, S8), the channel range; `rate_ok` tells whether one rate is accepted.
int lb_alsa_caps(int fd, uint64_t *virtio_formats, unsigned *ch_min, unsigned *ch_max);
int lb_alsa_rate_ok(int fd, unsigned rate);
// HW_PARAMS (interleaved access, the format, channels and rate exactly; period and buffer near the asked frames,
// refined by the kernel: the chosen sizes are written back), SW_PARAMS (playback starts once `start_frames` are
// queued; xruns stop the stream) and PREPARE.
int lb_alsa_setup(int fd, int virtio_format, unsigned channels, unsigned rate, unsigned *period_frames,
                  unsigned *buffer_frames, unsigned start_frames);
int lb_alsa_prepare(int fd);
int lb_alsa_start(int fd);
int lb_alsa_drop(int fd);
int lb_alsa_hw_free(int fd);
// Non-blocking WRITEI_FRAMES / READI_FRAMES: frames moved, -EAGAIN when none can move now, -EPIPE on an xrun.
long lb_alsa_writei(int fd, const void *buf, unsigned long frames);
long lb_alsa_readi(int fd, void *buf, unsigned long frames);
// Frames queued and not yet played (playback) or captured and not yet read (capture): DELAY after HWSYNC.
long lb_alsa_delay(int fd);
// The PCM state (SNDRV_PCM_STATE_*: 2 PREPARED, 3 RUNNING, 4 XRUN, ...).
int lb_alsa_state(int fd);

#endif
