"""DPDK testpmd against vhost-user-net backends: net_virtio_user (a real frontend, no VM) as
traffic source and sink.

1. Reference: DPDK frontend against DPDK's own backend (net_vhost, io forwarding between two
   ports) -- checks the harness and gives the anchor rates: txonly -> io fwd -> rxonly (three
   busy pollers on two CPUs: scheduler-bound, see vhost/testing/dpdk.py) and one two-port flowgen
   frontend through the same backend (two pollers: CPU-bound).
2. Our backend, pyvhost-net (``python -m vhost.programs pyvhost-net``): two ports on an in-process learning L2
   switch, and a tap device inside a network namespace created by the test.

Every run is bounded in time and packet count; every process is stopped and every namespace
deleted at the end.  Skipped (with the reason) when DPDK or hugepages are not available.
"""
from __future__ import annotations

import json
import shutil
import sys
import time

import pytest

from vhost.testing import netns as nsh
from vhost.testing.backends import short_tmpdir
from vhost.testing.dpdk import dpdk_available, measure, rates, vhost_backend, virtio_user
from vhost.testing.netbackends import pyvhost_net

pytestmark = [pytest.mark.dpdk, pytest.mark.timeout(240)]

MAC_A = "02:00:00:00:0a:01"
MAC_B = "02:00:00:00:0b:01"
MAC_G = "02:00:00:00:0c:01"
TAP = "pvhtap0"
RUN_SECONDS = 2.0     # traffic per direction
DRAIN_SECONDS = 0.5   # after the sender stops, before the receiver's counters are read


@pytest.fixture(scope="module")
def dpdk():
    ok, why = dpdk_available()
    if not ok:
        pytest.skip(why)


@pytest.fixture
def workdir():
    d = short_tmpdir("pvhdpdk")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _one_way(tx, rx, seconds: float = RUN_SECONDS) -> tuple[int, int]:
    """Run ``tx`` (txonly) into ``rx`` (rxonly) for ``seconds``; (sent, received)."""
    rx.start()
    tx.start()
    time.sleep(seconds)
    sent = tx.stop()[0]["tx_packets"]
    time.sleep(DRAIN_SECONDS)
    got = rx.stop()[0]["rx_packets"]
    return sent, got


# ---------------------------------------------------------------------------------------------
# 1. the reference: DPDK frontend -> DPDK backend

@pytest.mark.parametrize("pkt_len", [64, 1500])
def test_reference_dpdk_vhost_io_fwd(dpdk, workdir, pkt_len, record_property):
    s1, s2 = workdir / "s1.sock", workdir / "s2.sock"
    with vhost_backend([s1, s2], fwd="io", log_path=workdir / "be.log") as be, \
            virtio_user(s2, "rxonly", mac=MAC_B, log_path=workdir / "rx.log") as rx, \
            virtio_user(s1, "txonly", pkt_len=pkt_len, mac=MAC_A,
                        log_path=workdir / "tx.log") as tx:
        be.start()
        rx.start()
        tx.start()
        time.sleep(0.5)
        mpps = measure(rx, RUN_SECONDS)           # what arrives at the sink
        tx_f = tx.stop()
        time.sleep(DRAIN_SECONDS)
        be_f = be.stop()
        time.sleep(DRAIN_SECONDS)
        rx_f = rx.stop()
        rx_nic = rx.port_stats()[0]
    sent, got = tx_f[0]["tx_packets"], rx_f[0]["rx_packets"]
    print(f"\nDPDK virtio_user txonly -> net_vhost io fwd -> virtio_user rxonly, {pkt_len} B: "
          f"{mpps:.3f} Mpps at the sink; sent {sent}, backend rx {be_f[0]['rx_packets']}, "
          f"backend tx {be_f[1]['tx_packets']} (dropped {be_f[1]['tx_dropped']}), "
          f"received {got}")
    record_property("mpps", round(mpps, 4))
    assert sent > 0 and got > 0 and mpps > 0
    # everything the frontend put on its tx ring was dequeued by the backend ...
    assert be_f[0]["rx_packets"] == sent
    # ... forwarded or dropped (the sink's ring full), and what was enqueued arrived, intact
    assert be_f[1]["tx_packets"] + be_f[1]["tx_dropped"] == be_f[0]["rx_packets"]
    assert got == be_f[1]["tx_packets"]
    assert rx_nic["rx_packets"] == got
    assert rx_nic["rx_bytes"] == got * pkt_len


@pytest.mark.parametrize("pkt_len", [64, 1500])
def test_reference_dpdk_vhost_flowgen_loop(dpdk, workdir, pkt_len, record_property):
    """One frontend instance, two ports (S1, S2), flowgen: each port sends and counts what it
    receives; net_vhost forwards S1 <-> S2.  Two busy pollers on two CPUs."""
    s1, s2 = workdir / "s1.sock", workdir / "s2.sock"
    with vhost_backend([s1, s2], fwd="io", log_path=workdir / "be.log") as be, \
            virtio_user([s1, s2], "flowgen", pkt_len=pkt_len, mac=MAC_A,
                        log_path=workdir / "fe.log") as fe:
        be.start()
        fe.start()
        time.sleep(0.5)
        r = rates(fe, RUN_SECONDS)
        fe_f = fe.stop()
        be_f = be.stop()
    mpps = r[0]["rx_mpps"] + r[1]["rx_mpps"]
    print(f"\nDPDK virtio_user flowgen x2 <-> net_vhost io fwd, {pkt_len} B: "
          f"{r[0]['rx_mpps']:.3f} + {r[1]['rx_mpps']:.3f} Mpps received")
    record_property("mpps", round(mpps, 4))
    for port, peer in ((0, 1), (1, 0)):
        assert fe_f[port]["tx_packets"] > 0 and fe_f[port]["rx_packets"] > 0, fe_f
        # a frame received on one port was sent on the other and forwarded by the backend
        assert fe_f[port]["rx_packets"] <= be_f[port]["tx_packets"] <= \
            be_f[peer]["rx_packets"] <= fe_f[peer]["tx_packets"], (fe_f, be_f)


