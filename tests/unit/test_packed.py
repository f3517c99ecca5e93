"""The packed virtqueue (VIRTIO_F_RING_PACKED, virtio 1.2 §2.8) in cython_ext/ring.pyx, driven by
the driver-side PackedVirtQueue of vhost/testing/packed.py through the ring rig: chains found by
the wrap counter, buffer ids completed out of order with the used position advancing by the
slots each took, a batch made visible by its first descriptor's flags, event suppression both
ways, GET/SET_VRING_BASE's encoding, used descriptors in the dirty log -- and the hostile-chain
suite on the packed layout: every bad chain fails alone, nothing is written outside guest
memory, the queue keeps serving."""
import os

import pytest

from cython_ext.ring import RingProbe
from protocols import virtio, virtio_blk as vb
from vhost.testing.dirtylog import DirtyLog, log_size_for, pages
from vhost.testing.packed import PackedVirtQueue
from vhost.testing.ringrig import HOLE, MEM, QueueRig, Rig

F_NEXT, F_WRITE, F_INDIRECT = (virtio.VIRTQ_DESC_F_NEXT, virtio.VIRTQ_DESC_F_WRITE,
                               virtio.VIRTQ_DESC_F_INDIRECT)
QS = 16


@pytest.fixture
def rig():
    r = QueueRig(qsize=QS, packed=True)
    yield r
    r.close()


def probe(rig, base=None, **kw):
    return RingProbe(QS, *rig.ring_hosts(), rig.base if base is None else base,
                     rig.mem.table_bytes(), packed=True, **kw)


def chain(rig, nsegs=1):
    segs = [(rig.ram.alloc(64), 64, True) for _ in range(nsegs)]
    return rig.vq.add_chain(segs)


def test_chains_are_found_by_the_wrap_counter_across_many_laps(rig):
    p = probe(rig)
    assert p.pop() is None                       # zeroed ring: nothing available in lap 1
    for lap in range(5):
        ids = [chain(rig, 1 + k % 3) for k in range(6)]
        assert p.pop() is None                   # laid out, not yet published
        rig.vq.publish(ids)
        got = [p.pop() for _ in ids]
        assert [c["head"] for c in got] == ids
        assert [len(c["segs"]) for c in got] == [1 + k % 3 for k in range(6)]
        assert p.pop() is None
        for i in ids:
            p.push(i, 7)
        p.publish()
        assert rig.vq.reap() == [(i, 7) for i in ids]


def test_out_of_order_completion_advances_by_each_buffer_s_slots(rig):
    p = probe(rig)
    a = chain(rig, 3)
    b = chain(rig, 1)
    c = chain(rig, 2)
    rig.vq.publish([a, b, c])
    assert [p.pop()["head"] for _ in range(3)] == [a, b, c]
    for i in (c, a, b):
        p.push(i, 1)
    p.publish()
    # the driver reads c at slot 0, a at slot 2 (after c's 2), b at slot 5
    assert rig.vq.reap() == [(c, 1), (a, 1), (b, 1)]
    assert rig.vq.slots_free == QS and rig.vq.in_flight == 0


def test_a_batch_becomes_visible_when_published(rig):
    p = probe(rig)
    ids = [chain(rig) for _ in range(3)]
    rig.vq.publish(ids)
    for _ in ids:
        p.pop()
    for i in ids:
        p.push(i, 3)
    assert not rig.vq.has_used()                 # the first's flags wait for publish
    p.publish()
    assert len(rig.vq.reap()) == 3


def test_indirect_chain(rig):
    p = probe(rig)
    segs = [(rig.ram.alloc(64), 64, False), (rig.ram.alloc(512), 512, True),
            (rig.ram.alloc(1), 1, True)]
    i = rig.vq.add_chain(segs, indirect=True)
    rig.vq.publish([i])
    c = p.pop()
    assert c["head"] == i and c["fault"] == 0 and c["nreadable"] == 1
    assert [n for _, n in c["segs"]] == [64, 512, 1] and c["last_byte"]
    p.push(i, 513)
    p.publish()
    assert rig.vq.reap() == [(i, 513)]


