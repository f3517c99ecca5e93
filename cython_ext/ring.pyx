# cython: language_level=3
"""ring.pyx: the split virtqueue engine (virtio 1.2 §2.7), run by device workers with the GIL
released.

Owns: walking descriptor chains (direct and INDIRECT_DESC) with every guest address and length
checked against the region table, chain bounds (loops, over-long chains, bad `next`), the used
ring (batched publish with release ordering), EVENT_IDX / NO_INTERRUPT call suppression and
EVENT_IDX / NO_NOTIFY kick suppression, and the dirty log of live migration (VHOST_F_LOG_ALL:
the bit of every guest page a worker writes, used ring included, set after the write), and
inflight tracking (INFLIGHT_SHMFD: which heads were popped and not yet completed, kept in the
frontend's inflight region so that a restarted backend resubmits exactly those).  Must not: touch Python objects on the data path, trust
any value read from guest memory before checking it, or read a guest value twice (descriptors are
copied out once).  `RingProbe` is a Python-visible handle for tests and microbenchmarks only.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, UINT64_MAX
from libc.stdlib cimport malloc, calloc, free, qsort
from libc.string cimport memcpy, memset
from posix.unistd cimport write, getpid
from posix.signal cimport kill
from libc.signal cimport SIGKILL
import os as _os

cdef enum:
    DESC_F_NEXT = 1
    DESC_F_WRITE = 2
    DESC_F_INDIRECT = 4
    AVAIL_F_NO_INTERRUPT = 1
    USED_F_NO_NOTIFY = 1
    # packed ring (§2.8.1, §2.8.10)
    PDESC_F_AVAIL = 1 << 7
    PDESC_F_USED = 1 << 15
    EVENT_F_ENABLE = 0
    EVENT_F_DISABLE = 1
    EVENT_F_DESC = 2

# True when built with PYVHOST_DEBUG_BUILD=1 (bounds checks, line tracing).
DEBUG_BUILD = bool(PYVHOST_DEBUG)

FAULT_NAMES = {
    F_BAD_NEXT: "descriptor next index out of range",
    F_LOOP: "descriptor chain loops or is longer than the queue",
    F_ADDR: "descriptor address/length outside guest memory",
    F_INDIRECT: "bad indirect descriptor table",
    F_TOO_MANY_SEGS: "chain has too many segments",
    F_ORDER: "device-readable descriptor after a device-writable one",
    F_HEADER: "request header missing or too short",
    F_STATUS: "no device-writable status byte",
    F_REQUEST: "invalid request (range, alignment or direction)",
    F_AVAIL: "avail ring corrupt (index or head out of range): queue broken",
    F_IO: "backing store I/O error",
}

# The numbers above that mirror protocols/virtio.py (tests/test_c_constants.py checks them).
C_CONSTANTS = {
    "virtio.VIRTQ_DESC_F_NEXT": DESC_F_NEXT, "virtio.VIRTQ_DESC_F_WRITE": DESC_F_WRITE,
    "virtio.VIRTQ_DESC_F_INDIRECT": DESC_F_INDIRECT,
    "virtio.VIRTQ_AVAIL_F_NO_INTERRUPT": AVAIL_F_NO_INTERRUPT,
    "virtio.VIRTQ_USED_F_NO_NOTIFY": USED_F_NO_NOTIFY,
    "virtio.VIRTQ_DESC_F_AVAIL": PDESC_F_AVAIL, "virtio.VIRTQ_DESC_F_USED": PDESC_F_USED,
    "virtio.RING_EVENT_FLAGS_ENABLE": EVENT_F_ENABLE,
    "virtio.RING_EVENT_FLAGS_DISABLE": EVENT_F_DISABLE,
    "virtio.RING_EVENT_FLAGS_DESC": EVENT_F_DESC,
    "virtio.DESC_SIZE": sizeof(vring_desc_t), "virtio.MAX_QUEUE_SIZE": MAX_INDIRECT,
    "vhost_user.INFLIGHT_VERSION": INFLIGHT_VERSION,
    "vhost_user.INFLIGHT_HEADER_SIZE": IF_DESC_OFF,
    "vhost_user.INFLIGHT_DESC_SIZE": IF_DESC_SIZE,
    "vhost_user.INFLIGHT_PACKED_HEADER_SIZE": IFP_DESC_OFF,
    "vhost_user.INFLIGHT_PACKED_ENTRY_SIZE": IFP_ENTRY,
}



cdef inline uint16_t *_avail_idx(vq_t *vq) noexcept nogil:
    return <uint16_t *>(vq.avail + 2)


cdef inline uint16_t *_used_idx(vq_t *vq) noexcept nogil:
    return <uint16_t *>(vq.used + 2)


cdef enum:
    # The split ring's inflight region, QueueRegionSplit of the vhost-user spec ("Inflight I/O
    # tracking"), one per queue in the GET_INFLIGHT_FD fd (protocols/vhost_user.py
    # inflight_queue_size lays them out): u64 features, u16 version, u16 desc_num,
    # u16 last_batch_head, u16 used_idx, then desc_num DescStateSplit entries of
    # {u8 inflight, u8 padding[5], u16 next, u64 counter}.
    IF_VERSION_OFF = 8
    IF_DESC_NUM_OFF = 10
    IF_LAST_BATCH_OFF = 12
    IF_USED_IDX_OFF = 14
    IF_DESC_OFF = 16
    IF_DESC_SIZE = 16
    IF_DS_COUNTER_OFF = 8
    INFLIGHT_VERSION = 1
    # The packed ring's region (our layout: the frontend never reads the region, and the
    # packed ring overwrites descriptors with used ones, so each in-flight buffer keeps a copy
    # of its descriptors): u64 features (bit 0: this layout), u16 version, u16 desc_num,
    # u16 avail checkpoint, u16 used checkpoint (position | wrap << 15), 16 bytes reserved;
    # then per buffer id < desc_num: u8 inflight, u8 ndescs, u16 head position | wrap << 15,
    # u32 reserved, u64 counter, PK_COPIES descriptor copies (16 bytes each).
    IFP_FEATURE = 1
    IFP_AVAIL_OFF = 12
    IFP_USED_OFF = 14
    IFP_DESC_OFF = 32
    IFP_ENTRY = 80
    IFP_COPIES_OFF = 16
    PK_COPIES = 4           # a chain of more ring descriptors is not tracked (counted);
                            # Linux's virtio-blk uses one INDIRECT descriptor per request


# --- fail points (tests) -----------------------------------------------------------------------
#
# PYVHOST_FAILPOINT=name:n (read once, at import): the n-th time any worker passes the named
# point, the process sends itself SIGKILL -- a kill -9 at exactly that instruction, which is
# what inflight tracking must survive (tests/integration/test_inflight.py).  Unset: one load of
# a never-written int per pass.
FAILPOINTS = {"after-pop": FP_AFTER_POP, "after-io": FP_AFTER_IO, "after-push": FP_AFTER_PUSH,
              "mid-publish": FP_MID_PUBLISH}
cdef int _fp_point = FP_NONE
cdef int _fp_count = 0


def _arm_failpoint(spec):
    global _fp_point, _fp_count
    name, _, n = spec.partition(":")
    if name not in FAILPOINTS:
        raise ValueError(f"PYVHOST_FAILPOINT: unknown point {name!r} (one of "
                         f"{', '.join(sorted(FAILPOINTS))})")
    _fp_count = int(n or "1")
    _fp_point = FAILPOINTS[name]


if _os.environ.get("PYVHOST_FAILPOINT"):
    _arm_failpoint(_os.environ["PYVHOST_FAILPOINT"])


# PYVHOST_LOG_SHADOW=FILE (read once, at import; a diagnostic): every dirty-log bit a worker
# sets is also set in FILE (a bitmap of 4 KiB guest pages, 1 MiB: 32 GiB of guest memory),
# which nobody clears, so that after a migration it says which pages the device ever wrote
# (bench/migration_ramdiff.py compares it with the pages the migration lost).
cdef uint8_t *_shadow = NULL
cdef uint64_t _shadow_size = 0
_shadow_map = None

if _os.environ.get("PYVHOST_LOG_SHADOW"):
    import mmap as _mmap
    with open(_os.environ["PYVHOST_LOG_SHADOW"], "a+b") as _f:
        _f.truncate(1 << 20)
        _shadow_map = _mmap.mmap(_f.fileno(), 1 << 20)
    import ctypes as _ctypes
    _shadow = <uint8_t *><uint64_t>_ctypes.addressof(_ctypes.c_char.from_buffer(_shadow_map))
    _shadow_size = 1 << 20


cdef void vq_failpoint(int point) noexcept nogil:
    if _fp_point == point and fp_hit(&_fp_count):
        kill(getpid(), SIGKILL)


cdef int vq_init(vq_t *vq, uint16_t num, uint64_t desc, uint64_t avail, uint64_t used,
                 uint32_t base, bint event_idx, bint indirect, int call_fd,
                 const mem_region_t *regions, int nregions, bint packed=False) noexcept nogil:
    memset(vq, 0, sizeof(vq_t))
    if num == 0 or (num & (num - 1)) != 0:
        return -1
    vq.num = num
    vq.desc = <uint8_t *>desc
    vq.avail = <uint8_t *>avail
    vq.used = <uint8_t *>used
    vq.packed = packed
    if packed:
        # positions and wrap counters as SET_VRING_BASE encodes them; a base without the
        # used half (DPDK's frontends) means used == avail, as at every stop
        vq.last_avail = base & 0x7FFF
        vq.avail_wrap = (base >> 15) & 1
        if base >> 16:
            vq.used_idx = (base >> 16) & 0x7FFF
            vq.used_wrap = (base >> 31) & 1
        else:
            vq.used_idx = vq.last_avail
            vq.used_wrap = vq.avail_wrap
        if vq.last_avail >= num or vq.used_idx >= num:
            return -1
        vq.pk_first = -1
        vq.pk_ndescs = <uint16_t *>calloc(num, sizeof(uint16_t))
        if vq.pk_ndescs == NULL:
            return -1
    else:
        if base > 0xFFFF:       # the split ring's index is 16 bits (virtio 1.2 §2.7)
            return -1
        vq.last_avail = <uint16_t>base
        vq.avail_shadow = vq.last_avail
        # Resume where the frontend's used ring is: after a reconnect used->idx is
        # authoritative.
        vq.used_idx = vq_load_u16(_used_idx(vq))
    vq.event_idx = event_idx
    vq.indirect = indirect
    vq.call_fd = call_fd
    vq.regions = <mem_region_t *>calloc(nregions if nregions > 0 else 1, sizeof(mem_region_t))
    if vq.regions == NULL:
        return -1
    if nregions > 0:
        memcpy(vq.regions, regions, nregions * sizeof(mem_region_t))
    vq.nregions = nregions
    return 0


cdef void vq_free(vq_t *vq) noexcept nogil:
    free(vq.regions)
    vq.regions = NULL
    vq.nregions = 0
    free(vq.inflight_batch)
    vq.inflight_batch = NULL
    free(vq.pk_ndescs)
    vq.pk_ndescs = NULL
    free(vq.resubmit)
    vq.resubmit = NULL
    vq.resubmit_n = vq.resubmit_pos = 0
    vq.inflight = NULL


# --- inflight tracking (vhost-user spec "Inflight I/O tracking", split virtqueue) ---------------
#
# Popped: desc[head].counter = counter++, then desc[head].inflight = 1.  Pushed: last_batch_head
# = head.  Published: used->idx, then desc[head].inflight = 0 for every head the publish made
# visible, then the region's used_idx = used->idx.  So after a kill at any instruction, a head
# is either visible in the used ring or marked in flight; the only window where both hold is
# between used->idx and the region's used_idx, and there the used ring itself names the heads
# (libvhost-user fixes up only last_batch_head, which is one head; our batches are many).

ctypedef struct _resub_t:
    uint64_t counter
    uint16_t head


cdef int _resub_cmp(const void *a, const void *b) noexcept nogil:
    cdef const _resub_t *x = <const _resub_t *>a
    cdef const _resub_t *y = <const _resub_t *>b
    if x.counter != y.counter:
        return -1 if x.counter < y.counter else 1
    return <int>x.head - <int>y.head


cdef void _set_resubmit(vq_t *vq, _resub_t *tmp, uint32_t cnt) noexcept nogil:
    """The recovered (counter, head) pairs become the resubmit list in submission order, and
    the next counter follows the largest; tmp is freed."""
    cdef uint32_t k
    cdef uint64_t top = 0
    if cnt > 1:
        qsort(tmp, cnt, sizeof(_resub_t), _resub_cmp)
    for k in range(cnt):
        vq.resubmit[k] = tmp[k].head
        if tmp[k].counter >= top:
            top = tmp[k].counter + 1
    free(tmp)
    vq.resubmit_n = cnt
    vq.inflight_counter = top


cdef inline uint8_t *_inflight_desc(vq_t *vq, uint16_t head) noexcept nogil:
    return vq.inflight + IF_DESC_OFF + IF_DESC_SIZE * <uint64_t>head


cdef inline uint8_t *_pk_entry(vq_t *vq, uint16_t bid) noexcept nogil:
    return vq.inflight + IFP_DESC_OFF + IFP_ENTRY * <uint64_t>bid


cdef inline void _pk_advance(uint16_t *pos, bint *wrap, uint16_t n, uint16_t num) noexcept nogil:
    pos[0] += n
    if pos[0] >= num:
        pos[0] -= num
        wrap[0] = not wrap[0]


cdef inline uint16_t _pk_step(vq_t *vq, uint16_t bid) noexcept nogil:
    """Ring slots buffer `bid`'s chain took, from its inflight entry (1 if it has none)."""
    cdef uint8_t *e
    if bid < vq.num:
        e = _pk_entry(vq, bid)
        if e[0] and 1 <= e[1] <= PK_COPIES:
            return e[1]
    return 1


