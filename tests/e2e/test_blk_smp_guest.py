"""The README's plain QEMU line, `-device vhost-user-blk-pci,chardev=c0` with no num-queues, at
-smp 2 and -smp 4 against `pyvhost-blk` started with its defaults.  QEMU 7.2 then asks for one
queue per vCPU and refuses a backend that offers fewer ("The maximum number of queues supported
by the backend is 1"); the guest must see one blk-mq hardware queue per vCPU and the data it
writes through them must be in the image."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from vhost.testing import guest as g

pytestmark = [pytest.mark.e2e]

_ok, _why = g.have_guest_tools()
if not _ok:
    pytestmark.append(pytest.mark.skip(reason=f"e2e guest tools missing: {_why}"))

SCRIPT = r"""
echo QUEUES=$(ls /sys/block/vda/mq | wc -l)
head -c 262144 /dev/urandom > /tmp/p
echo SHA=$(sha256sum < /tmp/p | cut -d' ' -f1)
dd if=/tmp/p of=/dev/vda bs=4096 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
echo BACK=$(head -c 262144 /dev/vda | sha256sum | cut -d' ' -f1)
"""


@pytest.mark.parametrize("cpus", [2, 4])
def test_plain_device_line_at_smp(cpus):
    d = g.short_tmpdir()
    try:
        sock, img = d / "vda.sock", d / "vda.img"
        # the README's command: no --num-queues
        proc = subprocess.Popen([sys.executable, "-m", "vhost.programs", "pyvhost-blk",
                                 "--socket-path", str(sock), "--blk-file", str(img),
                                 "--size", "64M"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not (os.path.exists(sock) and stat.S_ISSOCK(os.stat(sock).st_mode)):
                assert proc.poll() is None and time.monotonic() < deadline, \
                    proc.communicate()[1] if proc.poll() is not None else "no socket"
                time.sleep(0.05)
            res = g.run_guest(SCRIPT, cpus=cpus, timeout=300, devices=[
                "-chardev", f"socket,id=c0,path={sock}",
                "-device", "vhost-user-blk-pci,chardev=c0"]).check()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            finally:
                if proc.poll() is None:
                    proc.kill()
        v = res.values()
        assert int(v["QUEUES"]) == cpus, res.tail()
        assert v["BACK"] == v["SHA"]
        with open(img, "rb") as f:
            assert hashlib.sha256(f.read(262144)).hexdigest() == v["SHA"]
    finally:
        shutil.rmtree(d, ignore_errors=True)