def test_base_encoding_round_trips_and_bad_positions_are_refused(rig):
    p = probe(rig)
    ids = [chain(rig) for _ in range(QS - 3)]
    rig.vq.publish(ids)
    for _ in ids:
        p.pop()
    for i in ids:
        p.push(i, 0)
    p.publish()
    rig.vq.reap()
    ids = [chain(rig) for _ in range(5)]         # into the second lap
    rig.vq.publish(ids)
    for _ in ids:
        p.pop()
    for i in ids:
        p.push(i, 0)
    p.publish()
    rig.vq.reap()
    base = p.base
    assert base == rig.vq.base()                 # (QS+2) % QS = 2, wrap 0, both halves
    assert base == 2 | (2 << 16)
    q = probe(rig, base=base)                    # a restart at the reported base
    i = chain(rig)
    rig.vq.publish([i])
    assert q.pop()["head"] == i
    for bad in (QS, QS << 16):                   # a position beyond the ring
        with pytest.raises(ValueError):
            probe(rig, base=bad | 0x8000 | 0x80000000)
    # without the used half (DPDK's frontends): used = avail
    assert probe(rig, base=0x8003).base == 0x8003 | 0x8003 << 16


def test_notifications_follow_the_driver_event_suppression(rig):
    p = probe(rig)
    rig.vq.set_interrupts(virtio.RING_EVENT_FLAGS_DISABLE)
    i = chain(rig)
    rig.vq.publish([i])
    p.pop()
    p.push(i, 0)
    p.publish()
    assert not p.should_notify()
    rig.vq.set_interrupts(virtio.RING_EVENT_FLAGS_ENABLE)
    assert p.should_notify()
    rig.vq.reap()
    # DESC: notify only once the used position passes off_wrap
    rig.vq.set_interrupts(virtio.RING_EVENT_FLAGS_DESC, 3 | 0x8000)
    for k in range(4):
        i = chain(rig)
        rig.vq.publish([i])
        p.pop()
        p.push(i, 0)
        p.publish()
        assert p.should_notify() == (k == 2), k   # the used descriptor at slot 3 is the 3rd


def test_kicks_are_disabled_and_enabled_in_the_device_area(rig):
    p = probe(rig)
    p.disable_kick()
    assert rig.vq.device_flags() == virtio.RING_EVENT_FLAGS_DISABLE
    assert not rig.vq.notify_needed()
    assert p.enable_kick() is False              # nothing available
    assert rig.vq.device_flags() == virtio.RING_EVENT_FLAGS_ENABLE
    i = chain(rig)
    rig.vq.publish([i])
    assert p.enable_kick() is True               # work arrived: do not sleep


def test_used_descriptors_are_logged(rig):
    """The buffer the device wrote and the ring slot its used descriptor went to; the
    device-area flags when kicks are re-enabled."""
    dlog = DirtyLog(log_size_for(MEM))
    try:
        p = probe(rig, log=(dlog.address, dlog.size, -1))
        rig.ram.alloc(3 * 4096)                  # keep the buffer off the ring's pages
        buf = rig.ram.alloc(64, align=4096)
        i = rig.vq.add_chain([(buf, 64, True)])
        rig.vq.publish([i])
        assert p.pop()["head"] == i
        p.complete(64)
        assert dlog.dirty() == pages(buf, 64)    # the used descriptor is not visible yet
        p.publish()
        assert dlog.dirty() == pages(buf, 64) | pages(rig.vq.desc_gpa, 16)
        p.enable_kick()
        assert pages(rig.vq.used_gpa, 4) <= dlog.dirty()
        assert dlog.tail_clean()
    finally:
        dlog.close()


# -- the hostile-chain suite on the packed layout ------------------------------------------

