// A watchdog for system calls on file descriptors a peer shares with us (Sources/Transport/System/FileDescriptor.swift
// FD.signal / FD.drain). The fds are made non-blocking when accepted, but O_NONBLOCK lives in the open file
// description, which the peer shares: a hostile peer can clear it again and then fill (or empty) the eventfd, and
// the loop thread's write (or read) would block for as long as the peer likes, stalling every device. The loop
// thread marks each such call (an odd sequence number while inside); a watchdog thread, running only while some
// peer connection exists, looks every 50 ms and interrupts a call that has not finished since its last look with a
// signal whose handler does nothing and is installed without SA_RESTART: the call returns EINTR, the caller treats
// it as done, and the fd is made non-blocking again. Cost on the hot path: two thread-local increments.
#define _GNU_SOURCE
#include "clinux.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#define LB_STALL_SLOTS 64
struct lb_stall_slot { _Atomic uint64_t seq; _Atomic int fd; pthread_t thread; _Atomic int used; };
static struct lb_stall_slot stall_slots[LB_STALL_SLOTS];
__thread struct lb_stall_slot *lb_stall_self;
static pthread_mutex_t stall_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t stall_cond = PTHREAD_COND_INITIALIZER;
static int stall_watchers;          // live peer connections (under stall_lock)
static int stall_thread_started;
static _Atomic unsigned long stall_interrupts;

static void stall_signal_handler(int sig) { (void)sig; }

static void *stall_watchdog(void *arg) {
    (void)arg;
    uint64_t last[LB_STALL_SLOTS];
    memset(last, 0, sizeof last);
    for (;;) {
        pthread_mutex_lock(&stall_lock);
        while (stall_watchers == 0) pthread_cond_wait(&stall_cond, &stall_lock);
        pthread_mutex_unlock(&stall_lock);
        struct timespec ts = { 0, 50 * 1000 * 1000 };
        nanosleep(&ts, NULL);
        for (int i = 0; i < LB_STALL_SLOTS; i++) {
            if (!atomic_load_explicit(&stall_slots[i].used, memory_order_acquire)) continue;
            uint64_t s = atomic_load_explicit(&stall_slots[i].seq, memory_order_acquire);
            if ((s & 1) && s == last[i]) {
                // Still inside the same call as 50 ms ago: interrupt it.
                atomic_fetch_add_explicit(&stall_interrupts, 1, memory_order_relaxed);
                pthread_kill(stall_slots[i].thread, SIGURG);
            }
            last[i] = s;
        }
    }
    return NULL;
}

int lb_stall_register_thread(void) {
    if (lb_stall_self) return 0;
    for (int i = 0; i < LB_STALL_SLOTS; i++) {
        int expected = 0;
        if (atomic_compare_exchange_strong(&stall_slots[i].used, &expected, 2)) {
            stall_slots[i].thread = pthread_self();
            atomic_store_explicit(&stall_slots[i].seq, 0, memory_order_relaxed);
            atomic_store_explicit(&stall_slots[i].used, 1, memory_order_release);
            lb_stall_self = &stall_slots[i];
            struct sigaction sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_handler = stall_signal_handler;   // no SA_RESTART: a blocked read/write returns EINTR
            sigemptyset(&sa.sa_mask);
            sigaction(SIGURG, &sa, NULL);
            // SIGURG may be blocked in this thread (inherited masks): unblock it here.
            sigset_t set;
            sigemptyset(&set);
            sigaddset(&set, SIGURG);
            pthread_sigmask(SIG_UNBLOCK, &set, NULL);
            return 0;
        }
    }
    errno = ENOSPC;
    return -1;
}

void lb_stall_unregister_thread(void) {
    struct lb_stall_slot *s = lb_stall_self;
    if (!s) return;
    lb_stall_self = NULL;
    atomic_store_explicit(&s->used, 0, memory_order_release);
}

void lb_stall_watch(int delta) {
    pthread_mutex_lock(&stall_lock);
    stall_watchers += delta;
    if (stall_watchers < 0) stall_watchers = 0;
    if (stall_watchers > 0 && !stall_thread_started) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        // The watchdog must never take SIGURG (or the stop signals) itself.
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        if (pthread_create(&t, &a, stall_watchdog, NULL) == 0) stall_thread_started = 1;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&a);
    }
    pthread_cond_broadcast(&stall_cond);
    pthread_mutex_unlock(&stall_lock);
}

unsigned long lb_stall_interrupts(void) { return atomic_load_explicit(&stall_interrupts, memory_order_relaxed); }
