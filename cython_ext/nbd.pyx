# cython: language_level=3
"""nbd.pyx: the NBD engine of the blk worker (engine.pxd), through libnbd (the client library the
virt tools use: fixed-newstyle handshake, structured replies, URIs, TLS).

Owns: NbdExport, one export of one server (`nbd+unix:///export?socket=PATH`,
`nbd://host:port/export`, any URI libnbd takes) opened once per device to learn its size and
flags, then NbdConnection per connection: a libnbd handle and a C I/O thread (no GIL, no Python)
that drives it with poll(2) and, when the connection dies, re-dials with bounded back-off and
resubmits every I/O the server had not acknowledged; several connections when the server
advertises multi-conn (queue k uses connection k mod N), one otherwise (NBD gives no
consistency between connections without it).  NbdEngine is one queue's side: each guest segment
is one NBD command straight from/into guest memory (nbd_aio_pread/pwrite), flush, trim and
write-zeroes map to NBD_CMD_FLUSH/TRIM/WRITE_ZEROES; libnbd's completion callback (the I/O
thread's, C) hands finished I/Os to the queue's worker (engine.h).
Must not: enter Python per request; acknowledge to the guest an I/O the server did not
acknowledge (a lost connection resubmits, and only `timeout` seconds without a server fail an
I/O with EIO); free a connection while the server may still reply into guest memory (close
shuts the I/O thread down only when nothing is in flight).
"""
import os

from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.errno cimport errno, ENOTCONN, ESHUTDOWN, ECONNRESET, EPIPE, EIO, ETIMEDOUT
from libc.string cimport memset
from libc.stdlib cimport calloc, free
from posix.unistd cimport read, write, close
from posix.time cimport nanosleep, timespec, clock_gettime, CLOCK_MONOTONIC

from cython_ext.engine cimport *
from cython_ext.posix_io cimport (eventfd, EFD_CLOEXEC, EFD_NONBLOCK, poll, pollfd, POLLIN,
                                  POLLHUP, POLLERR)
from cython_ext.worker cimport (pthread_mutex_t, pthread_mutex_init, pthread_mutex_destroy,
                                pthread_mutex_lock, pthread_mutex_unlock)

cdef extern from "<poll.h>" nogil:
    enum:
        POLLOUT

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *t, void *attr, void *(*fn)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t t, void **ret)

cdef extern from "<libnbd.h>" nogil:
    struct nbd_handle:
        pass
    ctypedef struct nbd_completion_callback:
        int (*callback)(void *user_data, int *error) noexcept nogil
        void *user_data
        void (*free)(void *user_data) noexcept nogil
    enum:
        LIBNBD_CMD_FLAG_FUA
        LIBNBD_CMD_FLAG_NO_HOLE
        LIBNBD_AIO_DIRECTION_READ
        LIBNBD_AIO_DIRECTION_WRITE
    nbd_handle *nbd_create()
    void nbd_close(nbd_handle *h)
    const char *nbd_get_error()
    int nbd_get_errno()
    int nbd_connect_uri(nbd_handle *h, const char *uri)
    int nbd_aio_connect_uri(nbd_handle *h, const char *uri)
    int64_t nbd_get_size(nbd_handle *h)
    int nbd_is_read_only(nbd_handle *h)
    int nbd_can_flush(nbd_handle *h)
    int nbd_can_fua(nbd_handle *h)
    int nbd_can_trim(nbd_handle *h)
    int nbd_can_zero(nbd_handle *h)
    int nbd_can_multi_conn(nbd_handle *h)
    int64_t nbd_aio_pread(nbd_handle *h, void *buf, size_t count, uint64_t offset,
                          nbd_completion_callback cb, uint32_t flags)
    int64_t nbd_aio_pwrite(nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                           nbd_completion_callback cb, uint32_t flags)
    int64_t nbd_aio_flush(nbd_handle *h, nbd_completion_callback cb, uint32_t flags)
    int64_t nbd_aio_trim(nbd_handle *h, uint64_t count, uint64_t offset,
                         nbd_completion_callback cb, uint32_t flags)
    int64_t nbd_aio_zero(nbd_handle *h, uint64_t count, uint64_t offset,
                         nbd_completion_callback cb, uint32_t flags)
    int nbd_aio_get_fd(nbd_handle *h)
    unsigned nbd_aio_get_direction(nbd_handle *h)
    int nbd_aio_notify_read(nbd_handle *h)
    int nbd_aio_notify_write(nbd_handle *h)
    int nbd_aio_is_ready(nbd_handle *h)
    int nbd_aio_is_dead(nbd_handle *h)
    int nbd_aio_is_closed(nbd_handle *h)
    int nbd_aio_is_connecting(nbd_handle *h)
    int nbd_aio_in_flight(nbd_handle *h)


