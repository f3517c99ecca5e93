# cython: language_level=3
"""net.pyx: virtio-net queue workers (virtio 1.2 §5.1) and the in-process L2 switch, GIL released.

Owns: tx (pop a chain, check it, writev the virtio_net_hdr + frame straight from guest memory to a
tap, or copy it once into the destination guest's rx buffers through the switch), rx (a frame
read from a tap, or handed over by the switch, copied into guest rx buffers, honouring
MRG_RXBUF / num_buffers), the switch's MAC table (learning, ageing, flooding, no hairpin; port
security: ports locked to their MAC, a cap on each port's learned entries), the per-port
counters, and offload compatibility between ports (GSO only to ports that accept it;
NEEDS_CSUM resolved in software for ports without GUEST_CSUM).
Must not: create Python objects per packet (Python is entered only to log a fault,
rate-limited), block anywhere but poll(2), or touch memory outside the region tables (all guest
buffers come from ring.pyx's checked segments).

Locking: a port's rx queue can be written by several threads (every other port's tx worker and
the uplink reader), so each rx queue has a mutex held while a frame is delivered and while the
queue is attached/detached.  The MAC table has one mutex.  A tx queue belongs to one worker.
The port's negotiated settings (header length, MRG_RXBUF, offloads) change only with every rx
queue lock held, and rx_deliver reads them once per frame.  A frontend's call fd is never
written under a lock other tenants' senders need: the used entries are published under the
queue lock, the call fd is signalled after it is dropped, and detaching waits for signallers
still out (rxq_t.signalling) before the fd may be closed.  The fd is non-blocking (the protocol
makes every received eventfd so), so a saturated eventfd costs one failed write, never a hang.
"""
import logging
import os

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, int16_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset, memcpy, memcmp
from cpython.bytes cimport PyBytes_AS_STRING
from libc.errno cimport errno, EAGAIN, EINTR
from posix.unistd cimport read, write, close
from posix.uio cimport iovec
from posix.time cimport clock_gettime, nanosleep, timespec, CLOCK_MONOTONIC

from cython_ext.ring cimport *
from cython_ext.posix_io cimport *
from cython_ext.worker cimport *

log = logging.getLogger("pyvhost.net")

cdef extern from "vhost_compat.h" nogil:
    void stat_add(uint64_t *counter, uint64_t n)
    void users_enter(int *p)
    void users_leave(int *p)
    int users_count(const int *p)
    void cpu_relax()
    int load_flag(const int *p)
    void store_flag(int *p, int v)

cdef enum:
    MAX_PORTS = 64
    MAX_PAIRS = 16
    MAC_TABLE_SIZE = 4096          # power of two; open addressing
    MAC_PROBE = 16
    # A port at its mac_limit may free aged entries (mac_reclaim: a scan of the whole table)
    # at most once per RECLAIM_MS per switch, so a flood of random source MACs costs a table
    # scan per second, not per frame.
    RECLAIM_MS = 1000
    LEARN_OK = 0
    LEARN_REFUSED = 1              # the port holds its limit: not learned, frame forwarded
    LEARN_CONFLICT = 2             # the MAC is locked to another port: a spoofed source
    HDR_MAX = 12
    HDR_BASE = 10                  # flags .. csum_offset, common to both header sizes
    # 64 KiB of IP payload + Ethernet/VLAN header: the largest GSO frame (virtio_net.py)
    MAX_FRAME = 65536 + 18
    ETH_HLEN = 14
    BATCH = 256                    # frames per pass before publishing used entries
    PORT_VHOST = 1
    PORT_TAP = 2
    # virtio_net_hdr values (protocols/virtio_net.py has the same numbers; nogil code needs
    # them as C constants)
    GSO_NONE = 0
    GSO_TCPV4 = 1
    GSO_UDP = 3
    GSO_TCPV6 = 4
    GSO_UDP_L4 = 5
    GSO_ECN = 0x80
    NEEDS_CSUM = 1
    DELIVER_OK = 0
    DELIVER_NO_ROOM = 1
    DELIVER_DROPPED = 2

# counters per port (index into port_t.stats)
cdef enum:
    ST_TX_PACKETS = 0      # frames the port sent (guest tx / read from tap)
    ST_TX_BYTES = 1
    ST_TX_DROPPED = 2      # bad tx chains, unwritable tap
    ST_RX_PACKETS = 3      # frames delivered to the port (guest rx / written to tap)
    ST_RX_BYTES = 4
    ST_RX_NO_ROOM = 5      # dropped: no rx buffers in the guest
    ST_RX_OFFLOAD = 6      # dropped: GSO frame the port cannot take
    ST_RX_TOO_SMALL = 7    # dropped: rx buffer too small (no MRG_RXBUF)
    ST_RX_FAULT = 8        # dropped: bad rx chain
    ST_HAIRPIN = 9         # frames whose learned destination is their source port
    ST_TX_SRC_MAC = 10     # dropped (also in ST_TX_DROPPED): source MAC not allowed on the port
    ST_LEARN_REFUSED = 11  # source MACs not learned: the port holds its mac_limit of entries
    NUM_STATS = 12

STAT_NAMES = ("tx_packets", "tx_bytes", "tx_dropped", "rx_packets", "rx_bytes",
              "rx_dropped_no_room", "rx_dropped_offload", "rx_dropped_too_small",
              "rx_dropped_fault", "hairpin_filtered", "tx_dropped_src_mac",
              "mac_learn_refused")

ctypedef struct rxq_t:
    pthread_mutex_t lock
    bint active
    vq_t vq
    chain_t *chain
    uint16_t *heads
    uint32_t *lens
    uint64_t pending_used
    int signalling                 # senders signalling call_fd outside `lock` (users_enter)
    int ctl_waiting                # control-side lockers waiting for `lock` (rxq_ctl_lock)
    uint64_t stepped_aside         # frames dropped (no-room) because of it: atomic, no lock
    uint64_t stats[NUM_STATS]      # rx-side counters, written under `lock` only (no atomics)

ctypedef struct port_t:
    bint used
    int kind
    int index
    int npairs
    int hdr_len                     # 10 or 12, from the negotiated features
    bint mrg_rxbuf
    bint guest_csum
    bint guest_tso4
    bint guest_tso6
    bint guest_ufo
    bint guest_ecn
    int tap_fd                      # PORT_TAP: fd frames to this port are written to
    rxq_t rx[MAX_PAIRS]
    uint64_t stats[NUM_STATS]
    # port security (switch ports; Port.set_mac, before the port's workers start)
    bint mac_locked                 # only `mac` may be a source; it is a locked table entry
    uint8_t mac[6]
    uint32_t mac_limit              # learned entries the port may hold; 0: no limit
    uint32_t mac_count              # learned entries it holds (aged ones too until
                                    # reclaimed); under the switch's lock

ctypedef struct mac_entry_t:
    uint8_t mac[6]
    int16_t port
    uint8_t used
    uint8_t locked                 # a locked port's MAC: never ages, never moves, never evicted
    uint64_t seen_ms

ctypedef struct switch_t:
    pthread_mutex_t lock
    port_t *ports[MAX_PORTS]
    mac_entry_t table[MAC_TABLE_SIZE]
    uint64_t ageing_ms
    uint64_t flooded
    uint64_t unicast
    uint64_t learned
    int nports                     # highest port index in use + 1 (bounds the flood scan)
    uint64_t reclaim_ms            # when aged entries were last reclaimed (mac_reclaim)
    uint64_t reclaim_every_ms      # at most once per this (RECLAIM_MS, or the ageing if shorter)
    uint64_t reclaims
    int gen                        # bumped (under lock) whenever an entry appears, moves or
                                   # goes: the senders' lookup caches are valid while it holds



# Per-sender forwarding state: rx queues written in this batch (published and notified once
# at the end of the batch instead of once per frame), and one-entry caches of the last source
# MAC learned and destination looked up, so a stream between two stations takes the MAC
# table's mutex about once per millisecond rather than twice per frame.
cdef enum:
    MAX_DIRTY = 64
    MAC_CACHE_MS = 1

ctypedef struct fwd_t:
    rxq_t *dirty[MAX_DIRTY]
    int ndirty
    # rx queues found without buffers in this batch, and the frames since dropped for them
    # without looking again: a source faster than its receiver otherwise re-read the avail
    # index the receiver is writing once per frame (a cache line bouncing between the two
    # CPUs), which slowed the receiver itself (bench.net --mode source, issue 13)
    rxq_t *full[MAX_DIRTY]
    uint64_t full_drops[MAX_DIRTY]
    int nfull
    uint8_t learned_mac[6]
    int learned_verdict            # mac_learn's answer for learned_mac (LEARN_*)
    uint64_t learned_ms
    uint8_t lookup_mac[6]
    int lookup_port                # -1 (unknown: flood) is cached too
    int lookup_gen                 # switch_t.gen when looked up
    uint64_t lookup_ms
    uint64_t now_ms                # read once per batch (a clock read per frame cost ~18%)
    uint64_t stats[NUM_STATS]      # the sender's tx-side counters: one writer, no atomics
    uint64_t unicast               # the switch-wide counters' share of this batch, added
    uint64_t flooded               # once per batch by fwd_flush (an atomic per frame: 2-3%)


