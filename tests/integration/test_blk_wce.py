"""virtio-blk CONFIG_WCE (virtio 1.2 §5.2.6.2): when the driver switches the device to
write-through (writeback = 0 at config offset 32), every write must be stable when it completes,
since the guest stops sending FLUSH.  The worker then issues each write with RWF_DSYNC; the
choice applies to running queues at once, survives a frontend reconnect (QEMU does not repeat it)
and is undone by writeback = 1.  Driven through the real server with the frontend driver."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from devices.blk import BlkDevice
from protocols import virtio_blk as vb
from protocols.vhost_user import Config, FrontendReq
from vhost.testing.backends import short_tmpdir
from tests.inprocess import TIMEOUT, serving
from vhost.testing.blk import Frontend


@pytest.fixture
def img():
    d = Path(short_tmpdir(os.path.join(os.environ.get("PYVHOST_TEST_DISK_DIR", "/var/tmp"),
                                       "pvhwce")))
    p = d / "d.img"
    with open(p, "wb") as f:
        f.truncate(16 << 20)
    yield p
    shutil.rmtree(d, ignore_errors=True)


def set_wce(fe: Frontend, writeback: int) -> None:
    fe.setup(FrontendReq.SET_CONFIG, Config.build(dict(
        offset=vb.WRITEBACK_OFFSET, size=1, flags=0, payload=bytes([writeback]))))


def dsync_writes(dev: BlkDevice) -> int:
    return sum(w.stats()["dsync_writes"] for w in dev.queues.live())


def test_write_through_makes_every_write_dsync(img):
    dev = BlkDevice.open(str(img))
    sock = img.parent / "s.sock"
    try:
        with serving((dev, sock)):
            with Frontend(str(sock), timeout=TIMEOUT) as fe:
                assert fe.get_config().writeback == 1
                for k in range(4):
                    assert fe.write(k * 8, bytes([k]) * 4096) == vb.S_OK
                assert dsync_writes(dev) == 0
                set_wce(fe, 0)                          # write-through, queue running
                assert fe.get_config().writeback == 0
                for k in range(3):
                    assert fe.write(64 + k * 8, b"t" * 4096) == vb.S_OK
                assert fe.read(64, 4096) == (vb.S_OK, b"t" * 4096)      # reads unaffected
                assert dsync_writes(dev) == 3
            # a reconnecting frontend finds the device still write-through
            with Frontend(str(sock), timeout=TIMEOUT) as fe:
                assert fe.get_config().writeback == 0
                assert fe.write(200, b"r" * 512) == vb.S_OK
                assert dsync_writes(dev) == 1           # the new worker started write-through
                set_wce(fe, 1)
                assert fe.write(208, b"b" * 512) == vb.S_OK
                assert dsync_writes(dev) == 1
                assert fe.flush() == vb.S_OK
        with open(img, "rb") as f:
            f.seek(64 * 512)
            assert f.read(4096) == b"t" * 4096
    finally:
        dev.close()
