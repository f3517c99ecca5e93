"""Integration: pyvhost-net (`python -m devices.net`) as a subprocess, driven by
vhost/testing/net.py's NetFrontend over real Unix sockets.

- tap mode: the backend runs inside a network namespace this test creates (`pvh-<random>`,
  removed at the end; vhost/testing/netns.py) and owns a tap there; a small stdlib-only helper, run
  inside it, captures what comes out of the tap with a raw AF_PACKET socket (printing
  JSON lines) or writes frames into it.  Sizes 60..1514, a 32 KiB TCP GSO frame from the guest,
  jumbo and 64 KiB GSO frames to the guest (mergeable buffers, num_buffers > 1), two queue pairs.
- switch mode: NetFrontend ports joined by the backend's learning switch: flooding, learning,
  no hairpin, isolation of a third port, 1000 frames in order, a receiver without rx buffers
  (tx never blocks, drops counted), hostile tx chains dropped and counted.

Only TEST-NET-1 (192.0.2.0/24) addresses and locally administered MACs; every loop is bounded in
count and time.  The backend's exit lines (`msg=stats device=NAME tx_packets=...`, one logfmt line
per port) are checked too.
"""
from __future__ import annotations

import contextlib
import json
import select
import struct
import subprocess
import sys
import time

import pytest

from protocols import virtio
from protocols import virtio_net as vnet
from vhost.testing import netns as nsh
from vhost.testing.netbackends import pyvhost_net
from vhost import logfmt
from vhost.testing.net import (ETH_P_IP, ETH_P_TEST, NetFrontend, RxPacket, make_frame,
                               tcp4_csum_ok, tcp4_frame, tcp4_gso_hdr)

TAP = "pvhtap0"
GUEST_MAC = bytes.fromhex("02aa00000001")
HOST_MAC = bytes.fromhex("02bb00000001")
MAC_A = bytes.fromhex("020a00000001")
MAC_B = bytes.fromhex("020b00000002")
MAC_C = bytes.fromhex("020c00000003")
IP_GUEST, IP_HOST = "192.0.2.2", "192.0.2.1"
SIZES = (60, 61, 64, 100, 127, 128, 255, 256, 512, 777, 1000, 1024, 1280, 1500, 1513, 1514)
TIMEOUT = 10.0


# ---------------------------------------------------------------------------------------------
# the in-namespace helper: stdlib only, run as `python -c HELPER capture|inject ...`

HELPER = r'''
import json, select, socket, struct, sys, time
ETH_P_ALL = 3
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
SOL_PACKET = 263
SO_RCVBUFFORCE = 33

def capture(iface, seconds, count, vnet, ethertypes):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    if vnet:
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    except OSError:
        pass
    s.bind((iface, 0))
    print("READY", flush=True)
    deadline = time.monotonic() + seconds
    n = ignored = 0
    while n < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data, addr = s.recvfrom(1 << 17)
        if addr[2] == PACKET_OUTGOING:
            continue
        hdr = b""
        if vnet:
            hdr, data = data[:10], data[10:]
        et = struct.unpack_from("!H", data, 12)[0] if len(data) >= 14 else -1
        if ethertypes and et not in ethertypes:
            ignored += 1
            continue
        print(json.dumps({"hex": data.hex(), "hdr": hdr.hex(), "pkttype": addr[2]}), flush=True)
        n += 1
    print(json.dumps({"done": n, "ignored": ignored}), flush=True)

def inject(iface, vnet):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    if vnet:
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sent = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        m = json.loads(line)
        frame = bytes.fromhex(m["hex"])
        hdr = bytes.fromhex(m.get("hdr", "")) if vnet else b""
        if vnet and not hdr:
            hdr = bytes(10)
        et = struct.unpack_from("!H", frame, 12)[0]
        for attempt in range(200):
            try:
                s.sendto(hdr + frame, (iface, et))
                break
            except BlockingIOError:
                time.sleep(0.005)
        else:
            raise SystemExit("send kept failing")
        sent += 1
        if m.get("gap"):
            time.sleep(m["gap"])
    print(json.dumps({"sent": sent}), flush=True)

cmd = sys.argv[1]
if cmd == "capture":
    ets = [int(x, 0) for x in sys.argv[6].split(",") if x] if len(sys.argv) > 6 else []
    capture(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "vnet", ets)
elif cmd == "inject":
    inject(sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "vnet")
'''