cdef inline uint64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>ts.tv_nsec // 1000000


# Faults are logged by the runtime, rate-limited (worker.pyx wk_note_fault).
cdef wk_log_t NET_LOG
NET_LOG.logger = <void *>log
NET_LOG.what = b"frame dropped"


cdef inline void note_fault(vq_t *vq, int qindex, int code) noexcept nogil:
    wk_note_fault(&NET_LOG, vq, qindex, code)


# --- frames ---------------------------------------------------------------------------------------

ctypedef struct frame_t:
    uint8_t hdr[HDR_MAX]           # the sender's virtio_net_hdr (first HDR_BASE bytes used)
    iovec *iov                     # the frame (after the header)
    int niov
    size_t len
    iovec first                    # the chain segment the frame starts in, before trimming


cdef inline int frame_from_chain(chain_t *c, int hdr_len, frame_t *f) noexcept nogil:
    """View a tx chain as header + frame without copying the frame.  Returns an F_* code."""
    cdef size_t skip
    cdef int k
    if c.fault != F_NONE:
        return c.fault
    if c.nreadable != c.nsegs:
        return F_ORDER                       # tx buffers are device-readable only
    if c.total_len <= <uint64_t>hdr_len or c.total_len > <uint64_t>(hdr_len + MAX_FRAME):
        return F_REQUEST
    memset(f.hdr, 0, HDR_MAX)
    if c.segs[0].iov_len >= <size_t>hdr_len:
        memcpy(f.hdr, c.segs[0].iov_base, hdr_len)      # the usual layout: no ring.pyx call
    else:
        chain_copy_from(c, 0, f.hdr, hdr_len)
    skip = hdr_len
    k = 0
    while skip >= c.segs[k].iov_len:
        skip -= c.segs[k].iov_len
        k += 1
    f.first = c.segs[k]
    c.segs[k].iov_base = <uint8_t *>c.segs[k].iov_base + skip
    c.segs[k].iov_len -= skip
    f.iov = &c.segs[k]
    f.niov = c.nsegs - k
    f.len = c.total_len - hdr_len
    return F_NONE


cdef inline uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t n, bint odd) noexcept nogil:
    """Ones'-complement sum of big-endian 16-bit words (RFC 1071); `odd` says p starts at an odd
    offset of the summed range."""
    cdef size_t i = 0
    if odd and n:
        sum += p[0]
        i = 1
    while i + 1 < n:
        sum += (<uint32_t>p[i] << 8) | p[i + 1]
        i += 2
    if i < n:
        sum += <uint32_t>p[i] << 8
    return sum


cdef bint frame_checksum(frame_t *f, uint16_t *out) noexcept nogil:
    """Resolve VIRTIO_NET_HDR_F_NEEDS_CSUM in software: sum from csum_start to the end."""
    cdef uint16_t start = (<uint16_t *>(f.hdr + 6))[0]
    cdef uint32_t sum = 0
    cdef size_t off = 0, l, s
    cdef int k
    cdef bint odd = False
    if start >= f.len:
        return False
    for k in range(f.niov):
        l = f.iov[k].iov_len
        if off + l > start:
            s = start - off if start > off else 0
            sum = csum_add(sum, <uint8_t *>f.iov[k].iov_base + s, l - s, odd)
            odd = odd ^ ((l - s) & 1)
        off += l
    while sum >> 16:
        sum = (sum & 0xFFFF) + (sum >> 16)
    out[0] = <uint16_t>(~sum & 0xFFFF)
    return True


cdef int check_offloads(port_t *dst, frame_t *f) noexcept nogil:
    """0 if dst can take f as it is, 1 if it needs a software checksum, -1 if it cannot."""
    cdef uint8_t gso = f.hdr[1] & ~(<uint8_t>GSO_ECN)
    if gso != GSO_NONE:
        if (gso == GSO_TCPV4 and not dst.guest_tso4) or (gso == GSO_TCPV6 and not dst.guest_tso6) \
                or ((gso == GSO_UDP or gso == GSO_UDP_L4) and not dst.guest_ufo) \
                or (gso != GSO_TCPV4 and gso != GSO_TCPV6 and gso != GSO_UDP and gso != GSO_UDP_L4) \
                or ((f.hdr[1] & GSO_ECN) and not dst.guest_ecn) or not dst.guest_csum:
            return -1
        return 0
    if (f.hdr[0] & NEEDS_CSUM) and not dst.guest_csum:
        return 1
    return 0


# --- rx: copy a frame into guest buffers ------------------------------------------------------------

cdef int rx_deliver(rxq_t *q, port_t *p, frame_t *f, int qindex) noexcept nogil:
    """Copy header + frame into the guest's rx buffers of q (caller holds q.lock).  Returns
    DELIVER_OK, DELIVER_NO_ROOM (nothing consumed: the ring is rewound) or DELIVER_DROPPED."""
    cdef vq_t *vq = &q.vq
    cdef chain_t *c = q.chain
    cdef uint8_t hdr[HDR_MAX]
    # the port's settings, read once: they only change under every rx lock (Port.set_features),
    # and one frame must be laid out with one header length from start to end
    cdef size_t hdr_len = p.hdr_len
    cdef bint mrg_rxbuf = p.mrg_rxbuf
    cdef size_t total = hdr_len + f.len
    cdef size_t done = 0, cap, n, src_off = 0, take, l
    cdef int nbufs = 0, r, k, si = 0, csum_mode
    cdef size_t si_off = 0
    cdef vq_pos_t start = vq_tell(vq)        # to put back what this frame popped
    cdef uint8_t *nb_lo = NULL
    cdef uint8_t *nb_hi = NULL
    cdef uint8_t *cs_lo = NULL
    cdef uint8_t *cs_hi = NULL
    cdef size_t cs_pos = 0
    cdef uint16_t csum = 0
    cdef size_t pos, seg_start
    cdef uint8_t *dst
    cdef size_t dl

    csum_mode = check_offloads(p, f)
    if csum_mode < 0:
        q.stats[ST_RX_OFFLOAD] += 1
        return DELIVER_DROPPED
    memcpy(hdr, f.hdr, HDR_BASE)
    hdr[10] = 0
    hdr[11] = 0
    if csum_mode == 1:
        if not frame_checksum(f, &csum):
            q.stats[ST_RX_FAULT] += 1
            return DELIVER_DROPPED
        cs_pos = hdr_len + (<uint16_t *>(f.hdr + 6))[0] + (<uint16_t *>(f.hdr + 8))[0]
        hdr[0] = hdr[0] & ~(<uint8_t>NEEDS_CSUM)
        if cs_pos + 2 > total:
            q.stats[ST_RX_FAULT] += 1
            return DELIVER_DROPPED
    if csum_mode == 0 and vq.log == NULL and vq.num > 0:
        # the usual case first: header and frame fit the first buffer's first segment (a
        # mergeable guest posts 1526-byte or page-sized buffers, DPDK 2 KiB mbufs), so the
        # header is one copy with num_buffers = 1 already in it and the frame one copy per
        # source segment -- no per-byte scan for where num_buffers lands (perf, issue 13)
        r = vq_pop(vq, c)
        if r != 1:
            if r < 0:
                q.stats[ST_RX_FAULT] += 1
                return DELIVER_DROPPED
            return DELIVER_NO_ROOM
        if c.fault == F_NONE and c.nreadable == 0 and c.nsegs > 0 \
                and c.segs[0].iov_len >= total:
            dst = <uint8_t *>c.segs[0].iov_base
            hdr[10] = 1
            memcpy(dst, hdr, hdr_len)
            dst += hdr_len
            done = 0
            for k in range(f.niov):
                take = f.iov[k].iov_len
                if take > f.len - done:
                    take = f.len - done
                memcpy(dst + done, f.iov[k].iov_base, take)
                done += take
            vq_push(vq, c.head, <uint32_t>(hdr_len + done))
            q.pending_used += 1
            q.stats[ST_RX_PACKETS] += 1
            q.stats[ST_RX_BYTES] += f.len
            return DELIVER_OK
        vq_seek(vq, start)                   # anything else: the general path pops it again
    # source byte stream: header (hdr_len bytes from hdr[]) then f.iov[]
    while done < total:
        if nbufs >= vq.num:
            r = 0
        else:
            r = vq_pop(vq, c)
        if r != 1:
            vq_seek(vq, start)               # put the buffers back: nothing was published
            if r < 0:
                q.stats[ST_RX_FAULT] += 1
                return DELIVER_DROPPED
            return DELIVER_NO_ROOM
        if c.fault != F_NONE or c.nreadable != 0 or c.total_len == 0 \
                or (nbufs == 0 and c.total_len < <uint64_t>hdr_len):
            # a bad buffer: return it empty, and everything popped for this frame with it
            note_fault(vq, qindex, c.fault if c.fault != F_NONE else F_ORDER)
            q.heads[nbufs] = c.head
            q.lens[nbufs] = 0
            for k in range(nbufs + 1):
                vq_push(vq, q.heads[k], 0)
            q.pending_used += nbufs + 1
            q.stats[ST_RX_FAULT] += 1
            return DELIVER_DROPPED
        if not mrg_rxbuf and c.total_len < total:
            vq_seek(vq, start)               # too small for the frame: leave it for later
            q.stats[ST_RX_TOO_SMALL] += 1
            return DELIVER_DROPPED
        # copy into this chain's segments
        cap = 0
        for k in range(c.nsegs):
            dst = <uint8_t *>c.segs[k].iov_base
            dl = c.segs[k].iov_len
            seg_start = done
            while dl and done < total:
                if done < hdr_len:
                    take = hdr_len - done
                    if take > dl:
                        take = dl
                    memcpy(dst, hdr + done, take)
                    # remember where num_buffers (header bytes 10, 11) lands
                    if hdr_len == 12:
                        for pos in range(done, done + take):
                            if pos == 10:
                                nb_lo = dst + (pos - done)
                            elif pos == 11:
                                nb_hi = dst + (pos - done)
                else:
                    l = f.iov[si].iov_len - si_off
                    take = l if l < dl else dl
                    if take > total - done:
                        take = total - done
                    memcpy(dst, <uint8_t *>f.iov[si].iov_base + si_off, take)
                    if cs_pos and cs_pos + 1 >= done and cs_pos < done + take:
                        if cs_pos >= done:
                            cs_lo = dst + (cs_pos - done)
                        if cs_pos + 1 < done + take:
                            cs_hi = dst + (cs_pos + 1 - done)
                    si_off += take
                    if si_off == f.iov[si].iov_len:
                        si += 1
                        si_off = 0
                dst += take
                dl -= take
                done += take
                cap += take
            if done == total:
                break
        if vq.log != NULL:
            vq_log_chain(vq, c, cap)      # c is reused for the next buffer: log it now
        q.heads[nbufs] = c.head
        q.lens[nbufs] = <uint32_t>cap
        nbufs += 1
        if not mrg_rxbuf:
            break
    if nb_lo != NULL:
        nb_lo[0] = nbufs & 0xFF
    if nb_hi != NULL:
        nb_hi[0] = (nbufs >> 8) & 0xFF
    if cs_lo != NULL:
        cs_lo[0] = csum >> 8
    if cs_hi != NULL:
        cs_hi[0] = csum & 0xFF
    if vq.log != NULL:
        # written after their buffers were logged: logged again, so that a page the frontend
        # copied in between is sent once more
        if nb_lo != NULL:
            vq_log_host(vq, nb_lo, 1)
        if nb_hi != NULL:
            vq_log_host(vq, nb_hi, 1)
        if cs_lo != NULL:
            vq_log_host(vq, cs_lo, 1)
        if cs_hi != NULL:
            vq_log_host(vq, cs_hi, 1)
    for k in range(nbufs):
        vq_push(vq, q.heads[k], q.lens[k])
    q.pending_used += nbufs
    q.stats[ST_RX_PACKETS] += 1
    q.stats[ST_RX_BYTES] += f.len
    return DELIVER_OK


