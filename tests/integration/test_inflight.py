"""Integration: inflight tracking across a kill -9 (INFLIGHT_SHMFD).  A pyvhost-blk process is
killed by SIGKILL at a chosen instruction (PYVHOST_FAILPOINT, cython_ext/ring.pyx: right after
a head is popped, after a request's I/O, after a used element is written, between used->idx
and clearing the batch in the inflight region) while the frontend driver has 32 writes in
flight; the driver reconnects to a new backend as QEMU with `reconnect=1` does (same guest RAM
and rings, the inflight fd handed back, each base set to its used index), and then every write
completes exactly once -- the used ring carries one entry per request, no head is returned that
is not outstanding -- and every acknowledged write is in the image.  In server mode and in
client mode (the driver listening, the backend dialing), on split and packed rings, under
asyncio and uvloop."""
from __future__ import annotations

import contextlib
import os
import random

import pytest

from protocols import virtio_blk as vb
from vhost.testing.backends import pyvhost_blk
from vhost.testing.blk import Frontend, blk_write

IMG_SIZE = 16 << 20
N = 400
BS = 4096
POINTS = [("after-pop", 60), ("after-io", 60), ("after-push", 60), ("mid-publish", 20)]


def run_with_a_kill(tmp, loop_name, point, nth, client=False, queues=1, packed=False):
    img = tmp / "disk.img"
    img.write_bytes(bytes(IMG_SIZE))
    sock = tmp / "blk.sock"
    rnd = random.Random(f"{point}{nth}{client}")
    sectors = rnd.sample(range(IMG_SIZE // BS), N)
    data = [rnd.randbytes(BS) for _ in range(N)]
    extra = ("--loop", loop_name)
    stack = contextlib.ExitStack()
    backends = []

    def start(failpoint=None):
        backends.append(stack.enter_context(pyvhost_blk(
            img, sock, client=client, num_queues=queues, extra=extra, failpoint=failpoint)))

    with stack:
        fe = Frontend(str(sock), inflight=True, listen=client, num_queues=queues, timeout=20,
                      packed=packed)
        if client:
            fe.listen_now()
        start(f"{point}:{nth}")

        def on_disconnect():
            rc = backends[-1].proc.wait(20)
            assert rc == -9, f"the backend exited with {rc}, not by its fail point"
            start()
            fe.reconnect()

        with fe:
            assert fe.inflight is not None and fe.has_packed == packed
            results = fe.submit_many([blk_write(s * (BS // 512), d)
                                      for s, d in zip(sectors, data)],
                                     queue=list(range(queues)), depth=32,
                                     on_disconnect=on_disconnect)
            assert fe.reconnects == 1, "the fail point never fired"
            assert [r.status for r in results] == [vb.S_OK] * N
            # exactly one used entry per request on every queue: nothing completed twice
            for vq in fe.queues:
                assert vq.last_used_idx == vq.avail_idx and not vq.unknown_used
            assert sum(vq.avail_idx for vq in fe.queues) == N
            for q in range(queues):
                assert fe.inflight.in_flight(q) == []
        log = "".join(b.log_text() for b in backends[-1:])
    with open(img, "rb") as f:
        for s, d in zip(sectors, data):
            f.seek(s * BS)
            assert f.read(BS) == d, f"sector {s}: an acknowledged write is not in the image"
    return log


@pytest.mark.parametrize("point,nth", POINTS, ids=[p for p, _ in POINTS])
def test_a_kill_at_a_chosen_point_loses_nothing_and_completes_nothing_twice(
        tmp, loop_name, point, nth):
    log = run_with_a_kill(tmp, loop_name, point, nth)
    if point in ("after-pop", "after-io", "after-push"):
        # the request the process died on had not completed: the new backend resubmitted it
        assert "resubmitting" in log, log[-3000:]


@pytest.mark.parametrize("point,nth", POINTS, ids=[p for p, _ in POINTS])
def test_a_kill_on_a_packed_ring(tmp, loop_name, point, nth):
    """The same on packed rings: positions and chains come back from the inflight region
    (the ring slots of a buffer still in flight may hold used descriptors by then)."""
    log = run_with_a_kill(tmp, loop_name, point, nth, packed=True)
    if point in ("after-pop", "after-io", "after-push"):
        assert "resubmitting" in log, log[-3000:]


def test_a_kill_in_client_mode_with_two_queues(tmp, loop_name):
    log = run_with_a_kill(tmp, loop_name, "after-io", 90, client=True, queues=2)
    assert "resubmitting" in log, log[-3000:]