# ---------------------------------------------------------------------------------------------
# 2a. our backend, switch mode: two ports joined by the in-process learning switch

@pytest.mark.parametrize("ring", ["split", "packed"])
def test_pyvhost_switch_two_ports(dpdk, workdir, ring):
    """... over split rings and over packed ones (net_virtio_user packed_vq=1)."""
    a, b = workdir / "a.sock", workdir / "b.sock"
    vdev = "packed_vq=1" if ring == "packed" else ""
    with pyvhost_net([a, b], switch="sw0") as be, \
            virtio_user(b, "rxonly", mac=MAC_B, log_path=workdir / "b.log",
                        extra_vdev=vdev) as pb, \
            virtio_user(a, "txonly", mac=MAC_A, log_path=workdir / "a.log",
                        extra_vdev=vdev) as pa:
        # testpmd's txonly sends to 02:00:00:00:00:00, which no port owns: flooded to B
        sent, got = _one_way(pa, pb)
        assert sent > 0, pa.tail()
        assert 0 < got <= sent, f"A sent {sent}, B received {got}\n{be.log_tail()}"
        # and the other way round, same connections
        pa.set_fwd("rxonly")
        pb.set_fwd("txonly")
        sent2, got2 = _one_way(pb, pa)
        assert sent2 > 0, pb.tail()
        assert 0 < got2 <= sent2, f"B sent {sent2}, A received {got2}\n{be.log_tail()}"
        assert be.alive(), be.log_tail()
        log = be.log_text()
        assert (log.count("(packed virtqueues)") >= 2) == (ring == "packed"), log[-3000:]
    print(f"\nswitch ({ring}): A->B {got}/{sent}, B->A {got2}/{sent2}")


# ---------------------------------------------------------------------------------------------
# 2b. our backend, tap mode, inside a network namespace the test owns

INJECT = r"""
import json, socket, sys, time
ifname, dst, count, length, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
frame = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex("020000000d01") + b"\x88\xb5"
frame += bytes(max(0, length - len(frame)))
sent = errors = 0
deadline = time.monotonic() + limit
while sent < count and time.monotonic() < deadline:
    try:
        s.send(frame)
        sent += 1
    except OSError:            # ENOBUFS / EAGAIN: back off a little
        errors += 1
        time.sleep(0.001)
print(json.dumps({"sent": sent, "errors": errors}))
"""


def _tap_counters(ns: str, ifname: str) -> nsh.LinkState:
    """rx_packets = frames written into the tap fd (by the backend); tx_packets = frames the
    tap fd's reader (the backend) has read (counted at read time)."""
    link = nsh.link_state(ns, ifname)
    assert link.exists, f"{ifname} vanished from {ns}"
    return link


def _wait_tap_up(ns: str, ifname: str, be, timeout: float = 15.0) -> None:
    def alive():
        assert be.alive(), f"backend exited ({be.proc.returncode}):\n{be.log_tail()}"
    if nsh.wait_link(ns, ifname, running=True, timeout=timeout, interval=0.1,
                     check=alive) is None:
        pytest.fail(f"{ifname} in {ns} not up within {timeout} s: {nsh.link_text(ns, ifname)}"
                    f"\n{be.log_tail()}")


@pytest.fixture
def netns():
    ok, why = nsh.available()
    if not ok:
        pytest.skip(f"needs network namespaces: {why}")
    # no IPv6 autoconfiguration chatter (RS/MLD) on the tap: only our frames are counted
    with nsh.namespace(no_ipv6=True) as name:
        yield name


def test_pyvhost_tap_in_netns(dpdk, workdir, netns):
    sock = workdir / "t.sock"
    with pyvhost_net(sock, tap=TAP, netns=netns) as be, \
            virtio_user(sock, "txonly", mac=MAC_G, log_path=workdir / "g.log") as g:
        _wait_tap_up(netns, TAP, be)

        # guest -> tap: what the backend writes into the tap is rx on the interface
        c0 = _tap_counters(netns, TAP)
        g.start()
        time.sleep(RUN_SECONDS)
        sent = g.stop()[0]["tx_packets"]
        time.sleep(DRAIN_SECONDS)
        c1 = _tap_counters(netns, TAP)
        written = c1.rx_packets - c0.rx_packets
        assert sent > 0, g.tail()
        assert 0 < written <= sent, f"guest sent {sent}, tap got {written}\n{be.log_tail()}"

        # tap -> guest: frames injected into the interface from inside the namespace
        g.set_fwd("rxonly")
        g.start()
        r = nsh.run(netns, sys.executable, "-c", INJECT, TAP, MAC_G, "20000", "64", "10",
                    timeout=30)
        injected = json.loads(r.stdout)["sent"]
        time.sleep(DRAIN_SECONDS + 0.5)
        got = g.stop()[0]["rx_packets"]
        c2 = _tap_counters(netns, TAP)
        pulled = c2.tx_packets - c1.tx_packets   # read from the tap by the backend
        assert injected > 0, r.stderr
        assert 0 < got, f"injected {injected}, backend read {pulled}, guest got 0\n" \
                        f"{be.log_tail()}"
        assert got <= pulled <= injected, (injected, pulled, got)
        assert be.alive(), be.log_tail()
    print(f"\ntap: guest->tap {written}/{sent}, tap->guest {got}/{injected} "
          f"(backend read {pulled})")
