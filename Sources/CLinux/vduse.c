// VDUSE helpers (flexible-array structs Swift cannot build) and the vdpa generic-netlink request.
#include "lbvduse.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/netlink.h>
#include <linux/genetlink.h>
#include <linux/vdpa.h>

int lb_vduse_create_dev(int ctl, const char *name, uint32_t vendor_id, uint32_t device_id, uint64_t features,
                        uint32_t vq_num, uint32_t vq_align, const void *config, uint32_t config_size)
{
	if (config_size > 4096 || strlen(name) >= VDUSE_NAME_MAX) { errno = EINVAL; return -1; }
	struct vduse_dev_config *c = calloc(1, sizeof(*c) + config_size);   // reserved[] must be zero
	if (!c) { errno = ENOMEM; return -1; }
	strcpy(c->name, name);
	c->vendor_id = vendor_id;
	c->device_id = device_id;
	c->features = features;
	c->vq_num = vq_num;
	c->vq_align = vq_align;
	c->config_size = config_size;
	if (config_size) memcpy(c->config, config, config_size);
	int r = ioctl(ctl, VDUSE_CREATE_DEV, c);
	int e = errno;
	free(c);
	errno = e;
	return r;
}

int lb_vduse_set_config(int fd, uint32_t offset, const void *buf, uint32_t len)
{
	if (len == 0 || len > 4096) { errno = EINVAL; return -1; }
	struct vduse_config_data *d = calloc(1, sizeof(*d) + len);
	if (!d) { errno = ENOMEM; return -1; }
	d->offset = offset;
	d->length = len;
	memcpy(d->buffer, buf, len);
	int r = ioctl(fd, VDUSE_DEV_SET_CONFIG, d);
	int e = errno;
	free(d);
	errno = e;
	return r;
}

int lb_vduse_inject_irq(int fd, uint32_t index) { return ioctl(fd, VDUSE_VQ_INJECT_IRQ, &index); }

// ---- generic netlink (linux/genetlink.h): resolve the "vdpa" family, then one request with an ack.

struct nlbuf { char b[1024]; size_t n; };

static void nl_attr(struct nlbuf *m, uint16_t type, const void *data, size_t len)
{
	struct nlattr *a = (struct nlattr *)(m->b + m->n);
	a->nla_type = type;
	a->nla_len = (uint16_t)(NLA_HDRLEN + len);
	memcpy((char *)a + NLA_HDRLEN, data, len);
	m->n += NLA_ALIGN(a->nla_len);
}

static void nl_start(struct nlbuf *m, uint16_t family, uint8_t cmd, uint8_t version, uint32_t seq)
{
	memset(m, 0, sizeof(*m));
	struct nlmsghdr *h = (struct nlmsghdr *)m->b;
	h->nlmsg_type = family;
	h->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
	h->nlmsg_seq = seq;
	struct genlmsghdr *g = (struct genlmsghdr *)(m->b + NLMSG_HDRLEN);
	g->cmd = cmd;
	g->version = version;
	m->n = NLMSG_HDRLEN + GENL_HDRLEN;
}

// Sends m and reads until the ack of seq. Returns 0 / -errno; *family (if non-null) gets CTRL_ATTR_FAMILY_ID
// from a CTRL_CMD_NEWFAMILY answer.
static int nl_transact(int s, struct nlbuf *m, uint32_t seq, uint16_t *family)
{
	((struct nlmsghdr *)m->b)->nlmsg_len = (uint32_t)m->n;
	struct sockaddr_nl to = { .nl_family = AF_NETLINK };
	if (sendto(s, m->b, m->n, 0, (struct sockaddr *)&to, sizeof(to)) < 0) return -errno;
	char rb[8192];
	for (;;) {
		ssize_t r = recv(s, rb, sizeof(rb), 0);
		if (r < 0) { if (errno == EINTR) continue; return -errno; }
		size_t left = (size_t)r;
		for (struct nlmsghdr *h = (struct nlmsghdr *)rb; NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
			if (h->nlmsg_seq != seq) continue;
			if (h->nlmsg_type == NLMSG_ERROR) {
				if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct nlmsgerr))) return -EPROTO;
				return ((struct nlmsgerr *)NLMSG_DATA(h))->error;   // 0 is the ack
			}
			if (family && h->nlmsg_len >= NLMSG_LENGTH(GENL_HDRLEN)) {
				size_t alen = h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN);
				struct nlattr *a = (struct nlattr *)((char *)NLMSG_DATA(h) + GENL_HDRLEN);
				while (alen >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= alen) {
					if ((a->nla_type & NLA_TYPE_MASK) == CTRL_ATTR_FAMILY_ID && a->nla_len >= NLA_HDRLEN + 2)
						memcpy(family, (char *)a + NLA_HDRLEN, 2);
					size_t step = NLA_ALIGN(a->nla_len);
					if (step >= alen) break;
					alen -= step;
					a = (struct nlattr *)((char *)a + step);
				}
			}
		}
	}
}

int lb_vdpa_dev(const char *name, const char *mgmtdev, int add)
{
	if (strlen(name) > 255 || (mgmtdev && strlen(mgmtdev) > 255)) return -EINVAL;
	int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
	if (s < 0) return -errno;
	struct sockaddr_nl me = { .nl_family = AF_NETLINK };
	int r;
	if (bind(s, (struct sockaddr *)&me, sizeof(me)) < 0) { r = -errno; close(s); return r; }
	struct nlbuf m;
	uint16_t family = 0;
	nl_start(&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, 1);
	nl_attr(&m, CTRL_ATTR_FAMILY_NAME, VDPA_GENL_NAME, sizeof(VDPA_GENL_NAME));
	r = nl_transact(s, &m, 1, &family);
	if (r == 0 && family == 0) r = -ENOENT;
	if (r == 0) {
		nl_start(&m, family, add ? VDPA_CMD_DEV_NEW : VDPA_CMD_DEV_DEL, VDPA_GENL_VERSION, 2);
		nl_attr(&m, VDPA_ATTR_DEV_NAME, name, strlen(name) + 1);
		if (add && mgmtdev) nl_attr(&m, VDPA_ATTR_MGMTDEV_DEV_NAME, mgmtdev, strlen(mgmtdev) + 1);
		r = nl_transact(s, &m, 2, NULL);
	}
	close(s);
	return r;
}
