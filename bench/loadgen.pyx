# cython: language_level=3
"""loadgen.pyx: the virtio-blk *driver* loop of the benchmarks, compiled, so the driver is never
the bottleneck.

`vhost.testing.blk.Frontend` does the vhost-user connection, guest RAM and ring setup in Python; a
`QueueLoad` then takes over one of its virtqueues: it pre-allocates `depth` request slots in guest
RAM (16-byte header, `block_size` data buffer, status byte, and a 3-entry indirect table when
INDIRECT_DESC is negotiated and wanted), lays the chains out once, and `run()` drives the
workload with the GIL released for the whole run (on a packed ring -- a PackedVirtQueue, indirect
chains only -- each slot is one INDIRECT descriptor, a batch is made available by its first
descriptor's flags and used descriptors are read in ring order):

* submit: every free slot gets the next offset (random in the range, or sequential), its header
  and status byte are rewritten, its head goes into the avail ring; one avail->idx store per
  batch, then a full fence, then one kick if the backend wants it (VIRTQ_USED_F_NO_NOTIFY, or
  EVENT_IDX avail_event -- what a Linux guest's virtio-blk does per blk-mq batch);
* complete: the used index is busy-polled for `spin_us`, then the driver sleeps in poll(2) on the
  call eventfd (and on the vhost-user socket, to notice a backend that went away);
* every request's latency (CLOCK_MONOTONIC, taken just before the avail->idx store that publishes
  it and when its used entry is first seen) goes into a log-linear histogram (64 sub-buckets per
  power of two: every bucket is narrower than 1/64 of its value, the mid-point is within 0.8%);
* interrupts: "always" (default) keeps the ring asking for a call on the next used entry, as a
  Linux guest does (it disables them only while its handler runs); "sleep" suppresses them while
  the driver polls and asks for one only before it sleeps (a polling driver, DPDK / SPDK style).

Memory ordering (x86-64, TSO): header, status, descriptors and avail ring entries are plain stores
issued before the release store of avail->idx, so the backend never sees an index before the
entries it publishes; a full fence separates that store from the load of avail_event / used
flags (store->load), and the used_event store from the re-check of used->idx before sleeping.
used->idx is loaded with acquire semantics before the used entries and status bytes are read.

`pattern=True` (tests): writes stamp each 8-byte word of the buffer with
`(byte offset in the image) ^ pattern_key(seed)`; reads compare with the same and count mismatches.

Only the bench uses this module; the product never imports it.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from libc.errno cimport errno, EINTR
from posix.unistd cimport read, write
from cython_ext.posix_io cimport *

cdef extern from "vhost_compat.h" nogil:
    void vq_mb()
    uint16_t vq_load_acquire_u16(const void *p)
    uint16_t vq_load_u16(const void *p)
    void vq_store_release_u16(void *p, uint16_t v)
    void vq_store_u16(void *p, uint16_t v)
    void cpu_relax()
    uint64_t mono_ns()

cdef extern from *:
    """
    #include <time.h>
    static inline uint64_t lg_thread_cpu_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    }
    static inline int lg_log2(uint64_t v) { return 63 - __builtin_clzll(v); }
    """
    uint64_t lg_thread_cpu_ns() nogil
    int lg_log2(uint64_t v) nogil

# virtio constants (protocols/virtio.py, protocols/virtio_blk.py; repeated here as C constants)
cdef enum:
    DESC_F_NEXT = 1
    DESC_F_WRITE = 2
    DESC_F_INDIRECT = 4
    USED_F_NO_NOTIFY = 1
    AVAIL_F_NO_INTERRUPT = 1
    T_IN = 0
    T_OUT = 1
    STATUS_POISON = 0xFF
    SLOT_META = 128          # per slot: header @0 (16 bytes), status @16, indirect table @64 (48)
    PDESC_F_AVAIL = 1 << 7   # packed ring (virtio 1.2 §2.8)
    PDESC_F_USED = 1 << 15
    EVENT_F_ENABLE = 0
    EVENT_F_DISABLE = 1

# histogram: 64 sub-buckets per power of two, values in ns
cdef enum:
    SUB_BITS = 6
    SUB = 64
    NBUCKETS = 64 * 59       # the largest index (2^64 - 1) is 64*57 + 127

# run() error codes
cdef enum:
    E_OK = 0
    E_STALL = 1
    E_BAD_ID = 2
    E_USED_JUMP = 3
    E_DISCONNECT = 4
    E_POLL = 5

ERRORS = {E_STALL: "stalled: no completion within stall_timeout",
          E_BAD_ID: "backend returned an unknown or idle head in the used ring",
          E_USED_JUMP: "used idx jumped more than the queue size",
          E_DISCONNECT: "backend closed the vhost-user connection",
          E_POLL: "poll() failed"}

PATTERN_MULT = 0x9E3779B97F4A7C15


cpdef uint64_t pattern_key(uint64_t seed):
    """The word pattern_key(seed) ^ offset is stamped at every 8-byte offset written with
    pattern=True (the same formula a test can recompute)."""
    return (seed * <uint64_t>PATTERN_MULT) ^ <uint64_t>0x5A5A5A5A5A5A5A5A


cdef inline int hist_index(uint64_t v) noexcept nogil:
    cdef int e, k
    if v < 2 * SUB:
        return <int>v
    e = lg_log2(v)
    k = e - SUB_BITS
    return k * SUB + <int>(v >> k)


def bucket_index(uint64_t v):
    """The histogram bucket of a latency of `v` ns."""
    return hist_index(v)


cpdef double bucket_mid(int idx):
    """Representative value (ns) of histogram bucket `idx`: the middle of its range."""
    cdef int k
    cdef uint64_t m
    if idx < 2 * SUB:
        return <double>idx
    k = idx // SUB - 1
    m = <uint64_t>(idx - SUB * k)
    return <double>(m << k) + (<double>((<uint64_t>1) << k) - 1.0) / 2.0


def hist_percentile(hist, double q):
    """The q-quantile (0 < q <= 1) in ns of a histogram {bucket index: count} (as returned in
    run()'s "hist"); None if it is empty.  Several queues' histograms can be merged first
    (`merge_hists`)."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = max(1, int(q * total + 0.999999))
    seen = 0
    for idx in sorted(hist):
        seen += hist[idx]
        if seen >= rank:
            return bucket_mid(idx)
    return bucket_mid(max(hist))


def merge_hists(hists):
    out = {}
    for h in hists:
        for k, v in h.items():
            out[k] = out.get(k, 0) + v
    return out


ctypedef struct slot_t:
    uint8_t *hdr             # host pointers into this process's mapping of guest RAM
    uint8_t *data
    uint8_t *status
    uint64_t t_submit
    uint64_t offset          # byte offset in the device of the request in flight
    uint16_t head            # split: head descriptor index; packed: the buffer id
    uint64_t table_gpa       # packed: guest address of the slot's indirect table
    bint busy

ctypedef struct params_t:
    int op                   # T_IN / T_OUT
    bint random
    uint64_t range_start     # bytes, multiple of block_size
    uint64_t nblocks         # range length in blocks
    uint64_t duration_ns     # 0: no time limit
    uint64_t max_ops         # 0: no op limit
    uint64_t spin_ns
    uint64_t stall_ns
    bint irq_always
    bint pattern
    uint64_t key
    int sock_fd              # -1: not watched

ctypedef struct result_t:
    int error
    uint64_t submitted
    uint64_t completed
    uint64_t bytes
    uint64_t status_errors   # status byte != VIRTIO_BLK_S_OK
    uint64_t no_status       # status byte never written (still 0xFF)
    uint64_t mismatches      # pattern reads whose data differed
    uint64_t short_used      # reads whose used length was below block_size
    uint64_t kicks
    uint64_t kicks_suppressed
    uint64_t calls           # call eventfd found signalled when the driver drained it
    uint64_t sleeps          # poll() sleeps
    uint64_t batches         # submit batches (avail->idx stores)
    uint64_t t_start
    uint64_t t_end           # last completion seen
    uint64_t cpu_ns          # driver thread CPU
    uint64_t lat_sum
    uint64_t lat_min
    uint64_t lat_max
    uint32_t bad_id
    uint16_t used_seen


cdef class QueueLoad:
    """Drive virtqueue `queue` of a connected `vhost.testing.blk.Frontend` with up to `depth`
    requests of `block_size` bytes in flight.  The queue must be idle, and belongs to this object
    until `close()` (which writes the ring indices back to the frontend's VirtQueue); the
    guest-RAM blocks it allocated are freed there too.  Several QueueLoads on different queues
    of one frontend may `run()` concurrently from different threads."""

    cdef readonly int queue, depth, block_size
    cdef readonly bint event_idx, indirect, packed
    # packed ring state (VIRTIO_F_RING_PACKED): positions and wrap counters; avail_idx and
    # last_used then count chains made available / used descriptors consumed
    cdef uint16_t next_avail, next_used, first_pos, first_flags
    cdef bint avail_wrap, used_wrap
    cdef readonly uint16_t num
    cdef readonly uint64_t capacity_bytes
    cdef uint8_t *desc
    cdef uint8_t *avail
    cdef uint8_t *used
    cdef int kick_fd, call_fd, sock_fd
    cdef slot_t *slots
    cdef int32_t *head_to_slot
    cdef int *free_stack
    cdef int nfree
    cdef int laid_out_op
    cdef uint16_t avail_idx, last_used, kick_old
    cdef uint64_t rng, seq_pos
    cdef uint64_t *hist
    cdef object fe, vq, blocks
    cdef bint closed

    def __cinit__(self):
        self.slots = NULL
        self.head_to_slot = NULL
        self.free_stack = NULL
        self.hist = NULL
        self.closed = True

    def __init__(self, frontend, int queue=0, *, int depth=32, int block_size=4096,
                 indirect=None):
        cdef int i
        cdef uint8_t *t
        cdef uint64_t m_gpa, dt_gpa
        if not frontend._started or frontend.mem is None:
            raise ValueError("the frontend is not connected")
        if not 0 <= queue < len(frontend.queues):
            raise ValueError(f"queue {queue} does not exist")
        if block_size <= 0 or block_size % 512:
            raise ValueError(f"block_size {block_size} must be a positive multiple of 512")
        vq = frontend.queues[queue]
        if vq.in_flight:
            raise ValueError(f"queue {queue} has {vq.in_flight} chains in flight")
        if indirect is None:
            indirect = frontend.has_indirect
        elif indirect and not frontend.has_indirect:
            raise ValueError("INDIRECT_DESC was not negotiated")
        self.packed = getattr(vq, "packed", False)
        if self.packed and not indirect:
            raise ValueError("the packed-ring load uses indirect chains only")
        per = 1 if indirect else 3
        if depth < 1 or depth * per > vq.size:
            raise ValueError(f"depth {depth} needs {depth * per} descriptors, queue {queue} has "
                             f"{vq.size}")
        self.fe, self.vq = frontend, vq
        self.queue, self.depth, self.block_size = queue, depth, block_size
        self.event_idx = vq.event_idx
        self.indirect = bool(indirect)
        self.num = vq.size
        self.kick_fd, self.call_fd = vq.kick_fd, vq.call_fd
        try:
            self.sock_fd = frontend.sock.fileno()
        except Exception:
            self.sock_fd = -1
        cap = getattr(frontend.config, "capacity", None) if frontend.config is not None else None
        self.capacity_bytes = (cap or 0) * 512
        mem = frontend.mem
        base = mem.base_va
        self.desc = <uint8_t *><size_t>(base + mem.offset(vq.desc_gpa, 16 * vq.size))
        if self.packed:     # the driver and device event suppression structures
            self.avail = <uint8_t *><size_t>(base + mem.offset(vq.avail_gpa, 4))
            self.used = <uint8_t *><size_t>(base + mem.offset(vq.used_gpa, 4))
            self.next_avail, self.avail_wrap = vq.next_avail, vq.avail_wrap
            self.next_used, self.used_wrap = vq.next_used, vq.used_wrap
        else:
            self.avail = <uint8_t *><size_t>(base + mem.offset(vq.avail_gpa, 6 + 2 * vq.size))
            self.used = <uint8_t *><size_t>(base + mem.offset(vq.used_gpa, 6 + 8 * vq.size))
        self.avail_idx = vq.avail_idx
        self.last_used = vq.last_used_idx
        self.kick_old = vq.avail_idx
        self.rng = 0x2545F4914F6CDD1D
        self.seq_pos = 0
        self.slots = <slot_t *>calloc(depth, sizeof(slot_t))
        self.head_to_slot = <int32_t *>calloc(vq.size, sizeof(int32_t))
        self.free_stack = <int *>calloc(depth, sizeof(int))
        self.hist = <uint64_t *>calloc(NBUCKETS, sizeof(uint64_t))
        if not (self.slots and self.head_to_slot and self.free_stack and self.hist):
            raise MemoryError()
        meta_gpa = mem.alloc(depth * SLOT_META, align=64)
        try:
            data_gpa = mem.alloc(depth * block_size, align=4096)
        except BaseException:
            mem.free(meta_gpa)
            raise
        self.blocks = [meta_gpa, data_gpa]
        self.closed = False
        meta_host = base + mem.offset(meta_gpa, depth * SLOT_META)
        data_host = base + mem.offset(data_gpa, depth * block_size)
        memset(<void *><size_t>meta_host, 0, depth * SLOT_META)
        memset(<void *><size_t>data_host, 0xA5, depth * block_size)
        for i in range(vq.size):
            self.head_to_slot[i] = -1
        for i in range(depth):
            m_gpa = meta_gpa + i * SLOT_META
            dt_gpa = data_gpa + <uint64_t>i * block_size
            self.slots[i].hdr = <uint8_t *><size_t>(meta_host + i * SLOT_META)
            self.slots[i].status = self.slots[i].hdr + 16
            self.slots[i].data = <uint8_t *><size_t>(data_host + i * block_size)
            if self.packed:
                # packed indirect table (addr, len, id, flags): walked to its length, no NEXT
                t = self.slots[i].hdr + 64
                _pdesc(t, 0, m_gpa, 16, 0)
                _pdesc(t, 1, dt_gpa, block_size, 0)
                _pdesc(t, 2, m_gpa + 16, 1, DESC_F_WRITE)
                self.slots[i].head = i
                self.slots[i].table_gpa = m_gpa + 64
            elif self.indirect:
                t = self.slots[i].hdr + 64
                _desc(t, 0, m_gpa, 16, DESC_F_NEXT, 1)
                _desc(t, 1, dt_gpa, block_size, DESC_F_NEXT, 2)
                _desc(t, 2, m_gpa + 16, 1, DESC_F_WRITE, 0)
                self.slots[i].head = i
                _desc(self.desc, i, m_gpa + 64, 48, DESC_F_INDIRECT, 0)
            else:
                self.slots[i].head = 3 * i
                _desc(self.desc, 3 * i, m_gpa, 16, DESC_F_NEXT, 3 * i + 1)
                _desc(self.desc, 3 * i + 1, dt_gpa, block_size, DESC_F_NEXT, 3 * i + 2)
                _desc(self.desc, 3 * i + 2, m_gpa + 16, 1, DESC_F_WRITE, 0)
            self.head_to_slot[self.slots[i].head] = i
            self.free_stack[i] = depth - 1 - i
        self.nfree = depth
        self.laid_out_op = T_OUT     # data descriptors are device-readable as laid out

    def __dealloc__(self):
        free(self.slots)
        free(self.head_to_slot)
        free(self.free_stack)
        free(self.hist)

    cdef void _set_op(self, int op) noexcept nogil:
        """Flip the data descriptors' WRITE flag for reads (device writes) / writes."""
        cdef int i
        cdef uint8_t *d
        cdef uint16_t fl = DESC_F_NEXT | (DESC_F_WRITE if op == T_IN else 0)
        if op == self.laid_out_op:
            return
        for i in range(self.depth):
            if self.packed:
                d = self.slots[i].hdr + 64 + 16
                (<uint16_t *>(d + 14))[0] = DESC_F_WRITE if op == T_IN else 0
                continue
            if self.indirect:
                d = self.slots[i].hdr + 64 + 16
            else:
                d = self.desc + 16 * (3 * i + 1)
            (<uint16_t *>(d + 12))[0] = fl
        self.laid_out_op = op

    cdef inline uint64_t _next_offset(self, params_t *p) noexcept nogil:
        cdef uint64_t x, b
        if p.random:
            # xorshift64*
            x = self.rng
            x ^= x >> 12
            x ^= x << 25
            x ^= x >> 27
            self.rng = x
            b = ((x * <uint64_t>0x2545F4914F6CDD1D) >> 11) % p.nblocks
        else:
            b = self.seq_pos
            self.seq_pos += 1
            if self.seq_pos >= p.nblocks:
                self.seq_pos = 0
        return p.range_start + b * <uint64_t>self.block_size

    cdef inline bint _kick_needed(self) noexcept nogil:
        cdef uint16_t new = self.avail_idx, old = self.kick_old, ev
        self.kick_old = new
        if self.packed:
            return vq_load_u16(self.used + 2) != EVENT_F_DISABLE
        if self.event_idx:
            ev = vq_load_u16(self.used + 4 + 8 * <size_t>self.num)
            return <uint16_t>(new - ev - 1) < <uint16_t>(new - old)
        return not (vq_load_u16(self.used) & USED_F_NO_NOTIFY)

    cdef inline bint _has_used(self) noexcept nogil:
        cdef uint16_t fl
        if self.packed:
            fl = vq_load_acquire_u16(self.desc + 16 * <size_t>self.next_used + 14)
            return ((fl & PDESC_F_AVAIL) != 0) == self.used_wrap and \
                ((fl & PDESC_F_USED) != 0) == self.used_wrap
        return vq_load_u16(self.used + 2) != self.last_used

    cdef inline void _irq_enable(self) noexcept nogil:
        if self.packed:
            vq_store_u16(self.avail + 2, EVENT_F_ENABLE)
            return
        if self.event_idx:
            vq_store_u16(self.avail + 4 + 2 * <size_t>self.num, self.last_used)
        else:
            vq_store_u16(self.avail, 0)

    cdef inline void _irq_disable(self) noexcept nogil:
        if self.packed:
            vq_store_u16(self.avail + 2, EVENT_F_DISABLE)
            return
        if self.event_idx:
            # an index the used ring reaches only after 65535 more entries
            vq_store_u16(self.avail + 4 + 2 * <size_t>self.num, <uint16_t>(self.last_used - 1))
        else:
            vq_store_u16(self.avail, AVAIL_F_NO_INTERRUPT)

    cdef int _reap_packed(self, params_t *p, result_t *r) noexcept nogil:
        """_reap for a packed ring: used descriptors from next_used while their AVAIL and USED
        bits equal the used wrap counter (one slot per request: indirect chains)."""
        cdef int n = 0
        cdef uint8_t *e
        cdef uint64_t t = 0
        while n < self.num and self._has_used():
            if n == 0:
                t = mono_ns()
            e = self.desc + 16 * <size_t>self.next_used
            if self._complete(p, r, (<uint16_t *>(e + 12))[0], (<uint32_t *>(e + 8))[0], t) < 0:
                return -1
            self.next_used += 1
            if self.next_used == self.num:
                self.next_used = 0
                self.used_wrap = not self.used_wrap
            self.last_used = <uint16_t>(self.last_used + 1)
            n += 1
        if n:
            r.completed += n
            r.t_end = t
        return n

    cdef int _reap(self, params_t *p, result_t *r) noexcept nogil:
        """Consume new used entries; returns how many (or -1 on a ring error, in r.error)."""
        cdef uint16_t used_idx
        cdef uint16_t pending
        cdef uint16_t k
        cdef uint64_t t
        cdef uint8_t *e
        if self.packed:
            return self._reap_packed(p, r)
        used_idx = vq_load_acquire_u16(self.used + 2)
        pending = <uint16_t>(used_idx - self.last_used)
        if pending == 0:
            return 0
        if pending > self.num:
            r.error = E_USED_JUMP
            r.used_seen = used_idx
            return -1
        t = mono_ns()
        for k in range(pending):
            e = self.used + 4 + 8 * <size_t>(<uint16_t>(self.last_used + k) % self.num)
            if self._complete(p, r, (<uint32_t *>e)[0], (<uint32_t *>e)[1], t) < 0:
                return -1
        self.last_used = used_idx
        r.completed += pending
        r.t_end = t
        return pending

    cdef inline int _complete(self, params_t *p, result_t *r, uint32_t uid, uint32_t ulen,
                              uint64_t t) noexcept nogil:
        """One used entry: check its id, the status and (pattern reads) the data, latency."""
        cdef int s
        cdef slot_t *sl
        cdef uint64_t lat, nw, i
        cdef uint64_t *words
        cdef uint8_t st
        if uid >= self.num or self.head_to_slot[uid] < 0 or \
                not self.slots[self.head_to_slot[uid]].busy:
            r.error = E_BAD_ID
            r.bad_id = uid
            return -1
        s = self.head_to_slot[uid]
        sl = &self.slots[s]
        st = sl.status[0]
        if st != 0:
            r.status_errors += 1
            if st == STATUS_POISON:
                r.no_status += 1
        else:
            r.bytes += <uint64_t>self.block_size
            if p.op == T_IN:
                if ulen < <uint32_t>self.block_size:
                    r.short_used += 1
                if p.pattern:
                    words = <uint64_t *>sl.data
                    nw = <uint64_t>self.block_size // 8
                    for i in range(nw):
                        if words[i] != ((sl.offset + 8 * i) ^ p.key):
                            r.mismatches += 1
                            break
        lat = t - sl.t_submit
        self.hist[hist_index(lat)] += 1
        r.lat_sum += lat
        if lat < r.lat_min:
            r.lat_min = lat
        if lat > r.lat_max:
            r.lat_max = lat
        sl.busy = False
        self.free_stack[self.nfree] = s
        self.nfree += 1
        return 0

    cdef void _submit(self, params_t *p, result_t *r, uint64_t now) noexcept nogil:
        cdef int n = 0, s, j
        cdef int batch[1024]       # slots of this batch (depth <= queue size <= 32768: chunked)
        cdef slot_t *sl
        cdef uint64_t off, i, nw, t
        cdef uint64_t *words
        cdef uint8_t *h
        cdef uint64_t one = 1
        while self.nfree > 0 and n < 1024 and (p.max_ops == 0 or r.submitted < p.max_ops):
            self.nfree -= 1
            s = self.free_stack[self.nfree]
            sl = &self.slots[s]
            off = self._next_offset(p)
            sl.offset = off
            sl.busy = True
            h = sl.hdr
            (<uint32_t *>h)[0] = <uint32_t>p.op
            (<uint32_t *>h)[1] = 0
            (<uint64_t *>(h + 8))[0] = off >> 9
            sl.status[0] = STATUS_POISON
            if p.pattern and p.op == T_OUT:
                words = <uint64_t *>sl.data
                nw = <uint64_t>self.block_size // 8
                for i in range(nw):
                    words[i] = (off + 8 * i) ^ p.key
            if self.packed:
                self._put_packed(sl, n == 0)
            else:
                (<uint16_t *>(self.avail + 4))[<uint16_t>(self.avail_idx + n) % self.num] = \
                    sl.head
            batch[n] = s
            n += 1
            r.submitted += 1
        if n == 0:
            return
        t = mono_ns()
        for j in range(n):
            self.slots[batch[j]].t_submit = t
        self.avail_idx = <uint16_t>(self.avail_idx + n)
        if self.packed:
            # the batch's first descriptor's flags, stored last, make the whole batch available
            vq_store_release_u16(self.desc + 16 * <size_t>self.first_pos + 14, self.first_flags)
        else:
            # everything above is published by this release store (x86: plain stores stay
            # ordered)
            vq_store_release_u16(self.avail + 2, self.avail_idx)
        r.batches += 1
        vq_mb()            # avail idx store before the avail_event / used flags load
        if self._kick_needed():
            write(self.kick_fd, &one, 8)
            r.kicks += 1
        else:
            r.kicks_suppressed += 1

    cdef inline void _put_packed(self, slot_t *sl, bint first) noexcept nogil:
        """Write the slot's INDIRECT descriptor at next_avail; the batch's first keeps its
        flags back (first_pos / first_flags) until _submit has written the rest."""
        cdef uint8_t *d = self.desc + 16 * <size_t>self.next_avail
        cdef uint16_t fl = DESC_F_INDIRECT | (PDESC_F_AVAIL if self.avail_wrap else PDESC_F_USED)
        (<uint64_t *>d)[0] = sl.table_gpa
        (<uint32_t *>(d + 8))[0] = 48
        (<uint16_t *>(d + 12))[0] = sl.head
        if first:
            self.first_pos = self.next_avail
            self.first_flags = fl
        else:
            (<uint16_t *>(d + 14))[0] = fl
        self.next_avail += 1
        if self.next_avail == self.num:
            self.next_avail = 0
            self.avail_wrap = not self.avail_wrap

    cdef int _run(self, params_t *p, result_t *r) noexcept nogil:
        cdef uint64_t t, deadline, last_progress, spin_start, cnt, cpu0
        cdef int got, rc, timeout_ms
        cdef bint stopping = False
        cdef pollfd fds[2]
        cdef int nfds = 1
        fds[0].fd = self.call_fd
        fds[0].events = POLLIN
        if p.sock_fd >= 0:
            fds[1].fd = p.sock_fd
            fds[1].events = POLLRDHUP
            nfds = 2
        cpu0 = lg_thread_cpu_ns()
        t = mono_ns()
        r.t_start = t
        r.t_end = t
        deadline = t + p.duration_ns if p.duration_ns else <uint64_t>-1
        last_progress = t
        if p.irq_always:
            self._irq_enable()
        else:
            self._irq_disable()
        while True:
            # -- submit into every free slot --
            if not stopping:
                if p.max_ops and r.submitted >= p.max_ops:
                    stopping = True
                elif self.nfree > 0:
                    t = mono_ns()
                    if t >= deadline:
                        stopping = True
                    else:
                        self._submit(p, r, t)
            if stopping and self.nfree == self.depth:
                break
            # -- complete --
            got = self._reap(p, r)
            if got < 0:
                break
            if got > 0:
                last_progress = r.t_end
                if p.irq_always:
                    self._irq_enable()
                continue
            if self.nfree == self.depth:
                continue        # nothing in flight (max_ops reached / deadline): loop decides
            spin_start = mono_ns()
            got = 0
            while mono_ns() - spin_start < p.spin_ns:
                if self._has_used():
                    got = 1
                    break
                cpu_relax()
            if got:
                continue
            # -- sleep on the call eventfd --
            self._irq_enable()
            if read(self.call_fd, &cnt, 8) == 8:
                r.calls += 1
            vq_mb()            # used_event / flags store before the used idx re-check
            if self._has_used():
                if not p.irq_always:
                    self._irq_disable()
                continue
            t = mono_ns()
            if t - last_progress >= p.stall_ns:
                r.error = E_STALL
                break
            timeout_ms = <int>((p.stall_ns - (t - last_progress)) // 1000000) + 1
            if timeout_ms > 100:
                timeout_ms = 100
            r.sleeps += 1
            rc = poll(fds, nfds, timeout_ms)
            if rc < 0 and errno != EINTR:
                r.error = E_POLL
                break
            if nfds == 2 and fds[1].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL):
                r.error = E_DISCONNECT
                break
            if fds[0].revents & POLLIN:
                if read(self.call_fd, &cnt, 8) == 8:
                    r.calls += 1
            if not p.irq_always:
                self._irq_disable()
        r.cpu_ns = lg_thread_cpu_ns() - cpu0
        return r.error

    def run(self, op="read", *, random=True, duration=None, ops=None, range_start=0,
            range_len=None, spin_us=50.0, stall_timeout=10.0, interrupts="always",
            pattern=False, pattern_seed=0, seed=None, keep_hist=True):
        """Run one workload until `duration` seconds have passed or `ops` requests were
        submitted (whichever first; at least one must be given), then wait for every request in
        flight.  `op` "read" / "write"; offsets are `block_size`-aligned in
        [range_start, range_start + range_len) (default: the whole device), random (`seed`
        reseeds the generator) or sequential (continuing where the last sequential run stopped).
        Returns a dict: ops, bytes, elapsed_s (first submit to last completion), iops, mib_s,
        lat_mean_us / lat_min_us / lat_max_us / p50_us / p90_us / p99_us / p999_us, errors
        (status != OK), no_status, mismatches (pattern reads), short_used, kicks,
        kicks_suppressed, calls, sleeps, batches, driver_cpu_s, hist ({bucket: count}, for
        merging queues).  Raises RuntimeError on a stall, a ring error or a disconnect (the
        partial result is in the exception's second argument)."""
        cdef params_t p
        cdef result_t r
        if self.closed:
            raise ValueError("QueueLoad is closed")
        if self.nfree != self.depth:
            raise ValueError(f"{self.depth - self.nfree} requests of a failed run are still in "
                             f"flight")
        if duration is None and ops is None:
            raise ValueError("give duration and/or ops")
        if op not in ("read", "write"):
            raise ValueError(f"op {op!r} is neither 'read' nor 'write'")
        if interrupts not in ("always", "sleep"):
            raise ValueError(f"interrupts {interrupts!r} is neither 'always' nor 'sleep'")
        bs = self.block_size
        if range_len is None:
            if not self.capacity_bytes:
                raise ValueError("device capacity unknown: give range_len")
            range_len = self.capacity_bytes - range_start
        if range_start % bs or range_len < bs:
            raise ValueError(f"range [{range_start}, +{range_len}) does not hold an aligned "
                             f"block of {bs}")
        if self.capacity_bytes and range_start + range_len > self.capacity_bytes:
            raise ValueError(f"range ends past the device capacity {self.capacity_bytes}")
        memset(&p, 0, sizeof(p))
        memset(&r, 0, sizeof(r))
        p.op = T_IN if op == "read" else T_OUT
        p.random = bool(random)
        p.range_start = range_start
        p.nblocks = range_len // bs
        p.duration_ns = int(duration * 1e9) if duration is not None else 0
        if duration is not None and p.duration_ns == 0:
            p.duration_ns = 1
        p.max_ops = int(ops) if ops is not None else 0
        if ops is not None and p.max_ops == 0:
            raise ValueError("ops must be positive")
        p.spin_ns = int(spin_us * 1e3)
        p.stall_ns = max(1, int(stall_timeout * 1e9))
        p.irq_always = interrupts == "always"
        p.pattern = bool(pattern)
        p.key = pattern_key(pattern_seed)
        p.sock_fd = self.sock_fd
        if seed is not None:
            self.rng = (int(seed) * PATTERN_MULT + 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF or 1
        r.lat_min = <uint64_t>-1
        memset(self.hist, 0, NBUCKETS * sizeof(uint64_t))
        self._set_op(p.op)
        with nogil:
            self._run(&p, &r)
        self._sync_vq()
        res = self._result(&r, keep_hist)
        if r.error:
            msg = ERRORS.get(r.error, f"error {r.error}")
            if r.error == E_BAD_ID:
                msg += f" (id {r.bad_id})"
            elif r.error == E_USED_JUMP:
                msg += f" (used idx {r.used_seen}, last seen {self.last_used})"
            raise RuntimeError(f"queue {self.queue}: {msg}; {self.depth - self.nfree} requests "
                               f"in flight, {r.completed} completed", res)
        return res

    cdef dict _result(self, result_t *r, bint keep_hist):
        cdef int i
        hist = {}
        for i in range(NBUCKETS):
            if self.hist[i]:
                hist[i] = self.hist[i]
        elapsed = (r.t_end - r.t_start) / 1e9
        n = r.completed
        res = dict(
            ops=n, bytes=r.bytes, elapsed_s=elapsed,
            iops=n / elapsed if elapsed > 0 else 0.0,
            mib_s=r.bytes / elapsed / 1048576 if elapsed > 0 else 0.0,
            lat_mean_us=r.lat_sum / n / 1e3 if n else None,
            lat_min_us=r.lat_min / 1e3 if n else None,
            lat_max_us=r.lat_max / 1e3 if n else None,
            errors=r.status_errors, no_status=r.no_status, mismatches=r.mismatches,
            short_used=r.short_used, submitted=r.submitted, kicks=r.kicks,
            kicks_suppressed=r.kicks_suppressed, calls=r.calls, sleeps=r.sleeps,
            batches=r.batches, driver_cpu_s=r.cpu_ns / 1e9,
            queue=self.queue, depth=self.depth, block_size=self.block_size,
            event_idx=bool(self.event_idx), indirect=bool(self.indirect))
        for name, q in (("p50_us", 0.5), ("p90_us", 0.9), ("p99_us", 0.99), ("p999_us", 0.999)):
            v = hist_percentile(hist, q)
            res[name] = v / 1e3 if v is not None else None
        if keep_hist:
            res["hist"] = hist
        return res

    cdef _sync_vq(self):
        # the frontend's shadows follow the ring, so its close() / later requests stay right
        self.vq.avail_idx = self.avail_idx
        self.vq.last_used_idx = self.last_used
        self.vq._kick_old = self.avail_idx
        if self.packed:
            self.vq.next_avail, self.vq.avail_wrap = self.next_avail, self.avail_wrap
            self.vq.next_used, self.vq.used_wrap = self.next_used, self.used_wrap

    @property
    def in_flight(self):
        return self.depth - self.nfree

    def close(self):
        """Give the queue back to the frontend (ring indices synced) and free the slots'
        guest RAM.  Requests still in flight (after a failed run) keep their blocks."""
        if self.closed:
            return
        self.closed = True
        self._sync_vq()
        if self.nfree == self.depth and self.fe.mem is not None and self.fe.mem.mm is not None:
            for gpa in self.blocks:
                self.fe.mem.free(gpa)
        self.blocks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef inline void _desc(uint8_t *table, int i, uint64_t addr, uint32_t length, uint16_t flags,
                       uint16_t nxt) noexcept nogil:
    cdef uint8_t *d = table + 16 * <size_t>i
    (<uint64_t *>d)[0] = addr
    (<uint32_t *>(d + 8))[0] = length
    (<uint16_t *>(d + 12))[0] = flags
    (<uint16_t *>(d + 14))[0] = nxt


cdef inline void _pdesc(uint8_t *table, int i, uint64_t addr, uint32_t length,
                        uint16_t flags) noexcept nogil:
    cdef uint8_t *d = table + 16 * <size_t>i
    (<uint64_t *>d)[0] = addr
    (<uint32_t *>(d + 8))[0] = length
    (<uint16_t *>(d + 12))[0] = 0
    (<uint16_t *>(d + 14))[0] = flags
