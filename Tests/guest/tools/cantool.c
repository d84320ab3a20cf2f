// cantool: numbered CAN frames through SocketCAN for the loopbackd-can guest case.
//
//   cantool send IFACE N MODE [BURST PAUSE_US]   send frames 0..N-1 (blocking socket; ENOBUFS, a full interface
//                                               queue, is waited out and retried: never a lost frame)
//   cantool recv IFACE N MODE [TIMEOUT_S]        receive N frames and check each against frame k in order; with
//                                               READY=/path the file is created once the socket is bound
//   cantool none IFACE MS                        succeed if no frame arrives within MS milliseconds (READY too)
//
// MODE: classic (8 bytes, extended ids), fd (64 bytes), mixed (FD 64, classic extended 8, classic standard 4-8,
// every 7th an RTR frame asking for k % 9 bytes). Frame k carries k in its id and payload; the receiver names the
// first frame that differs (lost, reordered, damaged) and exits 1. Prints "sent N" / "received N".
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/can.h>
#include <linux/can/raw.h>
#include <net/if.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int open_can(const char *ifname) {
    int s = socket(PF_CAN, SOCK_RAW | SOCK_CLOEXEC, CAN_RAW);
    if (s < 0) { perror("socket"); exit(2); }
    int on = 1;
    if (setsockopt(s, SOL_CAN_RAW, CAN_RAW_FD_FRAMES, &on, sizeof on) != 0) { perror("CAN_RAW_FD_FRAMES"); exit(2); }
    int rcv = 32 << 20;   // a receiver that is scheduled late must not lose frames to its own socket queue
    if (setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv) != 0) setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
    if (ioctl(s, SIOCGIFINDEX, &ifr) != 0) { fprintf(stderr, "no interface %s: %s\n", ifname, strerror(errno)); exit(2); }
    struct sockaddr_can a;
    memset(&a, 0, sizeof a);
    a.can_family = AF_CAN;
    a.can_ifindex = ifr.ifr_ifindex;
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("bind"); exit(2); }
    return s;
}

enum mode { CLASSIC, FD, MIXED };

// Frame k of MODE into f; returns the write size (CAN_MTU or CANFD_MTU).
static int frame(enum mode m, uint32_t k, struct canfd_frame *f) {
    memset(f, 0, sizeof *f);
    int kind = m == CLASSIC ? 1 : m == FD ? 0 : (k % 7 == 6 ? 3 : (int)(k % 3));
    switch (kind) {
    case 0:   // FD, 64 bytes, extended id
        f->can_id = (k & CAN_EFF_MASK) | CAN_EFF_FLAG;
        f->len = 64;
        f->flags = 0;
        for (int i = 0; i < 64; i++) f->data[i] = (uint8_t)(k * 7 + i);
        memcpy(f->data, &k, 4);
        return CANFD_MTU;
    case 1:   // classic, 8 bytes, extended id
        f->can_id = (k & CAN_EFF_MASK) | CAN_EFF_FLAG;
        f->len = 8;
        memcpy(f->data, &k, 4);
        for (int i = 4; i < 8; i++) f->data[i] = (uint8_t)~(k >> (8 * (i - 4)));
        return CAN_MTU;
    case 2:   // classic, standard id, 4-8 bytes
        f->can_id = k & CAN_SFF_MASK;
        f->len = 4 + k % 5;
        memcpy(f->data, &k, 4);
        for (int i = 4; i < f->len; i++) f->data[i] = (uint8_t)(0xa0 + i);
        return CAN_MTU;
    default:  // RTR, standard id, asks for k % 9 bytes
        f->can_id = (k & CAN_SFF_MASK) | CAN_RTR_FLAG;
        f->len = k % 9;
        return CAN_MTU;
    }
}

static enum mode parse_mode(const char *s) {
    if (!strcmp(s, "classic")) return CLASSIC;
    if (!strcmp(s, "fd")) return FD;
    if (!strcmp(s, "mixed")) return MIXED;
    fprintf(stderr, "unknown mode %s\n", s);
    exit(2);
}

