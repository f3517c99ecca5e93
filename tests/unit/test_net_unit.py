"""virtio-net workers (cython_ext/net.pyx) in memory: a SOCK_SEQPACKET socketpair stands in for
the tap (one read = one frame, as on a tap), the driver side of the rings is vhost/testing's
VirtQueue.  Mergeable-buffer filling from 60 B to 64 KiB, too-small rx buffers, hostile tx and rx
chains (dropped, counted, the queue keeps serving), software checksums and GSO refusal."""
import os
import select
import socket
import struct
import threading
import time

import pytest

from cython_ext.net import NetWorker, Port
from protocols import virtio_net as vn
from vhost.testing import hostile
from vhost.testing.ringrig import F_INDIRECT, F_NEXT, F_WRITE, HOLE, MEM, SwitchPair
from vhost.testing.ram import GuestRAM, pc_two_region_layout
from vhost.testing.virtqueue import VirtQueue
from vhost.memory import GuestMemory, MappedRegion

HDR = vn.HDR_SIZE


def hdr(flags=0, gso=0, hdr_len=0, gso_size=0, cs_start=0, cs_off=0, nbuf=0):
    return vn.NetHdr.build(dict(flags=flags, gso_type=gso, hdr_len=hdr_len, gso_size=gso_size,
                                csum_start=cs_start, csum_offset=cs_off, num_buffers=nbuf))


