#include "cgpiod.h"
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <gpiod.h>

struct lb_gpio {
    struct gpiod_chip *chip;
};

static int neg_errno(void) { return errno > 0 ? -errno : -EIO; }

int lb_gpio_open(const char *descr, struct lb_gpio **out) {
    struct lb_gpio *g = calloc(1, sizeof *g);
    if (!g) return -ENOMEM;
    errno = 0;
    g->chip = gpiod_chip_open_lookup(descr);
    if (!g->chip) { int e = errno ? -errno : -ENOENT; free(g); return e; }
    *out = g;
    return 0;
}

void lb_gpio_close(struct lb_gpio *g) {
    if (!g) return;
    gpiod_chip_close(g->chip);   // releases every line still requested
    free(g);
}

int lb_gpio_num_lines(struct lb_gpio *g) { return (int)gpiod_chip_num_lines(g->chip); }

static int copy_str(const char *s, char *buf, int len) {
    if (len <= 0) return 0;
    if (!s) { buf[0] = 0; return 0; }
    int n = (int)strlen(s);
    if (n > len - 1) n = len - 1;
    memcpy(buf, s, (size_t)n);
    buf[n] = 0;
    return n;
}

int lb_gpio_label(struct lb_gpio *g, char *buf, int len) { return copy_str(gpiod_chip_label(g->chip), buf, len); }

static struct gpiod_line *line_at(struct lb_gpio *g, unsigned off) {
    if (off >= gpiod_chip_num_lines(g->chip)) { errno = EINVAL; return NULL; }
    return gpiod_chip_get_line(g->chip, off);
}

int lb_gpio_line_name(struct lb_gpio *g, unsigned off, char *buf, int len) {
    struct gpiod_line *l = line_at(g, off);
    if (!l) return neg_errno();
    return copy_str(gpiod_line_name(l), buf, len);
}

int lb_gpio_line_direction(struct lb_gpio *g, unsigned off) {
    struct gpiod_line *l = line_at(g, off);
    if (!l) return neg_errno();
    if (!gpiod_line_is_requested(l) && gpiod_line_update(l) < 0) return neg_errno();
    return gpiod_line_direction(l) == GPIOD_LINE_DIRECTION_OUTPUT ? 2 : 1;
}

int lb_gpio_request(struct lb_gpio *g, unsigned off, int mode, int value, const char *consumer, int *event_fd) {
    if (event_fd) *event_fd = -1;
    struct gpiod_line *l = line_at(g, off);
    if (!l) return neg_errno();
    if (gpiod_line_is_requested(l)) gpiod_line_release(l);
    if (mode == LB_GPIO_RELEASE) return 0;
    struct gpiod_line_request_config c = { .consumer = consumer, .request_type = 0, .flags = 0 };
    switch (mode) {
    case LB_GPIO_INPUT: c.request_type = GPIOD_LINE_REQUEST_DIRECTION_INPUT; break;
    case LB_GPIO_OUTPUT: c.request_type = GPIOD_LINE_REQUEST_DIRECTION_OUTPUT; break;
    case LB_GPIO_EDGE_RISING: c.request_type = GPIOD_LINE_REQUEST_EVENT_RISING_EDGE; break;
    case LB_GPIO_EDGE_FALLING: c.request_type = GPIOD_LINE_REQUEST_EVENT_FALLING_EDGE; break;
    case LB_GPIO_EDGE_BOTH: c.request_type = GPIOD_LINE_REQUEST_EVENT_BOTH_EDGES; break;
    default: return -EINVAL;
    }
    errno = 0;
    if (gpiod_line_request(l, &c, value ? 1 : 0) < 0) return neg_errno();
    if (mode >= LB_GPIO_EDGE_RISING) {
        int fd = gpiod_line_event_get_fd(l);
        if (fd < 0) { int e = neg_errno(); gpiod_line_release(l); return e; }
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) { int e = neg_errno(); gpiod_line_release(l); return e; }
        if (event_fd) *event_fd = fd;
    }
    return 0;
}

int lb_gpio_get(struct lb_gpio *g, unsigned off) {
    struct gpiod_line *l = line_at(g, off);
    if (!l) return neg_errno();
    if (gpiod_line_is_requested(l)) {
        int v = gpiod_line_get_value(l);
        return v < 0 ? neg_errno() : v;
    }
    struct gpiod_line_request_config c = { .consumer = "loopbackd", .request_type = GPIOD_LINE_REQUEST_DIRECTION_AS_IS, .flags = 0 };
    if (gpiod_line_request(l, &c, 0) < 0) return neg_errno();
    int v = gpiod_line_get_value(l);
    int e = v < 0 ? neg_errno() : v;
    gpiod_line_release(l);
    return e;
}

int lb_gpio_set(struct lb_gpio *g, unsigned off, int value) {
    struct gpiod_line *l = line_at(g, off);
    if (!l) return neg_errno();
    return gpiod_line_set_value(l, value ? 1 : 0) < 0 ? neg_errno() : 0;
}

int lb_gpio_read_events(struct lb_gpio *g, unsigned off, int *types, int max) {
    struct gpiod_line *l = line_at(g, off);
    if (!l) return neg_errno();
    struct gpiod_line_event ev[16];
    if (max > 16) max = 16;
    if (max <= 0) return 0;
    int n = gpiod_line_event_read_multiple(l, ev, (unsigned)max);
    if (n < 0) return errno == EAGAIN ? 0 : neg_errno();
    for (int i = 0; i < n; i++) types[i] = ev[i].event_type == GPIOD_LINE_EVENT_RISING_EDGE ? 1 : 2;
    return n;
}
