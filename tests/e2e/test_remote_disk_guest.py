"""End to end: a TCG guest whose disk is a pyvhost-blk device on shared storage -- a Ceph RBD
image (a throwaway one-node cluster, vhost/testing/ceph.py) or an NBD export (qemu-nbd on an
image file, vhost/testing/nbdserver.py) -- 1 queue at -smp 1 and 2 queues at -smp 2.  The guest
runs fio random write + verify (crc32c, libaio, O_DIRECT, QD 16, one job per vCPU on its own
region), then writes and verifies 1 MiB slots in a loop (busybox dd with O_DIRECT from every
vCPU, sha256sum), flushes, discards a slot with blkdiscard and reads it back as zeroes;
afterwards the store (`rbd export`, the exported file) holds what every slot's last pass
verified."""
from __future__ import annotations

import hashlib
import re
import shutil

import pytest

from vhost.testing import guest as g
from vhost.testing.backends import pyvhost_blk
from vhost.testing.nbdserver import NbdServer

pytestmark = [pytest.mark.e2e]

_ok, _why = g.have_guest_tools()
if not _ok:
    pytestmark.append(pytest.mark.skip(reason=f"e2e guest tools missing: {_why}"))

MiB = 1 << 20
SLOTS = 8
PASSES = 24

SCRIPT = r"""
D=/dev/vda
sha_of() { sha256sum | cut -d' ' -f1; }
fail=0
/usr/bin/fio --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
    --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting @FIO_JOBS@ \
    > /tmp/fio.out 2>&1
echo FIO_RC=$?
grep -E "err=|verify" /tmp/fio.out | head -5
i=0
while [ $i -lt @PASSES@ ]; do
    slot=$((i % @SLOTS@))
    dd if=/dev/urandom of=/tmp/c bs=65536 count=16 2>/dev/null
    want=$(sha_of < /tmp/c)
    taskset $((1 << (i % @CPUS@))) dd if=/tmp/c of=$D bs=1M seek=$slot count=1 oflag=direct \
        conv=notrunc 2>/tmp/err || { echo "WRITE_FAIL $i $(cat /tmp/err)"; fail=1; }
    got=$(taskset $((1 << ((i + 1) % @CPUS@))) dd if=$D bs=1M skip=$slot count=1 iflag=direct \
        2>/dev/null | sha_of)
    if [ "$got" = "$want" ]; then echo "PASS $i $slot $want"; else echo "VERIFY_FAIL $i"; fail=1; fi
    i=$((i + 1))
done
sync
# the slot after the last one: written, discarded, read back as zeroes
dd if=/dev/urandom of=$D bs=1M seek=@SLOTS@ count=1 oflag=direct conv=notrunc 2>/dev/null
blkdiscard -o $((@SLOTS@ * 1048576)) -l 1048576 $D || { echo "DISCARD_FAIL"; fail=1; }
z=$(dd if=$D bs=1M skip=@SLOTS@ count=1 iflag=direct 2>/dev/null | sha_of)
zero=$(dd if=/dev/zero bs=1M count=1 2>/dev/null | sha_of)
[ "$z" = "$zero" ] && echo DISCARD_ZEROES || { echo "DISCARD_NOT_ZERO"; fail=1; }
dmesg | grep -i "I/O error" && fail=1
echo PASSES=$i
exit $fail
"""


