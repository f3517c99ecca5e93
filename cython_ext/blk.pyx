# cython: language_level=3
"""blk.pyx: the virtio-blk queue worker (virtio 1.2 §5.2), one thread per virtqueue, GIL released
for its whole life.

Owns: turning popped chains into block requests (header parse, direction and range checks),
handing their I/O to the queue's backing-store engine (engine.pxd: the request's iovecs point
straight into guest RAM; up to `slots` requests in flight; one hand-off per batch), status
bytes, used-ring completion and one notification per batch; and the file engine (FileEngine:
a raw image or block device through the queue's own io_uring, or synchronous preadv/pwritev
when io_uring is unavailable; the null store).  Other engines (rbd.pyx) live beside it.  Must not: create Python objects per request (Python is entered only to log a fault,
rate-limited), block on anything but poll(2)/io_uring, or touch memory outside the region table
(everything comes from ring.pyx's checked segments).
"""
import logging
import os

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, UINT64_MAX
from libc.stdlib cimport calloc, free
from libc.string cimport memset, memcpy
from libc.errno cimport errno, EINVAL, EAGAIN, EINTR, EOPNOTSUPP, EBUSY
from posix.unistd cimport read, write, close
from posix.uio cimport iovec
from posix.time cimport nanosleep, timespec
from cpython.bytes cimport PyBytes_AS_STRING

from cython_ext.ring cimport *
from cython_ext.posix_io cimport *
from cython_ext.worker cimport *
from cython_ext.engine cimport *

log = logging.getLogger("pyvhost.blk")

cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, long offset, long len)
    int fdatasync(int fd)

cdef extern from "<sys/uio.h>" nogil:
    ssize_t pwritev2(int fd, const iovec *iov, int iovcnt, long offset, int flags)
    enum:
        RWF_DSYNC       # per-write O_DSYNC (Linux 4.7; io_uring rw_flags from 5.1)
    enum:
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE
        FALLOC_FL_ZERO_RANGE

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED
        MAP_POPULATE

cdef extern from "<linux/io_uring.h>" nogil:
    struct io_sqring_offsets:
        uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array
    struct io_cqring_offsets:
        uint32_t head, tail, ring_mask, ring_entries, overflow, cqes
    struct io_uring_params:
        uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features
        io_sqring_offsets sq_off
        io_cqring_offsets cq_off
    struct io_uring_sqe:
        uint8_t opcode
        uint8_t flags
        uint16_t ioprio
        int32_t fd
        uint64_t off
        uint64_t addr
        uint32_t len
        uint32_t rw_flags
        uint32_t fsync_flags
        uint64_t user_data
    struct io_uring_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags
    enum:
        IORING_OP_READV
        IORING_OP_WRITEV
        IORING_OP_FSYNC
        IORING_OP_FALLOCATE
        IORING_FSYNC_DATASYNC
        IORING_ENTER_GETEVENTS
        IORING_FEAT_SINGLE_MMAP
        IORING_SETUP_CQSIZE
    long long IORING_OFF_SQ_RING
    long long IORING_OFF_CQ_RING
    long long IORING_OFF_SQES

cdef extern from "vhost_compat.h" nogil:
    int sys_io_uring_setup(unsigned entries, io_uring_params *p)
    int sys_io_uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
    uint32_t uq_load_acquire_u32(const void *p)
    void uq_store_release_u32(void *p, uint32_t v)
    int load_flag(const int *p)

# virtio-blk request types and status (protocols/virtio_blk.py has the same numbers).
cdef enum:
    T_IN = 0
    T_OUT = 1
    T_FLUSH = 4
    T_GET_ID = 8
    T_DISCARD = 11
    T_WRITE_ZEROES = 13
    S_OK = 0
    S_IOERR = 1
    S_UNSUPP = 2
    SECTOR = 512
    ID_BYTES = 20
    WZ_FLAG_UNMAP = 1
    HDR_SIZE = 16
    # Linux keeps dma_alignment 511 for virtio-blk; O_DIRECT wants 512-aligned buffers and
    # lengths on the usual 512e file systems.  Misaligned requests take the buffered fd.
    DIO_ALIGN = 512
    REAP_BATCH = 64

ctypedef struct slot_t:
    chain_t chain
    blk_io_t io                  # what the engine sees (engine.pxd)
    uint8_t *status
    uint32_t used_len
    int next_free

ctypedef struct uring_t:
    int fd
    uint32_t *sq_head
    uint32_t *sq_tail
    uint32_t sq_mask
    uint32_t *sq_array
    io_uring_sqe *sqes
    uint32_t *cq_head
    uint32_t *cq_tail
    uint32_t cq_mask
    io_uring_cqe *cqes
    void *sq_ring
    size_t sq_ring_len
    void *cq_ring
    size_t cq_ring_len
    size_t sqes_len
    uint32_t sq_local_tail
    uint32_t to_submit
    int inject_errors            # tests: the next N io_uring_enter calls fail with EBUSY

# The file engine: a raw image or block device through io_uring (or preadv/pwritev), O_DIRECT
# where the buffers allow it.  io.state holds the fd an I/O was issued on and, for write
# zeroes, the fallocate mode.
ctypedef struct file_eng_t:
    int fd_direct
    int fd_buffered
    bint use_uring
    uring_t ring
    uint64_t uring_enters
    uint64_t enter_errors        # io_uring_enter failures while waiting for in-flight I/O
    uint64_t buffered_fallbacks
    uint64_t dsync_writes        # writes issued with RWF_DSYNC

