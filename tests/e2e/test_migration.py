"""End to end: live migration of a TCG guest whose disk is a pyvhost-blk device, to a second QEMU
on a second pyvhost-blk over the same image (shared storage), as an operator draining a host
does.  The guest writes and verifies 1 MiB slots in a loop (busybox dd with O_DIRECT and
sha256sum: fio's dependencies are 80 MB of libraries, too much for an initramfs that is
migrated).  The migration runs with a bandwidth cap so that it takes several dirty-sync rounds
while the guest keeps reading into its page cache and into fresh buffers, i.e. while pyvhost
writes guest pages that only its dirty log tells QEMU about; then the guest idles so that the
migration converges, and checks on the destination that its page cache holds what it wrote
(pages the device wrote after QEMU had sent them arrive stale unless they were logged).
Checked: every page the source's pyvhost wrote (a copy of its dirty-log bits,
PYVHOST_LOG_SHADOW) is the same on both sides once the migration completed (the destination
is held paused for the comparison); the migration completes in more than one round, after the
I/O phase; every verify
pass on both sides succeeds; I/O goes on on the destination; the image holds what the guest
last wrote after both backends stop.  1 queue at -smp 1 and 2 queues at -smp 2."""
from __future__ import annotations

import contextlib
import hashlib
import re
import shutil

import pytest

from vhost.testing import guest as g
from vhost.testing.backends import pyvhost_blk
from vhost.testing.migrate import MigrationRun, shadow_pages

pytestmark = [pytest.mark.e2e]

_ok, _why = g.have_guest_tools()
if not _ok:
    pytestmark.append(pytest.mark.skip(reason=f"e2e guest tools missing: {_why}"))

MiB = 1 << 20
IMG_SIZE = 64 * MiB
SLOTS = 16
# Guest uptime (s) at the end of phase 1 (I/O while the migration runs; it starts after the
# third pass, ~7 s) and of phase 2 (idle: the migration converges and switches over).
P1, P2 = 20, 40
BANDWIDTH = 8 << 20
# Debian's kernel zeroes every page it allocates (init_on_alloc): a page-cache page is then
# written by the CPU (and marked dirty by QEMU itself) a moment before the device fills it, which
# hides a missing dirty log almost always.  Without it the device writes pages whose old contents
# QEMU may already have sent: only the log tells it to send them again.
NO_ZEROING = "init_on_alloc=0"

SCRIPT = r"""
D=/dev/vda
# held open to the end: the last close of a block device drops its page cache
exec 3<$D
sha_of() { sha256sum | cut -d' ' -f1; }
up() { cut -d. -f1 /proc/uptime; }
fail=0
pass_() {  # one write + verify pass over slot $(( $1 % SLOTS ))
    slot=$(($1 % @SLOTS@))
    mask=$((1 << ($1 % @CPUS@)))
    dd if=/dev/urandom of=/tmp/c bs=65536 count=16 2>/dev/null
    want=$(sha_of < /tmp/c)
    echo $want > /tmp/want_$slot
    taskset $mask dd if=/tmp/c of=$D bs=65536 seek=$((slot * 16)) count=16 oflag=direct \
        conv=notrunc 2>/tmp/err || { echo "WRITE_FAIL $1 $(cat /tmp/err)"; fail=1; }
    # buffered: the device writes page-cache pages, which stay in guest RAM and which only
    # the dirty log tells QEMU to send again; O_DIRECT: into the fresh buffer of a new dd
    cached=$(taskset $mask dd if=$D bs=65536 skip=$((slot * 16)) count=16 2>/dev/null | sha_of)
    direct=$(taskset $mask dd if=$D bs=65536 skip=$((slot * 16)) count=16 iflag=direct \
        2>/dev/null | sha_of)
    if [ "$cached" = "$want" ] && [ "$direct" = "$want" ]; then echo "PASS $1"
    else echo "VERIFY_FAIL $1 cached=$cached direct=$direct want=$want"; fail=1; fi
}
# phase 1 (the migration starts here): the device keeps writing guest pages
i=0
while [ $(up) -lt @P1@ ] || [ $i -lt 4 ]; do pass_ $i; i=$((i + 1)); done
echo PHASE2
# phase 2: no I/O: the migration converges and switches over
while [ $(up) -lt @P2@ ]; do sleep 1; done
echo PHASE3
# the page cache the device filled in phase 1 (on the source, during the migration rounds)
# must hold what was written: read from the cache, no I/O
r0=$(awk '{print $1}' /sys/block/vda/stat)
s=0
while [ $s -lt @SLOTS@ ]; do
    if [ -e /tmp/want_$s ]; then
        c=$(dd if=$D bs=65536 skip=$((s * 16)) count=16 2>/dev/null | sha_of)
        [ "$c" = "$(cat /tmp/want_$s)" ] || { echo "CACHE_FAIL $s"; fail=1; }
    fi
    s=$((s + 1))
done
echo CACHE_READ_IOS=$(( $(awk '{print $1}' /sys/block/vda/stat) - r0 ))
# phase 3: I/O goes on on the destination
k=0
while [ $k -lt 8 ]; do pass_ $i; i=$((i + 1)); k=$((k + 1)); done
sync
s=0
while [ $s -lt @SLOTS@ ]; do
    echo SLOT_SHA_$s=$(dd if=$D bs=65536 skip=$((s * 16)) count=16 iflag=direct 2>/dev/null \
        | sha_of)
    s=$((s + 1))
done
echo PASSES=$i
exit $fail
"""


