// Test-only: counts heap allocations in the test executable (its malloc/calloc/realloc interpose glibc's and
// forward to __libc_*), so a test can assert that a hot path allocates nothing per request.
#ifndef MALLOC_COUNTER_H
#define MALLOC_COUNTER_H
#include <stdint.h>
void lb_malloc_count_start(void);
uint64_t lb_malloc_count_stop(void);
#endif
