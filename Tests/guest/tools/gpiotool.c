// gpiotool: the guest's GPIO user through the kernel's v1 GPIO character-device ABI (Debian's 6.1 and 6.12
// kernels; what libgpiod 1.6 speaks), static, for the gpio guest case.
//   gpiotool info CHIP                     label, line count, then "N name flags" per line (flags: used, out)
//   gpiotool loop CHIP OUT IN N            OUT an output, IN an input with both-edge events: N times set OUT to
//                                          the other level, wait (5 s) for IN's edge of that direction, read IN
//   gpiotool toggle CHIP OUT IN N          OUT an output, IN a plain input (no interrupts: requestq only): N times
//                                          set OUT to the other level and read IN back
//   gpiotool wait CHIP LINE RISING|FALLING MS   one edge within MS (exit 0), else exit 1
//   gpiotool hold CHIP LINE VALUE MS       LINE an output at VALUE for MS (then released)
// Exit 0 and "ok ..." on success, non-zero with a message otherwise.
#include <errno.h>
#include <fcntl.h>
#include <linux/gpio.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int die(const char *what) { fprintf(stderr, "gpiotool: %s: %s\n", what, strerror(errno)); return 2; }

static int info(int fd) {
    struct gpiochip_info ci;
    memset(&ci, 0, sizeof ci);
    if (ioctl(fd, GPIO_GET_CHIPINFO_IOCTL, &ci) < 0) return die("GPIO_GET_CHIPINFO_IOCTL");
    printf("chip %s label %s lines %u\n", ci.name, ci.label, ci.lines);
    for (unsigned i = 0; i < ci.lines; i++) {
        struct gpioline_info li;
        memset(&li, 0, sizeof li);
        li.line_offset = i;
        if (ioctl(fd, GPIO_GET_LINEINFO_IOCTL, &li) < 0) return die("GPIO_GET_LINEINFO_IOCTL");
        printf("%u %s%s%s\n", i, li.name[0] ? li.name : "-", li.flags & GPIOLINE_FLAG_KERNEL ? " used" : "",
               li.flags & GPIOLINE_FLAG_IS_OUT ? " out" : "");
    }
    return 0;
}

static int edge(int efd, int ms, int *rising) {
    struct pollfd p = { .fd = efd, .events = POLLIN };
    int r = poll(&p, 1, ms);
    if (r <= 0) return -1;
    struct gpioevent_data ev;
    if (read(efd, &ev, sizeof ev) != sizeof ev) return -1;
    *rising = ev.id == GPIOEVENT_EVENT_RISING_EDGE;
    return 0;
}

static int event_request(int fd, unsigned line) {
    struct gpioevent_request er;
    memset(&er, 0, sizeof er);
    er.lineoffset = line;
    er.handleflags = GPIOHANDLE_REQUEST_INPUT;
    er.eventflags = GPIOEVENT_REQUEST_BOTH_EDGES;
    strcpy(er.consumer_label, "gpiotool");
    if (ioctl(fd, GPIO_GET_LINEEVENT_IOCTL, &er) < 0) return -1;
    return er.fd;
}

static int loop(int fd, unsigned out, unsigned in, int n) {
    struct gpiohandle_request hr;
    memset(&hr, 0, sizeof hr);
    hr.lineoffsets[0] = out;
    hr.lines = 1;
    hr.flags = GPIOHANDLE_REQUEST_OUTPUT;
    hr.default_values[0] = 0;
    strcpy(hr.consumer_label, "gpiotool");
    if (ioctl(fd, GPIO_GET_LINEHANDLE_IOCTL, &hr) < 0) return die("GPIO_GET_LINEHANDLE_IOCTL (output)");
    int efd = event_request(fd, in);
    if (efd < 0) return die("GPIO_GET_LINEEVENT_IOCTL (both edges)");
    // Drain anything the requests themselves caused (the output going to 0).
    int r;
    while (edge(efd, 200, &r) == 0) {}
    int level = 0;
    for (int k = 0; k < n; k++) {
        level = !level;
        struct gpiohandle_data d = { .values = { (unsigned char)level } };
        if (ioctl(hr.fd, GPIOHANDLE_SET_LINE_VALUES_IOCTL, &d) < 0) return die("GPIOHANDLE_SET_LINE_VALUES_IOCTL");
        int rising;
        if (edge(efd, 5000, &rising) < 0) { fprintf(stderr, "gpiotool: no edge %d on line %u\n", k, in); return 1; }
        if (rising != level) { fprintf(stderr, "gpiotool: edge %d: %s, want %s\n", k, rising ? "rising" : "falling", level ? "rising" : "falling"); return 1; }
        struct gpiohandle_data v;
        memset(&v, 0, sizeof v);
        if (ioctl(efd, GPIOHANDLE_GET_LINE_VALUES_IOCTL, &v) < 0) return die("GPIOHANDLE_GET_LINE_VALUES_IOCTL");
        if (v.values[0] != level) { fprintf(stderr, "gpiotool: read %d after setting %d\n", v.values[0], level); return 1; }
    }
    printf("ok %d edges\n", n);
    return 0;
}

