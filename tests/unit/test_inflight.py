"""Inflight tracking (INFLIGHT_SHMFD, cython_ext/ring.pyx): the engine marks every popped head in
the frontend's inflight region and clears it once its used element is published, and a new
engine on a region a killed one left behind resumes after what was popped, hands back exactly
the heads that never completed -- in submission order, once each -- and fixes up a batch whose
used->idx was published but whose heads were not cleared.  The state after a kill at any point
is what the shared memory holds, so dropping an engine without publishing is that kill.  A
region the frontend filled with garbage never makes the engine touch memory outside it.  The
in-memory ring rig of vhost/testing/ringrig.py drives the engine and the blk worker."""
import os
import random
import struct

import pytest

from cython_ext.ring import RingProbe
from protocols import virtio_blk as vb
from protocols.vhost_user import INFLIGHT_HEADER_SIZE, INFLIGHT_VERSION, inflight_queue_size
from vhost.testing.inflight import InflightRegion
from vhost.testing.ringrig import QueueRig, Rig

QS = 64


@pytest.fixture
def region():
    r = InflightRegion(QS)
    yield r
    r.close()


@pytest.fixture
def rig():
    r = QueueRig(qsize=QS)
    yield r
    r.close()


def probe(rig, region, last_avail=0):
    return RingProbe(QS, *rig.ring_hosts(), last_avail, rig.mem.table_bytes(),
                     inflight=region.queue())


def offer(rig, n):
    """n one-descriptor chains on the avail ring; their heads."""
    heads = []
    for _ in range(n):
        gpa = rig.ram.alloc(64)
        heads.append(rig.vq.add_chain([(gpa, 64, True)]))
    rig.vq.publish(heads)
    return heads


def pop_heads(p, n):
    out = []
    for _ in range(n):
        c = p.pop()
        assert c is not None
        out.append(c["head"])
    return out


def test_a_fresh_region_is_laid_out_and_nothing_is_resubmitted(rig, region):
    p = probe(rig, region)
    assert p.resubmit_count == 0
    h = region.header()
    assert (h.version, h.desc_num, h.used_idx) == (INFLIGHT_VERSION, QS, 0)
    assert region.in_flight() == []


def test_popped_heads_are_marked_and_published_ones_cleared(rig, region):
    heads = offer(rig, 4)
    p = probe(rig, region)
    assert pop_heads(p, 4) == heads
    assert region.in_flight() == heads                   # submission order
    p.push(heads[2], 64)
    p.push(heads[0], 64)
    assert region.in_flight() == heads                   # pushed is not visible yet
    p.publish()
    assert region.in_flight() == [heads[1], heads[3]]
    h = region.header()
    assert h.used_idx == 2 and h.last_batch_head == heads[0]


def test_after_a_kill_exactly_the_uncompleted_heads_come_back_in_order(rig, region):
    heads = offer(rig, 5)
    p = probe(rig, region)
    pop_heads(p, 5)
    p.push(heads[1], 64)
    p.push(heads[3], 64)
    p.publish()
    del p                                                 # killed: nothing else happens
    p2 = probe(rig, region, last_avail=2)                 # QEMU says used->idx; wrong here
    assert p2.resubmit_count == 3
    assert p2.last_avail == 5                             # used 2 + 3 in flight
    assert pop_heads(p2, 3) == [heads[0], heads[2], heads[4]]
    assert p2.pop() is None                               # and then the (empty) avail ring
    assert p2.resubmitted == 3
    new = offer(rig, 1)
    assert pop_heads(p2, 1) == new


def test_a_head_reused_after_completion_is_ordered_by_its_new_submission(rig, region):
    a, b = offer(rig, 2)
    p = probe(rig, region)
    pop_heads(p, 2)
    p.push(a, 64)
    p.publish()
    assert rig.vq.reap() == [(a, 64)]
    (a2,) = offer(rig, 1)
    assert a2 == a                                        # the driver's free list reuses it
    pop_heads(p, 1)
    del p
    p2 = probe(rig, region)
    assert pop_heads(p2, 2) == [b, a]                     # b was submitted first


def test_kill_between_push_and_publish_resubmits_the_pushed_head(rig, region):
    heads = offer(rig, 2)
    p = probe(rig, region)
    pop_heads(p, 2)
    p.push(heads[0], 64)                                  # used element written, idx not
    del p
    assert rig.vq.used_idx() == 0
    p2 = probe(rig, region)
    assert p2.resubmit_count == 2 and pop_heads(p2, 2) == heads


