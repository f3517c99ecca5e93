"""vhost/testing/net.py's NetFrontend against the C reference backend: DPDK's own vhost-user net
backend (``dpdk-testpmd --vdev net_vhost0,iface=S1 --vdev net_vhost1,iface=S2``, io forwarding
port 0 <-> port 1).  Frames a NetFrontend sends on S1 come out of the NetFrontend on S2 and vice
versa, so this checks the driver side (rings, rx buffer posting and refill, mergeable-buffer
reassembly, big non-mergeable chains, indirect and scatter-gather tx, multi-queue) without our
backend.  Needs dpdk-testpmd (Debian dpdk-dev) and 2 MiB hugepages; skipped otherwise.

DPDK 22.11 behaviours these tests account for (seen, not assumed):
- net_vhost offers HOST_TSO4/6 only with the ``tso=1`` devarg; GUEST_TSO4/6 and MRG_RXBUF always.
- With the default (compliant) offload flags, a NEEDS_CSUM frame comes out with the TCP checksum
  completed in software and an all-zero virtio_net_hdr (the GSO metadata is lost); with
  ``legacy-ol-flags=1`` the header survives (NEEDS_CSUM, TCPV4, gso_size) and the checksum field
  is rewritten to the pseudo-header sum *without* the length (DPDK's TSO convention).
- Without MRG_RXBUF it leaves num_buffers unwritten (the spec says it must be 1).
- It serves no GET_CONFIG (protocol feature CONFIG is not offered), so the config is synthesized.
"""
from __future__ import annotations

import contextlib
import struct
import time
from pathlib import Path

import pytest

from protocols import virtio_net as vnet
from vhost.testing.net import (NetFrontend, make_frame, ones_sum, tcp4_csum_ok, tcp4_frame,
                               tcp4_gso_hdr)

try:
    from vhost.testing import dpdk
except ImportError:  # pragma: no cover - the harness is part of the repository
    dpdk = None

pytestmark = pytest.mark.dpdk

MAC_A = bytes.fromhex("020000000a01")
MAC_B = bytes.fromhex("020000000b02")
IP_A, IP_B = "192.0.2.1", "192.0.2.2"
SIZES = (60, 61, 64, 65, 127, 128, 256, 511, 512, 1000, 1023, 1024, 1500, 1513, 1514)
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def dpdk_ok():
    if dpdk is None:
        pytest.skip("vhost/testing/dpdk.py (the testpmd harness) is missing")
    ok, why = dpdk.dpdk_available()
    if not ok:
        pytest.skip(f"DPDK unavailable: {why}")


@contextlib.contextmanager
def pmd_pair(sockdir: Path, queues: int = 1, extra_vdev: str = ""):
    """testpmd with two net_vhost ports forwarding io between them; yields (pmd, s1, s2)."""
    s1, s2 = sockdir / "s1", sockdir / "s2"
    with dpdk.vhost_backend([s1, s2], queues=queues, fwd="io", extra_vdev=extra_vdev,
                            log_path=sockdir / "testpmd.log") as pmd:
        yield pmd, s1, s2


def exchange(tx: NetFrontend, rx: NetFrontend, frames: list[bytes], pair: int = 0,
             batch: int = 64) -> list:
    """Send `frames` from tx (on `pair`) in batches the receiver's ring can hold and collect
    them at rx; every wait bounded."""
    got = []
    batch = max(1, min(batch, rx.rx_frames_capacity(pair, max(map(len, frames)))))
    for i in range(0, len(frames), batch):
        chunk = frames[i:i + batch]
        assert tx.send_many(chunk, pair=pair) == len(chunk)
        pkts = rx.recv_packets(len(chunk), timeout=TIMEOUT)
        assert len(pkts) == len(chunk), (
            f"{len(pkts)}/{len(chunk)} frames of batch {i // batch} arrived; "
            f"tx {tx.describe()}; rx {rx.describe()}")
        got += pkts
    tx.wait_tx(TIMEOUT)
    return got


def check_same(sent: list[bytes], got: list) -> None:
    assert len(got) == len(sent)
    for k, (s, p) in enumerate(zip(sent, got)):
        assert len(p.frame) == len(s), f"frame {k}: {len(p.frame)} bytes, sent {len(s)}"
        assert p.frame == s, f"frame {k} ({len(s)} B) corrupted"


# ---------------------------------------------------------------------------------------------

