"""Integration: client mode (`--client`, `mode = "client"`): pyvhost-blk connects to the socket
the frontend listens on (QEMU's `-chardev socket,server=on`, libvirt's mode='server'), and
re-dials with bounded back-off before the frontend is there and after every disconnect --
orderly (GET_VRING_BASE) or abrupt -- so that neither side has to be restarted for the other.
Under asyncio and uvloop; the frontend driver plays QEMU with `listen=True`."""
from __future__ import annotations

import os
import time

from protocols import virtio_blk as vb
from vhost.testing.backends import pyvhost_blk
from vhost.testing.blk import Frontend

IMG_SIZE = 16 << 20


def test_client_dials_until_the_frontend_listens_and_after_every_disconnect(tmp, loop_name):
    img = tmp / "disk.img"
    img.write_bytes(bytes(IMG_SIZE))
    sock = tmp / "qemu.sock"                       # the frontend's socket: nobody listens yet
    with pyvhost_blk(img, sock, client=True, num_queues=2,
                     extra=("--loop", loop_name)) as b:
        time.sleep(1.0)                            # the backend dials and backs off meanwhile
        assert b.proc.poll() is None
        written = {}
        for round_ in range(4):
            fe = Frontend(str(sock), listen=True, num_queues=2, timeout=10)
            t0 = time.monotonic()
            fe.connect()                           # accepts the backend's connection
            waited = time.monotonic() - t0
            # bounded back-off: a frontend that starts listening is found within ~2 s
            assert waited < 6, waited
            try:
                for sector, data in written.items():   # what earlier connections wrote
                    st, got = fe.read(sector, len(data), queue=round_ % 2)
                    assert st == vb.S_OK and got == data, sector
                data = os.urandom(8192)
                sector = 64 * (round_ + 1)
                assert fe.write(sector, data, queue=round_ % 2) == vb.S_OK
                written[sector] = data
            finally:
                if round_ % 2:
                    fe.close()                     # orderly: rings stopped, then the socket
                else:
                    fe._release()                  # abrupt: QEMU killed
            time.sleep(0.3)
        time.sleep(0.5)                            # SIGTERM while dialing: a clean exit 0
    log = b.log_text()
    assert "Traceback" not in log
    assert log.count("frontend connected") == 4
    # one line per outage, not one per retry
    assert log.count("no frontend at") <= 5, log.count("no frontend at")
    with open(img, "rb") as f:
        for sector, data in written.items():
            f.seek(sector * 512)
            assert f.read(len(data)) == data
