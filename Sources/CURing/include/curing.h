// io_uring through liburing behind an opaque handle. Swift cannot import liburing.h next to Glibc: liburing.h
// defines _XOPEN_SOURCE, so its fd_set differs from SwiftGlibc's and the module merge fails. Linked statically.
#ifndef CURING_H
#define CURING_H
#include <stdint.h>

// io_uring (liburing) behind an opaque handle. `event_fd` (or -1) is signalled on every completion.
// Queue functions add one SQE and return 0, or -EBUSY when the submission queue is full; `iov` is a struct iovec
// array. All others return -errno on failure.
struct lb_uring;
int lb_uring_create(unsigned entries, int event_fd, struct lb_uring **out);
void lb_uring_destroy(struct lb_uring *r);
int lb_uring_readv(struct lb_uring *r, int fd, const void *iov, unsigned n, uint64_t off, uint64_t user_data);
int lb_uring_writev(struct lb_uring *r, int fd, const void *iov, unsigned n, uint64_t off, int rw_flags,
                    uint64_t user_data);
int lb_uring_fdatasync(struct lb_uring *r, int fd, uint64_t user_data);
// Passes queued SQEs to the kernel; returns how many.
int lb_uring_submit(struct lb_uring *r);
// Consumes up to `max` ready completions into the arrays; returns the count (never blocks).
int lb_uring_reap(struct lb_uring *r, uint64_t *user_data, int32_t *res, int max);
// Submits queued SQEs, then blocks until one completion is ready and consumes it.
int lb_uring_wait(struct lb_uring *r, uint64_t *user_data, int32_t *res);
#endif