LAYOUTS = {
    "mrg-evidx-indirect": dict(mrg_rxbuf=True, event_idx=True, indirect=True),
    "nomrg-noevidx-direct": dict(mrg_rxbuf=False, event_idx=False, indirect=False,
                                 queue_size=128),
    "nomrg-indirect-sg": dict(mrg_rxbuf=False, indirect=True, seed=3, max_segments=6),
    "mrg-sg-tworegions-small-bufs": dict(mrg_rxbuf=True, seed=11, max_segments=5,
                                         two_regions=True, rx_buf_size=512),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_frames_both_directions(dpdk_ok, sockdir, layout):
    opts = LAYOUTS[layout]
    with pmd_pair(sockdir) as (pmd, s1, s2), \
            NetFrontend(s1, timeout=TIMEOUT, mac=MAC_A, **opts) as a, \
            NetFrontend(s2, timeout=TIMEOUT, mac=MAC_B, **opts) as b:
        pmd.start()
        assert a.features & vnet.F_MRG_RXBUF == (vnet.F_MRG_RXBUF if opts["mrg_rxbuf"] else 0)
        assert a.mac == MAC_A and a.config_source in ("backend", "synthesized")
        assert a.config.max_virtqueue_pairs >= 1
        for tx, rx in ((a, b), (b, a)):
            frames = [make_frame(n, dst=rx.mac, src=tx.mac, seq=k)
                      for k, n in enumerate(SIZES * 3)]
            got = exchange(tx, rx, frames)
            check_same(frames, got)
            for p in got:
                assert p.hdr["flags"] == 0 and p.hdr["gso_type"] == vnet.GSO_NONE
                if rx.has_mrg_rxbuf:
                    assert p.hdr["num_buffers"] == len(p.used_lens) >= 1
                    assert sum(p.used_lens) == len(p.frame) + rx.hdr_size
                    # a 1514-byte frame needs 4 buffers of 512 bytes
                    assert len(p.used_lens) == -(-(len(p.frame) + rx.hdr_size)
                                                  // rx.rx_buf_size)
                else:
                    assert p.used_lens == (len(p.frame) + rx.hdr_size,)
        assert a.sent == b.received and b.sent == a.received
        assert a.tx_completed == a.sent and b.tx_completed == b.sent
        fwd = pmd.stop()
        assert fwd[0]["rx_packets"] == a.sent and fwd[1]["rx_packets"] == b.sent


def test_many_frames_in_order_with_refill(dpdk_ok, sockdir):
    """More frames than the rx ring has buffers: refilling works, nothing lost or reordered."""
    with pmd_pair(sockdir) as (pmd, s1, s2), \
            NetFrontend(s1, timeout=TIMEOUT, queue_size=64) as a, \
            NetFrontend(s2, timeout=TIMEOUT, queue_size=64) as b:
        pmd.start()
        frames = [make_frame(SIZES[k % len(SIZES)], seq=k) for k in range(2000)]
        got = exchange(a, b, frames, batch=48)
        check_same(frames, got)
        assert b.rx_buffers_used == 2000 and b.rx_posted() == 64


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "nomrg"])
@pytest.mark.parametrize("ol", ["legacy", "compliant"])
def test_gso_64k_frame_both_directions(dpdk_ok, sockdir, mrg, ol):
    extra = "tso=1" + (",legacy-ol-flags=1" if ol == "legacy" else "")
    with pmd_pair(sockdir, extra_vdev=extra) as (pmd, s1, s2), \
            NetFrontend(s1, timeout=TIMEOUT, mac=MAC_A, mrg_rxbuf=mrg, seed=5) as a, \
            NetFrontend(s2, timeout=TIMEOUT, mac=MAC_B, mrg_rxbuf=mrg) as b:
        pmd.start()
        for f in (vnet.F_HOST_TSO4, vnet.F_GUEST_TSO4, vnet.F_CSUM, vnet.F_GUEST_CSUM):
            if not (a.features & f and b.features & f):
                pytest.skip(f"DPDK did not offer feature {f:#x}")
        payload = bytes((i * 131 + (i >> 9)) & 0xFF for i in range(65535 - 40))  # IPv4 max
        for tx, rx, src_ip, dst_ip in ((a, b, IP_A, IP_B), (b, a, IP_B, IP_A)):
            frame = tcp4_frame(payload, src_mac=tx.mac, dst_mac=rx.mac, src_ip=src_ip,
                               dst_ip=dst_ip, partial_csum=True, seq=1000)
            assert len(frame) > 64 * 1024
            tx.send(frame, hdr=tcp4_gso_hdr(mss=1448))
            pkt = rx.recv_packet(timeout=TIMEOUT)
            assert pkt is not None, f"64 KiB GSO frame lost: {rx.describe()}"
            got = pkt.frame
            assert len(got) == len(frame)
            csum_at = vnet.ETH_HLEN + 20 + 16
            # everything but the TCP checksum field is byte-identical
            assert got[:csum_at] == frame[:csum_at] and got[csum_at + 2:] == frame[csum_at + 2:]
            csum = struct.unpack_from("!H", got, csum_at)[0]
            pseudo_nolen = ones_sum(frame[26:34] + struct.pack("!BBH", 0, 6, 0))
            sent_csum = struct.unpack_from("!H", frame, csum_at)[0]
            assert tcp4_csum_ok(got) or csum in (sent_csum, pseudo_nolen), f"{csum:#06x}"
            if ol == "legacy":
                h = pkt.hdr
                assert h["gso_type"] & ~vnet.GSO_ECN == vnet.GSO_TCPV4
                assert h["gso_size"] == 1448 and h["flags"] & vnet.HDR_F_NEEDS_CSUM
                assert h["csum_start"] == vnet.ETH_HLEN + 20 and h["csum_offset"] == 16
            else:
                assert tcp4_csum_ok(got)     # completed in software by net_vhost
            if mrg:
                need = -(-(len(frame) + rx.hdr_size) // rx.rx_buf_size)
                assert pkt.hdr["num_buffers"] == len(pkt.used_lens) == need
            else:
                assert len(pkt.used_lens) == 1 and rx.rx_chain_bytes >= 65562
            # and small frames still pass after the big one
            small = make_frame(60, dst=rx.mac, src=tx.mac, seq=9)
            tx.send(small)
            nxt = rx.recv_packet(timeout=TIMEOUT)
            assert nxt is not None and nxt.frame == small
        a.wait_tx(TIMEOUT)
        b.wait_tx(TIMEOUT)


def test_two_queue_pairs(dpdk_ok, sockdir):
    """queues=2: each pair carries its own traffic (testpmd io forwards queue q to queue q)."""
    with pmd_pair(sockdir, queues=2) as (pmd, s1, s2), \
            NetFrontend(s1, queue_pairs=2, timeout=TIMEOUT) as a, \
            NetFrontend(s2, queue_pairs=2, timeout=TIMEOUT) as b:
        pmd.start()
        assert a.features & vnet.F_MQ and len(a.queues) == 4
        for pair in (0, 1):
            frames = [make_frame(SIZES[k % len(SIZES)], seq=1000 * pair + k) for k in range(100)]
            got = exchange(a, b, frames, pair=pair, batch=50)
            check_same(frames, got)
            assert {p.pair for p in got} == {pair}
        back = [make_frame(100, seq=k) for k in range(50)]
        check_same(back, exchange(b, a, back, pair=1, batch=50))
        assert a.sent_per_pair == [100, 100] and b.received_per_pair == [100, 100]
        assert a.received_per_pair == [0, 50]


def test_nothing_posted_then_posted(dpdk_ok, sockdir):
    """A receiver with no rx buffers gets nothing (DPDK drops); after posting, traffic flows.
    The sender's tx completes either way."""
    with pmd_pair(sockdir) as (pmd, s1, s2), \
            NetFrontend(s1, timeout=TIMEOUT) as a, \
            NetFrontend(s2, timeout=TIMEOUT, rx_buffers=0) as b:
        pmd.start()
        assert b.rx_posted() == 0
        a.send_many([make_frame(100, seq=k) for k in range(500)])
        t0 = time.monotonic()
        a.wait_tx(TIMEOUT)
        assert time.monotonic() - t0 < TIMEOUT and a.tx_completed == 500
        assert b.recv(timeout=0.3) is None
        assert b.post_rx(16) == 16
        f = make_frame(1514, seq=1)
        a.send(f)
        got = b.recv(timeout=TIMEOUT)
        assert got is not None and got[1] == f
        fwd = pmd.stop()
        assert fwd[0]["rx_packets"] == 501
        assert fwd[1]["tx_packets"] == 1 and fwd[1]["tx_dropped"] == 500