ctypedef struct blk_ctx_t:
    vq_t vq
    int index
    bint read_only
    uint64_t capacity            # in 512-byte sectors
    uint64_t max_discard_sectors
    uint64_t max_wz_sectors
    wk_t rt                      # the runtime: loop, stop, kicks, poll window (worker.pyx)
    bint broken_noted            # the corrupt avail ring was logged once
    uint8_t serial[ID_BYTES]
    blk_engine_t eng             # the backing store (a copy of the QueueEngine's)
    slot_t *slots
    int nslots
    int free_head
    int inflight
    int max_inflight             # high-water mark of requests in the engine at once
    uint64_t pending_used        # pushed but not yet published
    uint64_t requests
    uint64_t failed              # requests completed with a status other than S_OK
    uint64_t bytes_read
    uint64_t bytes_written
    # virtio-blk CONFIG_WCE (§5.2.6.2): the driver chose write-through (writeback = 0), so a
    # write completes only once it is stable (IO_F_FUA); set from the control thread while
    # the worker runs (a plain int read once per write: one request may see the old mode)
    int write_through


# Faults are logged by the runtime, rate-limited (worker.pyx wk_note_fault).
cdef wk_log_t BLK_LOG
BLK_LOG.logger = <void *>log
BLK_LOG.what = b"request failed"


cdef inline void note_fault(blk_ctx_t *ctx, int code) noexcept nogil:
    wk_note_fault(&BLK_LOG, &ctx.vq, ctx.index, code)


# --- io_uring -----------------------------------------------------------------------------------

cdef int uring_setup(uring_t *u, unsigned entries) noexcept nogil:
    cdef io_uring_params p
    cdef void *sq
    cdef void *cq
    memset(&p, 0, sizeof(p))
    memset(u, 0, sizeof(uring_t))
    u.fd = -1
    p.flags = IORING_SETUP_CQSIZE
    p.cq_entries = entries * 2
    fd = sys_io_uring_setup(entries, &p)
    if fd < 0:
        return -errno
    u.fd = fd
    u.sq_ring_len = p.sq_off.array + p.sq_entries * sizeof(uint32_t)
    u.cq_ring_len = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe)
    if p.features & IORING_FEAT_SINGLE_MMAP:
        if u.cq_ring_len > u.sq_ring_len:
            u.sq_ring_len = u.cq_ring_len
        u.cq_ring_len = u.sq_ring_len
    sq = mmap(NULL, u.sq_ring_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
              IORING_OFF_SQ_RING)
    if sq == MAP_FAILED:
        close(fd)
        u.fd = -1
        return -errno
    u.sq_ring = sq
    if p.features & IORING_FEAT_SINGLE_MMAP:
        cq = sq
    else:
        cq = mmap(NULL, u.cq_ring_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                  IORING_OFF_CQ_RING)
        if cq == MAP_FAILED:
            munmap(sq, u.sq_ring_len)
            close(fd)
            u.fd = -1
            return -errno
    u.cq_ring = cq
    u.sqes_len = p.sq_entries * sizeof(io_uring_sqe)
    u.sqes = <io_uring_sqe *>mmap(NULL, u.sqes_len, PROT_READ | PROT_WRITE,
                                  MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES)
    if <void *>u.sqes == MAP_FAILED:
        uring_teardown(u)
        return -errno
    u.sq_head = <uint32_t *>(<uint8_t *>sq + p.sq_off.head)
    u.sq_tail = <uint32_t *>(<uint8_t *>sq + p.sq_off.tail)
    u.sq_mask = (<uint32_t *>(<uint8_t *>sq + p.sq_off.ring_mask))[0]
    u.sq_array = <uint32_t *>(<uint8_t *>sq + p.sq_off.array)
    u.cq_head = <uint32_t *>(<uint8_t *>cq + p.cq_off.head)
    u.cq_tail = <uint32_t *>(<uint8_t *>cq + p.cq_off.tail)
    u.cq_mask = (<uint32_t *>(<uint8_t *>cq + p.cq_off.ring_mask))[0]
    u.cqes = <io_uring_cqe *>(<uint8_t *>cq + p.cq_off.cqes)
    u.sq_local_tail = u.sq_tail[0]
    return 0


cdef void uring_teardown(uring_t *u) noexcept nogil:
    if u.sqes != NULL and <void *>u.sqes != MAP_FAILED:
        munmap(u.sqes, u.sqes_len)
    if u.cq_ring != NULL and u.cq_ring != u.sq_ring:
        munmap(u.cq_ring, u.cq_ring_len)
    if u.sq_ring != NULL:
        munmap(u.sq_ring, u.sq_ring_len)
    if u.fd >= 0:
        close(u.fd)
    memset(u, 0, sizeof(uring_t))
    u.fd = -1


cdef io_uring_sqe *uring_get_sqe(uring_t *u) noexcept nogil:
    cdef uint32_t head = uq_load_acquire_u32(u.sq_head)
    cdef uint32_t idx
    cdef io_uring_sqe *sqe
    if u.sq_local_tail - head > u.sq_mask:
        return NULL
    idx = u.sq_local_tail & u.sq_mask
    sqe = &u.sqes[idx]
    memset(sqe, 0, sizeof(io_uring_sqe))
    u.sq_array[idx] = idx
    u.sq_local_tail += 1
    u.to_submit += 1
    return sqe


