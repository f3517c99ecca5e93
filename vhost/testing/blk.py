"""blk.py: virtio-blk on top of the frontend conversation: requests and the blk driver.

Owns: request builders (`BlkRequest`, `blk_read`, `blk_write`, `blk_flush`, `blk_get_id`,
`blk_discard`, `blk_write_zeroes`), `BlkResult`, and `Frontend`, the vhost-user-blk driver:
`read`, `write`, `flush`, `discard`, `write_zeroes`, `get_id` and the pipelined `submit_many`,
with optional random scatter-gather splitting of data buffers; status and read buffers are
poisoned before submission so that a backend that never wrote them is caught.
Must not: check what a backend *should* have done (the tests do); import tests, devices,
vhost.server, vhost.service or vhost.config.
"""
from __future__ import annotations

import os
import random
import select
import socket
import time
from collections import deque
from typing import NamedTuple, Sequence

from protocols import virtio_blk as vblk
from vhost.testing.connection import WANTED_PROTOCOL_FEATURES, VhostUserFrontend
from vhost.testing.errors import FrontendError, GuestRAMFull, QueueFull, RingError, VhostUserError
from vhost.testing.ram import MiB
from vhost.testing.virtqueue import DEFAULT_TIMEOUT, VirtQueue

# Device-specific feature bits this driver accepts from a virtio-blk backend by default.
BLK_DRIVER_FEATURES = (
    vblk.F_SIZE_MAX | vblk.F_SEG_MAX | vblk.F_GEOMETRY | vblk.F_RO | vblk.F_BLK_SIZE
    | vblk.F_FLUSH | vblk.F_TOPOLOGY | vblk.F_CONFIG_WCE | vblk.F_MQ | vblk.F_DISCARD
    | vblk.F_WRITE_ZEROES
)

STATUS_POISON = 0xFF     # status byte before submission: detects a backend that never wrote it
READ_POISON = 0xA5       # read buffers are filled with this before submission


class BlkRequest(NamedTuple):
    """A virtio-blk request: header (type, sector), `out` bytes the device reads after the
    header, `in_len` bytes the device writes before the status byte."""
    type: int
    sector: int = 0
    out: bytes = b""
    in_len: int = 0


class BlkResult(NamedTuple):
    status: int          # the status byte (STATUS_POISON if the backend never wrote it)
    data: bytes          # the `in_len` bytes the device wrote (read data, id string)
    used_len: int        # the length the backend put in the used ring


def blk_read(sector: int, nbytes: int) -> BlkRequest:
    return BlkRequest(vblk.T_IN, sector, b"", nbytes)


def blk_write(sector: int, data: bytes) -> BlkRequest:
    return BlkRequest(vblk.T_OUT, sector, bytes(data), 0)


def blk_flush() -> BlkRequest:
    return BlkRequest(vblk.T_FLUSH, 0)


def blk_get_id() -> BlkRequest:
    return BlkRequest(vblk.T_GET_ID, 0, b"", vblk.ID_BYTES)


def blk_discard(sector: int, nsectors: int) -> BlkRequest:
    seg = vblk.DiscardWriteZeroes.build(dict(sector=sector, num_sectors=nsectors, flags=0))
    return BlkRequest(vblk.T_DISCARD, 0, seg, 0)


def blk_write_zeroes(sector: int, nsectors: int, unmap: bool = False) -> BlkRequest:
    flags = vblk.WRITE_ZEROES_FLAG_UNMAP if unmap else 0
    seg = vblk.DiscardWriteZeroes.build(dict(sector=sector, num_sectors=nsectors, flags=flags))
    return BlkRequest(vblk.T_WRITE_ZEROES, 0, seg, 0)


class _Inflight:
    __slots__ = ("i", "blocks", "in_pieces", "status_gpa", "head")

    def __init__(self, i, blocks, in_pieces, status_gpa, head):
        self.i = i
        self.blocks = blocks
        self.in_pieces = in_pieces
        self.status_gpa = status_gpa
        self.head = head


