# ring.pxd: the split-virtqueue engine's C-level interface, cimported by the device workers.
# Every guest address goes through vq_translate; nothing here touches Python objects.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec

cdef extern from "vhost_compat.h" nogil:
    void vq_mb()
    void vq_rmb()
    void vq_wmb()
    uint16_t vq_load_acquire_u16(const void *p)
    uint16_t vq_load_u16(const void *p)
    void vq_store_release_u16(void *p, uint16_t v)
    void vq_store_u16(void *p, uint16_t v)
    void vq_copy16(void *dst, const void *src)
    void log_or(uint8_t *p, uint8_t bit)
    int fp_hit(int *count)
    int PYVHOST_DEBUG

# Segments a chain may map to.  Linux asks for at most seg_max (126) data segments plus header
# and status; region splits can add a few.  Longer chains fail alone (E_TOO_MANY_SEGS).
cdef enum:
    MAX_SEGS = 160
    # Indirect tables are bounded by their own length; this caps one table (virtio 1.2 §2.7.5.3:
    # a chain is never longer than the queue size, and queues are at most 32768).
    MAX_INDIRECT = 32768

# Chain faults: why one request failed.  Index into the per-queue fault counters.
cdef enum:
    F_NONE = 0
    F_BAD_NEXT = 1          # next index >= queue / table size
    F_LOOP = 2              # more descriptors than the queue (or table) holds
    F_ADDR = 3              # address/length outside guest memory, overflow, or straddling a hole
    F_INDIRECT = 4          # bad indirect table: length, nested, with NEXT, not negotiated
    F_TOO_MANY_SEGS = 5     # more segments than MAX_SEGS
    F_ORDER = 6             # device-readable descriptor after a device-writable one
    F_HEADER = 7            # request header missing or too short
    F_STATUS = 8            # no writable status byte at the end
    F_REQUEST = 9           # device-level: bad sector range, misaligned length, wrong direction
    F_AVAIL = 10            # avail ring corrupt: queue broken
    F_IO = 11               # backing store error
    NUM_FAULTS = 12

# Fail points: where a test may have the process SIGKILL itself (vq_failpoint; armed by
# PYVHOST_FAILPOINT=name:n, see ring.pyx FAILPOINTS), to check what a restart recovers.
cdef enum:
    FP_NONE = 0
    FP_AFTER_POP = 1        # a head was popped (and marked in flight), its I/O not issued
    FP_AFTER_IO = 2         # a request's I/O is done, its used element not written
    FP_AFTER_PUSH = 3       # a used element is written, used->idx not yet
    FP_MID_PUBLISH = 4      # used->idx is published, the batch's heads still marked in flight

ctypedef struct mem_region_t:
    uint64_t gpa
    uint64_t size
    uint64_t uva
    uint64_t host

ctypedef struct vring_desc_t:
    uint64_t addr
    uint32_t len
    uint16_t flags
    uint16_t next

# A packed-ring descriptor (virtio 1.2 §2.8.13 pvirtq_desc).
ctypedef struct pvring_desc_t:
    uint64_t addr
    uint32_t len
    uint16_t id
    uint16_t flags

ctypedef struct chain_t:
    uint16_t head
    int fault              # F_* of the walk/translation, F_NONE if the chain is usable
    int nsegs
    int nreadable          # segs[0:nreadable] are device-readable, the rest writable
    uint64_t total_len     # bytes over all segments
    uint8_t *last_byte     # last byte of the last descriptor if device-writable and mapped
    iovec segs[MAX_SEGS]

ctypedef struct vq_log_t:
    uint8_t *log               # the frontend's log bitmap (SET_LOG_BASE mapping); NULL: off
    uint64_t size              # its size in bytes
    uint64_t used_gpa          # guest-physical address of the used ring, if log_used
    bint log_used              # VHOST_VRING_F_LOG: log the used ring's writes too

