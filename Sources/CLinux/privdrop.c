// Least privilege after start-up: the privilege drop and the seccomp allow-list (privdrop.h).
// The filter is built by hand (classic BPF: architecture check, then one comparison per allowed call): no
// libseccomp. The list holds every system call loopbackd makes once its devices are started (the serving loop,
// io_uring, vhost-user serving and forwarding, the control socket, reload and `ctl add` opening new files,
// SIGHUP/SIGTERM, the Swift runtime and glibc underneath), found with strace over the test suites and checked by
// the guest case loopbackd-privdrop (every device type through the module with seccomp = "kill").
// Note: io_uring's own operations (blk reads and writes) are not system calls and never pass this filter; blk's ring
// is restricted instead (Sources/CURing/curing.c: READV, WRITEV, FSYNC only, no register op once enabled; Linux 5.10+).
// io_uring_setup stays allowed (`ctl add` of a blk device makes a ring), so a compromised body could still make a
// new, unrestricted ring of its own: operations on it run with its credentials, after the drop.
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <grp.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include "privdrop.h"
#include "syscallnames.h"

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif
#ifndef SECCOMP_RET_KILL_PROCESS
#define SECCOMP_RET_KILL_PROCESS 0x80000000U
#endif
#ifndef SECCOMP_RET_LOG
#define SECCOMP_RET_LOG 0x7ffc0000U
#endif

#if defined(__x86_64__)
#define LB_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define LB_AUDIT_ARCH AUDIT_ARCH_AARCH64
#else
#error "privdrop.c: add this architecture's AUDIT_ARCH"
#endif

// ---- the allow-list (hot calls first: the kernel caches allow decisions per call anyway, since the filter
// looks at the number only, on 5.11 and newer)
static const long allowed[] = {
    // the event loop and the data path
#ifdef SYS_epoll_wait
    SYS_epoll_wait,
#endif
    SYS_epoll_pwait,
#ifdef SYS_epoll_pwait2
    SYS_epoll_pwait2,
#endif
    SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_ioctl, SYS_futex,
#ifdef SYS_futex_waitv
    SYS_futex_waitv,
#endif
    SYS_io_uring_enter, SYS_io_uring_setup, SYS_io_uring_register,
    SYS_recvmsg, SYS_sendmsg, SYS_recvfrom, SYS_sendto, SYS_pread64, SYS_pwrite64, SYS_preadv, SYS_pwritev,
#ifdef SYS_preadv2
    SYS_preadv2, SYS_pwritev2,
#endif
    SYS_epoll_ctl, SYS_epoll_create1,
#ifdef SYS_epoll_create
    SYS_epoll_create,
#endif
#ifdef SYS_poll
    SYS_poll,
#endif
    SYS_ppoll, SYS_pselect6,
#ifdef SYS_select
    SYS_select,
#endif
    SYS_clock_gettime, SYS_clock_getres, SYS_gettimeofday, SYS_clock_nanosleep, SYS_nanosleep, SYS_sched_yield,
    SYS_getrandom, SYS_eventfd2,
#ifdef SYS_eventfd
    SYS_eventfd,
#endif
    SYS_timerfd_create, SYS_timerfd_settime, SYS_timerfd_gettime, SYS_signalfd4,
#ifdef SYS_signalfd
    SYS_signalfd,
#endif
    // file descriptors and files (reload and `ctl add` open new images, sockets and nodes: what the user may reach)
    SYS_close, SYS_fcntl, SYS_dup, SYS_dup3,
#ifdef SYS_dup2
    SYS_dup2,
#endif
#ifdef SYS_close_range
    SYS_close_range,
#endif
    SYS_openat,
#ifdef SYS_open
    SYS_open,
#endif
    SYS_lseek, SYS_fstat, SYS_newfstatat, SYS_statx, SYS_fstatfs, SYS_statfs,
#ifdef SYS_stat
    SYS_stat, SYS_lstat,
#endif
    SYS_faccessat,
#ifdef SYS_faccessat2
    SYS_faccessat2,
#endif
#ifdef SYS_access
    SYS_access,
#endif
    SYS_readlinkat,
#ifdef SYS_readlink
    SYS_readlink,
#endif
    SYS_getdents64, SYS_getcwd, SYS_fsync, SYS_fdatasync, SYS_ftruncate, SYS_fallocate, SYS_flock,
    SYS_unlinkat, SYS_symlinkat, SYS_fchmod, SYS_fchmodat, SYS_umask,
#ifdef SYS_unlink
    SYS_unlink, SYS_symlink, SYS_chmod,
#endif
    // A gpu's file output replaces its PPM atomically (rename of a temporary file).
    SYS_renameat,
#ifdef SYS_renameat2
    SYS_renameat2,
#endif
#ifdef SYS_rename
    SYS_rename,
#endif
    SYS_memfd_create, SYS_pipe2,
#ifdef SYS_pipe
    SYS_pipe,
#endif
    // memory (peer regions, shadow rings, the Swift heap)
    SYS_mmap, SYS_munmap, SYS_mremap, SYS_madvise, SYS_mprotect, SYS_brk,
    // sockets (vhost-user, the control socket, console and vsock endpoints, systemd's notify socket)
    SYS_socket, SYS_socketpair, SYS_bind, SYS_listen, SYS_accept4, SYS_accept, SYS_connect, SYS_shutdown,
    SYS_getsockopt, SYS_setsockopt, SYS_getsockname, SYS_getpeername,
    // threads and signals (the loop, the stall watchdog, ADDDEV threads; SIGBUS guard, SIGURG, SIGSYS log)
    SYS_clone,
#ifdef SYS_clone3
    SYS_clone3,
#endif
    SYS_set_robust_list,
#ifdef SYS_rseq
    SYS_rseq,
#endif
    SYS_exit, SYS_exit_group, SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_sigaltstack,
    SYS_restart_syscall, SYS_tgkill, SYS_tkill, SYS_getpid, SYS_gettid, SYS_prctl, SYS_sched_getaffinity,
    SYS_membarrier,
    // identity and limits the runtime asks about
    SYS_getuid, SYS_geteuid, SYS_getgid, SYS_getegid, SYS_getppid, SYS_uname, SYS_prlimit64,
#ifdef SYS_getrlimit
    SYS_getrlimit,
#endif
};

