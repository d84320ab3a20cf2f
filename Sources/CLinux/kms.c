// The gpu device's host DRM/KMS output: legacy mode-setting ioctls on /dev/dri/cardN (lbkms.h). No libdrm: the
// uapi structures are declared in kdrm.h (the kernel's ABI; sizes asserted).
#include "lbkms.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "kdrm.h"

// An ioctl retried on EINTR/EAGAIN (as libdrm's drmIoctl); 0 or -errno.
static int kio(int fd, unsigned long req, void *arg) {
    int r;
    do { r = ioctl(fd, req, arg); } while (r == -1 && (errno == EINTR || errno == EAGAIN));
    return r == -1 ? -errno : 0;
}

int lb_kms_open(const char *path) {
    int fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return -errno;
    int r = kio(fd, KDRM_IOCTL_SET_MASTER, NULL);
    if (r == 0) {
        struct kdrm_get_cap c = { .capability = KDRM_CAP_DUMB_BUFFER };
        r = kio(fd, KDRM_IOCTL_GET_CAP, &c);
        if (r == 0 && c.value == 0) r = -EOPNOTSUPP;
    }
    if (r < 0) { close(fd); return r; }
    return fd;
}

// The kernel's connector type names (drm_connector_enum_list, DRM_MODE_CONNECTOR_* order).
static const char *const type_names[] = {
    "Unknown", "VGA", "DVI-I", "DVI-D", "DVI-A", "Composite", "SVIDEO", "LVDS", "Component", "DIN", "DP",
    "HDMI-A", "HDMI-B", "TV", "eDP", "Virtual", "DSI", "DPI", "Writeback", "SPI", "USB",
};

// GETCONNECTOR with its arrays: the counts are asked first, then the arrays filled; repeated while the counts
// grow (a hot-plug between the two calls). Caller frees *modes and *encoders.
static int get_connector(int fd, uint32_t id, struct kdrm_get_connector *c, struct kdrm_modeinfo **modes,
                         uint32_t **encoders) {
    *modes = NULL; *encoders = NULL;
    for (int tries = 0; tries < 8; tries++) {
        memset(c, 0, sizeof *c);
        c->connector_id = id;
        int r = kio(fd, KDRM_IOCTL_GETCONNECTOR, c);
        if (r < 0) return r;
        uint32_t nm = c->count_modes, ne = c->count_encoders;
        if (nm > 4096 || ne > 64) return -E2BIG;
        free(*modes); free(*encoders);
        *modes = calloc(nm ? nm : 1, sizeof **modes);
        *encoders = calloc(ne ? ne : 1, sizeof **encoders);
        if (!*modes || !*encoders) return -ENOMEM;
        memset(c, 0, sizeof *c);
        c->connector_id = id;
        c->count_modes = nm; c->modes_ptr = (uint64_t)(uintptr_t)*modes;
        c->count_encoders = ne; c->encoders_ptr = (uint64_t)(uintptr_t)*encoders;
        r = kio(fd, KDRM_IOCTL_GETCONNECTOR, c);
        if (r < 0) return r;
        if (c->count_modes <= nm && c->count_encoders <= ne) return 0;
    }
    return -EAGAIN;
}

static void connector_name(const struct kdrm_get_connector *c, char *out, size_t n) {
    const char *t = c->connector_type < sizeof type_names / sizeof type_names[0] ? type_names[c->connector_type] : "Unknown";
    snprintf(out, n, "%s-%u", t, c->connector_type_id);
}

