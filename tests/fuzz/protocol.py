"""protocol: vhost/protocol.py's BackendProtocol (framing, every request, the queue lifecycle) and
protocols/vhost_user.py's payload parsing, fed message sequences with real file descriptors
attached, against a real device with real workers: rng, blk on a small image, or net on a switch
port (another port on the switch receives what it sends).

One input = one device and a sequence of steps:
  MSG        one raw message (request, flags, payload, optionally a lying size) with fds of any
             kind: memfds sized for the regions the payload names (or a page short, or a few
             pages), eventfds, either end of a pipe, /dev/null, a socket; delivered whole, split
             as the server reads it, split anywhere, or glued to the next message (its fds then
             ride with the glued bytes, as SCM_RIGHTS does)
  SETUP      the usual start of a queue (features, optionally a dirty log first, optionally an
             inflight region got or handed back, a memory table
             or ADD_MEM_REG of a 256 KiB memfd, NUM/ADDR/BASE/CALL/KICK/ENABLE), so the fuzzer
             reaches running workers (logging ones too)
  POKE       bytes written into a memfd we handed over (the guest writing its rings)
  KICK       an eventfd we handed over is written (a kick)
  RECONNECT  connection_lost and a new conversation with the same device
Checked: nothing but ProtocolClosed leaves receive(); every reply is a well-formed reply message;
after connection_lost no queue runs, no thread is left, every fd the protocol was given is closed
and no guest memory stays mapped.

Layout: u8 device, then steps (u8 kind + the step's fields, see the methods of Conn).
"""
from __future__ import annotations

import mmap
import os
import socket
import struct
import tempfile
import threading

import devices.blk
import devices.net
import devices.rng
from cython_ext.net import Port, Switch
from protocols import vhost_user as vu
from protocols.vhost_user import FrontendReq as R
from vhost.protocol import BackendProtocol, ProtocolClosed

from tests.fuzz.data import Input

MAX_LEN = 16384
MEMFD_NAME = "fuzz-guest"
MAX_FIT = 1 << 30                  # memfds are sparse: a "fitting" one may be this large
SETUP_MEM = 256 << 10
SETUP_UVA = 0x7F00_0000_0000
KINDS = ("fit", "pages", "eventfd", "pipe-r", "pipe-w", "null", "socket", "short")
REPLY_FLAGS = vu.VERSION | vu.FLAG_REPLY

_dir = tempfile.mkdtemp(prefix="fuzz-protocol-", dir="/var/tmp")
_IMG = os.path.join(_dir, "disk.img")
with open(_IMG, "wb") as _f:
    _f.truncate(1 << 20)


def make_device(sel: int):
    """Bits 0-1: rng (0, 3), blk (1), net (2); bits 2-3: blk queues - 1; bit 4: net pairs - 1."""
    kind = (sel & 3) % 3
    if kind == 0:
        return devices.rng.RngDevice(max_bytes=1 << 20, period_ms=1000), []
    if kind == 1:
        return devices.blk.BlkDevice(_IMG, num_queues=1 + (sel >> 2) % 4), []
    sw = Switch("fuzz")
    dev = devices.net.NetDevice(pairs=1 + (sel >> 4) % 2, mac=b"\x52\x54\x00\x00\x00\x01",
                                switch=sw, port_index=0, name="fuzz")
    return dev, [sw, Port("vhost", 1, sw, 1)]         # a second port receives the floods