cdef int uring_submit(uring_t *u, unsigned min_complete) noexcept nogil:
    """One io_uring_enter for the whole batch (and optionally wait for completions)."""
    cdef int r
    cdef unsigned flags = IORING_ENTER_GETEVENTS if min_complete else 0
    uq_store_release_u32(u.sq_tail, u.sq_local_tail)
    if u.to_submit == 0 and min_complete == 0:
        return 0
    while True:
        if u.inject_errors > 0:
            u.inject_errors -= 1
            return -EBUSY
        r = sys_io_uring_enter(u.fd, u.to_submit, min_complete, flags)
        if r >= 0:
            if <unsigned>r >= u.to_submit:
                u.to_submit = 0
            else:
                u.to_submit -= r
            return r
        if errno != EINTR and errno != EAGAIN:
            return -errno
        if errno == EAGAIN and min_complete == 0:
            return 0


# --- the file engine (engine.pxd's contract) ----------------------------------------------------

cdef inline bint iov_aligned(blk_io_t *io) noexcept nogil:
    cdef int k
    for k in range(io.niov):
        if (<uint64_t>io.iov[k].iov_base) % DIO_ALIGN or io.iov[k].iov_len % DIO_ALIGN:
            return False
    return True


cdef inline void file_pick(file_eng_t *f, blk_io_t *io) noexcept nogil:
    """Which fd and (write zeroes) which fallocate mode this I/O starts with."""
    cdef int mode
    if io.op == IO_READ or io.op == IO_WRITE:
        io.state = f.fd_direct
        if f.fd_direct != f.fd_buffered and not iov_aligned(io):
            io.state = f.fd_buffered
            f.buffered_fallbacks += 1
    elif io.op == IO_DISCARD or (io.op == IO_WRITE_ZEROES and io.flags & IO_F_UNMAP):
        io.state = <long>(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) << 32 | f.fd_buffered
    elif io.op == IO_WRITE_ZEROES:
        io.state = <long>(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE) << 32 | f.fd_buffered
    else:
        io.state = f.fd_buffered


cdef inline int file_fd(blk_io_t *io) noexcept nogil:
    return <int><uint32_t>io.state


cdef inline int file_mode(blk_io_t *io) noexcept nogil:
    return <int>(io.state >> 32)


cdef bint file_retry(file_eng_t *f, blk_io_t *io, long res) noexcept nogil:
    """A result that means "issue it again differently"; adjusts io and says so."""
    if res == -EINVAL and (io.op == IO_READ or io.op == IO_WRITE) \
            and file_fd(io) != f.fd_buffered:
        # O_DIRECT refused this buffer/offset: the page-cache fd takes it (same bytes, no copy).
        io.state = f.fd_buffered
        f.buffered_fallbacks += 1
        return True
    if res == -EOPNOTSUPP and io.op == IO_WRITE_ZEROES \
            and (file_mode(io) & FALLOC_FL_ZERO_RANGE):
        # tmpfs and some file systems have no ZERO_RANGE; a punched hole reads as zeroes too.
        io.state = <long>(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) << 32 | f.fd_buffered
        return True
    return res == -EAGAIN or res == -EINTR


cdef long file_sync_io(file_eng_t *f, blk_io_t *io) noexcept nogil:
    cdef long r
    cdef int fd = file_fd(io)
    if io.op == IO_READ:
        r = preadv(fd, io.iov, io.niov, io.offset)
    elif io.op == IO_WRITE:
        if io.flags & IO_F_FUA:
            f.dsync_writes += 1
            r = pwritev2(fd, io.iov, io.niov, io.offset, RWF_DSYNC)
        else:
            r = pwritev(fd, io.iov, io.niov, io.offset)
    elif io.op == IO_FLUSH:
        r = fdatasync(fd)
    else:
        r = fallocate(fd, file_mode(io), io.offset, io.nbytes)
    if r < 0:
        return -errno
    return r


cdef int file_submit_sync(void *e, blk_io_t *io) noexcept nogil:
    cdef file_eng_t *f = <file_eng_t *>e
    cdef long r
    file_pick(f, io)
    r = file_sync_io(f, io)
    while file_retry(f, io, r):
        r = file_sync_io(f, io)
    io.res = r
    return 1


cdef int uring_queue(file_eng_t *f, blk_io_t *io) noexcept nogil:
    cdef io_uring_sqe *sqe = uring_get_sqe(&f.ring)
    if sqe == NULL:
        return -1
    sqe.fd = file_fd(io)
    sqe.user_data = <uint64_t>io
    if io.op == IO_READ or io.op == IO_WRITE:
        sqe.opcode = IORING_OP_READV if io.op == IO_READ else IORING_OP_WRITEV
        sqe.addr = <uint64_t>io.iov
        sqe.len = io.niov
        sqe.off = io.offset
        if io.op == IO_WRITE and io.flags & IO_F_FUA:
            sqe.rw_flags = RWF_DSYNC
            f.dsync_writes += 1
    elif io.op == IO_FLUSH:
        sqe.opcode = IORING_OP_FSYNC
        sqe.fsync_flags = IORING_FSYNC_DATASYNC
    else:
        sqe.opcode = IORING_OP_FALLOCATE
        sqe.off = io.offset
        sqe.addr = io.nbytes
        sqe.len = file_mode(io)
    return 0


