"""bench/loadgen.pyx (the compiled driver loop of the benchmarks) against pyvhost-blk: the data
it writes really lands on the image at the right offsets, reads come back OK and with the data
written, with and without EVENT_IDX / INDIRECT, on split and packed rings and in both interrupt
modes, two queues at once,
and a stalled backend ends a run within its stall timeout (the latency histogram's accuracy:
tests/unit/test_loadgen_hist.py).  A few thousand 4 KiB requests per case on a 4 MiB image: a few
seconds in all."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import struct
import threading
import time

import pytest

loadgen = pytest.importorskip("bench.loadgen", reason="bench.loadgen not built "
                              "(python setup.py build_ext --inplace)")
from bench.loadgen import QueueLoad  # noqa: E402
from vhost.testing.backends import pyvhost_blk, short_tmpdir  # noqa: E402
from vhost.testing.blk import Frontend  # noqa: E402

IMG_SIZE = 4 << 20
BS = 4096
M64 = (1 << 64) - 1


def key_of(seed: int) -> int:
    """pattern=True stamps (offset ^ key) at every 8-byte offset (loadgen.pyx docstring)."""
    return ((seed * 0x9E3779B97F4A7C15) & M64) ^ 0x5A5A5A5A5A5A5A5A


def expected(start: int, end: int, seed: int) -> bytes:
    key = key_of(seed)
    return struct.pack(f"<{(end - start) // 8}Q", *[o ^ key for o in range(start, end, 8)])


@pytest.fixture(scope="module")
def backend():
    d = short_tmpdir("pvhlg")
    img = d / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    try:
        with pyvhost_blk(img, d / "blk.sock", num_queues=2) as b:
            yield b, img
    finally:
        shutil.rmtree(d, ignore_errors=True)


def read_image(img) -> bytes:
    with open(img, "rb") as f:
        return f.read()


def checked(res: dict, ops: int | None = None) -> dict:
    assert res["errors"] == 0 and res["no_status"] == 0, res
    assert res["mismatches"] == 0 and res["short_used"] == 0, res
    if ops is not None:
        assert res["ops"] == ops == res["submitted"], res
    assert res["lat_min_us"] > 0 and res["p50_us"] <= res["p99_us"] <= res["lat_max_us"] * 1.01
    return res


@pytest.mark.parametrize("event_idx,indirect,interrupts,packed", [
    (True, True, "always", False), (True, False, "sleep", False), (False, True, "sleep", False),
    (False, False, "always", False), (True, True, "always", True), (False, True, "sleep", True)])
def test_sequential_write_lands_on_image(backend, event_idx, indirect, interrupts, packed):
    """... on split rings and on packed ones (the bench's `pyvhost+packed` rows)."""
    b, img = backend
    seed = 11 + 2 * event_idx + indirect + 4 * packed
    nblocks = IMG_SIZE // BS
    with Frontend(b.sock, queue_size=128, event_idx=event_idx, timeout=10, packed=packed) as fe:
        assert fe.has_event_idx == event_idx and fe.has_packed == packed
        with QueueLoad(fe, 0, depth=16, block_size=BS, indirect=indirect) as ql:
            assert ql.indirect == indirect
            # exactly one pass over the device, then random reads that check every word
            w = checked(ql.run("write", random=False, ops=nblocks, pattern=True,
                               pattern_seed=seed, interrupts=interrupts), nblocks)
            assert w["bytes"] == IMG_SIZE
            r = checked(ql.run("read", ops=3000, pattern=True, pattern_seed=seed,
                               interrupts=interrupts, seed=5), 3000)
            assert r["bytes"] == 3000 * BS
            # and the check does catch data that differs (another seed's pattern)
            bad = ql.run("read", ops=100, pattern=True, pattern_seed=seed + 1000)
            assert bad["mismatches"] == 100 and bad["errors"] == 0
            # the frontend's own requests still work on the queue afterwards
            st, data = fe.read(8, 4096)
            assert st == 0 and data == expected(4096, 8192, seed)
    got = read_image(img)
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected(0, IMG_SIZE, seed)).digest()