int lb_seccomp_allowed_count(void) { return (int)(sizeof allowed / sizeof allowed[0]); }

int lb_seccomp_allows(long nr) {
    for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++) if (allowed[i] == nr) return 1;
    return 0;
}

const char *lb_syscall_name(long nr) {
    for (size_t i = 0; i < sizeof lb_syscall_names / sizeof lb_syscall_names[0]; i++)
        if (lb_syscall_names[i].nr == nr) return lb_syscall_names[i].name;
    return NULL;
}

long lb_syscall_number(const char *name) {
    for (size_t i = 0; i < sizeof lb_syscall_names / sizeof lb_syscall_names[0]; i++)
        if (strcmp(lb_syscall_names[i].name, name) == 0) return lb_syscall_names[i].nr;
    return -1;
}

long lb_seccomp_test_violation(void) { return syscall(SYS_syslog, 10 /* SYSLOG_ACTION_SIZE_BUFFER */, NULL, 0); }

// ---- the privilege drop

int lb_drop_privileges(int change_user, uid_t uid, gid_t gid, const gid_t *groups, size_t ngroups, const char **step) {
    *step = "";
    // The bounding set (this thread's; the others cannot exec anything: no_new_privs, and they hold no
    // capability after setresuid). Needs CAP_SETPCAP: without it (a service manager cut the set already) the
    // set stays as it is.
    for (int cap = 0; cap < 64; cap++) {
        int r = prctl(PR_CAPBSET_READ, cap, 0, 0, 0);
        if (r < 0) break;   // EINVAL: past the last capability
        if (r == 1 && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EPERM) { *step = "prctl(PR_CAPBSET_DROP)"; return -1; }
    }
    if (change_user) {
        if (setgroups(ngroups, groups) != 0) { *step = "setgroups"; return -1; }
        if (setresgid(gid, gid, gid) != 0) { *step = "setresgid"; return -1; }
        if (setresuid(uid, uid, uid) != 0) { *step = "setresuid"; return -1; }
        uid_t r, e, s;
        if (getresuid(&r, &e, &s) != 0 || r != uid || e != uid || s != uid) { *step = "getresuid (ids not changed)"; errno = EPERM; return -1; }
    }
    // Permitted, effective and inheritable sets empty (setresuid away from root already emptied the first two).
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct d[2];
    memset(d, 0, sizeof d);
    if (syscall(SYS_capset, &h, d) != 0) { *step = "capset"; return -1; }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) { *step = "prctl(PR_CAP_AMBIENT_CLEAR_ALL)"; return -1; }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) { *step = "prctl(PR_SET_NO_NEW_PRIVS)"; return -1; }
    // Check: no capability left in this thread.
    memset(d, 0, sizeof d);
    if (syscall(SYS_capget, &h, d) != 0) { *step = "capget"; return -1; }
    if (d[0].effective | d[1].effective | d[0].permitted | d[1].permitted) { *step = "capget (capabilities left)"; errno = EPERM; return -1; }
    return 0;
}

