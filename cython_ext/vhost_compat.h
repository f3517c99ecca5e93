/* vhost_compat.h: the few things Cython cannot say directly: memory barriers with the virtio
 * ordering rules (virtio 1.2 §2.7.13: the device reads avail->idx before the ring entries and
 * writes used entries before used->idx; a full barrier sits between publishing used->idx and
 * reading used_event/flags), and raw io_uring syscalls (no liburing build dependency).
 * Static inline only; no state. */
#ifndef PYVHOST_COMPAT_H
#define PYVHOST_COMPAT_H
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <time.h>
#include <linux/io_uring.h>

#ifndef PYVHOST_DEBUG
#define PYVHOST_DEBUG 0
#endif

static inline void vq_mb(void)  { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void vq_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void vq_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
static inline uint16_t vq_load_acquire_u16(const void *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}
static inline uint16_t vq_load_u16(const void *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}
static inline void vq_store_release_u16(void *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}
static inline void vq_store_u16(void *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
}
static inline uint32_t uq_load_acquire_u32(const void *p) {
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}
static inline void uq_store_release_u32(void *p, uint32_t v) {
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
}

/* Busy-poll pause: tells the core (and its SMT sibling) we are spinning. */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* Fail points (ring.pyx vq_failpoint): true on the n-th pass of any thread. */
static inline int fp_hit(int *count) {
    return __atomic_sub_fetch(count, 1, __ATOMIC_SEQ_CST) == 0;
}
static inline int load_flag(const int *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void store_flag(int *p, int v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* A count of threads using something outside its lock (net: an rx queue's call fd being
 * signalled after the queue lock was dropped); the owner waits for 0 before freeing it. */
static inline void users_enter(int *p) { __atomic_add_fetch(p, 1, __ATOMIC_ACQ_REL); }
static inline void users_leave(int *p) { __atomic_sub_fetch(p, 1, __ATOMIC_ACQ_REL); }
static inline int users_count(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

static inline uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Counters bumped by several worker threads (a switch port's rx side is written by every
 * sender): relaxed atomics, so no increment is lost. */
static inline void stat_add(uint64_t *counter, uint64_t n) {
    __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

/* Dirty log (vhost-user "Migration": one bit per 4 KiB guest page, bit p%8 of byte p/8): an
 * atomic OR, so several workers (and the frontend clearing bits) never lose a bit; release, so
 * the guest-memory writes it covers are visible before the frontend can see the bit and copy
 * the page (a bit seen first would let it send the old contents and clear the bit). */
static inline void log_or(uint8_t *p, uint8_t bit) {
    __atomic_fetch_or(p, bit, __ATOMIC_RELEASE);
}

/* The descriptor is copied out of guest memory once, so a guest rewriting it concurrently
 * cannot make us validate one value and use another. */
static inline void vq_copy16(void *dst, const void *src) {
    memcpy(dst, src, 16);
}

static inline int sys_io_uring_setup(unsigned entries, struct io_uring_params *p) {
#ifdef __NR_io_uring_setup
    return (int)syscall(__NR_io_uring_setup, entries, p);
#else
    (void)entries; (void)p; return -1;
#endif
}
static inline int sys_io_uring_enter(int fd, unsigned to_submit, unsigned min_complete,
                                     unsigned flags) {
#ifdef __NR_io_uring_enter
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
#else
    (void)fd; (void)to_submit; (void)min_complete; (void)flags; return -1;
#endif
}
#endif
