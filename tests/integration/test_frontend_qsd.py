"""vhost/testing's frontend driver against the C reference backend: a real qemu-storage-daemon (QSD) exporting a
sparse 64 MiB image as vhost-user-blk.  Checks the frontend (setup sequence, memory tables with
one, two and odd region layouts, split rings with and without EVENT_IDX / INDIRECT, pipelining,
multiqueue) and the reusable random workload (vhost/testing/workload.py) that later runs against our
own backend.  The allocator tests at the end need no QSD.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from protocols import virtio
from protocols import virtio_blk as vblk
from vhost.testing.blk import BlkRequest, Frontend, blk_read, blk_write
from vhost.testing.errors import GuestRAMFull
from vhost.testing.ram import GuestRAM, MiB, Region, pc_two_region_layout

try:
    from workload import read_device, run_random_workload
except ImportError:  # tests/ made a package later
    from vhost.testing.workload import read_device, run_random_workload

QSD_BIN = shutil.which("qemu-storage-daemon")


def needs_qsd(test):
    """Mark a test as needing the qemu-storage-daemon binary (skipped, with the reason, if absent)."""
    test = pytest.mark.qsd(test)
    return pytest.mark.skipif(QSD_BIN is None, reason="qemu-storage-daemon binary not found "
                              "(Debian package qemu-system-common)")(test)

IMAGE_SIZE = 64 * MiB
SECTORS = IMAGE_SIZE // 512

# Preferred block options first; the fallback is for filesystems without O_DIRECT / io_uring.
_BLOCK_OPTIONS = ["cache.direct=on,aio=io_uring", "cache.direct=off,aio=threads"]


class QSD:
    """One qemu-storage-daemon process exporting `image` on `sock`."""

    def __init__(self, tmp: Path, num_queues: int, n: int):
        self.image = tmp / f"disk{n}.img"
        self.sock = tmp / f"qsd{n}.sock"
        self.log = tmp / f"qsd{n}.log"
        self.num_queues = num_queues
        self.expect_exit = False                 # set by tests that kill the daemon
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_SIZE)               # sparse
        self.proc = None
        errors = []
        for opts in list(_BLOCK_OPTIONS):
            if self._start(opts):
                self.block_options = opts
                # later daemons go straight to what works here
                _BLOCK_OPTIONS[:] = [o for o in _BLOCK_OPTIONS if o == opts] + \
                    [o for o in _BLOCK_OPTIONS if o != opts]
                return
            errors.append(f"{opts}: {self.log.read_text().strip()}")
        raise RuntimeError("qemu-storage-daemon did not start: " + " | ".join(errors))

    def _start(self, opts: str) -> bool:
        cmd = [QSD_BIN,
               "--blockdev", f"driver=file,node-name=f0,filename={self.image},{opts},"
                             f"discard=unmap",
               "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
                           f"addr.path={self.sock},writable=on,num-queues={self.num_queues}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.sock.exists():
                return True                      # Frontend.connect retries until it listens
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"qemu-storage-daemon: no socket after 10 s; log: "
                           f"{self.log.read_text()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.log.read_text()


@pytest.fixture
def qsd(tmp_path):
    """Factory: qsd(num_queues=1) starts a daemon on a fresh sparse image.  All are stopped at
    the end; the test fails if a daemon died early or logged an error."""
    daemons: list[QSD] = []

    def start(num_queues: int = 1) -> QSD:
        d = QSD(tmp_path, num_queues, len(daemons))
        daemons.append(d)
        return d

    yield start
    problems = []
    for d in daemons:
        died = None if d.alive() else d.proc.returncode
        log = d.stop()
        if d.expect_exit:
            continue
        if died is not None:
            problems.append(f"{d.sock.name}: exited early with {died}; log: {log}")
        elif any(w in log.lower() for w in ("error", "panic", "failed")):
            problems.append(f"{d.sock.name}: log: {log}")
    if problems:
        pytest.fail("qemu-storage-daemon: " + "; ".join(problems))


def _check_close(f: Frontend) -> None:
    """close() returns the backend's last avail index: all we published was consumed."""
    expected = [vq.avail_idx for vq in f.queues]
    assert f.close() == expected


# --------------------------------------------------------------------------------------------