cdef inline int rxq_publish(rxq_t *q) noexcept nogil:
    """Publish the pending used entries (caller holds q.lock).  Returns the call fd to signal
    once the lock is dropped (rxq_signal), or -1; while one is returned the queue counts a
    signaller out, and detaching waits for it before the fd can be closed."""
    if q.pending_used == 0:
        return -1
    vq_publish(&q.vq)
    q.pending_used = 0
    if q.vq.call_fd >= 0 and vq_should_notify(&q.vq):
        q.vq.notifies += 1
        users_enter(&q.signalling)
        return q.vq.call_fd
    return -1


cdef inline void rxq_signal(rxq_t *q, int fd) noexcept nogil:
    """Signal what rxq_publish returned, outside q.lock (non-blocking fd: never waits)."""
    cdef uint64_t one = 1
    if fd >= 0:
        write(fd, &one, 8)
        users_leave(&q.signalling)


cdef inline void rxq_flush(rxq_t *q) noexcept nogil:
    """Publish and signal; takes and drops q.lock itself."""
    cdef int fd = -1
    pthread_mutex_lock(&q.lock)
    if q.active:
        fd = rxq_publish(q)
    pthread_mutex_unlock(&q.lock)
    rxq_signal(q, fd)


cdef inline void rxq_ctl_lock(rxq_t *q) noexcept nogil:
    """The control side's q.lock (attach, detach, a feature change): announced before it waits,
    and senders step aside while someone is announced (port_receive: the frame counts as
    no-room).  A pthread mutex is not fair: a flooding sender unlocks and re-locks within one
    frame (~50 ns) while a woken waiter needs microseconds to run, so without this a flood
    from another tenant could keep a queue restart waiting for as long as it lasts."""
    users_enter(&q.ctl_waiting)
    pthread_mutex_lock(&q.lock)
    users_leave(&q.ctl_waiting)


cdef int rxq_attach(rxq_t *q, uint16_t num, uint64_t desc, uint64_t avail, uint64_t used,
                    uint32_t last_avail, bint event_idx, bint indirect, int call_fd,
                    const mem_region_t *regions, int nregions,
                    const vq_log_t *log, bint packed) noexcept nogil:
    cdef int r
    rxq_ctl_lock(q)
    if q.active:                     # checked again under the lock (attach_rx drops the GIL)
        pthread_mutex_unlock(&q.lock)
        return -1
    r = vq_init(&q.vq, num, desc, avail, used, last_avail, event_idx, indirect, call_fd,
                regions, nregions, packed)
    if r == 0:
        # before the queue is active: other ports' senders write into it from then on
        vq_log_set(&q.vq, log)
        q.chain = <chain_t *>calloc(1, sizeof(chain_t))
        q.heads = <uint16_t *>calloc(num, sizeof(uint16_t))
        q.lens = <uint32_t *>calloc(num, sizeof(uint32_t))
        if q.chain == NULL or q.heads == NULL or q.lens == NULL:
            r = -1
        else:
            q.active = True
            q.pending_used = 0
    pthread_mutex_unlock(&q.lock)
    return r


cdef uint32_t rxq_detach(rxq_t *q) noexcept nogil:
    """Stop delivering to q; when this returns nobody uses its ring or its call fd any more."""
    cdef uint32_t last
    cdef int fd
    rxq_ctl_lock(q)
    fd = rxq_publish(q)
    last = vq_base(&q.vq)
    q.active = False
    vq_free(&q.vq)
    free(q.chain)
    free(q.heads)
    free(q.lens)
    q.chain = NULL
    q.heads = NULL
    q.lens = NULL
    pthread_mutex_unlock(&q.lock)
    rxq_signal(q, fd)
    # senders that published before we took the lock may still be signalling the call fd,
    # which the protocol closes (and the number may be reused) once we return
    while users_count(&q.signalling):
        cpu_relax()
    return last


# --- the switch -------------------------------------------------------------------------------------

cdef inline uint32_t mac_hash(const uint8_t *mac) noexcept nogil:
    cdef uint32_t h = 2166136261u
    cdef int i
    for i in range(6):
        h = (h ^ mac[i]) * 16777619u
    return h & (MAC_TABLE_SIZE - 1)


cdef inline void mac_unown(switch_t *sw, mac_entry_t *e) noexcept nogil:
    """e (used, not locked) stops counting against its port's limit (caller holds sw.lock)."""
    cdef port_t *o
    if e.port >= 0 and e.port < MAX_PORTS:
        o = sw.ports[e.port]
        if o != NULL and o.mac_count > 0:
            o.mac_count -= 1


cdef inline void mac_changed(switch_t *sw) noexcept nogil:
    """The table changed: every sender's lookup cache (fwd_t.lookup_*) is stale.  Caller
    holds sw.lock; the senders read gen without it (a relaxed load once per frame)."""
    store_flag(&sw.gen, sw.gen + 1)


cdef void mac_reclaim(switch_t *sw, uint64_t t) noexcept nogil:
    """Free every aged learned entry (ageing is otherwise lazy: an aged entry keeps its slot
    until a learn reuses it).  Caller holds sw.lock and rate-limits (RECLAIM_MS)."""
    cdef int i
    cdef mac_entry_t *e
    for i in range(MAC_TABLE_SIZE):
        e = &sw.table[i]
        if e.used and not e.locked and t - e.seen_ms > sw.ageing_ms:
            mac_unown(sw, e)
            e.used = 0
    mac_changed(sw)
    sw.reclaim_ms = t
    sw.reclaims += 1


