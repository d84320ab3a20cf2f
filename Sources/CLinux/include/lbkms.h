// A host DRM/KMS output for the gpu device (`output = "kms:/dev/dri/cardN[:CONNECTOR]"`), without libdrm (the
// binary is fully static): the legacy mode-setting ioctls of <drm/drm_mode.h> on a card node. kms.c defines the
// few uapi structures it uses itself (Debian ships <drm/*.h> in libdrm-dev, not linux-libc-dev); their layout is
// the kernel's ABI and is checked with static asserts. Every call returns 0 (or a count) or -errno.
#ifndef LB_KMS_H
#define LB_KMS_H
#include <stdint.h>
#include <stddef.h>

// What lb_kms_pick chose: the connector, the CRTC driving it and the mode (the kernel's drm_mode_modeinfo bytes).
struct lb_kms_target {
    uint32_t connector_id, crtc_id;
    uint32_t mode_w, mode_h, vrefresh;
    int exact;                  // 1: the mode has the size asked for
    char connector[32];         // "Virtual-1", "HDMI-A-1": the kernel's name (type name, '-', type id)
    uint8_t modeinfo[68];       // struct drm_mode_modeinfo
};

// A dumb buffer (32 bpp, XRGB8888), its framebuffer (0 for a cursor image) and its mapping.
struct lb_kms_buf {
    uint32_t handle, fb_id, pitch, width, height;
    uint64_t size;
    void *map;
};

// Opens the card read-write, non-blocking (flip events are read on the event loop), close-on-exec; becomes DRM
// master (SET_MASTER; the first opener already is) and checks DRM_CAP_DUMB_BUFFER. Returns the fd.
int lb_kms_open(const char *path);
// Chooses the connector (by name, or NULL: the first connected one with modes), its mode (width x height if
// offered, the preferred one among equals; else the connector's preferred mode; else its first) and a CRTC (the
// one its encoder drives, else the first any of its encoders can use). On failure, `err` says why (and lists the
// card's connectors with their state).
int lb_kms_pick(int fd, const char *connector, uint32_t width, uint32_t height, struct lb_kms_target *t,
                char *err, size_t errlen);
// CREATE_DUMB (32 bpp), then ADDFB (depth 24: XRGB8888) when `framebuffer`, MAP_DUMB and mmap; zero-filled.
int lb_kms_buf_create(int fd, uint32_t width, uint32_t height, int framebuffer, struct lb_kms_buf *b);
void lb_kms_buf_destroy(int fd, struct lb_kms_buf *b);
// SETCRTC: the target's connector and mode scanning out `fb_id` at (0, 0); fb_id 0 turns the CRTC off.
int lb_kms_set_crtc(int fd, const struct lb_kms_target *t, uint32_t fb_id);
// PAGE_FLIP with DRM_MODE_PAGE_FLIP_EVENT: the completion arrives as a readable fd (lb_kms_events).
int lb_kms_flip(int fd, uint32_t crtc_id, uint32_t fb_id);
// DIRTYFB with one clip rectangle [x1, x2) x [y1, y2). -ENOSYS: the driver scans the buffer out directly.
int lb_kms_dirty(int fd, uint32_t fb_id, uint32_t x1, uint32_t y1, uint32_t x2, uint32_t y2);
// CURSOR2: show a 64x64 ARGB8888 dumb buffer `handle` (0: hide) with its hot spot; or move it (image top left).
int lb_kms_cursor_set(int fd, uint32_t crtc_id, uint32_t handle, uint32_t w, uint32_t h, int32_t hot_x, int32_t hot_y);
int lb_kms_cursor_move(int fd, uint32_t crtc_id, int32_t x, int32_t y);
// Reads the pending DRM events (non-blocking); returns how many were DRM_EVENT_FLIP_COMPLETE (0 when none).
int lb_kms_events(int fd);
// Copies a w x h block of 4-byte pixels, red, green and blue taken at byte offsets ro, go, bo of each source
// pixel, into XRGB8888 (little-endian bytes B, G, R, X=0xff). Offsets (2, 1, 0): rows are copied as they are.
void lb_kms_copy(void *dst, size_t dpitch, const void *src, size_t spitch, uint32_t w, uint32_t h, int ro, int go, int bo);
// Same into ARGB8888 with alpha at byte offset ao (-1: opaque): a cursor image.
void lb_kms_copy_argb(void *dst, size_t dpitch, const void *src, size_t spitch, uint32_t w, uint32_t h,
                      int ro, int go, int bo, int ao);
// Fills a w x h block with opaque black.
void lb_kms_fill_black(void *dst, size_t dpitch, uint32_t w, uint32_t h);
#endif
