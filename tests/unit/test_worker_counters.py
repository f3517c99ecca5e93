"""counters() of the one-queue workers (cython_ext/worker.pyx wk_counters): exactly
vhost.device.COUNTER_KEYS; for BlkQueueWorker the Device.queue_counters meanings, derived
from the worker's detailed stats()
(NetWorker's: tests/test_net_unit.py; RngQueueWorker's: tests/test_rng_unit.py)."""
import os

import pytest

from protocols import virtio_blk as vb
from vhost.testing.ringrig import F_WRITE, MEM, Rig
from vhost.device import COUNTER_KEYS


def _check_keys(c):
    assert tuple(c) == COUNTER_KEYS and all(type(v) is int for v in c.values())


@pytest.mark.parametrize("uring", [True, False])
def test_blk_counters_equal_the_device_mapping(tmp_path, uring):
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(1 << 20))
    r = Rig(str(img), use_io_uring=uring)
    try:
        r.assert_serving()
        r.raw([(r.header(vb.T_IN), 16, 0, None), (MEM + (1 << 20), 512, F_WRITE, None),
               (r.status(), 1, F_WRITE, None)])
        r.run()
        r.vq.set_avail_idx(r.vq.avail_idx + r.vq.size + 1)
        r.run()
        c = r.worker.counters()
        _check_keys(c)
        st = r.worker.stats()
        assert c == dict(requests=st["completed"], bytes_read=st["bytes_read"],
                         bytes_written=st["bytes_written"],
                         errors=st["failed"] + st["avail_corrupt"], inflight=st["inflight"],
                         kicks=st["kicks"], notifications=st["notifies"], dropped=0,
                         broken=int(st["broken"]))
        assert c["requests"] == 3 and c["bytes_read"] == 4096 and c["bytes_written"] == 4096
        assert c["errors"] == 2 and c["broken"] == 1 and c["dropped"] == 0
    finally:
        r.close()
