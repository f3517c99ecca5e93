"""Integration: pyvhost-blk as a subprocess on a real Unix socket, driven by the frontend driver
(vhost/testing/blk.py), under both asyncio and uvloop; and the same workload against qemu-storage-daemon (the reference)
with identical results."""
from __future__ import annotations

import os
import shutil
import socket
import struct

import pytest

from protocols import virtio_blk as vb
from protocols.vhost_user import FrontendReq
from vhost.testing.backends import pyvhost_blk, qsd_blk
from vhost.testing.workload import read_device, run_random_workload
from vhost.testing.blk import (Frontend, blk_discard, blk_flush, blk_get_id, blk_read, blk_write,
                               blk_write_zeroes)

IMG_SIZE = 64 << 20


def make_image(path, size=IMG_SIZE, seed=0):
    with open(path, "wb") as f:
        f.truncate(size)
        # some non-zero content so reads of untouched areas are checked too
        rnd = __import__("random").Random(seed)
        for k in range(0, size, 1 << 20):
            f.seek(k)
            f.write(rnd.randbytes(4096))
    return str(path)


def backend(tmp, loop_name, **kw):
    img = kw.pop("img", None) or make_image(tmp / "disk.img")
    return img, pyvhost_blk(img, tmp / "s.sock", extra=("--loop", loop_name), **kw)


@pytest.mark.parametrize("depth", [1, 32])
def test_random_workload(tmp, loop_name, depth):
    img, cm = backend(tmp, loop_name, num_queues=2)
    with cm as b:
        with Frontend(str(b.sock), num_queues=2, two_regions=True, seed=depth) as fe:
            model = run_random_workload(fe, img, seed=depth, n_ops=2500, depth=depth,
                                        queues=[0, 1], discard_zeroes=True, readback=True)
        with open(img, "rb") as f:
            assert f.read() == model
    assert "Traceback" not in b.log_text()


def test_workload_set_mem_table_one_region(tmp, loop_name):
    img, cm = backend(tmp, loop_name)
    with cm as b, Frontend(str(b.sock), use_add_mem_reg=False, seed=7) as fe:
        model = run_random_workload(fe, img, seed=7, n_ops=600, depth=8)
        assert read_device(fe, IMG_SIZE) == model


