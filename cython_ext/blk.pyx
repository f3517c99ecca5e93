# cython: language_level=3
"""blk.pyx: the virtio-blk queue worker (virtio 1.2 §5.2), one thread per virtqueue, GIL released
for its whole life.

Owns: turning popped chains into block requests (header parse, direction and range checks),
zero-copy I/O through io_uring (the request's iovecs point straight into guest RAM; up to
`slots` requests in flight; one io_uring_enter per batch), the synchronous preadv/pwritev
fallback when io_uring is unavailable, status bytes, used-ring completion and one notification
per batch.  Must not: create Python objects per request (Python is entered only to log a fault,
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

cdef enum:
    OP_NONE = 0
    OP_READ = 1
    OP_WRITE = 2
    OP_FLUSH = 3
    OP_FALLOC = 4

ctypedef struct slot_t:
    chain_t chain
    uint8_t *status
    uint32_t used_len
    int op
    int fd
    int first_iov
    int niov
    uint64_t offset
    uint64_t nbytes
    int falloc_mode
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

ctypedef struct blk_ctx_t:
    vq_t vq
    int index
    int fd_direct
    int fd_buffered
    bint read_only
    uint64_t capacity            # in 512-byte sectors
    uint64_t max_discard_sectors
    uint64_t max_wz_sectors
    wk_t rt                      # the runtime: loop, stop, kicks, poll window (worker.pyx)
    bint broken_noted            # the corrupt avail ring was logged once
    uint8_t serial[ID_BYTES]
    bint use_uring
    uring_t ring
    slot_t *slots
    int nslots
    int free_head
    int inflight
    int max_inflight             # high-water mark of requests in the io_uring at once
    uint64_t pending_used        # pushed but not yet published
    uint64_t requests
    uint64_t failed              # requests completed with a status other than S_OK
    uint64_t bytes_read
    uint64_t bytes_written
    uint64_t uring_enters
    uint64_t enter_errors        # io_uring_enter failures while waiting for in-flight I/O
    uint64_t buffered_fallbacks
    # virtio-blk CONFIG_WCE (§5.2.6.2): the driver chose write-through (writeback = 0), so a
    # write completes only once it is stable (RWF_DSYNC); set from the control thread while
    # the worker runs (a plain int read once per write: one request may see the old mode)
    int write_through
    uint64_t dsync_writes        # writes issued with RWF_DSYNC


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


cdef inline bint iov_aligned(slot_t *s) noexcept nogil:
    cdef int k
    cdef iovec *v
    for k in range(s.first_iov, s.first_iov + s.niov):
        v = &s.chain.segs[k]
        if (<uint64_t>v.iov_base) % DIO_ALIGN or v.iov_len % DIO_ALIGN:
            return False
    return True


cdef int prepare(blk_ctx_t *ctx, slot_t *s) noexcept nogil:
    """Parse the popped chain in s.  Returns 1 if I/O must be issued, 0 if the request was
    completed here (status written, used pushed)."""
    cdef chain_t *c = &s.chain
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
    s.op = OP_NONE
    s.niov = 0
    s.first_iov = 0
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
            s.first_iov = c.nreadable
            s.niov = c.nsegs - c.nreadable
            c.segs[c.nsegs - 1].iov_len -= 1
            if c.segs[c.nsegs - 1].iov_len == 0:
                s.niov -= 1
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
            s.first_iov = k
            s.niov = c.nreadable - k
        if data_len % SECTOR or sector > ctx.capacity or \
                data_len // SECTOR > ctx.capacity - sector:
            note_fault(ctx, F_REQUEST)
            complete(ctx, s, S_IOERR)
            return 0
        s.offset = sector * SECTOR
        s.nbytes = data_len
        s.used_len = <uint32_t>(data_len + 1) if rtype == T_IN else 1
        if data_len == 0:
            complete(ctx, s, S_OK)
            return 0
        s.op = OP_READ if rtype == T_IN else OP_WRITE
        s.fd = ctx.fd_direct
        if s.fd != ctx.fd_buffered and not iov_aligned(s):
            s.fd = ctx.fd_buffered
            ctx.buffered_fallbacks += 1
        return 1
    if rtype == T_FLUSH:
        if ctx.read_only:
            complete(ctx, s, S_OK)
            return 0
        s.op = OP_FLUSH
        s.fd = ctx.fd_buffered
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
        s.op = OP_FALLOC
        s.fd = ctx.fd_buffered
        s.offset = ws * SECTOR
        s.nbytes = wn * SECTOR
        if rtype == T_DISCARD or (wflags & WZ_FLAG_UNMAP):
            s.falloc_mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        else:
            s.falloc_mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        return 1
    complete(ctx, s, S_UNSUPP)
    return 0


cdef int queue_sqe(blk_ctx_t *ctx, slot_t *s) noexcept nogil:
    cdef io_uring_sqe *sqe = uring_get_sqe(&ctx.ring)
    if sqe == NULL:
        return -1
    sqe.fd = s.fd
    sqe.user_data = <uint64_t>(s - ctx.slots)
    if s.op == OP_READ or s.op == OP_WRITE:
        sqe.opcode = IORING_OP_READV if s.op == OP_READ else IORING_OP_WRITEV
        sqe.addr = <uint64_t>&s.chain.segs[s.first_iov]
        sqe.len = s.niov
        sqe.off = s.offset
        if s.op == OP_WRITE and load_flag(&ctx.write_through):
            sqe.rw_flags = RWF_DSYNC
            ctx.dsync_writes += 1
    elif s.op == OP_FLUSH:
        sqe.opcode = IORING_OP_FSYNC
        sqe.fsync_flags = IORING_FSYNC_DATASYNC
    else:
        sqe.opcode = IORING_OP_FALLOCATE
        sqe.off = s.offset
        sqe.addr = s.nbytes
        sqe.len = s.falloc_mode
    ctx.inflight += 1
    if ctx.inflight > ctx.max_inflight:
        ctx.max_inflight = ctx.inflight
    return 0


cdef int finish(blk_ctx_t *ctx, slot_t *s, long res) noexcept nogil:
    """Handle the result of s's I/O.  Returns 1 if the request was re-issued."""
    if res == -EINVAL and (s.op == OP_READ or s.op == OP_WRITE) and s.fd != ctx.fd_buffered:
        # O_DIRECT refused this buffer/offset: the page-cache fd takes it (same bytes, no copy).
        s.fd = ctx.fd_buffered
        ctx.buffered_fallbacks += 1
        return 1
    if res == -EOPNOTSUPP and s.op == OP_FALLOC and (s.falloc_mode & FALLOC_FL_ZERO_RANGE):
        # tmpfs and some file systems have no ZERO_RANGE; a punched hole reads as zeroes too.
        s.falloc_mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        return 1
    if res == -EAGAIN or res == -EINTR:
        return 1
    vq_failpoint(FP_AFTER_IO)
    if s.op == OP_READ or s.op == OP_WRITE:
        if res == <long>s.nbytes:
            if s.op == OP_READ:
                ctx.bytes_read += s.nbytes
            else:
                ctx.bytes_written += s.nbytes
            complete(ctx, s, S_OK)
        else:
            note_fault(ctx, F_IO)
            complete(ctx, s, S_IOERR)
    else:
        if res == 0:
            complete(ctx, s, S_OK)
        else:
            note_fault(ctx, F_IO)
            complete(ctx, s, S_IOERR)
    release(ctx, s)
    return 0


