"""End-to-end virtio-rng: a real Linux guest (QEMU 7.2, TCG) with `vhost-user-rng-pci` on
pyvhost-rng.  The guest's virtio_rng driver becomes its hardware RNG (rng_current), the guest
reads 1 MiB from /dev/hwrng, and the bytes are checked in the guest (not constant: both halves
differ and every byte value occurs; incompressible: gzip does not shrink them) and on the host
(the backend's exit `stats` line counts at least that many entropy bytes written into guest
memory, so they came from our device and not from a fallback)."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from vhost import logfmt

from vhost.testing import guest as g

pytestmark = [pytest.mark.e2e]

_ok, _why = g.have_guest_tools()
if not _ok:
    pytestmark.append(pytest.mark.skip(reason=f"e2e guest tools missing: {_why}"))

MiB = 1 << 20

SCRIPT = r"""
echo RNG_CURRENT=$(cat /sys/class/misc/hw_random/rng_current)
head -c 1048576 /dev/hwrng > /tmp/r
echo SIZE=$(wc -c < /tmp/r)
echo GZ=$(gzip -c /tmp/r | wc -c)
echo SHA_A=$(head -c 524288 /tmp/r | sha256sum | cut -d' ' -f1)
echo SHA_B=$(tail -c 524288 /tmp/r | sha256sum | cut -d' ' -f1)
echo VALUES=$(head -c 65536 /tmp/r | od -An -tu1 -v | tr -s ' ' '\n' | grep . | sort -un | wc -l)
"""


def _serve(sock, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "vhost.programs", "pyvhost-rng",
                             "--socket-path", str(sock), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (os.path.exists(sock) and stat.S_ISSOCK(os.stat(sock).st_mode)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"pyvhost-rng did not start: {proc.communicate()[1]}")
        time.sleep(0.05)
    return proc


def _stop(proc) -> dict:
    """SIGTERM; the backend's exit `stats` line for the device, parsed."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    for line in err.splitlines():
        fields = logfmt.parse_line(line)
        if fields.get("msg") == "stats" and fields.get("device") == "rng":
            return fields
    raise AssertionError(f"no stats line in:\n{err}")


def test_guest_reads_1mib_of_entropy_from_hwrng():
    d = g.short_tmpdir()
    try:
        sock = d / "rng.sock"
        proc = _serve(sock)
        try:
            res = g.run_guest(SCRIPT, devices=["-chardev", f"socket,id=rng0,path={sock}",
                                               "-device", "vhost-user-rng-pci,chardev=rng0"],
                              timeout=240).check()
        finally:
            stats = _stop(proc)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    v = res.values()
    assert v["RNG_CURRENT"].startswith("virtio_rng"), res.tail()
    assert int(v["SIZE"]) == MiB
    assert int(v["GZ"]) >= MiB, "1 MiB of entropy must not compress"
    assert v["SHA_A"] != v["SHA_B"]
    assert int(v["VALUES"]) == 256, "every byte value occurs in 64 KiB of random data"
    assert int(stats["bytes_written"]) >= MiB
    assert int(stats["errors"]) == 0
