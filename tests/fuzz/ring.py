"""ring: the split-virtqueue engine (cython_ext/ring.pyx) walking arbitrary descriptor tables and
avail rings over arbitrary region layouts, with guard pages around every region
(vhost/testing/guarded.py): a read or write outside guest memory faults and is a crash.

One input = one region table, one queue (size, rings placed where the protocol would accept them:
inside region 0, aligned), the ring contents, then one driver over it:
  probe      RingProbe: pop every chain (checking each returned segment lies inside one region,
             the lengths add up, the status byte is the last writable byte), push, publish,
             notify, kick enable/disable
  blk        a BlkQueueWorker (synchronous I/O) on a small image: three batches of the
             runtime loop (worker.pyx), stop flag set
  blk-uring  the same through io_uring
  rng        an RngQueueWorker, likewise
The workers copy headers and status bytes with memcpy (guard pages catch those) and hand data
segments to the kernel (preadv / pwritev / getrandom), which reports a bad address as EFAULT, not
a fault: any backing-store error is therefore a crash too (the image is a regular file and every
request the worker accepts lies inside it).  Canary bytes in each region's page slack must stay.
With config bit 6 the queue tracks its heads in an inflight region, fresh or fuzzed (recovery
from whatever a frontend hands back), guarded the same way.
With config bit 5 the queue logs its writes (dirty logging, as while migrating) into a log
bitmap of fuzzed size, guarded like a region (its last byte against a guard page), with a
fuzzed used-ring log address: a bit set past the declared size faults.

Layout (all fields front-consumed, see data.py): u8 config (bit 0 event_idx, bit 1 no indirect,
bits 2-3 driver, bit 4 read-only, bit 5 dirty log, bit 6 inflight region, bit 7 the rings read
as a packed ring), u8 queue size,
[u16 log size, u64 used-ring log address (bit 63: none)], [u8 (bit 0: recovered, then the
region's bytes)], u8 region count and per region u8 kind,
u8 pages, u16 size trim, [u64 gpa]; ring offsets u32 x3; ring state; descriptor writes; then
raw pokes into the regions until the input ends.
"""
from __future__ import annotations

import os
import struct
import tempfile

from cython_ext.blk import BlkQueueWorker
from cython_ext.ring import RingProbe
from cython_ext.rng import RngQueueWorker
from protocols import vhost_user as vu
from vhost.testing.guarded import PAGE, GuardedMemory, GuardedRegion

from tests.fuzz.data import Input

MAX_LEN = 8192
DRIVERS = ("probe", "blk", "blk-uring", "rng")
U64 = (1 << 64) - 1
NUM_FAULTS = 12
IO_FAULT = "backing store I/O error"
IMAGE_SECTORS = 128
MAX_POPS = 300

_img_dir = tempfile.mkdtemp(prefix="fuzz-ring-", dir="/var/tmp")
_IMG = os.path.join(_img_dir, "disk.img")
with open(_IMG, "wb") as _f:
    _f.write(bytes(IMAGE_SECTORS * 512))
