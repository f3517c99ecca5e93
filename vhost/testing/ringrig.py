"""ringrig.py: an in-memory rig for ring-engine tests: driver-side rings from vhost.testing
(GuestRAM + VirtQueue lay out the chains), the same shared memory mapped backend-side through
vhost/memory.py, and a queue worker run synchronously (`run_until_idle`) or as a thread:
`QueueRig` is that plumbing for any worker, over a split or (`packed`) a packed ring (the rng tests build theirs on it), `Rig` adds a
BlkQueueWorker on an image file (optionally logging into a dirty log: `log`, as
QueueHandle.log; optionally tracking in an inflight region: `inflight`, as
QueueHandle.inflight).  `SwitchPair`: two ports of one switch with a driver-side rx ring
attached to the second, for the net locking tests.
Must not: open sockets or start processes; hold test assertions beyond `assert_serving`;
import tests, devices, vhost.server, vhost.service or vhost.config."""
from __future__ import annotations

import os
import struct
import threading

from cython_ext.blk import BlkQueueWorker
from cython_ext.net import Port, Switch
from protocols import virtio, virtio_blk as vb, virtio_net as vn
from vhost.testing.ram import GuestRAM, one_region_layout, pc_two_region_layout
from vhost.testing.packed import PackedVirtQueue
from vhost.testing.virtqueue import VirtQueue
from vhost.memory import GuestMemory, MappedRegion

F_NEXT, F_WRITE, F_INDIRECT = (virtio.VIRTQ_DESC_F_NEXT, virtio.VIRTQ_DESC_F_WRITE,
                               virtio.VIRTQ_DESC_F_INDIRECT)
MEM = 4 << 20
HOLE = (640 << 10, 768 << 10)   # the PC layout's GPA hole; its shm bytes belong to no region


class QueueRig:
    """Guest RAM (PC layout with a canary in its hole, or one region), one driver-side queue,
    the same memory mapped backend-side, and the eventfd pair; a subclass builds `worker` (any
    queue worker with run_until_idle / run / stop / close) from `ring_hosts()`."""

    def __init__(self, *, two_regions=True, event_idx=False, qsize=64, packed=False):
        layout = pc_two_region_layout(MEM) if two_regions else one_region_layout(MEM)
        self.ram = GuestRAM(MEM, layout)
        self.mem = GuestMemory(MappedRegion.map(self.ram.fd, r.gpa, r.size,
                                                self.ram.region_user_addr(r), r.mmap_offset)
                               for r in self.ram.regions)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.qsize = qsize
        self.packed = packed
        self.vq = (PackedVirtQueue if packed else VirtQueue)(
            self.ram, 0, qsize, event_idx=event_idx, kick_fd=self.kick_fd, call_fd=self.call_fd)
        self.two_regions = two_regions
        if two_regions:
            # canary in the hole: no region covers these shm bytes, nothing may write them
            self.ram.mm[HOLE[0]:HOLE[1]] = b"\xC3" * (HOLE[1] - HOLE[0])
        self.worker = None
        self.thread = None

    def ring_hosts(self) -> tuple[int, int, int]:
        """Backend-side (host) addresses of the descriptor table, avail and used rings."""
        desc, used, avail = self.vq.addresses()
        qs = self.qsize
        if self.packed:     # descriptor ring, driver and device event suppression
            return (self.mem.uva_to_host(desc, 16 * qs), self.mem.uva_to_host(avail, 4),
                    self.mem.uva_to_host(used, 4))
        return (self.mem.uva_to_host(desc, 16 * qs), self.mem.uva_to_host(avail, 6 + 2 * qs),
                self.mem.uva_to_host(used, 6 + 8 * qs))

    @property
    def base(self) -> int:
        """The base a worker starts at (packed: both positions 0, wrap counters 1)."""
        return self.vq.base() if self.packed else 0

    def raw(self, entries, indices=None):
        """Publish a chain of raw (addr, len, flags, next) descriptors; returns the head.
        Entries whose next is None are linked to the following one (NEXT flag added)."""
        entries = [(a, n, f | (F_NEXT if nxt is None and k < len(entries) - 1 else 0), nxt)
                   for k, (a, n, f, nxt) in enumerate(entries)]
        if self.packed:     # consecutive slots; `next` has no meaning in a packed ring
            bid = self.vq.make_available([(a, n, f) for a, n, f, _ in entries])
            self.vq.publish([bid])
            return bid
        idx = self.vq.add_raw_descs(entries, indices)
        self.vq.publish([idx[0]])
        return idx[0]

    def run(self):
        self.worker.run_until_idle()
        return self.vq.reap()

    def hole_intact(self) -> bool:
        return (not self.two_regions
                or self.ram.mm[HOLE[0]:HOLE[1]] == b"\xC3" * (HOLE[1] - HOLE[0]))

    # -- threaded mode --
    def start(self):
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread:
            self.worker.stop()
            self.thread.join(10)
            assert not self.thread.is_alive()
            self.thread = None

    def close(self):
        self.stop()
        if self.worker is not None:          # None: a test drove the rings with a RingProbe
            self.worker.close()
        self.mem.unmap_all()
        self.ram.close()
        os.close(self.call_fd)
        os.close(self.kick_fd)