def _packed_hostile_cases(r):
    """(name, publish-function, expected): the split suite's cases that exist in a packed ring,
    plus its own (a chain as long as the ring, INDIRECT with NEXT)."""
    hdr_in = lambda: r.header(vb.T_IN, 0)
    st = lambda: r.status()
    data = lambda n=512: r.buf(n)
    HIGH = MEM + (128 << 10)

    def ring_long():       # NEXT on every slot: the chain never ends within the ring
        bid = r.vq.make_available([(data(16), 16, F_NEXT | F_WRITE)] * r.qsize)
        r.vq.publish([bid])
        return bid

    def indirect(extra_len=0, flags_extra=0, nested=False, entries=None):
        entries = entries or [(hdr_in(), 16, 0), (data(), 512, F_WRITE), (st(), 1, F_WRITE)]
        if nested:
            inner = r.ram.alloc(32, align=16)
            entries = [(inner, 32, F_INDIRECT)]
        table = r.ram.alloc(16 * len(entries) + 16, align=16)
        r.ram.fill(table, 16 * len(entries) + 16, 0)
        for k, (a, n, f) in enumerate(entries):
            r.ram.write(table + 16 * k, (a).to_bytes(8, "little") + n.to_bytes(4, "little")
                        + bytes(2) + f.to_bytes(2, "little"))
        ring = [(table, 16 * len(entries) + extra_len, F_INDIRECT | flags_extra)]
        if flags_extra & F_NEXT:
            ring.append((st(), 1, F_WRITE))
        bid = r.vq.make_available(ring, table=table)
        r.vq.publish([bid])
        return bid

    return [
        ("data out of range", lambda: r.raw([(hdr_in(), 16, 0, None), (HIGH, 512, F_WRITE, None),
                                             (st(), 1, F_WRITE, None)]), "ioerr"),
        ("data in the hole", lambda: r.raw([(hdr_in(), 16, 0, None),
                                            (HOLE[0] + 4096, 512, F_WRITE, None),
                                            (st(), 1, F_WRITE, None)]), "ioerr"),
        ("data straddling the end of guest RAM", lambda: r.raw([
            (hdr_in(), 16, 0, None), (MEM - 256, 512, F_WRITE, None),
            (st(), 1, F_WRITE, None)]), "ioerr"),
        ("address + length overflows", lambda: r.raw([
            (hdr_in(), 16, 0, None), (2**64 - 256, 512, F_WRITE, None),
            (st(), 1, F_WRITE, None)]), "ioerr"),
        ("huge length", lambda: r.raw([(hdr_in(), 16, 0, None), (data(), 0xFFFFFE00, F_WRITE,
                                                                 None),
                                       (st(), 1, F_WRITE, None)]), "ioerr"),
        ("chain as long as the ring", ring_long, "zero"),
        ("indirect: length not a multiple of 16", lambda: indirect(extra_len=8), "zero"),
        ("indirect: zero length", lambda: r.raw([(data(), 0, F_INDIRECT, None)]), "zero"),
        ("indirect: table out of range", lambda: r.raw([(HIGH, 48, F_INDIRECT, None)]), "zero"),
        ("indirect: table in the hole", lambda: r.raw([(HOLE[0], 48, F_INDIRECT, None)]),
         "zero"),
        ("indirect with NEXT", lambda: indirect(flags_extra=F_NEXT), "zero"),
        ("indirect inside indirect", lambda: indirect(nested=True), "zero"),
        ("indirect: readable after writable", lambda: indirect(entries=[
            (hdr_in(), 16, 0), (data(), 512, F_WRITE), (data(), 512, 0), (st(), 1, F_WRITE)]),
         "ioerr"),
        ("zero-length header", lambda: r.raw([(hdr_in(), 0, 0, None),
                                              (data(), 512, F_WRITE, None),
                                              (st(), 1, F_WRITE, None)]), "ioerr"),
        ("short header", lambda: r.raw([(hdr_in(), 8, 0, None), (st(), 1, F_WRITE, None)]),
         "ioerr"),
        ("missing status", lambda: r.raw([(hdr_in(), 16, 0, None), (data(), 512, 0, None)]),
         "zero"),
        ("status out of range", lambda: r.raw([(hdr_in(), 16, 0, None),
                                               (data(), 512, F_WRITE, None),
                                               (HIGH, 1, F_WRITE, None)]), "zero"),
        ("readable after writable", lambda: r.raw([
            (hdr_in(), 16, 0, None), (data(), 512, F_WRITE, None), (data(), 512, 0, None),
            (st(), 1, F_WRITE, None)]), "ioerr"),
        ("read past capacity", lambda: r.request(vb.T_IN, r.capacity - 1, 1024)[0], "ioerr"),
        ("unknown request type", lambda: r.request(77, 0, 512)[0], "unsupp"),
    ]


@pytest.mark.parametrize("use_io_uring", [True, False], ids=["io_uring", "sync"])
def test_hostile_chains_fail_alone_on_a_packed_ring(image, use_io_uring):
    r = Rig(image, packed=True, qsize=QS, use_io_uring=use_io_uring)
    try:
        r.assert_serving()
        names = [c[0] for c in _packed_hostile_cases(r)]
        for k, name in enumerate(names):
            case = _packed_hostile_cases(r)[k]
            before = r.worker.stats()["completed"]
            head = case[1]()
            used = r.run()
            assert len(used) == 1 and used[0][0] == head, (name, used)
            assert r.worker.stats()["completed"] == before + 1, name
            assert used[0][1] == (0 if case[2] == "zero" else 1), (name, used)
            assert not r.worker.broken and not r.vq.unknown_used, name
            assert r.hole_intact(), f"{name}: wrote outside the regions"
            r.assert_serving()                   # and the ring stays in step
        assert r.vq.slots_free == QS
    finally:
        r.close()


