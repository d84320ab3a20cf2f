// A GPIO chip through libgpiod 1.6 (Debian 12's libgpiod-dev: the kernel's v1 GPIO character-device ABI) behind an
// opaque handle, linked statically. Line requests are kept per line: one at a time (released and requested again
// when the driver changes a line's direction or interrupt type). All functions return -errno on failure.
#ifndef CGPIOD_H
#define CGPIOD_H

struct lb_gpio;

// Opens a chip by path (/dev/gpiochipN), name (gpiochipN), label or number (gpiod_chip_open_lookup).
int lb_gpio_open(const char *descr, struct lb_gpio **out);
void lb_gpio_close(struct lb_gpio *g);
int lb_gpio_num_lines(struct lb_gpio *g);
// Copies the chip's label (NUL-terminated, truncated to len); returns its length.
int lb_gpio_label(struct lb_gpio *g, char *buf, int len);
// Copies line `off`'s name into buf (NUL-terminated, truncated); returns its length (0: unnamed).
int lb_gpio_line_name(struct lb_gpio *g, unsigned off, char *buf, int len);
// The line's current direction on the host: 1 input, 2 output.
int lb_gpio_line_direction(struct lb_gpio *g, unsigned off);

enum {
    LB_GPIO_RELEASE = 0,
    LB_GPIO_INPUT = 1,
    LB_GPIO_OUTPUT = 2,
    LB_GPIO_EDGE_RISING = 3,
    LB_GPIO_EDGE_FALLING = 4,
    LB_GPIO_EDGE_BOTH = 5,
};
// Releases line `off` and requests it again in `mode` (output: driving `value`). For the edge modes the line is
// an input with edge detection: *event_fd gets its event fd (non-blocking, owned by the request), else -1.
int lb_gpio_request(struct lb_gpio *g, unsigned off, int mode, int value, const char *consumer, int *event_fd);
// The line's value (0/1). A line not requested is read through a short as-is request (its direction unchanged).
int lb_gpio_get(struct lb_gpio *g, unsigned off);
int lb_gpio_set(struct lb_gpio *g, unsigned off, int value);
// Reads pending edge events of an edge-requested line without blocking: types[i] is 1 (rising) or 2 (falling).
// Returns the count (0: none pending).
int lb_gpio_read_events(struct lb_gpio *g, unsigned off, int *types, int max);
#endif