# Atomics for what the I/O thread, the submitting workers and libnbd's callbacks share.
cdef extern from *:
    """
    static inline void pv_inc_u64(uint64_t *p) { __atomic_add_fetch(p, 1, __ATOMIC_RELAXED); }
    static inline void pv_inc_int(int *p) { __atomic_add_fetch(p, 1, __ATOMIC_ACQ_REL); }
    static inline int pv_dec_int(int *p) { return __atomic_sub_fetch(p, 1, __ATOMIC_ACQ_REL); }
    static inline void pv_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void pv_cas_int(int *p, int old, int v) {
        __atomic_compare_exchange_n(p, &old, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    }
    """
    void pv_inc_u64(uint64_t *p) nogil
    void pv_inc_int(int *p) nogil
    int pv_dec_int(int *p) nogil
    void pv_store_int(int *p, int v) nogil
    void pv_cas_int(int *p, int old, int v) nogil


class NbdError(OSError):
    """Opening an NBD export failed; str() is one line saying what to fix."""


cdef enum:
    BACKOFF_MIN_MS = 50          # first re-dial after a lost connection
    BACKOFF_MAX_MS = 2000        # bounded back-off between re-dials


ctypedef struct nbd_conn_t:
    nbd_handle *h                # NULL while (re)connecting; swapped only under `lock`
    char *uri
    pthread_mutex_t lock         # the handle pointer (libnbd locks the handle itself)
    pthread_mutex_t retry_lock   # `retry`
    blk_io_t *retry              # I/Os to submit again once connected (a LIFO stack)
    int wake_fd                  # submitters and close() -> the I/O thread
    int stop
    bint up                      # a handle is connected and ready
    bint fua                     # the server takes FUA (else write-through writes are
                                 # followed by nothing: see NbdExport)
    double down_since            # when the connection was lost (0: up)
    double timeout               # how long I/O waits for a server before it fails
    uint64_t reconnects
    uint64_t resubmitted
    uint64_t failed_timeout      # I/Os failed because no server came back in time
    uint64_t submitted
    uint64_t done
    pthread_t thread
    bint started


ctypedef struct nbd_eng_t:
    blk_handoff_t hand           # first: the shared reap/wait_fd/ready take the struct as one
    nbd_conn_t *conn
    int kicked                   # something was submitted since the last kick


cdef inline double now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef inline bint conn_lost(int err) noexcept nogil:
    """libnbd's error for a command the connection took down with it (not the server's)."""
    return err == ENOTCONN or err == ESHUTDOWN or err == ECONNRESET or err == EPIPE


cdef inline void wake(int fd) noexcept nogil:
    cdef uint64_t one = 1
    write(fd, &one, 8)          # our own non-blocking eventfd: never blocks


cdef void retry_push(nbd_conn_t *c, blk_io_t *io) noexcept nogil:
    pthread_mutex_lock(&c.retry_lock)
    io.next = c.retry
    c.retry = io
    pthread_mutex_unlock(&c.retry_lock)
    wake(c.wake_fd)