cdef int _pk_inflight_setup(vq_t *vq, uint8_t *r, uint64_t size) noexcept nogil:
    """vq_inflight_setup for a packed ring.  QEMU cannot ask a dead backend where its packed
    ring was (virtio_queue_packed_restore_last_avail_idx does nothing), so the positions come
    from the region: the used position is the checkpoint moved past every used descriptor
    the driver can already see (published before the kill; their ids are cleared), the avail
    position the checkpoint moved past a chain that was marked but not yet checkpointed."""
    cdef uint64_t need = IFP_DESC_OFF + IFP_ENTRY * <uint64_t>vq.num
    cdef uint16_t upos, apos, v, bid, n, hp, spos
    cdef bint uwrap, awrap, swrap
    cdef uint32_t i, cnt = 0
    cdef uint8_t *e
    cdef pvring_desc_t d
    cdef _resub_t *tmp
    if size < need:
        return -1
    vq.inflight = r
    if (<uint64_t *>r)[0] != IFP_FEATURE or vq_load_u16(r + IF_VERSION_OFF) != INFLIGHT_VERSION \
            or vq_load_u16(r + IF_DESC_NUM_OFF) != vq.num:
        memset(r, 0, need)
        (<uint64_t *>r)[0] = IFP_FEATURE
        vq_store_u16(r + IF_DESC_NUM_OFF, vq.num)
        vq_store_u16(r + IFP_AVAIL_OFF, vq.last_avail | (<uint16_t>vq.avail_wrap << 15))
        vq_store_u16(r + IFP_USED_OFF, vq.used_idx | (<uint16_t>vq.used_wrap << 15))
        vq_wmb()
        vq_store_u16(r + IF_VERSION_OFF, INFLIGHT_VERSION)
        return 0
    v = vq_load_u16(r + IFP_USED_OFF)
    upos = (v & 0x7FFF) & (vq.num - 1)
    uwrap = (v >> 15) & 1
    for i in range(vq.num):         # used descriptors past the checkpoint: published
        vq_copy16(&d, vq.desc + 16 * <uint64_t>upos)
        if (((d.flags & PDESC_F_AVAIL) != 0) != uwrap) or (((d.flags & PDESC_F_USED) != 0)
                                                          != uwrap):
            break
        n = 1
        if d.id < vq.num:
            e = _pk_entry(vq, d.id)
            if e[0] and 1 <= e[1] <= PK_COPIES:
                n = e[1]
            e[0] = 0
        _pk_advance(&upos, &uwrap, n, vq.num)
    # A batch the previous backend pushed but never published: _push_packed writes every
    # used descriptor's flags at once except the batch's first (upos here), so the rest of
    # the batch already reads as used. Those ids are still marked in flight and are
    # resubmitted; left as they are, the driver would read the stale entries as soon as this
    # backend publishes at upos, and complete them twice (tests/integration/test_inflight.py,
    # a kill after-push on a packed ring). They become plain in-flight slots again: available
    # in this wrap, not used. A slot past upos that is not part of such a batch is either in
    # flight (available in this wrap) or from the last wrap, and never reads as used here.
    spos, swrap = upos, uwrap
    vq_copy16(&d, vq.desc + 16 * <uint64_t>spos)
    _pk_advance(&spos, &swrap, _pk_step(vq, d.id), vq.num)
    for i in range(vq.num):
        vq_copy16(&d, vq.desc + 16 * <uint64_t>spos)
        if (((d.flags & PDESC_F_AVAIL) != 0) != swrap) or (((d.flags & PDESC_F_USED) != 0)
                                                          != swrap):
            break
        vq_store_release_u16(vq.desc + 16 * <uint64_t>spos + 14,
                             PDESC_F_AVAIL if swrap else PDESC_F_USED)
        _pk_advance(&spos, &swrap, _pk_step(vq, d.id), vq.num)
    v = vq_load_u16(r + IFP_AVAIL_OFF)
    apos = (v & 0x7FFF) & (vq.num - 1)
    awrap = (v >> 15) & 1
    tmp = <_resub_t *>malloc(vq.num * sizeof(_resub_t))
    if tmp == NULL:
        vq.inflight = NULL
        return -1
    for i in range(vq.num):
        e = _pk_entry(vq, <uint16_t>i)
        if not e[0]:
            continue
        if not 1 <= e[1] <= PK_COPIES:
            e[0] = 0            # (not a state we leave)
            continue
        e[0] = 1
        hp = (<uint16_t *>(e + 2))[0]
        if hp == (apos | (<uint16_t>awrap << 15)):
            _pk_advance(&apos, &awrap, e[1], vq.num)    # marked, not yet checkpointed
        tmp[cnt].counter = (<uint64_t *>(e + 8))[0]
        tmp[cnt].head = <uint16_t>i
        vq.pk_ndescs[i] = e[1]
        cnt += 1
    _set_resubmit(vq, tmp, cnt)
    vq.last_avail, vq.avail_wrap = apos, awrap
    vq.used_idx, vq.used_wrap = upos, uwrap
    vq_store_u16(r + IFP_AVAIL_OFF, apos | (<uint16_t>awrap << 15))
    vq_store_u16(r + IFP_USED_OFF, upos | (<uint16_t>uwrap << 15))
    return <int>cnt


