"""Integration: dirty logging through a real socket.  pyvhost-blk as a subprocess (asyncio and
uvloop), the frontend driver doing what QEMU does around a live migration (SET_LOG_BASE with a
memfd bitmap, SET_FEATURES with VHOST_F_LOG_ALL on running queues, SET_VRING_ADDR with
VHOST_VRING_F_LOG): every page the backend wrote while logging -- read data, status bytes, the
used rings -- is in the bitmap, nothing else is, no I/O is lost across the restarts, and after
LOG_ALL goes off nothing more is logged."""
from __future__ import annotations

import os
import random

from protocols import virtio, virtio_blk as vb
from vhost.testing.backends import pyvhost_blk
from vhost.testing.blk import Frontend, blk_read, blk_write
from vhost.testing.dirtylog import DirtyLog, log_size_for, pages

IMG_SIZE = 16 << 20
MEM = 16 << 20


class RecordingFrontend(Frontend):
    """Remembers every range a request made device-writable (IN buffers, status bytes)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.writable: set[int] = set()

    def _prepare(self, vq, req, i):
        ctx = super()._prepare(vq, req, i)
        for gpa, n in ctx.in_pieces:
            self.writable |= pages(gpa, n)
        self.writable |= pages(ctx.status_gpa, 1)
        return ctx


def used_rings(fe) -> set[int]:
    out = set()
    for vq in fe.queues:
        out |= pages(vq.used_gpa, virtio.used_ring_size(vq.size))
    return out


def test_reads_while_logging_are_in_the_log_and_nothing_else(tmp, loop_name):
    img = tmp / "disk.img"
    data = random.Random(1).randbytes(IMG_SIZE)
    img.write_bytes(data)
    dlog = DirtyLog(log_size_for(MEM))
    try:
        with pyvhost_blk(img, tmp / "s.sock", num_queues=2,
                         extra=("--loop", loop_name)) as b, \
                RecordingFrontend(str(b.sock), mem_size=MEM, num_queues=2, seed=3) as fe:
            assert fe.features & virtio.F_RING_EVENT_IDX
            # some I/O before migration: not logged (the log does not exist yet)
            assert fe.write(0, os.urandom(4096)) == vb.S_OK
            fe.log_start(dlog)
            # the restarted workers wrote only their used rings (avail_event, re-armed kicks)
            assert dlog.dirty() <= used_rings(fe)
            rnd = random.Random(2)
            sectors = [rnd.randrange(8, IMG_SIZE // 512 - 256) for _ in range(200)]
            fe.writable.clear()
            results = fe.submit_many([blk_read(s, 512 * rnd.randint(1, 64)) for s in sectors],
                                     queue=[0, 1], depth=16)
            for s, r in zip(sectors, results):
                assert r.status == vb.S_OK
                assert r.data == data[s * 512:s * 512 + len(r.data)]
            dirty = dlog.dirty()
            assert fe.writable <= dirty, sorted(fe.writable - dirty)[:10]
            assert dirty <= fe.writable | used_rings(fe), sorted(dirty - fe.writable)[:10]
            assert used_rings(fe) & dirty
            assert dlog.tail_clean()
            # writes while logging: only status bytes and used rings
            dlog.clear()
            fe.writable.clear()
            res = fe.submit_many([blk_write(8 + 64 * k, os.urandom(8192)) for k in range(50)],
                                 queue=[0, 1], depth=8)
            assert all(r.status == vb.S_OK for r in res)
            dirty = dlog.dirty()
            assert dirty and dirty <= fe.writable | used_rings(fe)
            # migration over: LOG_ALL off, the queues run on, nothing more is logged
            fe.log_stop()
            dlog.clear()
            for _ in range(20):
                st, got = fe.read(8, 8192)
                assert st == vb.S_OK
            assert dlog.dirty() == set()
        assert "Traceback" not in b.log_text()
    finally:
        dlog.close()