cdef void io_finish(blk_io_t *io) noexcept nogil:
    """The last part of io is back: to the worker, or to the retry list if the connection
    took a part down with it."""
    cdef nbd_eng_t *e = <nbd_eng_t *>io.eng
    if io.err == -ENOTCONN:
        retry_push(e.conn, io)
        return
    if io.err:
        io.res = io.err
    elif io.op == IO_READ or io.op == IO_WRITE:
        io.res = <long>io.nbytes
    else:
        io.res = 0
    pv_inc_u64(&e.conn.done)
    blk_handoff_complete(&e.hand, io)


cdef int part_done(void *arg, int *error) noexcept nogil:
    """libnbd's completion callback (the thread driving the handle; the handle is locked: no
    libnbd call here).  Returns 1: libnbd retires the command itself."""
    cdef blk_io_t *io = <blk_io_t *>arg
    cdef int err = error[0]
    if err:
        # keep the first error; a lost connection wins (the whole I/O is submitted again)
        if conn_lost(err):
            pv_store_int(&io.err, -ENOTCONN)
        else:
            pv_cas_int(&io.err, 0, -err)
    if pv_dec_int(&io.pending) == 0:
        io_finish(io)
    return 1


cdef inline bint handle_dead(nbd_handle *h) noexcept nogil:
    return nbd_aio_is_dead(h) or nbd_aio_is_closed(h)


cdef inline int refused_error() noexcept nogil:
    cdef int err = nbd_get_errno()
    return -(err if err > 0 and not conn_lost(err) else EIO)


cdef int issue(nbd_conn_t *c, nbd_handle *h, blk_io_t *io) noexcept nogil:
    """Send io's commands on h (c.lock held).  Returns 0, or -1 when a dead handle refused the
    first command (io untouched, nothing in flight: it goes to the retry list).  A live handle
    that refuses a command (libnbd's own checks: a TRIM the server does not take, which a
    guest may send whatever we offered) fails the I/O with that error: resubmitting it would
    be refused again, forever."""
    cdef nbd_completion_callback cb
    cdef int64_t r = 0
    cdef int k
    cdef uint64_t off
    cdef uint32_t flags = 0
    cb.callback = part_done
    cb.user_data = io
    cb.free = NULL
    io.err = 0
    # one guard part so that io cannot finish while its commands are still being sent
    io.pending = 1
    if io.op == IO_READ or io.op == IO_WRITE:
        if io.op == IO_WRITE and io.flags & IO_F_FUA and c.fua:
            flags = LIBNBD_CMD_FLAG_FUA
        off = io.offset
        for k in range(io.niov):
            pv_inc_int(&io.pending)
            if io.op == IO_READ:
                r = nbd_aio_pread(h, io.iov[k].iov_base, io.iov[k].iov_len, off, cb, 0)
            else:
                r = nbd_aio_pwrite(h, io.iov[k].iov_base, io.iov[k].iov_len, off, cb, flags)
            if r < 0:
                pv_dec_int(&io.pending)
                if not handle_dead(h):
                    pv_store_int(&io.err, refused_error())
                    break
                if k == 0:
                    return -1
                # a later segment: the connection died under us; the parts sent come back
                # with ENOTCONN and the whole I/O is submitted again
                pv_store_int(&io.err, -ENOTCONN)
                break
            off += io.iov[k].iov_len
    else:
        pv_inc_int(&io.pending)
        if io.op == IO_FLUSH:
            r = nbd_aio_flush(h, cb, 0)
        elif io.op == IO_DISCARD:
            r = nbd_aio_trim(h, io.nbytes, io.offset, cb, 0)
        else:
            r = nbd_aio_zero(h, io.nbytes, io.offset, cb,
                             0 if io.flags & IO_F_UNMAP else LIBNBD_CMD_FLAG_NO_HOLE)
        if r < 0:
            pv_dec_int(&io.pending)
            if handle_dead(h):
                return -1
            pv_store_int(&io.err, refused_error())
    if pv_dec_int(&io.pending) == 0:
        io_finish(io)
    return 0