cdef void _pk_inflight_mark(vq_t *vq, uint16_t bid, uint16_t head_pos, bint head_wrap,
                            const pvring_desc_t *copies, uint32_t count) noexcept nogil:
    """A popped packed chain: its descriptors (copies), position and counter, then the flag,
    then the avail checkpoint past it."""
    cdef uint8_t *e
    if bid < vq.num and count <= PK_COPIES:
        e = _pk_entry(vq, bid)
        memcpy(e + IFP_COPIES_OFF, copies, 16 * count)
        e[1] = <uint8_t>count
        (<uint16_t *>(e + 2))[0] = head_pos | (<uint16_t>head_wrap << 15)
        (<uint64_t *>(e + 8))[0] = vq.inflight_counter
        vq.inflight_counter += 1
        vq_wmb()
        e[0] = 1
    else:
        vq.inflight_untracked += 1
    vq_wmb()
    vq_store_u16(vq.inflight + IFP_AVAIL_OFF, vq.last_avail | (<uint16_t>vq.avail_wrap << 15))


cdef void _pk_inflight_published(vq_t *vq) noexcept nogil:
    cdef uint32_t k
    vq_wmb()                # the batch is visible before any id stops counting as in flight
    for k in range(vq.inflight_batch_n):
        if vq.inflight_batch[k] < vq.num:
            _pk_entry(vq, vq.inflight_batch[k])[0] = 0
    vq_wmb()
    vq_store_u16(vq.inflight + IFP_USED_OFF, vq.used_idx | (<uint16_t>vq.used_wrap << 15))
    vq.inflight_batch_n = 0