def memfd_maps() -> int:
    # one read and a C-level count: a per-line generator was 14 % of an execution (py-spy)
    with open("/proc/self/maps") as f:
        return f.read().count(MEMFD_NAME)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Conn:
    def __init__(self, inp: Input):
        self.inp = inp
        self.device, self.keep = make_device(inp.u8())
        self.device.stop_timeout = 10.0
        self.proto = BackendProtocol(self.device, name="fuzz")
        self.ours: list[int] = []           # fds we keep (pipe/socket peers, dups of eventfds)
        self.kicks: list[int] = []          # our dups of eventfds we handed over
        self.maps: list[mmap.mmap] = []     # our mappings of memfds we handed over
        self.pending = b""
        self.pending_fds: list[int] = []
        self.setup_map = None
        self.requests: set[int] = set()
        self.desync = False                 # a lying size: headers may come out of payloads

    # -- fds --
    def _memfd(self, size: int) -> int:
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        if size:
            self.maps.append(mmap.mmap(fd, size))
        return fd

    def _fd(self, kind: str, fit: int | None) -> int:
        if kind in ("fit", "short"):
            size = fit if fit is not None and 0 < fit <= MAX_FIT else 64 << 10
            return self._memfd(size - PAGE_SHORT if kind == "short" and size > PAGE_SHORT
                               else size)
        if kind == "pages":
            return self._memfd(mmap.PAGESIZE * (self.inp.u8() % 16))
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.kicks.append(os.dup(fd))
            return fd
        if kind in ("pipe-r", "pipe-w"):
            r, w = os.pipe()
            mine, theirs = (w, r) if kind == "pipe-r" else (r, w)
            self.ours.append(mine)
            return theirs
        if kind == "null":
            return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        a, b = socket.socketpair()
        self.ours.append(a.detach())
        return b.detach()

    @staticmethod
    def _fits(request: int, payload: bytes) -> list[int]:
        """The sizes a memfd needs for the regions this payload names, in fd order."""
        try:
            if request == R.SET_MEM_TABLE:
                return [r.size + r.mmap_offset
                        for r in vu.parse_payload(request, payload).regions]
            if request in (R.ADD_MEM_REG, R.REM_MEM_REG):
                r = vu.parse_payload(request, payload).region
                return [r.size + r.mmap_offset]
            if request in (R.SET_LOG_BASE, R.SET_INFLIGHT_FD):
                lg = vu.parse_payload(request, payload)
                return [lg.mmap_size + lg.mmap_offset]
        except Exception:       # noqa: BLE001 - a payload that does not parse names no region
            pass
        return []

    # -- delivery --
    def feed(self, data: bytes, fds: list[int]) -> None:
        try:
            replies = self.proto.receive(data, fds)
        except ProtocolClosed:
            return
        for r in replies:
            assert len(r) >= vu.HEADER_SIZE, r
            h = vu.Header.parse(r[:vu.HEADER_SIZE])
            assert h.flags == REPLY_FLAGS and h.size == len(r) - vu.HEADER_SIZE, (h, r)
            # a reply or ack echoes a request -- unless a lying size made the protocol read a
            # header out of some payload, which it then answers as a request of its own
            assert self.desync or h.request in self.requests, h
            for fd in getattr(r, "fds", ()):                # borrowed: still the protocol's
                os.fstat(fd)

    def send(self, request: int, payload: bytes, flags: int = vu.VERSION, fds=(),
             size: int | None = None, delivery: int = 0) -> None:
        self.requests.add(request)
        if size is not None and size != len(payload):
            self.desync = True
        data = struct.pack("<III", request, flags, len(payload) if size is None else size)
        data += payload
        fds = list(fds)
        if self.pending:
            data, fds = self.pending + data, self.pending_fds + fds
            self.pending, self.pending_fds = b"", []
        if delivery == 3:
            self.pending, self.pending_fds = data, fds
        elif delivery == 1 and len(data) > vu.HEADER_SIZE:      # as vhost/server.py reads
            self.feed(data[:vu.HEADER_SIZE], fds)
            self.feed(data[vu.HEADER_SIZE:], [])
        elif delivery == 2 and len(data) > 1:
            cut = 1 + self.inp.u16() % (len(data) - 1)
            self.feed(data[:cut], fds)
            self.feed(data[cut:], [])
        else:
            self.feed(data, fds)

    # -- steps --
    def msg(self) -> None:
        inp = self.inp
        r = inp.u8()
        request = r if r < 64 else inp.u32()
        fl = inp.u8()
        size = inp.u32() if fl & 0x40 else None
        payload = inp.bytes(inp.u16() % 4200)
        fits = self._fits(request, payload)
        n = inp.u8() % 10
        fds = [self._fd(KINDS[inp.u8() % len(KINDS)], fits[k] if k < len(fits) else None)
               for k in range(n)]
        self.send(request, payload, fl & 0x0F, fds, size, inp.u8() % 4)

    def setup(self) -> None:
        inp = self.inp
        q = inp.u8() % 8
        qsize = 1 << inp.u8() % 9
        mask = inp.u64()
        opts = inp.u8()
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if opts & 0x20 else 0)
        offered = self.proto.offered_features
        if opts & 1:
            pf = int(self.proto.offered_protocol_features)
            self.send(R.GET_PROTOCOL_FEATURES, b"")
            self.send(R.SET_PROTOCOL_FEATURES, vu.u64(pf if opts & 0x40 else pf & mask >> 32))
        self.send(R.SET_OWNER, b"")
        self.send(R.GET_FEATURES, b"")
        if opts & 0x80:         # a dirty log, as QEMU sets one before LOG_ALL at migration
            size = 1 + inp.u16()
            fd = self._memfd(-(-size // PAGE_SHORT) * PAGE_SHORT)
            self.send(R.SET_LOG_BASE, vu.Log.build(dict(mmap_size=size, mmap_offset=0)),
                      vu.VERSION, [fd])
        # mask bits 63 / 62 (no feature): an inflight region as QEMU's vhost-user-blk gets it
        # (GET_INFLIGHT_FD) or hands one back after a restart (SET_INFLIGHT_FD; POKE may
        # scribble on it: a frontend's garbage is recovered from)
        nq = 1 + q % max(1, len(self.proto.queues))
        if mask >> 63 & 1:
            self.send(R.GET_INFLIGHT_FD, vu.Inflight.build(dict(
                mmap_size=0, mmap_offset=0, num_queues=nq, queue_size=qsize)))
        if mask >> 62 & 1:
            size = nq * vu.inflight_queue_size(qsize)
            self.send(R.SET_INFLIGHT_FD, vu.Inflight.build(dict(
                mmap_size=size, mmap_offset=0, num_queues=nq, queue_size=qsize)), flags,
                [self._memfd(size)])
        self.send(R.SET_FEATURES, vu.u64(offered & mask), flags)
        if not opts & 4 or self.setup_map is None:
            fd = self._memfd(SETUP_MEM)
            self.setup_map = self.maps[-1]
            region = dict(guest_addr=0, size=SETUP_MEM, user_addr=SETUP_UVA, mmap_offset=0)
            if opts & 2:
                self.send(R.ADD_MEM_REG, vu.SingleMemoryRegion.build(dict(padding=0,
                                                                           region=region)),
                          flags, [fd])
            else:
                self.send(R.SET_MEM_TABLE, vu.MemoryTable.build(
                    dict(num_regions=1, padding=0, regions=[region])), flags, [fd])
        base = SETUP_UVA + q * 0x4000
        self.send(R.SET_VRING_NUM, vu.VringState.build(dict(index=q, num=qsize)), flags)
        self.send(R.SET_VRING_ADDR, vu.VringAddr.build(dict(
            index=q, flags=0, descriptor=base, used=base + 0x3000, available=base + 0x2000,
            log=0)), flags)
        self.send(R.SET_VRING_BASE, vu.VringState.build(dict(index=q, num=inp.u16())), flags)
        if not opts & 16:
            self.send(R.SET_VRING_CALL, vu.u64(q), flags, [self._fd("eventfd", None)])
        if opts & 8:
            self.send(R.SET_VRING_KICK, vu.u64(q | vu.VRING_NOFD_MASK), flags)
        else:
            self.send(R.SET_VRING_KICK, vu.u64(q), flags, [self._fd("eventfd", None)])
        self.send(R.SET_VRING_ENABLE, vu.VringState.build(dict(index=q, num=1)), flags)

    def poke(self) -> None:
        inp = self.inp
        k = inp.u8()
        off = inp.u32()
        data = inp.bytes(inp.u8() % 64 + 1)
        m = self.setup_map if k & 0x80 and self.setup_map is not None else \
            (self.maps[k % len(self.maps)] if self.maps else None)
        if m is None or not data:
            return
        off %= len(m)
        m[off:off + len(data)] = data[:len(m) - off]

    def kick(self) -> None:
        k = self.inp.u8()
        if self.kicks:
            os.eventfd_write(self.kicks[k % len(self.kicks)], 1)

    def reconnect(self) -> None:
        self.flush()
        self.proto.connection_lost()
        self.proto = BackendProtocol(self.device, name="fuzz")
        self.desync = False

    def flush(self) -> None:
        if self.pending or self.pending_fds:
            data, fds = self.pending, self.pending_fds
            self.pending, self.pending_fds = b"", []
            self.feed(data, fds)

    def close(self) -> None:
        """End the conversation; release our side; the device's own resources."""
        try:
            self.flush()
        finally:
            self.proto.connection_lost()
            running = self.device.queues.running()
            assert not running, f"workers still running after connection_lost: {running}"
            for m in self.maps:
                m.close()
            for fd in self.ours + self.kicks:
                os.close(fd)
            close = getattr(self.device, "close", None)
            if close is not None:
                close()
            for p in self.keep:
                if isinstance(p, Port):
                    p.detach()
            self.keep = []


PAGE_SHORT = mmap.PAGESIZE


def TestOneInput(data: bytes) -> None:
    fds, threads, maps = fd_count(), threading.active_count(), memfd_maps()
    inp = Input(data)
    conn = Conn(inp)
    steps = (conn.msg, conn.msg, conn.msg, conn.setup, conn.poke, conn.kick, conn.msg,
             conn.reconnect)
    try:
        while inp.remaining():
            steps[inp.u8() % len(steps)]()
    finally:
        conn.close()
    assert threading.active_count() == threads, \
        f"{threading.active_count() - threads} threads left behind"
    assert memfd_maps() == maps, "guest memory still mapped after connection_lost"
    assert fd_count() == fds, f"{fd_count() - fds} fds leaked"