ctypedef struct vq_t:
    uint16_t num
    uint8_t *desc              # split: descriptor table; packed: the descriptor ring
    uint8_t *avail             # split: avail ring; packed: driver event suppression
    uint8_t *used              # split: used ring; packed: device event suppression
    uint16_t last_avail        # split: free-running index; packed: ring position
    uint16_t avail_shadow      # split: avail->idx as last read; [last_avail, avail_shadow)
                               # are known available without reading it again
    uint16_t used_idx          # split: next used index we publish (shadow of used->idx);
                               # packed: ring position of the next used descriptor
    # Packed virtqueue (VIRTIO_F_RING_PACKED, virtio 1.2 §2.8): the same calls, another layout.
    bint packed
    bint avail_wrap            # wrap counter of last_avail (starts 1)
    bint used_wrap             # wrap counter of used_idx (starts 1)
    uint16_t *pk_ndescs        # ring descriptors each outstanding buffer took (by id % num)
    int pk_first               # position of the batch's first used descriptor, -1: none;
    uint16_t pk_first_flags    # its flags are stored last, at vq_publish (one release)
    uint16_t pk_log_from       # first position written since the last publish (dirty log)
    uint16_t signalled_used
    bint signalled_used_valid
    bint event_idx
    bint indirect
    bint broken
    int call_fd
    int nregions
    mem_region_t *regions
    int last_region            # translation cache
    uint64_t faults[NUM_FAULTS]
    uint64_t completed
    uint64_t notifies
    uint64_t kicks
    # Dirty logging (VHOST_F_LOG_ALL, vq_log_setup): NULL when off.  Every guest write the
    # workers make is logged through vq_log_chain / vq_log_host; vq_publish and the kick
    # helpers log the used ring when the frontend asked for it (VHOST_VRING_F_LOG).
    uint8_t *log
    uint64_t log_size          # bytes of bitmap: pages [0, 8 * log_size) can be logged
    uint64_t log_used_gpa      # guest-physical address of the used ring (log_guest_addr)
    bint log_used
    uint16_t log_used_from     # used index at the last logged publish
    uint64_t log_pages         # page bits set (counted per write, not distinct pages)
    uint64_t log_beyond        # writes the frontend's log was too small for (a frontend bug)
    # Inflight tracking (INFLIGHT_SHMFD, vq_inflight_setup): NULL when off.  vq_pop marks a
    # head in flight, vq_publish clears the heads it made visible; after a restart the
    # region says what was popped and never completed, and vq_pop hands those out again
    # (submission order) before the avail ring.
    uint8_t *inflight          # this queue's QueueRegionSplit in the frontend's inflight fd
    uint64_t inflight_counter  # submission counter of the next popped head
    uint16_t *inflight_batch   # heads pushed since the last publish
    uint32_t inflight_batch_n
    uint16_t *resubmit         # heads to hand out again, in submission order
    uint32_t resubmit_n
    uint32_t resubmit_pos
    uint64_t resubmitted       # heads handed out again since the worker started
    uint64_t inflight_untracked  # packed: chains too long (or ids too large) to track

# Where a queue is: the value GET_VRING_BASE reports and SET_VRING_BASE gives.  Split: the avail
# index.  Packed (as QEMU's virtio_queue_packed_get_last_avail_idx): bits 0-14 the avail
# position, 15 its wrap counter, 16-30 the used position, 31 its wrap counter.
ctypedef struct vq_pos_t:
    uint16_t last_avail
    bint avail_wrap

cdef int vq_init(vq_t *vq, uint16_t num, uint64_t desc, uint64_t avail, uint64_t used,
                 uint32_t base, bint event_idx, bint indirect, int call_fd,
                 const mem_region_t *regions, int nregions, bint packed=*) noexcept nogil
cdef uint32_t vq_base(vq_t *vq) noexcept nogil
cdef vq_pos_t vq_tell(vq_t *vq) noexcept nogil
cdef void vq_seek(vq_t *vq, vq_pos_t pos) noexcept nogil
cdef void vq_free(vq_t *vq) noexcept nogil
cdef int vq_log_parse(object log, vq_log_t *out) except -1
cdef void vq_log_set(vq_t *vq, const vq_log_t *log) noexcept nogil
cdef void vq_failpoint(int point) noexcept nogil
cdef int vq_inflight_setup(vq_t *vq, uint64_t addr, uint64_t size) noexcept nogil
cdef int vq_inflight_from(vq_t *vq, object inflight) except -1
cdef int vq_log_setup(vq_t *vq, object log) except -1
cdef void vq_log_gpa(vq_t *vq, uint64_t gpa, uint64_t length) noexcept nogil
cdef void vq_log_host(vq_t *vq, const void *p, uint64_t length) noexcept nogil
cdef void vq_log_chain(vq_t *vq, chain_t *c, uint64_t written) noexcept nogil
cdef int vq_translate(vq_t *vq, uint64_t gpa, uint64_t length, chain_t *c) noexcept nogil
cdef int vq_avail_count(vq_t *vq) noexcept nogil
cdef int vq_pop(vq_t *vq, chain_t *c) noexcept nogil
cdef void vq_push(vq_t *vq, uint16_t head, uint32_t length) noexcept nogil
cdef void vq_publish(vq_t *vq) noexcept nogil
cdef bint vq_should_notify(vq_t *vq) noexcept nogil
cdef void vq_notify(vq_t *vq) noexcept nogil
cdef bint vq_enable_kick(vq_t *vq) noexcept nogil
cdef void vq_disable_kick(vq_t *vq) noexcept nogil
cdef size_t chain_copy_from(chain_t *c, size_t offset, void *dst, size_t n) noexcept nogil
cdef size_t chain_copy_to(chain_t *c, size_t offset, const void *src, size_t n) noexcept nogil
