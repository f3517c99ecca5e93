"""Ring engine (cython_ext/ring.pyx) through the blk worker, in memory: chains laid out by the
driver-side VirtQueue, direct / indirect / scatter-gather, EVENT_IDX with index wrap-around, call
and kick suppression, and hostile chains that must fail alone without touching memory outside
the regions, leaving the queue serving."""
import os
import select
import struct
import time

import pytest

from protocols import virtio_blk as vb
from vhost.testing import hostile
from vhost.testing.ringrig import F_INDIRECT, F_NEXT, F_WRITE, HOLE, MEM, Rig



@pytest.fixture(params=["io_uring", "sync"])
def rig(request, image):
    r = Rig(image, use_io_uring=request.param == "io_uring")
    yield r
    r.close()


def test_debug_build_flag():
    import cython_ext.ring as ring
    # .ci/run: the README's test step runs the optimized build, the second step the debug one
    expected = bool(os.environ.get("PYVHOST_EXPECT_DEBUG"))
    assert ring.DEBUG_BUILD == expected, (
        "extension built with PYVHOST_DEBUG_BUILD=%s; set PYVHOST_EXPECT_DEBUG=1 to test a "
        "debug build" % int(ring.DEBUG_BUILD))


def test_direct_read_write(rig, image):
    data = os.urandom(8192)
    assert rig.write(16, data) == vb.S_OK
    with open(image, "rb") as f:
        f.seek(16 * 512)
        assert f.read(8192) == data
    st, got = rig.read(16, 8192)
    assert st == vb.S_OK and got == data
    assert rig.hole_intact()


def test_indirect_and_scatter_gather(rig):
    data = os.urandom(64 * 512)
    assert rig.write(100, data, indirect=True, split=64) == vb.S_OK
    st, got = rig.read(100, len(data), split=7)
    assert st == vb.S_OK and got == data
    st, got = rig.read(100, len(data), indirect=True, split=33)
    assert st == vb.S_OK and got == data


def test_buffer_straddling_adjacent_regions_is_split(image):
    """Two GPA-adjacent regions: one descriptor covering the boundary is legal and is split
    into two host segments."""
    from vhost.testing.ram import GuestRAM
    r = Rig(image, two_regions=False)
    try:
        # Rebuild the backend view as two adjacent regions over the same shm.
        from vhost.memory import GuestMemory, MappedRegion
        half = MEM // 2
        base = r.ram.region_user_addr(r.ram.regions[0])
        mem2 = GuestMemory([MappedRegion.map(r.ram.fd, 0, half, base, 0),
                            MappedRegion.map(r.ram.fd, half, half, base + half, half)])
        from cython_ext.ring import RingProbe
        desc, used, avail = r.vq.addresses()
        probe = RingProbe(64, mem2.uva_to_host(desc, 1024), mem2.uva_to_host(avail, 134),
                          mem2.uva_to_host(used, 518), 0, mem2.table_bytes())
        r.raw([(half - 100, 200, F_WRITE, None)])
        c = probe.pop()
        assert c["fault"] == 0
        assert [n for _, n in c["segs"]] == [100, 100]
        assert c["segs"][0][0] == mem2.gpa_to_host(half - 100, 100)
        assert c["segs"][1][0] == mem2.gpa_to_host(half, 100)
        mem2.unmap_all()
    finally:
        r.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_index_wraparound(image, event_idx):
    r = Rig(image, event_idx=event_idx, start_idx=65530)
    try:
        payloads = {}
        for k in range(12):          # crosses 65535 -> 0
            payloads[k] = os.urandom(512)
            assert r.write(k, payloads[k]) == vb.S_OK
        for k in range(12):
            st, got = r.read(k, 512)
            assert st == vb.S_OK and got == payloads[k]
        assert r.vq.avail_idx == (65530 + 24) & 0xFFFF == r.worker.last_avail
    finally:
        r.close()


