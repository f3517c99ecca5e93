"""End-to-end virtio-blk checks: a real Linux guest (QEMU, TCG) on a vhost-user-blk backend.

The same checks run against qemu-storage-daemon (the C reference, "qsd") and our backend
("pyvhost", ``python -m vhost.programs pyvhost-blk``). Boots are combined to keep the run short: one boot per
(backend, num_queues) for size + writes + O_DIRECT read-back + flush + throughput, one read-only
boot, and two boots against one running backend.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from vhost.testing import guest as g

pytestmark = [pytest.mark.e2e]

BACKENDS = ["qsd", "pyvhost"]
MiB = 1 << 20
IMG_SIZE = 64 * MiB
THROUGHPUT_MIB = 32

_ok, _why = g.have_guest_tools()
if not _ok:
    pytestmark.append(pytest.mark.skip(reason=f"e2e guest tools missing: {_why}"))


@pytest.fixture
def sockdir():
    d = g.short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMG_SIZE)
    return path


def _sha(path, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    assert len(data) == length
    return hashlib.sha256(data).hexdigest()


def _fill(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# Shell helpers shared by the guest scripts (busybox ash). `now_ns` reads the monotonic clock
# in ns from /proc/timer_list (busybox date has no %N), falling back to /proc/uptime (10 ms).
SCRIPT_PRELUDE = r"""
D=/dev/vda
fail=0
now_ns() {
    t=$(awk '/^now at/ {print $3; exit}' /proc/timer_list 2>/dev/null)
    if [ -z "$t" ]; then t=$(awk '{printf "%.0f", $1 * 1e9}' /proc/uptime); fi
    echo "$t"
}
mibps() {  # MiB t0_ns t1_ns
    awk -v m="$1" -v a="$2" -v b="$3" 'BEGIN { s = (b - a) / 1e9; if (s <= 0) s = 1e-9; printf "%.2f", m / s }'
}
sha_of() { sha256sum | cut -d' ' -f1; }
echo SIZE_BYTES=$(( $(cat /sys/block/vda/size) * 512 ))
echo RO=$(cat /sys/block/vda/ro)
echo GETRO=$(blockdev --getro $D)
echo MQ_QUEUES=$(ls /sys/block/vda/mq | wc -l)
# the negotiated virtio feature bits, bit 0 first (bit 34: VIRTIO_F_RING_PACKED)
echo FEATURES=$(cat /sys/block/vda/device/features)
echo NCPU=$(nproc)
"""


def _chunks(size: int) -> list[tuple[int, int, int]]:
    """(offset, length, dd block size) of the regions the guest writes: near the start (one
    sector-aligned but not page-aligned), straddling the middle, and in the last MiB up to the
    very end."""
    return [
        (0, 64 * 1024, 64 * 1024),
        (MiB + 7 * 512, 12 * 1024, 512),
        (size // 2 - 128 * 1024, 256 * 1024, 128 * 1024),
        (size - MiB + 3 * 4096, 8192, 4096),
        (size - 64 * 1024, 64 * 1024, 64 * 1024),
    ]


def _main_script(size: int, cpus: int, read_region: tuple[int, int]) -> str:
    lines = [SCRIPT_PRELUDE]
    lines.append(r"""
# write cache mode: QSD offers CONFIG_WCE with wce=0 ("write through"); switch to "write back"
# through virtio_blk's cache_type (a config write of wce, SET_CONFIG for the backend) so that
# flushes really reach the device. (queue/write_cache refuses the change with EINVAL.)
WC=/sys/block/vda/queue/write_cache
if [ -e $WC ]; then
    echo "WRITE_CACHE_INITIAL=$(cat $WC)"
    if [ "$(cat $WC)" != "write back" ] && [ -e /sys/block/vda/cache_type ]; then
        echo "write back" > /sys/block/vda/cache_type
        echo CACHE_TYPE_SET_RC=$?
    fi
    echo "WRITE_CACHE=$(cat $WC)"
else
    echo WRITE_CACHE=missing
fi

# sequential O_DIRECT throughput (no assertions on the numbers)
t0=$(now_ns)
dd if=/dev/zero of=$D bs=1M count=@TP@ oflag=direct conv=notrunc 2>/tmp/err || { echo "seq write failed: $(cat /tmp/err)"; fail=1; }
t1=$(now_ns)
echo SEQ_WRITE_MIBPS=$(mibps @TP@ $t0 $t1)
t0=$(now_ns)
dd if=$D of=/dev/null bs=1M count=@TP@ iflag=direct 2>/tmp/err || { echo "seq read failed: $(cat /tmp/err)"; fail=1; }
t1=$(now_ns)
echo SEQ_READ_MIBPS=$(mibps @TP@ $t0 $t1)

