/* engine.h: the blk worker's backing-store seam in C (engine.pxd declares it for Cython): one
 * request's I/O as an engine sees it, and the lock-free list an engine that completes on other
 * threads (librbd's) hands finished I/Os back to the queue's worker with.  Static inline only. */
#ifndef PYVHOST_ENGINE_H
#define PYVHOST_ENGINE_H
#include <stdint.h>
#include <poll.h>
#include <unistd.h>
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
    void *eng;              /* the engine's, while in flight */
    int pending;            /* the engine's: parts still in flight (NBD: one per segment) */
    int err;                /* the engine's: the first error of those parts */
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

/* The hand-off of an engine whose store completes on its own threads (librbd's, an NBD
 * connection's): completed I/Os on a stack, an eventfd the queue's worker polls, written once
 * per burst (when the stack was empty). */
typedef struct {
    int efd;                /* ours, non-blocking: a write never blocks */
    blk_io_t *done;         /* completed, not yet taken */
    blk_io_t *local;        /* taken, oldest first, not yet returned to the worker */
    uint64_t completed;
    uint64_t wakeups;
} blk_handoff_t;

/* Any thread: io is finished (io->res set). */
static inline void blk_handoff_complete(blk_handoff_t *h, blk_io_t *io) {
    uint64_t one = 1;
    __atomic_add_fetch(&h->completed, 1, __ATOMIC_RELAXED);
    if (blk_io_push(&h->done, io)) {
        __atomic_add_fetch(&h->wakeups, 1, __ATOMIC_RELAXED);
        if (write(h->efd, &one, 8) < 0) { /* EAGAIN: the counter is already non-zero */ }
    }
}

/* The worker: engine.pxd's reap on the hand-off.  wait: poll the eventfd up to a second first
 * (a store that is away stalls here; the framework's stop timeout bounds the stop). */
static inline int blk_handoff_reap(blk_handoff_t *h, blk_io_t **done, int max, int wait) {
    uint64_t v;
    int n = 0;
    if (h->local == 0) {
        if (wait && !blk_io_any(&h->done)) {
            struct pollfd p = { .fd = h->efd, .events = POLLIN, .revents = 0 };
            poll(&p, 1, 1000);
        }
        /* read the eventfd before taking: a completion pushed after the take finds the stack
         * empty and writes the eventfd again, so no wakeup is lost */
        if (read(h->efd, &v, 8) < 0) { /* EAGAIN: nothing signalled */ }
        h->local = blk_io_take_fifo(&h->done);
    }
    while (h->local && n < max) {
        done[n++] = h->local;
        h->local = h->local->next;
    }
    return n;
}

static inline int blk_handoff_ready(blk_handoff_t *h) {
    return h->local != 0 || blk_io_any(&h->done);
}

/* engine.pxd's reap / wait_fd / ready for an engine whose state struct starts with its
 * blk_handoff_t (rbd.pyx, nbd.pyx). */
static inline int blk_handoff_eng_reap(void *e, blk_io_t **done, int max, int wait) {
    return blk_handoff_reap((blk_handoff_t *)e, done, max, wait);
}
static inline int blk_handoff_eng_fd(void *e) { return ((blk_handoff_t *)e)->efd; }
static inline int blk_handoff_eng_ready(void *e) {
    return blk_handoff_ready((blk_handoff_t *)e);
}

static inline uint64_t blk_load_u64(uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
#endif
