// Least privilege after start-up (privdrop.c): drop to an unprivileged user with no capabilities and
// no_new_privs, then a seccomp allow-list of the system calls loopbackd makes. Used by Sources/Daemon/Runner.swift
// once every configured device is open, mapped and bound.
#ifndef LB_PRIVDROP_H
#define LB_PRIVDROP_H
#include <stddef.h>
#include <sys/types.h>

// Drops every capability from the bounding set, sets the supplementary groups, gid and uid (real, effective,
// saved; every thread: glibc's set*id reach all threads), clears the inheritable and ambient sets and sets
// PR_SET_NO_NEW_PRIVS. change_user = 0 keeps the ids (only capabilities and no_new_privs). Returns 0, or -1
// with errno set and *step naming the call that failed.
int lb_drop_privileges(int change_user, uid_t uid, gid_t gid, const gid_t *groups, size_t ngroups, const char **step);

// Seccomp modes: LB_SECCOMP_KILL (a call outside the list raises SIGSYS; the handler writes one log line naming
// the call to stderr, then the process dies of SIGSYS) or LB_SECCOMP_LOG (the kernel logs the call and lets it
// run: for finding what is missing).
enum { LB_SECCOMP_KILL = 1, LB_SECCOMP_LOG = 2 };
// Installs the filter on every thread of the process (SECCOMP_FILTER_FLAG_TSYNC) and, for KILL, the SIGSYS
// handler. journal = 1 prefixes the log line with the syslog priority (<2>) as Log.swift does under systemd.
// Sets no_new_privs first. Returns 0, or -1 with errno set (a TSYNC failure: errno ESRCH).
int lb_seccomp_install(int mode, int journal);
// The number of system calls in the allow-list on this architecture.
int lb_seccomp_allowed_count(void);
// 1 when the system call `nr` is in the allow-list.
int lb_seccomp_allows(long nr);
// The name of system call `nr` on this architecture, or NULL.
const char *lb_syscall_name(long nr);
// The number of the system call called `name` on this architecture, or -1.
long lb_syscall_number(const char *name);
// Test hook (LOOPBACKD_TEST_SECCOMP_VIOLATION): makes a system call outside the allow-list (syslog(2), reading
// the kernel log buffer's size, harmless without the filter).
long lb_seccomp_test_violation(void);
#endif
