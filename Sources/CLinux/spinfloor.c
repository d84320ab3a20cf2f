// The spin-ring floor (clinux.h, lb_spin_floor): what a request/completion round trip costs between two CPUs when
// nothing but shared memory is involved. loopbackd's busy-polled path is compared against it (bench prints the ratio).
#define _GNU_SOURCE
#include "clinux.h"
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
#include <string.h>

// The process's allowed CPUs, read once before any thread pins itself.
static cpu_set_t allowed_set;
static int allowed_read;
static void read_allowed(void) {
    if (allowed_read) return;
    CPU_ZERO(&allowed_set);
    if (sched_getaffinity(0, sizeof allowed_set, &allowed_set) != 0) CPU_SET(0, &allowed_set);
    allowed_read = 1;
}
int lb_allowed_cpus(void) { read_allowed(); return CPU_COUNT(&allowed_set); }
int lb_pin_self(int nth) {
    read_allowed();
    for (int c = 0, k = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &allowed_set)) continue;
        if (k++ != nth) continue;
        cpu_set_t one; CPU_ZERO(&one); CPU_SET(c, &one);
        return sched_setaffinity(0, sizeof one, &one) == 0 ? c : -1;   // 0: the calling thread
    }
    return -1;
}
void lb_unpin_self(void) { read_allowed(); sched_setaffinity(0, sizeof allowed_set, &allowed_set); }

struct floor_ring {
    // Driver-written and device-written indexes on their own cache lines: the two sides never write the same line.
    _Alignas(64) _Atomic uint32_t avail;
    _Alignas(64) _Atomic uint32_t used;
    _Alignas(64) _Atomic int stop;
    _Alignas(64) struct { uint64_t addr; uint32_t len; uint32_t id; } desc[256];
    _Alignas(64) uint8_t buf[256][64];
};

static void *floor_device(void *arg) {
    struct floor_ring *r = arg;
    if (lb_allowed_cpus() >= 2) lb_pin_self(0);   // a CPU each, placed as bench places its busy-polled rows
    uint32_t seen = 0;
    uint8_t fill = 0;
    for (;;) {
        uint32_t a;
        // Acquire: the descriptor written before the driver's release store of `avail` is visible.
        while ((a = atomic_load_explicit(&r->avail, memory_order_acquire)) == seen) {
            if (atomic_load_explicit(&r->stop, memory_order_relaxed)) return NULL;
            lb_cpu_relax();
        }
        for (; seen != a; seen++) {
            uint32_t slot = r->desc[seen & 255].id & 255;
            fill = fill == 255 ? 1 : fill + 1;   // never 0: the driver checks the payload arrived
            memset(r->buf[slot], fill, 64);
        }
        // Release: the payload is visible before the completion is.
        atomic_store_explicit(&r->used, a, memory_order_release);
    }
}

int lb_spin_floor(uint64_t count, uint64_t *samples_ns) {
    static struct floor_ring ring;   // static: one bench at a time; no allocation
    memset(&ring, 0, sizeof ring);
    pthread_t t;
    int pinned = lb_allowed_cpus() >= 2 && lb_pin_self(1) >= 0;
    int e = pthread_create(&t, NULL, floor_device, &ring);
    if (e) { if (pinned) lb_unpin_self(); return e; }
    uint64_t warm = count / 10;
    uint32_t idx = 0;
    for (uint64_t i = 0; i < warm + count; i++) {
        uint64_t t0 = lb_now_ns();
        ring.buf[idx & 255][63] = 0;
        ring.desc[idx & 255].addr = (uint64_t)(uintptr_t)ring.buf[idx & 255];
        ring.desc[idx & 255].len = 64;
        ring.desc[idx & 255].id = idx & 255;
        idx++;
        atomic_store_explicit(&ring.avail, idx, memory_order_release);
        while (atomic_load_explicit(&ring.used, memory_order_acquire) != idx) lb_cpu_relax();
        if (ring.buf[(idx - 1) & 255][63] == 0) { e = EIO; break; }   // the payload must arrive with its completion
        if (i >= warm) samples_ns[i - warm] = lb_now_ns() - t0;
    }
    atomic_store_explicit(&ring.stop, 1, memory_order_relaxed);
    pthread_join(t, NULL);
    if (pinned) lb_unpin_self();
    return e;
}
