# cython: language_level=3
"""rbd.pyx: the Ceph RBD engine of the blk worker (engine.pxd), through librbd's C API.

Owns: RbdImage, one cluster connection and one open image per device (rados_create2 ...
rbd_open; its size; one-line errors a user can act on; close); RbdEngine, one queue's side:
rbd_aio_readv / rbd_aio_writev straight from the request's iovecs (zero copy: librbd reads and
fills guest memory itself), rbd_aio_flush, rbd_aio_discard, rbd_aio_write_zeroes; librbd
completes on its own threads into a C callback that pushes the I/O onto the queue's lock-free
list (engine.h) and writes the queue's eventfd once per burst; the worker reaps the list.
Must not: enter Python per request, block the worker anywhere but its poll(2), or free a queue's
eventfd while librbd may still complete into it (the worker's at-stop drain waits for every
I/O; a queue whose I/O never completes is a stuck worker, and the framework then never closes
its engine).

Why a completion callback and not rbd_set_image_notification + rbd_poll_io_events: a device
opens its image once (exclusive-lock ownership is per open image: two opens in one process
would pass the lock back and forth on every write), so every queue's completions would arrive
on the one image's event queue and would need this same hand-off to reach their queue's worker,
one hop later.  QEMU's block/rbd.c and SPDK's bdev_rbd complete from the callback too.
"""
import os

from libc.stdint cimport uint64_t
from libc.errno cimport errno
from libc.string cimport memset
from posix.unistd cimport read, write, close
from posix.uio cimport iovec

from cython_ext.engine cimport *
from cython_ext.posix_io cimport eventfd, EFD_CLOEXEC, EFD_NONBLOCK

cdef extern from "<rados/librados.h>" nogil:
    ctypedef void *rados_t
    ctypedef void *rados_ioctx_t
    int rados_create2(rados_t *pcluster, const char *clustername, const char *name,
                      uint64_t flags)
    int rados_conf_read_file(rados_t cluster, const char *path)
    int rados_conf_set(rados_t cluster, const char *option, const char *value)
    int rados_connect(rados_t cluster)
    void rados_shutdown(rados_t cluster)
    int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx)
    void rados_ioctx_destroy(rados_ioctx_t io)
    void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace)

cdef extern from "<rbd/librbd.h>" nogil:
    ctypedef void *rbd_image_t
    ctypedef void *rbd_completion_t
    ctypedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg)
    int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap)
    int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image,
                           const char *snap)
    int rbd_close(rbd_image_t image)
    int rbd_get_size(rbd_image_t image, uint64_t *size)
    int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb,
                                  rbd_completion_t *c)
    ssize_t rbd_aio_get_return_value(rbd_completion_t c)
    void rbd_aio_release(rbd_completion_t c)
    int rbd_aio_readv(rbd_image_t image, const iovec *iov, int iovcnt, uint64_t off,
                      rbd_completion_t c)
    int rbd_aio_writev(rbd_image_t image, const iovec *iov, int iovcnt, uint64_t off,
                       rbd_completion_t c)
    int rbd_aio_flush(rbd_image_t image, rbd_completion_t c)
    int rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c)
    int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                             int zero_flags, int op_flags)
    ctypedef void (*rbd_update_callback_t)(void *arg)
    int rbd_update_watch(rbd_image_t image, uint64_t *handle, rbd_update_callback_t cb,
                         void *arg)
    int rbd_update_unwatch(rbd_image_t image, uint64_t handle)


class RbdError(OSError):
    """Opening an RBD image failed; str() is one line saying what to fix."""


ctypedef struct rbd_eng_t:
    blk_handoff_t hand           # librbd's threads -> the queue's worker (engine.h); first:
                                 # the shared reap/wait_fd/ready take the struct as one
    rbd_image_t image
    uint64_t submitted


cdef void rbd_done(rbd_completion_t c, void *arg) noexcept nogil:
    """librbd's thread: the I/O is finished.  No Python, no locks: one CAS, maybe one write."""
    cdef blk_io_t *io = <blk_io_t *>arg
    cdef rbd_eng_t *e = <rbd_eng_t *>io.eng
    cdef ssize_t r = rbd_aio_get_return_value(c)
    rbd_aio_release(c)
    if r >= 0:
        # reads return the bytes read (the whole range: librbd reads unwritten extents as
        # zeroes); writes, flush, discard return 0 or the length: normalise to the contract
        if io.op == IO_WRITE:
            r = <ssize_t>io.nbytes
        elif io.op != IO_READ:
            r = 0
    io.res = r
    blk_handoff_complete(&e.hand, io)


