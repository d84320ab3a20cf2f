// io_uring through liburing behind an opaque handle. Swift cannot import liburing.h next to Glibc: liburing.h
// defines _XOPEN_SOURCE, so its fd_set differs from SwiftGlibc's and the module merge fails. Linked statically.
#ifndef CURING_H
#define CURING_H
#include <stdint.h>

// io_uring (liburing) behind an opaque handle. `event_fd` (or -1) is signalled on every completion.
// Queue functions add one SQE and return 0, or -EBUSY when the submission queue is full; `iov` is a struct iovec
// array. All others return -errno on failure.
struct lb_uring;
// Restricted to the operations below (READV, WRITEV, FSYNC; no SQE flag; no register op once enabled) where the
// kernel can (Linux 5.10+); else unrestricted, and lb_uring_unrestricted names the step the kernel refused.
int lb_uring_create(unsigned entries, int event_fd, struct lb_uring **out);
const char *lb_uring_unrestricted(const struct lb_uring *r);
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
// Tests only: queue one SQE of any opcode (io_uring_prep_rw; op_flags into the rw_flags union, sqe_flags into
// flags), submit and wait for one completion: its result. And io_uring_register(2) on the ring: its result.
int lb_uring_test_op(struct lb_uring *r, int opcode, int fd, const void *addr, unsigned len, uint64_t off,
                     uint32_t op_flags, uint8_t sqe_flags);
int lb_uring_test_register(struct lb_uring *r, unsigned opcode, const void *arg, unsigned nr_args);
#endif
