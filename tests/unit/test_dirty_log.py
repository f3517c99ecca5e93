"""Dirty logging for live migration (VHOST_F_LOG_ALL, cython_ext/ring.pyx): the workers mark in
the frontend's log bitmap exactly the guest pages they write -- blk IN data and status bytes,
rng entropy, the used ring (entries, index, flags / avail_event) when VHOST_VRING_F_LOG gave its
address -- and nothing when logging is off; a log smaller than guest memory is never written
past.  The in-memory ring rig of vhost/testing/ringrig.py drives the workers."""
import os

import pytest

from cython_ext.rng import RngQueueWorker
from protocols import virtio, virtio_blk as vb
from vhost.testing.dirtylog import DirtyLog, log_size_for, pages
from vhost.testing.ringrig import MEM, QueueRig, Rig



@pytest.fixture
def dlog():
    d = DirtyLog(log_size_for(MEM))
    yield d
    d.close()


def used_pages(rig) -> set[int]:
    return pages(rig.vq.used_gpa, virtio.used_ring_size(rig.qsize))


def logged_rig(image, dlog, *, log_used=True, **kw) -> Rig:
    """A blk Rig logging into dlog; with log_used, the used ring's guest address is passed as
    SET_VRING_ADDR's log_guest_addr would be (the rig's layout is deterministic: a first rig
    finds it)."""
    probe = Rig(image, **kw)
    used_gpa = probe.vq.used_gpa
    probe.close()
    rig = Rig(image, log=(dlog.address, dlog.size, used_gpa if log_used else -1), **kw)
    assert rig.vq.used_gpa == used_gpa
    return rig


@pytest.mark.parametrize("use_io_uring", [True, False], ids=["io_uring", "sync"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_blk_read_logs_its_data_status_and_used_ring(image, dlog, use_io_uring, event_idx):
    rig = logged_rig(image, dlog, use_io_uring=use_io_uring, event_idx=event_idx)
    try:
        n = 3 * 4096 + 512                       # spans four pages at least
        head, s, d = rig.request(vb.T_IN, 8, n, split=3)
        assert rig.run() == [(head, n + 1)]
        assert rig.status_of(s) == vb.S_OK
        with open(image, "rb") as f:
            f.seek(8 * 512)
            assert rig.ram.read(d, n) == f.read(n)
        expected = pages(d, n) | pages(s, 1) | used_pages(rig)
        assert dlog.dirty() == expected
        assert dlog.tail_clean()
    finally:
        rig.close()


def test_blk_write_logs_only_the_status_and_used_ring(image, dlog):
    rig = logged_rig(image, dlog)
    try:
        n = 4 * 4096
        head, s, d = rig.request(vb.T_OUT, 16, os.urandom(n))
        assert rig.run() == [(head, 1)]
        assert rig.status_of(s) == vb.S_OK
        dirty = dlog.dirty()
        assert dirty == pages(s, 1) | used_pages(rig)
        # the device only read the data: its pages (those not shared with the status byte or
        # the used ring) are clean
        data_only = pages(d, n) - pages(s, 1) - used_pages(rig)
        assert data_only and not data_only & dirty
    finally:
        rig.close()


def test_no_used_ring_address_logs_buffers_only(image, dlog):
    rig = logged_rig(image, dlog, log_used=False)
    try:
        head, s, d = rig.request(vb.T_IN, 0, 8192)
        assert rig.run() == [(head, 8193)]
        assert dlog.dirty() == pages(d, 8192) | pages(s, 1)
    finally:
        rig.close()


def test_logging_off_writes_no_bit(image, dlog):
    rig = Rig(image)                             # log=None: a worker started without LOG_ALL
    try:
        for _ in range(8):
            head, s, d = rig.request(vb.T_IN, 0, 8192)
            assert rig.run() == [(head, 8193)]
        assert dlog.dirty() == set()
    finally:
        rig.close()


def test_log_smaller_than_guest_memory_is_never_written_past(image):
    small = DirtyLog(1)                          # covers pages 0-7 only: 32 KiB of guest RAM
    rig = Rig(image, log=(small.address, small.size, -1))
    try:
        rig.ram.alloc(64 << 10)                  # the next buffers lie beyond 32 KiB
        head, s, d = rig.request(vb.T_IN, 0, 8192)
        assert min(pages(d, 8192)) >= 8          # the buffer lies beyond the log
        assert rig.run() == [(head, 8193)]
        assert rig.status_of(s) == vb.S_OK       # I/O still served
        assert small.tail_clean()                # nothing past the declared byte
        assert small.dirty() <= set(range(8))
        rig.assert_serving()
    finally:
        rig.close()
        small.close()


def test_used_ring_logged_across_the_wrap(image, dlog):
    """Many requests in batches through a small queue: the used entries wrap around, and every
    page of the used ring a batch wrote is logged each time (cleared in between, as QEMU's
    sync clears what it copied)."""
    rig = logged_rig(image, dlog, qsize=16)
    used_gpa = rig.vq.used_gpa
    try:
        for batch in range(12):
            dlog.clear()
            heads = []
            for k in range(5):
                head, s, d = rig.request(vb.T_OUT, k, os.urandom(512))
                heads.append(head)
            got = rig.run()
            assert sorted(h for h, _ in got) == sorted(heads), batch
            dirty = dlog.dirty()
            # index and the entries just written: the ring occupies pages of used_pages()
            assert pages(used_gpa + 2, 2) <= dirty
            first = (rig.vq.used_idx() - 5) % 16
            for k in range(5):
                assert pages(used_gpa + 4 + 8 * ((first + k) % 16), 8) <= dirty, (batch, k)
    finally:
        rig.close()


def test_rng_logs_the_entropy_it_writes(dlog):
    rig = QueueRig(qsize=64)
    rig.worker = RngQueueWorker(0, 64, *rig.ring_hosts(), 0, rig.mem.table_bytes(),
                                rig.kick_fd, rig.call_fd,
                                log=(dlog.address, dlog.size, rig.vq.used_gpa))
    try:
        gpa = rig.ram.alloc(5 * 4096, align=4096)
        rig.ram.fill(gpa, 5 * 4096, 0)
        head = rig.vq.add_chain([(gpa, 5 * 4096, True)])
        rig.vq.publish([head])
        assert rig.run() == [(head, 5 * 4096)]
        assert dlog.dirty() == pages(gpa, 5 * 4096) | used_pages(rig)
    finally:
        rig.close()


def test_ring_probe_logs_exactly_what_a_device_wrote(dlog):
    """RingProbe.complete(written): only the first `written` bytes of the writable part."""
    from cython_ext.ring import RingProbe
    rig = QueueRig(qsize=8, two_regions=False)
    try:
        desc, avail, used = rig.ring_hosts()
        probe = RingProbe(8, desc, avail, used, 0, rig.mem.table_bytes(),
                          log=(dlog.address, dlog.size, -1))
        ro = rig.ram.alloc(2 * 4096, align=4096)
        rw = rig.ram.alloc(4 * 4096, align=4096)
        head = rig.vq.add_chain([(ro, 2 * 4096, False), (rw, 4 * 4096, True)])
        rig.vq.publish([head])
        c = probe.pop()
        assert c["head"] == head and c["fault"] == 0
        probe.complete(4096 + 1)                 # one page and one byte of the writable part
        probe.publish()
        assert dlog.dirty() == pages(rw, 4096 + 1)
        assert probe.log_pages == 2 and probe.log_beyond == 0
    finally:
        rig.close()
