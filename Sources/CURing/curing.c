#include "curing.h"
#include <errno.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <liburing.h>

// `unrestricted`: NULL for a restricted ring, else why the kernel refused to restrict it.
struct lb_uring { struct io_uring ring; const char *unrestricted; };

// Least privilege (issue 11): io_uring operations are not system calls, so the seccomp allow-list (privdrop.c) never
// sees them; a compromised device body could queue OPENAT, CONNECT or SENDMSG on this ring. The ring is therefore
// created disabled (IORING_SETUP_R_DISABLED), its eventfd registered, then restricted (IORING_REGISTER_RESTRICTIONS,
// io_uring_register(2); liburing io_uring_register_restrictions(3)) and only then enabled (IORING_REGISTER_ENABLE_RINGS).
// After that the kernel completes an SQE whose opcode is not listed, or that carries any IOSQE_* flag, with -EACCES,
// and refuses every register opcode not listed with -EACCES (io_uring/register.c __io_uring_register, io_init_req).
// Listed: exactly what the queue functions below prepare (io_uring_prep_readv, _writev2, _fsync) and no SQE flag.
// ENABLE_RINGS is the one register op listed: it does nothing once the ring is enabled (-EBADFD/-EINVAL). Listing
// one is needed: where io_parse_restrictions (io_uring/register.c, recent kernels) keeps register and SQE
// restrictions apart, register ops are restricted only if one is listed. So no register op (files, buffers,
// personality, eventfd) works after enabling. Nothing at run time needs one: the eventfd is registered before.
static const struct io_uring_restriction lb_restrictions[] = {
    { .opcode = IORING_RESTRICTION_SQE_OP, .sqe_op = IORING_OP_READV },
    { .opcode = IORING_RESTRICTION_SQE_OP, .sqe_op = IORING_OP_WRITEV },
    { .opcode = IORING_RESTRICTION_SQE_OP, .sqe_op = IORING_OP_FSYNC },
    { .opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED, .sqe_flags = 0 },
    { .opcode = IORING_RESTRICTION_REGISTER_OP, .register_op = IORING_REGISTER_ENABLE_RINGS },
};

static int lb_uring_setup(struct lb_uring *r, unsigned entries, unsigned flags, int event_fd) {
    int e = io_uring_queue_init(entries, &r->ring, flags);
    if (e < 0) return e;
    if (event_fd >= 0) {
        // "async": the eventfd signals only completions posted after io_uring_enter returned. What io_uring
        // completes inline while submitting (a read from the page cache) the caller reaps right after the submit
        // (BlockDevice.submitAndReap), in the same loop turn, without an eventfd wake-up and read for it.
        e = io_uring_register_eventfd_async(&r->ring, event_fd);
        if (e < 0) { io_uring_queue_exit(&r->ring); return e; }
    }
    if (!(flags & IORING_SETUP_R_DISABLED)) return 0;
    // What io_uring_register_restrictions(3) and io_uring_enable_rings(3) do; Debian's liburing.so 2.3 does not
    // export those two (the debug build links it), so through its io_uring_register (returns -errno).
    unsigned fd = (unsigned)r->ring.ring_fd;
    e = io_uring_register(fd, IORING_REGISTER_RESTRICTIONS, lb_restrictions,
                          sizeof lb_restrictions / sizeof lb_restrictions[0]);
    if (e < 0) r->unrestricted = "IORING_REGISTER_RESTRICTIONS";
    else if ((e = io_uring_register(fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0)) < 0)
        r->unrestricted = "IORING_REGISTER_ENABLE_RINGS";
    if (e < 0) io_uring_queue_exit(&r->ring);
    return e;
}

int lb_uring_create(unsigned entries, int event_fd, struct lb_uring **out) {
    struct lb_uring *r = calloc(1, sizeof *r);
    if (!r) return -ENOMEM;
    int e = lb_uring_setup(r, entries, IORING_SETUP_R_DISABLED, event_fd);
    if (e == -EINVAL) {
        // Linux < 5.10 knows neither the flag nor the register ops (EINVAL): an unrestricted ring, reported by
        // lb_uring_unrestricted() for the caller's one warning. Any other error is the caller's to report.
        const char *why = r->unrestricted ? r->unrestricted : "IORING_SETUP_R_DISABLED";
        e = lb_uring_setup(r, entries, 0, event_fd);
        r->unrestricted = why;
    }
    if (e < 0) { free(r); return e; }
    *out = r;
    return 0;
}
const char *lb_uring_unrestricted(const struct lb_uring *r) { return r->unrestricted; }
void lb_uring_destroy(struct lb_uring *r) {
    if (!r) return;
    io_uring_queue_exit(&r->ring);
    free(r);
}
int lb_uring_readv(struct lb_uring *r, int fd, const void *iov, unsigned n, uint64_t off, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_readv(sqe, fd, (const struct iovec *)iov, n, off);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}
int lb_uring_writev(struct lb_uring *r, int fd, const void *iov, unsigned n, uint64_t off, int rw_flags,
                    uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_writev2(sqe, fd, (const struct iovec *)iov, n, off, rw_flags);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}
int lb_uring_fdatasync(struct lb_uring *r, int fd, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}
int lb_uring_submit(struct lb_uring *r) { return io_uring_submit(&r->ring); }
int lb_uring_reap(struct lb_uring *r, uint64_t *user_data, int32_t *res, int max) {
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&r->ring, head, cqe) {
        if ((int)n == max) break;
        user_data[n] = cqe->user_data;
        res[n] = cqe->res;
        n++;
    }
    io_uring_cq_advance(&r->ring, n);
    return (int)n;
}
int lb_uring_wait(struct lb_uring *r, uint64_t *user_data, int32_t *res) {
    struct io_uring_cqe *cqe = NULL;
    int e = io_uring_submit_and_wait(&r->ring, 1);
    if (e < 0 && e != -EINTR && e != -EAGAIN && e != -EBUSY) return e;
    e = io_uring_wait_cqe(&r->ring, &cqe);
    if (e < 0) return e;
    *user_data = cqe->user_data;
    *res = cqe->res;
    io_uring_cqe_seen(&r->ring, cqe);
    return 0;
}

int lb_uring_test_op(struct lb_uring *r, int opcode, int fd, const void *addr, unsigned len, uint64_t off,
                     uint32_t op_flags, uint8_t sqe_flags) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_rw(opcode, sqe, fd, addr, len, off);
    sqe->rw_flags = (__kernel_rwf_t)op_flags;
    sqe->flags = sqe_flags;
    io_uring_sqe_set_data64(sqe, 0x7e57);
    uint64_t data = 0;
    int32_t res = 0;
    int e = lb_uring_wait(r, &data, &res);
    return e < 0 ? e : res;
}
int lb_uring_test_register(struct lb_uring *r, unsigned opcode, const void *arg, unsigned nr_args) {
    return io_uring_register((unsigned)r->ring.ring_fd, opcode, arg, nr_args);
}
