// Tiny wrappers for Linux calls that Swift's Glibc module does not import
// (GNU extensions, variadic functions, packed structs, CMSG macros).
#ifndef CLINUX_H
#define CLINUX_H
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

// eventfd(2), memfd_create(2), getrandom(2); always CLOEXEC.
int lb_eventfd(unsigned int initval, int nonblock);
int lb_memfd(const char *name, int allow_sealing);
ssize_t lb_getrandom(void *buf, size_t len);
int lb_gettid(void);

// ioctl(2) is variadic: one wrapper for pointer arguments, one for values.
int lb_ioctl_ptr(int fd, unsigned long req, void *arg);
int lb_ioctl_val(int fd, unsigned long req, unsigned long arg);

// epoll_event is packed on x86_64; this unpacked copy is what Swift sees.
struct lb_epoll_event { uint32_t events; uint64_t data; };
enum { LB_EPOLLIN = 0x001, LB_EPOLLOUT = 0x004, LB_EPOLLERR = 0x008, LB_EPOLLHUP = 0x010, LB_EPOLLRDHUP = 0x2000 };
enum { LB_EPOLL_CTL_ADD = 1, LB_EPOLL_CTL_DEL = 2, LB_EPOLL_CTL_MOD = 3 };
int lb_epoll_create(void);
int lb_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
int lb_epoll_wait(int epfd, struct lb_epoll_event *out, int max, int timeout_ms);

// SIGTERM/SIGINT/SIGHUP blocked in this thread (and threads it creates later) and returned as a signalfd.
int lb_signalfd_stop_signals(void);
int lb_read_signalfd(int fd);   // returns the signal number, or -1 with errno

// Unix-socket messages with SCM_RIGHTS file descriptors.
ssize_t lb_sendmsg_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
// Receives up to len bytes and up to maxfds fds (all CLOEXEC). *nfds gets the count; extra fds are closed and
// *truncated set when the control data was cut (MSG_CTRUNC).
ssize_t lb_recvmsg_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated);

// A spin-wait hint (x86 pause / arm yield).
static inline void lb_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

// Monotonic clock in nanoseconds.
uint64_t lb_now_ns(void);

// argc/argv saved by a constructor: a static binary started without /proc has an empty CommandLine.
int lb_argc(void);
char **lb_argv(void);

// Block device size and logical block size (BLKGETSIZE64, BLKSSZGET); 0 on success.
int lb_blkdev_size(int fd, uint64_t *bytes, uint32_t *logical_block);
int lb_fdatasync(int fd);
// fallocate(2) PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE; BLKDISCARD/BLKZEROOUT for block devices.
int lb_punch_hole(int fd, uint64_t off, uint64_t len);
int lb_zero_range(int fd, uint64_t off, uint64_t len);
int lb_blk_discard(int fd, uint64_t off, uint64_t len);
int lb_blk_zeroout(int fd, uint64_t off, uint64_t len);
#endif
