// gputool: the guest side of the gpu case, through DRM/KMS ioctls only (no libdrm; the structures are the
// kernel's uapi/drm/drm.h and drm_mode.h, stable ABI, declared in Sources/CLinux/kdrm.h).
//   gputool draw /dev/dri/cardN SEED SECONDS [X Y]
//                                               find a connected connector and its first (preferred) mode, make a
//                                               dumb buffer of that size (XRGB8888: virtio-gpu's B8G8R8X8), fill it
//                                               with pattern(SEED), SET_CRTC it, DIRTYFB the whole frame; with X Y
//                                               also a 64x64 ARGB8888 cursor (the legacy cursor ioctl: the driver's
//                                               cursor plane, UPDATE_CURSOR on the cursor queue) at (X, Y), then
//                                               moved to (X + 10, Y + 20) (MOVE_CURSOR); print "MODE W H" and "READY",
//                                               then hold the buffers (and DRM master) for SECONDS
//   gputool check FILE.ppm W H SEED            the PPM (P6, 8-bit) is W x H and equals pattern(SEED) in RGB
//   gputool modes /dev/dri/cardN               print each connector's status and modes ("CONN id connected WxH ...")
// pattern(SEED) at (x, y): R = x & 255, G = y & 255, B = ((x >> 8) | (y >> 8) << 4) ^ SEED: every row and column
// differs from its neighbours, so a shifted, transposed or mis-strided frame does not pass.
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kdrm.h"   // the uapi structures, shared with loopbackd's kms output (Sources/CLinux/kdrm.h)

static void die(const char *what) { fprintf(stderr, "gputool: %s: %s\n", what, strerror(errno)); exit(1); }

static int xioctl(int fd, unsigned long req, void *arg) {
    int r;
    do r = ioctl(fd, req, arg); while (r < 0 && (errno == EINTR || errno == EAGAIN));
    return r;
}

static void pattern(int x, int y, int seed, uint8_t *r, uint8_t *g, uint8_t *b) {
    *r = x & 255; *g = y & 255; *b = (uint8_t)(((x >> 8) | (y >> 8) << 4) ^ seed);
}

// The first connected connector (with its modes), or exit.
static struct kdrm_get_connector connector(int fd, uint32_t *crtc, struct kdrm_modeinfo **modes, int print) {
    struct kdrm_card_res res = {0};
    if (xioctl(fd, KDRM_IOCTL_GETRESOURCES, &res)) die("GETRESOURCES");
    uint32_t *crtcs = calloc(res.count_crtcs + 1, 4), *conns = calloc(res.count_connectors + 1, 4);
    uint32_t *fbs = calloc(res.count_fbs + 1, 4), *encs = calloc(res.count_encoders + 1, 4);
    res.crtc_id_ptr = (uintptr_t)crtcs; res.connector_id_ptr = (uintptr_t)conns;
    res.fb_id_ptr = (uintptr_t)fbs; res.encoder_id_ptr = (uintptr_t)encs;
    if (xioctl(fd, KDRM_IOCTL_GETRESOURCES, &res)) die("GETRESOURCES");
    if (res.count_crtcs == 0 || res.count_connectors == 0) { fprintf(stderr, "gputool: no crtc or connector\n"); exit(1); }
    struct kdrm_get_connector found = {0};
    int have = 0;
    for (uint32_t i = 0; i < res.count_connectors; i++) {
        struct kdrm_get_connector c = {0};
        c.connector_id = conns[i];
        if (xioctl(fd, KDRM_IOCTL_GETCONNECTOR, &c)) die("GETCONNECTOR");
        struct kdrm_modeinfo *m = calloc(c.count_modes + 1, sizeof *m);
        uint32_t *e = calloc(c.count_encoders + 1, 4);
        uint32_t *p = calloc(c.count_props + 1, 4);
        uint64_t *pv = calloc(c.count_props + 1, 8);
        c.modes_ptr = (uintptr_t)m; c.encoders_ptr = (uintptr_t)e; c.props_ptr = (uintptr_t)p; c.prop_values_ptr = (uintptr_t)pv;
        if (xioctl(fd, KDRM_IOCTL_GETCONNECTOR, &c)) die("GETCONNECTOR");
        if (print) {
            printf("CONN %u %s", c.connector_id, c.connection == 1 ? "connected" : "disconnected");
            for (uint32_t k = 0; k < c.count_modes; k++) printf(" %ux%u", m[k].hdisplay, m[k].vdisplay);
            printf("\n");
        }
        if (!have && c.connection == 1 && c.count_modes > 0) {
            found = c; *modes = m; have = 1;
            *crtc = crtcs[i < res.count_crtcs ? i : 0];
        }
    }
    if (!have && !print) { fprintf(stderr, "gputool: no connected connector with modes\n"); exit(1); }
    return found;
}

