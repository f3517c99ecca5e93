"""Integration: pyvhost-blk on NBD exports (cython_ext/nbd.pyx through libnbd) of qemu-nbd (an
image file, no multi-conn: one connection) and nbdkit's memory plugin (multi-conn: a connection
per queue), on Unix sockets, driven by the frontend driver over a real socket.

Checked: the seeded random workload against the model (and the image file for qemu-nbd); the
same workload through qemu-storage-daemon's nbd driver with the same result; the server killed
and started again mid-workload (I/O waits, is resubmitted on the new connection, nothing
acknowledged is lost); a server away longer than nbd-timeout fails I/O with IOERR and the device
serves again once it is back; the one-line errors of a start without a server or export."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from protocols import virtio_blk as vb
from vhost.testing.backends import REPO_ROOT, pyvhost_blk, qsd_blk
from vhost.testing.blk import Frontend
from vhost.testing.nbdserver import NbdServer, have_nbd_servers
from vhost.testing.workload import run_random_workload

_ok, _why = have_nbd_servers()
pytestmark = [pytest.mark.skipif(not _ok, reason=_why)]

MiB = 1 << 20
IMG_SIZE = 64 * MiB


def _image(tmp):
    img = tmp / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    return img


def _server(kind, tmp, img=None):
    return NbdServer(kind, tmp / f"{kind}.sock", image=img, size="64M")


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_random_workload_against_the_model(tmp, kind):
    img = _image(tmp) if kind == "qemu-nbd" else None
    with _server(kind, tmp, img) as srv, \
            pyvhost_blk(None, tmp / "s.sock", num_queues=2, extra=("--nbd", srv.uri)) as b, \
            Frontend(str(b.sock), num_queues=2, two_regions=True, seed=2) as fe:
        assert fe.config.capacity * 512 == IMG_SIZE
        model = run_random_workload(fe, None, seed=2, n_ops=1500, depth=16, queues=[0, 1],
                                    discard_zeroes=True, readback=True)
    log = b.log_text()
    assert "Traceback" not in log
    # qemu-nbd does not offer multi-conn for a writable export: one connection
    assert ("up to 1 connection (no multi-conn)" in log) == (kind == "qemu-nbd"), log
    if img is not None:
        assert img.read_bytes() == model


def test_same_workload_as_qemu_storage_daemon(tmp):
    models = []
    for backend in ("pyvhost", "qsd"):
        img = tmp / f"{backend}.img"
        with open(img, "wb") as f:
            f.truncate(IMG_SIZE)
        srv = NbdServer("qemu-nbd", tmp / f"{backend}-nbd.sock", image=img)
        sock = tmp / f"{backend}.sock"
        with srv:
            cm = (pyvhost_blk(None, sock, num_queues=2, extra=("--nbd", srv.uri))
                  if backend == "pyvhost" else
                  qsd_blk(None, sock, num_queues=2,
                          blockdev=f"driver=nbd,node-name=f0,server.type=unix,"
                                   f"server.path={srv.sock},export=disk,discard=unmap"))
            with cm as b, Frontend(str(b.sock), num_queues=2, seed=13) as fe:
                models.append(run_random_workload(fe, None, seed=13, n_ops=800, depth=8,
                                                  queues=[0, 1], discard_zeroes=True))
        assert img.read_bytes() == models[-1], backend
    assert models[0] == models[1]


def test_server_killed_and_restarted_mid_workload_loses_nothing(tmp):
    img = _image(tmp)
    srv = _server("qemu-nbd", tmp, img).start()
    result: dict = {}

    def workload(fe):
        try:
            result["model"] = run_random_workload(fe, None, seed=9, n_ops=4000, depth=16,
                                                  queues=[0, 1])
        except BaseException as e:                        # reported below
            result["error"] = e

    try:
        with pyvhost_blk(None, tmp / "s.sock", num_queues=2, extra=("--nbd", srv.uri)) as b, \
                Frontend(str(b.sock), num_queues=2, seed=9, timeout=60) as fe:
            t = threading.Thread(target=workload, args=(fe,), daemon=True)
            t.start()
            for _ in range(2):              # twice: in flight each time
                time.sleep(0.7)
                assert t.is_alive(), result
                srv.kill()
                time.sleep(1.0)
                assert t.is_alive() and not result, result    # waiting, not failing
                srv.start()
            t.join(120)
            assert not t.is_alive(), "the workload did not finish after the server came back"
            assert "error" not in result, result.get("error")
        log = b.log_text()
        assert "request failed" not in log and "Traceback" not in log
        # every write the guest saw acknowledged is in the image
        assert img.read_bytes() == result["model"]
    finally:
        srv.stop()


def test_a_server_away_longer_than_the_timeout_fails_io_then_serves_again(tmp):
    img = _image(tmp)
    srv = _server("qemu-nbd", tmp, img).start()
    try:
        with pyvhost_blk(None, tmp / "s.sock",
                         extra=("--nbd", srv.uri, "--nbd-timeout", "2")) as b, \
                Frontend(str(b.sock), timeout=30) as fe:
            assert fe.write(0, b"a" * 4096) == vb.S_OK
            srv.kill()
            t0 = time.monotonic()
            assert fe.write(8, b"b" * 4096) == vb.S_IOERR
            took = time.monotonic() - t0
            assert 1.5 <= took < 10, took
            srv.start()
            deadline = time.monotonic() + 20
            while fe.read(0, 4096) != (vb.S_OK, b"a" * 4096):
                assert time.monotonic() < deadline, "no I/O after the server came back"
                time.sleep(0.2)
            assert fe.write(16, b"c" * 4096) == vb.S_OK
        assert "Traceback" not in b.log_text()
    finally:
        srv.stop()
    data = img.read_bytes()
    assert data[:4096] == b"a" * 4096 and data[8 * 512:8 * 512 + 4096] == bytes(4096)
    assert data[16 * 512:16 * 512 + 4096] == b"c" * 4096


def test_a_request_the_server_cannot_take_fails_alone(tmp):
    """An export without WRITE_ZEROES (nbdkit's nozero filter): the device does not offer it,
    and a guest that sends one anyway gets IOERR at once -- libnbd refuses the command on a
    live connection, which is not a lost server to wait for -- while the queue keeps serving."""
    srv = NbdServer("nbdkit", tmp / "nz.sock", nbdkit_args=("--filter=nozero", "zeromode=none"))
    with srv, pyvhost_blk(None, tmp / "s.sock", extra=("--nbd", srv.uri)) as b, \
            Frontend(str(b.sock), timeout=10) as fe:
        assert not fe.features & vb.F_WRITE_ZEROES
        t0 = time.monotonic()
        assert fe.write_zeroes(0, 8) == vb.S_IOERR
        assert time.monotonic() - t0 < 5
        assert fe.write(0, b"z" * 4096) == vb.S_OK
        assert fe.read(0, 4096) == (vb.S_OK, b"z" * 4096)
    assert "Traceback" not in b.log_text()


def _start_fails(*args):
    cp = subprocess.run([sys.executable, "-m", "vhost.programs", "pyvhost-blk",
                         "--socket-path", "/tmp/pyvhost-nbd-never.sock", *args],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert cp.returncode != 0 and lines and "Traceback" not in cp.stderr, cp.stderr
    return lines[-1]


def test_start_errors_say_what_to_fix_in_one_line(tmp):
    assert "no NBD server there" in _start_fails(
        "--nbd", f"nbd+unix:///disk?socket={tmp}/nothing.sock")
    with _server("qemu-nbd", tmp, _image(tmp)) as srv:
        line = _start_fails("--nbd", f"nbd+unix:///other?socket={srv.sock}")
    assert "export not found" in line, line
    assert "nbd is an NBD URI" in _start_fails("--nbd", "/dev/nbd0")