int lb_kms_pick(int fd, const char *want, uint32_t width, uint32_t height, struct lb_kms_target *t, char *err,
                size_t errlen) {
    memset(t, 0, sizeof *t);
    if (errlen) err[0] = 0;
    struct kdrm_card_res res;
    uint32_t *crtcs = NULL, *conns = NULL;
    int r = -EAGAIN;
    for (int tries = 0; tries < 8 && r == -EAGAIN; tries++) {
        memset(&res, 0, sizeof res);
        if ((r = kio(fd, KDRM_IOCTL_GETRESOURCES, &res)) < 0) break;
        uint32_t nc = res.count_crtcs, nk = res.count_connectors;
        if (nc > 64 || nk > 256) { r = -E2BIG; break; }
        free(crtcs); free(conns);
        crtcs = calloc(nc ? nc : 1, 4); conns = calloc(nk ? nk : 1, 4);
        if (!crtcs || !conns) { r = -ENOMEM; break; }
        memset(&res, 0, sizeof res);
        res.count_crtcs = nc; res.crtc_id_ptr = (uint64_t)(uintptr_t)crtcs;
        res.count_connectors = nk; res.connector_id_ptr = (uint64_t)(uintptr_t)conns;
        if ((r = kio(fd, KDRM_IOCTL_GETRESOURCES, &res)) < 0) break;
        r = (res.count_crtcs <= nc && res.count_connectors <= nk) ? 0 : -EAGAIN;
    }
    if (r < 0) { snprintf(err, errlen, "GETRESOURCES: %s (not a KMS device?)", strerror(-r)); goto out; }
    size_t used = 0;
    if (errlen) used = (size_t)snprintf(err, errlen, "connectors:");
    r = -ENOENT;
    for (uint32_t i = 0; i < res.count_connectors; i++) {
        struct kdrm_get_connector c;
        struct kdrm_modeinfo *modes; uint32_t *encs;
        int g = get_connector(fd, conns[i], &c, &modes, &encs);
        if (g < 0) { free(modes); free(encs); continue; }
        char name[32];
        connector_name(&c, name, sizeof name);
        if (used < errlen)
            used += (size_t)snprintf(err + used, errlen - used, " %s (%s, %u modes)", name,
                                     c.connection == KDRM_CONNECTED ? "connected" : c.connection == 2 ? "disconnected" : "unknown",
                                     c.count_modes);
        int match = want ? strcmp(want, name) == 0 : (c.connection == KDRM_CONNECTED && c.count_modes > 0);
        if (!match || r == 0) { free(modes); free(encs); continue; }
        if (c.count_modes == 0 || c.connection != KDRM_CONNECTED) {
            free(modes); free(encs);
            r = -ENODEV;   // named, but nothing plugged in or no mode
            continue;
        }
        // The mode: the size asked for (the preferred one among several), else the preferred mode, else the first.
        int pick = -1, pref = -1;
        for (uint32_t m = 0; m < c.count_modes; m++) {
            int isPref = (modes[m].type & KDRM_MODE_TYPE_PREFERRED) != 0;
            if (isPref && pref < 0) pref = (int)m;
            if (modes[m].hdisplay == width && modes[m].vdisplay == height && (pick < 0 || isPref)) pick = (int)m;
        }
        t->exact = pick >= 0;
        if (pick < 0) pick = pref >= 0 ? pref : 0;
        // The CRTC: the one the current encoder drives, else the first one any of its encoders can drive.
        uint32_t crtc = 0;
        if (c.encoder_id) {
            struct kdrm_get_encoder e = { .encoder_id = c.encoder_id };
            if (kio(fd, KDRM_IOCTL_GETENCODER, &e) == 0) crtc = e.crtc_id;
        }
        for (uint32_t k = 0; k < c.count_encoders && !crtc; k++) {
            struct kdrm_get_encoder e = { .encoder_id = encs[k] };
            if (kio(fd, KDRM_IOCTL_GETENCODER, &e) < 0) continue;
            for (uint32_t b = 0; b < res.count_crtcs && b < 32; b++)
                if (e.possible_crtcs & (1u << b)) { crtc = crtcs[b]; break; }
        }
        if (!crtc) { free(modes); free(encs); r = -ENXIO; continue; }
        t->connector_id = c.connector_id;
        t->crtc_id = crtc;
        t->mode_w = modes[pick].hdisplay; t->mode_h = modes[pick].vdisplay; t->vrefresh = modes[pick].vrefresh;
        memcpy(t->modeinfo, &modes[pick], sizeof t->modeinfo);
        memcpy(t->connector, name, sizeof name);
        free(modes); free(encs);
        r = 0;
    }
    if (r == 0 && errlen) err[0] = 0;
out:
    free(crtcs); free(conns);
    return r;
}