@needs_qsd
@pytest.mark.parametrize("num_queues", [1, 2])
def test_connect_and_config(qsd, num_queues):
    d = qsd(num_queues)
    f = Frontend(d.sock, num_queues=num_queues).connect()
    try:
        assert f.config.capacity == SECTORS
        assert f.config.blk_size == 512
        assert f.config.num_queues == num_queues
        assert f.config.seg_max >= 1
        assert f.max_queues == num_queues
        assert f.features & virtio.F_VERSION_1
        assert f.has_event_idx and f.has_indirect
        assert f.features & vblk.F_FLUSH and f.features & vblk.F_DISCARD
        assert f.mem_table_via == "ADD_MEM_REG"            # QSD offers CONFIGURE_MEM_SLOTS
        assert f.max_mem_slots >= 2
        assert f.get_config().capacity == SECTORS          # again, after the rings started
    finally:
        _check_close(f)


@needs_qsd
@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("layout", ["one", "two"])
@pytest.mark.parametrize("depth", [1, 32])
def test_random_workload(qsd, depth, layout, queues):
    d = qsd(queues)
    seed = depth * 100 + queues * 10 + (layout == "two")
    with Frontend(d.sock, num_queues=queues, two_regions=(layout == "two"), seed=seed) as f:
        model = run_random_workload(f, d.image, seed=seed, n_ops=300, depth=depth,
                                    discard_zeroes=True)
        assert len(model) == IMAGE_SIZE
        assert any(model)
        _check_close(f)


@needs_qsd
@pytest.mark.parametrize("layout", ["one", "two"])
def test_workload_set_mem_table(qsd, layout):
    """SET_MEM_TABLE even though QSD offers CONFIGURE_MEM_SLOTS (what DPDK does)."""
    d = qsd(1)
    with Frontend(d.sock, two_regions=(layout == "two"), use_add_mem_reg=False, seed=7) as f:
        assert f.mem_table_via == "SET_MEM_TABLE"
        run_random_workload(f, d.image, seed=11, n_ops=200, depth=16)
        _check_close(f)


@needs_qsd
def test_workload_odd_layout(qsd):
    """Three regions whose mmap_offset differs from their GPA (as QEMU's above-4G RAM does);
    two of them are adjacent in GPA space, and one sits above 4 GiB."""
    d = qsd(2)
    regions = [Region(0, 1 * MiB, 63 * MiB),
               Region(1 * MiB, 31 * MiB, 32 * MiB),
               Region(4 << 30, 32 * MiB, 0)]
    with Frontend(d.sock, num_queues=2, regions=regions, seed=5) as f:
        run_random_workload(f, d.image, seed=5, n_ops=300, depth=32, readback=True)
        _check_close(f)


@needs_qsd
@pytest.mark.parametrize("event_idx,indirect", [(False, False), (False, True), (True, False)])
def test_workload_ring_features(qsd, event_idx, indirect):
    """Without EVENT_IDX (USED_F_NO_NOTIFY / AVAIL_F_NO_INTERRUPT) and without INDIRECT (long
    direct chains from the scatter-gather splitting)."""
    d = qsd(1)
    with Frontend(d.sock, event_idx=event_idx, indirect=indirect, queue_size=64,
                  seed=3, max_segments=12) as f:
        assert f.has_event_idx == event_idx and f.has_indirect == indirect
        run_random_workload(f, d.image, seed=9, n_ops=200, depth=32)
        _check_close(f)


@needs_qsd
def test_flush(qsd):
    d = qsd(1)
    with Frontend(d.sock) as f:
        data = random.Random(1).randbytes(64 * 1024)
        assert f.write(2048, data) == vblk.S_OK
        assert f.flush() == vblk.S_OK
        with open(d.image, "rb") as img:
            img.seek(2048 * 512)
            assert img.read(len(data)) == data
        _check_close(f)


