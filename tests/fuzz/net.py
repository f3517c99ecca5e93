"""net: the virtio-net data path (cython_ext/net.pyx): tx chains with arbitrary virtio_net_hdr
and frames (GSO types, csum_start/offset, sizes, 10/12-byte headers) sent through the switch into
another port's rx queue (MRG_RXBUF on/off, any offload set, buffers of any size), both ways, plus
a tap port on the switch; or a tap-mode pair (tx to a SOCK_SEQPACKET "tap", frames from it into
the rx queue).  Every guest's RAM is guard-paged (vhost/testing/guarded.py).

Besides memory safety, a content oracle: when a guest posted only well-formed chains, every frame
that arrives in an rx queue must be, in order, one of the frames sent to it, byte for byte (the
header's first 10 bytes, num_buffers = the buffers used, a software checksum where the receiver
lacks GUEST_CSUM), and in tap mode the tap must receive exactly the frames the guest sent.

Workers run the runtime loop (worker.pyx) with the stop flag set: two batches each, synchronous.

Layout: u8 config (bit 0 tap mode, bit 1 a tap port on the switch, bit 2 INDIRECT_DESC);
per guest: u8 features, u8 tx size, u8 rx size, u8 memory, rx buffers, tx frames; tap mode:
frames the tap delivers.  See build_guest.
"""
from __future__ import annotations

import os
import socket
import struct

from cython_ext.net import NetWorker, Port, Switch
from vhost.testing.guarded import PAGE, GuardedMemory

from tests.fuzz.data import Input