def test_kill_in_the_middle_of_a_publish_does_not_complete_twice(rig, region):
    """used->idx is visible, the batch's heads are still marked: the used ring names them."""
    heads = offer(rig, 4)
    p = probe(rig, region)
    pop_heads(p, 4)
    p.push(heads[2], 64)
    p.push(heads[0], 64)
    p.push(heads[3], 64)
    del p
    rig.ram.write(rig.vq.used_gpa + 2, struct.pack("<H", 3))   # the release store landed
    assert region.header().used_idx == 0 and len(region.in_flight()) == 4
    p2 = probe(rig, region)
    assert p2.resubmit_count == 1 and pop_heads(p2, 1) == [heads[1]]
    assert p2.last_avail == 4 and p2.pop() is None
    assert region.header().used_idx == 3 and region.in_flight() == [heads[1]]


def test_a_clean_stop_leaves_nothing_in_flight(rig, region):
    heads = offer(rig, 3)
    p = probe(rig, region)
    pop_heads(p, 3)
    for h in heads:
        p.push(h, 64)
    p.publish()
    del p
    p2 = probe(rig, region, last_avail=3)
    assert p2.resubmit_count == 0 and p2.last_avail == 3


def test_a_region_for_another_ring_size_starts_afresh(rig, region):
    heads = offer(rig, 2)
    p = probe(rig, region)
    pop_heads(p, 2)
    del p
    region.write(10, struct.pack("<H", QS * 2))           # desc_num of another ring
    p2 = probe(rig, region, last_avail=2)
    assert p2.resubmit_count == 0 and p2.last_avail == 2
    assert region.header().desc_num == QS and region.in_flight() == []


def test_a_region_too_small_for_the_ring_is_refused(rig):
    small = InflightRegion(QS // 8)
    try:
        with pytest.raises(ValueError, match="cannot track"):
            RingProbe(QS, *rig.ring_hosts(), 0, rig.mem.table_bytes(), inflight=small.queue())
    finally:
        small.close()


@pytest.mark.parametrize("seed", range(20))
def test_a_garbage_region_stays_within_the_ring(rig, seed):
    """The frontend owns the region: any bytes in it (with a valid version and size, so they
    are recovered from) give resubmit heads < the queue size, at most one per head, and a
    region and guest memory untouched outside their bounds."""
    rnd = random.Random(seed)
    size = inflight_queue_size(QS)
    big = InflightRegion(QS, mmap_size=size + 4096)
    try:
        big.write(0, bytes(rnd.getrandbits(8) for _ in range(size)))
        big.write(8, struct.pack("<HH", INFLIGHT_VERSION, QS))
        big.write(size, b"\xA5" * 4096)
        rig.ram.write(rig.vq.used_gpa + 2, struct.pack("<H", rnd.getrandbits(16)))
        p = RingProbe(QS, *rig.ring_hosts(), 0, rig.mem.table_bytes(),
                      inflight=(big.address, size))
        n = p.resubmit_count
        assert 0 <= n <= QS
        got = []
        for _ in range(n):
            c = p.pop()
            got.append(c["head"])
        assert len(set(got)) == n and all(0 <= h < QS for h in got)
        assert big.mm[size:size + 4096] == b"\xA5" * 4096
        assert rig.hole_intact()
    finally:
        big.close()


def test_blk_worker_resubmits_what_a_killed_worker_left_and_completes_each_once(image):
    """A blk worker is "killed" after popping three writes (its successor is built on the same
    rings and region without the first ever running its I/O): the successor writes all three
    to the image and returns each head exactly once."""
    region = InflightRegion(QS)
    rig = Rig(image, qsize=QS, inflight=region.queue())
    try:
        reqs = [(8 * k, os.urandom(4096)) for k in range(3)]
        heads = [rig.request(vb.T_OUT, sector, data)[0] for sector, data in reqs]
        probe_ = RingProbe(QS, *rig.ring_hosts(), 0, rig.mem.table_bytes(),
                           inflight=region.queue())
        assert pop_heads(probe_, 3) == heads                  # popped, then the process died
        del probe_
        rig.worker.close()
        rig.worker = None
        from cython_ext.blk import BlkQueueWorker
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            w = BlkQueueWorker(0, QS, *rig.ring_hosts(), 0, rig.mem.table_bytes(),
                               rig.kick_fd, rig.call_fd, fd, fd, False, rig.capacity,
                               b"serial", inflight=region.queue())
            assert w.resubmit_count == 3 and w.last_avail == 3
            w.run_until_idle()
            used = rig.vq.reap()
            assert sorted(used) == sorted((h, 1) for h in heads)
            assert w.stats()["resubmitted"] == 3 and region.in_flight() == []
            w.close()
        finally:
            os.close(fd)
        with open(image, "rb") as f:
            for sector, data in reqs:
                f.seek(sector * 512)
                assert f.read(len(data)) == data
    finally:
        rig.close()
        region.close()


def test_blk_worker_with_a_region_serves_and_leaves_it_clean(image):
    region = InflightRegion(QS)
    rig = Rig(image, qsize=QS, inflight=region.queue())
    try:
        rig.assert_serving()
        assert region.in_flight() == [] and region.header().used_idx == rig.vq.used_idx()
        assert region.header().version == INFLIGHT_VERSION
    finally:
        rig.close()
        region.close()