@needs_qsd
def test_discard_and_write_zeroes(qsd):
    d = qsd(1)
    rng = random.Random(2)
    with Frontend(d.sock, seed=2) as f:
        cfg = f.config
        assert cfg.max_discard_sectors >= 64 and cfg.max_write_zeroes_sectors >= 64
        pattern = rng.randbytes(1 * MiB)
        assert f.write(0, pattern) == vblk.S_OK
        # discard [128, 192), write_zeroes [256, 320) and (with unmap) [512, 520)
        assert f.discard(128, 64) == vblk.S_OK
        assert f.write_zeroes(256, 64) == vblk.S_OK
        assert f.write_zeroes(512, 8, unmap=True) == vblk.S_OK
        expected = bytearray(pattern)
        for s, n in ((128, 64), (256, 64), (512, 8)):
            expected[s * 512:(s + n) * 512] = bytes(n * 512)
        status, data = f.read(0, len(pattern))
        assert status == vblk.S_OK
        assert data == expected
        assert f.flush() == vblk.S_OK
        assert Path(d.image).read_bytes()[:len(pattern)] == expected
        # the spec's error cases: unknown flags -> UNSUPP; discard with UNMAP -> UNSUPP
        bad = vblk.DiscardWriteZeroes.build(dict(sector=0, num_sectors=8, flags=2))
        assert f.submit_many([BlkRequest(vblk.T_WRITE_ZEROES, 0, bad)])[0].status == \
            vblk.S_UNSUPP
        unmap = vblk.DiscardWriteZeroes.build(dict(sector=0, num_sectors=8, flags=1))
        assert f.submit_many([BlkRequest(vblk.T_DISCARD, 0, unmap)])[0].status == vblk.S_UNSUPP
        # out of range
        assert f.write_zeroes(SECTORS - 4, 8) == vblk.S_IOERR
        _check_close(f)


@needs_qsd
def test_get_id(qsd):
    d = qsd(1)
    with Frontend(d.sock) as f:
        status, ident = f.get_id()
        assert status == vblk.S_OK
        assert len(ident) == vblk.ID_BYTES
        name = ident.split(b"\0")[0]
        assert name == b"vhost_user_blk"                  # QSD's fixed serial
        _check_close(f)


@needs_qsd
def test_bad_requests_get_status(qsd):
    """Requests QSD must refuse without stopping the queue: unknown type, out of range."""
    d = qsd(1)
    with Frontend(d.sock) as f:
        res = f.submit_many([BlkRequest(0x55, 0, b"", 16), blk_read(SECTORS, 512),
                             blk_write(SECTORS - 1, bytes(1024)), blk_read(0, 512)])
        assert [r.status for r in res] == [vblk.S_UNSUPP, vblk.S_IOERR, vblk.S_IOERR,
                                           vblk.S_OK]
        _check_close(f)


@needs_qsd
def test_low_level_chains(qsd):
    """The raw ring API ring tests build on: add_chain (direct / indirect), add_raw_descs with
    an indirect table written by hand, publish, kick, wait_used."""
    d = qsd(1)
    with Frontend(d.sock) as f:
        q, mem = f.queues[0], f.mem
        assert f.write(10, b"\x42" * 512) == vblk.S_OK

        def blk_read_bufs():
            hdr = mem.alloc(16)
            mem.write(hdr, vblk.ReqHeader.build(dict(type=vblk.T_IN, reserved=0, sector=10)))
            buf, st = mem.alloc(512), mem.alloc(1)
            mem.fill(st, 1, 0xFF)
            return hdr, buf, st

        h1 = blk_read_bufs()
        head1 = q.add_chain([(h1[0], 16, False), (h1[1], 512, True), (h1[2], 1, True)])
        h2 = blk_read_bufs()
        head2 = q.add_chain([(h2[0], 16, False), (h2[1], 512, True), (h2[2], 1, True)],
                            indirect=True)
        h3 = blk_read_bufs()
        table, nbytes = q.write_indirect_table([
            (h3[0], 16, virtio.VIRTQ_DESC_F_NEXT, None),
            (h3[1], 256, virtio.VIRTQ_DESC_F_WRITE | virtio.VIRTQ_DESC_F_NEXT, None),
            (h3[1] + 256, 256, virtio.VIRTQ_DESC_F_WRITE | virtio.VIRTQ_DESC_F_NEXT, None),
            (h3[2], 1, virtio.VIRTQ_DESC_F_WRITE, None)])
        (head3,) = q.add_raw_descs([(table, nbytes, virtio.VIRTQ_DESC_F_INDIRECT, 0)])
        free_before = q.num_free
        assert q.publish([head1, head2, head3]) == 3
        assert q.kick()                                   # first kick is always wanted
        used = q.wait_used(3, timeout=5)
        assert sorted(u for u, _ in used) == sorted([head1, head2, head3])
        assert dict(used)[head1] == 513
        for hdr, buf, st in (h1, h2, h3):
            assert mem.read(st, 1) == b"\x00"
            assert mem.read(buf, 512) == b"\x42" * 512
        assert q.num_free == free_before + 3 + 1 + 1      # direct chain of 3, two singles
        assert not q.unknown_used
        mem.free(table)
        # nothing outstanding: wait_used gives up with TimeoutError instead of hanging
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="queue 0"):
            q.wait_used(1, timeout=0.2)
        assert time.monotonic() - t0 < 2
        _check_close(f)