MAX_LEN = 8192
MAX_FRAME = 65536 + 18
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
U64 = (1 << 64) - 1
MACS = [b"\x02\x00\x00\x00\x00\xaa", b"\x02\x00\x00\x00\x00\xbb", b"\x02\x00\x00\x00\x00\xcc"]
BCAST = b"\xff" * 6
_CALL = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def csum(data: bytes) -> int:
    """RFC 1071 over data (odd tail padded), complemented."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class Queue:
    """The driver side of one split virtqueue laid out in guarded guest memory."""

    def __init__(self, mem: GuardedMemory, host: int, gpa: int, size: int):
        self.mem, self.size = mem, size
        self.desc, self.desc_gpa = host, gpa
        self.avail = host + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end_gpa = gpa + (self.used + 6 + 8 * size - host)
        self.next_desc = 0
        self.avail_idx = 0
        self.chains: dict[int, list] = {}     # head -> [(gpa, len)] of a well-formed chain

    def _write(self, host: int, data: bytes) -> None:
        r = self.mem.region_of_host(host, len(data))
        r.write(host - r.host, data)

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self._write(self.desc + 16 * i, struct.pack("<QIHH", addr & U64, length & 0xFFFFFFFF,
                                                    flags & 0xFFFF, nxt & 0xFFFF))

    def add(self, segs: list, indirect_at: int | None = None, raw_flags=None) -> int | None:
        """segs: [(gpa, len, flags)]; chained with NEXT.  indirect_at: the GPA of a table
        (16-byte aligned, room for the entries) to put them in, with one descriptor in the
        ring pointing at it.  Returns the head, or None when the table is full."""
        n = 1 if indirect_at is not None else len(segs)
        if self.next_desc + n > self.size or not segs:
            return None
        first = self.next_desc
        self.next_desc += n
        if indirect_at is not None:
            h = self.mem.gpa_to_host(indirect_at, 16 * len(segs))
            for k, (g, ln, fl) in enumerate(segs):
                more = k + 1 < len(segs)
                self._write(h + 16 * k, struct.pack("<QIHH", g, ln, fl | (F_NEXT if more else 0),
                                                    k + 1 if more else 0))
            self.write_desc(first, indirect_at, 16 * len(segs), F_INDIRECT, 0)
        else:
            for k, (g, ln, fl) in enumerate(segs):
                more = k + 1 < len(segs)
                self.write_desc(first + k, g, ln, fl | (F_NEXT if more else 0),
                                first + k + 1 if more else 0)
        return first

    def publish(self, head: int) -> None:
        self._write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx += 1
        self._write(self.avail + 2, struct.pack("<H", self.avail_idx & 0xFFFF))

    def used_entries(self) -> list[tuple[int, int]]:
        r = self.mem.region_of_host(self.used, 4)
        idx = struct.unpack("<H", r.read(self.used + 2 - r.host, 2))[0]
        out = []
        for k in range(min(idx, self.size)):
            at = self.used + 4 + 8 * k
            out.append(struct.unpack("<II", r.read(at - r.host, 8)))
        return out

    def read_chain(self, head: int, n: int) -> bytes:
        out = b""
        for g, ln in self.chains[head]:
            take = min(ln, n - len(out))
            if take <= 0:
                break
            h = self.mem.gpa_to_host(g, take)
            r = self.mem.region_of_host(h, take)
            out += r.read(h - r.host, take)
        return out


class Guest:
    """One guest's RAM (1-2 guarded regions), its tx and rx queues, what it sent and posted."""

    def __init__(self, inp: Input, index: int, indirect: bool):
        self.index = index
        feat = inp.u8()
        self.mrg, self.csum = bool(feat & 2), bool(feat & 4)
        # the device uses the 12-byte header with VERSION_1 or MRG_RXBUF (devices/net.py)
        self.hdr_len = 12 if feat & 1 or self.mrg else 10
        self.tso4, self.tso6, self.ufo, self.ecn = (bool(feat & b) for b in (8, 16, 32, 64))
        self.event_idx = bool(feat & 128)
        self.indirect = indirect
        tx_size, rx_size = 1 << inp.u8() % 9, 1 << inp.u8() % 9
        m = inp.u8()
        self.mem = GuardedMemory()
        rings = -(-(2 * (16 * 256 + 6 + 2 * 256 + 6 + 8 * 256 + 8)) // PAGE) * PAGE
        gpa = 0x1000_0000 * (index + 1)
        r0 = self.mem.add(gpa, rings + PAGE * (16 + (m >> 2) % 48), align_end=bool(m & 2))
        if m & 1:
            self.mem.add(r0.gpa + r0.size + PAGE * (m >> 6), PAGE * (8 + (m >> 3) % 64),
                         align_end=not m & 2)
        self.tx = Queue(self.mem, r0.host, r0.gpa, tx_size)
        self.rx = Queue(self.mem, r0.host + (self.tx.end_gpa - r0.gpa + 15 & ~15),
                        (self.tx.end_gpa + 15) & ~15, rx_size)
        self.cursor = [(r.gpa + (self.rx.end_gpa - r0.gpa if r is r0 else 0) + 63 & ~63, r)
                       for r in self.mem.regions]
        self.sent: list[tuple[bytes, bytes]] = []      # well-formed tx: (header, frame)
        self.hostile_tx = self.hostile_rx = False
        # an rx buffer at a fuzzed address may lie over this guest's own tx frames: what it
        # receives then rewrites what it sends, so its frames cannot be checked at the peer
        self.rx_over_tx = False

    def alloc(self, n: int, align: int = 16) -> int | None:
        for k, (at, r) in enumerate(self.cursor):
            at = (at + align - 1) & ~(align - 1)
            if at + n <= r.gpa + r.size:
                self.cursor[k] = (at + n, r)
                return at
        return None

    def write(self, gpa: int, data: bytes) -> None:
        h = self.mem.gpa_to_host(gpa, len(data))
        r = self.mem.region_of_host(h, len(data))
        r.write(h - r.host, data)

    def hostile_gpa(self, inp: Input) -> int:
        r = self.mem.regions[inp.u8() % len(self.mem.regions)]
        return [r.gpa - 8, r.gpa + r.size - 8, r.gpa + r.size, 0, U64 - 7,
                r.gpa + inp.u32() % r.size][inp.u8() % 6]

    def segments(self, inp: Input, gpa: int, n: int, flags: int) -> list:
        parts = inp.u8() % 4 + 1
        step = max(1, -(-n // parts))
        return [(gpa + o, min(step, n - o), flags) for o in range(0, n, step)] or [(gpa, 0, flags)]

    def add_chain(self, q: Queue, inp: Input, segs: list) -> int | None:
        table = None
        if self.indirect and inp.flag():
            table = self.alloc(16 * len(segs))
            if table is None:
                return None
        return q.add(segs, table)


def frame(inp: Input) -> bytes:
    dst = inp.pick([BCAST, MACS[0], MACS[1], MACS[2], b"\x01\x00\x5e\x00\x00\x01",
                    b"\x02" + bytes(5)])
    src = inp.pick(MACS + [BCAST])
    kind = inp.u8() % 8
    n = [0, 1, 46, 1500, 9000, MAX_FRAME - 14, inp.u16(), inp.u16()][kind]
    pattern = inp.bytes(inp.u8() % 64 + 1) or b"\x5a"
    f = (dst + src + struct.pack("!H", inp.u16()) + (pattern * (n // len(pattern) + 1))[:n])
    if kind == 0:
        f = f[:inp.u8() % 15]                    # runts, the empty frame included
    return f[:MAX_FRAME]


def header(inp: Input, f: bytes) -> bytes:
    flags = inp.u8() & 7
    gso = inp.pick([0, 0, 0, 1, 3, 4, 5, 0x81, 0x84, 2, 0xFF])
    start = inp.pick([14, 34, 54, 0, len(f) - 2, len(f), inp.u16()])
    off = inp.pick([6, 16, 0, 1, inp.u16()])
    return struct.pack("<BBHHHHH", flags, gso, inp.u16(), inp.u16(), start & 0xFFFF,
                       off & 0xFFFF, inp.u16())


def post_rx(g: Guest, inp: Input) -> None:
    for _ in range(min(inp.u8() % 17, g.rx.size)):
        size = inp.pick([1, 10, 12, 60, 64, 1514, 1526, 2048, 4096, 9018, 65562, inp.u16()])
        kind = inp.u8()
        gpa = g.alloc(size)
        if gpa is None:
            return
        if kind >= 0xE0:                         # hostile: readable, outside, empty
            g.hostile_rx = True
            g.rx_over_tx |= kind & 3 == 1
            segs = [[(gpa, size, 0)], [(g.hostile_gpa(inp), size, F_WRITE)],
                    [(gpa, 0, F_WRITE)], [(gpa, size, F_WRITE), (gpa, size, 0)]][kind & 3]
            head = g.add_chain(g.rx, inp, segs)
        else:
            segs = g.segments(inp, gpa, size, F_WRITE)
            head = g.add_chain(g.rx, inp, segs)
            if head is not None:
                g.rx.chains[head] = [(s[0], s[1]) for s in segs]
        if head is not None:
            g.rx.publish(head)


def post_tx(g: Guest, inp: Input) -> None:
    for _ in range(min(inp.u8() % 9, g.tx.size)):
        f = frame(inp)
        h = header(inp, f)[:g.hdr_len]
        data = h + f
        kind = inp.u8()
        gpa = g.alloc(len(data))
        if gpa is None:
            return
        g.write(gpa, data)
        if kind >= 0xE0:
            g.hostile_tx = True
            segs = [[(gpa, len(data), F_WRITE)], [(g.hostile_gpa(inp), len(data), 0)],
                    [(gpa, g.hdr_len, 0)], [(gpa, 0xFFFFFFFF, 0)]][kind & 3]
        else:
            segs = g.segments(inp, gpa, len(data), 0)
        head = g.add_chain(g.tx, inp, segs)
        if head is None:
            return
        g.tx.publish(head)
        if kind < 0xE0:
            g.sent.append((h, f))


def expected(h: bytes, f: bytes, rx: Guest) -> tuple[bytes, bytes] | None:
    """What `rx` must find for a frame sent as (h, f): its header's first 10 bytes and the
    frame; None: it cannot arrive (a checksum the backend cannot place)."""
    eh = bytearray(h[:10].ljust(10, b"\0"))
    if eh[1] & 0x7F == 0 and eh[0] & 1 and not rx.csum:
        start, off = struct.unpack_from("<HH", eh, 6)
        if start >= len(f) or start + off + 2 > len(f):
            return None
        c = csum(f[start:])
        f = f[:start + off] + struct.pack("!H", c) + f[start + off + 2:]
        eh[0] &= ~1
    return bytes(eh), f


def check_delivery(rx: Guest, sent: list[tuple[bytes, bytes]]) -> None:
    """Every frame in rx's used ring is, in order, one of `sent` as rx must see it."""
    entries = rx.rx.used_entries()
    pos, k = 0, 0
    while k < len(entries):
        head, ln = entries[k]
        if ln == 0:                              # a dropped frame's buffers come back empty
            k += 1
            continue
        data = rx.rx.read_chain(head, ln)
        nb = struct.unpack_from("<H", data, 10)[0] if rx.hdr_len == 12 else 1
        assert nb >= 1 and k + nb <= len(entries), (nb, k, len(entries))
        if not rx.mrg:
            assert nb == 1, nb
        for head2, ln2 in entries[k + 1:k + nb]:
            assert ln2 > 0, entries
            data += rx.rx.read_chain(head2, ln2)
        k += nb
        got = (data[:10], data[rx.hdr_len:])
        while pos < len(sent) and expected(*sent[pos], rx) != got:
            pos += 1
        assert pos < len(sent), f"guest {rx.index} received a frame nobody sent: {got[0].hex()} " \
                                f"{len(got[1])} bytes"
        pos += 1


def rx_attach(port: Port, g: Guest) -> None:
    port.set_features(hdr_len=g.hdr_len, mrg_rxbuf=g.mrg, guest_csum=g.csum, guest_tso4=g.tso4,
                      guest_tso6=g.tso6, guest_ufo=g.ufo, guest_ecn=g.ecn)
    port.attach_rx(0, g.rx.size, g.rx.desc, g.rx.avail, g.rx.used, 0, g.mem.table_bytes(),
                   _CALL, g.event_idx, g.indirect)


def tx_args(g: Guest, kick: int = -1) -> tuple:
    return (g.tx.size, g.tx.desc, g.tx.avail, g.tx.used, 0, kick, _CALL, g.event_idx,
            g.indirect, False)


def run(w: NetWorker) -> None:
    w.stop()
    w.run()
    w.run()


def switch_mode(cfg: int, inp: Input, guests: list) -> None:
    sw = Switch("fuzz")
    ports = [Port("vhost", 1, sw, k) for k in range(2)]
    tap = peer = None
    if cfg & 2:
        tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tap.setblocking(False)
        ports.append(Port("tap", 1, sw, 2, tap.fileno()))
    try:
        for p, g in zip(ports, guests):
            rx_attach(p, g)
        for k in (1, 0):         # guest 1 first: the switch learns its MAC before guest 0 sends
            g = guests[k]
            run(NetWorker("switch", ports[k], 0, sw, -1, tx_args(g), -1, g.mem.table_bytes()))
        for p in ports[:2]:
            p.detach_rx(0)
        for k in (0, 1):
            rx, tx = guests[k], guests[1 - k]
            if not rx.hostile_rx and not tx.hostile_tx and not tx.rx_over_tx:
                check_delivery(rx, tx.sent)
    finally:
        for p in ports:
            if p.rx_active(0):
                p.detach_rx(0)          # before the guest memory goes
            p.detach()
        if tap is not None:
            tap.close()
            peer.close()


def tap_mode(inp: Input, g: Guest) -> None:
    tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (tap, peer):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    from_tap = []
    for _ in range(inp.u8() % 5):
        f = frame(inp)
        h = header(inp, f)[:g.hdr_len]
        try:
            peer.send(h + f)
        except OSError:
            break
        if len(f) > 0:
            from_tap.append((h, f))
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    port = Port("vhost", 1)
    try:
        rx_attach(port, g)
        run(NetWorker("tap", port, 0, None, tap.fileno(), tx_args(g), kick, g.mem.table_bytes()))
        port.detach_rx(0)
        got = []
        while True:
            try:
                got.append(peer.recv(MAX_FRAME + 64))
            except BlockingIOError:
                break
        if not g.hostile_tx and not g.rx_over_tx:
            want = [h + f for h, f in g.sent if 0 < len(f) <= MAX_FRAME]
            assert got == want, \
                f"the tap got {[len(x) for x in got]}, sent {[len(x) for x in want]}"
        if not g.hostile_rx:
            check_delivery(g, from_tap)
    finally:
        if port.rx_active(0):
            port.detach_rx(0)
        os.close(kick)
        tap.close()
        peer.close()


def TestOneInput(data: bytes) -> None:
    inp = Input(data)
    cfg = inp.u8()
    guests = []
    try:
        for k in range(1 if cfg & 1 else 2):
            g = Guest(inp, k, bool(cfg & 4))
            guests.append(g)
            post_rx(g, inp)
            post_tx(g, inp)
        if cfg & 1:
            tap_mode(inp, guests[0])
        else:
            switch_mode(cfg, inp, guests)
        for g in guests:
            assert g.mem.slack_intact(), "a write landed in a region's page slack"
    finally:
        for g in guests:
            g.mem.close()