int lb_kms_buf_create(int fd, uint32_t width, uint32_t height, int framebuffer, struct lb_kms_buf *b) {
    memset(b, 0, sizeof *b);
    struct kdrm_create_dumb c = { .height = height, .width = width, .bpp = 32 };
    int r = kio(fd, KDRM_IOCTL_CREATE_DUMB, &c);
    if (r < 0) return r;
    b->handle = c.handle; b->pitch = c.pitch; b->size = c.size; b->width = width; b->height = height;
    // The kernel's answer checked: a pitch below a row or a size below the picture would write past the buffer.
    if (c.pitch < width * 4 || c.size < (uint64_t)c.pitch * height) { lb_kms_buf_destroy(fd, b); return -EPROTO; }
    if (framebuffer) {
        struct kdrm_fb_cmd f = { .width = width, .height = height, .pitch = c.pitch, .bpp = 32, .depth = 24, .handle = c.handle };
        if ((r = kio(fd, KDRM_IOCTL_ADDFB, &f)) < 0) { lb_kms_buf_destroy(fd, b); return r; }
        b->fb_id = f.fb_id;
    }
    struct kdrm_map_dumb m = { .handle = c.handle };
    if ((r = kio(fd, KDRM_IOCTL_MAP_DUMB, &m)) < 0) { lb_kms_buf_destroy(fd, b); return r; }
    void *p = mmap(NULL, (size_t)c.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)m.offset);
    if (p == MAP_FAILED) { r = -errno; lb_kms_buf_destroy(fd, b); return r; }
    b->map = p;
    memset(p, 0, (size_t)c.size);
    return 0;
}

void lb_kms_buf_destroy(int fd, struct lb_kms_buf *b) {
    if (b->map) munmap(b->map, (size_t)b->size);
    if (b->fb_id) { unsigned int id = b->fb_id; kio(fd, KDRM_IOCTL_RMFB, &id); }
    if (b->handle) { struct kdrm_destroy_dumb d = { .handle = b->handle }; kio(fd, KDRM_IOCTL_DESTROY_DUMB, &d); }
    memset(b, 0, sizeof *b);
}

int lb_kms_set_crtc(int fd, const struct lb_kms_target *t, uint32_t fb_id) {
    struct kdrm_crtc c;
    memset(&c, 0, sizeof c);
    c.crtc_id = t->crtc_id;
    uint32_t conn = t->connector_id;
    if (fb_id) {
        c.fb_id = fb_id;
        c.set_connectors_ptr = (uint64_t)(uintptr_t)&conn;
        c.count_connectors = 1;
        c.mode_valid = 1;
        memcpy(&c.mode, t->modeinfo, sizeof c.mode);
    }
    return kio(fd, KDRM_IOCTL_SETCRTC, &c);
}

int lb_kms_flip(int fd, uint32_t crtc_id, uint32_t fb_id) {
    struct kdrm_page_flip f = { .crtc_id = crtc_id, .fb_id = fb_id, .flags = KDRM_MODE_PAGE_FLIP_EVENT, .user_data = fb_id };
    int r;
    do { r = ioctl(fd, KDRM_IOCTL_PAGE_FLIP, &f); } while (r == -1 && errno == EINTR);   // EBUSY is an answer here
    return r == -1 ? -errno : 0;
}

