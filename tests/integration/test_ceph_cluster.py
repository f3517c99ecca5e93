"""Integration: vhost/testing/ceph.py's throwaway Ceph cluster (one mon, one memstore OSD,
cephx, no mgr) -- the RBD the rbd backend tests run against.  An image is created, written
(`rbd bench`, `rbd import`), seen by `rbd info` and `rbd diff`, and read back with
`rbd export` after the OSD was stopped and started again; while the OSD is down, I/O does not
complete.  Skipped, with the reason, only if the Ceph binaries are not installed."""
from __future__ import annotations

import json
import os

import pytest

from vhost.testing.ceph import CephCluster, CephError, have_ceph

_ok, _why = have_ceph()
pytestmark = [pytest.mark.ceph, pytest.mark.timeout(300),
              pytest.mark.skipif(not _ok, reason=_why)]

MiB = 1 << 20
IMG_SIZE = 64 * MiB


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with CephCluster(tmp_path_factory.mktemp("ceph")) as c:
        yield c


def test_cluster_is_up_with_cephx_and_an_rbd_pool(cluster):
    assert cluster.start_seconds < 60
    assert cluster.client_id == "admin"
    assert "[client.admin]" in cluster.keyring.read_text()
    assert "auth client required = cephx" in cluster.conf.read_text()
    dump = cluster.ceph_json("osd", "dump")
    assert [(o["osd"], o["up"], o["in"]) for o in dump["osds"]] == [(0, 1, 1)]
    pool = next(p for p in dump["pools"] if p["pool_name"] == cluster.pool)
    assert pool["size"] == 1 and "rbd" in pool["application_metadata"]
    assert cluster.rbd("ls", cluster.pool).strip() == ""


def test_write_info_diff_and_read_back_across_an_osd_restart(cluster, tmp_path):
    spec = cluster.create_image("bench", IMG_SIZE)
    info = json.loads(cluster.rbd("info", "--format", "json", spec))
    assert info["size"] == IMG_SIZE
    assert "exclusive-lock" in info["features"]
    assert json.loads(cluster.rbd("diff", "--format", "json", spec)) == []
    cluster.rbd("bench", "--io-type", "write", "--io-total", "4M", spec)
    assert json.loads(cluster.rbd("diff", "--format", "json", spec))

    # a 64 MiB sparse file with 1 MiB of random data at 8 MiB: `rbd import` keeps it sparse
    data = os.urandom(MiB)
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(IMG_SIZE)
        f.seek(8 * MiB)
        f.write(data)
    spec2 = f"{cluster.pool}/imported"
    cluster.rbd("import", src, spec2)
    assert json.loads(cluster.rbd("info", "--format", "json", spec2))["size"] == IMG_SIZE
    extents = json.loads(cluster.rbd("diff", "--format", "json", spec2))
    assert extents and all(e["exists"] == "true" for e in extents), extents
    assert sum(e["length"] for e in extents) == MiB
    assert min(e["offset"] for e in extents) == 8 * MiB

    cluster.stop_osd()
    # the OSD down: reads do not complete (they would wait for it; here they time out)
    cp = cluster.run("rbd", "--rados-osd-op-timeout", "3", "export", spec2,
                     tmp_path / "down.img", check=False, timeout=60)
    assert cp.returncode != 0
    cluster.start_osd()

    out = tmp_path / "out.img"
    cluster.rbd("export", spec2, out)
    with open(out, "rb") as f:
        got = f.read()
    assert len(got) == IMG_SIZE
    assert got[8 * MiB:9 * MiB] == data
    assert got.count(0) == IMG_SIZE - MiB + data.count(0)
    assert json.loads(cluster.rbd("diff", "--format", "json", spec))   # still there
    cluster.rbd("rm", spec)
    cluster.rbd("rm", spec2)
    assert cluster.rbd("ls", cluster.pool).strip() == ""


def test_rbd_errors_carry_stderr(cluster):
    with pytest.raises(CephError, match="No such file or directory"):
        cluster.rbd("info", f"{cluster.pool}/missing")
