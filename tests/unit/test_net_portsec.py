"""Switch port security (cython_ext/net.pyx) in memory: a port locked to its MAC (a locked
entry of the MAC table: never aged, never learned by another port; frames from the port with
another source, or from another port with the locked MAC, dropped and counted), and the
per-port cap on learned MACs (refused learns counted, aged entries reclaimed at a bounded
rate, a capped port never evicting another port's live entry).

The table is driven through Switch.learn / Switch.lookup (what a frame's source / destination
does); the frame path through switch ports whose "tap" ends are SOCK_SEQPACKET socketpairs,
each read by its NetWorker("uplink") thread, as the switch's uplink tap is."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from cython_ext.net import (MAC_NEIGHBOURHOOD, MAC_TABLE_SLOTS, NetWorker, Port, Switch,
                            mac_slot)
from protocols import virtio_net as vn

MAC_A = bytes.fromhex("020a00000001")
MAC_B = bytes.fromhex("020b00000002")
MAC_C = bytes.fromhex("020c00000003")
BCAST = b"\xff" * 6
HDR = bytes(vn.HDR_SIZE)


def station(k: int) -> bytes:
    """A locally administered unicast MAC, one per k."""
    return b"\x06\x00" + k.to_bytes(4, "big")


def same_slot(n: int, start: int = 0) -> list[bytes]:
    """n MACs whose table neighbourhoods start at the same slot (they fill it in order)."""
    want = None
    out = []
    k = start
    while len(out) < n:
        m = station(k)
        k += 1
        s = mac_slot(m)
        if want is None:
            want = s
        if s == want:
            out.append(m)
    return out


def test_locked_mac_never_ages_and_is_never_learned_by_another_port():
    sw = Switch("s", 0.05)
    a, b = Port("tap", 1, sw, 0), Port("tap", 1, sw, 1)
    a.set_mac(MAC_A, lock=True)
    assert sw.lookup(MAC_A) == 0                  # known before A ever sent a frame
    time.sleep(0.12)                              # well past the ageing time
    assert sw.lookup(MAC_A) == 0
    assert sw.learn(MAC_A, 1) == "conflict"       # a spoofer on an unlocked port
    assert sw.lookup(MAC_A) == 0
    assert sw.learn(MAC_A, 0) == "ok"             # A itself
    assert sw.stats()["mac_locked"] == 1 and sw.stats()["mac_entries"] == 0
    assert b.mac_entries() == 0
    with pytest.raises(ValueError, match="already locked to switch port 0"):
        b.set_mac(MAC_A, lock=True)
    a.detach()                                    # the port leaves: its locked entry too
    assert sw.lookup(MAC_A) == -1 and sw.stats()["mac_locked"] == 0
    assert sw.learn(MAC_A, 1) == "ok" and sw.lookup(MAC_A) == 1
    b.set_mac(MAC_B, lock=True)                   # re-locking moves the locked entry
    b.set_mac(MAC_C, lock=True)
    assert sw.lookup(MAC_B) == -1 and sw.lookup(MAC_C) == 1
    assert sw.stats()["mac_locked"] == 1


def test_port_security_needs_a_mac_and_a_switch():
    sw = Switch("s")
    p = Port("vhost", 1, sw, 0)
    with pytest.raises(ValueError, match="needs its MAC"):
        p.set_mac(None, lock=True)
    with pytest.raises(ValueError, match="group"):
        p.set_mac(BCAST, lock=True)
    with pytest.raises(ValueError, match="switch port"):
        Port("vhost", 1).set_mac(MAC_A, lock=True)


def test_learn_limit_refuses_beyond_the_cap():
    sw = Switch("s", 300.0)
    a, b = Port("tap", 1, sw, 0), Port("tap", 1, sw, 1)
    a.set_mac(None, limit=4)
    assert [sw.learn(station(k), 0) for k in range(6)] == ["ok"] * 4 + ["refused"] * 2
    assert a.mac_entries() == 4
    assert sw.lookup(station(4)) == -1            # not learned: frames to it are flooded
    assert sw.learn(station(0), 0) == "ok"        # refreshing a held entry is always fine
    # a station moving to a port at its cap is refused too (the cap bounds what it holds)
    assert sw.learn(station(100), 1) == "ok"
    assert sw.learn(station(100), 0) == "refused" and sw.lookup(station(100)) == 1
    # other ports are not limited by A's cap; 0 is no limit
    assert all(sw.learn(station(1000 + k), 1) == "ok" for k in range(300))
    assert b.mac_entries() == 301 and a.mac_entries() == 4
    assert sw.stats()["mac_entries"] == 305


def test_a_capped_port_whose_entries_aged_learns_again():
    """Ageing is lazy (an aged entry keeps its slot), so a port at its cap reclaims aged
    entries before refusing."""
    sw = Switch("s", 0.05)
    a = Port("tap", 1, sw, 0)
    a.set_mac(None, limit=4)
    assert all(sw.learn(station(k), 0) == "ok" for k in range(4))
    assert sw.learn(station(10), 0) == "refused"
    time.sleep(0.15)                              # every entry aged
    assert sw.learn(station(11), 0) == "ok"
    assert a.mac_entries() == 1                   # the aged ones were reclaimed
    assert sw.stats()["mac_entries"] == 1
    assert all(sw.learn(station(20 + k), 0) == "ok" for k in range(3))
    assert sw.learn(station(30), 0) == "refused"


def test_reclaim_is_rate_limited_under_a_flood_of_source_macs():
    """A port at its cap sending random source MACs must not make every frame scan the whole
    table: aged entries are reclaimed at most once per min(1 s, ageing)."""
    sw = Switch("s", 0.2)
    a = Port("tap", 1, sw, 0)
    a.set_mac(None, limit=8)
    t0 = time.monotonic()
    verdicts = [sw.learn(station(k), 0) for k in range(20000)]
    elapsed = time.monotonic() - t0
    assert verdicts.count("ok") == 8 and verdicts.count("refused") == 20000 - 8
    assert sw.stats()["reclaims"] <= elapsed / 0.2 + 2, (sw.stats(), elapsed)
    assert a.mac_entries() == 8


def test_a_capped_port_never_evicts_other_ports_entries():
    sw = Switch("s", 300.0)
    a, b, c = Port("tap", 1, sw, 0), Port("tap", 1, sw, 1), Port("tap", 1, sw, 2)
    b.set_mac(None, limit=1)
    macs = same_slot(MAC_NEIGHBOURHOOD + 2)
    hood, extra = macs[:MAC_NEIGHBOURHOOD], macs[MAC_NEIGHBOURHOOD:]
    assert all(sw.learn(m, 0) == "ok" for m in hood)        # A fills one neighbourhood
    assert sw.learn(station(999999), 1) == "ok"              # B reaches its cap elsewhere
    assert sw.learn(extra[0], 1) == "refused"                # and cannot push A out
    assert [sw.lookup(m) for m in hood] == [0] * MAC_NEIGHBOURHOOD
    assert (a.mac_entries(), b.mac_entries()) == (MAC_NEIGHBOURHOOD, 1)
    # a port below its cap takes the oldest entry of a full neighbourhood (as before)
    assert sw.learn(extra[1], 2) == "ok"
    assert sw.lookup(extra[1]) == 2 and sw.lookup(hood[0]) == -1
    assert (a.mac_entries(), c.mac_entries()) == (MAC_NEIGHBOURHOOD - 1, 1)
    assert sw.stats()["mac_entries"] == a.mac_entries() + b.mac_entries() + c.mac_entries()


def test_the_option_range_matches_the_table():
    from devices.net import DEFAULT_MAC_LIMIT, MAC_TABLE_SIZE
    assert MAC_TABLE_SLOTS == MAC_TABLE_SIZE and 0 < DEFAULT_MAC_LIMIT < MAC_TABLE_SIZE


def test_locked_entries_are_never_evicted():
    sw = Switch("s", 300.0)
    a, c = Port("tap", 1, sw, 0), Port("tap", 1, sw, 2)
    macs = same_slot(3 * MAC_NEIGHBOURHOOD)
    a.set_mac(macs[0], lock=True)                  # the first slot of the neighbourhood
    assert all(sw.learn(m, 2) in ("ok",) for m in macs[1:])   # unlimited: churns the rest
    assert sw.lookup(macs[0]) == 0
    assert c.mac_entries() == MAC_NEIGHBOURHOOD - 1


# -- the frame path ---------------------------------------------------------------------------

class SwitchRig:
    """Ports 0..n-1 of one switch, each a "tap" port whose far end (`peer[k]`) the test
    writes frames into (forwarded by the port's reader) and reads delivered frames from."""

    def __init__(self, n: int = 3, ageing: float = 300.0):
        self.sw = Switch("sw", ageing)
        self.ports, self.peers, self.socks, self.workers, self.threads = [], [], [], [], []
        for k in range(n):
            s, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            peer.settimeout(5)
            for x in (s, peer):
                x.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                x.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            port = Port("tap", 1, self.sw, k, s.fileno())
            self.ports.append(port)
            self.socks.append(s)
            self.peers.append(peer)

    def start(self):
        for k, port in enumerate(self.ports):
            w = NetWorker("uplink", port, 0, self.sw, self.socks[k].fileno())
            t = threading.Thread(target=w.run, daemon=True)
            t.start()
            self.workers.append(w)
            self.threads.append(t)

    def send(self, k: int, dst: bytes, src: bytes, seq: int = 0, size: int = 60) -> bytes:
        frame = dst + src + b"\x88\xb5" + seq.to_bytes(4, "big") + bytes(size - 18)
        self.peers[k].send(HDR + frame)
        return frame

    def received(self, k: int, quiet: float = 0.2) -> list[bytes]:
        out = []
        self.peers[k].settimeout(quiet)
        try:
            while True:
                out.append(self.peers[k].recv(70000)[vn.HDR_SIZE:])
        except TimeoutError:
            return out

    def stats(self, k: int) -> dict:
        out = self.ports[k].stats()
        for key, v in self.workers[k].stats().items():
            out[key] += v
        return out

    def close(self):
        for w in self.workers:
            w.stop()
        for t in self.threads:
            t.join(5)
            assert not t.is_alive()
        for x in self.socks + self.peers:
            x.close()


@pytest.fixture
def rig():
    r = SwitchRig()
    yield r
    r.close()


def test_frames_with_a_spoofed_source_are_dropped_and_counted(rig):
    a, b, c = 0, 1, 2
    rig.ports[a].set_mac(MAC_A, lock=True)
    rig.ports[b].set_mac(MAC_B, lock=True)
    rig.start()
    # B claims A's MAC: dropped, whatever the destination
    rig.send(b, BCAST, MAC_A, seq=1)
    rig.send(b, MAC_C, MAC_A, seq=2)
    # C reaches A by A's locked entry before A ever sent anything; B sees nothing
    f = rig.send(c, MAC_A, MAC_C, seq=3)
    assert rig.received(a) == [f]
    assert rig.received(b) == []
    # C (not locked) claiming A's MAC is dropped too, and does not move the entry
    rig.send(c, BCAST, MAC_A, seq=4)
    f = rig.send(c, MAC_A, MAC_C, seq=5)
    assert rig.received(a) == [f] and rig.received(b) == []
    # B with its own MAC is fine: C was learned from its frames, so only C gets it
    f = rig.send(b, MAC_C, MAC_B, seq=6)
    assert rig.received(c) == [f] and rig.received(a) == []
    sb, sc = rig.stats(b), rig.stats(c)
    assert (sb["tx_dropped_src_mac"], sb["tx_dropped"], sb["tx_packets"]) == (2, 2, 3)
    assert (sc["tx_dropped_src_mac"], sc["tx_dropped"]) == (1, 1)
    assert rig.stats(a)["rx_packets"] == 2
    assert rig.sw.lookup(MAC_A) == a


def test_a_flood_of_source_macs_is_capped_and_counted(rig):
    a, b, c = 0, 1, 2
    rig.ports[c].set_mac(None, limit=16)
    rig.start()
    rig.send(a, BCAST, MAC_A, seq=0)
    rig.send(b, BCAST, MAC_B, seq=0)
    rig.send(c, BCAST, MAC_C, seq=0)             # C's own MAC: 1 of its 16
    for k in (a, b, c):
        assert len(rig.received(k)) == 2
    n = 3000
    for k in range(n):                           # to C's own MAC: learned, never delivered
        rig.send(c, MAC_C, station(k), seq=k)
    deadline = time.monotonic() + 10
    while rig.stats(c)["tx_packets"] < n + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    f = rig.send(b, MAC_A, MAC_B, seq=1)         # A and B were not pushed out
    assert rig.received(a) == [f] and rig.received(c) == []
    sc = rig.stats(c)
    assert sc["mac_learn_refused"] == n - 15, sc
    assert sc["hairpin_filtered"] == n
    assert rig.ports[c].mac_entries() == 16
    assert rig.sw.lookup(station(0)) == c and rig.sw.lookup(station(n - 1)) == -1
    # and it still reaches its learned stations; a refused one is flooded
    f = rig.send(a, station(0), MAC_A, seq=2)
    assert rig.received(c) == [f] and rig.received(b) == []
    f = rig.send(a, station(n - 1), MAC_A, seq=3)
    assert rig.received(c) == [f] and rig.received(b) == [f]