cdef long sync_io(blk_ctx_t *ctx, slot_t *s) noexcept nogil:
    cdef long r
    if s.op == OP_READ:
        r = preadv(s.fd, &s.chain.segs[s.first_iov], s.niov, s.offset)
    elif s.op == OP_WRITE:
        if load_flag(&ctx.write_through):
            ctx.dsync_writes += 1
            r = pwritev2(s.fd, &s.chain.segs[s.first_iov], s.niov, s.offset, RWF_DSYNC)
        else:
            r = pwritev(s.fd, &s.chain.segs[s.first_iov], s.niov, s.offset)
    elif s.op == OP_FLUSH:
        r = fdatasync(s.fd)
    else:
        r = fallocate(s.fd, s.falloc_mode, s.offset, s.nbytes)
    if r < 0:
        return -errno
    return r


cdef void issue(blk_ctx_t *ctx, slot_t *s) noexcept nogil:
    if ctx.fd_buffered < 0:
        # null device (no backing store, like QEMU's null-co): every request succeeds at once;
        # reads leave the guest's buffers as they are (null-co's default read-zeroes=off).
        finish(ctx, s, <long>s.nbytes if (s.op == OP_READ or s.op == OP_WRITE) else 0)
        return
    if ctx.use_uring:
        if queue_sqe(ctx, s) == 0:
            return
        # SQ full (cannot happen: slots <= SQ entries); fall through to synchronous I/O.
    while finish(ctx, s, sync_io(ctx, s)):
        pass