_FD_BUFFERED = os.open(_IMG, os.O_RDWR | os.O_CLOEXEC)
try:
    _FD_DIRECT = os.open(_IMG, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
except OSError:
    _FD_DIRECT = _FD_BUFFERED
_CALL = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def ring_sizes(q: int) -> tuple[int, int, int]:
    return 16 * q, 6 + 2 * q, 6 + 8 * q


class Layout:
    """The regions and the rings of one input."""

    def __init__(self, inp: Input, qsize: int):
        self.mem = GuardedMemory()
        self.qsize = qsize
        dlen, alen, ulen = ring_sizes(qsize)
        need = dlen + alen + ulen + 64
        for i in range(1 + inp.u8() % 3):
            kind = inp.u8()
            size = (1 + inp.u8() % 8) * PAGE
            if kind & 0x10:
                size -= inp.u16() % PAGE
            if i == 0:
                size += -(-need // PAGE) * PAGE
            gpa = self._gpa(inp, kind, size, i)
            if gpa is None:
                continue
            self.mem.add(gpa, size, align_end=bool(kind & 0x20))
        r0 = self.mem.regions[0]
        self.desc = self._place(r0, inp.u32(), dlen, 16)
        self.avail = self._place(r0, inp.u32(), alen, 2)
        self.used = self._place(r0, inp.u32(), ulen, 4)

    def _gpa(self, inp: Input, kind: int, size: int, i: int):
        prev = self.mem.regions[-1] if self.mem.regions else None
        mode = kind & 3
        if prev is None:
            top = (U64 + 1 - size) & ~(PAGE - 1)         # region 0 always fits
            gpa = min(inp.u64() & ~(PAGE - 1), top) if mode == 2 else (0 if mode != 3 else top)
        elif mode == 0:
            gpa = prev.gpa + prev.size                              # adjacent
        elif mode == 1:
            gpa = prev.gpa + prev.size + PAGE * (1 + inp.u8())      # a hole
        elif mode == 2:
            gpa = inp.u64()
        else:
            gpa = U64 + 1 - size - PAGE * inp.u8()                  # the top of the space
        if gpa < 0 or gpa + size - 1 > U64:
            return None
        for r in self.mem.regions:                                  # the protocol refuses these
            if gpa < r.gpa + r.size and r.gpa < gpa + size:
                return None
        return gpa

    @staticmethod
    def _place(r, raw: int, length: int, align: int) -> int:
        """Host address of a ring of `length` bytes in region r, aligned as the protocol
        requires, somewhere `raw` says."""
        span = r.size - length - align
        off = raw % (span + 1) if span > 0 else 0
        return (r.host + off + align - 1) & ~(align - 1)

    # -- guest-physical addresses the descriptors may carry --
    def gpa_in(self, inp: Input) -> int:
        mode = inp.u8() % 8
        r = self.mem.regions[inp.u8() % len(self.mem.regions)]
        if mode <= 2:
            return r.gpa + inp.u32() % r.size                       # inside a region
        if mode == 3:
            return r.gpa + r.size - 1 - inp.u8()                    # near its end
        if mode == 4:
            return (r.gpa - 1 - inp.u8()) & U64                     # just below it
        if mode == 5:
            return (r.gpa + r.size + inp.u8()) & U64                # just past it
        if mode == 6:
            return self.gpa_of_host(self.desc) + 16 * (inp.u8() % self.qsize)   # the table
        return inp.u64()

    def gpa_of_host(self, host: int) -> int:
        for r in self.mem.regions:
            if r.contains_host(host, 1):
                return r.gpa + host - r.host
        raise AssertionError("ring outside region 0")

    def write_host(self, host: int, data: bytes) -> None:
        for r in self.mem.regions:
            if r.contains_host(host, len(data)):
                r.write(host - r.host, data)
                return

    def read_host(self, host: int, n: int) -> bytes:
        r = self.mem.region_of_host(host, n)
        return r.read(host - r.host, n)

    def write_gpa(self, gpa: int, data: bytes) -> bool:
        h = self.mem.gpa_to_host(gpa, len(data))
        if h is None:
            return False
        self.write_host(h, data)
        return True


def _length(inp: Input) -> int:
    mode = inp.u8() % 6
    if mode <= 1:
        return inp.u8()
    if mode == 2:
        return inp.u16()
    if mode == 3:
        return 16 * (1 + inp.u8() % 8)             # an indirect table's length
    if mode == 4:
        return 512 * (1 + inp.u8() % 8) + inp.u8() % 3 * 8
    return inp.u32()


def _descriptor(inp: Input, lay: Layout) -> bytes:
    addr = lay.gpa_in(inp)
    length = _length(inp)
    flags = inp.u8()
    flags = flags & 7 if not flags & 0x80 else (flags << 8 | inp.u8())
    nxt = inp.u16()
    if not nxt & 0x8000:
        nxt %= lay.qsize
    return struct.pack("<QIHH", addr, length & 0xFFFFFFFF, flags & 0xFFFF, nxt)


def build(inp: Input, lay: Layout) -> tuple[int, int]:
    """Fill the rings; returns (last_avail, avail idx - last_avail as the pokes left it)."""
    q = lay.qsize
    last_avail = inp.u16()
    delta = inp.u8()
    if delta & 0x80 and inp.flag():
        delta = inp.u16()                           # usually more than the queue: broken
    elif delta > q:
        delta %= q + 1
    avail_idx = (last_avail + delta) & 0xFFFF
    used_idx = last_avail if inp.flag() else inp.u16()
    lay.write_host(lay.avail, struct.pack("<HH", inp.u8() & 1, avail_idx))
    lay.write_host(lay.used, struct.pack("<HH", 0, used_idx))
    lay.write_host(lay.avail + 4 + 2 * q, struct.pack("<H", inp.u16()))    # used_event
    for k in range(min(delta, q, inp.u8() + 1)):
        head = inp.u16()
        if not head & 0x8000:
            head %= q
        lay.write_host(lay.avail + 4 + 2 * ((last_avail + k) % q), struct.pack("<H", head))
    for _ in range(inp.u8() % 64):
        where = inp.u8()
        d = _descriptor(inp, lay)
        if where & 0x80:                        # anywhere in guest memory (indirect tables)
            lay.write_gpa(lay.gpa_in(inp) & ~15, d)
        else:
            lay.write_host(lay.desc + 16 * (inp.u16() % q), d)
    while inp.remaining():                      # raw pokes, the rings included
        r = lay.mem.regions[inp.u8() % len(lay.mem.regions)]
        off = inp.u32() % r.size
        data = inp.bytes(inp.u8() % 64 + 1)
        r.write(off, data[:r.size - off])
    avail_idx = struct.unpack("<H", lay.read_host(lay.avail + 2, 2))[0]
    return last_avail, (avail_idx - last_avail) & 0xFFFF


def check_chain(c: dict, lay: Layout, packed: bool = False) -> None:
    q = lay.qsize
    assert 0 <= c["head"] < (1 << 16 if packed else q), c      # packed: a buffer id
    assert 0 <= c["fault"] < NUM_FAULTS, c
    segs = c["segs"]
    assert 0 <= c["nreadable"] <= len(segs), c
    for addr, n in segs:
        assert n > 0 and lay.mem.region_of_host(addr, n) is not None, \
            f"segment {addr:#x}+{n} outside guest memory: {c}"
    if c["fault"] == 0:
        assert sum(n for _, n in segs) == c["total_len"], c
    if c["last_byte"]:
        assert lay.mem.region_of_host(c["last_byte"], 1) is not None, c
        if c["fault"] == 0:
            addr, n = segs[-1]
            assert c["last_byte"] == addr + n - 1, c


def run_probe(lay: Layout, last_avail: int, delta: int, event_idx: bool, indirect: bool,
              log=None, inflight=None, packed=False) -> None:
    probe = RingProbe(lay.qsize, lay.desc, lay.avail, lay.used, last_avail,
                      lay.mem.table_bytes(), event_idx, indirect, _CALL, log=log,
                      inflight=inflight, packed=packed)
    popped, broken = 0, False
    for k in range(min(lay.qsize, MAX_POPS) + 2):
        try:
            c = probe.pop()
        except RuntimeError:
            broken = True
            break
        if c is None:
            break
        popped += 1
        check_chain(c, lay, packed)
        probe.complete(c["total_len"] & 0xFFFFFFFF)
        if k % 7 == 6:
            probe.publish()
            probe.notify()
    probe.publish()
    probe.notify()
    probe.enable_kick()
    probe.disable_kick()
    _, alen, ulen = ring_sizes(lay.qsize)
    if inflight is None and not packed and (lay.used + ulen <= lay.avail
                                            or lay.avail + alen <= lay.used):
        # (when the used ring overlaps the avail ring, what we push changes what is available)
        assert (broken or popped == min(delta, MAX_POPS + 2)) and (not broken or delta > 0), \
            (popped, delta)
        if delta > lay.qsize:
            assert broken, delta
    assert probe.broken == broken


def run_worker(driver: str, cfg: int, lay: Layout, last_avail: int, event_idx: bool,
               indirect: bool, log=None, inflight=None, packed=False) -> None:
    table = lay.mem.table_bytes()
    if driver == "rng":
        w = RngQueueWorker(0, lay.qsize, lay.desc, lay.avail, lay.used, last_avail, table, -1,
                           _CALL, event_idx=event_idx, indirect=indirect,
                           max_bytes=4 << 20, period_ms=3_600_000, log=log, packed=packed)
    else:
        w = BlkQueueWorker(0, lay.qsize, lay.desc, lay.avail, lay.used, last_avail, table, -1,
                           _CALL, _FD_DIRECT, _FD_BUFFERED, bool(cfg & 0x10), IMAGE_SECTORS,
                           b"fuzz-serial", event_idx=event_idx, indirect=indirect,
                           use_io_uring=driver == "blk-uring", max_discard_sectors=64,
                           max_write_zeroes_sectors=64, log=log, inflight=inflight,
                           packed=packed)
    try:
        # The runtime's own loop: with the stop flag already set each run() is one batch (and
        # the at-stop completion of in-flight I/O); a ring that feeds itself cannot hang it.
        w.stop()
        for _ in range(3):
            w.run()
        faults = w.stats()["faults"]
        assert IO_FAULT not in faults, f"{driver}: backing store errors (EFAULT?): {faults}"
    finally:
        w.close()


def TestOneInput(data: bytes) -> None:
    inp = Input(data)
    cfg = inp.u8()
    event_idx, indirect = bool(cfg & 1), not cfg & 2
    driver = DRIVERS[(cfg >> 2) & 3]
    qlog = inp.u8()
    # A chain may be as long as the queue and the queue may offer as many chains: a batch is up
    # to size^2 descriptor steps (by design, as in QEMU).  Queues past 1024 only for the probe,
    # which pops at most MAX_POPS chains.
    qsize = 1 << (qlog % (16 if driver == "probe" else 11) if qlog & 0x80 else qlog % 9)
    log_region, log = None, None
    if cfg & 0x20:
        size = 1 + inp.u16()
        used_gpa = inp.u64()
        log_region = GuardedRegion(0, size, align_end=True)     # a guard right after its end
        log = (log_region.host, size, -1 if used_gpa >> 63 else used_gpa)
    inflight_region, inflight = None, None
    if cfg & 0x40:
        # inflight tracking on a region that is fresh (zeroes) or one a previous backend (or a
        # hostile frontend) left: fuzzed bytes with a valid version and ring size, so that
        # recovery runs; its last byte sits against a guard page
        size = vu.inflight_queue_size(qsize)
        inflight_region = GuardedRegion(0, size, align_end=True)
        if inp.u8() & 1:
            inflight_region.write(0, inp.bytes(size).ljust(size, b"\0"))
            inflight_region.write(8, struct.pack("<HH", vu.INFLIGHT_VERSION, qsize))
        inflight = (inflight_region.host, size)
    # bit 7: the same bytes as a packed ring (descriptor ring, driver and device event
    # suppression at the avail and used addresses); the base's positions within the ring
    packed = bool(cfg & 0x80)
    if packed and inflight_region is not None and inp.u8() & 1:
        inflight_region.write(0, struct.pack("<Q", 1))     # the packed layout's feature bit
    lay = Layout(inp, qsize)
    try:
        last_avail, delta = build(inp, lay)
        if packed:
            last_avail = (last_avail % qsize) | (last_avail & 0x8000)
        if driver == "probe":
            run_probe(lay, last_avail, delta, event_idx, indirect, log, inflight, packed)
        else:
            run_worker(driver, cfg, lay, last_avail, event_idx, indirect, log,
                       inflight if driver != "rng" else None, packed)
        assert lay.mem.slack_intact(), "a write landed in a region's page slack"
        if log_region is not None:
            assert log_region.slack_intact(), "a log bit was set before the log's start"
    finally:
        lay.mem.close()
        if log_region is not None:
            log_region.close()
        if inflight_region is not None:
            assert inflight_region.slack_intact(), "a write before the inflight region"
            inflight_region.close()