// ---- seccomp

static int sigsys_journal;

static size_t put_str(char *b, size_t at, size_t cap, const char *s) {
    while (*s && at < cap) b[at++] = *s++;
    return at;
}
static size_t put_num(char *b, size_t at, size_t cap, long v) {
    char t[24]; int n = 0;
    unsigned long u = v < 0 ? (unsigned long)(-v) : (unsigned long)v;
    do { t[n++] = (char)('0' + u % 10); u /= 10; } while (u && n < 24);
    if (v < 0 && at < cap) b[at++] = '-';
    while (n && at < cap) b[at++] = t[--n];
    return at;
}

// A call outside the list: one line naming it (write(2) only: async-signal-safe), then death by SIGSYS. The
// handler goes back to the default action and makes the same (filtered, never executed) call again: the kernel's
// second SIGSYS then ends the whole process, so the service manager sees "killed by SIGSYS" and restarts it.
static void sigsys_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    char b[400]; size_t n = 0, cap = sizeof b - 1;
    long nr = si->si_syscall;
    const char *name = lb_syscall_name(nr);
    n = put_str(b, n, cap, sigsys_journal ? "<3>error: " : "loopbackd: error: ");
    n = put_str(b, n, cap, "seccomp: forbidden system call ");
    n = put_num(b, n, cap, nr);
    n = put_str(b, n, cap, " (");
    n = put_str(b, n, cap, name ? name : "unknown");
    n = put_str(b, n, cap, ") in thread ");
    n = put_num(b, n, cap, syscall(SYS_gettid));
    n = put_str(b, n, cap, ": killing the process (SIGSYS); if loopbackd needs it, it belongs in the allow-list "
                           "(Sources/CLinux/privdrop.c)\n");
    b[n] = 0;
    for (size_t off = 0; off < n;) {
        ssize_t w = write(2, b + off, n - off);
        if (w <= 0) break;
        off += (size_t)w;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigaction(SIGSYS, &sa, NULL);
    syscall(nr, 0, 0, 0, 0, 0, 0);
    syscall(SYS_exit_group, 128 + SIGSYS);   // not reached
}

int lb_seccomp_install(int mode, int journal) {
    if (mode != LB_SECCOMP_KILL && mode != LB_SECCOMP_LOG) { errno = EINVAL; return -1; }
    size_t count = sizeof allowed / sizeof allowed[0];
    size_t len = 0, max = 8 + 2 * count;
    struct sock_filter *f = calloc(max, sizeof *f);
    if (!f) return -1;
    // Another architecture's calling convention (i386 int 0x80 on x86_64): killed outright.
    f[len++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    f[len++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, LB_AUDIT_ARCH, 1, 0);
    f[len++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    f[len++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
#if defined(__x86_64__)
    // x32 numbers (bit 30) alias the x86_64 ones: killed outright.
    f[len++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000U, 0, 1);
    f[len++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
#endif
    for (size_t i = 0; i < count; i++) {
        f[len++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)allowed[i], 0, 1);
        f[len++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    }
    f[len++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, mode == LB_SECCOMP_KILL ? SECCOMP_RET_TRAP : SECCOMP_RET_LOG);
    struct sock_fprog prog = { (unsigned short)len, f };
    if (mode == LB_SECCOMP_KILL) {
        sigsys_journal = journal;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = sigsys_handler;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSYS, &sa, NULL) != 0) { free(f); return -1; }
        // SIGSYS must reach the handler in every thread (a blocked SIGSYS from seccomp is forced to the default
        // action, which kills silently).
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGSYS);
        pthread_sigmask(SIG_UNBLOCK, &s, NULL);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) { free(f); return -1; }
    long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog);
    free(f);
    if (r > 0) { errno = ESRCH; return -1; }   // a thread could not be synchronized (its id)
    return r == 0 ? 0 : -1;
}
