#include "clinux.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>

int lb_eventfd(unsigned int initval, int nonblock) {
    return eventfd(initval, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0));
}
int lb_memfd(const char *name, int allow_sealing) {
    return memfd_create(name, MFD_CLOEXEC | (allow_sealing ? MFD_ALLOW_SEALING : 0));
}
ssize_t lb_getrandom(void *buf, size_t len) { return getrandom(buf, len, 0); }
int lb_gettid(void) { return (int)syscall(SYS_gettid); }

int lb_ioctl_ptr(int fd, unsigned long req, void *arg) { return ioctl(fd, req, arg); }
int lb_ioctl_val(int fd, unsigned long req, unsigned long arg) { return ioctl(fd, req, arg); }

int lb_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }
int lb_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = { .events = events, .data.u64 = data };
    return epoll_ctl(epfd, op, fd, &ev);
}
int lb_epoll_wait(int epfd, struct lb_epoll_event *out, int max, int timeout_ms) {
    struct epoll_event evs[64];
    if (max > 64) max = 64;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    for (int i = 0; i < n; i++) { out[i].events = evs[i].events; out[i].data = evs[i].data.u64; }
    return n;
}

int lb_signalfd_stop_signals(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) return -1;
    signal(SIGPIPE, SIG_IGN);   // a peer closing a socket must give EPIPE, not kill the daemon
    return signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
}
int lb_read_signalfd(int fd) {
    struct signalfd_siginfo si;
    ssize_t n = read(fd, &si, sizeof si);
    if (n != (ssize_t)sizeof si) return -1;
    return (int)si.ssi_signo;
}

ssize_t lb_sendmsg_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    union { char buf[CMSG_SPACE(sizeof(int) * 8)]; struct cmsghdr align; } u;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > 8) { errno = EINVAL; return -1; }
    if (nfds > 0) {
        memset(&u, 0, sizeof u);
        msg.msg_control = u.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t r;
    do { r = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (r < 0 && errno == EINTR);
    return r;
}

ssize_t lb_recvmsg_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated) {
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    union { char buf[CMSG_SPACE(sizeof(int) * 16)]; struct cmsghdr align; } u;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf };
    *nfds = 0; *truncated = 0;
    ssize_t r;
    do { r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (r < 0 && errno == EINTR);
    if (r < 0) return r;
    if (msg.msg_flags & MSG_CTRUNC) *truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *p = (int *)CMSG_DATA(c);
        for (int i = 0; i < n; i++) {
            if (*nfds < maxfds) fds[(*nfds)++] = p[i];
            else { close(p[i]); *truncated = 1; }   // never leak an fd the peer sent
        }
    }
    return r;
}

uint64_t lb_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int saved_argc;
static char **saved_argv;
__attribute__((constructor)) static void lb_save_args(int argc, char **argv) { saved_argc = argc; saved_argv = argv; }
int lb_argc(void) { return saved_argc; }
char **lb_argv(void) { return saved_argv; }

int lb_blkdev_size(int fd, uint64_t *bytes, uint32_t *logical_block) {
    int bs = 512;
    if (ioctl(fd, BLKGETSIZE64, bytes) != 0) return -1;
    if (ioctl(fd, BLKSSZGET, &bs) != 0) bs = 512;
    *logical_block = (uint32_t)bs;
    return 0;
}
int lb_fdatasync(int fd) { return fdatasync(fd); }
int lb_punch_hole(int fd, uint64_t off, uint64_t len) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
}
int lb_zero_range(int fd, uint64_t off, uint64_t len) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
}
int lb_blk_discard(int fd, uint64_t off, uint64_t len) { uint64_t r[2] = { off, len }; return ioctl(fd, BLKDISCARD, r); }
int lb_blk_zeroout(int fd, uint64_t off, uint64_t len) { uint64_t r[2] = { off, len }; return ioctl(fd, BLKZEROOUT, r); }