class Capture:
    """A running capture on `iface` inside `ns`; `frames()` waits for it to end (after `count`
    frames or `seconds`) and returns [(vnet hdr fields or None, frame bytes)]."""

    def __init__(self, ns: str, iface: str, count: int, seconds: float = TIMEOUT,
                 vnet: bool = False, ethertypes: tuple[int, ...] = (ETH_P_TEST,)):
        self.seconds = seconds
        self.vnet = vnet
        self.proc = subprocess.Popen(
            nsh.cmd(ns, sys.executable, "-c", HELPER, "capture", iface, str(seconds), str(count),
                    "vnet" if vnet else "plain", ",".join(hex(e) for e in ethertypes)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = select.select([self.proc.stdout], [], [], 15.0)[0]
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "READY":
            self.proc.kill()
            out, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"capture helper did not start: {line!r} {out!r} {err!r}")

    def frames(self) -> list[tuple[dict | None, bytes]]:
        try:
            out, err = self.proc.communicate(timeout=self.seconds + 15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=10)
            raise
        assert self.proc.returncode == 0, f"capture helper failed: {err}"
        got = []
        for line in out.splitlines():
            m = json.loads(line)
            if "done" in m:
                continue
            hdr = None
            if self.vnet:
                h = bytes.fromhex(m["hdr"])
                hdr = dict(zip(("flags", "gso_type", "hdr_len", "gso_size", "csum_start",
                                "csum_offset"), struct.unpack("<BBHHHH", h)))
            got.append((hdr, bytes.fromhex(m["hex"])))
        return got

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.communicate(timeout=10)


@contextlib.contextmanager
def capture(ns: str, iface: str, count: int, **kw):
    c = Capture(ns, iface, count, **kw)
    try:
        yield c
    finally:
        c.close()


def inject(ns: str, iface: str, frames: list, vnet: bool = False, gap: float = 0.0) -> None:
    """Write frames into the tap from inside `ns` (the kernel transmits them to the backend).
    An entry is a frame, or (vnet hdr bytes, frame) with `vnet`."""
    lines = []
    for f in frames:
        if isinstance(f, tuple):
            hdr, f = f
            lines.append(json.dumps({"hex": f.hex(), "hdr": hdr.hex(), "gap": gap}))
        else:
            lines.append(json.dumps({"hex": f.hex(), "gap": gap}))
    r = nsh.run(ns, sys.executable, "-c", HELPER, "inject", iface, "vnet" if vnet else "plain",
                input="\n".join(lines) + "\n", timeout=30 + gap * len(frames))
    assert json.loads(r.stdout.splitlines()[-1])["sent"] == len(frames), r.stderr


def legacy_vnet_hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


# ---------------------------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture
def netns():
    ok, why = nsh.available()
    if not ok:
        pytest.skip(f"needs network namespaces: {why}")
    with nsh.namespace(no_ipv6=True) as name:   # no IPv6 chatter on the tap: only our frames
        yield name


def wait_tap_up(ns: str, be, ifname: str = TAP, timeout: float = 15.0) -> nsh.LinkState:
    def alive():
        assert be.alive(), f"backend exited ({be.proc.returncode}):\n{be.log_tail()}"
    link = nsh.wait_link(ns, ifname, running=True, timeout=timeout, check=alive)
    if link is None:
        pytest.fail(f"{ifname} in {ns} not up within {timeout} s: {nsh.link_text(ns, ifname)}"
                    f"\n{be.log_tail()}")
    return link


def exit_stats(be) -> dict:
    """{device: {counter: value}} from the backend's `stats` log lines (after it exited)."""
    out = {}
    for ln in be.log_text().splitlines():
        f = logfmt.parse_line(ln)
        if f.get("msg") == "stats" and f.get("logger") == "pyvhost.net":
            name = f["device"]
            out[name] = {k: int(v) for k, v in f.items()
                         if k not in ("ts", "level", "logger", "msg", "device")}
    assert out, f"no stats line in the backend log:\n{be.log_tail()}"
    return out


def is_test_frame(frame: bytes) -> bool:
    return len(frame) >= 14 and struct.unpack_from("!H", frame, 12)[0] == ETH_P_TEST


def recv_matching(nf: NetFrontend, n: int, match=is_test_frame, timeout: float = TIMEOUT,
                  pair: int | None = None) -> list[RxPacket]:
    """Up to `n` packets satisfying `match` (others are dropped on the floor), within
    `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    out: list[RxPacket] = []
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for p in nf.recv_packets(n - len(out), left, pair):
            if match(p.frame):
                out.append(p)
    return out


def assert_silent(nf: NetFrontend, seconds: float = 0.3, match=is_test_frame) -> None:
    extra = [p for p in nf.drain(quiet=seconds, limit=1000) if match(p.frame)]
    assert not extra, f"{len(extra)} unexpected frames, first {extra[0].frame[:32].hex()}"


def exchange(tx: NetFrontend, rx: NetFrontend, frames: list[bytes], batch: int = 128,
             pair: int = 0) -> list[RxPacket]:
    """Send in batches the receiver's ring holds; collect them at rx (bounded waits)."""
    batch = max(1, min(batch, rx.rx_frames_capacity(0, max(map(len, frames)))))
    got: list[RxPacket] = []
    for i in range(0, len(frames), batch):
        chunk = frames[i:i + batch]
        assert tx.send_many(chunk, pair=pair) == len(chunk)
        pk = recv_matching(rx, len(chunk))
        assert len(pk) == len(chunk), (f"{len(pk)}/{len(chunk)} frames of batch "
                                       f"{i // batch} arrived; rx {rx.describe()}")
        got += pk
    tx.wait_tx(TIMEOUT)
    return got


def tcp_payload(frame: bytes) -> tuple[int, bytes]:
    """(sequence number, payload) of an Ethernet/IPv4/TCP frame without options."""
    ihl = (frame[14] & 0xF) * 4
    tot = struct.unpack_from("!H", frame, 16)[0]
    tcp = 14 + ihl
    doff = (frame[tcp + 12] >> 4) * 4
    seq = struct.unpack_from("!I", frame, tcp + 4)[0]
    return seq, frame[tcp + doff:14 + tot]


def reassemble(frames: list[bytes]) -> bytes:
    segs = sorted(tcp_payload(f) for f in frames)
    out = b""
    for seq, data in segs:
        out += data
    return out


def udp4_frame(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, sport: int,
               dport: int, payload: bytes) -> bytes:
    import socket as _s
    from vhost.testing.net import inet_checksum
    ulen = 8 + len(payload)
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, sport, 0x4000, 64, 17, 0,
                      _s.inet_aton(src_ip), _s.inet_aton(dst_ip))
    iph = iph[:10] + struct.pack("!H", inet_checksum(iph)) + iph[12:]
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + iph + udp