cdef inline bint mac_room(switch_t *sw, port_t *me, uint64_t t) noexcept nogil:
    """May port `me` hold one more learned entry?  At its limit, its aged entries are
    reclaimed first, at most once per reclaim_every_ms (caller holds sw.lock)."""
    if me.mac_limit == 0 or me.mac_count < me.mac_limit:
        return True
    if t - sw.reclaim_ms < sw.reclaim_every_ms:
        return False
    mac_reclaim(sw, t)
    return me.mac_count < me.mac_limit


cdef mac_entry_t *mac_free_or_oldest(switch_t *sw, uint32_t h) noexcept nogil:
    """In the probe neighbourhood of hash h: a free slot, else the oldest unlocked entry, else
    NULL (only locked entries).  Caller holds sw.lock."""
    cdef int i
    cdef mac_entry_t *e
    cdef mac_entry_t *victim = NULL
    for i in range(MAC_PROBE):
        e = &sw.table[(h + i) & (MAC_TABLE_SIZE - 1)]
        if not e.used:
            return e
        if not e.locked and (victim == NULL or e.seen_ms < victim.seen_ms):
            victim = e
    return victim


cdef void mac_claim(switch_t *sw, mac_entry_t *e, const uint8_t *mac, int port, bint locked,
                    uint64_t t) noexcept nogil:
    """Make e the entry of `mac` on `port` (its previous owner loses it).  Caller holds
    sw.lock."""
    if e.used:
        mac_unown(sw, e)
    memcpy(e.mac, mac, 6)
    e.port = port
    mac_changed(sw)
    e.used = 1
    e.locked = locked
    e.seen_ms = t


cdef int mac_learn(switch_t *sw, const uint8_t *mac, int port) noexcept nogil:
    """Learn (or refresh) `mac` on `port`.  LEARN_OK; LEARN_REFUSED: the port holds its
    mac_limit of entries (or the MAC's neighbourhood is all locked entries), the frame is still
    forwarded (flooded to it when unknown); LEARN_CONFLICT: `mac` is locked to another port.
    A port below its limit may take the oldest live learned entry of a full neighbourhood (the
    table is then crowded); a port at its limit never evicts anything, so it holds at most its
    limit.  Locked entries are never moved or evicted."""
    cdef uint32_t h = mac_hash(mac)
    cdef int i
    cdef mac_entry_t *e
    cdef mac_entry_t *found = NULL
    cdef mac_entry_t *victim = NULL
    cdef port_t *me
    cdef uint64_t t = now_ms()
    cdef int r = LEARN_OK
    if mac[0] & 1:
        return LEARN_OK                       # never learn a group address
    pthread_mutex_lock(&sw.lock)
    me = sw.ports[port]
    if me == NULL:
        pthread_mutex_unlock(&sw.lock)
        return LEARN_OK
    for i in range(MAC_PROBE):
        e = &sw.table[(h + i) & (MAC_TABLE_SIZE - 1)]
        if e.used and memcmp(e.mac, mac, 6) == 0:
            found = e
            break
        if victim == NULL and (not e.used or (not e.locked and t - e.seen_ms > sw.ageing_ms)):
            victim = e
    if found != NULL:
        if found.locked:
            r = LEARN_OK if found.port == port else LEARN_CONFLICT
        elif found.port == port:
            found.seen_ms = t
        elif mac_room(sw, me, t):             # the station moved to this port
            mac_unown(sw, found)
            found.port = port
            mac_changed(sw)
            found.seen_ms = t
            me.mac_count += 1
        else:
            r = LEARN_REFUSED
        pthread_mutex_unlock(&sw.lock)
        return r
    if not mac_room(sw, me, t):
        pthread_mutex_unlock(&sw.lock)
        return LEARN_REFUSED
    if victim == NULL:                        # full neighbourhood: a slot freed by a reclaim,
        victim = mac_free_or_oldest(sw, h)    # else the oldest learned entry
        if victim == NULL:
            pthread_mutex_unlock(&sw.lock)
            return LEARN_REFUSED
    mac_claim(sw, victim, mac, port, False, t)
    me.mac_count += 1
    sw.learned += 1
    pthread_mutex_unlock(&sw.lock)
    return LEARN_OK


cdef int mac_lock(switch_t *sw, const uint8_t *mac, int port) noexcept nogil:
    """Make `mac` a locked entry of `port` (taken from whoever learned it; a full
    neighbourhood gives up its oldest learned entry).  Returns the port it is already locked
    to, -1 on success, or MAX_PORTS when the neighbourhood holds only locked entries.  Caller
    holds sw.lock."""
    cdef uint32_t h = mac_hash(mac)
    cdef int i
    cdef mac_entry_t *e
    cdef mac_entry_t *victim = NULL
    cdef uint64_t t = now_ms()
    for i in range(MAC_PROBE):
        e = &sw.table[(h + i) & (MAC_TABLE_SIZE - 1)]
        if e.used and memcmp(e.mac, mac, 6) == 0:
            if e.locked:
                return -1 if e.port == port else e.port
            victim = e
            break
    if victim == NULL:
        victim = mac_free_or_oldest(sw, h)
        if victim == NULL:
            return MAX_PORTS
    mac_claim(sw, victim, mac, port, True, t)
    return -1


cdef void mac_forget_port(switch_t *sw, int port) noexcept nogil:
    """Drop every entry of `port`, locked ones included (caller holds sw.lock)."""
    cdef int i
    cdef mac_entry_t *e
    for i in range(MAC_TABLE_SIZE):
        e = &sw.table[i]
        if e.used and e.port == port:
            e.used = 0
            e.locked = 0
    mac_changed(sw)
    if sw.ports[port] != NULL:
        sw.ports[port].mac_count = 0


cdef int mac_lookup(switch_t *sw, const uint8_t *mac, uint64_t t) noexcept nogil:
    """Port of `mac`, or -1 (unknown, aged out, or a group address: flood).  `t` is the
    caller's batch clock (fwd_t.now_ms): another sender may have refreshed the entry after
    it, so seen_ms > t is fresh, not a wrapped age."""
    cdef uint32_t h, i
    cdef mac_entry_t *e
    cdef int port = -1
    if mac[0] & 1:
        return -1
    h = mac_hash(mac)
    pthread_mutex_lock(&sw.lock)
    for i in range(MAC_PROBE):
        e = &sw.table[(h + i) & (MAC_TABLE_SIZE - 1)]
        if e.used and memcmp(e.mac, mac, 6) == 0:
            if e.locked or e.seen_ms >= t or t - e.seen_ms <= sw.ageing_ms:
                port = e.port
            break
    pthread_mutex_unlock(&sw.lock)
    return port


cdef inline bint frame_mac(frame_t *f, size_t off, uint8_t *mac) noexcept nogil:
    """Copy 6 bytes at frame offset off (the frame may be scattered)."""
    cdef size_t pos = 0, l, k2
    cdef int k, got = 0
    for k in range(f.niov):
        l = f.iov[k].iov_len
        k2 = 0
        while k2 < l and got < 6:
            if pos + k2 >= off:
                mac[got] = (<uint8_t *>f.iov[k].iov_base)[k2]
                got += 1
            k2 += 1
        pos += l
        if got == 6:
            return True
    return False


cdef void fwd_flush(fwd_t *fw) noexcept nogil:
    """Publish and notify every rx queue this sender wrote since the last flush."""
    cdef int k
    cdef rxq_t *q
    for k in range(fw.ndirty):
        rxq_flush(fw.dirty[k])
    fw.ndirty = 0


cdef inline void fwd_end(switch_t *sw, fwd_t *fw) noexcept nogil:
    """The end of a sender's batch: its rx queues published, the drops at full queues counted,
    its share of the switch-wide counters added (one atomic each per batch, not per frame)."""
    cdef int k
    if fw.ndirty:
        fwd_flush(fw)
    for k in range(fw.nfull):
        pthread_mutex_lock(&fw.full[k].lock)
        fw.full[k].stats[ST_RX_NO_ROOM] += fw.full_drops[k]
        pthread_mutex_unlock(&fw.full[k].lock)
    fw.nfull = 0
    if fw.unicast:
        stat_add(&sw.unicast, fw.unicast)
        fw.unicast = 0
    if fw.flooded:
        stat_add(&sw.flooded, fw.flooded)
        fw.flooded = 0