cdef int vq_inflight_setup(vq_t *vq, uint64_t addr, uint64_t size) noexcept nogil:
    """Track this queue's heads in the inflight region at `addr` (`size` bytes) from now on,
    before the worker runs and after vq_init.  A region of another version or ring size is
    started afresh (QEMU hands a zeroed one after GET_INFLIGHT_FD).  One that a previous
    backend used is recovered: the heads of a half-published batch are cleared, the heads
    still in flight become the resubmit list (submission order) and last_avail resumes after
    them (used->idx + in flight, whatever SET_VRING_BASE said: QEMU sends used->idx after a
    backend died, which would complete twice what finished out of order).  Returns the number
    of heads to resubmit, or -1 (region too small, no memory)."""
    cdef uint8_t *r = <uint8_t *>addr
    cdef uint64_t need = IF_DESC_OFF + IF_DESC_SIZE * <uint64_t>vq.num
    cdef uint16_t rused, n, k, head
    cdef uint32_t i, cnt = 0
    cdef uint8_t *d
    cdef _resub_t *tmp
    if r == NULL:
        return -1
    vq.inflight_batch = <uint16_t *>calloc(vq.num, sizeof(uint16_t))
    vq.resubmit = <uint16_t *>calloc(vq.num, sizeof(uint16_t))
    if vq.inflight_batch == NULL or vq.resubmit == NULL:
        return -1
    vq.inflight_batch_n = 0
    vq.resubmit_n = vq.resubmit_pos = 0
    vq.inflight_counter = 0
    if vq.packed:
        return _pk_inflight_setup(vq, r, size)
    if size < need:
        return -1
    vq.inflight = r
    if vq_load_u16(r + IF_VERSION_OFF) != INFLIGHT_VERSION or \
            vq_load_u16(r + IF_DESC_NUM_OFF) != vq.num:
        memset(r, 0, need)
        vq_store_u16(r + IF_DESC_NUM_OFF, vq.num)
        vq_store_u16(r + IF_USED_IDX_OFF, vq.used_idx)
        vq_wmb()
        vq_store_u16(r + IF_VERSION_OFF, INFLIGHT_VERSION)
        return 0
    # A kill between used->idx and the region's used_idx: the heads in between completed.
    rused = vq_load_u16(r + IF_USED_IDX_OFF)
    n = <uint16_t>(vq.used_idx - rused)
    if n > vq.num:          # not a state we leave: the frontend's region or guest lies
        n = vq.num
    for k in range(n):
        head = <uint16_t>(<uint32_t *>(vq.used + 4 + 8 * <uint64_t>(
            <uint16_t>(rused + k) & (vq.num - 1))))[0]
        if head < vq.num:
            _inflight_desc(vq, head)[0] = 0
    vq_store_u16(r + IF_USED_IDX_OFF, vq.used_idx)
    tmp = <_resub_t *>malloc(vq.num * sizeof(_resub_t))
    if tmp == NULL:
        vq.inflight = NULL
        return -1
    for i in range(vq.num):
        d = _inflight_desc(vq, <uint16_t>i)
        if d[0]:
            d[0] = 1
            tmp[cnt].counter = (<uint64_t *>(d + IF_DS_COUNTER_OFF))[0]
            tmp[cnt].head = <uint16_t>i
            cnt += 1
    _set_resubmit(vq, tmp, cnt)
    vq.last_avail = <uint16_t>(vq.used_idx + cnt)
    vq.avail_shadow = vq.last_avail
    return <int>cnt


cdef int vq_inflight_from(vq_t *vq, object inflight) except -1:
    """QueueHandle.inflight -- None, or (host address, size in bytes) -- set up on vq."""
    if inflight is None:
        return 0
    addr, size = inflight
    if not addr:
        raise ValueError("inflight region without a mapping")
    r = vq_inflight_setup(vq, addr, size)
    if r < 0:
        raise ValueError(f"inflight region of {size} bytes cannot track a ring of {vq.num}")
    return r


cdef inline void _inflight_mark(vq_t *vq, uint16_t head) noexcept nogil:
    cdef uint8_t *d = _inflight_desc(vq, head)
    (<uint64_t *>(d + IF_DS_COUNTER_OFF))[0] = vq.inflight_counter
    vq.inflight_counter += 1
    vq_wmb()                # the counter is in place before the head counts as in flight
    d[0] = 1


cdef void _inflight_published(vq_t *vq) noexcept nogil:
    cdef uint32_t k
    vq_wmb()                # used->idx is stored before any head stops counting as in flight
    for k in range(vq.inflight_batch_n):
        _inflight_desc(vq, vq.inflight_batch[k])[0] = 0
    vq_wmb()
    vq_store_u16(vq.inflight + IF_USED_IDX_OFF, vq.used_idx)
    vq.inflight_batch_n = 0


# --- dirty logging (vhost-user spec "Migration"; the bitmap's layout as libvhost-user's
# vu_log_write: bit (gpa / 4096) % 8 of byte gpa / 4096 / 8) ---------------------------------

cdef enum:
    LOG_PAGE_SHIFT = 12        # VHOST_LOG_PAGE = 0x1000


cdef int vq_log_parse(object log, vq_log_t *out) except -1:
    """QueueHandle.log -- None, or (host address, size in bytes, used-ring guest address or -1
    for none) -- as a vq_log_t."""
    memset(out, 0, sizeof(vq_log_t))
    if log is None:
        return 0
    addr, size, used_gpa = log
    if not addr or size <= 0:
        raise ValueError("dirty log without a mapping")
    out.log = <uint8_t *><uint64_t>addr
    out.size = size
    out.log_used = used_gpa >= 0
    out.used_gpa = used_gpa if used_gpa >= 0 else 0
    return 0


cdef void vq_log_set(vq_t *vq, const vq_log_t *log) noexcept nogil:
    """Log this queue's writes from now on (log.log NULL: stop).  Before the worker runs."""
    vq.log = log.log
    vq.log_size = log.size if log.log != NULL else 0
    vq.log_used = log.log != NULL and log.log_used
    vq.log_used_gpa = log.used_gpa
    vq.log_used_from = vq.used_idx


cdef int vq_log_setup(vq_t *vq, object log) except -1:
    """vq_log_parse + vq_log_set."""
    cdef vq_log_t l
    vq_log_parse(log, &l)
    vq_log_set(vq, &l)
    return 0


cdef void vq_log_gpa(vq_t *vq, uint64_t gpa, uint64_t length) noexcept nogil:
    """Mark the pages of [gpa, gpa+length) dirty (after writing them)."""
    cdef uint64_t page, last
    if vq.log == NULL or length == 0 or gpa > UINT64_MAX - (length - 1):
        return
    page = gpa >> LOG_PAGE_SHIFT
    last = (gpa + (length - 1)) >> LOG_PAGE_SHIFT
    while page <= last:
        if (page >> 3) >= vq.log_size:
            # the frontend sized its log for less memory than it gave us: count it (the
            # protocol reports it), never write past the mapping
            vq.log_beyond += 1
            return
        log_or(vq.log + (page >> 3), <uint8_t>(1 << (page & 7)))
        if _shadow != NULL and (page >> 3) < _shadow_size:
            log_or(_shadow + (page >> 3), <uint8_t>(1 << (page & 7)))
        vq.log_pages += 1
        page += 1


