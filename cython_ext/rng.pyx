# cython: language_level=3
"""rng.pyx: the virtio-rng queue worker (virtio 1.2 §5.4), one thread for the device's single
requestq, GIL released for its whole life, on the worker.pyx runtime.

Owns: filling the driver's device-writable buffers with getrandom(2) straight into the chain's
translated iovecs (zero copy), used length = bytes written (§5.4.6.2), failing a bad chain alone
(used length 0, fault counted, logged rate-limited: a readable descriptor, a bad address, a loop,
a bad indirect table, a zero-length buffer), and QEMU's rate limit (virtio-rng `max-bytes` per
`period` ms: once the quota is spent the worker stops popping and sleeps until the period ends,
still reacting to stop; a request may be partly filled with what is left of the quota, as QEMU
does).  Must not: create Python objects per request (Python is entered only to log a fault,
rate-limited), fail requests because of the rate limit, block anywhere but poll(2) (getrandom
without GRND_RANDOM does not block once the pool is initialised), or touch memory outside the
region table (all buffers come from ring.pyx's checked segments).  The loop, kicks, stop and
notification suppression are the runtime's.
"""
import logging

from libc.stdint cimport uint8_t, uint32_t, uint64_t, UINT32_MAX, UINT64_MAX
from libc.stdlib cimport calloc, free
from libc.errno cimport errno, EINTR

from cython_ext.ring cimport *
from cython_ext.worker cimport *

log = logging.getLogger("pyvhost.rng")

cdef extern from "<sys/random.h>" nogil:
    ssize_t getrandom(void *buf, size_t buflen, unsigned int flags)

cdef extern from "vhost_compat.h" nogil:
    uint64_t mono_ns()

cdef enum:
    # requests per batch before publishing used entries (and giving the loop a turn)
    BATCH = 256

ctypedef struct rng_ctx_t:
    wk_t rt                      # the runtime: loop, stop, kicks, poll window (worker.pyx)
    vq_t vq
    chain_t chain
    int index
    bint broken_noted            # the corrupt avail ring was logged once
    uint64_t pending_used        # pushed but not yet published
    uint64_t max_bytes           # quota per period (0: unlimited)
    uint64_t period_ns
    uint64_t period_start        # mono_ns of the current period's first use
    uint64_t period_used         # bytes given in the current period
    bint throttled               # the quota is spent: waiting for the period to end
    uint64_t failed              # requests returned with used length 0 (bad chains)
    uint64_t bytes               # entropy bytes written into guest buffers
    uint64_t throttled_waits     # times the quota ran out with requests waiting


cdef wk_log_t RNG_LOG
RNG_LOG.logger = <void *>log
RNG_LOG.what = b"request failed"


cdef inline void note_fault(rng_ctx_t *ctx, int code) noexcept nogil:
    wk_note_fault(&RNG_LOG, &ctx.vq, ctx.index, code)


cdef uint64_t quota_left(rng_ctx_t *ctx) noexcept nogil:
    """Bytes we may still give in this period.  A period starts at the first use after the
    previous one ended (QEMU arms its period timer the same way)."""
    cdef uint64_t now
    if ctx.max_bytes == 0:
        return UINT64_MAX
    now = mono_ns()
    if now - ctx.period_start >= ctx.period_ns:
        ctx.period_start = now
        ctx.period_used = 0
        ctx.throttled = False
    return ctx.max_bytes - ctx.period_used if ctx.period_used < ctx.max_bytes else 0


cdef size_t fill(void *buf, size_t n) noexcept nogil:
    """getrandom(2) into buf; bytes written (short only on an error other than EINTR)."""
    cdef size_t done = 0
    cdef ssize_t r
    while done < n:
        r = getrandom(<uint8_t *>buf + done, n - done, 0)
        if r < 0:
            if errno == EINTR:
                continue
            break
        done += r
    return done