cdef void port_receive(port_t *dst, frame_t *f, int pair, fwd_t *fw) noexcept nogil:
    """Hand a frame to port dst: written to its tap, or copied into its guest's rx queue (the
    sender's pair index modulo dst's pairs).  Never blocks on a full ring: drops and counts."""
    cdef rxq_t *q
    cdef iovec iov[MAX_SEGS + 1]
    cdef int k, n, fd
    cdef ssize_t w
    cdef bint seen
    if dst.kind == PORT_TAP:
        if dst.tap_fd < 0:
            return
        iov[0].iov_base = f.hdr
        iov[0].iov_len = dst.hdr_len
        n = f.niov if f.niov < MAX_SEGS else MAX_SEGS
        for k in range(n):
            iov[k + 1] = f.iov[k]
        w = writev(dst.tap_fd, iov, n + 1)
        if w < 0:
            stat_add(&dst.stats[ST_RX_NO_ROOM], 1)
        else:
            stat_add(&dst.stats[ST_RX_PACKETS], 1)
            stat_add(&dst.stats[ST_RX_BYTES], f.len)
        return
    if dst.npairs <= 0:
        stat_add(&dst.stats[ST_RX_NO_ROOM], 1)
        return
    q = &dst.rx[pair % dst.npairs]
    for k in range(fw.nfull):
        if fw.full[k] == q:                  # no buffers earlier in this batch: drop
            fw.full_drops[k] += 1
            return
    fd = -1
    # locked per frame, never across a batch: a sender that kept the lock from one frame to
    # the next (tried in e433c6f, 3-8 ns a frame) re-took it before a waiter woke, so a queue
    # restart under a flood (attach_rx, Port.set_features) starved -- and attach_rx waits with
    # the GIL held, which froze the whole service (test_hostile_frontends, fuzz build)
    if users_count(&q.ctl_waiting):
        stat_add(&q.stepped_aside, 1)            # the queue is being restarted: step aside
        return
    pthread_mutex_lock(&q.lock)
    if not q.active:
        q.stats[ST_RX_NO_ROOM] += 1
    else:
        if rx_deliver(q, dst, f, 2 * (pair % dst.npairs)) == DELIVER_NO_ROOM:
            q.stats[ST_RX_NO_ROOM] += 1
            if fw.nfull < MAX_DIRTY:
                fw.full[fw.nfull] = q
                fw.full_drops[fw.nfull] = 0
                fw.nfull += 1
        if q.pending_used:
            seen = False
            for k in range(fw.ndirty):
                if fw.dirty[k] == q:
                    seen = True
                    break
            if not seen:
                if fw.ndirty < MAX_DIRTY:
                    fw.dirty[fw.ndirty] = q
                    fw.ndirty += 1
                else:
                    fd = rxq_publish(q)
    pthread_mutex_unlock(&q.lock)
    rxq_signal(q, fd)


cdef void switch_forward(switch_t *sw, int src, frame_t *f, int pair, fwd_t *fw) noexcept nogil:
    cdef uint8_t dmac[6]
    cdef uint8_t smac[6]
    cdef int dst, k, g
    cdef port_t *p
    cdef uint64_t t
    if f.len < ETH_HLEN:
        fw.stats[ST_TX_DROPPED] += 1
        return
    if f.iov[0].iov_len >= 12:
        memcpy(dmac, f.iov[0].iov_base, 6)
        memcpy(smac, <uint8_t *>f.iov[0].iov_base + 6, 6)
    elif not frame_mac(f, 0, dmac) or not frame_mac(f, 6, smac):
        fw.stats[ST_TX_DROPPED] += 1
        return
    t = fw.now_ms
    p = sw.ports[src]
    if p.mac_locked:
        # port security: only the port's own MAC, which is a locked entry (nothing to learn)
        if memcmp(smac, p.mac, 6) != 0:
            fw.stats[ST_TX_DROPPED] += 1
            fw.stats[ST_TX_SRC_MAC] += 1
            return
    else:
        if t - fw.learned_ms >= MAC_CACHE_MS or memcmp(fw.learned_mac, smac, 6) != 0:
            fw.learned_verdict = mac_learn(sw, smac, src)
            memcpy(fw.learned_mac, smac, 6)
            fw.learned_ms = t
            if fw.learned_verdict == LEARN_REFUSED:
                fw.stats[ST_LEARN_REFUSED] += 1
        if fw.learned_verdict == LEARN_CONFLICT:      # another port's locked MAC
            fw.stats[ST_TX_DROPPED] += 1
            fw.stats[ST_TX_SRC_MAC] += 1
            return
    # the last destination's answer, unknown included, holds while the table is unchanged
    # (gen) and for MAC_CACHE_MS (ageing): a sink's stream to one unknown MAC took the
    # table's mutex and a 16-entry probe per frame, 30% of the consumer (perf, issue 13)
    g = load_flag(&sw.gen)
    if g == fw.lookup_gen and t - fw.lookup_ms < MAC_CACHE_MS \
            and memcmp(fw.lookup_mac, dmac, 6) == 0:
        dst = fw.lookup_port
    else:
        dst = mac_lookup(sw, dmac, t)
        memcpy(fw.lookup_mac, dmac, 6)
        fw.lookup_port = dst
        fw.lookup_gen = g
        fw.lookup_ms = t
    if dst == src:
        fw.stats[ST_HAIRPIN] += 1                             # no hairpin
        return
    if dst >= 0 and sw.ports[dst] != NULL and sw.ports[dst].used:
        fw.unicast += 1
        port_receive(sw.ports[dst], f, pair, fw)
        return
    fw.flooded += 1
    for k in range(sw.nports):
        p = sw.ports[k]
        if p != NULL and p.used and k != src:
            port_receive(p, f, pair, fw)


# --- workers ----------------------------------------------------------------------------------------

ctypedef struct worker_t:
    wk_t rt                  # the runtime: loop, stop, kicks (worker.pyx)
    int mode                 # 1: tap pair (tap mode), 2: switch tx, 3: uplink reader
    int pair
    # tx side (owned by the runtime: its kick fd is rt.kick_fds[0])
    bint has_tx
    vq_t tx
    chain_t *chain
    # rx side (tap mode: the port's rx queue q; switch uplink: none)
    bint has_rx
    int rx_kick
    int tap_fd
    uint8_t *bounce          # one frame read from the tap: header + frame
    size_t bounce_len        # > 0 while a frame waits for rx buffers
    port_t *port
    switch_t *sw
    int port_index
    fwd_t fwd


cdef int tx_pass(worker_t *w) noexcept nogil:
    """Pop and send up to BATCH frames from the tx queue.  Returns frames popped or -1."""
    cdef int n = 0, r, f_code
    cdef frame_t f
    cdef ssize_t wr
    cdef port_t *p = w.port
    w.fwd.now_ms = now_ms()
    while n < BATCH:
        r = vq_pop(&w.tx, w.chain)
        if r == 0:
            break
        if r < 0:
            note_fault(&w.tx, 2 * w.pair + 1, F_AVAIL)
            # what this batch delivered to other ports is still published; the frames popped
            # before the corruption complete as usual
            fwd_end(w.sw, &w.fwd)
            if n:
                vq_publish(&w.tx)
                vq_notify(&w.tx)
            return -1
        n += 1
        f_code = frame_from_chain(w.chain, p.hdr_len, &f)
        if f_code != F_NONE:
            note_fault(&w.tx, 2 * w.pair + 1, f_code)
            w.fwd.stats[ST_TX_DROPPED] += 1
        else:
            w.fwd.stats[ST_TX_PACKETS] += 1
            w.fwd.stats[ST_TX_BYTES] += f.len
            if w.mode == 1:
                # tap mode: header + frame straight from guest memory (the tap takes our header)
                f.iov[0] = f.first
                wr = writev(w.tap_fd, w.chain.segs, w.chain.nsegs)
                if wr < 0:
                    w.fwd.stats[ST_TX_DROPPED] += 1
            else:
                switch_forward(w.sw, w.port_index, &f, w.pair, &w.fwd)
        vq_push(&w.tx, w.chain.head, 0)
    fwd_end(w.sw, &w.fwd)
    if n:
        vq_publish(&w.tx)
        vq_notify(&w.tx)
    return n


cdef int tap_rx_pass(worker_t *w) noexcept nogil:
    """Read frames from the tap and deliver them.  Returns frames delivered; sets
    w.bounce_len when a frame waits for rx buffers."""
    cdef int n = 0, r
    cdef ssize_t got
    cdef frame_t f
    cdef iovec one
    cdef port_t *p = w.port
    cdef rxq_t *q
    w.fwd.now_ms = now_ms()
    while n < BATCH:
        if w.bounce_len == 0:
            got = read(w.tap_fd, w.bounce, p.hdr_len + MAX_FRAME)
            if got <= 0:
                break
            if got <= p.hdr_len:
                continue
            w.bounce_len = got
        memcpy(f.hdr, w.bounce, p.hdr_len)
        one.iov_base = w.bounce + p.hdr_len
        one.iov_len = w.bounce_len - p.hdr_len
        f.iov = &one
        f.niov = 1
        f.len = one.iov_len
        if w.mode == 3:
            w.fwd.stats[ST_TX_PACKETS] += 1
            w.fwd.stats[ST_TX_BYTES] += f.len
            switch_forward(w.sw, w.port_index, &f, 0, &w.fwd)
            w.bounce_len = 0
            n += 1
            continue
        q = &p.rx[w.pair]
        pthread_mutex_lock(&q.lock)
        if q.active:
            r = rx_deliver(q, p, &f, 2 * w.pair)
        else:
            r = DELIVER_NO_ROOM
        pthread_mutex_unlock(&q.lock)
        if r == DELIVER_NO_ROOM:
            break                            # held, not dropped: retried when buffers come
        w.bounce_len = 0
        n += 1
    fwd_end(w.sw, &w.fwd)
    if w.mode == 1:
        rxq_flush(&p.rx[w.pair])
    return n