cdef void vq_log_host(vq_t *vq, const void *p, uint64_t length) noexcept nogil:
    """vq_log_gpa for a host pointer into guest memory (a chain segment, a status byte)."""
    cdef uint64_t a = <uint64_t>p, off
    cdef int i
    cdef mem_region_t *r
    if vq.log == NULL:
        return
    for i in range(vq.nregions):
        r = &vq.regions[i]
        if a >= r.host and a - r.host < r.size:
            off = a - r.host
            if length > r.size - off:
                length = r.size - off
            vq_log_gpa(vq, r.gpa + off, length)
            return


cdef void vq_log_chain(vq_t *vq, chain_t *c, uint64_t written) noexcept nogil:
    """Log the first `written` bytes of the chain's device-writable segments."""
    cdef int k
    cdef uint64_t n
    if vq.log == NULL:
        return
    for k in range(c.nreadable, c.nsegs):
        if written == 0:
            break
        n = c.segs[k].iov_len
        if n > written:
            n = written
        vq_log_host(vq, c.segs[k].iov_base, n)
        written -= n


cdef inline void _log_used(vq_t *vq, uint64_t offset, uint64_t length) noexcept nogil:
    if vq.log != NULL and vq.log_used:
        vq_log_gpa(vq, vq.log_used_gpa + offset, length)


cdef void _log_published(vq_t *vq) noexcept nogil:
    """Log the used elements written since the last publish, and used->idx."""
    cdef uint16_t n = <uint16_t>(vq.used_idx - vq.log_used_from)
    cdef uint64_t start = vq.log_used_from & (vq.num - 1)
    if n >= vq.num:
        _log_used(vq, 4, 8 * <uint64_t>vq.num)
    elif n == 0:
        pass
    elif start + n <= vq.num:
        _log_used(vq, 4 + 8 * start, 8 * <uint64_t>n)
    else:
        _log_used(vq, 4 + 8 * start, 8 * (vq.num - start))
        _log_used(vq, 4, 8 * (start + n - vq.num))
    _log_used(vq, 2, 2)
    vq.log_used_from = vq.used_idx


cdef inline int _find_region(vq_t *vq, uint64_t gpa) noexcept nogil:
    cdef int i = vq.last_region
    cdef mem_region_t *r
    if i < vq.nregions:
        r = &vq.regions[i]
        if gpa >= r.gpa and gpa - r.gpa < r.size:
            return i
    for i in range(vq.nregions):
        r = &vq.regions[i]
        if gpa >= r.gpa and gpa - r.gpa < r.size:
            vq.last_region = i
            return i
    return -1


cdef inline uint8_t *_host_range(vq_t *vq, uint64_t gpa, uint64_t length) noexcept nogil:
    """Host pointer for [gpa, gpa+length) if it lies inside ONE region, else NULL."""
    cdef int i
    cdef mem_region_t *r
    if length == 0 or gpa > UINT64_MAX - (length - 1):
        return NULL
    i = _find_region(vq, gpa)
    if i < 0:
        return NULL
    r = &vq.regions[i]
    if length > r.size - (gpa - r.gpa):
        return NULL
    return <uint8_t *>(r.host + (gpa - r.gpa))


cdef int vq_translate(vq_t *vq, uint64_t gpa, uint64_t length, chain_t *c) noexcept nogil:
    """Append the host segments of [gpa, gpa+length) to c.  A range may run across adjacent
    regions (split into segments) but never across a hole."""
    cdef int i
    cdef uint64_t off, n
    cdef mem_region_t *r
    if length == 0:
        return F_NONE
    if gpa > UINT64_MAX - (length - 1):
        return F_ADDR
    while length:
        i = _find_region(vq, gpa)
        if i < 0:
            return F_ADDR
        r = &vq.regions[i]
        off = gpa - r.gpa
        n = r.size - off
        if n > length:
            n = length
        if c.nsegs >= MAX_SEGS:
            return F_TOO_MANY_SEGS
        c.segs[c.nsegs].iov_base = <void *>(r.host + off)
        c.segs[c.nsegs].iov_len = n
        c.nsegs += 1
        gpa += n
        length -= n
    return F_NONE


cdef int vq_avail_count(vq_t *vq) noexcept nogil:
    """Chains the driver made available (packed: 1 if at least one, else 0)."""
    if vq.packed:
        return _pk_is_avail(vq_load_acquire_u16(vq.desc + 16 * <uint64_t>vq.last_avail + 14),
                            vq.avail_wrap)
    return <uint16_t>(vq_load_acquire_u16(_avail_idx(vq)) - vq.last_avail)


cdef uint32_t vq_base(vq_t *vq) noexcept nogil:
    if vq.packed:
        return (<uint32_t>vq.last_avail | (<uint32_t>vq.avail_wrap << 15)
                | (<uint32_t>vq.used_idx << 16) | (<uint32_t>vq.used_wrap << 31))
    return vq.last_avail


cdef vq_pos_t vq_tell(vq_t *vq) noexcept nogil:
    cdef vq_pos_t p
    p.last_avail = vq.last_avail
    p.avail_wrap = vq.avail_wrap
    return p


cdef void vq_seek(vq_t *vq, vq_pos_t pos) noexcept nogil:
    """Put back what was popped since vq_tell (nothing of it was pushed)."""
    vq.last_avail = pos.last_avail
    vq.avail_wrap = pos.avail_wrap


# --- the packed ring (virtio 1.2 §2.8) -------------------------------------------------------

cdef inline bint _pk_is_avail(uint16_t flags, bint wrap) noexcept nogil:
    # available: AVAIL != USED and AVAIL == the wrap counter (§2.8.1)
    return (((flags & PDESC_F_AVAIL) != 0) != ((flags & PDESC_F_USED) != 0)) and \
        ((flags & PDESC_F_AVAIL) != 0) == wrap


