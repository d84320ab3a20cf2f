// Tiny wrappers for Linux calls that Swift's Glibc module does not import
// (GNU extensions, variadic functions, packed structs, CMSG macros).
#ifndef CLINUX_H
#define CLINUX_H
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
// The kernel module's user-space ABI (a symlink to kernel/virtio-loopback/uapi/virtio_lo.h: one source of truth).
#include "virtio_lo.h"
// The ALSA PCM ioctls of the sound device's hw:CARD,DEV endpoint (alsapcm.c).
#include "alsapcm.h"
// Least privilege after start-up: privilege drop and seccomp allow-list (privdrop.c).
#include "privdrop.h"
// VDUSE ioctls and the vdpa netlink request (vduse.c).
#include "lbvduse.h"
// Host DRM/KMS output of the gpu device (kms.c).
#include "lbkms.h"
// The ioctl numbers, computed by the header's _IOWR macros (Swift does not import function-like macros).
static inline unsigned long lb_vlo_adddev(void) { return VIRTIO_LO_ADDDEV; }
static inline unsigned long lb_vlo_deldev(void) { return VIRTIO_LO_DELDEV; }
static inline unsigned long lb_vlo_gconf(void) { return VIRTIO_LO_GCONF; }
static inline unsigned long lb_vlo_sconf(void) { return VIRTIO_LO_SCONF; }
static inline unsigned long lb_vlo_kick(void) { return VIRTIO_LO_KICK; }
static inline unsigned long lb_vlo_getext(void) { return VIRTIO_LO_GETEXT; }
static inline unsigned long lb_vlo_set_irqfd(void) { return VIRTIO_LO_SET_IRQFD; }
static inline unsigned long lb_vlo_get_ram(void) { return VIRTIO_LO_GET_RAM; }
static inline unsigned long lb_vlo_devstatus(void) { return VIRTIO_LO_DEVSTATUS; }
static inline unsigned long lb_vlo_get_queue(void) { return VIRTIO_LO_GET_QUEUE; }
static inline unsigned long lb_vlo_cfg_get(void) { return VIRTIO_LO_CFG_GET; }
static inline unsigned long lb_vlo_cfg_ack(void) { return VIRTIO_LO_CFG_ACK; }
static inline unsigned long lb_vlo_get_pool(void) { return VIRTIO_LO_GET_POOL; }
static inline unsigned long lb_vlo_restrict(void) { return VIRTIO_LO_RESTRICT; }

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
#define LB_EPOLLET 0x80000000u
enum { LB_EPOLL_CTL_ADD = 1, LB_EPOLL_CTL_DEL = 2, LB_EPOLL_CTL_MOD = 3 };
int lb_epoll_create(void);
int lb_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
int lb_epoll_wait(int epfd, struct lb_epoll_event *out, int max, int timeout_ms);

// SIGTERM/SIGINT/SIGHUP blocked in this thread (and threads it creates later) and returned as a signalfd.
int lb_signalfd_stop_signals(void);
int lb_read_signalfd(int fd);
// Unblocks what lb_signalfd_stop_signals blocked (in-process callers, e.g. tests, get their mask back).
int lb_unblock_stop_signals(void);   // returns the signal number, or -1 with errno

// Unix-socket messages with SCM_RIGHTS file descriptors.
ssize_t lb_sendmsg_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
// Receives up to len bytes and up to maxfds fds (all CLOEXEC). *nfds gets the count; extra fds are closed and
// *truncated set when the control data was cut (MSG_CTRUNC).
ssize_t lb_recvmsg_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated);
// The same with extra sendmsg/recvmsg flags (MSG_DONTWAIT: never blocks, whatever O_NONBLOCK a peer set).
ssize_t lb_sendmsg_fds_flags(int sock, const void *buf, size_t len, const int *fds, int nfds, int flags);
ssize_t lb_recvmsg_fds_flags(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated, int flags);

// A spin-wait hint (x86 pause / arm yield).
static inline void lb_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

// The calling process gets SIGTERM when its parent dies (a helper child must not outlive `loopbackd ab`).
int lb_die_with_parent(void);

// Monotonic clock in nanoseconds.
uint64_t lb_now_ns(void);
// A cycle counter for per-request timing on the loop (a few ns: rdtsc, cntvct_el0), monotonic, not in ns: the
// caller converts with a ratio measured against lb_now_ns. Other architectures fall back to CLOCK_MONOTONIC ns.
static inline uint64_t lb_ticks(void) {
#if defined(__x86_64__)
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
#elif defined(__aarch64__)
    uint64_t v;
    __asm__ __volatile__("mrs %0, cntvct_el0" : "=r"(v));
    return v;
#else
    return lb_now_ns();
#endif
}

// Pins the calling thread to the `nth` CPU (0-based) of the process's allowed set; returns that CPU, or -1 when the
// set has fewer CPUs. `lb_unpin_self` gives the thread the whole allowed set back. For busy-polling measurements:
// a driver and a device that both spin need a CPU each (bench, ab --poll).
int lb_pin_self(int nth);
void lb_unpin_self(void);
// Number of CPUs in the process's allowed set.
int lb_allowed_cpus(void);