cdef int nbd_submit(void *p, blk_io_t *io) noexcept nogil:
    cdef nbd_eng_t *e = <nbd_eng_t *>p
    cdef nbd_conn_t *c = e.conn
    cdef int r = -1
    io.eng = e
    pv_inc_u64(&c.submitted)
    pthread_mutex_lock(&c.lock)
    if c.up and c.h != NULL:
        r = issue(c, c.h, io)
    pthread_mutex_unlock(&c.lock)
    if r < 0:
        # not connected (or the handle just died): the I/O thread sends it once it is
        retry_push(c, io)
    e.kicked = 1
    return 0


cdef int nbd_kick(void *p) noexcept nogil:
    cdef nbd_eng_t *e = <nbd_eng_t *>p
    cdef nbd_conn_t *c = e.conn
    cdef bint unsent = False
    if e.kicked:
        # libnbd sent what it could in the submitting thread; the I/O thread (which polls for
        # replies all along) is woken only when requests are left unsent and it must poll for
        # POLLOUT too: a wakeup per batch would cost it a context switch per request at QD1
        e.kicked = 0
        pthread_mutex_lock(&c.lock)
        if c.up and c.h != NULL:
            unsent = (nbd_aio_get_direction(c.h) & LIBNBD_AIO_DIRECTION_WRITE) != 0
        pthread_mutex_unlock(&c.lock)
        if unsent:
            wake(c.wake_fd)
    return 0


# --- the I/O thread ------------------------------------------------------------------------------

cdef void sleep_ms(int ms) noexcept nogil:
    cdef timespec t
    t.tv_sec = ms // 1000
    t.tv_nsec = (ms % 1000) * 1000000
    nanosleep(&t, NULL)


cdef void fail_or_resubmit(nbd_conn_t *c) noexcept nogil:
    """Send the retry list on the live handle; without one, fail what waited too long."""
    cdef blk_io_t *lst
    cdef blk_io_t *io
    cdef blk_io_t *keep = NULL
    cdef double t = now()
    pthread_mutex_lock(&c.retry_lock)
    lst = c.retry
    c.retry = NULL
    pthread_mutex_unlock(&c.retry_lock)
    while lst != NULL:
        io = lst
        lst = lst.next
        if c.up:
            pthread_mutex_lock(&c.lock)
            if issue(c, c.h, io) == 0:
                pthread_mutex_unlock(&c.lock)
                pv_inc_u64(&c.resubmitted)
                continue
            pthread_mutex_unlock(&c.lock)
        if c.down_since > 0 and t - c.down_since >= c.timeout:
            io.err = -EIO
            io.pending = 0
            pv_inc_u64(&c.failed_timeout)
            io_finish(io)
            continue
        io.next = keep
        keep = io
    if keep != NULL:
        pthread_mutex_lock(&c.retry_lock)
        while keep != NULL:
            io = keep
            keep = keep.next
            io.next = c.retry
            c.retry = io
        pthread_mutex_unlock(&c.retry_lock)


cdef bint dial(nbd_conn_t *c) noexcept nogil:
    """One connection attempt (the I/O thread; the handshake bounded by `timeout`)."""
    cdef nbd_handle *h = nbd_create()
    cdef pollfd p[2]
    cdef unsigned d
    cdef double deadline = now() + (c.timeout if c.timeout < 30 else 30)
    if h == NULL:
        return False
    if nbd_aio_connect_uri(h, c.uri) < 0:
        nbd_close(h)
        return False
    while nbd_aio_is_connecting(h) and not c.stop and now() < deadline:
        d = nbd_aio_get_direction(h)
        p[0].fd = nbd_aio_get_fd(h)
        p[0].events = (POLLIN if d & LIBNBD_AIO_DIRECTION_READ else 0) | \
            (POLLOUT if d & LIBNBD_AIO_DIRECTION_WRITE else 0)
        p[0].revents = 0
        if poll(p, 1, 100) > 0:
            if p[0].revents & (POLLIN | POLLHUP | POLLERR):
                nbd_aio_notify_read(h)
            elif p[0].revents & POLLOUT:
                nbd_aio_notify_write(h)
    if not nbd_aio_is_ready(h):
        nbd_close(h)
        return False
    pthread_mutex_lock(&c.lock)
    c.h = h
    c.up = True
    pthread_mutex_unlock(&c.lock)
    return True


