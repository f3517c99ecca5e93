"""End to end: `kill -9` of pyvhost-blk six times while a TCG guest writes and verifies its disk
in a loop, with inflight tracking (INFLIGHT_SHMFD) on -- in server mode (QEMU re-dials:
`-chardev socket,reconnect=1`, libvirt's `<reconnect enabled='yes' timeout='1'/>`) and in client
mode (QEMU listens, `server=on`; each new backend dials it), and on packed rings (`packed=on`:
QEMU cannot say where a packed ring was, the inflight region does).  Three kills come from outside at
a random moment of the loop, three are the backend's own SIGKILL at a fail point (right after a
pop, after a request's I/O, between used->idx and the inflight region's update), so requests
are certainly in flight; a new backend is started at once and takes the inflight region QEMU
kept.  The guest sees no I/O error and every verify passes; the backends
that took over say what they resubmitted, and the image holds the last pass of every slot."""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import threading
import time

import pytest

from vhost.testing import guest as g
from vhost.testing.backends import pyvhost_blk

pytestmark = [pytest.mark.e2e]

_ok, _why = g.have_guest_tools()
if not _ok:
    pytestmark.append(pytest.mark.skip(reason=f"e2e guest tools missing: {_why}"))

MiB = 1 << 20
SLOTS = 8
KILLS = 6

# Each pass writes 1 MiB of fresh random data to a slot with O_DIRECT (16 requests of 64 KiB
# in flight at once through the page-less path), reads it back and compares; the slot's
# checksum is printed so the test can check the image afterwards.
SCRIPT = r"""
D=/dev/vda
sha_of() { sha256sum | cut -d' ' -f1; }
i=0; fail=0
while [ $i -lt 600 ]; do
    slot=$((i % @SLOTS@))
    dd if=/dev/urandom of=/tmp/c bs=65536 count=16 2>/dev/null
    want=$(sha_of < /tmp/c)
    dd if=/tmp/c of=$D bs=1M seek=$slot count=1 oflag=direct conv=notrunc \
        2>/tmp/err || { echo "WRITE_FAIL $i $(cat /tmp/err)"; fail=1; }
    got=$(dd if=$D bs=1M skip=$slot count=1 iflag=direct 2>/dev/null | sha_of)
    if [ "$got" = "$want" ]; then echo "PASS $i $slot $want"; else echo "VERIFY_FAIL $i"; fail=1; fi
    i=$((i + 1))
    dd if=$D bs=512 skip=131071 count=1 iflag=direct 2>/dev/null | grep -q STOP && break
done
dmesg | grep -i "I/O error" && fail=1
echo PASSES=$i
exit $fail
"""


@pytest.mark.parametrize("mode,ring", [("server", "split"), ("client", "split"),
                                       ("server", "packed")])
def test_six_kill_9s_under_guest_write_verify(tmp_path, mode, ring):
    client = mode == "client"
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    sockdir = g.short_tmpdir("kill")
    sock = sockdir / "blk.sock"
    stack = contextlib.ExitStack()
    kills: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    rnd = random.Random(mode + ring)
    # Kills 2, 4 and 6 come from outside at a random moment; kills 1, 3 and 5 are the backend's
    # own SIGKILL at a fail point (cython_ext/ring.pyx) a random number of passes on, so that
    # some kills certainly land with requests popped and not completed, or mid-publish.
    failpoints = [f"{point}:{rnd.randint(8, 24)}" if k % 2 == 0 else None
                  for k, point in enumerate(["after-pop", "", "after-io", "", "mid-publish",
                                             ""])] + [None]
    backends = [stack.enter_context(pyvhost_blk(img, sock, client=client,
                                                failpoint=failpoints[0]))]

    def wait_connected(n):
        """Until the n-th connection is in the (shared) backend log: each kill hits a backend
        that QEMU is using."""
        deadline = time.monotonic() + 60
        while backends[0].log_text().count("frontend connected") < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU did not connect to backend {n}")
            time.sleep(0.05)

    def passes_seen(console_path) -> int:
        found = re.findall(r"^PASS (\d+) ", console_path.read_text(errors="replace"), re.M)
        return int(found[-1]) + 1 if found else 0

    def wait_passes(console_path, n):
        deadline = time.monotonic() + 180
        while passes_seen(console_path) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pass {n} not seen")
            time.sleep(0.05)

    def killer(console_path):
        try:
            for k in range(KILLS):
                wait_connected(k + 1)
                if failpoints[k] is None:
                    wait_passes(console_path, passes_seen(console_path) + 2)
                    time.sleep(rnd.uniform(0.0, 0.6))      # somewhere in the next pass
                    rc = backends[-1].kill9()
                else:                                      # it kills itself at its point
                    rc = backends[-1].proc.wait(120)
                kills.append((passes_seen(console_path), rc))
                backends.append(stack.enter_context(pyvhost_blk(
                    img, sock, client=client, failpoint=failpoints[k + 1])))
            wait_connected(KILLS + 1)
            wait_passes(console_path, passes_seen(console_path) + 4)
            # the guest stops at the end of the pass that finds STOP in the last sector
            with open(img, "r+b") as f:
                f.seek(64 * MiB - 512)
                f.write(b"STOP".ljust(512, b"\0"))
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:                         # reported by the test below
            errors.append(e)

    threads = []

    def on_start(proc, console_path):
        t = threading.Thread(target=killer, args=(console_path,), daemon=True)
        t.start()
        threads.append(t)

    try:
        res = g.run_guest(SCRIPT.replace("@SLOTS@", str(SLOTS)),
                          devices=g.blk_device_args(sock, server=client,
                                                    reconnect=None if client else 1,
                                                    extra="packed=on" if ring == "packed"
                                                    else ""),
                          timeout=420, on_start=on_start)
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert [rc for _, rc in kills] == [-9] * KILLS, kills
        out = res.script_output
        assert not re.findall(r"^(?:VERIFY|WRITE)_FAIL .*$", out, re.M), res.tail()
        assert "I/O error" not in out, res.tail()
        assert res.exit_code == 0, res.tail()
        passes = re.findall(r"^PASS (\d+) (\d+) ([0-9a-f]{64})$", out, re.M)
        assert [int(p) for p, _, _ in passes] == list(range(int(res.value("PASSES"))))
        assert len(passes) >= 2 * KILLS
        stack.close()                                      # the last backend exits 0
        log = "".join(b.log_text() for b in backends[:1])  # one log file, appended by all
        # every backend was attached (wait_connected); the last may re-dial once more after
        # the guest ended
        assert log.count("frontend connected") >= KILLS + 1, log[-4000:]
        assert "Traceback" not in log
        # every slot holds what its last pass wrote and verified
        last = {int(slot): sha for _, slot, sha in passes}
        import hashlib
        with open(img, "rb") as f:
            for slot, sha in last.items():
                f.seek(slot * MiB)
                assert hashlib.sha256(f.read(MiB)).hexdigest() == sha, slot
        resubmits = log.count("resubmitting")
        assert ("(packed virtqueues)" in log) == (ring == "packed")
        print(f"{mode}/{ring}: {len(kills)} kills after passes {[a for a, _ in kills]}; "
              f"{resubmits} restarts resubmitted in-flight requests")
        assert resubmits >= 2, log[-4000:]       # at least the after-pop and after-io kills
    finally:
        stack.close()
        shutil.rmtree(sockdir, ignore_errors=True)