cdef int rbd_submit(void *p, blk_io_t *io) noexcept nogil:
    cdef rbd_eng_t *e = <rbd_eng_t *>p
    cdef rbd_completion_t c
    cdef int r
    io.eng = e
    r = rbd_aio_create_completion(io, rbd_done, &c)
    if r < 0:
        return r
    if io.op == IO_READ:
        r = rbd_aio_readv(e.image, io.iov, io.niov, io.offset, c)
    elif io.op == IO_WRITE:
        # FUA needs nothing more: the image is opened with rbd_cache off, so a write completes
        # only once the OSDs have it
        r = rbd_aio_writev(e.image, io.iov, io.niov, io.offset, c)
    elif io.op == IO_FLUSH:
        r = rbd_aio_flush(e.image, c)
    elif io.op == IO_DISCARD:
        r = rbd_aio_discard(e.image, io.offset, io.nbytes, c)
    else:
        # zero_flags 0: librbd deallocates whole objects and zeroes the rest, which is what
        # both write-zeroes flavours may do (virtio 1.2 §5.2.6: without UNMAP the device may
        # still deallocate, as long as the range reads back as zeroes)
        r = rbd_aio_write_zeroes(e.image, io.offset, io.nbytes, c, 0, 0)
    if r < 0:
        rbd_aio_release(c)
        return r
    e.submitted += 1
    return 0


cdef int rbd_kick(void *p) noexcept nogil:
    return 0                    # librbd sends each request when it is submitted


cdef void rbd_header_updated(void *arg) noexcept nogil:
    """librbd's thread: the image header changed (a resize, a snapshot...): wake the control
    thread, which re-reads the size (RbdImage.event_fd)."""
    cdef uint64_t one = 1
    write(<int><long>arg, &one, 8)      # our own non-blocking eventfd: never blocks


cdef bytes _b(s):
    return s.encode() if s is not None else None


