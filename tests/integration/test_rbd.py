"""Integration: pyvhost-blk on Ceph RBD images (cython_ext/rbd.pyx through librbd) of a throwaway
one-node cluster (vhost/testing/ceph.py), driven by the frontend driver over a real socket.

Checked: the seeded random workload against the model (the image read back with `rbd export`
afterwards), the same workload through qemu-storage-daemon's rbd driver with identical
results; discard and write-zeroes as `rbd diff` and reads see them; an OSD stopped and started
again in the middle of a workload (I/O stalls, then completes, nothing lost); two backends on
one image, as the two hosts of a live migration (the exclusive lock moves to whichever writes);
and the one-line errors of a start that cannot work (pool or image missing, no keyring, a
wrong key, a cluster that does not answer within ceph-timeout)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from vhost.testing.backends import REPO_ROOT, pyvhost_blk, qsd_blk
from protocols import virtio_blk as vb
from vhost.testing.blk import Frontend
from vhost.testing.workload import run_random_workload

pytestmark = [pytest.mark.ceph]

MiB = 1 << 20
IMG_SIZE = 64 * MiB
OBJ = 4 * MiB                      # rbd's default object size (order 22)


def _export(cluster, spec, tmp) -> bytes:
    out = tmp / f"{spec.replace('/', '_')}.export"
    out.unlink(missing_ok=True)
    cluster.rbd("export", spec, str(out))
    return out.read_bytes()


def _extents(cluster, spec) -> list[tuple[int, int]]:
    return sorted((e["offset"], e["length"])
                  for e in json.loads(cluster.rbd("diff", "--format", "json", spec)))


def _covered(extents, start, end) -> bool:
    return any(o < end and o + n > start for o, n in extents)


def test_random_workload_against_the_model(ceph_cluster, tmp):
    spec = ceph_cluster.create_image("workload", IMG_SIZE)
    with pyvhost_blk(None, tmp / "s.sock", num_queues=2,
                     extra=ceph_cluster.pyvhost_args(spec)) as b:
        with Frontend(str(b.sock), num_queues=2, two_regions=True, seed=3) as fe:
            assert fe.config.capacity * 512 == IMG_SIZE
            model = run_random_workload(fe, None, seed=3, n_ops=1500, depth=16, queues=[0, 1],
                                        discard_zeroes=True, readback=True)
    assert "Traceback" not in b.log_text()
    assert "rbd pyvhost/workload: 67108864 bytes" in b.log_text()
    assert _export(ceph_cluster, spec, tmp) == model


def test_same_workload_as_qemu_storage_daemon(ceph_cluster, tmp):
    """Both backends on their own image, the same seeded requests: the same bytes.  Discards
    are left out: QEMU's rbd driver skips partial-object discards (librbd's default), pyvhost
    zeroes them (rbd_skip_partial_discard = false), and virtio leaves discarded data
    unspecified."""
    models = []
    for kind in ("pyvhost", "qsd"):
        spec = ceph_cluster.create_image(f"same-{kind}", IMG_SIZE)
        sock = tmp / f"{kind}.sock"
        cm = (pyvhost_blk(None, sock, num_queues=2, extra=ceph_cluster.pyvhost_args(spec))
              if kind == "pyvhost" else
              qsd_blk(None, sock, num_queues=2, blockdev=ceph_cluster.qsd_blockdev(spec)))
        with cm as b, Frontend(str(b.sock), num_queues=2, seed=11) as fe:
            models.append(run_random_workload(fe, None, seed=11, n_ops=800, depth=8,
                                              queues=[0, 1]))
        assert _export(ceph_cluster, spec, tmp) == models[-1], kind
    assert models[0] == models[1]


def test_discard_and_write_zeroes_as_rbd_diff_and_reads_see_them(ceph_cluster, tmp):
    spec = ceph_cluster.create_image("zeroes", IMG_SIZE)
    data = bytes(range(256)) * (2 * OBJ // 256)
    with pyvhost_blk(None, tmp / "s.sock", extra=ceph_cluster.pyvhost_args(spec)) as b, \
            Frontend(str(b.sock)) as fe:
        for k in range(0, 2 * OBJ, MiB):                  # objects 0 and 1
            assert fe.write(k // 512, data[k:k + MiB]) == vb.S_OK
        ext = _extents(ceph_cluster, spec)
        assert _covered(ext, 0, OBJ) and _covered(ext, OBJ, 2 * OBJ), ext
        # a discard of a whole object removes it; rbd diff no longer lists it
        assert fe.discard(OBJ // 512, OBJ // 512) == vb.S_OK
        ext = _extents(ceph_cluster, spec)
        assert _covered(ext, 0, OBJ) and not _covered(ext, OBJ, 2 * OBJ), ext
        assert fe.read(OBJ // 512, 64 * 1024) == (vb.S_OK, bytes(64 * 1024))
        # write zeroes over part of object 0 (with and without UNMAP): those bytes read 0,
        # the rest of the object keeps its data
        assert fe.write_zeroes(8, 120, unmap=False) == vb.S_OK
        assert fe.write_zeroes(1024, 1024, unmap=True) == vb.S_OK
        st, got = fe.read(0, MiB)
        assert st == vb.S_OK
    want = bytearray(data[:MiB])
    want[8 * 512:128 * 512] = bytes(120 * 512)
    want[1024 * 512:2048 * 512] = bytes(1024 * 512)
    assert got == bytes(want)
    image = _export(ceph_cluster, spec, tmp)
    assert image[:MiB] == bytes(want) and image[OBJ:2 * OBJ] == bytes(OBJ)
    assert "Traceback" not in b.log_text()


def test_an_osd_restart_mid_workload_stalls_io_and_loses_nothing(ceph_cluster, tmp):
    spec = ceph_cluster.create_image("osd-restart", IMG_SIZE)
    result: dict = {}

    def workload(fe):
        try:
            result["model"] = run_random_workload(fe, None, seed=5, n_ops=4000, depth=8,
                                                  queues=[0, 1])
        except BaseException as e:                      # reported below
            result["error"] = e

    with pyvhost_blk(None, tmp / "s.sock", num_queues=2,
                     extra=ceph_cluster.pyvhost_args(spec)) as b, \
            Frontend(str(b.sock), num_queues=2, seed=5, timeout=120) as fe:
        t = threading.Thread(target=workload, args=(fe,), daemon=True)
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), result
        ceph_cluster.stop_osd()
        time.sleep(3)
        # stalled, not finished and not failed: 4000 requests take ~3 s with the OSD up
        assert t.is_alive() and not result, result
        ceph_cluster.start_osd()
        t.join(180)
        assert not t.is_alive(), "the workload did not finish after the OSD came back"
        assert "error" not in result, result.get("error")
    assert _export(ceph_cluster, spec, tmp) == result["model"]
    assert "request failed" not in b.log_text()


def test_two_backends_on_one_image_as_in_a_migration(ceph_cluster, tmp):
    """The source and the destination of a migration both open the image.  librbd's exclusive
    lock is cooperative: the backend that writes takes it from the other (which has stopped
    writing by then, as QEMU stops the source's queues before the destination starts).  Each
    sees the other's writes: no client-side cache (rbd_cache = false)."""
    spec = ceph_cluster.create_image("shared", IMG_SIZE)
    args = ceph_cluster.pyvhost_args(spec)
    with pyvhost_blk(None, tmp / "a.sock", extra=args) as a, \
            pyvhost_blk(None, tmp / "b.sock", extra=args) as b, \
            Frontend(str(a.sock)) as fa, Frontend(str(b.sock)) as fb:
        status = json.loads(ceph_cluster.rbd("status", "--format", "json", spec))
        assert len(status["watchers"]) == 2, status
        x, y = b"x" * 4096, b"y" * 4096
        assert fa.write(0, x) == vb.S_OK
        assert fb.read(0, 4096) == (vb.S_OK, x)
        assert fb.write(0, y) == vb.S_OK
        assert fa.read(0, 4096) == (vb.S_OK, y)
        assert fa.write(8, x) == vb.S_OK          # the lock comes back to A
        assert fb.read(0, 8192) == (vb.S_OK, y + x)
    assert "Traceback" not in a.log_text() + b.log_text()


def _start_fails(*args, timeout=60) -> tuple[int, str, float]:
    t0 = time.monotonic()
    cp = subprocess.run([sys.executable, "-m", "vhost.programs", "pyvhost-blk",
                         "--socket-path", "/tmp/pyvhost-rbd-never.sock", *args],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    return cp.returncode, cp.stderr, time.monotonic() - t0


def _last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "no error message"
    assert not any("Traceback" in ln for ln in lines), stderr
    return lines[-1]


def test_start_errors_say_what_to_fix_in_one_line(ceph_cluster, tmp):
    c = ceph_cluster
    spec = c.create_image("errors", MiB)
    base = ["--ceph-conf", str(c.conf), "--keyring", str(c.keyring)]
    rc, err, _ = _start_fails("--rbd", "nopool/x", *base)
    assert rc != 0 and "pool 'nopool' does not exist" in _last_line(err), err
    rc, err, _ = _start_fails("--rbd", f"{c.pool}/missing", *base)
    assert rc != 0 and f"image 'missing' not found in pool '{c.pool}'" in _last_line(err), err
    rc, err, _ = _start_fails("--rbd", spec, "--ceph-conf", str(c.conf),
                              "--keyring", str(tmp / "nokeyring"))
    assert rc != 0 and "keyring" in _last_line(err) and "does not exist" in _last_line(err)
    bad = tmp / "bad.keyring"
    bad.write_text("[client.admin]\n\tkey = AQBzbWFsbHRhbGtzbWFsbHRhbGtzbWFsbA==\n")
    rc, err, _ = _start_fails("--rbd", spec, "--ceph-conf", str(c.conf), "--keyring", str(bad))
    assert rc != 0 and "cannot connect to the Ceph cluster" in _last_line(err), err
    # a cluster that does not answer: a conf naming a port nothing listens on
    dead = tmp / "dead.conf"
    dead.write_text(c.conf.read_text().replace(c.mon_host, "v2:127.0.0.1:9"))
    rc, err, took = _start_fails("--rbd", spec, "--ceph-conf", str(dead),
                                 "--keyring", str(c.keyring), "--ceph-timeout", "3")
    line = _last_line(err)
    assert rc != 0 and "no monitor answered within 3 s" in line, err
    assert took < 30, took


def test_a_cluster_gone_while_serving_stalls_only_its_device(ceph_cluster, tmp):
    """`pyvhost serve` with an RBD device and two file devices: the OSD stops while the RBD
    device has a write in flight.  That write waits (not failed); the file device's load keeps
    completing, a new connection to the idle device is answered at once, and the service still
    stops on SIGTERM once the OSD is back and the write completed."""
    from vhost.testing.healthy import BlkLoad, get_features_time
    from vhost.testing.serve import Serve, blk_dev
    spec = ceph_cluster.create_image("service", IMG_SIZE)
    c = ceph_cluster
    cfg = tmp / "pyvhost.toml"
    cfg.write_text('[service]\nstop-timeout = 5\n'
                   + blk_dev(tmp, "file0") + blk_dev(tmp, "idle0")
                   + f'[[device]]\nname = "rbd0"\ntype = "block"\nsocket = "{tmp}/rbd0.sock"\n'
                     f'rbd = "{spec}"\nceph-conf = "{c.conf}"\nkeyring = "{c.keyring}"\n')
    serve = Serve(tmp, cfg)
    load = None
    try:
        serve.ready()
        load = BlkLoad(tmp / "file0.sock", max_seconds=90)
        load.start_and_wait()
        with Frontend(str(tmp / "rbd0.sock"), timeout=60) as fe:
            assert fe.write(0, b"1" * 4096) == vb.S_OK
            c.stop_osd()
            result = {}
            t = threading.Thread(target=lambda: result.update(st=fe.write(8, b"2" * 4096)),
                                 daemon=True)
            t.start()
            load.mark()
            time.sleep(3)
            w = load.window()
            assert t.is_alive() and not result, result        # the RBD write waits
            assert w.error is None and w.ops > 10 and w.max_stall < 2.0, w
            assert get_features_time(tmp / "idle0.sock") < 1.0
            c.start_osd()
            t.join(60)
            assert result.get("st") == vb.S_OK, result
            assert fe.read(0, 8192) == (vb.S_OK, b"1" * 4096 + b"2" * 4096)
        load.halt()
        assert load.error is None, load.error
        assert serve.stop() == 0, serve.log_text()[-3000:]
    finally:
        if load is not None:
            load.halt()
        if serve.proc.poll() is None:
            serve.stop()