def _calls(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_event_idx_call_suppression(image):
    r = Rig(image, event_idx=True)
    try:
        r.assert_serving()           # first completion always signals (no history yet)
        _calls(r.call_fd)
        # driver asks for an interrupt only after used idx passes last_used + 5
        ue = (r.vq.last_used_idx + 5) & 0xFFFF
        r.ram.write(r.vq.avail_gpa + 4 + 2 * r.vq.size, struct.pack("<H", ue))
        for k in range(5):
            r.write(k, bytes(512))
        assert _calls(r.call_fd) == 0, "notified before used_event was crossed"
        r.write(5, bytes(512))      # used idx goes past used_event
        assert _calls(r.call_fd) == 1
    finally:
        r.close()


def test_no_interrupt_flag(image):
    r = Rig(image, event_idx=False)
    try:
        r.vq.set_avail_flags(1)      # VIRTQ_AVAIL_F_NO_INTERRUPT
        r.write(0, bytes(512))
        assert _calls(r.call_fd) == 0
        r.vq.set_avail_flags(0)
        r.write(0, bytes(512))
        assert _calls(r.call_fd) == 1
    finally:
        r.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_threaded_worker_and_kick_suppression(image, event_idx):
    r = Rig(image, event_idx=event_idx)
    try:
        r.start()
        for k in range(40):
            head, s, _ = r.request(vb.T_OUT, k, os.urandom(1024))
            r.vq.kick()
            used = r.vq.wait_used(1, timeout=10)
            assert used == [(head, 1)] and r.status_of(s) == vb.S_OK
        time.sleep(0.05)             # let the worker go back to sleep
        if event_idx:
            # asleep: asks to be kicked at the next avail entry
            assert r.vq.avail_event() == r.vq.avail_idx
        else:
            assert not (r.vq.used_flags() & 1)   # VIRTQ_USED_F_NO_NOTIFY cleared
        st = r.worker.stats()
        assert st["completed"] == 40 and st["kicks"] >= 1
        r.stop()
        assert r.worker.last_avail == 40
    finally:
        r.close()


# -- hostile chains -------------------------------------------------------------------------------

def _hostile_cases(r: Rig):
    """(name, publish-function, expected) with expected 'ioerr' (status IOERR, used len 1),
    'zero' (used len 0) or 'unsupp'."""
    hdr_in = lambda: r.header(vb.T_IN, 0)
    st = lambda: r.status()
    data = lambda n=512: r.buf(n)
    HIGH = MEM + (128 << 10)   # past the end of guest RAM (two-region layout ends at MEM)
    cases = [
        ("data out of range", lambda: r.raw([(hdr_in(), 16, 0, None), (HIGH, 512, F_WRITE, None),
                                             (st(), 1, F_WRITE, None)]), "ioerr"),
        ("data in the hole below region 2", lambda: r.raw([
            (hdr_in(), 16, 0, None), (HOLE[0] + 4096, 512, F_WRITE, None),
            (st(), 1, F_WRITE, None)]), "ioerr"),
        ("data straddling region 1 end into the hole", lambda: r.raw([
            (hdr_in(), 16, 0, None), (HOLE[0] - 256, 512, F_WRITE, None),
            (st(), 1, F_WRITE, None)]), "ioerr"),
        ("data straddling the end of guest RAM", lambda: r.raw([
            (hdr_in(), 16, 0, None), (MEM - 256, 512, F_WRITE, None),
            (st(), 1, F_WRITE, None)]), "ioerr"),
        ("address + length overflows", lambda: r.raw([
            (hdr_in(), 16, 0, None), (2**64 - 256, 512, F_WRITE, None),
            (st(), 1, F_WRITE, None)]), "ioerr"),
        ("huge length", lambda: r.raw([
            (hdr_in(), 16, 0, None), (data(), 0xFFFFFE00, F_WRITE, None),
            (st(), 1, F_WRITE, None)]), "ioerr"),
        ("loop", lambda: _loop(r), "zero"),
        ("bad next index", lambda: r.raw([(hdr_in(), 16, F_NEXT, 4000)]), "zero"),
        ("indirect: length not a multiple of 16", lambda: _indirect(r, extra_len=8), "zero"),
        ("indirect: zero length", lambda: r.raw([(data(), 0, F_INDIRECT, 0)]), "zero"),
        ("indirect: table out of range", lambda: r.raw([(HIGH, 48, F_INDIRECT, 0)]), "zero"),
        ("indirect: table in the hole", lambda: r.raw([(HOLE[0], 48, F_INDIRECT, 0)]), "zero"),
        ("indirect with NEXT", lambda: _indirect(r, flags_extra=F_NEXT), "zero"),
        ("indirect inside indirect", lambda: _nested_indirect(r), "zero"),
        ("indirect table loops", lambda: _indirect_loop(r), "zero"),
        ("indirect bad next", lambda: _indirect(r, bad_next=True), "zero"),
        ("zero-length header", lambda: r.raw([(hdr_in(), 0, 0, None), (data(), 512, F_WRITE, None),
                                               (st(), 1, F_WRITE, None)]), "ioerr"),
        ("short header", lambda: r.raw([(hdr_in(), 8, 0, None), (st(), 1, F_WRITE, None)]),
         "ioerr"),
        ("missing header", lambda: r.raw([(st(), 1, F_WRITE, None)]), "ioerr"),
        ("missing status (last descriptor read-only)", lambda: r.raw([
            (hdr_in(), 16, 0, None), (data(), 512, 0, None)]), "zero"),
        ("zero-length status", lambda: r.raw([
            (hdr_in(), 16, 0, None), (data(), 512, F_WRITE, None), (st(), 0, F_WRITE, None)]),
         "zero"),
        ("status out of range", lambda: r.raw([
            (hdr_in(), 16, 0, None), (data(), 512, F_WRITE, None), (HIGH, 1, F_WRITE, None)]),
         "zero"),
        ("readable after writable", lambda: r.raw([
            (hdr_in(), 16, 0, None), (data(), 512, F_WRITE, None), (data(), 512, 0, None),
            (st(), 1, F_WRITE, None)]), "ioerr"),
        ("read past capacity", lambda: r.request(vb.T_IN, r.capacity - 1, 1024)[0], "ioerr"),
        ("sector far past capacity", lambda: r.request(vb.T_IN, 2**63, 512)[0], "ioerr"),
        ("length not a sector multiple", lambda: r.request(vb.T_OUT, 0, 513)[0], "ioerr"),
        ("read with readable data", lambda: r.raw([
            (hdr_in(), 16, 0, None), (data(), 512, 0, None), (st(), 1, F_WRITE, None)]),
         "ioerr"),
        ("unknown request type", lambda: r.request(77, 0, 512)[0], "unsupp"),
        ("discard with 2 segments", lambda: r.request(vb.T_DISCARD, 0, bytes(32))[0], "unsupp"),
        ("discard past capacity", lambda: r.request(vb.T_DISCARD, 0, vb.DiscardWriteZeroes.build(
            dict(sector=r.capacity, num_sectors=8, flags=0)))[0], "ioerr"),
    ]
    return cases


def _loop(r):
    h = r.header(vb.T_IN)
    head = hostile.looped_chain(r.vq, (h, 16, F_NEXT), (r.buf(512), 512, F_NEXT | F_WRITE))
    r.vq.publish([head])
    return head


def _indirect(r, extra_len=0, flags_extra=0, bad_next=False):
    entries = [(r.header(vb.T_IN), 16, F_NEXT, 1), (r.buf(512), 512, F_NEXT | F_WRITE, 2),
               (r.status(), 1, F_WRITE, 0)]
    if bad_next:
        entries[1] = (entries[1][0], 512, F_NEXT | F_WRITE, 9)
    head = hostile.indirect_chain(r.vq, entries, extra=16, extra_len=extra_len,
                                  flags_extra=flags_extra)
    r.vq.publish([head])
    return head


def _nested_indirect(r):
    outer, m = hostile.nested_indirect_table(r.vq, [(r.header(vb.T_IN), 16, F_NEXT, 1),
                                                    (r.status(), 1, F_WRITE, 0)])
    return r.raw([(outer, m, F_INDIRECT, 0)])


def _indirect_loop(r):
    gpa, n = r.vq.write_indirect_table([(r.header(vb.T_IN), 16, F_NEXT, 1),
                                        (r.buf(512), 512, F_NEXT | F_WRITE, 0)])
    return r.raw([(gpa, n, F_INDIRECT, 0)])


def test_hostile_chains_fail_alone(image):
    r = Rig(image)
    try:
        names = [c[0] for c in _hostile_cases(r)]
        for k, name in enumerate(names):
            case = _hostile_cases(r)[k]          # fresh buffers per case
            before = r.worker.stats()["completed"]
            head = case[1]()
            used = r.run()
            assert len(used) == 1 and used[0][0] == head, (name, used)
            assert r.worker.stats()["completed"] == before + 1, name
            expected = case[2]
            if expected == "zero":
                assert used[0][1] == 0, (name, used)
            else:
                assert used[0][1] == 1, (name, used)
            assert not r.worker.broken, name
            assert r.hole_intact(), f"{name}: wrote outside the regions"
            r.assert_serving()
        faults = r.worker.stats()["faults"]
        assert sum(faults.values()) >= len(names) - 3      # each counted (unsupp ones aren't faults)
    finally:
        r.close()


def test_hostile_status_codes(image):
    r = Rig(image)
    try:
        for name, fn, expected in _hostile_cases(r):
            if expected == "zero":
                continue
            # find the status gpa: the last descriptor of the chain just published
            head = fn()
            r.run()
            d = r.vq.read_desc(head)
            while d[2] & F_NEXT:
                d = r.vq.read_desc(d[3])
            if d[2] & F_INDIRECT:
                continue
            want = vb.S_UNSUPP if expected == "unsupp" else vb.S_IOERR
            assert r.status_of(d[0]) == want, name
    finally:
        r.close()


def test_avail_index_corruption_breaks_queue_and_a_new_session_recovers(image):
    r = Rig(image)
    try:
        r.assert_serving()
        r.vq.set_avail_idx(r.vq.avail_idx + r.vq.size + 1)   # more than a queue ahead
        r.run()
        assert r.worker.broken
        assert "avail ring corrupt" in " ".join(r.worker.stats()["faults"])
    finally:
        r.close()
    # a reconnect builds a new queue state: serving again
    r = Rig(image)
    try:
        r.assert_serving()
        assert not r.worker.broken
    finally:
        r.close()


def test_avail_head_out_of_range_breaks_queue(image):
    r = Rig(image)
    try:
        r.vq.write_avail_entry(r.vq.avail_idx, 999)
        r.vq.set_avail_idx(r.vq.avail_idx + 1)
        r.run()
        assert r.worker.broken
        assert r.hole_intact()
    finally:
        r.close()


def test_adaptive_polling_serves_without_kicks_and_stops_promptly(image):
    """With a polling window the worker picks up requests published while it spins (no sleep,
    no kick needed) and stop() ends a window at once."""
    r = Rig(image, poll_us=200_000)
    try:
        r.start()
        for k in range(20):
            head, s, _ = r.request(vb.T_OUT, k, os.urandom(512))
            r.vq.kick()                   # honoured only if the worker asked for it
            assert r.vq.wait_used(1, timeout=10) == [(head, 1)]
        st = r.worker.stats()
        # served while spinning: (almost) no sleeps in poll(2), so no kicks were asked for
        assert st["poll_hits"] >= 1 and st["sleeps"] <= 2 and st["kicks"] <= 2, repr(st)
        assert st["completed"] == 20
        t = time.monotonic()
        r.stop()
        assert time.monotonic() - t < 0.15
    finally:
        r.close()