static void describe(const char *what, const struct canfd_frame *f, int n) {
    fprintf(stderr, "  %s: size %d id 0x%08x len %u data", what, n, f->can_id, f->len);
    for (int i = 0; i < f->len && i < 16; i++) fprintf(stderr, " %02x", f->data[i]);
    fprintf(stderr, "\n");
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: cantool send|recv|none IFACE ...\n"); return 2; }
    int s = open_can(argv[2]);
    if (!strcmp(argv[1], "none")) {
        const char *ready = getenv("READY");
        if (ready) { int fd = open(ready, O_CREAT | O_WRONLY | O_CLOEXEC, 0644); if (fd >= 0) close(fd); }
        // Until the deadline; socket errors (ENETDOWN: bound while the interface was down) are not frames.
        struct timespec t0, t;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int ms = atoi(argv[3]);
        for (;;) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            long left = ms - ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000);
            if (left <= 0) break;
            struct pollfd p = { .fd = s, .events = POLLIN };
            if (poll(&p, 1, (int)left) <= 0) continue;
            struct canfd_frame f;
            int n = (int)recv(s, &f, sizeof f, MSG_DONTWAIT);
            if (n < 0) continue;
            fprintf(stderr, "a frame arrived:\n");
            describe("got", &f, n);
            return 1;
        }
        printf("none\n");
        return 0;
    }
    if (argc < 5) { fprintf(stderr, "usage: cantool send|recv IFACE N MODE\n"); return 2; }
    uint32_t total = (uint32_t)strtoul(argv[3], 0, 0);
    enum mode m = parse_mode(argv[4]);
    struct canfd_frame f, want;
    if (!strcmp(argv[1], "send")) {
        unsigned burst = argc > 5 ? (unsigned)atoi(argv[5]) : 0, pause_us = argc > 6 ? (unsigned)atoi(argv[6]) : 0;
        unsigned long retries = 0;
        for (uint32_t k = 0; k < total; k++) {
            int n = frame(m, k, &f);
            for (;;) {
                ssize_t w = write(s, &f, n);
                if (w == n) break;
                if (w < 0 && (errno == ENOBUFS || errno == EAGAIN || errno == EINTR)) { retries++; usleep(200); continue; }
                fprintf(stderr, "send frame %u: %s\n", k, w < 0 ? strerror(errno) : "short write");
                return 1;
            }
            if (burst && (k + 1) % burst == 0 && pause_us) usleep(pause_us);
        }
        printf("sent %u (%lu retries on a full queue)\n", total, retries);
        return 0;
    }
    if (!strcmp(argv[1], "recv")) {
        int timeout = argc > 5 ? atoi(argv[5]) : 30;
        struct timeval tv = { .tv_sec = timeout, .tv_usec = 0 };
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        const char *ready = getenv("READY");
        if (ready) { int fd = open(ready, O_CREAT | O_WRONLY | O_CLOEXEC, 0644); if (fd >= 0) close(fd); }
        for (uint32_t k = 0; k < total; k++) {
            int n = (int)read(s, &f, sizeof f);
            if (n < 0) { fprintf(stderr, "received %u of %u, then: %s\n", k, total, strerror(errno)); return 1; }
            int wn = frame(m, k, &want);
            // RTR frames carry no data; compare what is defined: size, id with flags, len, the payload
            if (n != wn || f.can_id != want.can_id || f.len != want.len ||
                (!(want.can_id & CAN_RTR_FLAG) && memcmp(f.data, want.data, want.len) != 0)) {
                fprintf(stderr, "frame %u of %u differs:\n", k, total);
                describe("got ", &f, n);
                describe("want", &want, wn);
                return 1;
            }
        }
        printf("received %u\n", total);
        return 0;
    }
    fprintf(stderr, "unknown command %s\n", argv[1]);
    return 2;
}