cdef class RbdImage:
    """`pool/image` or `pool/namespace/image` on the cluster `conf` names (None: librados'
    default search, /etc/ceph/ceph.conf...), as client.`client_id` with `keyring` (None: the
    conf's).  Connecting waits at most `timeout` seconds.  The image is opened once, with the
    client-side cache off (rbd_cache = false: a completed write is on the OSDs, so write-through
    and flush need nothing more) and partial discards zeroed; `size` is its size in bytes."""
    cdef rados_t cluster
    cdef rados_ioctx_t ioctx
    cdef rbd_image_t image
    cdef readonly uint64_t size
    cdef readonly str spec
    cdef readonly str pool
    cdef readonly str name
    cdef readonly bint read_only
    cdef readonly int event_fd           # readable when the image header changed (resize)
    cdef uint64_t _watch
    cdef bint _watching

    def __cinit__(self, str spec, str conf=None, str client_id=None, str keyring=None,
                  double timeout=30.0, bint read_only=False):
        cdef int r
        cdef bytes b_conf = _b(conf), b_key = _b(keyring)
        cdef const char *c_conf = NULL
        cdef const char *c_name
        cdef const char *c_pool
        cdef bytes b_tmo = _b(f"{timeout:g}")
        self.event_fd = -1
        parts = spec.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise RbdError(f"rbd {spec!r}: expected POOL/IMAGE or POOL/NAMESPACE/IMAGE")
        self.spec = spec
        self.read_only = read_only
        self.pool, self.name = parts[0], parts[len(parts) - 1]
        nspace = parts[1] if len(parts) == 3 else ""
        who = f"client.{client_id or 'admin'}"
        b_who = who.encode()
        r = rados_create2(&self.cluster, b"ceph", b_who, 0)
        if r < 0:
            self.cluster = NULL
            raise RbdError(f"rbd {spec}: librados: {os.strerror(-r)}")
        try:
            if b_conf is not None:
                c_conf = b_conf
            r = rados_conf_read_file(self.cluster, c_conf)
            if r < 0:
                raise RbdError(f"rbd {spec}: cannot read the Ceph configuration "
                               f"{conf or '(default locations)'}: {os.strerror(-r)}")
            if b_key is not None:
                if not os.path.exists(keyring):
                    raise RbdError(f"rbd {spec}: keyring {keyring} does not exist")
                rados_conf_set(self.cluster, b"keyring", b_key)
            # a cluster that does not answer fails the start within `timeout` instead of
            # librados' 300 s; OSD operations keep no timeout: an OSD restart stalls I/O, it
            # does not fail it
            rados_conf_set(self.cluster, b"client_mount_timeout", b_tmo)
            rados_conf_set(self.cluster, b"rados_mon_op_timeout", b_tmo)
            rados_conf_set(self.cluster, b"rbd_cache", b"false")
            # a discard of part of an object zeroes that part (librbd's default skips it), so
            # a discarded range reads back as zeroes, as on a file (punched hole)
            rados_conf_set(self.cluster, b"rbd_skip_partial_discard", b"false")
            with nogil:
                r = rados_connect(self.cluster)
            if r < 0:
                raise RbdError(f"rbd {spec}: cannot connect to the Ceph cluster as {who} "
                               f"({conf or 'default ceph.conf'}): " + _connect_error(-r, timeout))
            b_pool = self.pool.encode()
            c_pool = b_pool
            r = rados_ioctx_create(self.cluster, c_pool, &self.ioctx)
            if r < 0:
                self.ioctx = NULL
                raise RbdError(f"rbd {spec}: pool {self.pool!r} "
                               + ("does not exist" if r == -2 else f": {os.strerror(-r)}"))
            if nspace:
                rados_ioctx_set_namespace(self.ioctx, nspace.encode())
            b_name = self.name.encode()
            c_name = b_name
            with nogil:
                if read_only:
                    r = rbd_open_read_only(self.ioctx, c_name, &self.image, NULL)
                else:
                    r = rbd_open(self.ioctx, c_name, &self.image, NULL)
            if r < 0:
                self.image = NULL
                raise RbdError(f"rbd {spec}: image {self.name!r} "
                               + (f"not found in pool {self.pool!r}" if r == -2
                                  else f"cannot be opened: {os.strerror(-r)}"))
            r = rbd_get_size(self.image, &self.size)
            if r < 0:
                raise RbdError(f"rbd {spec}: size: {os.strerror(-r)}")
            # a resize by another client (rbd resize) reaches us as a header update
            self.event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if self.event_fd < 0:
                raise RbdError(f"rbd {spec}: eventfd: {os.strerror(errno)}")
            r = rbd_update_watch(self.image, &self._watch, rbd_header_updated,
                                 <void *><long>self.event_fd)
            self._watching = r == 0
        except BaseException:
            self.close()
            raise

    def __dealloc__(self):
        self.close()

    def queue_engine(self, int index=0):
        """A new RbdEngine for one queue of this image."""
        return RbdEngine(self)

    def refresh_size(self):
        """The image's size now (bytes): librbd follows a resize by another client."""
        cdef uint64_t size = 0
        cdef int r = rbd_get_size(self.image, &size)
        if r < 0:
            raise OSError(-r, "rbd_get_size")
        self.size = size
        return size

    def drain_event(self):
        """Read event_fd (after it was readable)."""
        cdef uint64_t v
        read(self.event_fd, &v, 8)

    def close(self):
        """Close the image and the connection (every queue's I/O is finished)."""
        if self._watching:
            with nogil:
                rbd_update_unwatch(self.image, self._watch)
            self._watching = False
        if self.image != NULL:
            with nogil:
                rbd_close(self.image)
            self.image = NULL
        if self.ioctx != NULL:
            rados_ioctx_destroy(self.ioctx)
            self.ioctx = NULL
        if self.cluster != NULL:
            with nogil:
                rados_shutdown(self.cluster)
            self.cluster = NULL
        if self.event_fd >= 0:
            close(self.event_fd)
            self.event_fd = -1


def _connect_error(int err, double timeout):
    if err == 110:              # ETIMEDOUT
        return f"no monitor answered within {timeout:g} s (check mon_host and the network)"
    if err in (1, 13):          # EPERM, EACCES
        return "authentication refused (wrong key, or the client has no caps)"
    if err == 2:                # ENOENT: librados says this when it found no key
        return "no keyring with a key for this client (set ceph-id / keyring)"
    return os.strerror(err)


cdef class RbdEngine(QueueEngine):
    """One queue's RBD engine (see the module docstring).  Keeps its RbdImage alive."""
    cdef rbd_eng_t r
    cdef RbdImage img

    def __cinit__(self, RbdImage img):
        if img.image == NULL:
            raise ValueError("image is closed")
        self.kind = "rbd"
        self.img = img
        memset(&self.r, 0, sizeof(rbd_eng_t))
        self.r.image = img.image
        handoff_engine_init(&self.eng, &self.r, &self.r.hand, rbd_submit, rbd_kick)

    def close(self):
        if self.r.hand.efd >= 0 and self.r.submitted == blk_load_u64(&self.r.hand.completed):
            close(self.r.hand.efd)
            self.r.hand.efd = -1

    def __dealloc__(self):
        self.close()

    def stats(self):
        return dict(rbd_submitted=self.r.submitted, rbd_completed=self.r.hand.completed,
                    rbd_wakeups=self.r.hand.wakeups)