cdef void serve(rng_ctx_t *ctx, uint64_t quota) noexcept nogil:
    """Fill the popped chain (up to quota bytes) and push it; a bad chain is returned empty."""
    cdef chain_t *c = &ctx.chain
    cdef int code = c.fault, k
    cdef uint64_t want = c.total_len, written = 0
    cdef size_t n, got
    if code == F_NONE and (c.nreadable != 0 or c.total_len == 0):
        code = F_REQUEST              # §5.4.6.1: the driver posts device-writable buffers only
    if code != F_NONE:
        note_fault(ctx, code)
        ctx.failed += 1
        vq_push(&ctx.vq, c.head, 0)
        ctx.pending_used += 1
        return
    if want > quota:
        want = quota
    if want > UINT32_MAX:            # the used length is a le32
        want = UINT32_MAX
    for k in range(c.nsegs):
        if written == want:
            break
        n = c.segs[k].iov_len
        if n > want - written:
            n = want - written
        got = fill(c.segs[k].iov_base, n)
        written += got
        if got < n:
            note_fault(ctx, F_IO)
            break
    ctx.bytes += written
    ctx.period_used += written
    if ctx.vq.log != NULL:
        vq_log_chain(&ctx.vq, c, written)
    vq_push(&ctx.vq, c.head, <uint32_t>written)
    ctx.pending_used += 1


cdef int rng_batch(void *dev) noexcept nogil:
    """Serve up to BATCH requests within the quota, publish + notify once.  Returns popped."""
    cdef rng_ctx_t *ctx = <rng_ctx_t *>dev
    cdef int n = 0, r
    cdef uint64_t quota
    while n < BATCH and not ctx.vq.broken:
        quota = quota_left(ctx)
        if quota == 0:
            if vq_avail_count(&ctx.vq) and not ctx.throttled:
                ctx.throttled = True
                ctx.throttled_waits += 1
            break
        r = vq_pop(&ctx.vq, &ctx.chain)
        if r == 0:
            break
        if r < 0:
            if not ctx.broken_noted:
                note_fault(ctx, F_AVAIL)
                ctx.broken_noted = True
            break
        n += 1
        serve(ctx, quota)
    if ctx.pending_used:
        vq_publish(&ctx.vq)
        vq_notify(&ctx.vq)
        ctx.pending_used = 0
    return n


cdef int rng_pending(void *dev) noexcept nogil:
    """No polling while throttled: the avail ring is not empty, but we will not take it."""
    return -1 if (<rng_ctx_t *>dev).throttled else 0


