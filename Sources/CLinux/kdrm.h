// The kernel's DRM/KMS uapi (include/uapi/drm/drm.h and drm_mode.h: a stable ABI), declared here because Debian ships
// <drm/*.h> only in libdrm-dev; sizes asserted. Shared by kms.c (the gpu's kms output) and the guest test tool
// Tests/guest/tools/gputool.c (built with -I Sources/CLinux). Not in include/: nothing of it is Swift's.
#ifndef LB_KDRM_H
#define LB_KDRM_H
#include <stdint.h>
#include <sys/ioctl.h>

struct kdrm_modeinfo {
    uint32_t clock;
    uint16_t hdisplay, hsync_start, hsync_end, htotal, hskew;
    uint16_t vdisplay, vsync_start, vsync_end, vtotal, vscan;
    uint32_t vrefresh, flags, type;
    char name[32];
};
struct kdrm_card_res {
    uint64_t fb_id_ptr, crtc_id_ptr, connector_id_ptr, encoder_id_ptr;
    uint32_t count_fbs, count_crtcs, count_connectors, count_encoders;
    uint32_t min_width, max_width, min_height, max_height;
};
struct kdrm_crtc {
    uint64_t set_connectors_ptr;
    uint32_t count_connectors, crtc_id, fb_id, x, y, gamma_size, mode_valid;
    struct kdrm_modeinfo mode;
};
struct kdrm_get_encoder { uint32_t encoder_id, encoder_type, crtc_id, possible_crtcs, possible_clones; };
struct kdrm_get_connector {
    uint64_t encoders_ptr, modes_ptr, props_ptr, prop_values_ptr;
    uint32_t count_modes, count_props, count_encoders;
    uint32_t encoder_id, connector_id, connector_type, connector_type_id, connection;
    uint32_t mm_width, mm_height, subpixel, pad;
};
struct kdrm_fb_cmd { uint32_t fb_id, width, height, pitch, bpp, depth, handle; };
struct kdrm_clip_rect { unsigned short x1, y1, x2, y2; };
struct kdrm_fb_dirty_cmd { uint32_t fb_id, flags, color, num_clips; uint64_t clips_ptr; };
struct kdrm_cursor { uint32_t flags, crtc_id; int32_t x, y; uint32_t width, height, handle; };
struct kdrm_cursor2 { uint32_t flags, crtc_id; int32_t x, y; uint32_t width, height, handle; int32_t hot_x, hot_y; };
struct kdrm_page_flip { uint32_t crtc_id, fb_id, flags, reserved; uint64_t user_data; };
struct kdrm_create_dumb { uint32_t height, width, bpp, flags, handle, pitch; uint64_t size; };
struct kdrm_map_dumb { uint32_t handle, pad; uint64_t offset; };
struct kdrm_destroy_dumb { uint32_t handle; };
struct kdrm_get_cap { uint64_t capability, value; };
struct kdrm_event { uint32_t type, length; };

_Static_assert(sizeof(struct kdrm_modeinfo) == 68, "drm_mode_modeinfo");
_Static_assert(sizeof(struct kdrm_card_res) == 64, "drm_mode_card_res");
_Static_assert(sizeof(struct kdrm_crtc) == 104, "drm_mode_crtc");
_Static_assert(sizeof(struct kdrm_get_connector) == 80, "drm_mode_get_connector");
_Static_assert(sizeof(struct kdrm_fb_dirty_cmd) == 24, "drm_mode_fb_dirty_cmd");
_Static_assert(sizeof(struct kdrm_cursor2) == 36, "drm_mode_cursor2");
_Static_assert(sizeof(struct kdrm_page_flip) == 24, "drm_mode_crtc_page_flip");
_Static_assert(sizeof(struct kdrm_create_dumb) == 32, "drm_mode_create_dumb");
_Static_assert(sizeof(struct kdrm_map_dumb) == 16, "drm_mode_map_dumb");

#define KDRM_IOWR(nr, type) _IOWR('d', nr, type)
#define KDRM_IOCTL_GET_CAP          KDRM_IOWR(0x0c, struct kdrm_get_cap)
#define KDRM_IOCTL_SET_MASTER       _IO('d', 0x1e)
#define KDRM_IOCTL_GETRESOURCES     KDRM_IOWR(0xA0, struct kdrm_card_res)
#define KDRM_IOCTL_SETCRTC          KDRM_IOWR(0xA2, struct kdrm_crtc)
#define KDRM_IOCTL_CURSOR           KDRM_IOWR(0xA3, struct kdrm_cursor)
#define KDRM_IOCTL_GETENCODER       KDRM_IOWR(0xA6, struct kdrm_get_encoder)
#define KDRM_IOCTL_GETCONNECTOR     KDRM_IOWR(0xA7, struct kdrm_get_connector)
#define KDRM_IOCTL_ADDFB            KDRM_IOWR(0xAE, struct kdrm_fb_cmd)
#define KDRM_IOCTL_RMFB             KDRM_IOWR(0xAF, unsigned int)
#define KDRM_IOCTL_PAGE_FLIP        KDRM_IOWR(0xB0, struct kdrm_page_flip)
#define KDRM_IOCTL_DIRTYFB          KDRM_IOWR(0xB1, struct kdrm_fb_dirty_cmd)
#define KDRM_IOCTL_CREATE_DUMB      KDRM_IOWR(0xB2, struct kdrm_create_dumb)
#define KDRM_IOCTL_MAP_DUMB         KDRM_IOWR(0xB3, struct kdrm_map_dumb)
#define KDRM_IOCTL_DESTROY_DUMB     KDRM_IOWR(0xB4, struct kdrm_destroy_dumb)
#define KDRM_IOCTL_CURSOR2          KDRM_IOWR(0xBB, struct kdrm_cursor2)
#define KDRM_CAP_DUMB_BUFFER        0x1
#define KDRM_MODE_TYPE_PREFERRED    (1 << 3)
#define KDRM_MODE_CURSOR_BO         0x01
#define KDRM_MODE_CURSOR_MOVE       0x02
#define KDRM_MODE_PAGE_FLIP_EVENT   0x01
#define KDRM_EVENT_FLIP_COMPLETE    0x02
#define KDRM_CONNECTED              1

#endif