# QEMU 7.2's TCG migration loses guest writes by itself: bench/migration_ramdiff.py pauses the
# destination after the switch-over and compares both sides' RAM page by page, and pages the
# guest's CPU wrote (jiffies, timer lists, kernel pointers) arrive stale with QEMU's own
# virtio-blk too, no vhost-user in the process (4 of 8 runs; once 19 pages, and the destination
# guest died in its timer code, as 4 of 16 packed runs here did in stop 18, and a split run in
# stop 19's fresh-ci).  With pyvhost, the pages lost were almost never pages its device wrote
# (the source backend keeps a copy of every dirty-log bit it sets, PYVHOST_LOG_SHADOW: 0 of 65
# lost pages over 16 runs, and 0 of 27 and of 20 in two fresh-ci runs; once, under a heavy load,
# 5 were -- the kernel reuses page-cache pages for its own data, so a page can be in both sets).  So this test holds the destination paused at the switch-over, compares
# the two sides' RAM, and a guest that then fails on the destination is an expected failure
# only when the migration lost pages the device never wrote; otherwise it fails.
@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("queues", [1, 2])
def test_guest_migrates_between_two_pyvhost_backends(tmp_path, monkeypatch, queues, ring):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    sockdir = g.short_tmpdir("migs")
    extra = "packed=on" if ring == "packed" else ""
    script = (SCRIPT.replace("@P1@", str(P1)).replace("@P2@", str(P2))
              .replace("@SLOTS@", str(SLOTS)).replace("@CPUS@", str(queues)))
    shadow = tmp_path / "device-pages.bin"
    lost: list[int] = []
    try:
        with contextlib.ExitStack() as stack:
            monkeypatch.setenv("PYVHOST_LOG_SHADOW", str(shadow))      # the source only
            src_be = stack.enter_context(pyvhost_blk(img, sockdir / "src.sock",
                                                     num_queues=queues))
            monkeypatch.delenv("PYVHOST_LOG_SHADOW")
            dst_be = stack.enter_context(pyvhost_blk(img, sockdir / "dst.sock",
                                                     num_queues=queues))
            run = stack.enter_context(MigrationRun(
                script, cpus=queues, extra_append=NO_ZEROING, pause_destination=True,
                source_devices=g.blk_device_args(src_be.sock, queues, extra=extra),
                dest_devices=g.blk_device_args(dst_be.sock, queues, extra=extra)))
            run.start()
            run.wait_console("source", "PASS 2\n", timeout=120)
            # no switch-over while the guest does I/O (a 1 ms downtime never fits) ...
            run.start_migration(max_bandwidth=BANDWIDTH, downtime_limit_ms=1)
            run.wait_console("source", "PHASE2\n", timeout=P1 + 120)
            # ... then the guest idles and QEMU may stop it for up to 300 ms
            run.set_parameters(**{"downtime-limit": 300})
            stats = run.wait_migration(timeout=240)
            lost = run.ram_diff()
            device = shadow_pages(shadow)
            assert device, "the source's device logged no page while migrating"
            run.resume_destination()
            try:
                src_console, dst_console, rc = run.wait(timeout=P2 + 180)
            except g.GuestError as e:
                _qemu_lost(lost, device, e)
                raise
        try:
            _check(img, stats, src_console, dst_console, rc, src_be, dst_be, ring)
        except AssertionError as e:
            _qemu_lost(lost, device, e)
            raise
        ram = stats["ram"]
        print(f"migration ({queues} queue(s), {ring}): {ram['dirty-sync-count']} rounds, "
              f"{ram['transferred'] >> 20} MiB, downtime {stats.get('downtime')} ms; "
              f"{len(device)} pages written by the device; {len(lost)} pages differ after it "
              f"({len(device & set(lost))} of them pages the device had written)")
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def _qemu_lost(lost: list[int], device: set[int], e: BaseException) -> None:
    """The guest failed on the destination: an expected failure when the migration lost pages
    the device never wrote (QEMU's TCG dirty tracking; see above).  Lost pages that are all
    the device's would be pyvhost's dirty log: that failure stands.  (A page the device wrote
    and the kernel then reused is in both sets, which is why only device-only losses count.)"""
    cpu_only = [p for p in lost if p not in device]
    if cpu_only:
        pytest.xfail(f"QEMU 7.2 TCG migration lost {len(lost)} guest pages, {len(cpu_only)} "
                     f"never written by the device ({[hex(p) for p in cpu_only[:6]]}), then: "
                     f"{str(e).splitlines()[0][:200]}")


