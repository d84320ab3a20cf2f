// vsocktool: both ends of the vsock guest case (static, for the initramfs). The driver side speaks AF_VSOCK through
// the kernel's vmw_vsock_virtio_transport; the host side is loopbackd's hybrid vsock (unix sockets).
//   vsocktool serve-unix PATH CONNS        accept CONNS connections on unix PATH (forks), run the exchange on each
//   vsocktool connect CID PORT BYTES CONNS  CONNS AF_VSOCK connections to CID:PORT at once, the exchange on each
//   vsocktool refused CID PORT              connect must fail with ECONNRESET/ECONNREFUSED within 3 s
//   vsocktool listen PORT BYTES             accept one AF_VSOCK connection on PORT, the exchange
//   vsocktool connect-unix PATH PORT BYTES  hybrid vsock from the host: CONNECT PORT, expect OK, the exchange
// The exchange: the connecting side sends an 8-byte size, then both sides send BYTES bytes of their own pattern
// and check every byte of the other's at the same time (poll), shut down their sending side and wait for EOF.
// Prints "ok BYTES" per connection; exit 1 on any mismatch or error.
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <linux/vm_sockets.h>
#include <unistd.h>

static uint8_t pat(uint64_t i, unsigned seed) { uint64_t x = (i >> 3) * 0x9E3779B97F4A7C15ull + seed; return (uint8_t)(x >> (8 * (i & 7))); }
static void die(const char *m) { perror(m); exit(1); }

static int exchange(int fd, uint64_t n, unsigned out_seed, unsigned in_seed) {
    static uint8_t buf[65536];
    uint64_t sent = 0, got = 0;
    int wdone = 0, eof = 0;
    while (!eof || !wdone) {
        struct pollfd p = { fd, (eof ? 0 : POLLIN) | (wdone ? 0 : POLLOUT), 0 };
        if (poll(&p, 1, 30000) <= 0) { fprintf(stderr, "timeout: sent %llu got %llu\n", (unsigned long long)sent, (unsigned long long)got); return 1; }
        if (!wdone && (p.revents & POLLOUT)) {
            size_t k = n - sent < sizeof buf ? (size_t)(n - sent) : sizeof buf;
            for (size_t i = 0; i < k; i++) buf[i] = pat(sent + i, out_seed);
            ssize_t w = send(fd, buf, k, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN) die("send");
            if (w > 0) sent += (uint64_t)w;
            if (sent == n) { shutdown(fd, SHUT_WR); wdone = 1; }
        }
        if (!eof && (p.revents & (POLLIN | POLLHUP))) {
            static uint8_t r[65536];
            ssize_t k = recv(fd, r, sizeof r, MSG_DONTWAIT);
            if (k < 0 && errno != EAGAIN) die("recv");
            if (k == 0) eof = 1;
            for (ssize_t i = 0; i < k; i++, got++)
                if (got >= n || r[i] != pat(got, in_seed)) { fprintf(stderr, "mismatch at byte %llu\n", (unsigned long long)got); return 1; }
        }
    }
    if (got != n || !wdone) { fprintf(stderr, "short: sent %llu got %llu of %llu\n", (unsigned long long)sent, (unsigned long long)got, (unsigned long long)n); return 1; }
    printf("ok %llu\n", (unsigned long long)n);
    return 0;
}

static int unix_listen(const char *path) {
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    unlink(path);
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 128)) die("unix listen");
    return l;
}
static int wait_all(int n) { int bad = 0, st; for (int i = 0; i < n; i++) { if (wait(&st) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) bad = 1; } return bad; }
static int read_size(int fd, uint64_t *n) { size_t g = 0; while (g < 8) { ssize_t k = recv(fd, (char *)n + g, 8 - g, 0); if (k <= 0) return -1; g += (size_t)k; } return 0; }

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 4 && !strcmp(argv[1], "serve-unix")) {
        int l = unix_listen(argv[2]), conns = atoi(argv[3]);
        for (int i = 0; i < conns; i++) {
            int c = accept(l, NULL, NULL);
            if (c < 0) die("accept");
            if (fork() == 0) { uint64_t n; if (read_size(c, &n)) die("size"); exit(exchange(c, n, 2, 1)); }
            close(c);
        }
        return wait_all(conns);
    }
    if (argc == 6 && !strcmp(argv[1], "connect")) {
        int conns = atoi(argv[5]);
        uint64_t n = strtoull(argv[4], NULL, 0);
        for (int i = 0; i < conns; i++) if (fork() == 0) {
            struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = (unsigned)atoi(argv[2]), .svm_port = (unsigned)atoi(argv[3]) };
            int s = socket(AF_VSOCK, SOCK_STREAM, 0);
            if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) die("vsock connect");
            if (send(s, &n, 8, 0) != 8) die("send size");
            exit(exchange(s, n, 1, 2));
        }
        return wait_all(conns);
    }
    if (argc == 4 && !strcmp(argv[1], "refused")) {
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = (unsigned)atoi(argv[2]), .svm_port = (unsigned)atoi(argv[3]) };
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct timeval tv = { 3, 0 };
        setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) { fprintf(stderr, "connected to a closed port\n"); return 1; }
        if (errno != ECONNRESET && errno != ECONNREFUSED) die("connect to a closed port: wrong error");
        printf("refused: %s\n", strerror(errno));
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "listen")) {
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = (unsigned)atoi(argv[2]) };
        int l = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4)) die("vsock listen");
        printf("listening\n");
        int c = accept(l, NULL, NULL);
        if (c < 0) die("vsock accept");
        uint64_t n; if (read_size(c, &n)) die("size");
        return exchange(c, n, 2, 1);
    }
    if (argc == 5 && !strcmp(argv[1], "connect-unix")) {
        struct sockaddr_un a = { .sun_family = AF_UNIX };
        strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1);
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) die("unix connect");
        char line[64];
        int k = snprintf(line, sizeof line, "CONNECT %s\n", argv[3]);
        if (send(s, line, (size_t)k, 0) != k) die("send CONNECT");
        size_t g = 0;   // the OK line, byte by byte (what follows it is data)
        while (g < sizeof line - 1) { if (recv(s, line + g, 1, 0) != 1) die("no OK line"); if (line[g++] == '\n') break; }
        line[g] = 0;
        if (strncmp(line, "OK ", 3)) { fprintf(stderr, "expected OK, got '%s'\n", line); return 1; }
        uint64_t n = strtoull(argv[4], NULL, 0);
        if (send(s, &n, 8, 0) != 8) die("send size");
        return exchange(s, n, 1, 2);
    }
    fprintf(stderr, "usage: see the comment at the top of vsocktool.c\n");
    return 2;
}