int lb_kms_dirty(int fd, uint32_t fb_id, uint32_t x1, uint32_t y1, uint32_t x2, uint32_t y2) {
    struct kdrm_clip_rect clip = { (unsigned short)x1, (unsigned short)y1, (unsigned short)x2, (unsigned short)y2 };
    struct kdrm_fb_dirty_cmd d = { .fb_id = fb_id, .num_clips = 1, .clips_ptr = (uint64_t)(uintptr_t)&clip };
    return kio(fd, KDRM_IOCTL_DIRTYFB, &d);
}

int lb_kms_cursor_set(int fd, uint32_t crtc_id, uint32_t handle, uint32_t w, uint32_t h, int32_t hot_x, int32_t hot_y) {
    struct kdrm_cursor2 c = { .flags = KDRM_MODE_CURSOR_BO, .crtc_id = crtc_id, .width = handle ? w : 0,
                              .height = handle ? h : 0, .handle = handle, .hot_x = hot_x, .hot_y = hot_y };
    return kio(fd, KDRM_IOCTL_CURSOR2, &c);
}

int lb_kms_cursor_move(int fd, uint32_t crtc_id, int32_t x, int32_t y) {
    struct kdrm_cursor2 c = { .flags = KDRM_MODE_CURSOR_MOVE, .crtc_id = crtc_id, .x = x, .y = y };
    return kio(fd, KDRM_IOCTL_CURSOR2, &c);
}

int lb_kms_events(int fd) {
    // Events are whole in one read (the kernel never splits one); 1 KiB holds 32 flip events.
    char buf[1024];
    int flips = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return flips;
            return -errno;
        }
        if (n == 0) return flips;
        for (ssize_t o = 0; o + (ssize_t)sizeof(struct kdrm_event) <= n;) {
            struct kdrm_event e;
            memcpy(&e, buf + o, sizeof e);
            if (e.length < sizeof e || o + (ssize_t)e.length > n) return -EPROTO;
            if (e.type == KDRM_EVENT_FLIP_COMPLETE) flips++;
            o += e.length;
        }
    }
}

void lb_kms_copy(void *dst, size_t dpitch, const void *src, size_t spitch, uint32_t w, uint32_t h, int ro, int go, int bo) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (ro == 2 && go == 1 && bo == 0) {
        // B8G8R8X8/A8: the bytes are XRGB8888's already (X may hold alpha: the CRTC ignores it).
        for (uint32_t y = 0; y < h; y++) memcpy(d + y * dpitch, s + y * spitch, (size_t)w * 4);
        return;
    }
    for (uint32_t y = 0; y < h; y++) {
        const unsigned char *p = s + y * spitch;
        uint32_t *q = (uint32_t *)(void *)(d + y * dpitch);
        for (uint32_t x = 0; x < w; x++, p += 4)
            q[x] = 0xff000000u | (uint32_t)p[ro] << 16 | (uint32_t)p[go] << 8 | (uint32_t)p[bo];
    }
}

void lb_kms_copy_argb(void *dst, size_t dpitch, const void *src, size_t spitch, uint32_t w, uint32_t h,
                      int ro, int go, int bo, int ao) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    for (uint32_t y = 0; y < h; y++) {
        const unsigned char *p = s + y * spitch;
        uint32_t *q = (uint32_t *)(void *)(d + y * dpitch);
        for (uint32_t x = 0; x < w; x++, p += 4)
            q[x] = (uint32_t)(ao < 0 ? 0xff : p[ao]) << 24 | (uint32_t)p[ro] << 16 | (uint32_t)p[go] << 8 | (uint32_t)p[bo];
    }
}

void lb_kms_fill_black(void *dst, size_t dpitch, uint32_t w, uint32_t h) {
    unsigned char *d = dst;
    for (uint32_t y = 0; y < h; y++) {
        uint32_t *q = (uint32_t *)(void *)(d + y * dpitch);
        for (uint32_t x = 0; x < w; x++) q[x] = 0xff000000u;
    }
}