cdef int _pop_packed(vq_t *vq, chain_t *c) noexcept nogil:
    """vq_pop for a packed ring: the chain is the descriptors from last_avail on while NEXT
    is set (or one INDIRECT descriptor, whose table is walked to its length); the buffer id
    is the last descriptor's.  A bad chain is still consumed to its end (bounded by the ring
    size), so that the ring stays in step with the driver."""
    cdef uint16_t pos = vq.last_avail, head_pos
    cdef bint wrap = vq.avail_wrap, head_wrap
    cdef bint seen_writable = False
    cdef pvring_desc_t d
    cdef pvring_desc_t copies[PK_COPIES]
    cdef uint32_t count = 0
    cdef uint16_t flags = vq_load_acquire_u16(vq.desc + 16 * <uint64_t>pos + 14)
    if not _pk_is_avail(flags, wrap):
        return 0
    # (acquire: the rest of the chain, written before the head's flags, is read after them)
    c.fault = F_NONE
    c.nsegs = 0
    c.nreadable = 0
    c.total_len = 0
    c.last_byte = NULL
    while True:
        if count >= vq.num:
            if c.fault == F_NONE:
                c.fault = F_LOOP
            break
        vq_copy16(&d, vq.desc + 16 * <uint64_t>pos)
        if count < PK_COPIES:
            copies[count] = d
        count += 1
        pos += 1
        if pos >= vq.num:
            pos = 0
            wrap = not wrap
        c.head = d.id
        _pk_desc(vq, c, &d, &seen_writable)
        if not (d.flags & DESC_F_NEXT):
            break
    vq.pk_ndescs[c.head & (vq.num - 1)] = <uint16_t>count
    head_pos, head_wrap = vq.last_avail, vq.avail_wrap
    vq.last_avail = pos
    vq.avail_wrap = wrap
    if vq.inflight != NULL:
        _pk_inflight_mark(vq, c.head, head_pos, head_wrap, copies, count)
    if _fp_point:
        vq_failpoint(FP_AFTER_POP)
    return 1


