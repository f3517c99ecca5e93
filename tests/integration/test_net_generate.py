"""bench/netsource.py, pyvhost as a frame source (the reverse direction of bench/net.py's sink,
issue 13), through the real program and the frontend driver: the frames a guest receives are
the generator's, byte for byte, through the switch's flood path and the rx copy; every frame
generated is accounted for as delivered or dropped (the ring was full), none lost in between;
and the device keeps serving its tx queue meanwhile."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from bench.netsource import SRC_MAC, frame
from vhost.testing.backends import short_tmpdir
from vhost.testing.net import NetFrontend, make_frame

TIMEOUT = 30.0


@pytest.fixture
def tmp():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("pkt_len", [60, 1514])
def test_generated_frames_arrive_intact_and_are_all_counted(tmp, pkt_len):
    sock = tmp / "a.sock"
    proc = subprocess.Popen([sys.executable, "-m", "bench.netsource", "--socket-path",
                             str(sock), "--pkt-len", str(pkt_len), "--seconds", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        want = frame(pkt_len)
        assert len(want) == pkt_len and want[6:12] == SRC_MAC
        with NetFrontend(str(sock), timeout=TIMEOUT) as nf:
            got = []
            while len(got) < 500 and time.monotonic() < deadline:
                got += nf.recv_packets(500 - len(got), 5.0)
            assert len(got) >= 500
            assert all(p.frame == want for p in got), [len(p.frame) for p in got[:5]]
            # the port's tx side still works while its rx ring is flooded
            nf.send(make_frame(100))
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["delivered"] >= 500
    # one port to flood to: each generated frame was either copied into the ring or dropped
    assert line["generated"] == line["delivered"] + line["dropped"], line
    assert line["generate_seconds"] > 0