cdef void *io_thread(void *arg) noexcept nogil:
    cdef nbd_conn_t *c = <nbd_conn_t *>arg
    cdef pollfd p[2]
    cdef unsigned d
    cdef uint64_t v
    cdef int backoff = BACKOFF_MIN_MS
    cdef nbd_handle *dead
    while True:
        if c.stop and (c.h == NULL or nbd_aio_in_flight(c.h) == 0) and c.retry == NULL:
            break
        if not c.up:
            if c.stop:
                # nothing will ever answer: what waits fails now (the worker has drained)
                c.down_since = 1e-9
                c.timeout = 0
                fail_or_resubmit(c)
                break
            if dial(c):
                backoff = BACKOFF_MIN_MS
                if c.down_since > 0:
                    c.reconnects += 1
                c.down_since = 0
                fail_or_resubmit(c)
                continue
            if c.down_since == 0:
                c.down_since = now()
            fail_or_resubmit(c)
            sleep_ms(backoff)
            backoff = backoff * 2 if backoff * 2 < BACKOFF_MAX_MS else BACKOFF_MAX_MS
            continue
        d = nbd_aio_get_direction(c.h)
        p[0].fd = nbd_aio_get_fd(c.h)
        p[0].events = (POLLIN if d & LIBNBD_AIO_DIRECTION_READ else 0) | \
            (POLLOUT if d & LIBNBD_AIO_DIRECTION_WRITE else 0)
        p[0].revents = 0
        p[1].fd = c.wake_fd
        p[1].events = POLLIN
        p[1].revents = 0
        poll(p, 2, 1000)
        if p[1].revents:
            read(c.wake_fd, &v, 8)
        if p[0].revents & (POLLIN | POLLHUP | POLLERR):
            nbd_aio_notify_read(c.h)
        if p[0].revents & POLLOUT:
            nbd_aio_notify_write(c.h)
        if nbd_aio_is_dead(c.h) or nbd_aio_is_closed(c.h):
            # the server went away: its in-flight commands came back ENOTCONN (part_done put
            # their I/Os on the retry list); a new handle takes them
            pthread_mutex_lock(&c.lock)
            dead = c.h
            c.h = NULL
            c.up = False
            pthread_mutex_unlock(&c.lock)
            nbd_close(dead)
            c.down_since = now()
            continue
        if c.retry != NULL:
            fail_or_resubmit(c)
    return NULL


cdef class NbdConnection:
    """One connection to the export and its I/O thread (see the module docstring)."""
    cdef nbd_conn_t *c
    cdef bytes _uri

    def __cinit__(self, str uri, double timeout, bint fua):
        self._uri = uri.encode()
        self.c = <nbd_conn_t *>calloc(1, sizeof(nbd_conn_t))
        if self.c == NULL:
            raise MemoryError()
        self.c.uri = self._uri
        self.c.timeout = timeout
        self.c.fua = fua
        pthread_mutex_init(&self.c.lock, NULL)
        pthread_mutex_init(&self.c.retry_lock, NULL)
        self.c.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.c.wake_fd < 0:
            raise OSError(errno, "eventfd")
        if pthread_create(&self.c.thread, NULL, io_thread, self.c) != 0:
            raise OSError(errno, "pthread_create")
        self.c.started = True

    def stats(self):
        c = self.c
        if c == NULL:
            return {}
        return dict(nbd_reconnects=c.reconnects, nbd_resubmitted=c.resubmitted,
                    nbd_failed_timeout=c.failed_timeout, nbd_up=bool(c.up))

    @property
    def idle(self):
        """Nothing submitted is still waiting for the server (a closed connection: True)."""
        if self.c == NULL:
            return True
        return blk_load_u64(&self.c.submitted) == blk_load_u64(&self.c.done)

    def close(self):
        """Stop the I/O thread once nothing is in flight and close the handle.  With I/O
        still in flight (a stuck worker's), the connection is left alone: never freed."""
        cdef nbd_conn_t *c = self.c
        if c == NULL or not c.started:
            return
        if not self.idle:
            return
        c.stop = 1
        wake(c.wake_fd)
        with nogil:
            pthread_join(c.thread, NULL)
        c.started = False
        if c.h != NULL:
            nbd_close(c.h)
            c.h = NULL
        close(c.wake_fd)
        pthread_mutex_destroy(&c.lock)
        pthread_mutex_destroy(&c.retry_lock)
        free(c)
        self.c = NULL

    def __dealloc__(self):
        self.close()


