// gputool: the guest side of the gpu case, through DRM/KMS ioctls only (no libdrm; the structures below are the
// kernel's uapi/drm/drm.h and drm_mode.h, stable ABI).
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

struct drm_mode_modeinfo {
    uint32_t clock;
    uint16_t hdisplay, hsync_start, hsync_end, htotal, hskew;
    uint16_t vdisplay, vsync_start, vsync_end, vtotal, vscan;
    uint32_t vrefresh, flags, type;
    char name[32];
};
struct drm_mode_card_res {
    uint64_t fb_id_ptr, crtc_id_ptr, connector_id_ptr, encoder_id_ptr;
    uint32_t count_fbs, count_crtcs, count_connectors, count_encoders;
    uint32_t min_width, max_width, min_height, max_height;
};
struct drm_mode_get_connector {
    uint64_t encoders_ptr, modes_ptr, props_ptr, prop_values_ptr;
    uint32_t count_modes, count_props, count_encoders;
    uint32_t encoder_id, connector_id, connector_type, connector_type_id;
    uint32_t connection, mm_width, mm_height, subpixel, pad;
};
struct drm_mode_create_dumb { uint32_t height, width, bpp, flags, handle, pitch; uint64_t size; };
struct drm_mode_map_dumb { uint32_t handle, pad; uint64_t offset; };
struct drm_mode_fb_cmd { uint32_t fb_id, width, height, pitch, bpp, depth, handle; };
struct drm_mode_crtc {
    uint64_t set_connectors_ptr;
    uint32_t count_connectors, crtc_id, fb_id, x, y, gamma_size, mode_valid;
    struct drm_mode_modeinfo mode;
};
struct drm_mode_fb_dirty_cmd { uint32_t fb_id, flags, color, num_clips; uint64_t clips_ptr; };
struct drm_clip_rect { uint16_t x1, y1, x2, y2; };
struct drm_mode_cursor { uint32_t flags, crtc_id; int32_t x, y; uint32_t width, height, handle; };