# ---------------------------------------------------------------------------------------------
# tap mode

def test_tap_guest_to_host_sizes(netns, sockdir):
    sock = sockdir / "t.sock"
    frames = [make_frame(n, dst=HOST_MAC, src=GUEST_MAC, seq=k) for k, n in enumerate(SIZES * 2)]
    with pyvhost_net(sock, tap=TAP, netns=netns) as be:
        wait_tap_up(netns, be)
        with NetFrontend(sock, mac=GUEST_MAC, timeout=TIMEOUT, seed=1) as nf:
            with capture(netns, TAP, len(frames)) as cap:
                assert nf.send_many(frames) == len(frames)
                nf.wait_tx(TIMEOUT)
                got = [f for _, f in cap.frames()]
            assert got == frames
            assert nf.tx_completed == len(frames)
    st = exit_stats(be)[TAP]
    assert st["tx_packets"] == len(frames) and st["tx_dropped"] == 0


@pytest.mark.parametrize("split", [None, "sg"])
def test_tap_guest_gso_to_host(netns, sockdir, split):
    """A 32 KiB TCP segment with gso_type TCPV4 + NEEDS_CSUM leaves the tap whole (the tap
    accepts GSO from its fd) or segmented; the bytes (checksum aside) are the guest's."""
    sock = sockdir / "t.sock"
    payload = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(32 * 1024))
    frame = tcp4_frame(payload, src_mac=GUEST_MAC, dst_mac=HOST_MAC, src_ip=IP_GUEST,
                       dst_ip=IP_HOST, seq=5000, partial_csum=True)
    with pyvhost_net(sock, tap=TAP, netns=netns) as be:
        wait_tap_up(netns, be)
        with NetFrontend(sock, mac=GUEST_MAC, timeout=TIMEOUT,
                         seed=3 if split else None, max_segments=8) as nf:
            if not nf.features & vnet.F_HOST_TSO4 or not nf.features & vnet.F_CSUM:
                pytest.skip("backend does not offer HOST_TSO4 + CSUM")
            n_seg = -(-len(payload) // 1448)
            with capture(netns, TAP, n_seg, seconds=5.0, vnet=True,
                         ethertypes=(ETH_P_IP,)) as cap:
                nf.send(frame, hdr=tcp4_gso_hdr(mss=1448))
                nf.wait_tx(TIMEOUT)
                got = cap.frames()
            assert got, "nothing came out of the tap"
            if len(got) == 1:
                hdr, f = got[0]
                assert len(f) == len(frame)
                csum_at = 14 + 20 + 16
                assert f[:csum_at] == frame[:csum_at] and f[csum_at + 2:] == frame[csum_at + 2:]
                assert hdr["gso_type"] & 0x7F == vnet.GSO_TCPV4 and hdr["gso_size"] == 1448
            else:
                assert len(got) == n_seg
                assert all(len(f) <= 1514 for _, f in got)
                assert reassemble([f for _, f in got]) == payload
            assert nf.tx_completed == 1
    st = exit_stats(be)[TAP]
    assert st["tx_packets"] == 1 and st["tx_dropped"] == 0


def test_tap_host_to_guest_sizes(netns, sockdir):
    sock = sockdir / "t.sock"
    frames = [make_frame(n, dst=GUEST_MAC if k % 3 else b"\xff" * 6, src=HOST_MAC, seq=k)
              for k, n in enumerate(SIZES * 3)]
    with pyvhost_net(sock, tap=TAP, netns=netns) as be:
        wait_tap_up(netns, be)
        with NetFrontend(sock, mac=GUEST_MAC, timeout=TIMEOUT) as nf:
            inject(netns, TAP, frames)
            got = recv_matching(nf, len(frames))
            assert [p.frame for p in got] == frames
            for p in got:
                assert p.hdr["gso_type"] == vnet.GSO_NONE
                assert p.hdr["num_buffers"] == 1 == len(p.used_lens)
                assert p.used_lens[0] == len(p.frame) + nf.hdr_size
    st = exit_stats(be)[TAP]
    assert st["rx_packets"] >= len(frames)


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "nomrg"])
def test_tap_host_to_guest_jumbo(netns, sockdir, mrg):
    """--mtu 9000: a 9014-byte frame spans 5 mergeable buffers of 2048 (or one big chain)."""
    sock = sockdir / "t.sock"
    frames = [make_frame(n, dst=GUEST_MAC, src=HOST_MAC, seq=k)
              for k, n in enumerate((9014, 60, 4000, 2037, 2036, 8999, 1514))]
    with pyvhost_net(sock, tap=TAP, netns=netns, extra=["--mtu", "9000"]) as be:
        link = wait_tap_up(netns, be)
        assert link.mtu == 9000
        with NetFrontend(sock, mac=GUEST_MAC, timeout=TIMEOUT, mrg_rxbuf=mrg) as nf:
            assert nf.features & vnet.F_MTU and nf.config.mtu == 9000
            inject(netns, TAP, frames)
            got = recv_matching(nf, len(frames))
            assert [p.frame for p in got] == frames
            for p in got:
                if mrg:
                    need = -(-(len(p.frame) + nf.hdr_size) // nf.rx_buf_size)
                    assert p.hdr["num_buffers"] == len(p.used_lens) == need
                else:
                    assert len(p.used_lens) == 1
            if mrg:
                assert nf.num_buffers_max == 5


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "nomrg"])
def test_tap_host_to_guest_gso_60k(netns, sockdir, mrg):
    """A 60 KiB TCP GSO frame written into the tap (PACKET_VNET_HDR) reaches a guest that acked
    GUEST_TSO4 whole, with its GSO header, across 31 mergeable buffers (or one big chain)."""
    sock = sockdir / "t.sock"
    # 60 KiB: the kernel segments in software any GSO skb of gso_max_size (65536) or more,
    # headers included, before it reaches a device (gso_features_check)
    payload = bytes((i * 3 + (i >> 10)) & 0xFF for i in range(60 * 1024))
    frame = tcp4_frame(payload, src_mac=HOST_MAC, dst_mac=GUEST_MAC, src_ip=IP_HOST,
                       dst_ip=IP_GUEST, seq=77, partial_csum=True)
    h = tcp4_gso_hdr(mss=1448)
    vh = legacy_vnet_hdr(h["flags"], h["gso_type"], h["hdr_len"], h["gso_size"],
                         h["csum_start"], h["csum_offset"])
    with pyvhost_net(sock, tap=TAP, netns=netns) as be:
        wait_tap_up(netns, be)
        with NetFrontend(sock, mac=GUEST_MAC, timeout=TIMEOUT, mrg_rxbuf=mrg) as nf:
            tso = nf.features & vnet.F_GUEST_TSO4 and nf.features & vnet.F_GUEST_CSUM
            inject(netns, TAP, [(vh, frame)], vnet=True)
            n_exp = 1 if tso else -(-len(payload) // 1448)
            got = recv_matching(nf, n_exp, match=lambda f: f[12:14] == b"\x08\x00")
            assert got, f"nothing arrived: {nf.describe()}"
            if len(got) == 1:
                p = got[0]
                assert len(p.frame) == len(frame) > 2048
                csum_at = 14 + 20 + 16
                assert p.frame[:csum_at] == frame[:csum_at]
                assert p.frame[csum_at + 2:] == frame[csum_at + 2:]
                assert p.hdr["gso_type"] & 0x7F == vnet.GSO_TCPV4
                assert p.hdr["gso_size"] == 1448
                if p.hdr["flags"] & vnet.HDR_F_NEEDS_CSUM:
                    assert p.hdr["csum_start"] == 34 and p.hdr["csum_offset"] == 16
                else:
                    assert tcp4_csum_ok(p.frame)
                if mrg:
                    need = -(-(len(frame) + nf.hdr_size) // nf.rx_buf_size)
                    assert p.hdr["num_buffers"] == len(p.used_lens) == need > 1
                else:
                    assert len(p.used_lens) == 1
            else:
                assert not tso, "guest acked GUEST_TSO4 but the frame arrived segmented"
                assert len(got) == n_exp
                assert reassemble([p.frame for p in got]) == payload
    st = exit_stats(be)[TAP]
    assert st["rx_packets"] >= 1


def test_tap_two_queue_pairs(netns, sockdir):
    """--queues 2 (multi-queue tap): the guest sends on both pairs, all frames leave the tap;
    many flows from the host are spread over both rx queues."""
    sock = sockdir / "t.sock"
    with pyvhost_net(sock, tap=TAP, netns=netns, queues=2) as be:
        wait_tap_up(netns, be)
        with NetFrontend(sock, mac=GUEST_MAC, queue_pairs=2, timeout=TIMEOUT) as nf:
            assert nf.features & vnet.F_MQ
            frames = {p: [make_frame(SIZES[k % len(SIZES)], dst=HOST_MAC, src=GUEST_MAC,
                                     seq=100 * p + k) for k in range(50)] for p in (0, 1)}
            with capture(netns, TAP, 100) as cap:
                for p in (0, 1):
                    nf.send_many(frames[p], pair=p)
                nf.wait_tx(TIMEOUT)
                got = [f for _, f in cap.frames()]
            assert sorted(got) == sorted(frames[0] + frames[1])
            for p in (0, 1):   # each pair's frames keep their order
                assert [f for f in got if f in frames[p]] == frames[p]
            assert nf.sent_per_pair == [50, 50]

            flows = [udp4_frame(GUEST_MAC, HOST_MAC, IP_HOST, IP_GUEST, 20000 + k, 9,
                                bytes([k]) * (60 + k)) for k in range(128)]
            inject(netns, TAP, flows)
            rx = recv_matching(nf, len(flows), match=lambda f: f[12:14] == b"\x08\x00")
            assert sorted(p.frame for p in rx) == sorted(flows)
            assert all(c > 0 for c in nf.received_per_pair), nf.received_per_pair
    st = exit_stats(be)[TAP]
    assert st["tx_packets"] == 100 and st["rx_packets"] >= 128


# ---------------------------------------------------------------------------------------------
# switch mode

def test_switch_flooding_learning_no_hairpin(sockdir):
    socks = [sockdir / n for n in ("a", "b", "c")]
    with pyvhost_net(socks, switch="sw0") as be:
        with NetFrontend(socks[0], mac=MAC_A, timeout=TIMEOUT) as a, \
                NetFrontend(socks[1], mac=MAC_B, timeout=TIMEOUT) as b, \
                NetFrontend(socks[2], mac=MAC_C, timeout=TIMEOUT) as c:
            # broadcast from A reaches B and C, never A itself
            bc = make_frame(100, dst=b"\xff" * 6, src=MAC_A, seq=1)
            a.send(bc)
            for nf in (b, c):
                pk = recv_matching(nf, 1)
                assert [p.frame for p in pk] == [bc]
            assert_silent(a)
            # multicast floods too
            mc = make_frame(80, dst=bytes.fromhex("01005e000001"), src=MAC_A, seq=2)
            a.send(mc)
            assert [p.frame for p in recv_matching(b, 1)] == [mc]
            assert [p.frame for p in recv_matching(c, 1)] == [mc]
            assert_silent(a)
            # unknown unicast (B not learned yet) is flooded
            uu = make_frame(90, dst=MAC_B, src=MAC_A, seq=3)
            a.send(uu)
            assert [p.frame for p in recv_matching(b, 1)] == [uu]
            assert [p.frame for p in recv_matching(c, 1)] == [uu]
            assert_silent(a)
            # B answers A: A was learned from its broadcast, so only A gets it
            ba = make_frame(70, dst=MAC_A, src=MAC_B, seq=4)
            b.send(ba)
            assert [p.frame for p in recv_matching(a, 1)] == [ba]
            assert_silent(c)
            assert_silent(b)
            # now both are learned: A -> B reaches only B, repeatedly
            ab = [make_frame(60 + k, dst=MAC_B, src=MAC_A, seq=10 + k) for k in range(20)]
            a.send_many(ab)
            assert [p.frame for p in recv_matching(b, 20)] == ab
            assert_silent(c)
            assert_silent(a)
            # C only ever saw the flooded frames
            assert c.received == 3
            # a unicast to a MAC nobody has is still flooded to the others
            ux = make_frame(64, dst=bytes.fromhex("02dd00000009"), src=MAC_A, seq=99)
            a.send(ux)
            assert [p.frame for p in recv_matching(b, 1)] == [ux]
            assert [p.frame for p in recv_matching(c, 1)] == [ux]
            assert_silent(a)
            # a frame for A's own MAC sent by A (hairpin) goes nowhere
            self_f = make_frame(64, dst=MAC_A, src=MAC_A, seq=100)
            a.send(self_f)
            for nf in (a, b, c):
                assert_silent(nf)
    stats = exit_stats(be)
    assert stats["sw0:0"]["tx_packets"] == 25 and stats["sw0:1"]["tx_packets"] == 1
    assert stats["sw0:2"]["rx_packets"] == 4
    assert stats["sw0:0"]["hairpin_filtered"] == 1


@pytest.mark.parametrize("ring", ["split", "packed", "mixed"])
def test_switch_1000_frames_in_order(sockdir, ring):
    """... over split rings, packed rings (VIRTIO_F_RING_PACKED: mergeable rx buffers each
    with its own used descriptor), and a split sender to a packed receiver."""
    socks = [sockdir / "a", sockdir / "b"]
    with pyvhost_net(socks, switch="sw0") as be:
        with NetFrontend(socks[0], mac=MAC_A, timeout=TIMEOUT, seed=7,
                         packed=ring == "packed") as a, \
                NetFrontend(socks[1], mac=MAC_B, timeout=TIMEOUT, two_regions=True,
                            packed=ring != "split") as b:
            assert b.has_packed == (ring != "split")
            b.send(make_frame(60, dst=MAC_A, src=MAC_B, seq=0))   # learn B
            assert recv_matching(a, 1)
            frames = [make_frame(SIZES[(k * 7) % len(SIZES)], dst=MAC_B, src=MAC_A, seq=k)
                      for k in range(1000)]
            got = exchange(a, b, frames, batch=200)
            assert [p.frame for p in got] == frames
            assert b.received == 1000
    stats = exit_stats(be)
    assert stats["sw0:0"]["tx_packets"] == 1000 and stats["sw0:1"]["rx_packets"] == 1000
    assert stats["sw0:1"]["rx_dropped_no_room"] == 0


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("posted", [0, 4])
def test_switch_rx_ring_full_tx_never_blocks(sockdir, posted, ring):
    socks = [sockdir / "a", sockdir / "b"]
    n = 5000
    with pyvhost_net(socks, switch="sw0") as be:
        with NetFrontend(socks[0], mac=MAC_A, timeout=TIMEOUT, packed=ring == "packed") as a, \
                NetFrontend(socks[1], mac=MAC_B, timeout=TIMEOUT, rx_buffers=posted,
                            packed=ring == "packed") as b:
            b.send(make_frame(60, dst=b"\xff" * 6, src=MAC_B, seq=0))   # learn B
            assert recv_matching(a, 1)
            frames = [make_frame(60 + (k % 200), dst=MAC_B, src=MAC_A, seq=k) for k in range(n)]
            t0 = time.monotonic()
            assert a.send_many(frames) == n
            a.wait_tx(TIMEOUT)
            elapsed = time.monotonic() - t0
            assert a.tx_completed == n
            assert elapsed < 8.0, f"5000 sends took {elapsed:.1f}s: tx blocked on B?"
            got = b.drain(quiet=0.3, limit=100)
            assert len(got) <= posted
            assert [p.frame for p in got] == frames[:len(got)]
            # the receiver still works once it posts buffers
            b.post_rx(16)
            later = make_frame(100, dst=MAC_B, src=MAC_A, seq=n)
            a.send(later)
            assert [p.frame for p in recv_matching(b, 1)] == [later]
    stats = exit_stats(be)
    sb = stats["sw0:1"]
    assert stats["sw0:0"]["tx_packets"] == n + 1
    assert sb["rx_dropped_no_room"] == n - len(got), sb
    assert sb["rx_packets"] == len(got) + 1


def test_switch_hostile_tx_chains(sockdir):
    """Bad tx chains laid out with the low-level VirtQueue API: each is dropped and counted,
    returned to the driver, the backend lives on and the next good frame is delivered."""
    socks = [sockdir / "a", sockdir / "b"]
    with pyvhost_net(socks, switch="sw0") as be:
        with NetFrontend(socks[0], mac=MAC_A, timeout=TIMEOUT, two_regions=True) as a, \
                NetFrontend(socks[1], mac=MAC_B, timeout=TIMEOUT) as b:
            b.send(make_frame(60, dst=b"\xff" * 6, src=MAC_B, seq=0))
            assert recv_matching(a, 1)
            vq = a.queues[vnet.tx_queue(0)]
            mem = a.mem
            NEXT = virtio.VIRTQ_DESC_F_NEXT
            hdr = bytes(vnet.HDR_SIZE)
            good_frame = make_frame(100, dst=MAC_B, src=MAC_A, seq=1)
            buf = mem.alloc(vnet.HDR_SIZE + len(good_frame))
            mem.write(buf, hdr + good_frame)
            big_len = vnet.HDR_SIZE + vnet.MAX_GSO_FRAME + 1000
            big = mem.alloc(big_len)
            mem.write(big, hdr + make_frame(big_len - vnet.HDR_SIZE, dst=MAC_B, src=MAC_A))
            hole = 640 * 1024 - 40        # straddles the end of the first region (PC hole)

            def loop_chain():
                idx = vq.add_raw_descs([(buf, vnet.HDR_SIZE, NEXT, None),
                                        (buf + vnet.HDR_SIZE, len(good_frame), NEXT, None)])
                vq.write_desc(idx[1], buf + vnet.HDR_SIZE, len(good_frame), NEXT, idx[0])
                return idx[0]

            hostile = {
                "out of range": lambda: vq.add_raw_descs(
                    [(a.mem_size + (1 << 30), 200, 0, None)])[0],
                "addr + len overflows": lambda: vq.add_raw_descs(
                    [(2**64 - 16, 200, 0, None)])[0],
                "straddles a region": lambda: vq.add_raw_descs([(hole, 200, 0, None)])[0],
                "looped chain": loop_chain,
                "next out of the table": lambda: vq.add_raw_descs(
                    [(buf, vnet.HDR_SIZE, NEXT, vq.size + 5)])[0],
                "oversized frame": lambda: vq.add_raw_descs([(big, big_len, 0, None)])[0],
                "header only": lambda: vq.add_raw_descs([(buf, vnet.HDR_SIZE, 0, None)])[0],
                "shorter than the header": lambda: vq.add_raw_descs([(buf, 5, 0, None)])[0],
            }
            for k, (name, make) in enumerate(hostile.items()):
                head = make()
                vq.publish([head])
                vq.kick(force=True)
                a.wait_tx(TIMEOUT)          # the bad chain came back (dropped, not stuck)
                assert be.alive(), f"backend died on {name}:\n{be.log_tail()}"
                good = make_frame(100 + k, dst=MAC_B, src=MAC_A, seq=1000 + k)
                a.send(good)
                got = recv_matching(b, 2, timeout=1.0)
                assert [p.frame for p in got] == [good], f"after {name}: {len(got)} frames"
            assert a.tx_raw_completed == len(hostile)
            assert not vq.unknown_used
    stats = exit_stats(be)
    sa = stats["sw0:0"]
    assert sa["tx_dropped"] == len(hostile), sa
    assert sa["tx_packets"] == len(hostile)        # the good frames only
    assert stats["sw0:1"]["rx_packets"] == len(hostile)


def is_rarp(frame: bytes) -> bool:
    return len(frame) >= 14 and struct.unpack_from("!H", frame, 12)[0] == 0x8035


def test_switch_send_rarp_after_migration_announces_and_moves_the_mac(sockdir):
    """Live migration as the switch sees it: the guest with MAC_A ran behind port a, comes up
    behind port c (the destination QEMU's device), and QEMU sends SEND_RARP there.  Every other
    port gets QEMU's RARP announcement byte for byte, and the switch now delivers MAC_A's
    unicast to c only."""
    from protocols.ethernet import rarp_announce
    from protocols.vhost_user import FrontendReq, ProtocolFeature
    from vhost.testing.connection import WANTED_PROTOCOL_FEATURES
    socks = [sockdir / n for n in ("a", "b", "c")]
    with pyvhost_net(socks, switch="sw0") as be:
        with NetFrontend(socks[0], mac=MAC_A, timeout=TIMEOUT) as a, \
                NetFrontend(socks[1], mac=MAC_B, timeout=TIMEOUT) as b, \
                NetFrontend(socks[2], mac=MAC_C, timeout=TIMEOUT,
                            protocol_features=WANTED_PROTOCOL_FEATURES
                            | ProtocolFeature.RARP) as c:
            assert c.protocol_features & ProtocolFeature.RARP
            # before: MAC_A is learned at port a
            a.send(make_frame(64, dst=b"\xff" * 6, src=MAC_A, seq=1))
            recv_matching(b, 1)
            recv_matching(c, 1)
            b.send(make_frame(64, dst=MAC_A, src=MAC_B, seq=2))
            assert len(recv_matching(a, 1)) == 1
            assert_silent(c)
            # the guest now lives behind c: QEMU announces it
            c.setup(FrontendReq.SEND_RARP, MAC_A + b"\0\0")
            for nf in (a, b):
                got = recv_matching(nf, 1, match=is_rarp)
                assert [p.frame for p in got] == [rarp_announce(MAC_A)]
            assert_silent(c, match=is_rarp)          # never back to the announcing port
            # the switch learned MAC_A's new place
            moved = make_frame(64, dst=MAC_A, src=MAC_B, seq=3)
            b.send(moved)
            assert [p.frame for p in recv_matching(c, 1)] == [moved]
            assert_silent(a)
    assert "sent a RARP announcement for 02:0a:00:00:00:01" in be.log_text()



def test_tap_send_rarp_goes_out_of_the_tap(netns, sockdir):
    """Tap mode: SEND_RARP puts QEMU's announcement on the host's side of the tap."""
    from protocols.ethernet import ETH_P_RARP, rarp_announce
    from protocols.vhost_user import FrontendReq, ProtocolFeature
    from vhost.testing.connection import WANTED_PROTOCOL_FEATURES
    sock = sockdir / "t.sock"
    with pyvhost_net(sock, tap=TAP, netns=netns) as be:
        wait_tap_up(netns, be)
        with NetFrontend(sock, mac=GUEST_MAC, timeout=TIMEOUT,
                         protocol_features=WANTED_PROTOCOL_FEATURES
                         | ProtocolFeature.RARP) as nf:
            with capture(netns, TAP, 1, ethertypes=(ETH_P_RARP,)) as cap:
                nf.setup(FrontendReq.SEND_RARP, GUEST_MAC + b"\0\0")
                got = [f for _, f in cap.frames()]
            assert got == [rarp_announce(GUEST_MAC)]