def _check(img, stats, src_console, dst_console, rc, src_be, dst_be, ring) -> None:
    """The guest's and the image's side of a migration that completed."""
    passes_src = re.findall(r"^PASS (\d+)$", src_console, re.M)
    passes_dst = re.findall(r"^PASS (\d+)$", dst_console, re.M)
    failures = re.findall(r"^(?:VERIFY|WRITE|CACHE)_FAIL .*$", src_console + dst_console,
                          re.M)
    assert not failures, (failures, g.tail(dst_console))
    assert rc == 0, g.tail(dst_console)
    # the switch-over came after the I/O of phase 1 and before phase 3
    assert "PHASE2" in src_console and "PHASE3" in dst_console, (g.tail(src_console),
                                                                  g.tail(dst_console))
    ram = stats["ram"]
    assert ram["dirty-sync-count"] >= 2, stats          # several rounds
    assert len(passes_src) >= 4 and len(passes_dst) == 8, (len(passes_src),
                                                             len(passes_dst))
    total = int(re.search(r"^PASSES=(\d+)$", dst_console, re.M).group(1))
    seen = sorted(int(p) for p in passes_src + passes_dst)
    assert seen == list(range(total)), seen             # every pass once, none lost
    # the image after both backends stopped: what the guest last wrote, slot by slot
    with open(img, "rb") as f:
        for s in range(SLOTS):
            want = re.search(rf"^SLOT_SHA_{s}=(\w+)$", dst_console, re.M).group(1)
            assert hashlib.sha256(f.read(MiB)).hexdigest() == want, s
    for be in (src_be, dst_be):
        assert "Traceback" not in be.log_text()
        # the ring layout QEMU negotiated on both sides
        assert ("(packed virtqueues)" in be.log_text()) == (ring == "packed")
    # the cache check was served by the page cache alone (no read reached the device)
    assert re.search(r"^CACHE_READ_IOS=0$", dst_console, re.M), g.tail(dst_console)

