"""virtio-blk request semantics in the Cython worker (cython_ext/blk.pyx), in memory: flush,
GET_ID, discard, write-zeroes, read-only, unaligned buffers (O_DIRECT -> buffered path), and the
synchronous fallback giving the same results as io_uring."""
import os

import pytest

from protocols import virtio_blk as vb
from vhost.testing.ringrig import Rig

IMG = 1 << 20


@pytest.fixture(params=["io_uring", "sync"])
def rig(request, image):
    r = Rig(image, use_io_uring=request.param == "io_uring")
    yield r
    r.close()


def _simple(r, rtype, sector=0, data=0):
    head, s, d = r.request(rtype, sector, data)
    used = r.run()
    return r.status_of(s), used, d


def test_flush(rig):
    st, used, _ = _simple(rig, vb.T_FLUSH)
    assert st == vb.S_OK and used[0][1] == 1


def test_get_id(rig):
    st, used, d = _simple(rig, vb.T_GET_ID, 0, vb.ID_BYTES)
    assert st == vb.S_OK
    assert rig.ram.read(d, vb.ID_BYTES) == b"rig-serial-012345678"
    assert used[0][1] == vb.ID_BYTES + 1


def _range(sector, n, flags=0):
    return vb.DiscardWriteZeroes.build(dict(sector=sector, num_sectors=n, flags=flags))


@pytest.mark.parametrize("rtype,flags", [(vb.T_DISCARD, 0), (vb.T_WRITE_ZEROES, 0),
                                          (vb.T_WRITE_ZEROES, vb.WRITE_ZEROES_FLAG_UNMAP)])
def test_discard_and_write_zeroes(rig, image, rtype, flags):
    before = open(image, "rb").read()
    st, used, _ = _simple(rig, rtype, 0, _range(16, 32, flags))
    assert st == vb.S_OK and used[0][1] == 1
    after = open(image, "rb").read()
    assert after[16 * 512:48 * 512] == bytes(32 * 512)
    assert after[:16 * 512] == before[:16 * 512] and after[48 * 512:] == before[48 * 512:]
    assert os.path.getsize(image) == IMG
    st, got = rig.read(16, 32 * 512)
    assert st == vb.S_OK and got == bytes(32 * 512)


def test_write_zeroes_unknown_flag_unsupported(rig):
    st, _, _ = _simple(rig, vb.T_WRITE_ZEROES, 0, _range(0, 8, flags=0x80))
    assert st == vb.S_UNSUPP
    rig.assert_serving()


def test_read_only(image):
    r = Rig(image, read_only=True)
    try:
        before = open(image, "rb").read()
        head, s, _ = r.request(vb.T_OUT, 0, os.urandom(512))
        r.run()
        assert r.status_of(s) == vb.S_IOERR
        for rtype, payload in ((vb.T_DISCARD, _range(0, 8)), (vb.T_WRITE_ZEROES, _range(0, 8))):
            head, s, _ = r.request(rtype, 0, payload)
            r.run()
            assert r.status_of(s) == vb.S_IOERR
        st, _, _ = _simple(r, vb.T_FLUSH)
        assert st == vb.S_OK
        st, got = r.read(0, 4096)
        assert st == vb.S_OK and got == before[:4096]
        assert open(image, "rb").read() == before
    finally:
        r.close()


def test_unaligned_buffers_take_the_buffered_path(rig, image):
    """A 512-byte sector split at odd offsets: O_DIRECT would refuse it; the data still lands."""
    data = os.urandom(2048)
    head, s, _ = rig.request(vb.T_OUT, 40, data, split=3)    # 683-byte segments
    rig.run()
    assert rig.status_of(s) == vb.S_OK
    st, got = rig.read(40, 2048, split=5)
    assert st == vb.S_OK and got == data
    assert open(image, "rb").read()[40 * 512:40 * 512 + 2048] == data


def test_last_sector_and_zero_length(rig):
    data = os.urandom(512)
    assert rig.write(rig.capacity - 1, data) == vb.S_OK
    st, got = rig.read(rig.capacity - 1, 512)
    assert st == vb.S_OK and got == data
    # a header + status only IN request (no data) succeeds with nothing transferred
    st, used, _ = _simple(rig, vb.T_IN, 0, 0)
    assert st == vb.S_OK and used[0][1] == 1


def test_many_in_flight(image):
    """More requests than one batch, all in flight together (io_uring), completed correctly."""
    r = Rig(image, qsize=256)
    try:
        assert r.worker.uses_io_uring
        payloads = [os.urandom(4096) for _ in range(64)]
        heads = []
        for k, p in enumerate(payloads):
            heads.append(r.request(vb.T_OUT, k * 8, p)[0])
        used = r.run()
        assert sorted(h for h, _ in used) == sorted(heads)
        data = open(image, "rb").read()
        for k, p in enumerate(payloads):
            assert data[k * 4096:(k + 1) * 4096] == p
        st = r.worker.stats()
        assert st["completed"] == 64
        assert st["max_inflight"] >= 32, st     # one batch, all in the io_uring together
    finally:
        r.close()