def test_flush_discard_write_zeroes_get_id(tmp, loop_name):
    img, cm = backend(tmp, loop_name)
    with cm as b, Frontend(str(b.sock)) as fe:
        data = os.urandom(64 << 10)
        assert fe.write(2048, data) == vb.S_OK
        assert fe.flush() == vb.S_OK
        assert fe.discard(2048, 32) == vb.S_OK
        st, got = fe.read(2048, 64 << 10)
        assert st == vb.S_OK and got[:32 * 512] == bytes(32 * 512) and got[32 * 512:] == data[32 * 512:]
        assert fe.write_zeroes(2048 + 32, 32, unmap=False) == vb.S_OK
        st, got = fe.read(2048, 64 << 10)
        assert got[:64 * 512] == bytes(64 * 512) and got[64 * 512:] == data[64 * 512:]
        assert fe.write_zeroes(2048 + 64, 16, unmap=True) == vb.S_OK
        st, ident = fe.get_id()
        assert st == vb.S_OK and ident.startswith(b"pyvhost-")
        # out of range and bad types fail alone
        assert fe.read(IMG_SIZE // 512, 512)[0] == vb.S_IOERR
        assert fe.submit_many([blk_read(0, 1023)])[0].status == vb.S_IOERR
        assert fe.write(0, b"x" * 512) == vb.S_OK
    with open(img, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(80 * 512) == bytes(80 * 512)
        f.seek(0)
        assert f.read(512) == b"x" * 512
    assert os.path.getsize(img) == IMG_SIZE


def test_read_only(tmp, loop_name):
    img = make_image(tmp / "disk.img")
    before = open(img, "rb").read()
    with pyvhost_blk(img, tmp / "s.sock", read_only=True, extra=("--loop", loop_name)) as b:
        with Frontend(str(b.sock)) as fe:
            assert fe.features & vb.F_RO
            assert not fe.features & vb.F_DISCARD
            assert fe.write(0, os.urandom(4096)) == vb.S_IOERR
            assert fe.write_zeroes(0, 8) == vb.S_IOERR
            st, got = fe.read(0, 4096)
            assert st == vb.S_OK and got == before[:4096]
            assert fe.flush() == vb.S_OK
    assert open(img, "rb").read() == before


def test_disconnect_and_reconnect(tmp, loop_name):
    img, cm = backend(tmp, loop_name, num_queues=2)
    with cm as b:
        fe = Frontend(str(b.sock), num_queues=2).connect()
        data = os.urandom(1 << 20)
        res = fe.submit_many([blk_write(0, data)] + [blk_read(4096, 4096)] * 40,
                             queue=[0, 1], depth=16)
        assert all(r.status == vb.S_OK for r in res)
        # vanish without GET_VRING_BASE, as a killed QEMU does, with requests still queued
        for k in range(8):
            fe.queues[0].publish([fe.queues[0].add_chain(
                [(fe.mem.alloc(16), 16, False), (fe.mem.alloc(1), 1, True)])])
        fe._closed = True
        fe._release()            # socket, eventfds and guest RAM gone; no goodbye
        with Frontend(str(b.sock), num_queues=2, two_regions=True) as fe2:
            st, got = fe2.read(0, 1 << 20)
            assert st == vb.S_OK and got == data
            assert fe2.write(100, b"y" * 512, queue=1) == vb.S_OK
    assert "Traceback" not in b.log_text()


def _fds_and_maps(pid):
    """(open fds, mappings) once the backend has finished tearing down the last connection
    (it notices the EOF asynchronously): the same reading three times 50 ms apart, 5 s max."""
    import time

    def read():
        with open(f"/proc/{pid}/maps") as f:
            return len(os.listdir(f"/proc/{pid}/fd")), sum(1 for _ in f)

    deadline = time.monotonic() + 5
    last, same = read(), 0
    while same < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        cur = read()
        same = same + 1 if cur == last else 0
        last = cur
    return last


def test_connect_disconnect_cycles_leak_nothing(tmp, loop_name):
    img, cm = backend(tmp, loop_name, num_queues=2)
    with cm as b:
        pid = b.proc.pid

        def cycle(k):
            with Frontend(str(b.sock), num_queues=2, two_regions=bool(k % 2),
                          mem_size=8 << 20) as fe:
                assert fe.write(k, struct.pack("<I", k) * 128, queue=k % 2) == vb.S_OK

        for k in range(5):        # warm up: threads, allocator arenas, io_uring caches
            cycle(k)
        before = _fds_and_maps(pid)
        for k in range(200):
            cycle(k)
        after = _fds_and_maps(pid)
        assert after[0] == before[0], f"fd count {before[0]} -> {after[0]}"
        # thread stacks and malloc arenas may settle by a mapping or two; guest RAM must not
        assert after[1] <= before[1] + 4, f"mappings {before[1]} -> {after[1]}"
        with open(f"/proc/{pid}/maps") as f:
            assert "posixshm" not in f.read() and "/dev/shm" not in open(f"/proc/{pid}/maps").read()
        with Frontend(str(b.sock)) as fe:
            for k in range(200):
                st, got = fe.read(k, 512)
                assert got == struct.pack("<I", k) * 128


def test_garbage_then_good_frontend(tmp, loop_name):
    img, cm = backend(tmp, loop_name)
    with cm as b:
        for junk in (b"\xff" * 64, struct.pack("<III", 1, 0x5, 100000), b"\x01"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(b.sock))
            s.sendall(junk)
            s.close()
        # an unknown request with NEED_REPLY gets an error ack, the connection keeps working
        with Frontend(str(b.sock)) as fe:
            fe.send_message(99, b"", flags=0x1 | 0x8)
            ack = fe.recv_reply(99)
            assert struct.unpack("<Q", ack)[0] != 0
            assert fe.write(0, bytes(512)) == vb.S_OK
        assert b.proc.poll() is None


# -- the reference: qemu-storage-daemon ------------------------------------------------------------

def _edge_requests(cap):
    return [
        blk_read(cap - 1, 512), blk_read(cap - 1, 1024), blk_read(cap, 512),
        blk_write(cap - 8, os.urandom(4096)), blk_write(cap - 4, os.urandom(4096)),
        blk_read(0, 0), blk_flush(), blk_write_zeroes(cap - 8, 8), blk_write_zeroes(cap, 8),
        blk_discard(16, 16), blk_read(16, 8192),
    ]


@pytest.mark.qsd
@pytest.mark.skipif(not shutil.which("qemu-storage-daemon"),
                    reason="qemu-storage-daemon not installed (.ci/install --test installs it)")
@pytest.mark.parametrize("depth", [1, 32])
def test_same_results_as_qemu_storage_daemon(tmp, depth):
    results = {}
    for kind in ("pyvhost", "qsd"):
        img = make_image(tmp / f"{kind}.img", seed=42)
        sock = tmp / f"{kind}.sock"
        cm = pyvhost_blk(img, sock, num_queues=2) if kind == "pyvhost" else \
            qsd_blk(img, sock, num_queues=2)
        with cm as b, Frontend(str(b.sock), num_queues=2, two_regions=True, seed=5) as fe:
            model = run_random_workload(fe, img, seed=1000 + depth, n_ops=1500, depth=depth,
                                        queues=[0, 1], discard_zeroes=True)
            cap = fe.get_config().capacity
            edge = fe.submit_many(_edge_requests(cap), depth=1)
            dump = read_device(fe, IMG_SIZE)
        results[kind] = dict(model=model, cap=cap, statuses=[r.status for r in edge],
                             reads=[r.data for r in edge if r.data],
                             image=open(img, "rb").read(), dump=dump)
    p, q = results["pyvhost"], results["qsd"]
    assert p["cap"] == q["cap"]
    assert p["model"] == q["model"], "the same seeded workload diverged"
    assert p["statuses"] == q["statuses"]
    assert p["image"][:-8 * 512 * 2] == q["image"][:-8 * 512 * 2]  # tail differs: random writes
    assert p["dump"] == p["image"] and q["dump"] == q["image"]
