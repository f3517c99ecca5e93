"""bench.blk's view of the block device under an image: which sysfs stat file it reads and the
queue depth / merge figures it derives from two samples (Documentation/block/stat.rst)."""
import os
from pathlib import Path

from bench.blk import _block_sample, _device_queue, block_stat_path


def test_tmpfs_has_no_block_device():
    assert block_stat_path(Path("/dev/shm")) is None


def test_a_file_on_a_block_device_maps_to_its_stat_file(tmp_path):
    for d in ("/var/tmp", "/"):
        p = block_stat_path(Path(d))
        if p is not None:
            dev = os.stat(d).st_dev
            assert p == f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"
            s = _block_sample(p)
            assert len(s) == 3 and s[1] >= 0 and s[2] >= 0
            return
    # every file system here is virtual (a container): nothing to map, and None says so
    assert block_stat_path(tmp_path) in (None, block_stat_path(Path("/")))


def test_device_queue_is_weighted_time_over_wall_time():
    # 2 s of wall time, 1000 device I/Os, 6000 ms of weighted queue time: QD 3, 6 ms per I/O;
    # 4000 guest I/Os for 1000 device I/Os: the block layer merged 4 into 1
    d = _device_queue((10.0, 500, 1000), (12.0, 1500, 7000), 4000)
    assert abs(d["dev_qd"] - 3.0) < 1e-9
    assert abs(d["dev_us_per_io"] - 6000.0) < 1e-9
    assert abs(d["dev_ios_per_op"] - 0.25) < 1e-9


def test_device_queue_without_samples_or_ios_is_unknown_not_zero():
    assert _device_queue(None, None, 10) == dict(dev_qd=None, dev_us_per_io=None,
                                                dev_ios_per_op=None)
    d = _device_queue((0.0, 5, 5), (1.0, 5, 5), 0)
    assert d["dev_us_per_io"] is None and d["dev_ios_per_op"] is None and d["dev_qd"] == 0
