#include "curing.h"
#include <errno.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <liburing.h>

struct lb_uring { struct io_uring ring; };

int lb_uring_create(unsigned entries, int event_fd, struct lb_uring **out) {
    struct lb_uring *r = calloc(1, sizeof *r);
    if (!r) return -ENOMEM;
    int e = io_uring_queue_init(entries, &r->ring, 0);
    if (e < 0) { free(r); return e; }
    if (event_fd >= 0) {
        // "async": the eventfd signals only completions posted after io_uring_enter returned. What io_uring
        // completes inline while submitting (a read from the page cache) the caller reaps right after the submit
        // (BlockDevice.submitAndReap), in the same loop turn, without an eventfd wake-up and read for it.
        e = io_uring_register_eventfd_async(&r->ring, event_fd);
        if (e < 0) { io_uring_queue_exit(&r->ring); free(r); return e; }
    }
    *out = r;
    return 0;
}
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