cdef int reap(blk_ctx_t *ctx) noexcept nogil:
    cdef uring_t *u = &ctx.ring
    cdef uint32_t head = u.cq_head[0]
    cdef uint32_t tail = uq_load_acquire_u32(u.cq_tail)
    cdef io_uring_cqe *cqe
    cdef slot_t *s
    cdef int n = 0
    while head != tail:
        cqe = &u.cqes[head & u.cq_mask]
        s = &ctx.slots[cqe.user_data]
        ctx.inflight -= 1
        head += 1
        n += 1
        if finish(ctx, s, cqe.res):
            queue_sqe(ctx, s)
    uq_store_release_u32(u.cq_head, head)
    return n


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
    while the kernel may still complete into guest memory: an io_uring_enter error (EBUSY with
    a full completion queue, ENOMEM, ...) is retried after reaping what completed, 1 ms apart.
    If the kernel never completes, the worker stays here and its stop times out: WorkerStuck,
    and the protocol keeps the memory mapped."""
    cdef int r
    cdef timespec pause
    pause.tv_sec = 0
    pause.tv_nsec = 1000000
    while ctx.use_uring and ctx.inflight > 0:
        r = uring_submit(&ctx.ring, 1)
        reap(ctx)
        if r < 0 and ctx.inflight > 0:
            ctx.enter_errors += 1
            nanosleep(&pause, NULL)
    flush_used(ctx)


# --- the device's side of the runtime (worker.pyx calls these once per batch / per sleep) ----

cdef int blk_batch(void *dev) noexcept nogil:
    """Pop and issue what the ring holds (up to the free slots), submit it with one
    io_uring_enter, reap completions, publish + notify once.  Returns requests popped."""
    cdef blk_ctx_t *ctx = <blk_ctx_t *>dev
    cdef int popped = 0
    if not ctx.vq.broken:
        popped = drain_avail(ctx)
        if popped < 0:
            if not ctx.broken_noted:
                note_fault(ctx, F_AVAIL)
                ctx.broken_noted = True
            popped = 0
    if ctx.use_uring:
        if ctx.ring.to_submit or ctx.inflight:
            uring_submit(&ctx.ring, 0)
            ctx.uring_enters += 1
        if ctx.inflight:
            reap(ctx)
    flush_used(ctx)
    return popped


cdef int blk_pending(void *dev) noexcept nogil:
    """Poll window: completions waiting in the io_uring CQ count as work."""
    cdef blk_ctx_t *ctx = <blk_ctx_t *>dev
    return ctx.use_uring and ctx.inflight and \
        uq_load_acquire_u32(ctx.ring.cq_tail) != ctx.ring.cq_head[0]


cdef void blk_prepare_wait(void *dev, wk_wait_t *w) noexcept nogil:
    """While requests are in flight, their completions wake us (the io_uring fd)."""
    cdef blk_ctx_t *ctx = <blk_ctx_t *>dev
    if ctx.use_uring and ctx.inflight:
        w.src[w.n].fd = ctx.ring.fd
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


cdef class BlkQueueWorker:
    """One virtio-blk virtqueue.  Built from a QueueHandle by devices/blk.py; `run()` is the
    thread body (GIL released), `stop()` asks it to finish in-flight I/O and return."""
    cdef blk_ctx_t *ctx
    cdef readonly int index
    cdef readonly bint uses_io_uring
    cdef readonly int resubmit_count     # requests recovered from the inflight region
    cdef bytes _keep_table

    def __cinit__(self, int index, int num, uint64_t desc, uint64_t avail, uint64_t used,
                  uint32_t last_avail, bytes region_table, int kick_fd, int call_fd,
                  int fd_direct, int fd_buffered, bint read_only, uint64_t capacity_sectors,
                  bytes serial, bint event_idx=False, bint indirect=True,
                  bint signal_call=False, bint use_io_uring=True,
                  uint64_t max_discard_sectors=0, uint64_t max_write_zeroes_sectors=0,
                  int slots=0, double poll_us=0, bint write_through=False, log=None,
                  inflight=None, bint packed=False):
        cdef const unsigned char *t = region_table
        cdef int k, r
        if len(region_table) % sizeof(mem_region_t):
            raise ValueError("bad region table")
        self.ctx = <blk_ctx_t *>calloc(1, sizeof(blk_ctx_t))
        if self.ctx == NULL:
            raise MemoryError()
        self.ctx.rt.stop_fd = -1
        self.ctx.ring.fd = -1
        self.index = index
        ctx = self.ctx
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
        ctx.fd_direct = fd_direct
        ctx.fd_buffered = fd_buffered
        ctx.read_only = read_only
        ctx.capacity = capacity_sectors
        ctx.max_discard_sectors = max_discard_sectors
        ctx.max_wz_sectors = max_write_zeroes_sectors
        ctx.write_through = write_through
        serial = serial[:ID_BYTES].ljust(ID_BYTES, b"\0")
        memcpy(ctx.serial, PyBytes_AS_STRING(serial), ID_BYTES)
        # In-flight slots: as many as the ring holds, capped (each slot is a ~2.6 KiB chain);
        # 256 keeps QD 128 (the bench's deepest) fully in flight per queue.
        if slots <= 0:
            slots = num if num < 256 else 256
        ctx.nslots = slots
        ctx.slots = <slot_t *>calloc(slots, sizeof(slot_t))
        if ctx.slots == NULL:
            raise MemoryError()
        for k in range(slots):
            ctx.slots[k].next_free = k + 1 if k + 1 < slots else -1
        ctx.free_head = 0
        ctx.use_uring = False
        if use_io_uring:
            entries = 1
            while entries < slots:
                entries <<= 1
            r = uring_setup(&ctx.ring, entries)
            if r == 0:
                ctx.use_uring = True
            else:
                log.error("queue %d: io_uring unavailable (%s): SYNCHRONOUS preadv/pwritev "
                          "fallback, one request at a time", index, os.strerror(-r))
        self.uses_io_uring = ctx.use_uring
        self._keep_table = region_table

    def __dealloc__(self):
        if self.ctx != NULL:
            if self.ctx.use_uring:
                uring_teardown(&self.ctx.ring)
            wk_close(&self.ctx.rt)
            vq_free(&self.ctx.vq)
            free(self.ctx.slots)
            free(self.ctx)
            self.ctx = NULL

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
                if self.ctx.use_uring and (self.ctx.ring.to_submit or self.ctx.inflight):
                    uring_submit(&self.ctx.ring, 0)
                wait_all(self.ctx)
                if r <= 0:
                    break
        return r

    def stop(self):
        wk_stop(&self.ctx.rt)

    def close(self):
        """Release the io_uring and the stop eventfd now (the worker thread has returned)."""
        if self.ctx.use_uring:
            uring_teardown(&self.ctx.ring)
            self.ctx.use_uring = False
        wk_close(&self.ctx.rt)

    def inject_enter_errors(self, int n):
        """Tests: make the next `n` io_uring_enter calls fail (EBUSY), as a kernel short of
        memory or with a full completion queue would."""
        self.ctx.ring.inject_errors = n

    def set_write_through(self, bint on):
        """The guest changed CONFIG_WCE: from the next write on, writes are (not) RWF_DSYNC."""
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
        without locks; read from another thread a value may be one request stale).
        completed: requests returned in the used ring; failed: of those, with a status other
        than OK (or no usable status byte); avail_corrupt: 1 once the avail ring was found
        corrupt (then broken)."""
        from cython_ext.ring import FAULT_NAMES
        c = self.ctx
        return dict(
            requests=c.requests, completed=c.vq.completed, failed=c.failed,
            avail_corrupt=c.vq.faults[F_AVAIL], bytes_read=c.bytes_read,
            bytes_written=c.bytes_written, notifies=c.vq.notifies, kicks=c.vq.kicks,
            uring_enters=c.uring_enters, enter_errors=c.enter_errors,
            buffered_fallbacks=c.buffered_fallbacks, poll_hits=c.rt.poll_hits, sleeps=c.rt.sleeps, dsync_writes=c.dsync_writes,
            broken=bool(c.vq.broken), last_avail=vq_base(&c.vq), inflight=c.inflight,
            max_inflight=c.max_inflight, resubmitted=c.vq.resubmitted,
            faults={FAULT_NAMES[k]: c.vq.faults[k] for k in range(1, NUM_FAULTS)
                    if c.vq.faults[k]})

    def counters(self):
        """This queue in the vocabulary of vhost.device.COUNTER_KEYS (Device.queue_counters;
        the same numbers devices/blk.py derives from stats()): requests = completed (failed
        ones included), errors = failed + 1 per corrupt avail ring, inflight = in the io_uring
        now, dropped = 0."""
        c = self.ctx
        return wk_counters(&c.vq, c.vq.completed, c.bytes_read, c.bytes_written,
                           c.failed + c.vq.faults[F_AVAIL], c.inflight, 0)
