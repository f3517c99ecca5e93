/* engine.h: the blk worker's backing-store seam in C (engine.pxd declares it for Cython): one
 * request's I/O as an engine sees it, and the lock-free list an engine that completes on other
 * threads (librbd's) hands finished I/Os back to the queue's worker with.  Static inline only. */
#ifndef PYVHOST_ENGINE_H
#define PYVHOST_ENGINE_H
#include <stdint.h>
#include <sys/uio.h>

typedef struct blk_io {
    int op;                 /* IO_READ ... (engine.pxd) */
    int flags;              /* IO_F_FUA, IO_F_UNMAP */
    struct iovec *iov;      /* guest memory, checked by ring.pyx */
    int niov;
    uint64_t offset;        /* bytes */
    uint64_t nbytes;
    long res;               /* bytes transferred (READ/WRITE) or 0; -errno */
    struct blk_io *next;    /* the engine's, while in flight */
    long state;             /* the engine's, while in flight */
} blk_io_t;

/* Push onto a Treiber stack from any thread; true if the stack was empty (the pusher then wakes
 * the consumer: one wakeup per burst, not per I/O). */
static inline int blk_io_push(blk_io_t **head, blk_io_t *io) {
    blk_io_t *old = __atomic_load_n(head, __ATOMIC_RELAXED);
    do {
        io->next = old;
    } while (!__atomic_compare_exchange_n(head, &old, io, 1, __ATOMIC_RELEASE,
                                          __ATOMIC_RELAXED));
    return old == NULL;
}

/* Take the whole stack (the consumer, one thread), oldest first. */
static inline blk_io_t *blk_io_take_fifo(blk_io_t **head) {
    blk_io_t *lifo = __atomic_exchange_n(head, (blk_io_t *)0, __ATOMIC_ACQUIRE), *fifo = 0, *n;
    while (lifo) {
        n = lifo->next;
        lifo->next = fifo;
        fifo = lifo;
        lifo = n;
    }
    return fifo;
}

static inline int blk_io_any(blk_io_t **head) {
    return __atomic_load_n(head, __ATOMIC_ACQUIRE) != 0;
}
#endif