# --- the device's side of the runtime (worker.pyx calls these once per batch / per sleep) ----

cdef int net_batch(void *dev) noexcept nogil:
    """One tx pass and one tap read pass.  While a tap frame waits for rx buffers, report idle
    so the runtime sleeps on the rx kick instead of spinning on the full rx ring."""
    cdef worker_t *w = <worker_t *>dev
    cdef int work = 0, r
    if w.has_tx and not w.tx.broken:
        r = tx_pass(w)               # -1: avail ring corrupt, the queue is now broken
        if r > 0:
            work += r
    if w.mode == 3 or (w.mode == 1 and w.has_rx):
        work += tap_rx_pass(w)
    if w.bounce_len > 0:
        return 0
    return work


cdef void net_prepare_wait(void *dev, wk_wait_t *ws) noexcept nogil:
    """Wait on the tap (when we read it and no frame is held), or, while a frame waits for rx
    buffers, on the rx queue's kick.  Rx kicks matter only then; otherwise keep them
    suppressed so the guest does not pay for notifications nobody reads."""
    cdef worker_t *w = <worker_t *>dev
    cdef rxq_t *q = NULL
    cdef wk_src_t *src
    if w.mode == 1 and w.has_rx:
        q = &w.port.rx[w.pair]
    if w.bounce_len > 0:
        src = &ws.src[ws.n]
        ws.n += 1
        src.fd = w.rx_kick
        src.vq = &q.vq if q != NULL else NULL
        src.lock = &q.lock if q != NULL else NULL
        src.live = <const int *>&q.active if q != NULL else NULL
        return
    if q != NULL:
        pthread_mutex_lock(&q.lock)
        if q.active:
            vq_disable_kick(&q.vq)
        pthread_mutex_unlock(&q.lock)
    if w.mode == 3 or (w.mode == 1 and w.has_rx):
        src = &ws.src[ws.n]
        ws.n += 1
        src.fd = w.tap_fd
        src.vq = NULL
        src.lock = NULL
        src.live = NULL


cdef wk_ops_t NET_OPS
NET_OPS.batch = net_batch
NET_OPS.pending = NULL
NET_OPS.prepare_wait = net_prepare_wait
NET_OPS.at_stop = NULL

# The numbers above that mirror protocols/ (tests/test_c_constants.py checks each against it).
C_CONSTANTS = {
    "virtio_net.GSO_NONE": GSO_NONE, "virtio_net.GSO_TCPV4": GSO_TCPV4,
    "virtio_net.GSO_UDP": GSO_UDP, "virtio_net.GSO_TCPV6": GSO_TCPV6,
    "virtio_net.GSO_UDP_L4": GSO_UDP_L4, "virtio_net.GSO_ECN": GSO_ECN,
    "virtio_net.HDR_F_NEEDS_CSUM": NEEDS_CSUM, "virtio_net.HDR_SIZE": HDR_MAX,
    "virtio_net.LEGACY_HDR_SIZE": HDR_BASE, "virtio_net.MAX_GSO_FRAME": MAX_FRAME,
    "virtio_net.ETH_HLEN": ETH_HLEN,
}


# --- Python-facing objects -------------------------------------------------------------------------

cdef void _test_hold_rx_lock(rxq_t *q, double seconds, bint then_gil) noexcept:
    """Tests: hold q.lock for `seconds` with the GIL released, as a sender in the middle of a
    frame does; `then_gil`: take the GIL too before letting go, as a sender logging a fault
    under the lock does (wk_note_fault) -- so that whoever waits for q.lock holding the GIL
    deadlocks, which nothing may do."""
    cdef timespec ts
    ts.tv_sec = <long>seconds
    ts.tv_nsec = <long>((seconds - ts.tv_sec) * 1e9)
    with nogil:
        pthread_mutex_lock(&q.lock)
        nanosleep(&ts, NULL)
        if then_gil:
            with gil:
                pass
        pthread_mutex_unlock(&q.lock)


cdef class Switch:
    """The in-process learning L2 switch; every port of a --switch belongs to one."""
    cdef switch_t *sw
    cdef readonly str name

    def __cinit__(self, str name="sw0", double ageing_seconds=300.0):
        self.sw = <switch_t *>calloc(1, sizeof(switch_t))
        if self.sw == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.sw.lock, NULL)
        self.sw.ageing_ms = <uint64_t>(ageing_seconds * 1000)
        # reclaiming more often than entries can age would free nothing more
        self.sw.reclaim_every_ms = min(<uint64_t>RECLAIM_MS, max(self.sw.ageing_ms, <uint64_t>1))
        self.name = name

    def __dealloc__(self):
        if self.sw != NULL:
            pthread_mutex_destroy(&self.sw.lock)
            free(self.sw)

    def hold_port_rx_lock(self, int index, int pair, double seconds, bint then_gil=False):
        """Tests: hold the rx queue lock of port `index`, pair `pair`, as another port's sender
        does -- through the switch, holding no reference to the Port (_test_hold_rx_lock)."""
        if index < 0 or index >= MAX_PORTS or self.sw.ports[index] == NULL:
            raise ValueError(f"no port {index}")
        if pair < 0 or pair >= MAX_PAIRS:
            raise ValueError("pair out of range")
        _test_hold_rx_lock(&self.sw.ports[index].rx[pair], seconds, then_gil)

    def stats(self):
        """Counters (flooded / unicast frames, MACs learned, reclaims: scans that freed aged
        entries) and the table now: mac_entries = learned entries (aged ones included until
        reclaimed or reused), mac_locked = locked entries."""
        cdef int i, n = 0, nl = 0
        with nogil:
            pthread_mutex_lock(&self.sw.lock)
            for i in range(MAC_TABLE_SIZE):
                if self.sw.table[i].used:
                    if self.sw.table[i].locked:
                        nl += 1
                    else:
                        n += 1
            pthread_mutex_unlock(&self.sw.lock)
        return dict(flooded=self.sw.flooded, unicast=self.sw.unicast, learned=self.sw.learned,
                    reclaims=self.sw.reclaims, mac_entries=n, mac_locked=nl)

    def macs(self):
        """The MAC table now: [(mac "aa:bb:..", port index, locked, ms since last seen)], aged
        entries left out.  Copied under the lock, built into Python objects after it (the
        control API's switch-show; never on the data path)."""
        cdef mac_entry_t *copy = <mac_entry_t *>malloc(sizeof(mac_entry_t) * MAC_TABLE_SIZE)
        cdef uint64_t t, ageing
        cdef int i
        if copy == NULL:
            raise MemoryError()
        try:
            with nogil:
                t = now_ms()
                pthread_mutex_lock(&self.sw.lock)
                memcpy(copy, self.sw.table, sizeof(mac_entry_t) * MAC_TABLE_SIZE)
                ageing = self.sw.ageing_ms
                pthread_mutex_unlock(&self.sw.lock)
            out = []
            for i in range(MAC_TABLE_SIZE):
                if not copy[i].used:
                    continue
                age = t - copy[i].seen_ms if t > copy[i].seen_ms else 0
                if not copy[i].locked and age > ageing:
                    continue
                out.append((":".join(f"{copy[i].mac[k]:02x}" for k in range(6)),
                            copy[i].port, bool(copy[i].locked), age))
            return sorted(out)
        finally:
            free(copy)

    def learn(self, bytes mac, int port):
        """Learn `mac` on port index `port` as a frame from it would: "ok", "refused" (the
        port holds its mac limit) or "conflict" (the MAC is locked to another port)."""
        cdef const unsigned char *m = _mac6(mac)
        cdef int r
        if port < 0 or port >= MAX_PORTS or self.sw.ports[port] == NULL:
            raise ValueError(f"no port {port}")
        with nogil:
            r = mac_learn(self.sw, m, port)
        return ("ok", "refused", "conflict")[r]

    def lookup(self, bytes mac):
        """The port index a frame to `mac` goes to, or -1 (flooded)."""
        cdef const unsigned char *m = _mac6(mac)
        cdef int r
        with nogil:
            r = mac_lookup(self.sw, m, now_ms())
        return r


def mac_slot(bytes mac):
    """The MAC table slot where `mac`'s neighbourhood (MAC_PROBE slots) starts."""
    return mac_hash(_mac6(mac))


cdef const unsigned char *_mac6(bytes mac) except NULL:
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    return mac


MAC_TABLE_SLOTS = MAC_TABLE_SIZE
MAC_NEIGHBOURHOOD = MAC_PROBE


