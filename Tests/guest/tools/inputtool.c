// inputtool: the guest input case's helper (static, no libevdev).
//   inputtool uinput NAME GOFILE [NEXTFILE]  create a uinput keyboard + multi-touch screen named NAME (keys, LEDs,
//                                            ABS_X/Y and ABS_MT_* axes), print READY, wait for GOFILE to exist, emit
//                                            the known sequence, then print every EV_LED it receives ("LED code value")
//                                            for 120 s, or until NEXTFILE exists (then destroy the device and exit)
//   inputtool caps NODE                      print name, ids and every ABS axis range of an evdev node
//   inputtool read NODE COUNT TIMEOUT_S      print COUNT events ("type code value", SYN_REPORT included) of NODE
//   inputtool read NODE COUNT TIMEOUT_S noled   the same, not counting EV_LED events (the reader's own LED writes
//                                            come back to it) nor a SYN_REPORT that closes a group left empty
//   inputtool led NODE CODE VALUE [nosyn]    write EV_LED CODE VALUE + SYN_REPORT to NODE (the status path); with
//                                            nosyn the EV_LED alone (see cmd_led)
//   inputtool find NAME                      print the /dev/input/eventN whose EVIOCGNAME is NAME
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <linux/uinput.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { fprintf(stderr, "inputtool: %s: %s\n", what, strerror(errno)); exit(1); }

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

static void emit(int fd, int type, int code, int value) {
    struct input_event e;
    memset(&e, 0, sizeof e);
    e.type = type; e.code = code; e.value = value;
    if (write(fd, &e, sizeof e) != sizeof e) die("write event");
}

static void absaxis(int fd, int code, int min, int max, int res) {
    struct uinput_abs_setup a;
    memset(&a, 0, sizeof a);
    a.code = code; a.absinfo.minimum = min; a.absinfo.maximum = max; a.absinfo.resolution = res;
    if (ioctl(fd, UI_SET_ABSBIT, code) < 0) die("UI_SET_ABSBIT");
    if (ioctl(fd, UI_ABS_SETUP, &a) < 0) die("UI_ABS_SETUP");
}

static int cmd_uinput(const char *name, const char *go, const char *next) {
    int fd = open("/dev/uinput", O_RDWR | O_NONBLOCK);
    if (fd < 0) die("/dev/uinput");
    static const int keys[] = { KEY_ESC, KEY_1, KEY_2, KEY_A, KEY_B, KEY_ENTER, KEY_SPACE, BTN_TOUCH };
    if (ioctl(fd, UI_SET_EVBIT, EV_KEY) < 0 || ioctl(fd, UI_SET_EVBIT, EV_ABS) < 0 || ioctl(fd, UI_SET_EVBIT, EV_LED) < 0)
        die("UI_SET_EVBIT");
    for (unsigned i = 0; i < sizeof keys / sizeof keys[0]; i++) if (ioctl(fd, UI_SET_KEYBIT, keys[i]) < 0) die("UI_SET_KEYBIT");
    if (ioctl(fd, UI_SET_LEDBIT, LED_NUML) < 0 || ioctl(fd, UI_SET_LEDBIT, LED_CAPSL) < 0 || ioctl(fd, UI_SET_LEDBIT, LED_SCROLLL) < 0)
        die("UI_SET_LEDBIT");
    if (ioctl(fd, UI_SET_PROPBIT, INPUT_PROP_DIRECT) < 0) die("UI_SET_PROPBIT");
    absaxis(fd, ABS_X, 0, 1919, 10);
    absaxis(fd, ABS_Y, 0, 1079, 10);
    absaxis(fd, ABS_MT_SLOT, 0, 9, 0);
    absaxis(fd, ABS_MT_POSITION_X, 0, 1919, 10);
    absaxis(fd, ABS_MT_POSITION_Y, 0, 1079, 10);
    absaxis(fd, ABS_MT_TRACKING_ID, 0, 65535, 0);
    struct uinput_setup s;
    memset(&s, 0, sizeof s);
    s.id.bustype = BUS_VIRTUAL; s.id.vendor = 0x1234; s.id.product = 0x5678; s.id.version = 1;
    snprintf(s.name, sizeof s.name, "%s", name);
    if (ioctl(fd, UI_DEV_SETUP, &s) < 0) die("UI_DEV_SETUP");
    if (ioctl(fd, UI_DEV_CREATE) < 0) die("UI_DEV_CREATE");
    printf("READY\n"); fflush(stdout);
    long long end = now_ms() + 60000;
    while (access(go, F_OK) != 0) { if (now_ms() > end) { fprintf(stderr, "inputtool: no %s\n", go); return 1; } usleep(20000); }
    // The known sequence: a key press and release, one touch down and up.
    emit(fd, EV_KEY, KEY_A, 1); emit(fd, EV_SYN, SYN_REPORT, 0);
    emit(fd, EV_KEY, KEY_A, 0); emit(fd, EV_SYN, SYN_REPORT, 0);
    emit(fd, EV_ABS, ABS_MT_TRACKING_ID, 1); emit(fd, EV_ABS, ABS_MT_POSITION_X, 100); emit(fd, EV_ABS, ABS_MT_POSITION_Y, 200);
    emit(fd, EV_KEY, BTN_TOUCH, 1); emit(fd, EV_ABS, ABS_X, 100); emit(fd, EV_ABS, ABS_Y, 200); emit(fd, EV_SYN, SYN_REPORT, 0);
    emit(fd, EV_ABS, ABS_MT_TRACKING_ID, -1); emit(fd, EV_KEY, BTN_TOUCH, 0); emit(fd, EV_SYN, SYN_REPORT, 0);
    printf("EMITTED\n"); fflush(stdout);
    end = now_ms() + 120000;
    while (now_ms() < end && !(next && access(next, F_OK) == 0)) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (poll(&p, 1, 100) <= 0) continue;
        struct input_event e;
        while (read(fd, &e, sizeof e) == sizeof e)
            if (e.type == EV_LED) { printf("LED %d %d\n", e.code, e.value); fflush(stdout); }
    }
    ioctl(fd, UI_DEV_DESTROY);
    close(fd);
    printf("DESTROYED\n"); fflush(stdout);
    return 0;
}