// The round-trip floor of this machine for `bench`: two threads on one shared-memory ring, both spinning (no
// system call, no sleep): the driver side publishes a request (a 16-byte descriptor), the device side writes 64 bytes
// into the request's buffer and publishes its completion. `count` timed round trips (after count/10 untimed) go to
// `samples_ns`. Returns 0, or an errno value when the thread cannot start.
int lb_spin_floor(uint64_t count, uint64_t *samples_ns);

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


// ---- vhost-user support (Sources/Transport/VhostUser) ----
// Listening AF_UNIX stream socket (CLOEXEC, NONBLOCK) at `path` with file mode `mode`. A stale socket file (nobody
// accepting: connect gives ECONNREFUSED) is unlinked first; a live one gives EADDRINUSE, a non-socket EEXIST.
int lb_unix_listen(const char *path, int backlog, unsigned int mode);
// Connected AF_UNIX stream socket (CLOEXEC; NONBLOCK if `nonblock`), or -1 with errno.
int lb_unix_connect(const char *path, int nonblock);
// accept4 with CLOEXEC|NONBLOCK.
int lb_unix_accept(int listen_fd);
// AF_UNIX stream socketpair, both CLOEXEC; sv[0] NONBLOCK if `nonblock0`, sv[1] blocking.
int lb_unix_socketpair(int sv[2], int nonblock0);
// dup3(old, new, O_CLOEXEC): atomically makes `newfd` refer to `oldfd`'s file.
int lb_dup3_cloexec(int oldfd, int newfd);
// 1 and *size if `fd` is a regular file (memfd, tmpfs, hugetlbfs), 0 if another kind (size unknown), -1 on error.
int lb_fd_regular_size(int fd, uint64_t *size);
long lb_page_size(void);
// send(2) with MSG_DONTWAIT|MSG_NOSIGNAL.
ssize_t lb_send_nowait(int fd, const void *buf, size_t len);
// recv(2) of one byte with MSG_PEEK|MSG_DONTWAIT: 1 data pending, 0 EOF, -1 errno (EAGAIN: nothing yet).
ssize_t lb_peek_byte(int fd);
// One-shot CLOCK_MONOTONIC timerfd (CLOEXEC, NONBLOCK); lb_timerfd_arm(fd, 0) disarms.
int lb_timerfd(void);
int lb_timerfd_arm(int fd, uint64_t ns);
// Waits up to timeout_ms for POLLIN (events=1) or POLLOUT (events=4); returns poll(2)'s revents, 0 on timeout, -1.
int lb_poll_one(int fd, int events, int timeout_ms);
// ---- peer fds (peerguard.c) ----
// SIGBUS guard for peer-supplied shared mappings: install the handler (idempotent), register each mapping with an
// eventfd the handler signals when it caught a fault there (returns the slot, or -1), read the slot's broken flag,
// remove the slot before munmap.
int lb_guard_install(void);
int lb_guard_add(void *start, size_t len, int notify_fd);
void lb_guard_remove(int slot);
int lb_guard_broken(int slot);
unsigned long lb_guard_fault_count(void);
enum { LB_FD_REGULAR = 1, LB_FD_BLOCK, LB_FD_CHAR, LB_FD_PIPE, LB_FD_SOCKET, LB_FD_DIRECTORY, LB_FD_EVENTFD,
       LB_FD_ANON, LB_FD_OTHER };
// What kind of file `fd` is (LB_FD_*; LB_FD_ANON: an anonymous inode /proc could not name), -1 on error.
int lb_fd_kind(int fd);
// Sets O_NONBLOCK on the file description; 0 on success.
int lb_set_nonblocking(int fd);
// 1 if the (non-blocking) eventfd is in EFD_SEMAPHORE mode, 0 if not, -1 on error. Consumes pending counts.
int lb_eventfd_is_semaphore(int fd);
// eventfd(2) with raw EFD_* flags (EFD_SEMAPHORE = 1, EFD_NONBLOCK = 04000, EFD_CLOEXEC = 02000000).
int lb_eventfd2(unsigned int initval, int flags);
// Seals a memfd's size (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL): a peer it is shared with cannot truncate it.
int lb_seal_size(int fd);
// Arms a timerfd to fire every `ns` (0 disarms).
int lb_timerfd_arm_periodic(int fd, uint64_t ns);
// ---- stall guard for peer-shared fds (stallguard.c) ----
struct lb_stall_slot;
extern __thread struct lb_stall_slot *lb_stall_self;
// The calling thread (an event loop) takes part: its guarded calls can be interrupted by the watchdog.
int lb_stall_register_thread(void);
void lb_stall_unregister_thread(void);
// +1 when a peer connection starts, -1 when it ends: the watchdog thread runs only while some exist.
void lb_stall_watch(int delta);
// Guarded calls interrupted so far.
unsigned long lb_stall_interrupts(void);
// Marks entering/leaving a guarded call on this thread (no-op on threads that did not register).
static inline void lb_stall_enter(void) {
    struct lb_stall_slot *s = lb_stall_self;
    if (s) __atomic_fetch_add((uint64_t *)s, 1, __ATOMIC_RELEASE);
}
static inline void lb_stall_leave(void) {
    struct lb_stall_slot *s = lb_stall_self;
    if (s) __atomic_fetch_add((uint64_t *)s, 1, __ATOMIC_RELEASE);
}
// Publication of an entry count (GuestMemory.append): the entry is written before the count that makes it visible.
static inline void lb_store_release_int(long *p, long v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline long lb_load_acquire_int(const long *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
#endif