# data the host put in the image before boot
echo PREFILL_SHA=$(dd if=$D bs=65536 skip=@RSKIP@ count=@RCOUNT@ iflag=direct 2>/dev/null | sha_of)

chunk() {  # idx offset length bs cpumask
    i=$1; off=$2; len=$3; bs=$4; mask=$5
    dd if=/dev/urandom of=/tmp/c$i bs=$len count=1 iflag=fullblock 2>/dev/null
    src=$(sha_of < /tmp/c$i)
    taskset $mask dd if=/tmp/c$i of=$D bs=$bs seek=$((off / bs)) count=$((len / bs)) oflag=direct conv=notrunc 2>/tmp/err \
        || { echo "write chunk $i failed: $(cat /tmp/err)"; fail=1; }
    back=$(taskset $mask dd if=$D bs=$bs skip=$((off / bs)) count=$((len / bs)) iflag=direct 2>/dev/null | sha_of)
    echo CHUNK${i}_SRC=$src
    echo CHUNK${i}_BACK=$back
    [ "$src" = "$back" ] || { echo "chunk $i read back differs"; fail=1; }
}
""".replace("@TP@", str(THROUGHPUT_MIB))
       .replace("@RSKIP@", str(read_region[0] // 65536))
       .replace("@RCOUNT@", str(read_region[1] // 65536)))
    for i, (off, length, bs) in enumerate(_chunks(size)):
        mask = 1 << (i % cpus)
        lines.append(f"chunk {i} {off} {length} {bs} {mask:x}")
    lines.append(r"""
# flush: fdatasync on the device sends a FLUSH when the write cache is "write back"
f0=$(awk '{print $16}' /sys/block/vda/stat)
sync -d $D; echo SYNC_RC=$?
f1=$(awk '{print $16}' /sys/block/vda/stat)
echo FLUSH_BEFORE=$f0
echo FLUSH_AFTER=$f1
blockdev --flushbufs $D; echo FLUSHBUFS_RC=$?

# per-virtqueue completion interrupts (MSI-X vectors "virtioN-req.Q"), summed over CPUs
awk -v c=$(nproc) '/virtio[0-9]+-req\./ { s = 0; for (i = 2; i <= c + 1; i++) s += $i;
    n = $NF; gsub(/[.-]/, "_", n); print "IRQ_" toupper(n) "=" s }' /proc/interrupts
echo FAIL=$fail
exit $fail
""")
    return "\n".join(lines)


# qemu-storage-daemon (libvhost-user) has no packed rings; ours is checked with both layouts
# (`packed=on` on the QEMU device: QEMU 7.2 negotiates VIRTIO_F_RING_PACKED when offered)
RINGS = [("qsd", "split"), ("pyvhost", "split"), ("pyvhost", "packed")]


@pytest.mark.parametrize("num_queues", [1, 2])
@pytest.mark.parametrize("backend,ring", RINGS, ids=[f"{b}-{r}" for b, r in RINGS])
def test_blk_io(backend, ring, num_queues, image, sockdir, record_property):
    cpus = num_queues  # virtio_blk uses min(num-queues, nr_cpus) queues
    sock = sockdir / "blk.sock"
    # throughput writes zeros over [0, 32 MiB): put a non-zero pattern there first so the host
    # can tell the writes landed; a random region the guest only reads
    _fill(image, 0, b"\xa5" * (THROUGHPUT_MIB * MiB))
    read_region = (40 * MiB, 4 * MiB)
    _fill(image, read_region[0], os.urandom(read_region[1]))
    prefill_sha = _sha(image, *read_region)

    with g.blk_backend(backend, image, sock, num_queues=num_queues) as be:
        res = g.run_guest(_main_script(IMG_SIZE, cpus, read_region), cpus=cpus,
                          devices=g.blk_device_args(
                              sock, num_queues, extra="packed=on" if ring == "packed" else ""),
                          timeout=180)
    v = res.values()
    tail = res.tail()
    assert res.exit_code == 0, tail
    assert v["FEATURES"][34] == ("1" if ring == "packed" else "0"), (v["FEATURES"], tail)
    assert int(v["SIZE_BYTES"]) == IMG_SIZE, tail
    assert v["RO"] == "0", tail
    assert int(v["MQ_QUEUES"]) == num_queues, tail
    assert int(v["NCPU"]) == cpus
    assert v["PREFILL_SHA"] == prefill_sha, tail

    chunks = _chunks(IMG_SIZE)
    for i, (off, length, _bs) in enumerate(chunks):
        assert v[f"CHUNK{i}_SRC"] == v[f"CHUNK{i}_BACK"], tail
        assert _sha(image, off, length) == v[f"CHUNK{i}_SRC"], f"chunk {i} not in the image"

    # the sequential write of zeros reached the file, except where chunks overwrote it
    with open(image, "rb") as f:
        data = bytearray(f.read(THROUGHPUT_MIB * MiB))
    for off, length, _bs in chunks:
        if off < len(data):
            data[off:off + length] = bytes(min(length, len(data) - off))
    assert data.count(0) == len(data), "sequential write did not reach the image"

    # flush
    assert v["SYNC_RC"] == "0" and v["FLUSHBUFS_RC"] == "0", tail
    assert v["WRITE_CACHE"] in ("write back", "write through"), tail
    if v["WRITE_CACHE"] == "write back":
        assert int(v["FLUSH_AFTER"]) > int(v["FLUSH_BEFORE"]), tail

    # every virtqueue completed requests (chunks are issued from alternating CPUs)
    irqs = {k: int(val) for k, val in v.items() if k.startswith("IRQ_VIRTIO")}
    if irqs:  # absent if the device fell back to INTx
        assert len(irqs) == num_queues, irqs
        assert all(n > 0 for n in irqs.values()), irqs

    for key in ("SEQ_WRITE_MIBPS", "SEQ_READ_MIBPS"):
        record_property(f"{backend}_{ring}_nq{num_queues}_{key.lower()}", v[key])
    print(f"\n[e2e throughput] backend={backend} ring={ring} num_queues={num_queues} "
          f"seq_write={v['SEQ_WRITE_MIBPS']} MiB/s seq_read={v['SEQ_READ_MIBPS']} MiB/s "
          f"({THROUGHPUT_MIB} MiB, O_DIRECT, bs=1M, TCG) boot={res.duration:.1f}s "
          f"irqs={irqs} write_cache={v['WRITE_CACHE_INITIAL']!r}->{v['WRITE_CACHE']!r} {' '.join(getattr(be, 'notes', []))}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_blk_read_only(backend, image, sockdir):
    sock = sockdir / "blk.sock"
    _fill(image, 0, os.urandom(MiB))
    before = _sha(image, 0, IMG_SIZE)
    script = SCRIPT_PRELUDE + r"""
