"""virtio-rng requestq worker (cython_ext/rng.pyx, virtio 1.2 §5.4) in memory, with the driver-side
rings of vhost/testing/ringrig.py: entropy lands in the buffers, used lengths, hostile chains failing
alone, a corrupt avail ring, the max-bytes/period rate limit, stop while throttled."""
import os
import threading
import time
import zlib

import pytest

from cython_ext.rng import RngQueueWorker
from vhost.device import COUNTER_KEYS
from vhost.testing.ringrig import F_INDIRECT, F_NEXT, F_WRITE, HOLE, MEM, QueueRig

HIGH = MEM + (128 << 10)     # past the end of guest RAM


class RngRig(QueueRig):
    """The ring rig (PC layout, canary in the hole) with an RngQueueWorker."""

    def __init__(self, qsize=64, **kw):
        super().__init__(event_idx=kw.get("event_idx", False), qsize=qsize)
        self.worker = RngQueueWorker(0, qsize, *self.ring_hosts(), 0, self.mem.table_bytes(),
                                     self.kick_fd, self.call_fd, **kw)

    def buf(self, n, fill=0):
        gpa = self.ram.alloc(max(n, 1), align=64)
        self.ram.fill(gpa, max(n, 1), fill)
        return gpa

    def request(self, n, split=1, indirect=False):
        """Publish one request of n writable bytes in `split` descriptors; (head, gpa)."""
        gpa = self.buf(n)
        step = -(-n // split)
        segs = [(gpa + off, min(step, n - off), True) for off in range(0, n, step)]
        head = self.vq.add_chain(segs, indirect=indirect)
        self.vq.publish([head])
        return head, gpa

    def assert_serving(self, n=256):
        head, gpa = self.request(n)
        assert self.run() == [(head, n)]
        data = self.ram.read(gpa, n)
        assert data != bytes(n)

    def wait_used(self, count, timeout=10.0):
        """Reap until `count` used entries arrived (kicking as a driver would)."""
        got, end = [], time.monotonic() + timeout
        while len(got) < count and time.monotonic() < end:
            got += self.vq.reap()
            time.sleep(0.002)
        return got


@pytest.fixture
def rig():
    r = RngRig()
    yield r
    r.close()


def test_entropy_fills_buffers_and_used_lengths(rig):
    heads = [rig.request(n, split=s) for n, s in ((64, 1), (4096, 3), (65536, 7))]
    rig.vq.publish([])
    used = rig.run()
    assert used == [(h, n) for (h, _), n in zip(heads, (64, 4096, 65536))]
    big = rig.ram.read(heads[2][1], 65536)
    assert len(set(big)) > 200                            # not constant
    assert len(zlib.compress(big, 9)) > 65000             # does not compress
    assert rig.ram.read(heads[0][1], 64) != rig.ram.read(heads[1][1], 64)
    st = rig.worker.stats()
    assert st["completed"] == 3 and st["failed"] == 0 and st["bytes"] == 64 + 4096 + 65536
    c = rig.worker.counters()
    assert set(c) == set(COUNTER_KEYS) and all(isinstance(v, int) for v in c.values())
    assert c["requests"] == 3 and c["bytes_written"] == 64 + 4096 + 65536
    assert c["bytes_read"] == c["errors"] == c["inflight"] == c["dropped"] == c["broken"] == 0
    assert c["notifications"] >= 1
    assert rig.hole_intact()


def test_indirect_request(rig):
    head, gpa = rig.request(2048, split=4, indirect=True)
    assert rig.run() == [(head, 2048)]
    assert len(zlib.compress(rig.ram.read(gpa, 2048))) > 2000


def _loop(r):
    idx = r.vq.reserve_descs(2)
    r.vq.write_desc(idx[0], r.buf(64), 64, F_NEXT | F_WRITE, idx[1])
    r.vq.write_desc(idx[1], r.buf(64), 64, F_NEXT | F_WRITE, idx[0])
    r.vq._chains[idx[0]] = (idx, None)
    r.vq.publish([idx[0]])
    return idx[0]


def _bad_indirect(r, **kw):
    gpa, n = r.vq.write_indirect_table([(r.buf(64), 64, F_WRITE | F_NEXT, 1),
                                        (r.buf(64), 64, F_WRITE, 0)], extra=16)
    (head,) = r.vq.reserve_descs(1)
    r.vq.write_desc(head, gpa, n + kw.get("extra_len", 0), F_INDIRECT | kw.get("flags", 0), 0)
    r.vq._chains[head] = ([head], None)
    r.vq.publish([head])
    return head


HOSTILE = {
    "readable descriptor": lambda r: r.raw([(r.buf(64), 64, 0, None), (r.buf(64), 64, F_WRITE,
                                                                       None)]),
    "only readable": lambda r: r.raw([(r.buf(64), 64, 0, None)]),
    "readable after writable": lambda r: r.raw([(r.buf(64), 64, F_WRITE, None),
                                                (r.buf(64), 64, 0, None)]),
    "out of guest memory": lambda r: r.raw([(HIGH, 512, F_WRITE, None)]),
    "in the hole": lambda r: r.raw([(HOLE[0] + 4096, 512, F_WRITE, None)]),
    "straddling the end of RAM": lambda r: r.raw([(MEM - 256, 512, F_WRITE, None)]),
    "address overflow": lambda r: r.raw([(2**64 - 256, 512, F_WRITE, None)]),
    "good then out of range": lambda r: r.raw([(r.buf(64), 64, F_WRITE, None),
                                               (HIGH, 64, F_WRITE, None)]),
    "loop": _loop,
    "bad next index": lambda r: r.raw([(r.buf(64), 64, F_WRITE | F_NEXT, 4000)]),
    "indirect: bad length": lambda r: _bad_indirect(r, extra_len=8),
    "indirect: with NEXT": lambda r: _bad_indirect(r, flags=F_NEXT),
    "indirect: table out of range": lambda r: r.raw([(HIGH, 48, F_INDIRECT, 0)]),
    "indirect: zero length": lambda r: r.raw([(r.buf(64), 0, F_INDIRECT, 0)]),
    "zero-length buffer": lambda r: r.raw([(r.buf(64), 0, F_WRITE, None)]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_chain_fails_alone(rig, name):
    rig.assert_serving()
    before = rig.worker.stats()
    head = HOSTILE[name](rig)
    good, gpa = rig.request(512)
    used = rig.run()
    assert used == [(head, 0), (good, 512)], (name, used)
    assert rig.ram.read(gpa, 512) != bytes(512)
    st = rig.worker.stats()
    assert st["failed"] == before["failed"] + 1
    assert sum(st["faults"].values()) == sum(before["faults"].values()) + 1
    assert st["bytes"] == before["bytes"] + 512
    assert not rig.worker.broken
    assert rig.worker.counters()["errors"] == 1
    assert rig.hole_intact()
    rig.assert_serving()


def test_faults_logged_rate_limited(rig, caplog):
    caplog.set_level("WARNING", logger="pyvhost.rng")
    for _ in range(40):
        for _ in range(50):
            rig.raw([(HIGH, 512, F_WRITE, None)])
        rig.run()
    assert rig.worker.stats()["failed"] == 2000
    msgs = [r.getMessage() for r in caplog.records if r.name == "pyvhost.rng"]
    assert len(msgs) == 2, msgs                  # the 1st and the 1024th
    assert "outside guest memory" in msgs[0] and "(1024 so far)" in msgs[1]


def test_corrupt_avail_index_marks_broken(rig):
    rig.assert_serving()
    rig.vq.set_avail_idx(rig.vq.avail_idx + rig.vq.size + 1)
    rig.run()
    assert rig.worker.broken
    c = rig.worker.counters()
    assert c["broken"] == 1 and c["errors"] == 1
    assert rig.worker.stats()["avail_corrupt"] == 1


def test_rate_limit_caps_a_period_and_fills_partly():
    r = RngRig(max_bytes=1000, period_ms=60000)
    try:
        h = [r.request(512)[0] for _ in range(3)]
        used = r.run()
        # 512 + the 488 left of the quota (QEMU fills partly too); the third waits, not failed
        assert used == [(h[0], 512), (h[1], 488)]
        st = r.worker.stats()
        assert st["bytes"] == 1000 and st["failed"] == 0 and st["throttled_waits"] == 1
        assert st["throttled"] and r.worker.last_avail == 2
        assert r.run() == []                                 # still the same period
        assert r.worker.counters()["bytes_written"] == 1000
    finally:
        r.close()


def test_rate_limit_resumes_after_the_period():
    period_ms, quota = 100, 4096
    r = RngRig(max_bytes=quota, period_ms=period_ms)
    try:
        heads = [r.request(1024)[0] for _ in range(12)]      # 3 periods' worth
        t0 = time.monotonic()
        r.start()
        r.vq.kick(force=True)
        used = r.wait_used(12, timeout=20)
        elapsed = time.monotonic() - t0
        assert sorted(used) == sorted((h, 1024) for h in heads)
        st = r.worker.stats()
        assert st["bytes"] == 12 * 1024 and st["failed"] == 0
        assert st["throttled_waits"] >= 2
        # never more than the quota per period (generous bound: +1 period for the first)
        assert st["bytes"] <= quota * (elapsed * 1000 / period_ms + 1)
        assert elapsed < 15
    finally:
        r.close()


def test_stop_while_throttled_returns_promptly():
    r = RngRig(max_bytes=16, period_ms=600000)
    try:
        h1, _ = r.request(64)
        h2, _ = r.request(64)
        r.start()
        r.vq.kick(force=True)
        assert r.wait_used(1) == [(h1, 16)]
        deadline = time.monotonic() + 5
        while not r.worker.stats()["throttled"] and time.monotonic() < deadline:
            time.sleep(0.005)
        assert r.worker.stats()["throttled"]
        t0 = time.monotonic()
        r.worker.stop()
        r.thread.join(5)
        assert not r.thread.is_alive() and time.monotonic() - t0 < 5
        r.thread = None
        assert r.vq.reap() == [] and r.worker.last_avail == 1      # h2 left for the next run
    finally:
        r.close()


def test_threaded_serves_kicks_and_stops(rig):
    rig.start()
    for _ in range(20):
        head, gpa = rig.request(256)
        rig.vq.kick()
        assert rig.wait_used(1) == [(head, 256)]
    rig.stop()
    st = rig.worker.stats()
    assert st["completed"] == 20 and st["kicks"] >= 1


def _run_then_stop(r, why):
    """Run r's worker for 0.2 s, then stop it: it must end within 5 s."""
    r.start()
    time.sleep(0.2)
    r.worker.stop()
    r.thread.join(5)
    if r.thread.is_alive():
        # leave the rig mapped: unmapping guest memory under a running worker would crash
        pytest.fail(f"the worker did not stop: {why}")
    r.thread = None


def test_stop_while_the_ring_feeds_itself():
    """The driver may place the avail and used rings at the same address: every used entry the
    worker publishes then raises avail->idx, and the ring never runs dry.  stop() must still end
    run() (found by tests/fuzz/ring.py: the runtime looped on batches that did work without
    looking at the stop flag, so such a worker could never be stopped)."""
    r = QueueRig(qsize=2)
    desc, avail, _ = r.ring_hosts()
    r.ram.write(r.vq.avail_gpa, bytes(6 + 2 * 2))   # avail idx 0, heads 0: descriptor 0
    # last_avail 0xFFFF: one chain is available; its used entry makes the next one available
    r.worker = RngQueueWorker(0, 2, desc, avail, avail, 0xFFFF, r.mem.table_bytes(), r.kick_fd,
                              r.call_fd)
    _run_then_stop(r, "it spins on a ring that feeds itself")
    try:
        assert r.worker.stats()["completed"] > 10       # it did feed itself
    finally:
        r.close()


def test_stop_while_arming_the_kick_always_finds_work():
    """The driver may place the used ring 2 bytes after the avail ring (both aligned as the
    protocol requires): used->flags is then avail->idx, so enabling kicks before a sleep
    changes the avail index ("work arrived") and disabling them changes it back (the batch finds
    nothing): the runtime never reaches poll(2).  stop() must still end run() (found by
    tests/fuzz/ring.py on a blk queue; the rng worker runs the same runtime)."""
    r = QueueRig(qsize=1)
    desc, _, _ = r.ring_hosts()
    gpa = r.ram.alloc(64, align=16)
    r.ram.write(gpa, bytes(64))
    avail = r.mem.gpa_to_host(gpa, 64) + 2          # 2-aligned; the used ring 4-aligned
    r.worker = RngQueueWorker(0, 1, desc, avail, avail + 2, 0, r.mem.table_bytes(), r.kick_fd,
                              r.call_fd)
    _run_then_stop(r, "arming its kick always finds work")
    try:
        assert r.worker.stats()["completed"] == 1       # the one chain there was
    finally:
        r.close()


def test_signal_call_at_start():
    r = RngRig(signal_call=True)
    try:
        r.start()
        deadline = time.monotonic() + 5
        got = 0
        while not got and time.monotonic() < deadline:
            try:
                got = os.eventfd_read(r.call_fd)
            except BlockingIOError:
                time.sleep(0.005)
        assert got == 1
    finally:
        r.close()


def test_constructor_checks():
    with pytest.raises(ValueError):
        RngQueueWorker(0, 48, 0, 0, 0, 0, b"", -1, -1)            # not a power of two
    with pytest.raises(ValueError):
        RngQueueWorker(0, 64, 0, 0, 0, 0, b"", -1, -1, max_bytes=10, period_ms=0)
