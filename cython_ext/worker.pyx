# cython: language_level=3
"""worker.pyx: the queue-worker runtime, the loop every device worker thread runs (blk, net, rng),
written once.

Owns: the stop eventfd and stop flag; the sleep protocol of virtio 1.2 §2.7.10 (notifications
are enabled only while the worker is about to sleep, then the avail rings are re-checked, and
only an empty re-check lets it sleep; they are disabled again on every wake-up); the adaptive
poll window; the poll(2) wait on stop + kick fds + the device's extra fds (io_uring, tap, a
borrowed rx queue's kick), with a 1 ms timeout while a watched kick fd is -1 (VRING_NOFD);
draining kick eventfds and counting kicks; the one-time call-fd signal at start; rate-limited
fault logging; the COUNTER_KEYS dict (vhost/device.py) of a one-queue worker.
Must not: know any device (no virtio-blk/net/rng semantics, no special cases: a device speaks
only through wk_ops_t), pop or push ring entries, create Python objects on the data path (the
GIL is taken only to log a fault, rate-limited), or call a hook per request (hooks are per batch
or per sleep; the batch function loops over requests itself).
"""
import logging

from libc.stdint cimport uint64_t
from libc.errno cimport errno, EINTR
from libc.string cimport memset
from posix.unistd cimport read, write, close

from cython_ext.ring cimport *
from cython_ext.posix_io cimport *

cdef extern from "vhost_compat.h" nogil:
    void cpu_relax()
    uint64_t mono_ns()
    int load_flag(const int *p)


cdef int wk_init(wk_t *rt, const wk_ops_t *ops, void *dev, double poll_us,
                 bint signal_call) noexcept nogil:
    """Zero rt and make its stop eventfd.  0 or -errno."""
    memset(rt, 0, sizeof(wk_t))
    rt.ops = ops
    rt.dev = dev
    rt.signal_call = signal_call
    rt.poll_ns = <uint64_t>(poll_us * 1000) if poll_us > 0 else 0
    rt.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    if rt.stop_fd < 0:
        return -errno
    return 0


cdef int wk_add_queue(wk_t *rt, vq_t *vq, int kick_fd) noexcept nogil:
    """Register a virtqueue this worker alone serves, with its kick fd (-1: VRING_NOFD)."""
    if rt.nvqs >= WK_MAX_VQS:
        return -1
    rt.vqs[rt.nvqs] = vq
    rt.kick_fds[rt.nvqs] = kick_fd
    rt.nvqs += 1
    return 0


cdef void wk_signal(int call_fd) noexcept nogil:
    """Signal a call fd once (lost-interrupt recovery after a reconnect: used entries published
    before the frontend's new call fd existed would otherwise never be noticed)."""
    cdef uint64_t one = 1
    if call_fd >= 0:
        write(call_fd, &one, 8)


cdef void wk_drain_eventfd(int fd) noexcept nogil:
    """Consume a kick: one read empties an eventfd; a pipe (the protocol accepts both) may
    hold many kicks' bytes, so read more than 8 at once (non-blocking: never waits)."""
    cdef uint64_t v[32]
    if fd >= 0:
        read(fd, v, sizeof(v))


cdef void wk_stop(wk_t *rt) noexcept nogil:
    cdef uint64_t one = 1
    rt.stop_flag = 1
    if rt.stop_fd >= 0:
        write(rt.stop_fd, &one, 8)


cdef void wk_close(wk_t *rt) noexcept nogil:
    if rt.stop_fd >= 0:
        close(rt.stop_fd)
        rt.stop_fd = -1


cdef void wk_note_fault(const wk_log_t *lg, vq_t *vq, int qindex, int code) noexcept nogil:
    """Count a fault on vq; log it the first time and then at every power of two from 1024 so a
    hostile guest cannot flood the log (or buy the GIL per request)."""
    cdef uint64_t n
    if code != F_AVAIL:          # vq_pop already counted a corrupt avail ring
        vq.faults[code] += 1
    n = vq.faults[code]
    if n == 1 or (n >= 1024 and (n & (n - 1)) == 0):
        with gil:
            from cython_ext.ring import FAULT_NAMES
            (<object>lg.logger).warning("queue %d: %s: %s (%d so far)", qindex,
                                        lg.what.decode(), FAULT_NAMES.get(code, code), n)


cdef dict wk_counters(vq_t *vq, uint64_t requests, uint64_t bytes_read, uint64_t bytes_written,
                      uint64_t errors, uint64_t inflight, uint64_t dropped):
    """One virtqueue in the vocabulary of vhost.device.COUNTER_KEYS (meanings:
    Device.queue_counters); kicks, notifications and broken come from the ring itself."""
    return dict(requests=requests, bytes_read=bytes_read, bytes_written=bytes_written,
                errors=errors, inflight=inflight, kicks=vq.kicks, notifications=vq.notifies,
                dropped=dropped, broken=int(vq.broken))


# --- the loop -------------------------------------------------------------------------------------

cdef bint poll_window(wk_t *rt) noexcept nogil:
    """Spin up to rt.poll_ns for new avail entries (or the device's pending work).  Cloud
    Hypervisor and QEMU's IOThreads do the same: at low queue depth this saves a kick plus a
    wakeup per request.  Kicks stay disabled meanwhile."""
    cdef uint64_t end = mono_ns() + rt.poll_ns
    cdef int k, q, r
    cdef bint live = False
    for q in range(rt.nvqs):
        if not rt.vqs[q].broken:
            live = True
    if not live:
        return False
    if rt.ops.pending != NULL and rt.ops.pending(rt.dev) < 0:
        return False
    while True:
        for k in range(64):
            for q in range(rt.nvqs):
                if not rt.vqs[q].broken and vq_avail_count(rt.vqs[q]):
                    return True
            if rt.ops.pending != NULL:
                r = rt.ops.pending(rt.dev)
                if r > 0:
                    return True
                if r < 0:
                    return False
            if load_flag(&rt.stop_flag):
                return False
            cpu_relax()
        if mono_ns() >= end:
            return False