echo READ_SHA=$(dd if=$D bs=65536 count=16 iflag=direct 2>/dev/null | sha_of)
dd if=/dev/zero of=$D bs=4096 count=1 oflag=direct conv=notrunc 2>/tmp/err
echo WRITE_RC=$?
echo "write error: $(cat /tmp/err)"
exit 0
"""
    with g.blk_backend(backend, image, sock, read_only=True) as _be:
        res = g.run_guest(script, devices=g.blk_device_args(sock), timeout=180)
    v = res.values()
    tail = res.tail()
    assert res.exit_code == 0, tail
    assert int(v["SIZE_BYTES"]) == IMG_SIZE, tail
    assert v["RO"] == "1" and v["GETRO"] == "1", tail
    assert v["WRITE_RC"] != "0", tail
    assert v["READ_SHA"] == _sha(image, 0, MiB), tail
    assert _sha(image, 0, IMG_SIZE) == before, "read-only image was modified"


@pytest.mark.parametrize("backend", BACKENDS)
def test_blk_second_boot(backend, image, sockdir):
    """Two guests in turn on one running backend (same socket, no restart): the second one
    connects and sees what the first wrote."""
    sock = sockdir / "blk.sock"
    off, length = 5 * MiB, 128 * 1024
    write = SCRIPT_PRELUDE + rf"""
dd if=/dev/urandom of=/tmp/c bs={length} count=1 iflag=fullblock 2>/dev/null
echo DATA_SHA=$(sha_of < /tmp/c)
dd if=/tmp/c of=$D bs=65536 seek={off // 65536} count={length // 65536} oflag=direct conv=notrunc,fsync || exit 1
"""
    read = SCRIPT_PRELUDE + rf"""
echo DATA_SHA=$(dd if=$D bs=65536 skip={off // 65536} count={length // 65536} iflag=direct 2>/dev/null | sha_of)
"""
    with g.blk_backend(backend, image, sock) as be:
        first = g.run_guest(write, devices=g.blk_device_args(sock), timeout=180)
        assert first.exit_code == 0, first.tail()
        assert be.proc.poll() is None, "backend exited after the first guest disconnected"
        second = g.run_guest(read, devices=g.blk_device_args(sock), timeout=180)
        assert second.exit_code == 0, second.tail()
        assert be.proc.poll() is None, "backend exited after the second guest disconnected"
    assert int(second.value("SIZE_BYTES")) == IMG_SIZE
    sha = first.value("DATA_SHA")
    assert second.value("DATA_SHA") == sha, second.tail()
    assert _sha(image, off, length) == sha
