"""End to end: live migration of a guest NIC on pyvhost-net.  Guest A streams TCP over the
backend's switch to guest B; while it does, A live-migrates from a QEMU on switch port `a` to a
second QEMU on port `a2` (same MAC).  After the switch-over the destination QEMU sends SEND_RARP
(pyvhost does not offer GUEST_ANNOUNCE), the switch floods the RARP announcement to every port
-- a sniffing port driven by the frontend driver sees it -- and learns A's MAC on `a2`, so B's
acknowledgements find A again: the stream completes and its checksum on B is the one A computed
before sending.  Only TEST-NET-1 addresses and locally administered MACs; bounded in time."""
from __future__ import annotations

import concurrent.futures
import re
import shutil
import threading
import time

import pytest

from vhost.testing import guest as g
from vhost.testing.migrate import MigrationRun
from vhost.testing.net import NetFrontend
from vhost.testing.netbackends import pyvhost_net

pytestmark = [pytest.mark.e2e]

_ok, _why = g.have_guest_tools()
if not _ok:
    pytestmark.append(pytest.mark.skip(reason=f"e2e guest tools missing: {_why}"))

A_ADDR, B_ADDR = "192.0.2.21", "192.0.2.22"
PORT = 5007
CHUNKS, CHUNK_KIB, PAUSE_US = 160, 64, 100000      # 10 MiB, paced over >= 16 s
A_MAC = g.mac_address(21)
SNIFF_MAC = bytes.fromhex("02ee00000021")
ETH_P_RARP = 0x8035

SCRIPT_A = g.NET_SCRIPT_HELPERS + rf"""
fail=0
net_up {A_ADDR}/24 || {{ echo FAIL=1; exit 1; }}
wait_ping {B_ADDR} 90 || {{ echo "peer {B_ADDR} unreachable"; exit 1; }}
dd if=/dev/urandom of=/tmp/tx bs={CHUNK_KIB}k count={CHUNKS} 2>/dev/null
echo TX_SHA=$(sha_of < /tmp/tx)
echo STREAMING
n=0
while [ $n -lt 20 ]; do      # B's listener may still be starting
    n=$((n + 1))
    ( i=0; while [ $i -lt {CHUNKS} ]; do
        dd if=/tmp/tx bs={CHUNK_KIB}k skip=$i count=1 2>/dev/null; i=$((i + 1)); usleep {PAUSE_US}
      done ) | timeout 240 nc {B_ADDR} {PORT} && break
    sleep 1
done
echo NC_TRIES=$n
echo STREAM_DONE
exit $fail
"""

# B's nc reads stdin from a FIFO nobody writes (never EOF: see test_net_guest.py)
SCRIPT_B = g.NET_SCRIPT_HELPERS + rf"""
net_up {B_ADDR}/24 || {{ echo FAIL=1; exit 1; }}
mkfifo /tmp/hold
timeout 300 nc -l -p {PORT} 0<>/tmp/hold > /tmp/rx
echo NC_RX_RC=$?
echo RX_BYTES=$(wc -c < /tmp/rx)
echo RX_SHA=$(sha_of < /tmp/rx)
exit 0
"""


def test_net_guest_migrates_between_switch_ports_and_its_stream_survives(tmp_path):
    sockdir = g.short_tmpdir("nmig")
    socks = {k: sockdir / f"{k}.sock" for k in ("a", "a2", "b", "s")}
    g.base_initramfs()
    stop = threading.Event()
    sniffed = []
    try:
        with pyvhost_net([socks[k] for k in ("a", "a2", "b", "s")], switch="sw0") as be, \
                NetFrontend(socks["s"], mac=SNIFF_MAC, timeout=10) as sniffer:

            def sniff():
                deadline = time.monotonic() + 400
                while not stop.is_set() and time.monotonic() < deadline:
                    sniffed.extend(p.frame for p in sniffer.drain(quiet=0.2, limit=256))

            t = threading.Thread(target=sniff, daemon=True)
            t.start()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                fb = pool.submit(g.run_guest, SCRIPT_B, timeout=400,
                                 devices=g.vhost_user_net_args(socks["b"], mac=g.mac_address(22)))
                with MigrationRun(SCRIPT_A,
                                  source_devices=g.vhost_user_net_args(socks["a"], mac=A_MAC),
                                  dest_devices=g.vhost_user_net_args(socks["a2"], mac=A_MAC)
                                  ) as run:
                    run.start()
                    run.wait_console("source", "STREAMING\n", timeout=180)
                    time.sleep(2.0)                        # the stream is under way
                    run.start_migration(max_bandwidth=64 << 20)
                    stats = run.wait_migration(timeout=240)
                    src, dst, rc = run.wait(timeout=300)
                rb = fb.result(timeout=120)
            stop.set()
            t.join(30)
            log = be.log_text()
        vb = rb.values()
        ctx = (f"A source:\n{g.tail(src, 20)}\nA dest:\n{g.tail(dst, 30)}\nB:\n{rb.tail(20)}"
               f"\nbackend:\n{g.tail(log, 30)}")
        assert stats.get("status") == "completed", stats
        assert "STREAMING" in src and "STREAM_DONE" in dst and "STREAM_DONE" not in src, ctx
        assert rc == 0 and rb.exit_code == 0, ctx
        tx_sha = re.search(r"^TX_SHA=(\w+)$", src, re.M).group(1)
        assert vb["NC_RX_RC"] == "0", ctx
        assert int(vb["RX_BYTES"]) == CHUNKS * CHUNK_KIB * 1024, ctx
        assert vb["RX_SHA"] == tx_sha, ctx
        # the announcement QEMU asked for (SEND_RARP), flooded to the other ports
        mac = bytes.fromhex(A_MAC.replace(":", ""))
        rarps = [f for f in sniffed if len(f) >= 14 and f[12:14] == ETH_P_RARP.to_bytes(2, "big")
                 and f[6:12] == mac]
        assert rarps, f"no RARP from {A_MAC} among {len(sniffed)} sniffed frames\n{ctx}"
        assert rarps[0][:6] == b"\xff" * 6
        print(f"net migration: {stats['ram']['dirty-sync-count']} rounds, downtime "
              f"{stats.get('downtime')} ms; {int(vb['RX_BYTES']) >> 20} MiB stream intact; "
              f"{len(rarps)} RARP frame(s) seen on the sniffing port")
    finally:
        stop.set()
        shutil.rmtree(sockdir, ignore_errors=True)