class Rig(QueueRig):
    """The ring rig with a BlkQueueWorker on an image file."""

    def __init__(self, image_path, *, two_regions=True, event_idx=False, qsize=64,
                 read_only=False, use_io_uring=True, start_idx=0, capacity=None,
                 poll_us=0.0, log=None, inflight=None, packed=False):
        super().__init__(two_regions=two_regions, event_idx=event_idx, qsize=qsize,
                         packed=packed)
        if start_idx:
            # resume mid-stream (index wrap tests): avail, used and our shadows agree
            self.vq.set_avail_idx(start_idx)
            self.vq._kick_old = start_idx
            self.ram.write(self.vq.used_gpa + 2, struct.pack("<H", start_idx))
            self.vq.last_used_idx = start_idx
        self.image_path = image_path
        self.fd = os.open(image_path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        size = os.fstat(self.fd).st_size
        self.capacity = capacity if capacity is not None else size // 512
        self.worker = BlkQueueWorker(
            0, qsize, *self.ring_hosts(), start_idx or self.base, self.mem.table_bytes(),
            self.kick_fd, self.call_fd, self.fd, self.fd, read_only, self.capacity,
            b"rig-serial-0123456789", event_idx=event_idx, indirect=True,
            use_io_uring=use_io_uring, max_discard_sectors=1 << 21,
            max_write_zeroes_sectors=1 << 21, poll_us=poll_us, log=log, inflight=inflight,
            packed=packed)

    # -- buffers --
    def buf(self, data: bytes | int, fill=0xEE) -> int:
        n = data if isinstance(data, int) else len(data)
        gpa = self.ram.alloc(max(n, 1), align=512)
        if isinstance(data, int):
            self.ram.fill(gpa, n, fill)
        else:
            self.ram.write(gpa, data)
        return gpa

    def header(self, rtype, sector=0) -> int:
        return self.buf(vb.ReqHeader.build(dict(type=rtype, reserved=0, sector=sector)))

    def status(self) -> int:
        return self.buf(b"\xFF")

    def request(self, rtype, sector=0, data: bytes | int = 0, *, indirect=False, split=1):
        """Publish a well-formed request; returns (head, status_gpa, data_gpa)."""
        h = self.header(rtype, sector)
        segs = [(h, 16, False)]
        dgpa = None
        n = data if isinstance(data, int) else len(data)
        if n:
            dgpa = self.buf(data)
            writable = rtype in (vb.T_IN, vb.T_GET_ID)
            step = -(-n // split)
            for off in range(0, n, step):
                segs.append((dgpa + off, min(step, n - off), writable))
        s = self.status()
        segs.append((s, 1, True))
        head = self.vq.add_chain(segs, indirect=indirect)
        self.vq.publish([head])
        return head, s, dgpa

    def status_of(self, s_gpa) -> int:
        return self.ram.read(s_gpa, 1)[0]

    # -- whole requests --
    def write(self, sector, data, **kw):
        head, s, _ = self.request(vb.T_OUT, sector, data, **kw)
        used = self.run()
        assert used == [(head, 1)], used
        return self.status_of(s)

    def read(self, sector, n, **kw):
        head, s, d = self.request(vb.T_IN, sector, n, **kw)
        used = self.run()
        assert used == [(head, n + 1)] or self.status_of(s) != 0, used
        return self.status_of(s), self.ram.read(d, n)

    def assert_serving(self):
        """A valid write + read still works after whatever came before."""
        payload = os.urandom(4096)
        assert self.write(8, payload) == vb.S_OK
        st, got = self.read(8, 4096)
        assert st == vb.S_OK and got == payload

    def close(self):
        super().close()
        os.close(self.fd)


class SwitchPair:
    """Ports a and b on one switch, both with mergeable rx settings; b's rx queue 0 attached
    on a ring (rx, in ram/mem) with `nbufs` 2 KiB buffers posted (bufs: head -> gpa).
    attach() attaches b's rx queue 0 again; close() detaches and unmaps everything."""

    def __init__(self, qsize=64, nbufs=8):
        self.qsize = qsize
        self.ram = GuestRAM(MEM, pc_two_region_layout(MEM))
        self.mem = GuestMemory(MappedRegion.map(self.ram.fd, r.gpa, r.size,
                                                self.ram.region_user_addr(r), r.mmap_offset)
                               for r in self.ram.regions)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.rx = VirtQueue(self.ram, 0, qsize, event_idx=True, kick_fd=-1, call_fd=self.call)
        self.sw = Switch("t")
        self.a, self.b = Port("vhost", 1, self.sw, 0), Port("vhost", 1, self.sw, 1)
        for p in (self.a, self.b):
            p.set_features(hdr_len=vn.HDR_SIZE, mrg_rxbuf=True, guest_csum=True, guest_tso4=True,
                           guest_tso6=True, guest_ufo=False, guest_ecn=False)
        self.table = self.mem.table_bytes()
        self.attach()
        self.bufs = {}
        for _ in range(nbufs):
            g = self.ram.alloc(2048)
            self.bufs[self.rx.add_chain([(g, 2048, True)])] = g
        self.rx.publish(list(self.bufs))

    def host(self, vq):
        """(desc, avail, used) host addresses of a driver-side queue in this memory."""
        d, u, av = vq.addresses()
        qs = vq.size
        return (self.mem.uva_to_host(d, 16 * qs), self.mem.uva_to_host(av, 6 + 2 * qs),
                self.mem.uva_to_host(u, 6 + 8 * qs))

    def attach(self):
        self.b.attach_rx(0, self.qsize, *self.host(self.rx), 0, self.table, self.call, True,
                         True)

    def close(self):
        if self.b.rx_active(0):
            self.b.detach_rx(0)
        self.a.detach()
        self.b.detach()
        self.mem.unmap_all()
        self.ram.close()
        os.close(self.call)
