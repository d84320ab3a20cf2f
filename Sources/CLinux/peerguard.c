// Defences against a vhost-user peer's file descriptors (Sources/Transport/VhostUser): memory that shrinks under
// us (SIGBUS guard) and fds that claim to be eventfds.
#define _GNU_SOURCE
#include "clinux.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

// ---- SIGBUS guard ----
// A peer's memory region is a MAP_SHARED mapping of a file the peer can truncate at any time (a plain file, or a
// memfd without seals): touching a page past the new end raises SIGBUS, which would kill every device of the
// process. Each such mapping is registered here; the handler, on a fault inside one, maps anonymous zero memory
// over the whole range (the faulting access then completes on zeros), marks the slot broken and wakes the loop
// through an eventfd; the owner then closes that peer's connection. A SIGBUS anywhere else is not ours: the
// default action is restored and the access faults again (core dump as usual).
// The slot table is fixed-size and lock-free: the handler may run on any thread at any time; slots are written
// by the registering thread with release stores and read with acquire loads.
#define LB_GUARD_SLOTS 512
struct lb_guard_slot { _Atomic uintptr_t start; _Atomic uintptr_t end; _Atomic int broken; _Atomic int notify; };
static struct lb_guard_slot guard_slots[LB_GUARD_SLOTS];
static _Atomic unsigned long guard_faults;
static struct sigaction guard_previous;
static _Atomic int guard_installed;

static void guard_handler(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    int saved = errno;
    uintptr_t a = (uintptr_t)si->si_addr;
    for (int i = 0; i < LB_GUARD_SLOTS; i++) {
        uintptr_t s = atomic_load_explicit(&guard_slots[i].start, memory_order_acquire);
        uintptr_t e = atomic_load_explicit(&guard_slots[i].end, memory_order_acquire);
        if (s == 0 || a < s || a >= e) continue;
        // mmap is async-signal-safe in practice (a plain system call). MAP_FIXED replaces the file pages.
        void *p = mmap((void *)s, e - s, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) break;
        atomic_store_explicit(&guard_slots[i].broken, 1, memory_order_release);
        atomic_fetch_add_explicit(&guard_faults, 1, memory_order_relaxed);
        int fd = atomic_load_explicit(&guard_slots[i].notify, memory_order_acquire);
        if (fd >= 0) { uint64_t one = 1; ssize_t r = write(fd, &one, 8); (void)r; }
        errno = saved;
        return;
    }
    // Not a peer mapping: a real bug. Restore the previous action (default, or the Swift runtime's backtracer);
    // returning re-executes the access, which faults again and is reported as usual.
    sigaction(sig, &guard_previous, NULL);
    errno = saved;
}

int lb_guard_install(void) {
    int expected = 0;
    if (!atomic_compare_exchange_strong(&guard_installed, &expected, 1)) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, &guard_previous);
}

int lb_guard_add(void *start, size_t len, int notify_fd) {
    if (start == NULL || len == 0) { errno = EINVAL; return -1; }
    for (int i = 0; i < LB_GUARD_SLOTS; i++) {
        uintptr_t expected = 0;
        // Claim the slot by its end word first (0 = free), then publish the start: the handler ignores start == 0.
        if (atomic_compare_exchange_strong(&guard_slots[i].end, &expected, (uintptr_t)start + len)) {
            atomic_store_explicit(&guard_slots[i].broken, 0, memory_order_relaxed);
            atomic_store_explicit(&guard_slots[i].notify, notify_fd, memory_order_relaxed);
            atomic_store_explicit(&guard_slots[i].start, (uintptr_t)start, memory_order_release);
            return i;
        }
    }
    errno = ENOSPC;
    return -1;
}

void lb_guard_remove(int slot) {
    if (slot < 0 || slot >= LB_GUARD_SLOTS) return;
    atomic_store_explicit(&guard_slots[slot].start, 0, memory_order_release);
    atomic_store_explicit(&guard_slots[slot].broken, 0, memory_order_relaxed);
    atomic_store_explicit(&guard_slots[slot].end, 0, memory_order_release);
}

int lb_guard_broken(int slot) {
    if (slot < 0 || slot >= LB_GUARD_SLOTS) return 0;
    return atomic_load_explicit(&guard_slots[slot].broken, memory_order_acquire);
}

unsigned long lb_guard_fault_count(void) { return atomic_load_explicit(&guard_faults, memory_order_relaxed); }

// ---- fd kinds ----
int lb_fd_kind(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return -1;
    switch (st.st_mode & S_IFMT) {
    case S_IFREG: return LB_FD_REGULAR;
    case S_IFBLK: return LB_FD_BLOCK;
    case S_IFCHR: return LB_FD_CHAR;
    case S_IFIFO: return LB_FD_PIPE;
    case S_IFSOCK: return LB_FD_SOCKET;
    case S_IFDIR: return LB_FD_DIRECTORY;
    case 0: break;
    default: return LB_FD_OTHER;
    }
    // Anonymous inodes (eventfd, timerfd, signalfd, epoll, …) have no file type bits. /proc names the kind when
    // it is mounted; without /proc every anonymous inode is taken as a candidate (writes to the other kinds fail
    // with EINVAL, never block, once O_NONBLOCK is set).
    char path[64], link[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n < 0) return LB_FD_ANON;
    link[n] = 0;
    if (strcmp(link, "anon_inode:[eventfd]") == 0) return LB_FD_EVENTFD;
    return LB_FD_OTHER;
}

int lb_set_nonblocking(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) return -1;
    if (fl & O_NONBLOCK) return 0;
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

int lb_eventfd_is_semaphore(int fd) {
    // EFD_SEMAPHORE is invisible to fcntl and (before Linux 6.6) to fdinfo. Probe it: empty the counter, add 2,
    // read once. A normal eventfd returns the whole count (>= 2, more if the peer added to it meanwhile); a
    // semaphore returns 1. The probe consumes pending signals: the caller re-scans its ring after installing the fd.
    uint64_t v;
    ssize_t r;
    do { r = read(fd, &v, 8); } while (r < 0 && errno == EINTR);
    if (r < 0 && errno != EAGAIN) return -1;
    uint64_t two = 2;
    do { r = write(fd, &two, 8); } while (r < 0 && errno == EINTR);
    if (r < 0) {
        // Still full right after a read: only a semaphore keeps its count when read.
        return errno == EAGAIN ? 1 : -1;
    }
    do { r = read(fd, &v, 8); } while (r < 0 && errno == EINTR);
    if (r != 8) return -1;
    int sem = v == 1;
    if (sem) { do { r = read(fd, &v, 8); } while (r < 0 && errno == EINTR); }
    return sem;
}

int lb_eventfd2(unsigned int initval, int flags) { return eventfd(initval, flags); }

int lb_seal_size(int fd) { return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL); }

#include <sys/timerfd.h>
int lb_timerfd_arm_periodic(int fd, uint64_t ns) {
    struct itimerspec it;
    memset(&it, 0, sizeof it);
    it.it_value.tv_sec = (time_t)(ns / 1000000000ull);
    it.it_value.tv_nsec = (long)(ns % 1000000000ull);
    it.it_interval = it.it_value;
    return timerfd_settime(fd, 0, &it, NULL);
}