cdef int file_submit_uring(void *e, blk_io_t *io) noexcept nogil:
    cdef file_eng_t *f = <file_eng_t *>e
    file_pick(f, io)
    if uring_queue(f, io) == 0:
        return 0
    # SQ full (cannot happen: slots <= SQ entries): synchronous I/O instead
    return file_submit_sync(e, io)


cdef int file_kick(void *e) noexcept nogil:
    cdef file_eng_t *f = <file_eng_t *>e
    if f.ring.to_submit:
        uring_submit(&f.ring, 0)
        f.uring_enters += 1
    return 0


cdef int file_reap(void *e, blk_io_t **done, int max, bint wait) noexcept nogil:
    cdef file_eng_t *f = <file_eng_t *>e
    cdef uring_t *u = &f.ring
    cdef uint32_t head, tail
    cdef io_uring_cqe *cqe
    cdef blk_io_t *io
    cdef int n = 0, r
    cdef timespec pause
    if wait:
        r = uring_submit(u, 1)
        if r < 0:
            # EBUSY with a full completion queue, ENOMEM...: reap what completed, retry 1 ms
            # later (never give up while the kernel may still complete into guest memory)
            f.enter_errors += 1
            if uq_load_acquire_u32(u.cq_tail) == u.cq_head[0]:
                pause.tv_sec = 0
                pause.tv_nsec = 1000000
                nanosleep(&pause, NULL)
    head = u.cq_head[0]
    tail = uq_load_acquire_u32(u.cq_tail)
    while head != tail and n < max:
        cqe = &u.cqes[head & u.cq_mask]
        io = <blk_io_t *><uint64_t>cqe.user_data
        head += 1
        if file_retry(f, io, cqe.res):
            uring_queue(f, io)
            continue
        io.res = cqe.res
        done[n] = io
        n += 1
    uq_store_release_u32(u.cq_head, head)
    if u.to_submit:
        uring_submit(u, 0)
    return n


cdef int file_wait_fd(void *e) noexcept nogil:
    return (<file_eng_t *>e).ring.fd


cdef int file_ready(void *e) noexcept nogil:
    cdef file_eng_t *f = <file_eng_t *>e
    return uq_load_acquire_u32(f.ring.cq_tail) != f.ring.cq_head[0]


cdef int null_submit(void *e, blk_io_t *io) noexcept nogil:
    # no backing store (like QEMU's null-co): every request succeeds at once; reads leave the
    # guest's buffers as they are (null-co's default read-zeroes=off)
    io.res = <long>io.nbytes if (io.op == IO_READ or io.op == IO_WRITE) else 0
    return 1


cdef int none_kick(void *e) noexcept nogil:
    return 0


cdef int none_reap(void *e, blk_io_t **done, int max, bint wait) noexcept nogil:
    return 0


cdef int none_fd(void *e) noexcept nogil:
    return -1


cdef int none_ready(void *e) noexcept nogil:
    return 0


# --- requests -----------------------------------------------------------------------------------

cdef inline void complete(blk_ctx_t *ctx, slot_t *s, uint8_t status) noexcept nogil:
    if s.status != NULL:
        s.status[0] = status
    if ctx.vq.log != NULL:
        # migrating: every device-writable byte may have been written (IN data, even of a
        # read that failed half-way; the ID string; the status byte), so log them all; the
        # rest of a chain is device-readable and never written
        vq_log_chain(&ctx.vq, &s.chain, UINT64_MAX)
    if status != S_OK:
        ctx.failed += 1
    vq_push(&ctx.vq, s.chain.head, s.used_len if status == S_OK else
            (1 if s.status != NULL else 0))
    ctx.pending_used += 1


cdef inline void release(blk_ctx_t *ctx, slot_t *s) noexcept nogil:
    cdef int k = s - ctx.slots
    s.next_free = ctx.free_head
    ctx.free_head = k