cdef class Port:
    """One attachment: a vhost-user net device (its rx queues live here, written by whoever
    delivers to it) or a tap (uplink).  In tap mode a device has a Port of its own, outside any
    switch."""
    cdef port_t *p
    cdef Switch switch
    cdef readonly int index

    def __cinit__(self, str kind, int npairs, Switch switch=None, int index=0, int tap_fd=-1):
        cdef int k
        self.p = <port_t *>calloc(1, sizeof(port_t))
        if self.p == NULL:
            raise MemoryError()
        for k in range(MAX_PAIRS):
            pthread_mutex_init(&self.p.rx[k].lock, NULL)
        if npairs > MAX_PAIRS:
            raise ValueError(f"at most {MAX_PAIRS} queue pairs")
        self.p.kind = PORT_TAP if kind == "tap" else PORT_VHOST
        self.p.npairs = npairs
        self.p.hdr_len = 12
        self.p.tap_fd = tap_fd
        self.p.used = True
        self.p.index = index
        self.index = index
        self.switch = switch
        if switch is not None:
            if index < 0 or index >= MAX_PORTS or switch.sw.ports[index] != NULL:
                raise ValueError(f"switch port {index} is taken or out of range")
            switch.sw.ports[index] = self.p
            if index + 1 > switch.sw.nports:
                switch.sw.nports = index + 1

    def inject(self, bytes frame):
        """Send `frame` into the switch as if this port's guest had sent it (no offloads): the
        RARP announcement after a live migration (SEND_RARP), which also teaches the switch
        the MAC's new port.  Delivered with the GIL released: other tenants' call fds are
        signalled on the way."""
        self.generate(frame, 1, 3600.0)

    def generate(self, bytes frame, uint64_t count, double seconds):
        """A frame source for the benchmarks (bench/netsource.py: the reverse direction of
        issue 13's sink): `frame` sent into the switch as if this port's guest had sent it,
        up to `count` times or for `seconds`, whichever ends first, BATCH frames per pass
        as a tx worker does (one clock read, one used publication and signal per receiving
        queue, the switch counters once per pass).  A destination without rx buffers drops
        and counts, as for any sender.  The GIL is released throughout.  Returns
        (frames sent, seconds taken)."""
        cdef frame_t f
        cdef fwd_t *fw
        cdef iovec seg
        cdef uint64_t sent = 0, t0, deadline, k, n
        cdef timespec ts
        if self.switch is None:
            raise ValueError("not a switch port")
        if len(frame) < ETH_HLEN or len(frame) > MAX_FRAME:
            raise ValueError(f"frame of {len(frame)} bytes")
        fw = <fwd_t *>calloc(1, sizeof(fwd_t))
        if fw == NULL:
            raise MemoryError()
        memset(&f, 0, sizeof(frame_t))
        seg.iov_base = <void *>PyBytes_AS_STRING(frame)
        seg.iov_len = len(frame)
        fw.lookup_port = -1
        try:
            with nogil:
                clock_gettime(CLOCK_MONOTONIC, &ts)
                t0 = <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec
                deadline = t0 + <uint64_t>(seconds * 1e9)
                while sent < count:
                    fw.now_ms = now_ms()
                    n = min(<uint64_t>BATCH, count - sent)
                    for k in range(n):
                        # switch_forward may trim the view (offsets into the segment): fresh
                        # each frame, as a tx chain would be
                        f.iov = &seg
                        f.niov = 1
                        f.len = seg.iov_len
                        f.first = seg
                        switch_forward(self.switch.sw, self.index, &f, 0, fw)
                    fwd_end(self.switch.sw, fw)
                    sent += n
                    clock_gettime(CLOCK_MONOTONIC, &ts)
                    if <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec >= deadline:
                        break
                clock_gettime(CLOCK_MONOTONIC, &ts)
                k = <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec - t0
        finally:
            free(fw)
        return sent, k / 1e9

    def detach(self):
        """Leave the switch (port shutdown); its MAC table entries, locked ones included, go
        with it."""
        cdef switch_t *sw
        if self.switch is not None and self.switch.sw.ports[self.index] == self.p:
            sw = self.switch.sw
            with nogil:              # the switch lock: senders take it per frame
                pthread_mutex_lock(&sw.lock)
                self.p.used = False
                mac_forget_port(sw, self.index)
                pthread_mutex_unlock(&sw.lock)

    def set_mac(self, mac, *, bint lock=False, int limit=0):
        """Port security, set before the port's workers start.  `lock` (needs `mac`, 6 bytes):
        frames from this port must carry `mac` as their source (others are dropped and counted
        in tx_dropped_src_mac and tx_dropped), and `mac` becomes a locked entry of the switch's
        table: never aged, never learned by another port (whose frames with it are dropped the
        same way), gone when the port detaches.  `limit`: learned entries this port may hold
        (0: no limit); beyond it source MACs are not learned (counted in mac_learn_refused).
        ValueError when `mac` is locked to another port or its table neighbourhood is all
        locked entries."""
        cdef const unsigned char *m = NULL
        cdef int r = -1, k
        cdef mac_entry_t *e
        cdef switch_t *sw
        if limit < 0:
            raise ValueError("the MAC limit must be >= 0")
        if mac is not None:
            mac = bytes(mac)
            m = _mac6(mac)
            if m[0] & 1:
                raise ValueError("a group MAC cannot be a port's MAC")
        if lock and m == NULL:
            raise ValueError("locking a port needs its MAC")
        if lock and self.switch is None:
            raise ValueError("only a switch port can be locked to its MAC")
        if self.switch is None:
            self.p.mac_limit = limit
            if m != NULL:
                memcpy(self.p.mac, m, 6)
            return
        sw = self.switch.sw
        with nogil:                  # the switch lock: senders take it per frame
            pthread_mutex_lock(&sw.lock)
            if self.p.mac_locked:              # drop the old locked entry
                for k in range(MAC_TABLE_SIZE):
                    e = &sw.table[k]
                    if e.used and e.locked and e.port == self.index:
                        e.used = 0
                        e.locked = 0
                mac_changed(sw)
                self.p.mac_locked = False
            if lock:
                r = mac_lock(sw, m, self.index)
            if r == -1:
                if m != NULL:
                    memcpy(self.p.mac, m, 6)
                self.p.mac_locked = lock
                self.p.mac_limit = limit
            pthread_mutex_unlock(&sw.lock)
        if r == MAX_PORTS:
            raise ValueError(f"no room for a locked MAC {bytes(mac).hex(':')} in the MAC "
                             f"table (its slots all hold locked MACs)")
        if r >= 0:
            raise ValueError(f"MAC {bytes(mac).hex(':')} is already locked to switch port {r}")

    def mac_entries(self):
        """Learned MAC table entries this port holds (aged ones until reclaimed or reused)."""
        return self.p.mac_count

    def __dealloc__(self):
        cdef int k
        cdef switch_t *sw
        cdef port_t *p = self.p
        if p != NULL:
            if self.switch is not None and self.switch.sw.ports[self.index] == p:
                sw = self.switch.sw
                with nogil:
                    pthread_mutex_lock(&sw.lock)
                    mac_forget_port(sw, self.index)
                    sw.ports[self.index] = NULL
                    pthread_mutex_unlock(&sw.lock)
            with nogil:
                for k in range(MAX_PAIRS):
                    if p.rx[k].active:
                        rxq_detach(&p.rx[k])
                    pthread_mutex_destroy(&p.rx[k].lock)
            free(p)

    def set_features(self, *, int hdr_len, bint mrg_rxbuf, bint guest_csum, bint guest_tso4,
                     bint guest_tso6, bint guest_ufo, bint guest_ecn):
        """The guest's negotiated rx settings.  Taken with every rx queue's lock held, so that
        a sender delivering to this port sees either the old settings or the new ones for a
        whole frame.  (The protocol also stops the port's queues before a feature change: a
        worker of this port reads hdr_len for its own tx frames without a lock.)"""
        cdef int k
        if hdr_len != 10 and hdr_len != 12:
            raise ValueError(f"virtio_net_hdr length {hdr_len}")
        with nogil:
            for k in range(MAX_PAIRS):
                rxq_ctl_lock(&self.p.rx[k])
            self.p.hdr_len = hdr_len
            self.p.mrg_rxbuf = mrg_rxbuf
            self.p.guest_csum = guest_csum
            self.p.guest_tso4 = guest_tso4
            self.p.guest_tso6 = guest_tso6
            self.p.guest_ufo = guest_ufo
            self.p.guest_ecn = guest_ecn
            for k in range(MAX_PAIRS - 1, -1, -1):
                pthread_mutex_unlock(&self.p.rx[k].lock)

    def attach_rx(self, int pair, int num, uint64_t desc, uint64_t avail, uint64_t used,
                  uint32_t last_avail, bytes region_table, int call_fd, bint event_idx,
                  bint indirect, bint signal_call=False, log=None, bint packed=False):
        cdef const unsigned char *t = region_table
        cdef vq_log_t lg
        cdef int nregions = len(region_table) // sizeof(mem_region_t)
        cdef int r
        vq_log_parse(log, &lg)
        if pair < 0 or pair >= MAX_PAIRS:
            raise ValueError("pair out of range")
        if self.p.rx[pair].active:
            raise RuntimeError(f"rx queue of pair {pair} already attached")
        if not packed and last_avail > 0xFFFF:
            raise ValueError(f"rx queue base {last_avail} is not a 16-bit index")
        with nogil:                  # waits for the queue lock: never with the GIL held
            r = rxq_attach(&self.p.rx[pair], num, desc, avail, used, last_avail, event_idx,
                           indirect, call_fd, <const mem_region_t *>t, nregions, &lg, packed)
        if r != 0:
            raise ValueError(f"bad rx queue (size {num}, base {last_avail:#x})")
        if signal_call:
            with nogil:              # a frontend's fd: never written with the GIL held
                wk_signal(call_fd)

    def detach_rx(self, int pair):
        """Stop delivering to this rx queue; returns its last avail index."""
        cdef uint32_t last
        if not self.p.rx[pair].active:
            raise KeyError(pair)
        with nogil:
            last = rxq_detach(&self.p.rx[pair])
        return last

    def hold_rx_lock(self, int pair, double seconds, bint then_gil=False):
        """Tests: hold this rx queue's lock as a sender would (_test_hold_rx_lock)."""
        if pair < 0 or pair >= MAX_PAIRS:
            raise ValueError("pair out of range")
        _test_hold_rx_lock(&self.p.rx[pair], seconds, then_gil)

    def rx_lock_state(self, int pair):
        """Tests: (held, restart_waiting) for this rx queue's lock now -- so that a test waits
        for the state it needs instead of sleeping for it."""
        cdef rxq_t *q
        cdef bint held
        if pair < 0 or pair >= MAX_PAIRS:
            raise ValueError("pair out of range")
        q = &self.p.rx[pair]
        held = pthread_mutex_trylock(&q.lock) != 0
        if not held:
            pthread_mutex_unlock(&q.lock)
        return held, users_count(&q.ctl_waiting) > 0

    def rx_active(self, int pair):
        return bool(self.p.rx[pair].active)

    def set_tap_fd(self, int fd):
        self.p.tap_fd = fd

    def stats(self):
        """Port-level counters plus every rx queue's (the senders' tx-side counters live in
        their workers: NetWorker.stats)."""
        cdef int k, j
        out = [self.p.stats[k] for k in range(NUM_STATS)]
        for j in range(MAX_PAIRS):
            for k in range(NUM_STATS):
                out[k] += self.p.rx[j].stats[k]
            out[ST_RX_NO_ROOM] += self.p.rx[j].stepped_aside
        d = {STAT_NAMES[k]: out[k] for k in range(NUM_STATS)}
        d["mac_entries"] = self.p.mac_count      # a gauge: learned entries held now
        return d

    def rx_counters(self, int pair):
        """One rx queue's counters: its STAT_NAMES counters (kept for the Port's lifetime:
        attaching a queue does not clear them) and, under kicks / notifies / faults (the sum
        over fault kinds) / broken, those of the current attachment's virtqueue (cleared when
        the queue is attached again; still readable after detach_rx).  `active` says whether
        the queue is attached now.  Read without the queue's lock: a value may be one frame
        stale."""
        cdef rxq_t *q
        cdef int k
        cdef uint64_t faults = 0
        if pair < 0 or pair >= MAX_PAIRS:
            raise ValueError("pair out of range")
        q = &self.p.rx[pair]
        out = {STAT_NAMES[k]: q.stats[k] for k in range(NUM_STATS)}
        out["rx_dropped_no_room"] += q.stepped_aside     # counted outside the lock
        for k in range(1, NUM_FAULTS):
            faults += q.vq.faults[k]
        out.update(kicks=q.vq.kicks, notifies=q.vq.notifies, faults=faults,
                   broken=bool(q.vq.broken), active=bool(q.active))
        return out

    def rx_faults(self, int pair):
        from cython_ext.ring import FAULT_NAMES
        q = &self.p.rx[pair]
        return {FAULT_NAMES[k]: q.vq.faults[k] for k in range(1, NUM_FAULTS) if q.vq.faults[k]}


