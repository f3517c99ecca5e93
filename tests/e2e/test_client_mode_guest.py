"""End to end: pyvhost-blk in client mode (`--client`) with QEMU listening
(`-chardev socket,server=on,wait=off`, what libvirt's `<source mode='server'>` gives): the
backend dials QEMU, the guest writes and verifies its disk in a loop, and the backend is
restarted twice while it does -- nothing is done on QEMU's side -- and the guest goes on without
an I/O error or a failed verify.  (Restarts by SIGTERM: in-flight requests complete first.  A
kill -9 with requests in flight needs inflight tracking to be safe.)"""
from __future__ import annotations

import contextlib
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
SLOTS = 16
DURATION = 30           # guest uptime (s) until which passes run

SCRIPT = r"""
D=/dev/vda
sha_of() { sha256sum | cut -d' ' -f1; }
up() { cut -d. -f1 /proc/uptime; }
i=0; fail=0
while [ $(up) -lt @DURATION@ ] || [ $i -lt 24 ]; do
    slot=$((i % @SLOTS@))
    dd if=/dev/urandom of=/tmp/c bs=65536 count=16 2>/dev/null
    want=$(sha_of < /tmp/c)
    dd if=/tmp/c of=$D bs=65536 seek=$((slot * 16)) count=16 oflag=direct conv=notrunc \
        2>/tmp/err || { echo "WRITE_FAIL $i $(cat /tmp/err)"; fail=1; }
    got=$(dd if=$D bs=65536 skip=$((slot * 16)) count=16 iflag=direct 2>/dev/null | sha_of)
    if [ "$got" = "$want" ]; then echo "PASS $i"; else echo "VERIFY_FAIL $i"; fail=1; fi
    i=$((i + 1))
done
dmesg | grep -i "I/O error" && fail=1
echo PASSES=$i
exit $fail
"""


def test_client_mode_backend_restarts_under_a_listening_qemu(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    sockdir = g.short_tmpdir("cli")
    sock = sockdir / "qemu-blk.sock"
    stack = contextlib.ExitStack()
    restarts: list[int] = []
    errors: list[BaseException] = []
    backend = [stack.enter_context(pyvhost_blk(img, sock, client=True))]

    def restarter(console_path):
        """After passes 4 and 12: SIGTERM the backend (it exits 0: _managed checks) and start a
        new one, which dials QEMU again."""
        try:
            for at in (4, 12):
                deadline = time.monotonic() + 120
                while f"PASS {at}\n" not in console_path.read_text(errors="replace"):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"PASS {at} not seen")
                    time.sleep(0.1)
                stack.close()                        # SIGTERM, in-flight I/O completes, exit 0
                backend[0] = stack.enter_context(pyvhost_blk(img, sock, client=True))
                restarts.append(at)
        except BaseException as e:                   # reported by the test below
            errors.append(e)

    threads = []

    def on_start(proc, console_path):
        t = threading.Thread(target=restarter, args=(console_path,), daemon=True)
        t.start()
        threads.append(t)

    try:
        res = g.run_guest(SCRIPT.replace("@DURATION@", str(DURATION))
                          .replace("@SLOTS@", str(SLOTS)),
                          devices=g.blk_device_args(sock, server=True), timeout=240,
                          on_start=on_start)
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert restarts == [4, 12]
        out = res.script_output
        assert not re.findall(r"^(?:VERIFY|WRITE)_FAIL .*$", out, re.M), res.tail()
        assert "I/O error" not in out, res.tail()
        assert res.exit_code == 0, res.tail()
        passes = [int(p) for p in re.findall(r"^PASS (\d+)$", out, re.M)]
        assert passes == list(range(int(res.value("PASSES")))) and len(passes) > 12
        stack.close()                               # the last backend exits 0 on SIGTERM too
        log = backend[0].log_text()                 # the three backends' log, appended
        # each of the three backends was attached (a last one may also have re-dialed QEMU
        # between the guest's end and its SIGTERM)
        assert log.count("frontend connected") >= 3 and "Traceback" not in log
    finally:
        stack.close()
        shutil.rmtree(sockdir, ignore_errors=True)