cdef class NbdEngine(QueueEngine):
    """One queue's NBD engine on one NbdConnection (kept alive)."""
    cdef nbd_eng_t e
    cdef NbdConnection conn

    def __cinit__(self, NbdConnection conn):
        self.kind = "nbd"
        self.conn = conn
        memset(&self.e, 0, sizeof(nbd_eng_t))
        self.e.conn = conn.c
        handoff_engine_init(&self.eng, &self.e, &self.e.hand, nbd_submit, nbd_kick)

    def close(self):
        # every I/O of this queue came back (the worker drained): nothing writes the eventfd
        if self.e.hand.efd >= 0 and self.conn.idle:
            close(self.e.hand.efd)
            self.e.hand.efd = -1

    def stats(self):
        s = self.conn.stats()
        s.update(nbd_completed=self.e.hand.completed, nbd_wakeups=self.e.hand.wakeups)
        return s


cdef class NbdExport:
    """The export at `uri`, probed once (size, flags; errors as one line), and the connections
    its queues use: `connections` of them when the server allows multi-conn, else one.  I/O
    waits `timeout` seconds for a lost server before it fails with EIO."""
    cdef readonly str uri
    cdef readonly uint64_t size
    cdef readonly bint read_only
    cdef readonly bint can_flush, can_fua, can_trim, can_zero, multi_conn
    cdef readonly double timeout
    cdef list _conns
    cdef int _nconn

    def __cinit__(self, str uri, double timeout=60.0, bint read_only=False,
                  int connections=4):
        cdef nbd_handle *h = nbd_create()
        cdef int r
        cdef bytes b = uri.encode()
        cdef const char *cu = b
        self.uri = uri
        self.timeout = timeout
        self._conns = []
        if h == NULL:
            raise NbdError(f"nbd {uri}: libnbd could not create a handle")
        try:
            with nogil:
                r = nbd_connect_uri(h, cu)
            if r < 0:
                err = nbd_get_errno()
                msg = nbd_get_error()
                raise NbdError(f"nbd {uri}: " + _connect_error(
                    err, msg.decode(errors="replace") if msg != NULL else os.strerror(err)))
            self.size = nbd_get_size(h)
            self.read_only = read_only or nbd_is_read_only(h) == 1
            self.can_flush = nbd_can_flush(h) == 1
            self.can_fua = nbd_can_fua(h) == 1
            self.can_trim = nbd_can_trim(h) == 1
            self.can_zero = nbd_can_zero(h) == 1
            self.multi_conn = nbd_can_multi_conn(h) == 1
        finally:
            with nogil:
                nbd_close(h)
        if not read_only and self.read_only:
            raise NbdError(f"nbd {uri}: the server exports it read-only (set read-only)")
        self._nconn = max(1, connections) if self.multi_conn else 1

    def queue_engine(self, int index):
        """The engine of queue `index`, on connection index mod N (made on first use)."""
        k = index % self._nconn
        while len(self._conns) <= k:
            self._conns.append(NbdConnection(self.uri, self.timeout, self.can_fua))
        return NbdEngine(self._conns[k])

    def stats(self):
        return [c.stats() for c in self._conns]

    def close(self):
        """Close every connection that has nothing in flight; True if all were."""
        for c in self._conns:
            c.close()
        return all(c.idle for c in self._conns)


def _connect_error(int err, str text):
    low = text.lower()
    if "export" in low and ("no export" in low or "not" in low or "unknown" in low):
        return f"export not found ({text})"
    if err in (2, 111):         # ENOENT, ECONNREFUSED
        return f"no NBD server there ({text})"
    return text
