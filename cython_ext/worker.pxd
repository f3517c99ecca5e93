# worker.pxd: the queue-worker runtime's C interface (worker.pyx), cimported by the device
# workers (blk.pyx, net.pyx, rng.pyx).  A device embeds a wk_t, registers the virtqueues it owns
# and fills a wk_ops_t with its per-batch function and a few hooks; wk_run is its thread body.
from libc.stdint cimport uint64_t
from cython_ext.ring cimport vq_t

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef enum:
    WK_MAX_VQS = 4           # virtqueues one worker owns (blk/rng: 1, net: its tx queue)
    WK_MAX_SRCS = 4          # extra wait sources a device adds per sleep

# One extra thing to wait on, added by the device for one sleep (wk_ops_t.prepare_wait).
# vq == NULL: a plain readiness fd (a tap, an io_uring); the device's next batch handles it.
# vq != NULL: a kick eventfd for a virtqueue this worker does not own (net's rx queue): armed
# and re-checked like an owned queue, under `lock` when given, and only while `*live` is true
# when given (the queue may be detached by another thread: its rings are then gone).
ctypedef struct wk_src_t:
    int fd
    vq_t *vq
    pthread_mutex_t *lock
    const int *live

ctypedef struct wk_wait_t:
    wk_src_t src[WK_MAX_SRCS]
    int n
    int timeout_ms           # -1: none (the runtime uses 1 ms when a polled kick fd is -1)
    bint hold_queues         # the device will not take work now (rate limit): neither arm
                             # nor watch the owned queues' kicks this sleep

# Hooks, all called on the worker thread with the GIL released, once per batch or per sleep.
ctypedef int (*wk_batch_fn)(void *dev) noexcept nogil
ctypedef int (*wk_pending_fn)(void *dev) noexcept nogil
ctypedef void (*wk_prepare_fn)(void *dev, wk_wait_t *w) noexcept nogil
ctypedef void (*wk_stop_fn)(void *dev) noexcept nogil

ctypedef struct wk_ops_t:
    # one batch of work; > 0: more may be waiting, run again at once; 0: idle, may sleep
    wk_batch_fn batch
    # poll window: > 0 work beyond the owned queues' avail rings is ready (io_uring CQ),
    # 0 none, < 0 do not poll now (broken, throttled).  NULL: only the avail rings are watched.
    wk_pending_fn pending
    # before each sleep: add wait sources, a timeout, or hold the owned queues.  NULL: none.
    wk_prepare_fn prepare_wait
    # after the loop ends (stop or a poll(2) error): finish in-flight work.  NULL: none.
    wk_stop_fn at_stop

# Where a device's faults are logged: its logger and what a failed request is called.
ctypedef struct wk_log_t:
    void *logger             # a module-level logging.Logger (alive as long as the module)
    const char *what         # "request failed", "frame dropped"

ctypedef struct wk_t:
    const wk_ops_t *ops
    void *dev
    int stop_fd              # eventfd: stop() wakes a sleeping worker
    int stop_flag            # stop() ends a polling window without a syscall
    bint signal_call         # signal every owned queue's call fd once at start
    uint64_t poll_ns         # adaptive polling window after work (0: sleep at once)
    uint64_t poll_hits       # work found while polling (a sleep + wakeup saved)
    uint64_t sleeps          # poll(2) calls
    int nvqs
    vq_t *vqs[WK_MAX_VQS]
    int kick_fds[WK_MAX_VQS]

cdef int wk_init(wk_t *rt, const wk_ops_t *ops, void *dev, double poll_us,
                 bint signal_call) noexcept nogil
cdef int wk_add_queue(wk_t *rt, vq_t *vq, int kick_fd) noexcept nogil
cdef void wk_run(wk_t *rt) noexcept nogil
cdef void wk_stop(wk_t *rt) noexcept nogil
cdef void wk_close(wk_t *rt) noexcept nogil
cdef void wk_signal(int call_fd) noexcept nogil
cdef void wk_drain_eventfd(int fd) noexcept nogil
cdef void wk_note_fault(const wk_log_t *lg, vq_t *vq, int qindex, int code) noexcept nogil
cdef dict wk_counters(vq_t *vq, uint64_t requests, uint64_t bytes_read, uint64_t bytes_written,
                      uint64_t errors, uint64_t inflight, uint64_t dropped)
