// VDUSE (Linux's vDPA Device in Userspace, include/uapi/linux/vduse.h, Documentation/userspace-api/vduse.rst)
// and the vdpa generic-netlink request that puts a VDUSE device on the vDPA bus (what iproute2's
// `vdpa dev add name NAME mgmtdev vduse` sends). The transport is Sources/Transport/VDUSE/.
#ifndef LB_VDUSE_H
#define LB_VDUSE_H
#include <stdint.h>
#include <stddef.h>
#include <linux/ioctl.h>
#include <linux/vduse.h>

static inline unsigned long lb_vduse_get_api_version(void) { return VDUSE_GET_API_VERSION; }
static inline unsigned long lb_vduse_set_api_version(void) { return VDUSE_SET_API_VERSION; }
static inline unsigned long lb_vduse_destroy_dev(void) { return VDUSE_DESTROY_DEV; }
static inline unsigned long lb_vduse_iotlb_get_fd(void) { return VDUSE_IOTLB_GET_FD; }
static inline unsigned long lb_vduse_dev_get_features(void) { return VDUSE_DEV_GET_FEATURES; }
static inline unsigned long lb_vduse_dev_inject_config_irq(void) { return VDUSE_DEV_INJECT_CONFIG_IRQ; }
static inline unsigned long lb_vduse_vq_setup(void) { return VDUSE_VQ_SETUP; }
static inline unsigned long lb_vduse_vq_get_info(void) { return VDUSE_VQ_GET_INFO; }
static inline unsigned long lb_vduse_vq_setup_kickfd(void) { return VDUSE_VQ_SETUP_KICKFD; }
static inline unsigned long lb_vduse_vq_inject_irq(void) { return VDUSE_VQ_INJECT_IRQ; }

// VDUSE_CREATE_DEV on the control fd (struct vduse_dev_config with its config bytes after it). 0 or -1/errno.
int lb_vduse_create_dev(int ctl, const char *name, uint32_t vendor_id, uint32_t device_id, uint64_t features,
                        uint32_t vq_num, uint32_t vq_align, const void *config, uint32_t config_size);
// VDUSE_DEV_SET_CONFIG: replaces [offset, offset+len) of the kernel's copy of the config space. 0 or -1/errno.
int lb_vduse_set_config(int fd, uint32_t offset, const void *buf, uint32_t len);
// VDUSE_VQ_INJECT_IRQ for queue `index` (the kernel queues vring_interrupt on a workqueue). 0 or -1/errno.
int lb_vduse_inject_irq(int fd, uint32_t index);

// vdpa generic netlink: VDPA_CMD_DEV_NEW (add = 1, on management device `mgmtdev`) or VDPA_CMD_DEV_DEL (add = 0)
// of the vDPA device `name`. Blocks until the kernel answers (DEV_NEW returns once the bus probed the device:
// the caller's event loop must answer the VDUSE device's SET_STATUS requests meanwhile). Returns 0 or a negative
// errno (the kernel's, or of the socket calls). Needs CAP_NET_ADMIN (the ops are GENL_ADMIN_PERM).
int lb_vdpa_dev(const char *name, const char *mgmtdev, int add);
#endif