def test_random_writes_stay_in_range(backend):
    b, img = backend
    with open(img, "r+b") as f:
        f.write(bytes(IMG_SIZE))
    lo, hi, seed = 1 << 20, 3 << 20, 99
    with Frontend(b.sock, queue_size=128, timeout=10) as fe:
        with QueueLoad(fe, 0, depth=32, block_size=BS) as ql:
            checked(ql.run("write", ops=3000, range_start=lo, range_len=hi - lo, pattern=True,
                           pattern_seed=seed, seed=1), 3000)
        with QueueLoad(fe, 0, depth=8, block_size=64 << 10) as ql:
            # sequential 64 KiB reads over the same range (a write pass first: blocks the
            # random writes missed would not match)
            checked(ql.run("write", random=False, ops=32, range_start=lo, range_len=hi - lo,
                           pattern=True, pattern_seed=seed), 32)
            checked(ql.run("read", random=False, ops=64, range_start=lo, range_len=hi - lo,
                           pattern=True, pattern_seed=seed), 64)
    got = read_image(img)
    assert got[:lo] == bytes(lo) and got[hi:] == bytes(IMG_SIZE - hi)
    assert got[lo:hi] == expected(lo, hi, seed)


def test_random_write_blocks_are_whole(backend):
    """Random writes alone: every 4 KiB block of the range is either untouched or entirely the
    pattern, and nearly all were hit."""
    b, img = backend
    with open(img, "r+b") as f:
        f.write(bytes(IMG_SIZE))
    seed = 5
    with Frontend(b.sock, queue_size=256, timeout=10) as fe:
        with QueueLoad(fe, 0, depth=128, block_size=BS) as ql:
            checked(ql.run("write", ops=4000, pattern=True, pattern_seed=seed, seed=2), 4000)
    got = read_image(img)
    want = expected(0, IMG_SIZE, seed)
    hit = 0
    for off in range(0, IMG_SIZE, BS):
        blk = got[off:off + BS]
        if blk == want[off:off + BS]:
            hit += 1
        else:
            assert blk == bytes(BS), f"block at {off} is neither zero nor the pattern"
    assert hit > 0.9 * IMG_SIZE // BS * (1 - 2.718 ** (-4000 / (IMG_SIZE // BS)))


def test_two_queues_in_parallel(backend):
    b, _ = backend
    with Frontend(b.sock, num_queues=2, queue_size=128, timeout=10) as fe:
        loads = [QueueLoad(fe, q, depth=32, block_size=BS) for q in range(2)]
        out: list = [None, None]

        def go(q):
            out[q] = loads[q].run("read", ops=3000, seed=q)

        threads = [threading.Thread(target=go, args=(q,)) for q in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for q in range(2):
            checked(out[q], 3000)
            loads[q].close()
        # both queues returned to the frontend in a consistent state
        assert fe.read(0, 512, queue=1)[0] == 0


def test_duration_bound(backend):
    b, _ = backend
    with Frontend(b.sock, queue_size=128, timeout=10) as fe:
        with QueueLoad(fe, 0, depth=4, block_size=BS) as ql:
            t0 = time.monotonic()
            r = checked(ql.run("read", duration=0.3))
            assert 0.25 < time.monotonic() - t0 < 2.0
            assert 0.25 < r["elapsed_s"] < 2.0 and r["ops"] > 100
            assert abs(r["iops"] - r["ops"] / r["elapsed_s"]) < 1e-6 * r["iops"] + 1e-9


def test_stalled_backend_ends_the_run():
    d = short_tmpdir("pvhlg")
    img = d / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    try:
        with pyvhost_blk(img, d / "blk.sock") as b:
            with Frontend(b.sock, queue_size=128, timeout=10) as fe:
                ql = QueueLoad(fe, 0, depth=8, block_size=BS)
                timer = threading.Timer(0.2, os.kill, (b.proc.pid, signal.SIGSTOP))
                timer.start()
                t0 = time.monotonic()
                try:
                    with pytest.raises(RuntimeError, match="stalled"):
                        ql.run("read", duration=10, stall_timeout=0.5)
                    assert time.monotonic() - t0 < 3
                finally:
                    timer.join()
                    os.kill(b.proc.pid, signal.SIGCONT)
                with pytest.raises(ValueError, match="still in flight"):
                    ql.run("read", ops=1)
                ql.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