static int handle(int fd, unsigned line, unsigned flags, const char *what) {
    struct gpiohandle_request hr;
    memset(&hr, 0, sizeof hr);
    hr.lineoffsets[0] = line;
    hr.lines = 1;
    hr.flags = flags;
    strcpy(hr.consumer_label, "gpiotool");
    if (ioctl(fd, GPIO_GET_LINEHANDLE_IOCTL, &hr) < 0) return die(what), -1;
    return hr.fd;
}

static int toggle(int fd, unsigned out, unsigned in, int n) {
    int ofd = handle(fd, out, GPIOHANDLE_REQUEST_OUTPUT, "GPIO_GET_LINEHANDLE_IOCTL (output)");
    if (ofd < 0) return 2;
    int ifd = handle(fd, in, GPIOHANDLE_REQUEST_INPUT, "GPIO_GET_LINEHANDLE_IOCTL (input)");
    if (ifd < 0) return 2;
    int level = 0;
    for (int k = 0; k < n; k++) {
        level = !level;
        struct gpiohandle_data d = { .values = { (unsigned char)level } };
        if (ioctl(ofd, GPIOHANDLE_SET_LINE_VALUES_IOCTL, &d) < 0) return die("GPIOHANDLE_SET_LINE_VALUES_IOCTL");
        struct gpiohandle_data v;
        memset(&v, 0, sizeof v);
        if (ioctl(ifd, GPIOHANDLE_GET_LINE_VALUES_IOCTL, &v) < 0) return die("GPIOHANDLE_GET_LINE_VALUES_IOCTL");
        if (v.values[0] != level) { fprintf(stderr, "gpiotool: read %d after setting %d (round %d)\n", v.values[0], level, k); return 1; }
    }
    printf("ok %d toggles\n", n);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: gpiotool info|loop|toggle|wait|hold CHIP ...\n"); return 2; }
    int fd = open(argv[2], O_RDWR | O_CLOEXEC);
    if (fd < 0) return die(argv[2]);
    if (!strcmp(argv[1], "info")) return info(fd);
    if (!strcmp(argv[1], "loop") && argc == 6) return loop(fd, atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    if (!strcmp(argv[1], "toggle") && argc == 6) return toggle(fd, atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    if (!strcmp(argv[1], "wait") && argc == 6) {
        int efd = event_request(fd, atoi(argv[3]));
        if (efd < 0) return die("GPIO_GET_LINEEVENT_IOCTL");
        int rising;
        if (edge(efd, atoi(argv[5]), &rising) < 0) return 1;
        int want = !strcmp(argv[4], "RISING");
        printf("ok %s\n", rising ? "rising" : "falling");
        return rising == want ? 0 : 1;
    }
    if (!strcmp(argv[1], "hold") && argc == 6) {
        struct gpiohandle_request hr;
        memset(&hr, 0, sizeof hr);
        hr.lineoffsets[0] = atoi(argv[3]);
        hr.lines = 1;
        hr.flags = GPIOHANDLE_REQUEST_OUTPUT;
        hr.default_values[0] = atoi(argv[4]) ? 1 : 0;
        strcpy(hr.consumer_label, "gpiotool");
        if (ioctl(fd, GPIO_GET_LINEHANDLE_IOCTL, &hr) < 0) return die("GPIO_GET_LINEHANDLE_IOCTL (output)");
        printf("ok holding\n");
        fflush(stdout);
        usleep(atoi(argv[5]) * 1000);
        return 0;
    }
    fprintf(stderr, "gpiotool: bad arguments\n");
    return 2;
}