@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("store", [pytest.param("rbd", marks=pytest.mark.ceph), "nbd"])
def test_guest_write_verify_on_shared_storage(request, tmp_path, store, queues):
    sockdir = g.short_tmpdir("rdg")
    # one fio job per vCPU, each on its own 16 MiB region past the dd slots
    jobs = " ".join(f"--name=j{k} --filename=/dev/vda --offset={16 + 16 * k}M --size=16M "
                    f"--cpus_allowed={k}" for k in range(queues))
    script = (SCRIPT.replace("@SLOTS@", str(SLOTS)).replace("@PASSES@", str(PASSES))
              .replace("@CPUS@", str(queues)).replace("@FIO_JOBS@", jobs))
    if store == "rbd":
        cluster = request.getfixturevalue("ceph_cluster")
        spec = cluster.create_image(f"guest{queues}", 64 * MiB)
        args = cluster.pyvhost_args(spec)
        nbd = None
    else:
        img = tmp_path / "disk.img"
        with open(img, "wb") as f:
            f.truncate(64 * MiB)
        nbd = NbdServer("qemu-nbd", sockdir / "nbd.sock", image=img).start()
        args = ["--nbd", nbd.uri]
    try:
        with pyvhost_blk(None, sockdir / "blk.sock", num_queues=queues, extra=args) as b:
            res = g.run_guest(script, devices=g.blk_device_args(b.sock, queues), cpus=queues,
                              timeout=420, mem="512M",       # fio's libraries: ~85 MB
                              extra_files=g.binary_with_libs("/usr/bin/fio"))
        log = b.log_text()
    finally:
        if nbd is not None:
            nbd.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    out = res.script_output
    assert "FIO_RC=0" in out, res.tail()                   # fio wrote and verified
    assert not re.findall(r"^(?:VERIFY|WRITE|DISCARD)_FAIL.*$|^DISCARD_NOT_ZERO$", out, re.M), \
        res.tail()
    assert "I/O error" not in out and res.exit_code == 0, res.tail()
    passes = re.findall(r"^PASS (\d+) (\d+) ([0-9a-f]{64})$", out, re.M)
    assert [int(p) for p, _, _ in passes] == list(range(PASSES))
    assert "DISCARD_ZEROES" in out
    assert log and "Traceback" not in log
    if store == "rbd":
        export = tmp_path / "export.img"
        cluster.rbd("export", spec, str(export))
        data = export.read_bytes()
    else:
        data = img.read_bytes()
    last = {int(slot): sha for _, slot, sha in passes}
    for slot, sha in last.items():
        assert hashlib.sha256(data[slot * MiB:(slot + 1) * MiB]).hexdigest() == sha, slot
    assert data[SLOTS * MiB:(SLOTS + 1) * MiB] == bytes(MiB)


RESIZE_SCRIPT = r"""
D=/dev/vda
echo SIZE $(cat /sys/block/vda/size)
i=0
while [ $i -lt 600 ] && [ $(cat /sys/block/vda/size) -eq @OLD@ ]; do sleep 0.1; i=$((i + 1)); done
echo RESIZED $(cat /sys/block/vda/size)
# the new space is usable: 1 MiB past the old end, written and read back
dd if=/dev/urandom of=/tmp/c bs=65536 count=16 2>/dev/null
dd if=/tmp/c of=$D bs=1M seek=@OLDMIB@ count=1 oflag=direct conv=notrunc 2>/dev/null \
    || echo WRITE_FAIL
[ "$(dd if=$D bs=1M skip=@OLDMIB@ count=1 iflag=direct 2>/dev/null | sha256sum)" = \
  "$(sha256sum < /tmp/c)" ] && echo BEYOND_OK || echo BEYOND_FAIL
dmesg | grep -i "capacity change" | tail -1
"""


@pytest.mark.ceph
def test_an_rbd_resize_reaches_the_guest(ceph_cluster):
    """`rbd resize` while the guest runs: librbd's header watch wakes pyvhost, which sends
    VHOST_USER_BACKEND_CONFIG_CHANGE_MSG; QEMU 7.2's vhost-user-blk re-reads the config and
    tells the guest, whose disk grows."""
    import threading
    import time
    spec = ceph_cluster.create_image("resize", 64 * MiB)
    sockdir = g.short_tmpdir("rsz")
    script = (RESIZE_SCRIPT.replace("@OLD@", str(64 * MiB // 512))
              .replace("@OLDMIB@", "64"))
    errors = []

    def resize_when_booted(proc, console_path):
        def body():
            try:
                deadline = time.monotonic() + 120
                while "SIZE " not in console_path.read_text(errors="replace"):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the guest did not boot")
                    time.sleep(0.1)
                ceph_cluster.rbd("resize", "--size", "128M", spec)
            except BaseException as e:              # reported below
                errors.append(e)
        threading.Thread(target=body, daemon=True).start()

    try:
        with pyvhost_blk(None, sockdir / "blk.sock",
                         extra=ceph_cluster.pyvhost_args(spec)) as b:
            res = g.run_guest(script, devices=g.blk_device_args(b.sock, 1), timeout=240,
                              on_start=resize_when_booted)
        log = b.log_text()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    assert not errors, errors
    out = res.script_output
    assert f"RESIZED {128 * MiB // 512}" in out, res.tail()
    assert "BEYOND_OK" in out and "WRITE_FAIL" not in out, res.tail()
    assert "resized: 131072 -> 262144 sectors" in log and "CONFIG_CHANGE_MSG" in log, log[-2000:]