cdef void rng_prepare_wait(void *dev, wk_wait_t *w) noexcept nogil:
    """Throttled: sleep until the period ends (stop still wakes us), ignoring the queue."""
    cdef rng_ctx_t *ctx = <rng_ctx_t *>dev
    cdef uint64_t now, end
    if not ctx.throttled:
        return
    now = mono_ns()
    end = ctx.period_start + ctx.period_ns
    w.hold_queues = True
    w.timeout_ms = <int>((end - now + 999999) // 1000000) if end > now else 0


cdef wk_ops_t RNG_OPS
RNG_OPS.batch = rng_batch
RNG_OPS.pending = rng_pending
RNG_OPS.prepare_wait = rng_prepare_wait
RNG_OPS.at_stop = NULL


cdef class RngQueueWorker:
    """The virtio-rng requestq.  `run()` is the thread body (GIL released), `stop()` makes it
    return, `run_until_idle()` serves what the ring holds now (tests)."""
    cdef rng_ctx_t *ctx
    cdef readonly int index
    cdef bytes _keep_table

    def __cinit__(self, int index, int num, uint64_t desc, uint64_t avail, uint64_t used,
                  uint32_t last_avail, bytes region_table, int kick_fd, int call_fd,
                  bint event_idx=False, bint indirect=True, bint signal_call=False,
                  double poll_us=0, uint64_t max_bytes=0, uint64_t period_ms=1000,
                  log=None, bint packed=False):
        cdef const unsigned char *t = region_table
        cdef int r
        if len(region_table) % sizeof(mem_region_t):
            raise ValueError("bad region table")
        if max_bytes and period_ms == 0:
            raise ValueError("period_ms must be > 0 with max_bytes")
        self.ctx = <rng_ctx_t *>calloc(1, sizeof(rng_ctx_t))
        if self.ctx == NULL:
            raise MemoryError()
        self.ctx.rt.stop_fd = -1
        self.index = index
        ctx = self.ctx
        if vq_init(&ctx.vq, num, desc, avail, used, last_avail, event_idx, indirect, call_fd,
                   <const mem_region_t *>t, len(region_table) // sizeof(mem_region_t),
                   packed) != 0:
            raise ValueError(f"bad queue size {num} or base {last_avail:#x}")
        vq_log_setup(&ctx.vq, log)
        ctx.index = index
        ctx.max_bytes = max_bytes
        ctx.period_ns = period_ms * 1000000
        ctx.period_start = mono_ns()
        r = wk_init(&ctx.rt, &RNG_OPS, ctx, poll_us, signal_call)
        if r < 0:
            raise OSError(-r, "eventfd")
        wk_add_queue(&ctx.rt, &ctx.vq, kick_fd)
        self._keep_table = region_table

    def __dealloc__(self):
        if self.ctx != NULL:
            wk_close(&self.ctx.rt)
            vq_free(&self.ctx.vq)
            free(self.ctx)
            self.ctx = NULL

    def run(self):
        """Thread body: serve the queue until stop()."""
        with nogil:
            wk_run(&self.ctx.rt)

    def run_until_idle(self):
        """Test hook: serve what is on the ring now (as far as the quota allows), publish,
        return the number of requests taken."""
        cdef int r, total = 0
        with nogil:
            while True:
                r = rng_batch(self.ctx)
                total += r
                if r <= 0:
                    break
        return total

    def stop(self):
        wk_stop(&self.ctx.rt)

    def close(self):
        """Release the stop eventfd now (the worker thread has returned)."""
        wk_close(&self.ctx.rt)

    @property
    def last_avail(self):
        """Where the queue is (GET_VRING_BASE's value; packed: positions and wrap counters)."""
        return vq_base(&self.ctx.vq)

    @property
    def broken(self):
        return bool(self.ctx.vq.broken)

    def stats(self):
        """Counters since the worker was built (written by the worker thread without locks; a
        value read from another thread may be one request stale).  completed: requests returned
        in the used ring; failed: of those, returned empty (bad chains); bytes: entropy given;
        throttled_waits: times the quota ran out with requests waiting; throttled: waiting for
        the period to end now."""
        from cython_ext.ring import FAULT_NAMES
        c = self.ctx
        return dict(
            completed=c.vq.completed, failed=c.failed, bytes=c.bytes,
            throttled_waits=c.throttled_waits, throttled=bool(c.throttled),
            avail_corrupt=c.vq.faults[F_AVAIL], notifies=c.vq.notifies, kicks=c.vq.kicks,
            poll_hits=c.rt.poll_hits, sleeps=c.rt.sleeps, broken=bool(c.vq.broken),
            last_avail=vq_base(&c.vq),
            faults={FAULT_NAMES[k]: c.vq.faults[k] for k in range(1, NUM_FAULTS)
                    if c.vq.faults[k]})

    def counters(self):
        """The requestq in the vocabulary of vhost.device.COUNTER_KEYS: requests = completed
        (failed included), bytes_written = entropy bytes given to the guest, bytes_read = 0,
        errors = failed + 1 per corrupt avail ring, inflight = 0 (synchronous), dropped = 0."""
        c = self.ctx
        return wk_counters(&c.vq, c.vq.completed, 0, c.bytes,
                           c.failed + c.vq.faults[F_AVAIL], 0, 0)