def test_blk_worker_on_a_packed_ring_serves_many_laps(image):
    r = Rig(image, packed=True, qsize=QS)
    try:
        for k in range(3 * QS):
            payload = os.urandom(4096)
            assert r.write(8 * (k % 50), payload) == vb.S_OK
            st, got = r.read(8 * (k % 50), 4096)
            assert st == vb.S_OK and got == payload
        assert isinstance(r.vq, PackedVirtQueue) and r.worker.stats()["completed"] == 6 * QS
    finally:
        r.close()


# -- inflight tracking on the packed ring (pyvhost's own region layout) ----------------------

from vhost.testing.inflight import InflightRegion          # noqa: E402

STALE_BASE = 0x80008000      # what QEMU sends after a backend died: its start value


def _tracked(rig, region, base=None):
    return probe(rig, base=base, inflight=region.queue())


def test_packed_kill_recovers_positions_and_resubmits_from_the_copies(rig):
    region = InflightRegion(QS)
    try:
        p = _tracked(rig, region)
        assert region.packed_layout() and p.resubmit_count == 0
        bufs = {}
        ids = []
        for n in (1, 2, 1):                      # a: 1 slot, b: 2 slots, c: 1 slot
            segs = [(rig.ram.alloc(64), 64, True) for _ in range(n)]
            i = rig.vq.add_chain(segs)
            bufs[i] = [g for g, _, _ in segs]
            ids.append(i)
        a, b, c = ids
        rig.vq.publish(ids)
        for _ in ids:
            p.pop()
        p.push(b, 1)                             # b's used descriptor overwrites a's slot 0
        p.publish()
        assert rig.vq.reap() == [(b, 1)]
        assert region.in_flight() == [a, c]
        del p                                    # killed
        p2 = _tracked(rig, region, base=STALE_BASE)      # QEMU cannot tell us where the ring is
        assert p2.resubmit_count == 2
        assert p2.base == 4 | 0x8000 | (2 | 0x8000) << 16   # avail after 4 slots, used after b
        ca, cc = p2.pop(), p2.pop()
        assert (ca["head"], cc["head"]) == (a, c)
        assert [rig.mem.uva_to_host(rig.ram.user_addr(g), 64) for g in bufs[a]] == \
            [h for h, _ in ca["segs"]]           # from the copy, not the overwritten slot
        assert p2.pop() is None
        p2.push(c, 1)
        p2.push(a, 1)
        p2.publish()
        assert rig.vq.reap() == [(c, 1), (a, 1)] and region.in_flight() == []
    finally:
        region.close()


def test_packed_kill_mid_publish_completes_nothing_twice(rig):
    region = InflightRegion(QS)
    try:
        p = _tracked(rig, region)
        ids = [chain(rig) for _ in range(3)]
        rig.vq.publish(ids)
        for _ in ids:
            p.pop()
        hdr_used = region.mm[14:16]
        p.push(ids[0], 1)
        p.push(ids[2], 1)
        p.publish()
        # a kill right after the batch became visible: marks and checkpoint not yet updated
        for i in (ids[0], ids[2]):
            region.write(32 + 80 * i, b"\x01")
        region.write(14, hdr_used)
        del p
        p2 = _tracked(rig, region, base=STALE_BASE)
        assert p2.resubmit_count == 1 and p2.pop()["head"] == ids[1]
        assert p2.pop() is None
        assert rig.vq.reap() == [(ids[0], 1), (ids[2], 1)]
    finally:
        region.close()


def test_packed_kill_between_mark_and_checkpoint_pops_the_chain_once(rig):
    region = InflightRegion(QS)
    try:
        p = _tracked(rig, region)
        ids = [chain(rig) for _ in range(2)]
        rig.vq.publish(ids)
        before = region.mm[12:14]
        p.pop()
        p.pop()
        region.write(12, before)                 # the avail checkpoint never moved
        del p
        p2 = _tracked(rig, region, base=STALE_BASE)
        assert p2.resubmit_count == 2
        assert [p2.pop()["head"] for _ in range(2)] == ids
        assert p2.pop() is None                  # and not a third time from the ring
    finally:
        region.close()