@needs_qsd
def test_stalled_then_dead_backend(qsd):
    """A backend that stops answering gives TimeoutError (with the ring state), one that dies
    gives VhostUserError at once; close() still releases everything."""
    d = qsd(1)
    d.expect_exit = True
    f = Frontend(d.sock, timeout=0.5).connect()
    try:
        assert f.write(0, bytes(4096)) == vblk.S_OK
        os.kill(d.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no completion within 0\.5s.*queue 0"):
            f.read(0, 4096)
        assert time.monotonic() - t0 < 3
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(5)
        t0 = time.monotonic()
        with pytest.raises(Exception, match="disconnected") as err:
            f.submit_many([blk_read(8, 512)], timeout=30)
        assert err.type.__name__ == "VhostUserError"
        assert time.monotonic() - t0 < 3
    finally:
        mem = f.mem
        with pytest.raises(Exception, match="SET_VRING_ENABLE|GET_VRING_BASE"):
            f.close()
        assert f.sock is None and mem.mm is None and mem.fd == -1


@needs_qsd
def test_read_device_after_restart(qsd):
    """Data written through one connection is read back through a second one (QSD keeps the
    export; our frontend reconnects with a fresh guest RAM)."""
    d = qsd(2)
    data = random.Random(4).randbytes(2 * MiB)
    with Frontend(d.sock, num_queues=2, seed=4) as f:
        assert f.write(4096, data, queue=1) == vblk.S_OK
        _check_close(f)
    with Frontend(d.sock, num_queues=2, two_regions=True) as f:
        assert read_device(f, IMAGE_SIZE, queue=[0, 1])[4096 * 512:4096 * 512 + len(data)] \
            == data
        _check_close(f)


# --- allocator and layout (no backend needed) -------------------------------------------------

def test_pc_layout():
    r = pc_two_region_layout(64 * MiB)
    assert r == [Region(0, 640 * 1024, 0), Region(768 * 1024, 64 * MiB - 768 * 1024, 768 * 1024)]


def test_allocator_never_straddles_regions():
    ram = GuestRAM(4 * MiB, [Region(0, 1 * MiB, 0), Region(1 * MiB, 3 * MiB, 1 * MiB)])
    try:
        rng = random.Random(0)
        live = {}
        for _ in range(3000):
            if live and rng.random() < 0.45:
                gpa = rng.choice(list(live))
                assert ram.read(gpa, live[gpa][0]) == live[gpa][1]
                ram.free(gpa)
                del live[gpa]
                continue
            n = rng.randint(1, 200_000)
            try:
                gpa = ram.alloc(n, align=rng.choice([1, 8, 16, 4096]))
            except GuestRAMFull:
                continue
            r = ram.region_of(gpa, n)                    # raises if it straddles
            assert r.gpa <= gpa and gpa + n <= r.gpa + r.size
            for g, (m, _) in live.items():
                assert gpa + n <= g or g + m <= gpa, "overlapping allocations"
            data = rng.randbytes(min(n, 64))
            ram.write(gpa, data)
            live[gpa] = (len(data), data)
        for gpa in list(live):
            ram.free(gpa)
        assert ram.free_bytes == 4 * MiB and ram.allocated_blocks == 0
        # everything coalesced back, but not across the region boundary
        assert ram._free == [(0, 1 * MiB), (1 * MiB, 4 * MiB)]
        with pytest.raises(GuestRAMFull):
            ram.alloc(3 * MiB + 1)
        with pytest.raises(ValueError):
            ram.read(1 * MiB - 8, 16)
    finally:
        ram.close()