cdef int prepare(blk_ctx_t *ctx, slot_t *s) noexcept nogil:
    """Parse the popped chain in s into s.io.  Returns 1 if I/O must be issued, 0 if the
    request was completed here (status written, used pushed)."""
    cdef chain_t *c = &s.chain
    cdef blk_io_t *io = &s.io
    cdef uint64_t readable = 0, writable = 0, skip, data_len
    cdef uint32_t rtype
    cdef uint64_t sector
    cdef uint8_t hdr[HDR_SIZE]
    cdef uint8_t seg[16]
    cdef uint64_t ws, wn
    cdef uint32_t wflags
    cdef int k, n
    s.status = NULL
    s.used_len = 0
    io.op = 0
    io.flags = 0
    io.niov = 0
    io.iov = c.segs
    io.offset = 0
    io.nbytes = 0
    if c.fault == F_BAD_NEXT or c.fault == F_LOOP or c.fault == F_INDIRECT:
        # The end of the chain is unknown: no status byte to trust.
        note_fault(ctx, c.fault)
        complete(ctx, s, S_IOERR)
        return 0
    if c.last_byte == NULL:
        note_fault(ctx, F_STATUS if c.fault == F_NONE else c.fault)
        complete(ctx, s, S_IOERR)
        return 0
    s.status = c.last_byte
    s.used_len = 1
    if c.fault != F_NONE:
        note_fault(ctx, c.fault)
        complete(ctx, s, S_IOERR)
        return 0
    for k in range(c.nreadable):
        readable += c.segs[k].iov_len
    writable = c.total_len - readable
    if readable < HDR_SIZE:
        note_fault(ctx, F_HEADER)
        complete(ctx, s, S_IOERR)
        return 0
    chain_copy_from(c, 0, hdr, HDR_SIZE)
    rtype = (<uint32_t *>hdr)[0]
    sector = (<uint64_t *>(hdr + 8))[0]
    ctx.requests += 1

    if rtype == T_IN or rtype == T_OUT:
        if rtype == T_IN:
            data_len = writable - 1
            if readable != HDR_SIZE:
                note_fault(ctx, F_REQUEST)
                complete(ctx, s, S_IOERR)
                return 0
            # data = writable segments minus the trailing status byte
            io.iov = &c.segs[c.nreadable]
            io.niov = c.nsegs - c.nreadable
            c.segs[c.nsegs - 1].iov_len -= 1
            if c.segs[c.nsegs - 1].iov_len == 0:
                io.niov -= 1
        else:
            if ctx.read_only:
                complete(ctx, s, S_IOERR)
                return 0
            data_len = readable - HDR_SIZE
            # data = readable segments after the 16 header bytes
            skip = HDR_SIZE
            k = 0
            while k < c.nreadable and skip >= c.segs[k].iov_len:
                skip -= c.segs[k].iov_len
                k += 1
            if k < c.nreadable:
                c.segs[k].iov_base = <uint8_t *>c.segs[k].iov_base + skip
                c.segs[k].iov_len -= skip
            io.iov = &c.segs[k]
            io.niov = c.nreadable - k
        if data_len % SECTOR or sector > ctx.capacity or \
                data_len // SECTOR > ctx.capacity - sector:
            note_fault(ctx, F_REQUEST)
            complete(ctx, s, S_IOERR)
            return 0
        io.offset = sector * SECTOR
        io.nbytes = data_len
        s.used_len = <uint32_t>(data_len + 1) if rtype == T_IN else 1
        if data_len == 0:
            complete(ctx, s, S_OK)
            return 0
        io.op = IO_READ if rtype == T_IN else IO_WRITE
        if rtype == T_OUT and load_flag(&ctx.write_through):
            io.flags = IO_F_FUA
        return 1
    if rtype == T_FLUSH:
        if ctx.read_only:
            complete(ctx, s, S_OK)
            return 0
        io.op = IO_FLUSH
        return 1
    if rtype == T_GET_ID:
        if writable < 2:
            complete(ctx, s, S_IOERR)
            return 0
        n = ID_BYTES if writable - 1 >= ID_BYTES else <int>(writable - 1)
        chain_copy_to(c, readable, ctx.serial, n)
        s.used_len = n + 1
        complete(ctx, s, S_OK)
        return 0
    if rtype == T_DISCARD or rtype == T_WRITE_ZEROES:
        if ctx.read_only:
            complete(ctx, s, S_IOERR)
            return 0
        # We advertise max_discard_seg = max_write_zeroes_seg = 1.
        if readable - HDR_SIZE != 16:
            note_fault(ctx, F_REQUEST)
            complete(ctx, s, S_UNSUPP if readable - HDR_SIZE > 16 else S_IOERR)
            return 0
        chain_copy_from(c, HDR_SIZE, seg, 16)
        ws = (<uint64_t *>seg)[0]
        wn = (<uint32_t *>(seg + 8))[0]
        wflags = (<uint32_t *>(seg + 12))[0]
        if ws > ctx.capacity or wn > ctx.capacity - ws or \
                wn > (ctx.max_discard_sectors if rtype == T_DISCARD else ctx.max_wz_sectors) or \
                (wflags & ~(<uint32_t>WZ_FLAG_UNMAP)) != 0 or \
                (rtype == T_DISCARD and wflags != 0):
            note_fault(ctx, F_REQUEST)
            complete(ctx, s, S_IOERR if (wflags & ~(<uint32_t>WZ_FLAG_UNMAP)) == 0 else S_UNSUPP)
            return 0
        if wn == 0:
            complete(ctx, s, S_OK)
            return 0
        io.op = IO_DISCARD if rtype == T_DISCARD else IO_WRITE_ZEROES
        if wflags & WZ_FLAG_UNMAP:
            io.flags = IO_F_UNMAP
        io.offset = ws * SECTOR
        io.nbytes = wn * SECTOR
        return 1
    complete(ctx, s, S_UNSUPP)
    return 0


cdef void finish(blk_ctx_t *ctx, slot_t *s) noexcept nogil:
    """The engine is done with s.io: status, used element, slot back to the free list."""
    cdef blk_io_t *io = &s.io
    vq_failpoint(FP_AFTER_IO)
    if io.op == IO_READ or io.op == IO_WRITE:
        if io.res == <long>io.nbytes:
            if io.op == IO_READ:
                ctx.bytes_read += io.nbytes
            else:
                ctx.bytes_written += io.nbytes
            complete(ctx, s, S_OK)
        else:
            note_fault(ctx, F_IO)
            complete(ctx, s, S_IOERR)
    elif io.res >= 0:
        complete(ctx, s, S_OK)
    else:
        note_fault(ctx, F_IO)
        complete(ctx, s, S_IOERR)
    release(ctx, s)