static int openev(const char *node, int flags) {
    int fd = open(node, flags);
    if (fd < 0) die(node);
    return fd;
}

static int cmd_caps(const char *node) {
    int fd = openev(node, O_RDONLY);
    char name[256] = "";
    struct input_id id;
    if (ioctl(fd, EVIOCGNAME(sizeof name - 1), name) < 0) die("EVIOCGNAME");
    if (ioctl(fd, EVIOCGID, &id) < 0) die("EVIOCGID");
    printf("name %s\nid %04x %04x %04x %04x\n", name, id.bustype, id.vendor, id.product, id.version);
    unsigned char bits[(ABS_MAX + 8) / 8], props[(INPUT_PROP_MAX + 8) / 8], leds[(LED_MAX + 8) / 8];
    memset(bits, 0, sizeof bits); memset(props, 0, sizeof props); memset(leds, 0, sizeof leds);
    if (ioctl(fd, EVIOCGBIT(EV_ABS, sizeof bits), bits) < 0) die("EVIOCGBIT");
    if (ioctl(fd, EVIOCGPROP(sizeof props), props) < 0) die("EVIOCGPROP");
    if (ioctl(fd, EVIOCGBIT(EV_LED, sizeof leds), leds) < 0) die("EVIOCGBIT led");
    printf("props %02x\nleds %02x\n", props[0], leds[0]);
    for (int a = 0; a <= ABS_MAX; a++) {
        if (!(bits[a / 8] & (1 << (a % 8)))) continue;
        struct input_absinfo ai;
        if (ioctl(fd, EVIOCGABS(a), &ai) < 0) die("EVIOCGABS");
        printf("abs %d %d %d %d %d %d\n", a, ai.minimum, ai.maximum, ai.fuzz, ai.flat, ai.resolution);
    }
    return 0;
}

static int cmd_read(const char *node, int count, int timeout_s, int noled) {
    int fd = openev(node, O_RDONLY | O_NONBLOCK);
    long long end = now_ms() + timeout_s * 1000LL;
    int got = 0, open = 0;
    while (got < count && now_ms() < end) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (poll(&p, 1, 100) <= 0) continue;
        struct input_event e;
        while (got < count && read(fd, &e, sizeof e) == sizeof e) {
            int syn = e.type == EV_SYN && e.code == SYN_REPORT;
            if (noled && (e.type == EV_LED || (syn && !open))) continue;
            open = !syn;
            printf("%d %d %d\n", e.type, e.code, e.value); got++;
        }
        fflush(stdout);
    }
    return got == count ? 0 : 1;
}

// The input core hands an EV_LED to the device (virtinput_status) as soon as it is injected, and every event the
// device then sends joins the same pending packet until a SYN_REPORT: a device that answers the LED quickly gets its
// events split by this tool's own SYN_REPORT (input_inject_event takes the event lock per event, so one write() of
// both does not help). "nosyn" leaves the SYN out: the device's first SYN_REPORT then flushes the LED with it.
static int cmd_led(const char *node, int code, int value, int syn) {
    int fd = openev(node, O_WRONLY);
    emit(fd, EV_LED, code, value);
    if (syn) emit(fd, EV_SYN, SYN_REPORT, 0);
    return 0;
}

static int cmd_find(const char *want) {
    DIR *d = opendir("/dev/input");
    if (!d) die("/dev/input");
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "event", 5) != 0) continue;
        char path[300], name[256] = "";
        snprintf(path, sizeof path, "/dev/input/%s", e->d_name);
        int fd = open(path, O_RDONLY | O_NONBLOCK);
        if (fd < 0) continue;
        if (ioctl(fd, EVIOCGNAME(sizeof name - 1), name) >= 0 && strcmp(name, want) == 0) { printf("%s\n", path); return 0; }
        close(fd);
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "uinput")) return cmd_uinput(argv[2], argv[3], argc > 4 ? argv[4] : NULL);
    if (argc == 3 && !strcmp(argv[1], "caps")) return cmd_caps(argv[2]);
    if (argc == 5 && !strcmp(argv[1], "read")) return cmd_read(argv[2], atoi(argv[3]), atoi(argv[4]), 0);
    if (argc == 6 && !strcmp(argv[1], "read") && !strcmp(argv[5], "noled")) return cmd_read(argv[2], atoi(argv[3]), atoi(argv[4]), 1);
    if (argc == 5 && !strcmp(argv[1], "led")) return cmd_led(argv[2], atoi(argv[3]), atoi(argv[4]), 1);
    if (argc == 6 && !strcmp(argv[1], "led") && !strcmp(argv[5], "nosyn")) return cmd_led(argv[2], atoi(argv[3]), atoi(argv[4]), 0);
    if (argc == 3 && !strcmp(argv[1], "find")) return cmd_find(argv[2]);
    fprintf(stderr, "usage: inputtool uinput NAME GOFILE [NEXTFILE] | caps NODE | read NODE COUNT TIMEOUT_S | led NODE CODE VALUE [nosyn] | find NAME\n");
    return 2;
}