cdef inline bint src_live(wk_src_t *s) noexcept nogil:
    return s.live == NULL or s.live[0]


cdef bint src_enable(wk_src_t *s) noexcept nogil:
    """Enable a borrowed queue's kicks (under its lock, only while attached); True if its avail
    ring is not empty after enabling."""
    cdef bint r = False
    if s.lock != NULL:
        pthread_mutex_lock(s.lock)
    if src_live(s):
        r = vq_enable_kick(s.vq)
    if s.lock != NULL:
        pthread_mutex_unlock(s.lock)
    return r


cdef void src_disable(wk_src_t *s, bint kicked) noexcept nogil:
    if s.lock != NULL:
        pthread_mutex_lock(s.lock)
    if src_live(s):
        if kicked:
            s.vq.kicks += 1
        vq_disable_kick(s.vq)
    if s.lock != NULL:
        pthread_mutex_unlock(s.lock)


cdef bint arm(wk_t *rt, wk_wait_t *w) noexcept nogil:
    """§2.7.10: enable notifications on every queue we will sleep on, then re-check the avail
    rings; a driver that added buffers before seeing the flag did not kick, so sleeping now
    would strand them.  True (everything disabled again) if work showed up."""
    cdef int q, k, nq = 0, ns = 0
    cdef bint found = False
    if not w.hold_queues:
        for q in range(rt.nvqs):
            if rt.vqs[q].broken:
                continue
            nq = q + 1
            if vq_enable_kick(rt.vqs[q]):
                found = True
                break
    if not found:
        for k in range(w.n):
            if w.src[k].vq != NULL:
                ns = k + 1
                if src_enable(&w.src[k]):
                    found = True
                    break
    if found:
        for q in range(nq):
            if not rt.vqs[q].broken:
                vq_disable_kick(rt.vqs[q])
        for k in range(ns):
            if w.src[k].vq != NULL:
                src_disable(&w.src[k], False)
    return found


cdef void wk_run(wk_t *rt) noexcept nogil:
    """The thread body: batches while there is work, then poll window, arm + re-check, sleep.
    Returns after stop() (or a poll(2) error), once the device's at_stop hook has run."""
    cdef pollfd fds[1 + WK_MAX_VQS + WK_MAX_SRCS]
    cdef int owned[WK_MAX_VQS]
    cdef int extra[WK_MAX_SRCS]
    cdef wk_wait_t w
    cdef int nfds, r, q, k, timeout, work
    cdef bint nofd
    if rt.signal_call:
        for q in range(rt.nvqs):
            wk_signal(rt.vqs[q].call_fd)
    for q in range(rt.nvqs):
        vq_disable_kick(rt.vqs[q])
    while True:
        work = rt.ops.batch(rt.dev)
        # Stop after any batch, not only once poll(2) sees the stop fd: a ring that never runs
        # dry (a busy guest; avail and used rings at one address, so that each used entry
        # makes another chain available; a used->flags that is the avail index, so that arming
        # always "finds" work the next batch does not) would otherwise never let the worker
        # reach poll(2), and the worker could not be stopped.
        if load_flag(&rt.stop_flag):
            break
        if work > 0:
            continue
        if rt.poll_ns and poll_window(rt):
            rt.poll_hits += 1
            continue
        w.n = 0
        w.timeout_ms = -1
        w.hold_queues = False
        if rt.ops.prepare_wait != NULL:
            rt.ops.prepare_wait(rt.dev, &w)
        if arm(rt, &w):
            continue
        fds[0].fd = rt.stop_fd
        fds[0].events = POLLIN
        fds[0].revents = 0
        nfds = 1
        nofd = False
        for q in range(rt.nvqs):
            owned[q] = -1
            if w.hold_queues:
                continue
            # a broken queue's kicks are still drained (or they would wake us forever)
            owned[q] = nfds
            fds[nfds].fd = rt.kick_fds[q]
            fds[nfds].events = POLLIN
            fds[nfds].revents = 0
            nfds += 1
            if rt.kick_fds[q] < 0:
                nofd = True
        for k in range(w.n):
            extra[k] = nfds
            fds[nfds].fd = w.src[k].fd
            fds[nfds].events = POLLIN
            fds[nfds].revents = 0
            nfds += 1
            if w.src[k].vq != NULL and w.src[k].fd < 0:
                nofd = True
        # A kick fd of -1 (VRING_NOFD: the frontend wants us to poll) is ignored by poll();
        # a 1 ms timeout keeps such a ring polled.
        timeout = w.timeout_ms
        if nofd and (timeout < 0 or timeout > 1):
            timeout = 1
        rt.sleeps += 1
        r = poll(fds, nfds, timeout)
        if r < 0 and errno != EINTR:
            break
        if fds[0].revents:
            break
        for q in range(rt.nvqs):
            if owned[q] >= 0 and fds[owned[q]].revents:
                wk_drain_eventfd(rt.kick_fds[q])
                rt.vqs[q].kicks += 1
            if not w.hold_queues and not rt.vqs[q].broken:
                vq_disable_kick(rt.vqs[q])
        for k in range(w.n):
            if w.src[k].vq != NULL:
                if fds[extra[k]].revents:
                    wk_drain_eventfd(w.src[k].fd)
                src_disable(&w.src[k], fds[extra[k]].revents != 0)
    if rt.ops.at_stop != NULL:
        rt.ops.at_stop(rt.dev)