cdef inline slot_t *slot_of(blk_ctx_t *ctx, blk_io_t *io) noexcept nogil:
    # io lies inside its slot: the slot index is the byte distance over the slot size
    return &ctx.slots[(<uint8_t *>io - <uint8_t *>ctx.slots) // sizeof(slot_t)]


cdef void issue(blk_ctx_t *ctx, slot_t *s) noexcept nogil:
    cdef int r = ctx.eng.submit(ctx.eng.e, &s.io)
    if r == 0:
        ctx.inflight += 1
        if ctx.inflight > ctx.max_inflight:
            ctx.max_inflight = ctx.inflight
        return
    if r < 0:
        s.io.res = r
    finish(ctx, s)


cdef int reap(blk_ctx_t *ctx, bint wait) noexcept nogil:
    cdef blk_io_t *done[REAP_BATCH]
    cdef int n, k, total = 0
    while ctx.inflight > 0:
        n = ctx.eng.reap(ctx.eng.e, done, REAP_BATCH, wait)
        for k in range(n):
            ctx.inflight -= 1
            finish(ctx, slot_of(ctx, done[k]))
        total += n
        if n < REAP_BATCH:
            break
    return total


cdef void flush_used(blk_ctx_t *ctx) noexcept nogil:
    if ctx.pending_used:
        vq_publish(&ctx.vq)
        vq_notify(&ctx.vq)
        ctx.pending_used = 0


cdef int drain_avail(blk_ctx_t *ctx) noexcept nogil:
    """Pop and issue as many requests as there are free slots.  Returns the number popped, or
    -1 if the queue is broken."""
    cdef int n = 0, r
    cdef slot_t *s
    while ctx.free_head >= 0:
        s = &ctx.slots[ctx.free_head]
        r = vq_pop(&ctx.vq, &s.chain)
        if r == 0:
            break
        if r < 0:
            return -1
        ctx.free_head = s.next_free
        n += 1
        if prepare(ctx, s):
            issue(ctx, s)
        else:
            release(ctx, s)
    return n


cdef void wait_all(blk_ctx_t *ctx) noexcept nogil:
    """Complete every in-flight request (stop, memory change, GET_VRING_BASE).  Never returns
    while the store may still complete into guest memory: the engine's blocking reap retries
    its errors (io_uring_enter EBUSY, ENOMEM...).  If the store never completes, the worker
    stays here and its stop times out: WorkerStuck, and the protocol keeps the memory
    mapped."""
    if ctx.inflight:
        ctx.eng.kick(ctx.eng.e)
    while ctx.inflight > 0:
        reap(ctx, True)
    flush_used(ctx)


# --- the device's side of the runtime (worker.pyx calls these once per batch / per sleep) ----

cdef int blk_batch(void *dev) noexcept nogil:
    """Pop and issue what the ring holds (up to the free slots), hand the batch to the engine
    (one io_uring_enter), reap completions, publish + notify once.  Returns requests popped."""
    cdef blk_ctx_t *ctx = <blk_ctx_t *>dev
    cdef int popped = 0
    if not ctx.vq.broken:
        popped = drain_avail(ctx)
        if popped < 0:
            if not ctx.broken_noted:
                note_fault(ctx, F_AVAIL)
                ctx.broken_noted = True
            popped = 0
    if ctx.inflight:
        ctx.eng.kick(ctx.eng.e)
        reap(ctx, False)
    flush_used(ctx)
    return popped


cdef int blk_pending(void *dev) noexcept nogil:
    """Poll window: completions waiting in the engine count as work."""
    cdef blk_ctx_t *ctx = <blk_ctx_t *>dev
    return ctx.inflight and ctx.eng.ready(ctx.eng.e)


cdef void blk_prepare_wait(void *dev, wk_wait_t *w) noexcept nogil:
    """While requests are in flight, their completions wake us (the engine's fd)."""
    cdef blk_ctx_t *ctx = <blk_ctx_t *>dev
    cdef int fd
    if ctx.inflight:
        fd = ctx.eng.wait_fd(ctx.eng.e)
        if fd >= 0:
            w.src[w.n].fd = fd
            w.src[w.n].vq = NULL
            w.src[w.n].lock = NULL
            w.src[w.n].live = NULL
            w.n += 1


cdef void blk_at_stop(void *dev) noexcept nogil:
    wait_all(<blk_ctx_t *>dev)


cdef wk_ops_t BLK_OPS
BLK_OPS.batch = blk_batch
BLK_OPS.pending = blk_pending
BLK_OPS.prepare_wait = blk_prepare_wait
BLK_OPS.at_stop = blk_at_stop

# The numbers above that mirror protocols/ (tests/test_c_constants.py checks each against it).
C_CONSTANTS = {
    "virtio_blk.T_IN": T_IN, "virtio_blk.T_OUT": T_OUT, "virtio_blk.T_FLUSH": T_FLUSH,
    "virtio_blk.T_GET_ID": T_GET_ID, "virtio_blk.T_DISCARD": T_DISCARD,
    "virtio_blk.T_WRITE_ZEROES": T_WRITE_ZEROES, "virtio_blk.S_OK": S_OK,
    "virtio_blk.S_IOERR": S_IOERR, "virtio_blk.S_UNSUPP": S_UNSUPP,
    "virtio_blk.SECTOR_SIZE": SECTOR, "virtio_blk.ID_BYTES": ID_BYTES,
    "virtio_blk.WRITE_ZEROES_FLAG_UNMAP": WZ_FLAG_UNMAP,
    "virtio_blk.REQ_HEADER_SIZE": HDR_SIZE, "virtio_blk.DISCARD_SEGMENT_SIZE": 16,
}



class IoUringUnavailable(OSError):
    pass


def io_uring_available():
    """(True, '') if io_uring_setup works here, else (False, reason)."""
    cdef uring_t u
    cdef int r
    with nogil:
        r = uring_setup(&u, 4)
        if r == 0:
            uring_teardown(&u)
    if r == 0:
        return True, ""
    return False, os.strerror(-r)


cdef class FileEngine(QueueEngine):
    """One queue's file engine: a raw image or block device (fd_direct: O_DIRECT where the
    file system allows it, else the same as fd_buffered), through its own io_uring of
    `entries` (rounded up to a power of two) or, when io_uring is unavailable or not wanted,
    synchronous preadv/pwritev.  fd_buffered < 0: the null store (every I/O succeeds at once).
    The fds stay the device's: closing the engine does not close them."""
    cdef file_eng_t f
    cdef readonly bint uses_io_uring

    def __cinit__(self, int fd_direct, int fd_buffered, int entries=64, bint use_io_uring=True,
                  int index=0):
        cdef unsigned n = 1
        cdef int r
        self.f.fd_direct = fd_direct
        self.f.fd_buffered = fd_buffered
        self.f.ring.fd = -1
        self.eng.e = &self.f
        self.eng.kick = none_kick
        self.eng.reap = none_reap
        self.eng.wait_fd = none_fd
        self.eng.ready = none_ready
        if fd_buffered < 0:
            self.kind = "null"
            self.eng.submit = null_submit
            return
        self.kind = "file"
        self.eng.submit = file_submit_sync
        if use_io_uring:
            while n < <unsigned>entries:
                n <<= 1
            r = uring_setup(&self.f.ring, n)
            if r == 0:
                self.f.use_uring = True
                self.uses_io_uring = True
                self.eng.submit = file_submit_uring
                self.eng.kick = file_kick
                self.eng.reap = file_reap
                self.eng.wait_fd = file_wait_fd
                self.eng.ready = file_ready
            else:
                log.error("queue %d: io_uring unavailable (%s): SYNCHRONOUS preadv/pwritev "
                          "fallback, one request at a time", index, os.strerror(-r))

    def __dealloc__(self):
        if self.f.use_uring:
            uring_teardown(&self.f.ring)

    def close(self):
        if self.f.use_uring:
            uring_teardown(&self.f.ring)
            self.f.use_uring = False

    def inject_enter_errors(self, int n):
        self.f.ring.inject_errors = n

    def stats(self):
        return dict(uring_enters=self.f.uring_enters, enter_errors=self.f.enter_errors,
                    buffered_fallbacks=self.f.buffered_fallbacks,
                    dsync_writes=self.f.dsync_writes)


cdef class BlkQueueWorker:
    """One virtio-blk virtqueue.  Built from a QueueHandle by devices/blk.py; `run()` is the
    thread body (GIL released), `stop()` asks it to finish in-flight I/O and return.
    The backing store is `engine` (a QueueEngine: FileEngine here, RbdEngine in rbd.pyx...);
    without one, a FileEngine on fd_direct / fd_buffered (the tests' rigs)."""
    cdef blk_ctx_t *ctx
    cdef readonly int index
    cdef readonly int resubmit_count     # requests recovered from the inflight region
    cdef readonly QueueEngine engine
    cdef bytes _keep_table

    def __cinit__(self, int index, int num, uint64_t desc, uint64_t avail, uint64_t used,
                  uint32_t last_avail, bytes region_table, int kick_fd, int call_fd,
                  int fd_direct, int fd_buffered, bint read_only, uint64_t capacity_sectors,
                  bytes serial, bint event_idx=False, bint indirect=True,
                  bint signal_call=False, bint use_io_uring=True,
                  uint64_t max_discard_sectors=0, uint64_t max_write_zeroes_sectors=0,
                  int slots=0, double poll_us=0, bint write_through=False, log=None,
                  inflight=None, bint packed=False, QueueEngine engine=None):
        cdef const unsigned char *t = region_table
        cdef int k, r
        if len(region_table) % sizeof(mem_region_t):
            raise ValueError("bad region table")
        # In-flight slots: as many as the ring holds, capped (each slot is a ~2.6 KiB chain);
        # 256 keeps QD 128 (the bench's deepest) fully in flight per queue.
        if slots <= 0:
            slots = num if num < 256 else 256
        if engine is None:
            engine = FileEngine(fd_direct, fd_buffered, slots, use_io_uring, index)
        self.engine = engine
        self.ctx = <blk_ctx_t *>calloc(1, sizeof(blk_ctx_t))
        if self.ctx == NULL:
            raise MemoryError()
        self.ctx.rt.stop_fd = -1
        self.index = index
        ctx = self.ctx
        ctx.eng = engine.eng
        if vq_init(&ctx.vq, num, desc, avail, used, last_avail, event_idx, indirect, call_fd,
                   <const mem_region_t *>t, len(region_table) // sizeof(mem_region_t),
                   packed) != 0:
            raise ValueError(f"bad queue size {num} or base {last_avail:#x}")
        vq_log_setup(&ctx.vq, log)
        # inflight tracking: after a restart this resumes after what the last backend popped
        # and hands those requests out again first (ring.pyx vq_inflight_setup)
        self.resubmit_count = vq_inflight_from(&ctx.vq, inflight)
        ctx.index = index
        r = wk_init(&ctx.rt, &BLK_OPS, ctx, poll_us, signal_call)
        if r < 0:
            raise OSError(-r, "eventfd")
        wk_add_queue(&ctx.rt, &ctx.vq, kick_fd)
        ctx.read_only = read_only
        ctx.capacity = capacity_sectors
        ctx.max_discard_sectors = max_discard_sectors
        ctx.max_wz_sectors = max_write_zeroes_sectors
        ctx.write_through = write_through
        serial = serial[:ID_BYTES].ljust(ID_BYTES, b"\0")
        memcpy(ctx.serial, PyBytes_AS_STRING(serial), ID_BYTES)
        ctx.nslots = slots
        ctx.slots = <slot_t *>calloc(slots, sizeof(slot_t))
        if ctx.slots == NULL:
            raise MemoryError()
        for k in range(slots):
            ctx.slots[k].next_free = k + 1 if k + 1 < slots else -1
        ctx.free_head = 0
        self._keep_table = region_table

    def __dealloc__(self):
        if self.ctx != NULL:
            wk_close(&self.ctx.rt)
            vq_free(&self.ctx.vq)
            free(self.ctx.slots)
            free(self.ctx)
            self.ctx = NULL

    @property
    def uses_io_uring(self):
        return bool(getattr(self.engine, "uses_io_uring", False))

    def run(self):
        """Thread body: serve the queue until stop()."""
        with nogil:
            wk_run(&self.ctx.rt)

    def run_until_idle(self):
        """Test hook: process what is on the ring now, wait for its I/O, publish, return."""
        cdef int r
        with nogil:
            while True:
                r = drain_avail(self.ctx)
                wait_all(self.ctx)
                if r <= 0:
                    break
        return r

    def stop(self):
        wk_stop(&self.ctx.rt)

    def close(self):
        """Release the engine and the stop eventfd now (the worker thread has returned)."""
        self.engine.close()
        wk_close(&self.ctx.rt)

    def inject_enter_errors(self, int n):
        """Tests: make the next `n` io_uring_enter calls fail (EBUSY), as a kernel short of
        memory or with a full completion queue would."""
        self.engine.inject_enter_errors(n)

    def set_capacity(self, uint64_t sectors):
        """The store was resized (an RBD image): requests are checked against the new size from
        the next one on (an aligned 64-bit store the worker reads once per request)."""
        self.ctx.capacity = sectors

    def set_write_through(self, bint on):
        """The guest changed CONFIG_WCE: from the next write on, writes are (not) FUA."""
        self.ctx.write_through = on

    @property
    def last_avail(self):
        """Where the queue is (GET_VRING_BASE's value; packed: positions and wrap counters)."""
        return vq_base(&self.ctx.vq)

    @property
    def broken(self):
        return bool(self.ctx.vq.broken)

    def stats(self):
        """The worker's counters since it was built (plain integers the worker thread writes
        without locks; read from another thread a value may be one request stale), with the
        engine's (FileEngine: uring_enters, enter_errors, buffered_fallbacks, dsync_writes).
        completed: requests returned in the used ring; failed: of those, with a status other
        than OK (or no usable status byte); avail_corrupt: 1 once the avail ring was found
        corrupt (then broken)."""
        from cython_ext.ring import FAULT_NAMES
        c = self.ctx
        s = dict(
            requests=c.requests, completed=c.vq.completed, failed=c.failed,
            avail_corrupt=c.vq.faults[F_AVAIL], bytes_read=c.bytes_read,
            bytes_written=c.bytes_written, notifies=c.vq.notifies, kicks=c.vq.kicks,
            poll_hits=c.rt.poll_hits, sleeps=c.rt.sleeps,
            broken=bool(c.vq.broken), last_avail=vq_base(&c.vq), inflight=c.inflight,
            max_inflight=c.max_inflight, resubmitted=c.vq.resubmitted,
            faults={FAULT_NAMES[k]: c.vq.faults[k] for k in range(1, NUM_FAULTS)
                    if c.vq.faults[k]})
        s.update(self.engine.stats())
        return s

    def counters(self):
        """This queue in the vocabulary of vhost.device.COUNTER_KEYS (Device.queue_counters;
        the same numbers devices/blk.py derives from stats()): requests = completed (failed
        ones included), errors = failed + 1 per corrupt avail ring, inflight = in the engine
        now, dropped = 0."""
        c = self.ctx
        return wk_counters(&c.vq, c.vq.completed, c.bytes_read, c.bytes_written,
                           c.failed + c.vq.faults[F_AVAIL], c.inflight, 0)