class NetRig:
    def __init__(self, *, mrg=True, guest_csum=True, guest_tso=True, qsize=256, event_idx=True,
                 dirty_log=None):
        """dirty_log: a vhost.testing.dirtylog.DirtyLog both queues log into (used rings
        included), as while migrating."""
        self.ram = GuestRAM(MEM, pc_two_region_layout(MEM))
        self.ram.mm[HOLE[0]:HOLE[1]] = b"\xC3" * (HOLE[1] - HOLE[0])
        self.mem = GuestMemory(MappedRegion.map(self.ram.fd, r.gpa, r.size,
                                                self.ram.region_user_addr(r), r.mmap_offset)
                               for r in self.ram.regions)
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]   # rx kick/call, tx kick/call
        self.rx = VirtQueue(self.ram, 0, qsize, event_idx=event_idx, kick_fd=self.fds[0],
                            call_fd=self.fds[1])
        self.tx = VirtQueue(self.ram, 1, qsize, event_idx=event_idx, kick_fd=self.fds[2],
                            call_fd=self.fds[3])
        self.tap, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tap.setblocking(False)
        self.peer.settimeout(5)
        for s in (self.tap, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.port = Port("vhost", 1)
        self.port.set_features(hdr_len=HDR, mrg_rxbuf=mrg, guest_csum=guest_csum,
                               guest_tso4=guest_tso, guest_tso6=guest_tso, guest_ufo=False,
                               guest_ecn=False)
        table = self.mem.table_bytes()
        d, u, a = self.rx.addresses()
        self.port.attach_rx(0, qsize, self.mem.uva_to_host(d, 16 * qsize),
                            self.mem.uva_to_host(a, 6 + 2 * qsize),
                            self.mem.uva_to_host(u, 6 + 8 * qsize), 0, table, self.fds[1],
                            event_idx, True,
                            log=self._log(dirty_log, self.rx))
        d, u, a = self.tx.addresses()
        txq = (qsize, self.mem.uva_to_host(d, 16 * qsize), self.mem.uva_to_host(a, 6 + 2 * qsize),
               self.mem.uva_to_host(u, 6 + 8 * qsize), 0, self.fds[2], self.fds[3], event_idx,
               True, False)
        self.worker = NetWorker("tap", self.port, 0, None, self.tap.fileno(), txq, self.fds[0],
                                table, tx_log=self._log(dirty_log, self.tx))
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        self.rx_bufs = {}
        self.pending = []

    @staticmethod
    def _log(dirty_log, vq):
        return None if dirty_log is None else (dirty_log.address, dirty_log.size, vq.used_gpa)

    def post_rx(self, n, size):
        heads = []
        for _ in range(n):
            g = self.ram.alloc(size)
            h = self.rx.add_chain([(g, size, True)])
            self.rx_bufs[h] = (g, size)
            heads.append(h)
        self.rx.publish(heads)
        self.rx.kick()

    def _used(self, n, timeout):
        while len(self.pending) < n:
            self.pending += self.rx.wait_used(1, timeout=timeout)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def recv(self, timeout=5):
        """One frame from the rx ring: (header bytes, frame, num used buffers)."""
        first = self._used(1, timeout)
        g, _ = self.rx_bufs.pop(first[0][0])
        data = self.ram.read(g, first[0][1])
        h = data[:HDR]
        nb = struct.unpack_from("<H", h, 10)[0]
        assert nb >= 1
        used = self._used(nb - 1, timeout)
        for head, ln in used:
            g2, _ = self.rx_bufs.pop(head)
            data += self.ram.read(g2, ln)
        return h, data[HDR:], nb

    def send(self, frame, h=None, split=1):
        buf = (h or hdr()) + frame
        g = self.ram.alloc(len(buf))
        self.ram.write(g, buf)
        step = -(-len(buf) // split)
        head = self.tx.add_chain([(g + o, min(step, len(buf) - o), False)
                                  for o in range(0, len(buf), step)])
        self.tx.publish([head])
        self.tx.kick()
        return head

    def stats(self):
        """Port counters (rx side) plus the worker's (tx side), as NetDevice.stats sums them."""
        out = self.port.stats()
        for k, v in self.worker.stats().items():
            out[k] += v
        return out

    def close(self):
        self.worker.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.port.detach_rx(0)
        self.mem.unmap_all()
        self.ram.close()
        self.tap.close()
        self.peer.close()
        for fd in self.fds:
            os.close(fd)

    def hole_intact(self):
        return self.ram.mm[HOLE[0]:HOLE[1]] == b"\xC3" * (HOLE[1] - HOLE[0])


@pytest.fixture
def rig():
    r = NetRig()
    yield r
    r.close()


def eth(n, dst=b"\x02\0\0\0\0\x02", src=b"\x02\0\0\0\0\x01"):
    body = os.urandom(max(0, n - 14))
    return dst + src + b"\x88\xb5" + body


@pytest.mark.parametrize("size", [60, 1514, 1536 - HDR, 1536, 4000, 9000, 32768, 65536 + 14])
def test_mergeable_rx_fill(rig, size):
    rig.post_rx(64, 1536)
    frame = eth(size)
    rig.peer.send(hdr() + frame)
    h, got, nb = rig.recv()
    assert got == frame
    assert nb == -(-(size + HDR) // 1536)
    assert rig.stats()["rx_packets"] == 1
    assert rig.hole_intact()


def test_many_frames_in_order(rig):
    rig.post_rx(200, 2048)
    frames = [eth(60 + k * 7) for k in range(150)]
    for f in frames:
        rig.peer.send(hdr() + f)
    for f in frames:
        assert rig.recv()[1] == f


def test_too_small_rx_buffers_without_mrg_rxbuf():
    r = NetRig(mrg=False)
    try:
        r.post_rx(4, 1024)
        r.peer.send(hdr() + eth(1500))        # does not fit one buffer: dropped, counted
        small = eth(100)
        r.peer.send(hdr() + small)
        h, got, nb = r.recv()
        assert got == small
        st = r.stats()
        assert st["rx_dropped_too_small"] == 1 and st["rx_packets"] == 1
    finally:
        r.close()


@pytest.mark.parametrize("event_idx", [True, False])
def test_no_rx_buffers_holds_then_delivers(event_idx):
    rig = NetRig(event_idx=event_idx)
    try:
        frame = eth(500)
        rig.peer.send(hdr() + frame)
        time.sleep(0.1)
        assert not rig.rx.has_used()
        rig.post_rx(4, 2048)                      # the guest adds buffers and kicks
        assert rig.recv()[1] == frame
        rig.peer.send(hdr() + frame)              # buffers left: no kick needed
        assert rig.recv()[1] == frame
    finally:
        rig.close()


def test_tx_to_tap(rig):
    for size, split in ((60, 1), (1514, 3), (9000, 5), (65536 + 14, 9)):
        f = eth(size)
        rig.send(f, split=split)
        got = rig.peer.recv(70000)
        assert got == hdr() + f
    used = rig.tx.wait_used(4, timeout=5)
    assert all(ln == 0 for _, ln in used)
    assert rig.stats()["tx_packets"] == 4


def test_hostile_tx_chains_dropped_and_counted(rig):
    good = eth(100)
    g = rig.ram.alloc(HDR + 100)
    cases = [
        [(MEM + (1 << 20), 200, 0, None)],                            # out of range
        [(HOLE[0] + 16, 200, 0, None)],                                # in the hole
        [(g, HDR, 0, None)],                                           # header only
        [(g, HDR + 100, F_WRITE, None)],                               # device-writable tx
        [(g, 0xFFFFFFF0, 0, None)],                                    # oversized
    ]
    for entries in cases:
        rig.tx.publish([rig.tx.add_raw_descs(entries)[0]])
    # a looped chain
    rig.tx.publish([hostile.looped_chain(rig.tx, (g, 50, F_NEXT), (g, 50, F_NEXT))])
    rig.tx.kick()
    rig.send(good)
    assert rig.peer.recv(70000) == hdr() + good
    used = rig.tx.wait_used(len(cases) + 2, timeout=5)
    assert len(used) == len(cases) + 2
    st = rig.stats()
    assert st["tx_dropped"] == len(cases) + 1 and st["tx_packets"] == 1
    assert rig.worker.tx_faults()
    assert rig.hole_intact()


def test_hostile_rx_buffer_returned_empty(rig):
    g = rig.ram.alloc(2048)
    bad = rig.rx.add_chain([(g, 2048, False)])            # device-readable rx buffer
    rig.rx.publish([bad])
    rig.post_rx(2, 2048)
    f1, f2 = eth(200), eth(300)
    rig.peer.send(hdr() + f1)
    rig.peer.send(hdr() + f2)
    first = rig._used(1, 5)
    assert first[0] == (bad, 0)
    # f1 was dropped with the bad buffer; f2 arrives intact
    assert rig.recv()[1] == f2
    assert rig.stats()["rx_dropped_fault"] == 1


def _udp_frame(payload):
    src, dst = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    udp_len = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0, src, dst)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    s = sum(struct.unpack("!%dH" % (len(pseudo) // 2), pseudo))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    udp = struct.pack("!HHHH", 1234, 5678, udp_len, s) + payload   # partial csum, as Linux
    return b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00" + ip + udp, pseudo


def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def test_needs_csum_resolved_for_a_port_without_guest_csum():
    r = NetRig(guest_csum=False, guest_tso=False)
    try:
        r.post_rx(4, 2048)
        frame, pseudo = _udp_frame(os.urandom(333))
        r.peer.send(hdr(flags=vn.HDR_F_NEEDS_CSUM, cs_start=34, cs_off=6) + frame)
        h, got, nb = r.recv()
        assert h[0] & vn.HDR_F_NEEDS_CSUM == 0
        udp = got[34:]
        assert got[:40] == frame[:40] and udp[8:] == frame[42:]
        # a valid UDP checksum sums (with the pseudo header) to 0xFFFF
        assert _csum(pseudo + udp) == 0xFFFF
        # and a GSO frame cannot be taken by this port: dropped, counted
        r.peer.send(hdr(flags=1, gso=vn.GSO_TCPV4, gso_size=1448, cs_start=34, cs_off=16)
                    + eth(3000))
        small = eth(80)
        r.peer.send(hdr() + small)
        assert r.recv()[1] == small
        assert r.stats()["rx_dropped_offload"] == 1
    finally:
        r.close()


def test_tx_counters_equal_the_device_mapping(rig):
    """NetWorker.counters(): the tx queue in COUNTER_KEYS, as devices/net.py derives it."""
    from devices.net import NetDevice
    from vhost.device import COUNTER_KEYS
    for size in (60, 1514):
        rig.send(eth(size))
        rig.peer.recv(70000)
    rig.tx.wait_used(2, timeout=5)
    c = rig.worker.counters()
    assert tuple(c) == COUNTER_KEYS and all(type(v) is int for v in c.values())
    want = dict.fromkeys(COUNTER_KEYS, 0)
    want.update(NetDevice._tx_counters(rig.worker))
    assert c == want and c["requests"] == 2 and c["bytes_read"] == 60 + 1514


def test_dirty_log_marks_rx_buffers_and_used_rings_not_tx_buffers():
    """Migrating: a frame from the tap lands in three mergeable rx buffers; exactly the bytes
    written (header included) and both used rings are logged, the tx frame's buffer is not."""
    from protocols import virtio
    from vhost.testing.dirtylog import DirtyLog, log_size_for, pages
    dlog = DirtyLog(log_size_for(MEM))
    rig = NetRig(dirty_log=dlog)
    try:
        used = pages(rig.rx.used_gpa, virtio.used_ring_size(256)) | \
            pages(rig.tx.used_gpa, virtio.used_ring_size(256))
        rig.ram.alloc(64 << 10)                 # buffers on pages of their own, past the rings
        bufs = {}
        heads = []
        for _ in range(4):
            g = rig.ram.alloc(1500, align=4096)
            h = rig.rx.add_chain([(g, 1500, True)])
            rig.rx_bufs[h] = bufs[h] = (g, 1500)
            heads.append(h)
        rig.rx.publish(heads)
        rig.rx.kick()
        frame = eth(3000)
        rig.peer.send(hdr() + frame)
        got = rig._used(3, 5)
        assert sum(n for _, n in got) == HDR + len(frame)
        written = set()
        for head, n in got:
            written |= pages(bufs[head][0], n)
        dirty = dlog.dirty()
        assert written <= dirty <= written | used
        # the fourth buffer was not used: its page is clean
        spare = [h for h in heads if h not in {g[0] for g in got}][0]
        assert not pages(bufs[spare][0], 1500) & dirty
        # tx: the device reads the frame and writes only its used ring
        dlog.clear()
        g = rig.ram.alloc(HDR + 1000, align=4096)
        rig.ram.write(g, hdr() + eth(1000))
        head = rig.tx.add_chain([(g, HDR + 1000, False)])
        rig.tx.publish([head])
        rig.tx.kick()
        assert rig.peer.recv(65536)
        assert rig.tx.wait_used(1, timeout=5) == [(head, 0)]
        dirty = dlog.dirty()
        assert dirty and dirty <= used
        assert not pages(g, HDR + 1000) & dirty
        assert dlog.tail_clean()
    finally:
        rig.close()
        dlog.close()


def test_switch_batch_cut_by_a_corrupt_avail_ring_is_still_delivered():
    """A guest's tx ring turns corrupt (a head beyond the ring) after a few good frames: those
    frames were already copied into the other port's rx ring in the same batch, and must be
    published there (before: the batch returned without publishing, so the receiver never
    saw frames that the sender's ring had consumed), and the sender's queue is broken."""
    sp = SwitchPair()
    ram, rx, qsize = sp.ram, sp.rx, sp.qsize
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]      # tx kick, tx call
    tx = VirtQueue(ram, 1, qsize, event_idx=True, kick_fd=fds[0], call_fd=fds[1])
    txq = (qsize, *sp.host(tx), 0, fds[0], fds[1], True, True, False)
    worker = NetWorker("switch", sp.a, 0, sp.sw, -1, txq, -1, sp.table)
    frames = [eth(60 + k) for k in range(3)]
    heads = []
    for f in frames:
        g = ram.alloc(HDR + len(f))
        ram.write(g, hdr() + f)
        heads.append(tx.add_chain([(g, HDR + len(f), False)]))
    # three good heads and then one no ring has, published together: one batch
    tx.publish(heads + [qsize + 7])
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        tx.kick(force=True)
        deadline = time.monotonic() + 5
        while rx.used_idx() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        got = rx.reap()
        assert len(got) == 3, got
        for (head, ln), f in zip(got, frames):
            assert ram.read(sp.bufs[head], ln) == hdr(nbuf=1) + f
        assert worker.tx_faults()
    finally:
        worker.stop()
        thread.join(5)
        assert not thread.is_alive()
        sp.close()
        for fd in fds:
            os.close(fd)


def _until(cond, what, timeout=10.0):
    """Wait for a state another thread brings about (bounded)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.001)


BROADCAST = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x0a" + b"\x08\x00" + bytes(46)


def test_attach_rx_waits_for_the_queue_lock_without_the_gil():
    """attach_rx waits for the rx queue's lock (a sender may be mid-frame) with the GIL
    released: other threads -- other tenants' conversations -- keep running meanwhile.
    Before: the wait held the GIL, and a sender slow to let go froze the whole service."""
    sp = SwitchPair()
    b, attach = sp.b, sp.attach
    try:
        b.detach_rx(0)
        holder = threading.Thread(target=b.hold_rx_lock, args=(0, 3.0), daemon=True)
        holder.start()
        _until(lambda: b.rx_lock_state(0)[0], "the holder has the lock")
        attacher = threading.Thread(target=attach, daemon=True)
        attacher.start()
        # attach_rx announces itself before it waits: seeing that needs this thread to run
        # while attach_rx waits, which it cannot if attach_rx holds the GIL
        _until(lambda: b.rx_lock_state(0)[1] or not holder.is_alive(), "attach_rx waits")
        t0 = time.monotonic()
        for _ in range(10):
            time.sleep(0.01)
        took = time.monotonic() - t0
        assert holder.is_alive(), "the lock was let go before the measurement ended"
        assert took < 1.5, f"this thread stood still {took:.2f} s while attach_rx waited"
        holder.join(5)
        attacher.join(5)
        assert not attacher.is_alive() and b.rx_active(0)
    finally:
        sp.close()


def test_senders_step_aside_while_a_queue_restart_waits():
    """While the control side waits for an rx queue's lock (detach_rx here; attach and a
    feature change alike), senders do not queue up on that lock: their frames to it count as
    no-room at once.  Before: every sender waited behind it, and a flood re-took the lock
    (the mutex is not fair) before the restart got it."""
    sp = SwitchPair()
    a, b = sp.a, sp.b
    try:
        holder = threading.Thread(target=b.hold_rx_lock, args=(0, 3.0), daemon=True)
        holder.start()
        _until(lambda: b.rx_lock_state(0)[0], "the holder has the lock")
        detacher = threading.Thread(target=b.detach_rx, args=(0,), daemon=True)
        detacher.start()
        _until(lambda: b.rx_lock_state(0)[1], "detach_rx announced, waiting")
        before = b.stats()["rx_dropped_no_room"]
        sent, _ = a.generate(BROADCAST, 500, 10.0)     # count-bounded: returns if never held
        assert holder.is_alive(), "the sender waited for the lock the restart was waiting for"
        assert sent == 500 and b.stats()["rx_dropped_no_room"] - before == 500
        holder.join(5)
        detacher.join(5)
        assert not detacher.is_alive() and not b.rx_active(0)
        sp.attach()                                    # and the queue serves again
        sent, _ = a.generate(BROADCAST, 1, 5.0)
        assert b.rx_counters(0)["rx_packets"] == 1
    finally:
        sp.close()


# A sender that logs a fault (wk_note_fault) takes the GIL while it holds the rx queue's lock;
# so whoever waits for that lock holding the GIL deadlocks the process.  Run in a child so
# that a deadlock fails this test alone.
DEALLOC_WHILE_A_SENDER_TAKES_THE_GIL = r"""
import threading, time
from vhost.testing.ringrig import SwitchPair
sp = SwitchPair()
holder = threading.Thread(target=sp.sw.hold_port_rx_lock, args=(1, 0, 1.0, True), daemon=True)
holder.start()
deadline = time.monotonic() + 10
while not sp.b.rx_lock_state(0)[0]:     # the holder has port 1's rx lock; it takes the GIL
    assert time.monotonic() < deadline    # before it lets go
    time.sleep(0.001)
b, sp.b = sp.b, None
del b                       # Port.__dealloc__ detaches its rx queue: waits for that lock
holder.join(10)
print("alive" if holder.is_alive() else "done", flush=True)
"""


def test_port_dealloc_waits_for_a_queue_lock_without_the_gil():
    """Port.__dealloc__ detaches its rx queues, waiting for each one's lock.  Before: it waited
    holding the GIL, so a sender holding that lock and logging a fault (which takes the GIL)
    deadlocked the service."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    try:
        cp = subprocess.run([sys.executable, "-c", DEALLOC_WHILE_A_SENDER_TAKES_THE_GIL],
                            cwd=root, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("Port.__dealloc__ deadlocked with a sender holding its rx lock")
    assert cp.returncode == 0 and cp.stdout.strip() == "done", (cp.returncode, cp.stdout,
                                                                cp.stderr[-2000:])