cdef inline void _pk_desc(vq_t *vq, chain_t *c, pvring_desc_t *d,
                          bint *seen_writable) noexcept nogil:
    """One ring descriptor of a packed chain (an INDIRECT one: its whole table).  As in the
    split walk: after a bad address the chain is still walked (the status byte at its end is
    written), after a bad indirect table nothing more is trusted."""
    cdef uint16_t k, tsize
    cdef pvring_desc_t t
    cdef uint8_t *table
    if c.fault == F_INDIRECT:
        return
    if d.flags & DESC_F_INDIRECT:
        if (not vq.indirect or (d.flags & DESC_F_NEXT) or d.len == 0
                or d.len % 16 != 0 or d.len // 16 > MAX_INDIRECT):
            c.fault = F_INDIRECT
            return
        table = _host_range(vq, d.addr, d.len)
        if table == NULL:
            c.fault = F_INDIRECT
            return
        # §2.8.19: the table's descriptors are the buffer, in order
        tsize = <uint16_t>(d.len // 16)
        for k in range(tsize):
            vq_copy16(&t, table + 16 * <uint64_t>k)
            if t.flags & DESC_F_INDIRECT:
                c.fault = F_INDIRECT
                return
            _add_seg(vq, c, t.addr, t.len, t.flags, seen_writable, k + 1 == tsize)
    else:
        _add_seg(vq, c, d.addr, d.len, d.flags, seen_writable, not (d.flags & DESC_F_NEXT))


cdef int _pk_walk_copies(vq_t *vq, uint16_t bid, chain_t *c) noexcept nogil:
    """A resubmitted packed buffer: its chain from the copies in the inflight region (the
    ring slots may hold used descriptors by now)."""
    cdef uint8_t *e = _pk_entry(vq, bid)
    cdef uint32_t k, n = e[1]
    cdef bint seen_writable = False
    # the region is the frontend's memory: it may have changed n since recovery checked it,
    # and the copies must never be read past this entry
    if n == 0 or n > PK_COPIES:
        n = 1
    cdef pvring_desc_t d
    c.head = bid
    c.fault = F_NONE
    c.nsegs = 0
    c.nreadable = 0
    c.total_len = 0
    c.last_byte = NULL
    for k in range(n):
        vq_copy16(&d, e + IFP_COPIES_OFF + 16 * k)
        if k + 1 == n:
            d.flags = d.flags & ~(<uint16_t>DESC_F_NEXT)
        _pk_desc(vq, c, &d, &seen_writable)
    return 1



cdef void _push_packed(vq_t *vq, uint16_t id, uint32_t length) noexcept nogil:
    """Write the used descriptor for buffer `id` at used_idx; its flags (AVAIL = USED = the
    used wrap counter) make it the driver's -- except the batch's first, whose flags wait for
    vq_publish, so that the whole batch becomes visible at once (§2.8.22)."""
    cdef uint8_t *e = vq.desc + 16 * <uint64_t>vq.used_idx
    cdef uint16_t flags = (PDESC_F_AVAIL | PDESC_F_USED) if vq.used_wrap else 0
    cdef uint16_t n = vq.pk_ndescs[id & (vq.num - 1)]
    (<uint32_t *>(e + 8))[0] = length
    (<uint16_t *>(e + 12))[0] = id
    if vq.pk_first < 0:
        vq.pk_first = vq.used_idx
        vq.pk_first_flags = flags
        vq.pk_log_from = vq.used_idx
    else:
        vq_store_release_u16(e + 14, flags)
    if n == 0 or n > vq.num:    # an id we never popped (a confused or hostile driver)
        n = 1
    vq.used_idx += n
    if vq.used_idx >= vq.num:
        vq.used_idx -= vq.num
        vq.used_wrap = not vq.used_wrap
    vq.completed += 1


cdef void _publish_packed(vq_t *vq) noexcept nogil:
    cdef uint16_t start, end
    if vq.pk_first < 0:
        return
    vq_store_release_u16(vq.desc + 16 * <uint64_t>vq.pk_first + 14, vq.pk_first_flags)
    if vq.log != NULL:
        # the used descriptors written since the last publish lie in [pk_log_from, used_idx)
        start = vq.pk_log_from
        end = vq.used_idx
        if end > start:
            vq_log_host(vq, vq.desc + 16 * <uint64_t>start, 16 * <uint64_t>(end - start))
        else:
            vq_log_host(vq, vq.desc + 16 * <uint64_t>start, 16 * <uint64_t>(vq.num - start))
            if end:
                vq_log_host(vq, vq.desc, 16 * <uint64_t>end)
    vq.pk_first = -1


cdef bint _pk_should_notify(vq_t *vq) noexcept nogil:
    """The driver event suppression structure (§2.8.10): off_wrap u16, flags u16."""
    cdef uint16_t flags, off_wrap, off, old, new
    cdef bint valid = vq.signalled_used_valid
    vq_mb()
    old = vq.signalled_used
    new = vq.used_idx
    vq.signalled_used = new
    vq.signalled_used_valid = True
    flags = vq_load_u16(vq.avail + 2)
    if flags != EVENT_F_DESC:
        return flags != EVENT_F_DISABLE
    if not valid:
        return True
    off_wrap = vq_load_u16(vq.avail)
    off = off_wrap & 0x7FFF
    # positions on one line: the wrap counter says which lap `off` is on (as DPDK's
    # vhost_vring_call_packed)
    if new <= old:
        old -= vq.num
    if ((off_wrap >> 15) != 0) != vq.used_wrap:
        off -= vq.num
    return <uint16_t>(new - off - 1) < <uint16_t>(new - old)


cdef int vq_pop(vq_t *vq, chain_t *c) noexcept nogil:
    """Take the next available chain into c.  Returns 1 with c filled (c.fault says whether it
    is usable), 0 when the ring is empty, -1 when the avail ring is corrupt (queue broken)."""
    cdef uint16_t avail_idx, head
    if vq.broken:
        return -1
    if vq.resubmit_pos < vq.resubmit_n:
        # after a restart, what the previous backend popped and never completed comes first
        head = vq.resubmit[vq.resubmit_pos]
        vq.resubmit_pos += 1
        vq.resubmitted += 1
        if vq.packed:
            return _pk_walk_copies(vq, head, c)
        return _walk(vq, head, c)
    if vq.packed:
        return _pop_packed(vq, c)
    if vq.avail_shadow == vq.last_avail or <uint16_t>(vq.avail_shadow - vq.last_avail) > vq.num:
        # avail->idx is read (with acquire) only once the entries it last showed are taken:
        # the driver writes that cache line as it posts, and reading it per chain bounced
        # the line between the two CPUs once per frame (DPDK reads it once per burst too)
        avail_idx = vq_load_acquire_u16(_avail_idx(vq))
        if avail_idx == vq.last_avail:
            return 0
        if <uint16_t>(avail_idx - vq.last_avail) > vq.num:
            vq.broken = True
            vq.faults[F_AVAIL] += 1
            return -1
        vq.avail_shadow = avail_idx
    head = vq_load_u16(vq.avail + 4 + 2 * (vq.last_avail & (vq.num - 1)))
    if head >= vq.num:
        vq.broken = True
        vq.faults[F_AVAIL] += 1
        return -1
    vq.last_avail += 1
    if vq.inflight != NULL:
        _inflight_mark(vq, head)
    if _fp_point:
        vq_failpoint(FP_AFTER_POP)
    return _walk(vq, head, c)


cdef inline void _add_seg(vq_t *vq, chain_t *c, uint64_t addr, uint32_t length,
                          uint16_t flags, bint *seen_writable, bint last) noexcept nogil:
    """One descriptor of a chain (either ring layout): order check, translation, totals, and
    for the last one the status byte's address."""
    cdef int f
    if flags & DESC_F_WRITE:
        seen_writable[0] = True
    elif seen_writable[0] and c.fault == F_NONE:
        c.fault = F_ORDER
    f = vq_translate(vq, addr, length, c)
    if f != F_NONE and c.fault == F_NONE:
        c.fault = f
    if not seen_writable[0]:
        c.nreadable = c.nsegs
    c.total_len += length
    if last and (flags & DESC_F_WRITE) and length > 0:
        c.last_byte = _host_range(vq, addr + (length - 1), 1) \
            if addr <= UINT64_MAX - (length - 1) else NULL


cdef inline int _walk(vq_t *vq, uint16_t head, chain_t *c) noexcept nogil:
    """Walk the chain at `head` (< vq.num) into c; returns 1 (c.fault says if usable)."""
    cdef uint16_t i, table_size
    cdef uint32_t count
    cdef vring_desc_t d
    cdef uint8_t *table
    cdef bint in_indirect = False
    cdef bint seen_writable = False
    c.head = head
    c.fault = F_NONE
    c.nsegs = 0
    c.nreadable = 0
    c.total_len = 0
    c.last_byte = NULL
    table = vq.desc
    table_size = vq.num
    i = head
    count = 0
    while True:
        if count >= table_size:
            c.fault = F_LOOP
            return 1
        count += 1
        vq_copy16(&d, table + 16 * <uint64_t>i)
        if d.flags & DESC_F_INDIRECT:
            if (in_indirect or not vq.indirect or (d.flags & DESC_F_NEXT)
                    or d.len == 0 or d.len % 16 != 0 or d.len // 16 > MAX_INDIRECT):
                c.fault = F_INDIRECT
                return 1
            table = _host_range(vq, d.addr, d.len)
            if table == NULL:
                c.fault = F_INDIRECT
                return 1
            table_size = <uint16_t>(d.len // 16) if d.len // 16 < 65536 else 0
            if table_size == 0:
                c.fault = F_INDIRECT
                return 1
            in_indirect = True
            i = 0
            count = 0
            continue
        _add_seg(vq, c, d.addr, d.len, d.flags, &seen_writable, not (d.flags & DESC_F_NEXT))
        if not (d.flags & DESC_F_NEXT):
            return 1
        i = d.next
        if i >= table_size:
            c.fault = F_BAD_NEXT
            c.last_byte = NULL
            return 1


cdef void vq_push(vq_t *vq, uint16_t head, uint32_t length) noexcept nogil:
    """Write one used element; it becomes visible to the driver at vq_publish."""
    cdef uint8_t *e
    if vq.inflight != NULL:
        if vq.inflight_batch_n >= vq.num:
            # a guest that offers one head over and over can make a batch longer than the
            # ring: publish what we have so the list never overflows
            vq_publish(vq)
        vq.inflight_batch[vq.inflight_batch_n] = head
        vq.inflight_batch_n += 1
        if not vq.packed:
            vq_store_u16(vq.inflight + IF_LAST_BATCH_OFF, head)
    if vq.packed:
        _push_packed(vq, head, length)
        if _fp_point:
            vq_failpoint(FP_AFTER_PUSH)
        return
    e = vq.used + 4 + 8 * <uint64_t>(vq.used_idx & (vq.num - 1))
    (<uint32_t *>e)[0] = head
    (<uint32_t *>e)[1] = length
    vq.used_idx += 1
    vq.completed += 1
    if _fp_point:
        vq_failpoint(FP_AFTER_PUSH)


cdef void vq_publish(vq_t *vq) noexcept nogil:
    if vq.packed:
        _publish_packed(vq)
        if _fp_point:
            vq_failpoint(FP_MID_PUBLISH)
        if vq.inflight != NULL:
            _pk_inflight_published(vq)
        return
    # Release: the used elements above are visible before the new index (§2.7.13.3).
    vq_store_release_u16(_used_idx(vq), vq.used_idx)
    if vq.log != NULL:
        _log_published(vq)
    if _fp_point:
        vq_failpoint(FP_MID_PUBLISH)
    if vq.inflight != NULL:
        _inflight_published(vq)


cdef bint vq_should_notify(vq_t *vq) noexcept nogil:
    cdef uint16_t old, new, event
    cdef bint valid
    if vq.packed:
        return _pk_should_notify(vq)
    # Full barrier: our used->idx store must be visible before we read the driver's
    # used_event / flags, or we and the driver can both decide not to act (lost interrupt).
    vq_mb()
    if vq.event_idx:
        old = vq.signalled_used
        valid = vq.signalled_used_valid
        new = vq.used_idx
        vq.signalled_used = new
        vq.signalled_used_valid = True
        if not valid:
            return True
        event = vq_load_u16(vq.avail + 4 + 2 * <uint64_t>vq.num)
        # vring_need_event (§2.7.10): notify iff event lies in [old, new).
        return <uint16_t>(new - event - 1) < <uint16_t>(new - old)
    return not (vq_load_u16(vq.avail) & AVAIL_F_NO_INTERRUPT)


cdef void vq_notify(vq_t *vq) noexcept nogil:
    cdef uint64_t one = 1
    if vq.call_fd >= 0 and vq_should_notify(vq):
        write(vq.call_fd, &one, 8)
        vq.notifies += 1


cdef bint vq_enable_kick(vq_t *vq) noexcept nogil:
    """Ask the driver to kick again before sleeping; True if work arrived meanwhile."""
    cdef uint16_t flags
    if vq.resubmit_pos < vq.resubmit_n:
        return True         # heads to resubmit are work the avail ring does not show
    if vq.packed:
        # device event suppression (§2.8.10): flags at offset 2; ENABLE, then re-check
        vq_store_u16(vq.used + 2, EVENT_F_ENABLE)
        if vq.log != NULL:
            vq_log_host(vq, vq.used + 2, 2)
        vq_mb()
        return vq_avail_count(vq) != 0
    if vq.event_idx:
        vq_store_u16(vq.used + 4 + 8 * <uint64_t>vq.num, vq.last_avail)
        if vq.log != NULL:
            _log_used(vq, 4 + 8 * <uint64_t>vq.num, 2)
    else:
        flags = vq_load_u16(vq.used)
        vq_store_u16(vq.used, flags & ~USED_F_NO_NOTIFY)
        if vq.log != NULL:
            _log_used(vq, 0, 2)
    vq_mb()
    return vq_load_acquire_u16(_avail_idx(vq)) != vq.last_avail


cdef void vq_disable_kick(vq_t *vq) noexcept nogil:
    cdef uint16_t flags
    if vq.packed:
        vq_store_u16(vq.used + 2, EVENT_F_DISABLE)
        if vq.log != NULL:
            vq_log_host(vq, vq.used + 2, 2)
        return
    if not vq.event_idx:
        flags = vq_load_u16(vq.used)
        vq_store_u16(vq.used, flags | USED_F_NO_NOTIFY)
        if vq.log != NULL:
            _log_used(vq, 0, 2)


cdef inline size_t _chain_copy(chain_t *c, size_t offset, uint8_t *buf, size_t n,
                               bint into_chain) noexcept nogil:
    """Copy n bytes between buf and the chain's byte stream starting at `offset`."""
    cdef size_t done = 0, take, l
    cdef int k
    cdef uint8_t *seg
    for k in range(c.nsegs):
        if done == n:
            break
        l = c.segs[k].iov_len
        if offset >= l:
            offset -= l
            continue
        take = l - offset
        if take > n - done:
            take = n - done
        seg = <uint8_t *>c.segs[k].iov_base + offset
        if into_chain:
            memcpy(seg, buf + done, take)
        else:
            memcpy(buf + done, seg, take)
        done += take
        offset = 0
    return done


cdef size_t chain_copy_from(chain_t *c, size_t offset, void *dst, size_t n) noexcept nogil:
    """Gather up to n bytes starting at byte `offset` of the chain into dst."""
    return _chain_copy(c, offset, <uint8_t *>dst, n, False)


cdef size_t chain_copy_to(chain_t *c, size_t offset, const void *src, size_t n) noexcept nogil:
    """Scatter up to n bytes into the chain starting at byte `offset`."""
    return _chain_copy(c, offset, <uint8_t *>src, n, True)


def regions_from_table(bytes table):
    """Number of regions in a packed GuestMemory.table_bytes() blob (validates its length)."""
    if len(table) % sizeof(mem_region_t):
        raise ValueError("region table length is not a multiple of the entry size")
    return len(table) // sizeof(mem_region_t)


cdef class RingProbe:
    """Python handle on one vq_t, for tests and microbenchmarks (a Python object per call is
    fine here; the workers never use this class)."""
    cdef vq_t vq
    cdef chain_t *chain
    cdef readonly int resubmit_count     # heads recovered from the inflight region

    def __cinit__(self, uint16_t num, uint64_t desc, uint64_t avail, uint64_t used,
                  uint32_t last_avail, bytes table, bint event_idx=False, bint indirect=True,
                  int call_fd=-1, log=None, inflight=None, bint packed=False):
        cdef int n = regions_from_table(table)
        cdef const unsigned char *t = table
        self.chain = <chain_t *>calloc(1, sizeof(chain_t))
        if self.chain == NULL:
            raise MemoryError()
        if vq_init(&self.vq, num, desc, avail, used, last_avail, event_idx, indirect, call_fd,
                   <const mem_region_t *>t, n, packed) != 0:
            raise ValueError("bad queue parameters")
        vq_log_setup(&self.vq, log)
        self.resubmit_count = vq_inflight_from(&self.vq, inflight)

    def __dealloc__(self):
        vq_free(&self.vq)
        free(self.chain)

    @property
    def resubmitted(self):
        return self.vq.resubmitted

    def pop(self):
        """None when empty; raises RuntimeError when broken; else a dict describing the chain
        with host segments as (address, length)."""
        cdef int r = vq_pop(&self.vq, self.chain)
        if r == 0:
            return None
        if r < 0:
            raise RuntimeError("queue broken")
        c = self.chain
        return dict(
            head=c.head, fault=c.fault, nreadable=c.nreadable,
            segs=[(<uint64_t>c.segs[k].iov_base, c.segs[k].iov_len) for k in range(c.nsegs)],
            last_byte=<uint64_t>c.last_byte, total_len=c.total_len)

    def pop_many(self, int n):
        """Pop up to n chains without building Python objects (microbenchmarks)."""
        cdef int k, got = 0
        with nogil:
            for k in range(n):
                if vq_pop(&self.vq, self.chain) != 1:
                    break
                got += 1
        return got

    def push(self, uint16_t head, uint32_t length):
        vq_push(&self.vq, head, length)

    def complete(self, uint32_t written):
        """Push the last popped chain as a device that wrote `written` bytes into it does:
        its writes logged (when logging), then the used element."""
        if self.vq.log != NULL:
            vq_log_chain(&self.vq, self.chain, written)
        vq_push(&self.vq, self.chain.head, written)

    @property
    def log_pages(self):
        return self.vq.log_pages

    @property
    def log_beyond(self):
        return self.vq.log_beyond

    def push_many(self, uint16_t head, uint32_t length, int n):
        cdef int k
        with nogil:
            for k in range(n):
                vq_push(&self.vq, head, length)
            vq_publish(&self.vq)

    def publish(self):
        vq_publish(&self.vq)

    def should_notify(self):
        return vq_should_notify(&self.vq)

    def notify(self):
        vq_notify(&self.vq)

    def enable_kick(self):
        return vq_enable_kick(&self.vq)

    def disable_kick(self):
        vq_disable_kick(&self.vq)

    @property
    def last_avail(self):
        return self.vq.last_avail

    @property
    def base(self):
        """What GET_VRING_BASE would report (packed: positions and wrap counters)."""
        return vq_base(&self.vq)

    @property
    def used_idx(self):
        return self.vq.used_idx

    @property
    def broken(self):
        return bool(self.vq.broken)

    @property
    def faults(self):
        return [self.vq.faults[k] for k in range(NUM_FAULTS)]
