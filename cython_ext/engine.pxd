# engine.pxd: the backing-store seam of the blk worker (blk.pyx).  The worker owns the virtio-blk
# request semantics (parse, validate, status, used ring); an engine owns getting the bytes to
# and from a store: a file through io_uring or preadv/pwritev, nothing (null), a Ceph RBD image
# (rbd.pyx), an NBD export.  One engine instance per queue worker, driven only by that worker's
# thread, GIL released; an engine may complete on other threads (librbd's) only through its own
# hand-off to the worker (rbd.pyx).  Declarations; engine.pyx holds the base class.
from posix.uio cimport iovec
from libc.stdint cimport uint64_t
from libc.errno cimport errno
from cython_ext.posix_io cimport eventfd, EFD_CLOEXEC, EFD_NONBLOCK

cdef enum:
    IO_READ = 1              # into the iovecs (guest memory)
    IO_WRITE = 2             # from the iovecs
    IO_FLUSH = 3             # everything completed before is stable
    IO_DISCARD = 4           # the range may be deallocated; its contents become unspecified
    IO_WRITE_ZEROES = 5      # the range reads as zeroes afterwards
    IO_F_FUA = 1             # write: stable when it completes (the guest chose write-through)
    IO_F_UNMAP = 2           # write zeroes: the store may deallocate the range

# One request's I/O, embedded in the worker's slot (a C struct: engine.h, so that the hand-off
# list can be written in C).  The engine reads op..nbytes and writes res (bytes transferred
# for READ/WRITE, 0 for the others, -errno on failure); `next` and `state` are the engine's own
# while the I/O is in flight.
cdef extern from "engine.h" nogil:
    ctypedef struct blk_io_t:
        int op
        int flags
        iovec *iov
        int niov
        uint64_t offset
        uint64_t nbytes
        long res
        blk_io_t *next
        long state
        void *eng
        int pending
        int err
    int blk_io_push(blk_io_t **head, blk_io_t *io)
    blk_io_t *blk_io_take_fifo(blk_io_t **head)
    int blk_io_any(blk_io_t **head)
    # the hand-off of engines that complete on other threads (engine.h)
    ctypedef struct blk_handoff_t:
        int efd
        blk_io_t *done
        blk_io_t *local
        uint64_t completed
        uint64_t wakeups
    void blk_handoff_complete(blk_handoff_t *h, blk_io_t *io)
    int blk_handoff_reap(blk_handoff_t *h, blk_io_t **done, int max, int wait)
    int blk_handoff_ready(blk_handoff_t *h)
    int blk_handoff_eng_reap(void *e, blk_io_t **done, int max, bint wait)
    int blk_handoff_eng_fd(void *e)
    int blk_handoff_eng_ready(void *e)
    uint64_t blk_load_u64(uint64_t *p)

# submit: 1 = completed now (res set), 0 = queued (comes back from reap), < 0 = refused now
#         (-errno; nothing is in flight).
# kick:   the batch is queued: hand it to the store (one syscall per batch).
# reap:   up to `max` completed I/Os into done[]; wait != 0: block until at least one completes
#         (used only to drain at stop: never returns 0 while I/O is in flight unless the store
#         errs, in which case it pauses and the caller retries).
# wait_fd: an fd that becomes readable when reap has something (-1: none).
# ready:  reap would return something now (the worker's busy-poll window).
ctypedef int (*eng_submit_fn)(void *e, blk_io_t *io) noexcept nogil
ctypedef int (*eng_kick_fn)(void *e) noexcept nogil
ctypedef int (*eng_reap_fn)(void *e, blk_io_t **done, int max, bint wait) noexcept nogil
ctypedef int (*eng_fd_fn)(void *e) noexcept nogil

ctypedef struct blk_engine_t:
    void *e
    eng_submit_fn submit
    eng_kick_fn kick
    eng_reap_fn reap
    eng_fd_fn wait_fd
    eng_fd_fn ready

cdef class QueueEngine:
    """One queue's engine; subclasses fill `eng` (and keep what it points to alive)."""
    cdef blk_engine_t eng
    cdef readonly str kind


cdef inline int handoff_engine_init(blk_engine_t *eng, void *state, blk_handoff_t *hand,
                                    eng_submit_fn submit, eng_kick_fn kick) except -1:
    """Fill `eng` for an engine whose `state` struct starts with its hand-off `hand`
    (rbd.pyx, nbd.pyx): the hand-off's eventfd, and the shared reap / wait_fd / ready."""
    hand.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if hand.efd < 0:
        raise OSError(errno, "eventfd")
    eng.e = state
    eng.submit = submit
    eng.kick = kick
    eng.reap = blk_handoff_eng_reap
    eng.wait_fd = blk_handoff_eng_fd
    eng.ready = blk_handoff_eng_ready
    return 0