#define DRM_IOCTL_SET_MASTER _IO('d', 0x1e)
#define DRM_IOCTL_MODE_GETRESOURCES _IOWR('d', 0xA0, struct drm_mode_card_res)
#define DRM_IOCTL_MODE_SETCRTC _IOWR('d', 0xA2, struct drm_mode_crtc)
#define DRM_IOCTL_MODE_CURSOR _IOWR('d', 0xA3, struct drm_mode_cursor)
#define DRM_IOCTL_MODE_GETCONNECTOR _IOWR('d', 0xA7, struct drm_mode_get_connector)
#define DRM_IOCTL_MODE_ADDFB _IOWR('d', 0xAE, struct drm_mode_fb_cmd)
#define DRM_IOCTL_MODE_DIRTYFB _IOWR('d', 0xB1, struct drm_mode_fb_dirty_cmd)
#define DRM_IOCTL_MODE_CREATE_DUMB _IOWR('d', 0xB2, struct drm_mode_create_dumb)
#define DRM_IOCTL_MODE_MAP_DUMB _IOWR('d', 0xB3, struct drm_mode_map_dumb)

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
static struct drm_mode_get_connector connector(int fd, uint32_t *crtc, struct drm_mode_modeinfo **modes, int print) {
    struct drm_mode_card_res res = {0};
    if (xioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, &res)) die("GETRESOURCES");
    uint32_t *crtcs = calloc(res.count_crtcs + 1, 4), *conns = calloc(res.count_connectors + 1, 4);
    uint32_t *fbs = calloc(res.count_fbs + 1, 4), *encs = calloc(res.count_encoders + 1, 4);
    res.crtc_id_ptr = (uintptr_t)crtcs; res.connector_id_ptr = (uintptr_t)conns;
    res.fb_id_ptr = (uintptr_t)fbs; res.encoder_id_ptr = (uintptr_t)encs;
    if (xioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, &res)) die("GETRESOURCES");
    if (res.count_crtcs == 0 || res.count_connectors == 0) { fprintf(stderr, "gputool: no crtc or connector\n"); exit(1); }
    struct drm_mode_get_connector found = {0};
    int have = 0;
    for (uint32_t i = 0; i < res.count_connectors; i++) {
        struct drm_mode_get_connector c = {0};
        c.connector_id = conns[i];
        if (xioctl(fd, DRM_IOCTL_MODE_GETCONNECTOR, &c)) die("GETCONNECTOR");
        struct drm_mode_modeinfo *m = calloc(c.count_modes + 1, sizeof *m);
        uint32_t *e = calloc(c.count_encoders + 1, 4);
        uint32_t *p = calloc(c.count_props + 1, 4);
        uint64_t *pv = calloc(c.count_props + 1, 8);
        c.modes_ptr = (uintptr_t)m; c.encoders_ptr = (uintptr_t)e; c.props_ptr = (uintptr_t)p; c.prop_values_ptr = (uintptr_t)pv;
        if (xioctl(fd, DRM_IOCTL_MODE_GETCONNECTOR, &c)) die("GETCONNECTOR");
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
    xioctl(fd, DRM_IOCTL_SET_MASTER, 0);   // already master when nobody else holds it
    uint32_t crtc = 0;
    struct drm_mode_modeinfo *modes = 0;
    struct drm_mode_get_connector c = connector(fd, &crtc, &modes, 0);
    // The preferred mode (DRM_MODE_TYPE_PREFERRED = 1 << 3), else the first.
    struct drm_mode_modeinfo mode = modes[0];
    for (uint32_t k = 0; k < c.count_modes; k++) if (modes[k].type & (1 << 3)) { mode = modes[k]; break; }
    int w = mode.hdisplay, h = mode.vdisplay;
    struct drm_mode_create_dumb cd = { .height = h, .width = w, .bpp = 32 };
    if (xioctl(fd, DRM_IOCTL_MODE_CREATE_DUMB, &cd)) die("CREATE_DUMB");
    struct drm_mode_fb_cmd fb = { .width = w, .height = h, .pitch = cd.pitch, .bpp = 32, .depth = 24, .handle = cd.handle };
    if (xioctl(fd, DRM_IOCTL_MODE_ADDFB, &fb)) die("ADDFB");
    struct drm_mode_map_dumb md = { .handle = cd.handle };
    if (xioctl(fd, DRM_IOCTL_MODE_MAP_DUMB, &md)) die("MAP_DUMB");
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
    struct drm_mode_crtc sc = { .set_connectors_ptr = (uintptr_t)&c.connector_id, .count_connectors = 1, .crtc_id = crtc,
                                .fb_id = fb.fb_id, .mode_valid = 1, .mode = mode };
    if (xioctl(fd, DRM_IOCTL_MODE_SETCRTC, &sc)) die("SETCRTC");
    struct drm_clip_rect clip = { 0, 0, (uint16_t)w, (uint16_t)h };
    struct drm_mode_fb_dirty_cmd dirty = { .fb_id = fb.fb_id, .num_clips = 1, .clips_ptr = (uintptr_t)&clip };
    if (xioctl(fd, DRM_IOCTL_MODE_DIRTYFB, &dirty) && errno != ENOSYS) die("DIRTYFB");
    if (cx >= 0) {
        // A 64x64 cursor image: opaque, colour from the seed.
        struct drm_mode_create_dumb cc = { .height = 64, .width = 64, .bpp = 32 };
        if (xioctl(fd, DRM_IOCTL_MODE_CREATE_DUMB, &cc)) die("CREATE_DUMB cursor");
        struct drm_mode_map_dumb cm = { .handle = cc.handle };
        if (xioctl(fd, DRM_IOCTL_MODE_MAP_DUMB, &cm)) die("MAP_DUMB cursor");
        uint32_t *cp = mmap(0, cc.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, cm.offset);
        if (cp == MAP_FAILED) die("mmap cursor");
        for (int k = 0; k < 64 * 64; k++) cp[k] = 0xff000000u | (uint32_t)seed * 0x010203u;
        struct drm_mode_cursor cur = { .flags = 1 /* BO */, .crtc_id = crtc, .x = cx, .y = cy, .width = 64, .height = 64, .handle = cc.handle };
        if (xioctl(fd, DRM_IOCTL_MODE_CURSOR, &cur)) die("CURSOR");
        struct drm_mode_cursor mv = { .flags = 2 /* MOVE */, .crtc_id = crtc, .x = cx + 10, .y = cy + 20 };
        if (xioctl(fd, DRM_IOCTL_MODE_CURSOR, &mv)) die("CURSOR move");
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
        uint32_t crtc; struct drm_mode_modeinfo *m;
        connector(fd, &crtc, &m, 1);
        return 0;
    }
    fprintf(stderr, "usage: gputool draw DEV SEED SECONDS [X Y] | check FILE.ppm W H SEED | modes DEV\n");
    return 2;
}