static int draw(const char *dev, int seed, int seconds, int cx, int cy) {
    int fd = open(dev, O_RDWR | O_CLOEXEC);
    if (fd < 0) die(dev);
    xioctl(fd, KDRM_IOCTL_SET_MASTER, 0);   // already master when nobody else holds it
    uint32_t crtc = 0;
    struct kdrm_modeinfo *modes = 0;
    struct kdrm_get_connector c = connector(fd, &crtc, &modes, 0);
    // The preferred mode (DRM_MODE_TYPE_PREFERRED = 1 << 3), else the first.
    struct kdrm_modeinfo mode = modes[0];
    for (uint32_t k = 0; k < c.count_modes; k++) if (modes[k].type & (1 << 3)) { mode = modes[k]; break; }
    int w = mode.hdisplay, h = mode.vdisplay;
    struct kdrm_create_dumb cd = { .height = h, .width = w, .bpp = 32 };
    if (xioctl(fd, KDRM_IOCTL_CREATE_DUMB, &cd)) die("CREATE_DUMB");
    struct kdrm_fb_cmd fb = { .width = w, .height = h, .pitch = cd.pitch, .bpp = 32, .depth = 24, .handle = cd.handle };
    if (xioctl(fd, KDRM_IOCTL_ADDFB, &fb)) die("ADDFB");
    struct kdrm_map_dumb md = { .handle = cd.handle };
    if (xioctl(fd, KDRM_IOCTL_MAP_DUMB, &md)) die("MAP_DUMB");
    uint8_t *p = mmap(0, cd.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, md.offset);
    if (p == MAP_FAILED) die("mmap");
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            uint8_t r, g, b;
            pattern(x, y, seed, &r, &g, &b);
            // XRGB8888: a little-endian 32-bit word 0xXXRRGGBB: bytes B, G, R, X in memory.
            uint8_t *q = p + (size_t)y * cd.pitch + (size_t)x * 4;
            q[0] = b; q[1] = g; q[2] = r; q[3] = 0;
        }
    struct kdrm_crtc sc = { .set_connectors_ptr = (uintptr_t)&c.connector_id, .count_connectors = 1, .crtc_id = crtc,
                                .fb_id = fb.fb_id, .mode_valid = 1, .mode = mode };
    if (xioctl(fd, KDRM_IOCTL_SETCRTC, &sc)) die("SETCRTC");
    struct kdrm_clip_rect clip = { 0, 0, (uint16_t)w, (uint16_t)h };
    struct kdrm_fb_dirty_cmd dirty = { .fb_id = fb.fb_id, .num_clips = 1, .clips_ptr = (uintptr_t)&clip };
    if (xioctl(fd, KDRM_IOCTL_DIRTYFB, &dirty) && errno != ENOSYS) die("DIRTYFB");
    if (cx >= 0) {
        // A 64x64 cursor image: opaque, colour from the seed.
        struct kdrm_create_dumb cc = { .height = 64, .width = 64, .bpp = 32 };
        if (xioctl(fd, KDRM_IOCTL_CREATE_DUMB, &cc)) die("CREATE_DUMB cursor");
        struct kdrm_map_dumb cm = { .handle = cc.handle };
        if (xioctl(fd, KDRM_IOCTL_MAP_DUMB, &cm)) die("MAP_DUMB cursor");
        uint32_t *cp = mmap(0, cc.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, cm.offset);
        if (cp == MAP_FAILED) die("mmap cursor");
        for (int k = 0; k < 64 * 64; k++) cp[k] = 0xff000000u | (uint32_t)seed * 0x010203u;
        struct kdrm_cursor cur = { .flags = 1 /* BO */, .crtc_id = crtc, .x = cx, .y = cy, .width = 64, .height = 64, .handle = cc.handle };
        if (xioctl(fd, KDRM_IOCTL_CURSOR, &cur)) die("CURSOR");
        struct kdrm_cursor mv = { .flags = 2 /* MOVE */, .crtc_id = crtc, .x = cx + 10, .y = cy + 20 };
        if (xioctl(fd, KDRM_IOCTL_CURSOR, &mv)) die("CURSOR move");
    }
    printf("MODE %d %d\nREADY\n", w, h);
    fflush(stdout);
    sleep(seconds);
    return 0;
}

static int check(const char *file, int w, int h, int seed) {
    FILE *f = fopen(file, "rb");
    if (!f) die(file);
    int fw, fh, max;
    if (fscanf(f, "P6 %d %d %d", &fw, &fh, &max) != 3 || fgetc(f) != '\n') { fprintf(stderr, "gputool: %s: not a P6 PPM\n", file); return 1; }
    if (fw != w || fh != h || max != 255) { fprintf(stderr, "gputool: %s is %dx%d (max %d), want %dx%d\n", file, fw, fh, max, w, h); return 1; }
    size_t n = (size_t)w * h * 3;
    uint8_t *d = malloc(n + 1);
    if (fread(d, 1, n + 1, f) != n) { fprintf(stderr, "gputool: %s: wrong size\n", file); return 1; }
    long bad = 0; int fx = -1, fy = -1;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            uint8_t r, g, b, *q = d + ((size_t)y * w + x) * 3;
            pattern(x, y, seed, &r, &g, &b);
            if (q[0] != r || q[1] != g || q[2] != b) { if (!bad) { fx = x; fy = y; } bad++; }
        }
    if (bad) {
        uint8_t *q = d + ((size_t)fy * w + fx) * 3, r, g, b;
        pattern(fx, fy, seed, &r, &g, &b);
        fprintf(stderr, "gputool: %ld pixels differ; first at (%d,%d): %02x%02x%02x, want %02x%02x%02x\n", bad, fx, fy, q[0], q[1], q[2], r, g, b);
        return 1;
    }
    printf("OK %dx%d\n", w, h);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "draw")) return draw(argv[2], atoi(argv[3]), atoi(argv[4]), -1, -1);
    if (argc == 7 && !strcmp(argv[1], "draw")) return draw(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]));
    if (argc == 6 && !strcmp(argv[1], "check")) return check(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    if (argc == 3 && !strcmp(argv[1], "modes")) {
        int fd = open(argv[2], O_RDWR | O_CLOEXEC);
        if (fd < 0) die(argv[2]);
        uint32_t crtc; struct kdrm_modeinfo *m;
        connector(fd, &crtc, &m, 1);
        return 0;
    }
    fprintf(stderr, "usage: gputool draw DEV SEED SECONDS [X Y] | check FILE.ppm W H SEED | modes DEV\n");
    return 2;
}