cdef class NetWorker:
    """One worker thread body.  mode 'tap': pair p of a tap-mode device (its tx queue and, through
    the Port, its rx queue, with tap queue fd tap_fd); 'switch': the tx queue of pair p of a
    switch port; 'uplink': the reader of an uplink tap."""
    cdef worker_t *w
    cdef Port port
    cdef Switch switch
    cdef bytes _keep

    def __cinit__(self, str mode, Port port, int pair=0, Switch switch=None, int tap_fd=-1,
                  tx=None, int rx_kick=-1, bytes region_table=b"", tx_log=None):
        """tx: None or (num, desc, avail, used, last_avail, kick_fd, call_fd, event_idx,
        indirect, signal_call[, packed]) for the tx queue of this pair; tx_log: its QueueHandle.log
        (tx writes nothing into guest buffers, only the used ring)."""
        cdef const unsigned char *t = region_table
        cdef int r
        self.w = <worker_t *>calloc(1, sizeof(worker_t))
        if self.w == NULL:
            raise MemoryError()
        r = wk_init(&self.w.rt, &NET_OPS, self.w, 0, False)
        if r < 0:
            raise OSError(-r, "eventfd")
        self.port = port
        self.switch = switch
        self._keep = region_table
        w = self.w
        w.mode = {"tap": 1, "switch": 2, "uplink": 3}[mode]
        w.pair = pair
        w.port = port.p
        w.port_index = port.index
        w.sw = switch.sw if switch is not None else NULL
        w.tap_fd = tap_fd
        w.rx_kick = rx_kick
        w.fwd.lookup_port = -1
        w.has_rx = w.mode == 3 or (w.mode == 1 and port.p.rx[pair].active)
        w.chain = <chain_t *>calloc(1, sizeof(chain_t))
        if w.mode != 2:
            w.bounce = <uint8_t *>malloc(HDR_MAX + MAX_FRAME)
            if w.bounce == NULL:
                raise MemoryError()
        if tx is not None:
            num, desc, avail, used, last_avail, kick_fd, call_fd, event_idx, indirect, sig = \
                tx[:10]
            packed = len(tx) > 10 and bool(tx[10])
            if vq_init(&w.tx, num, desc, avail, used, last_avail, event_idx, indirect, call_fd,
                       <const mem_region_t *>t,
                       len(region_table) // sizeof(mem_region_t), packed) != 0:
                raise ValueError(f"bad tx queue (size {num}, base {last_avail:#x})")
            vq_log_setup(&w.tx, tx_log)
            w.has_tx = True
            wk_add_queue(&w.rt, &w.tx, kick_fd)
            w.rt.signal_call = bool(sig)      # the runtime signals call_fd once at start

    def __dealloc__(self):
        if self.w != NULL:
            wk_close(&self.w.rt)
            if self.w.has_tx:
                vq_free(&self.w.tx)
            free(self.w.chain)
            free(self.w.bounce)
            free(self.w)
            self.w = NULL

    def run(self):
        with nogil:
            wk_run(&self.w.rt)

    def stop(self):
        wk_stop(&self.w.rt)

    def stats(self):
        """This worker's own counters (frames it sent, dropped, filtered)."""
        return {STAT_NAMES[k]: self.w.fwd.stats[k] for k in range(NUM_STATS)}

    def tx_counters(self):
        """This worker's tx virtqueue: kicks, notifies, faults (the sum over fault kinds),
        broken, for the worker's lifetime (a new worker starts from zero); all zero without a
        tx queue.  Frames and bytes are in stats()."""
        cdef int k
        cdef uint64_t faults = 0
        if not self.w.has_tx:
            return dict(kicks=0, notifies=0, faults=0, broken=False)
        for k in range(1, NUM_FAULTS):
            faults += self.w.tx.faults[k]
        return dict(kicks=self.w.tx.kicks, notifies=self.w.tx.notifies, faults=faults,
                    broken=bool(self.w.tx.broken))

    @property
    def tx_last_avail(self):
        return vq_base(&self.w.tx) if self.w.has_tx else None

    def tx_faults(self):
        from cython_ext.ring import FAULT_NAMES
        return {FAULT_NAMES[k]: self.w.tx.faults[k] for k in range(1, NUM_FAULTS)
                if self.w.tx.faults[k]}

    def counters(self):
        """The tx virtqueue in the vocabulary of vhost.device.COUNTER_KEYS (the numbers
        devices/net.py derives from stats() + tx_counters()): requests / bytes_read = frames /
        bytes taken from the guest, dropped = tx frames not sent, errors = faults (bad chains +
        a corrupt avail ring), bytes_written = inflight = 0.  Only for a worker that serves
        exactly one virtqueue (a tx queue): ValueError for an uplink or an rx-only worker."""
        cdef int k
        cdef uint64_t faults = 0
        if not self.w.has_tx:
            raise ValueError("this worker serves no virtqueue of its own")
        for k in range(1, NUM_FAULTS):
            faults += self.w.tx.faults[k]
        return wk_counters(&self.w.tx, self.w.fwd.stats[ST_TX_PACKETS],
                           self.w.fwd.stats[ST_TX_BYTES], 0, faults, 0,
                           self.w.fwd.stats[ST_TX_DROPPED])