class Frontend(VhostUserFrontend):
    """A vhost-user-blk frontend over `socket_path` (see VhostUserFrontend for the connection
    options).  Blk options: `device_features` (virtio-blk feature bits we accept), `seed`
    (random scatter-gather splitting of request buffers and a random choice of indirect vs
    direct chains; None = one descriptor per buffer, indirect whenever negotiated),
    `max_segments` (upper bound of pieces per data buffer).
    """

    def __init__(self, socket_path: str | os.PathLike, *, mem_size: int = 64 * MiB,
                 num_queues: int = 1, queue_size: int = 128, two_regions: bool = False,
                 event_idx: bool = True, indirect: bool = True,
                 regions: Sequence[tuple[int, int, int]] | None = None,
                 use_add_mem_reg: bool | None = None,
                 protocol_features: int = WANTED_PROTOCOL_FEATURES,
                 device_features: int = BLK_DRIVER_FEATURES,
                 seed: int | None = None, max_segments: int = 8,
                 timeout: float = DEFAULT_TIMEOUT, listen: bool = False,
                 inflight: bool = False, packed: bool = False):
        super().__init__(socket_path, mem_size=mem_size, num_queues=num_queues,
                         queue_size=queue_size, two_regions=two_regions, event_idx=event_idx,
                         indirect=indirect, regions=regions, use_add_mem_reg=use_add_mem_reg,
                         protocol_features=protocol_features, device_features=device_features,
                         timeout=timeout, listen=listen, inflight=inflight, packed=packed)
        self.rng = random.Random(seed) if seed is not None else None
        self.max_segments = max(1, max_segments)

    def _read_device_config(self) -> None:
        self.config = self.get_config()

    def get_config(self, size: int = vblk.CONFIG_SIZE, offset: int = 0):
        """GET_CONFIG, parsed as virtio_blk.Config when the full blk layout was asked for;
        otherwise the raw bytes."""
        raw = self.get_config_raw(size, offset)
        if offset == 0 and size >= vblk.CONFIG_SIZE:
            return vblk.Config.parse(raw)
        return raw

    # -- blk requests --

    def _split(self, n: int) -> list[int]:
        """Piece lengths for an n-byte data buffer."""
        limit = 0
        if self.config is not None and self.features & vblk.F_SIZE_MAX and self.config.size_max:
            limit = self.config.size_max
        pieces = [n]
        if self.rng is not None and n > 1:
            k = self.rng.randint(1, min(self.max_segments, n))
            if self.rng.random() < 0.5 and n % vblk.SECTOR_SIZE == 0 and n > vblk.SECTOR_SIZE:
                sectors = n // vblk.SECTOR_SIZE
                k = min(k, sectors)
                cuts = sorted(self.rng.sample(range(1, sectors), k - 1))
                cuts = [c * vblk.SECTOR_SIZE for c in cuts]
            else:
                cuts = sorted(self.rng.sample(range(1, n), k - 1))
            edges = [0, *cuts, n]
            pieces = [b - a for a, b in zip(edges, edges[1:])]
        if limit:
            pieces = [min(limit, p - s) for p in pieces for s in range(0, p, limit)]
        return pieces

    def _alloc_pieces(self, n: int, blocks: list[int]) -> list[tuple[int, int]]:
        out = []
        for ln in self._split(n):
            gpa = self.mem.alloc(ln, align=8 if self.rng is not None else 512)
            blocks.append(gpa)
            out.append((gpa, ln))
        return out

    def _prepare(self, vq: VirtQueue, req: BlkRequest, i: int) -> _Inflight:
        """Build one request's chain in guest RAM (not yet published).  Raises QueueFull or
        GuestRAMFull with nothing leaked."""
        mem = self.mem
        blocks: list[int] = []
        try:
            hs = mem.alloc(vblk.REQ_HEADER_SIZE + 1, align=16)
            blocks.append(hs)
            mem.write(hs, vblk.ReqHeader.build(dict(type=req.type, reserved=0,
                                                    sector=req.sector)))
            status_gpa = hs + vblk.REQ_HEADER_SIZE
            mem.fill(status_gpa, 1, STATUS_POISON)
            out_pieces = self._alloc_pieces(len(req.out), blocks) if req.out else []
            pos = 0
            for gpa, ln in out_pieces:
                mem.write(gpa, memoryview(req.out)[pos:pos + ln])
                pos += ln
            in_pieces = self._alloc_pieces(req.in_len, blocks) if req.in_len else []
            for gpa, ln in in_pieces:
                mem.fill(gpa, ln, READ_POISON)
            segs = [(hs, vblk.REQ_HEADER_SIZE, False)]
            segs += [(g, ln, False) for g, ln in out_pieces]
            segs += [(g, ln, True) for g, ln in in_pieces]
            segs.append((status_gpa, 1, True))
            if self.has_indirect:
                indirect = self.rng.random() < 0.5 if self.rng is not None else True
            else:
                indirect = False
            if self.config is not None and self.features & vblk.F_SEG_MAX and self.config.seg_max:
                if len(segs) - 2 > self.config.seg_max:
                    raise FrontendError(f"{len(segs) - 2} data segments exceed seg_max "
                                        f"{self.config.seg_max}")
            if not indirect and len(segs) > vq.size:
                indirect = self.has_indirect
            head = vq.add_chain(segs, indirect=indirect)
        except BaseException:
            for b in blocks:
                mem.free(b)
            raise
        return _Inflight(i, blocks, in_pieces, status_gpa, head)

    def _finish(self, ctx: _Inflight, used_len: int) -> BlkResult:
        mem = self.mem
        status = mem.read(ctx.status_gpa, 1)[0]
        data = b"".join(mem.read(g, ln) for g, ln in ctx.in_pieces) if ctx.in_pieces else b""
        for b in ctx.blocks:
            mem.free(b)
        return BlkResult(status, data, used_len)

    def submit_many(self, requests: Sequence[BlkRequest], queue: int | Sequence[int] = 0,
                    depth: int = 32, timeout: float | None = None,
                    on_disconnect=None) -> list[BlkResult]:
        """Run `requests` keeping up to `depth` in flight per queue; results in request order.
        `queue` may be a list of queues: requests are dealt round-robin and all those queues run
        concurrently.  `timeout` (default: the frontend's) bounds each wait for progress.
        Requests in flight together may complete in any order: don't overlap writes.
        `on_disconnect()`: called when the backend goes away with requests outstanding (it
        brings up a new backend and calls `reconnect()`); the outstanding requests are then
        waited for on the new connection, as a guest under QEMU `reconnect=1` would.  A head
        returned that is not outstanding (completed twice) raises RingError."""
        if not self._started:
            raise FrontendError("not connected")
        timeout = self.timeout if timeout is None else timeout
        qids = [queue] if isinstance(queue, int) else list(queue)
        if not qids:
            raise ValueError("no queue given")
        for q in qids:
            if not 0 <= q < len(self.queues):
                raise ValueError(f"queue {q} does not exist ({len(self.queues)} queues)")
        depth = max(1, depth)
        results: list[BlkResult | None] = [None] * len(requests)
        pending = {q: deque() for q in qids}
        for i in range(len(requests)):
            pending[qids[i % len(qids)]].append(i)
        inflight: dict[int, dict[int, _Inflight]] = {q: {} for q in qids}
        remaining = len(requests)
        poller = select.poll()
        for q in qids:
            poller.register(self.queues[q].call_fd, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        deadline = time.monotonic() + timeout

        while remaining:
            # submit as much as the depth, the descriptors and guest RAM allow
            for q in qids:
                vq, fl, pq = self.queues[q], inflight[q], pending[q]
                heads = []
                while pq and len(fl) < depth:
                    try:
                        ctx = self._prepare(vq, requests[pq[0]], pq[0])
                    except (QueueFull, GuestRAMFull):
                        if fl or heads:
                            break
                        raise
                    pq.popleft()
                    fl[ctx.head] = ctx
                    heads.append(ctx.head)
                if heads:
                    vq.publish(heads)
                    vq.kick()
            # reap what completed
            progressed = False
            for q in qids:
                vq, fl = self.queues[q], inflight[q]
                for uid, ulen in vq.reap():
                    ctx = fl.pop(uid, None)
                    if ctx is None:
                        raise RingError(f"queue {q}: backend returned head {uid} (len {ulen}), "
                                        f"which is not an outstanding request")
                    results[ctx.i] = self._finish(ctx, ulen)
                    remaining -= 1
                    progressed = True
            if progressed:
                deadline = time.monotonic() + timeout
                continue
            if not remaining:
                break
            # nothing new: arm interrupts, re-check, then sleep on the call eventfds
            if any(self.queues[q].arm_interrupt() for q in qids if inflight[q]):
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                busy = "; ".join(self.queues[q].describe() for q in qids if inflight[q])
                raise TimeoutError(f"no completion within {timeout}s, {remaining} requests "
                                   f"outstanding: {busy}")
            for fd, ev in poller.poll(left * 1000):
                if fd == self.sock.fileno():
                    if not ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
                        try:
                            if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                                poller.unregister(fd)   # unexpected data: leave it there
                                continue
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            pass
                    busy = "; ".join(self.queues[q].describe() for q in qids if inflight[q])
                    if on_disconnect is None:
                        raise VhostUserError(f"backend disconnected with {remaining} requests "
                                             f"outstanding: {busy}")
                    poller.unregister(fd)
                    on_disconnect()
                    poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
                    deadline = time.monotonic() + timeout
                    break
            for q in qids:
                self.queues[q].drain_call()
        return results  # type: ignore[return-value]

    # single requests

    def read(self, sector: int, nbytes: int, queue: int = 0) -> tuple[int, bytes]:
        r = self.submit_many([blk_read(sector, nbytes)], queue)[0]
        return r.status, r.data

    def write(self, sector: int, data: bytes, queue: int = 0) -> int:
        return self.submit_many([blk_write(sector, data)], queue)[0].status

    def flush(self, queue: int = 0) -> int:
        return self.submit_many([blk_flush()], queue)[0].status

    def discard(self, sector: int, nsectors: int, queue: int = 0) -> int:
        return self.submit_many([blk_discard(sector, nsectors)], queue)[0].status

    def write_zeroes(self, sector: int, nsectors: int, unmap: bool = False,
                     queue: int = 0) -> int:
        return self.submit_many([blk_write_zeroes(sector, nsectors, unmap)], queue)[0].status

    def get_id(self, queue: int = 0) -> tuple[int, bytes]:
        r = self.submit_many([blk_get_id()], queue)[0]
        return r.status, r.data
