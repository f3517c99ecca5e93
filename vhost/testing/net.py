"""net.py: virtio-net on top of the frontend conversation, and test frames.

Owns: `NetFrontend`, the vhost-user-net driver (what QEMU's virtio-net plus a guest driver do):
rx buffers posted and refilled (mergeable or big chains), `send`/`send_many` with a
virtio_net_hdr, `recv`/`recv_many` reassembling mergeable buffers by num_buffers; the
virtio_net_hdr helpers (`net_hdr`, `parse_net_hdr`), MAC helpers, and the frame builders and
checksums tests and benchmarks share (`make_frame`, `tcp4_frame`, `tcp4_gso_hdr`,
`tcp4_csum_ok`, `inet_checksum`, `ones_sum`).
Must not: check what a backend *should* have done (the tests do); import tests, devices,
vhost.server, vhost.service or vhost.config.
"""
from __future__ import annotations

import os
import random
import select
import socket
import struct
import time
from collections import deque
from typing import Iterable, NamedTuple, Sequence

from protocols import virtio
from protocols import virtio_net as vnet
from protocols.vhost_user import ProtocolFeature
from vhost.testing.connection import WANTED_PROTOCOL_FEATURES, VhostUserFrontend
from vhost.testing.errors import FrontendError, GuestRAMFull, QueueFull, RingError, VhostUserError
from vhost.testing.ram import MiB
from vhost.testing.virtqueue import DEFAULT_TIMEOUT, VirtQueue

NET_DRIVER_FEATURES = (
    vnet.F_MAC | vnet.F_MTU | vnet.F_STATUS | vnet.F_MRG_RXBUF | vnet.F_MQ
    | vnet.F_CSUM | vnet.F_GUEST_CSUM | vnet.F_HOST_TSO4 | vnet.F_HOST_TSO6
    | vnet.F_GUEST_TSO4 | vnet.F_GUEST_TSO6
)
NET_HDR_FIELDS = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset",
                  "num_buffers")
_NET_HDR = struct.Struct("<BBHHHHH")
assert _NET_HDR.size == vnet.HDR_SIZE
RX_POISON = 0x5A           # rx buffers are filled with this when first posted
VLAN_HLEN = 4


def net_hdr(flags: int = 0, gso_type: int = vnet.GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
            csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    """The 12-byte virtio_net_hdr (with num_buffers)."""
    return _NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
                         num_buffers)


def parse_net_hdr(data: bytes) -> dict:
    """The fields of a 12-byte (or legacy 10-byte: num_buffers = 0) virtio_net_hdr."""
    if len(data) >= vnet.HDR_SIZE:
        return dict(zip(NET_HDR_FIELDS, _NET_HDR.unpack_from(data)))
    if len(data) >= vnet.LEGACY_HDR_SIZE:
        return dict(zip(NET_HDR_FIELDS, _NET_HDR.unpack(bytes(data[:10]) + b"\0\0")))
    raise ValueError(f"virtio_net_hdr needs 10 or 12 bytes, got {len(data)}")


def parse_mac(mac: str | bytes) -> bytes:
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        return bytes(mac)
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class RxPacket(NamedTuple):
    """A received packet with where it came from (`recv_packet`); `recv` returns (hdr, frame)."""
    hdr: dict            # virtio_net_hdr fields, num_buffers included
    frame: bytes         # the Ethernet frame (no virtio_net_hdr)
    pair: int            # queue pair it arrived on
    used_lens: tuple     # the used-ring length of each buffer it occupied


class _RxQueue:
    """Receive-side state of one rx virtqueue: the buffers we own, which are posted, and used
    entries not yet assembled into packets."""
    __slots__ = ("vq", "pair", "chains", "idle", "posted", "pending", "target")

    def __init__(self, vq: VirtQueue, pair: int):
        self.vq = vq
        self.pair = pair
        self.chains: list[list[tuple[int, int]]] = []   # chain id -> [(gpa, len), ...]
        self.idle: list[int] = []                       # chain ids not posted
        self.posted: dict[int, int] = {}                # head -> chain id
        self.pending: deque = deque()                   # (chain id, used len), used-ring order
        self.target = 0                                 # chains we keep posted


class NetFrontend(VhostUserFrontend):
    """A vhost-user-net frontend: what QEMU's virtio-net device plus a guest driver would do.

    Queues: rx of pair p is virtqueue 2p, tx is 2p+1; no control queue (QEMU keeps it).  On
    connect, every rx queue is filled with device-writable buffers: with MRG_RXBUF one
    `rx_buf_size` descriptor per buffer; without it, chains of `rx_buf_size` pieces big enough
    for the largest frame the negotiated offloads allow (65562 bytes with GUEST_TSO*, else
    header + MTU + Ethernet/VLAN header), indirect when negotiated.  Consumed buffers are
    reposted as packets are taken out (`recv`, `recv_many`, `poll_rx`).  `rx_buffers` (per rx
    queue; default: as many as the ring holds) may be 0 to model a guest that never posts.

    `send(frame, hdr=None, pair=0)` puts a 12-byte virtio_net_hdr (a dict of NetHdr fields,
    raw bytes, or None for all-zero) before the frame in one descriptor, or split at the
    `split` lengths given, or (with `seed`) at random places, header included, over up to
    `max_segments` descriptors, direct or indirect.  Completed tx chains are reaped on the way;
    a full ring or guest RAM waits (bounded by `timeout`) for completions.

    The MAC (`.mac`) is the `mac` argument, else the backend's config (protocol feature CONFIG
    and VIRTIO_NET_F_MAC), else a random locally administered one, the way QEMU makes one up.
    `.config` is the backend's virtio_net config when it serves GET_CONFIG, else synthesized
    (`.config_source` says which).
    """

    def __init__(self, socket_path: str | os.PathLike, *, queue_pairs: int = 1,
                 mem_size: int | None = None, queue_size: int = 256, mrg_rxbuf: bool = True,
                 rx_buf_size: int = 2048, rx_buffers: int | None = None,
                 event_idx: bool = True, indirect: bool = True,
                 features: int = NET_DRIVER_FEATURES, two_regions: bool = False,
                 regions: Sequence[tuple[int, int, int]] | None = None,
                 use_add_mem_reg: bool | None = None,
                 protocol_features: int = WANTED_PROTOCOL_FEATURES,
                 mac: str | bytes | None = None, seed: int | None = None,
                 max_segments: int = 4, timeout: float = DEFAULT_TIMEOUT,
                 packed: bool = False):
        if queue_pairs < 1:
            raise ValueError("queue_pairs must be >= 1")
        if rx_buf_size < vnet.HDR_SIZE:
            raise ValueError(f"rx_buf_size {rx_buf_size} cannot hold a virtio_net_hdr")
        if rx_buffers is not None and not 0 <= rx_buffers <= queue_size:
            raise ValueError(f"rx_buffers {rx_buffers} outside 0..{queue_size}")
        features = int(features) & ~(vnet.F_CTRL_VQ)
        if not mrg_rxbuf:
            features &= ~vnet.F_MRG_RXBUF
        self.queue_pairs = queue_pairs
        self.rx_buf_size = rx_buf_size
        self.rx_buffers = rx_buffers
        if mem_size is None:
            mem_size = self._default_mem_size(queue_pairs, queue_size, rx_buf_size, rx_buffers)
        super().__init__(socket_path, mem_size=mem_size, num_queues=2 * queue_pairs,
                         queue_size=queue_size, two_regions=two_regions, event_idx=event_idx,
                         indirect=indirect, regions=regions, use_add_mem_reg=use_add_mem_reg,
                         protocol_features=protocol_features,
                         device_features=features | virtio.F_VERSION_1, timeout=timeout,
                         packed=packed)
        self._mac_arg = parse_mac(mac) if mac is not None else None
        self.mac: bytes | None = None
        self.config_source: str | None = None   # "backend" or "synthesized"
        self.backend_config = None              # what GET_CONFIG returned, if it did
        self.rng = random.Random(seed) if seed is not None else None
        self.max_segments = max(1, max_segments)
        self.hdr_size = vnet.HDR_SIZE
        self.rx_chain_bytes = 0
        self._rx: list[_RxQueue] = []
        self._tx_inflight: list[dict[int, list[int]]] = []
        self._rx_rr = 0
        # counters
        self.sent = 0
        self.received = 0
        self.tx_completed = 0
        self.tx_raw_completed = 0
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.rx_buffers_used = 0
        self.sent_per_pair = [0] * queue_pairs
        self.received_per_pair = [0] * queue_pairs
        self.num_buffers_max = 0
        self.rx_num_buffers_not_1 = 0

    @staticmethod
    def _default_mem_size(pairs: int, qsize: int, buf: int, rx_buffers: int | None) -> int:
        # worst case for rx: no MRG_RXBUF with GSO, one 64 KiB chain per ring slot
        nbuf = qsize if rx_buffers is None else rx_buffers
        chain = -(-(vnet.MAX_GSO_FRAME + vnet.HDR_SIZE) // buf) * (buf + 16) + 64
        rx = nbuf * chain
        tx = 8 * MiB
        rings = 2 * (26 * qsize + 4096)
        total = pairs * (rx + tx + rings) + 8 * MiB
        return -(-total // (2 * MiB)) * 2 * MiB

    # -- negotiated state --

    @property
    def has_mrg_rxbuf(self) -> bool:
        return bool(self.features & vnet.F_MRG_RXBUF)

    def has_feature(self, f: int) -> bool:
        return bool(self.features & f)

    # -- connection hooks --

    def _check_queue_count(self) -> None:
        # For net, GET_QUEUE_NUM counts queue *pairs* (QEMU's vhost_net_get_max_queues, DPDK's
        # rte_vhost_driver_get_queue_num); without protocol MQ only one pair exists.
        if self.queue_pairs > self.max_queues:
            raise FrontendError(f"{self.queue_pairs} queue pairs requested, backend supports "
                                f"{self.max_queues}"
                                + ("" if self.protocol_features & ProtocolFeature.MQ
                                   else " (protocol feature MQ not negotiated)"))

    def _read_device_config(self) -> None:
        # QEMU's virtio-net does not ask a vhost-user backend for its config; we do when
        # offered, and fall back to a synthesized one when the backend cannot serve it.
        for size in (vnet.CONFIG_SIZE, 12, 10, 6):
            try:
                raw = self.get_config_raw(size)
            except VhostUserError:
                if self.sock is None:
                    raise
                continue
            self.backend_config = vnet.Config.parse(raw + bytes(vnet.CONFIG_SIZE - size))
            return

    def get_config(self, size: int = vnet.CONFIG_SIZE, offset: int = 0):
        """GET_CONFIG, parsed as virtio_net.Config for the full layout, else raw bytes."""
        raw = self.get_config_raw(size, offset)
        if offset == 0 and size >= vnet.CONFIG_SIZE:
            return vnet.Config.parse(raw)
        return raw

    def _after_features(self) -> None:
        f = self.features
        self.hdr_size = (vnet.HDR_SIZE if f & (virtio.F_VERSION_1 | vnet.F_MRG_RXBUF)
                         else vnet.LEGACY_HDR_SIZE)
        if self.queue_pairs > 1 and not f & vnet.F_MQ:
            raise FrontendError(f"{self.queue_pairs} queue pairs need VIRTIO_NET_F_MQ, which "
                                f"the backend does not offer (features "
                                f"{self.backend_features:#x})")
        bc = self.backend_config
        if bc is not None and f & vnet.F_MQ and bc.max_virtqueue_pairs \
                and self.queue_pairs > bc.max_virtqueue_pairs:
            raise FrontendError(f"{self.queue_pairs} queue pairs requested, config space says "
                                f"max_virtqueue_pairs {bc.max_virtqueue_pairs}")
        if self._mac_arg is not None:
            self.mac = self._mac_arg
        elif bc is not None and f & vnet.F_MAC and any(bc.mac):
            self.mac = bytes(bc.mac)
        else:
            rnd = random.Random() if self.rng is None else self.rng
            self.mac = bytes([0x52, 0x54, 0x00, rnd.randrange(256), rnd.randrange(256),
                              rnd.randrange(256)])
        if bc is not None:
            self.config = bc
            self.config_source = "backend"
        else:
            self.config = vnet.Config.parse(vnet.Config.build(dict(
                mac=self.mac, status=vnet.S_LINK_UP, max_virtqueue_pairs=self.queue_pairs,
                mtu=vnet.DEFAULT_MTU, speed=0xFFFFFFFF, duplex=0xFF)))
            self.config_source = "synthesized"
        mtu = vnet.DEFAULT_MTU
        if f & vnet.F_MTU and bc is not None and bc.mtu:
            mtu = max(mtu, bc.mtu)
        self.mtu = mtu
        if f & vnet.F_MRG_RXBUF:
            self.rx_chain_bytes = self.rx_buf_size
        else:
            if f & (vnet.F_GUEST_TSO4 | vnet.F_GUEST_TSO6 | vnet.F_GUEST_UFO):
                need = self.hdr_size + vnet.MAX_GSO_FRAME - VLAN_HLEN + 4  # 65562 with hdr
            else:
                need = self.hdr_size + mtu + vnet.ETH_HLEN + VLAN_HLEN
            need = max(need, self.hdr_size + 1514)
            self.rx_chain_bytes = -(-need // self.rx_buf_size) * self.rx_buf_size

    @property
    def rx_pieces(self) -> int:
        """Descriptors per rx chain."""
        return max(1, self.rx_chain_bytes // self.rx_buf_size)

    def _after_start(self) -> None:
        pieces = self.rx_pieces
        per_slot = 1 if (pieces == 1 or self.has_indirect) else pieces
        target = self.queue_size // per_slot if self.rx_buffers is None else self.rx_buffers
        if target * per_slot > self.queue_size:
            raise FrontendError(f"{target} rx chains of {per_slot} descriptors do not fit a "
                                f"queue of {self.queue_size}")
        for p in range(self.queue_pairs):
            rq = _RxQueue(self.queues[vnet.rx_queue(p)], p)
            rq.target = target
            for _ in range(target):
                chain = []
                left = self.rx_chain_bytes
                while left > 0:
                    ln = min(self.rx_buf_size, left)
                    gpa = self.mem.alloc(ln, align=64)
                    self.mem.fill(gpa, ln, RX_POISON)
                    chain.append((gpa, ln))
                    left -= ln
                rq.chains.append(chain)
                rq.idle.append(len(rq.chains) - 1)
            self._rx.append(rq)
            self._tx_inflight.append({})
        for rq in self._rx:
            self._post_rx(rq)

    def _post_rx(self, rq: _RxQueue) -> int:
        """Post every idle rx chain; kick if the backend asks.  Returns how many were posted."""
        heads = []
        vq = rq.vq
        while rq.idle:
            cid = rq.idle[-1]
            chain = rq.chains[cid]
            try:
                head = vq.add_chain([(g, ln, True) for g, ln in chain],
                                    indirect=len(chain) > 1 and self.has_indirect)
            except (QueueFull, GuestRAMFull):
                break
            rq.idle.pop()
            rq.posted[head] = cid
            heads.append(head)
        if heads:
            vq.publish(heads)
            vq.kick()
        return len(heads)

    def post_rx(self, n: int | None = None, pair: int | None = None) -> int:
        """Post `n` more rx buffers (allocating them) to `pair` (default: all), or repost the
        idle ones (`n=None`); raises the target kept posted.  Returns the number posted."""
        self._need_started()
        total = 0
        for rq in self._rx_queues(pair):
            if n:
                for _ in range(n):
                    chain = []
                    left = self.rx_chain_bytes
                    while left > 0:
                        ln = min(self.rx_buf_size, left)
                        chain.append((self.mem.alloc(ln, align=64), ln))
                        left -= ln
                    rq.chains.append(chain)
                    rq.idle.append(len(rq.chains) - 1)
                rq.target += n
            total += self._post_rx(rq)
        return total

    def _rx_queues(self, pair: int | None) -> list[_RxQueue]:
        if pair is None:
            return self._rx
        if not 0 <= pair < self.queue_pairs:
            raise ValueError(f"queue pair {pair} does not exist ({self.queue_pairs} pairs)")
        return [self._rx[pair]]

    def _need_started(self) -> None:
        if not self._started or self._closed:
            raise FrontendError("not connected")

    # -- waiting --

    def _wait_calls(self, qids: Sequence[int], deadline: float) -> bool:
        """Arm interrupts on `qids`; if nothing is waiting, sleep on their call eventfds until
        one fires or `deadline`.  Returns False once the deadline has passed.  A backend
        disconnect raises VhostUserError."""
        if any([self.queues[q].arm_interrupt() for q in qids]):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        poller = select.poll()
        for q in qids:
            poller.register(self.queues[q].call_fd, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        for fd, ev in poller.poll(max(1, int(left * 1000))):
            if fd == self.sock.fileno():
                if ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
                    raise VhostUserError(f"backend disconnected: {self.describe()}")
                try:
                    if not self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        raise VhostUserError(f"backend disconnected: {self.describe()}")
                except (BlockingIOError, InterruptedError):
                    pass
                # unexpected data on the socket: leave it; sleep a little instead of spinning
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
        for q in qids:
            self.queues[q].drain_call()
        return True

    # -- tx --

    def _build_hdr(self, hdr: dict | bytes | bytearray | None) -> bytes:
        if hdr is None:
            return bytes(self.hdr_size)
        if isinstance(hdr, (bytes, bytearray, memoryview)):
            return bytes(hdr)
        fields = {k: int(hdr.get(k, 0)) for k in NET_HDR_FIELDS}
        raw = _NET_HDR.pack(*(fields[k] for k in NET_HDR_FIELDS))
        return raw[:self.hdr_size]

    def _tx_split(self, n: int, split: Sequence[int] | None) -> list[int]:
        if split is not None:
            pieces = [int(x) for x in split]
            if sum(pieces) != n or any(p <= 0 for p in pieces):
                raise ValueError(f"split {pieces} does not cover {n} bytes in positive pieces")
            return pieces
        if self.rng is None or n < 2:
            return [n]
        k = self.rng.randint(1, min(self.max_segments, n))
        cuts = sorted(self.rng.sample(range(1, n), k - 1))
        edges = [0, *cuts, n]
        return [b - a for a, b in zip(edges, edges[1:])]

    def _reap_tx(self, pair: int) -> int:
        vq = self.queues[vnet.tx_queue(pair)]
        fl = self._tx_inflight[pair]
        n = 0
        for uid, _ulen in vq.reap():
            blocks = fl.pop(uid, None)
            if blocks is None:
                self.tx_raw_completed += 1      # a chain laid out with the low-level API
                continue
            for b in blocks:
                self.mem.free(b)
            n += 1
        self.tx_completed += n
        return n

    def _prepare_tx(self, pair: int, data: bytes, split: Sequence[int] | None,
                    indirect: bool | None) -> int:
        vq = self.queues[vnet.tx_queue(pair)]
        blocks: list[int] = []
        try:
            segs = []
            pos = 0
            mv = memoryview(data)
            for ln in self._tx_split(len(data), split):
                gpa = self.mem.alloc(ln, align=8 if self.rng is not None else 64)
                blocks.append(gpa)
                self.mem.write(gpa, mv[pos:pos + ln])
                segs.append((gpa, ln, False))
                pos += ln
            if indirect is None:
                if self.has_indirect and len(segs) > 1:
                    indirect = self.rng.random() < 0.5 if self.rng is not None else True
                else:
                    indirect = False
            if indirect and not self.has_indirect:
                raise FrontendError("indirect descriptors were not negotiated")
            if not indirect and len(segs) > vq.size:
                raise FrontendError(f"{len(segs)} descriptors do not fit a queue of {vq.size}")
            head = vq.add_chain(segs, indirect=indirect)
        except BaseException:
            for b in blocks:
                self.mem.free(b)
            raise
        self._tx_inflight[pair][head] = blocks
        return head

    def send_many(self, frames: Iterable[bytes | tuple], pair: int = 0,
                  hdr: dict | bytes | None = None, split: Sequence[int] | None = None,
                  indirect: bool | None = None, timeout: float | None = None) -> int:
        """Queue `frames` on tx of `pair`; an entry may be a frame (with the common `hdr`) or a
        (hdr, frame) tuple.  Waits for completions only when the ring or guest RAM is full
        (no progress within `timeout` raises TimeoutError).  Returns the number sent; they may
        still be in flight (see `wait_tx`)."""
        self._need_started()
        if not 0 <= pair < self.queue_pairs:
            raise ValueError(f"queue pair {pair} does not exist ({self.queue_pairs} pairs)")
        timeout = self.timeout if timeout is None else timeout
        txq = vnet.tx_queue(pair)
        vq = self.queues[txq]
        n = 0
        heads: list[int] = []
        it = iter(frames)
        item = next(it, None)
        deadline = time.monotonic() + timeout
        while item is not None:
            if isinstance(item, tuple):
                h, frame = item
            else:
                h, frame = hdr, item
            data = self._build_hdr(h) + bytes(frame)
            self._reap_tx(pair)
            try:
                head = self._prepare_tx(pair, data, split, indirect)
            except (QueueFull, GuestRAMFull):
                if heads:
                    vq.publish(heads)
                    vq.kick()
                    heads = []
                if not self._tx_inflight[pair] and not vq.in_flight:
                    raise
                if self._reap_tx(pair):
                    deadline = time.monotonic() + timeout
                    continue
                if not self._wait_calls([txq], deadline):
                    raise TimeoutError(f"tx of pair {pair} made no progress in {timeout}s: "
                                       f"{vq.describe()}") from None
                continue
            heads.append(head)
            n += 1
            self.sent += 1
            self.sent_per_pair[pair] += 1
            self.tx_bytes += len(data) - self.hdr_size
            if len(heads) >= 32:
                vq.publish(heads)
                vq.kick()
                heads = []
            item = next(it, None)
        if heads:
            vq.publish(heads)
            vq.kick()
        self._reap_tx(pair)
        return n

    def send(self, frame: bytes, hdr: dict | bytes | None = None, pair: int = 0,
             split: Sequence[int] | None = None, indirect: bool | None = None) -> None:
        """Send one frame with a virtio_net_hdr (dict of fields, raw bytes, None = zeros)."""
        self.send_many([(hdr, frame)], pair=pair, split=split, indirect=indirect)

    def send_raw_chain(self, entries: Sequence[tuple[int, int, int, int | None]],
                       pair: int = 0, indices: Sequence[int] | None = None) -> int:
        """Lay out arbitrary (addr, len, flags, next) descriptors on tx of `pair` (see
        VirtQueue.add_raw_descs), publish the first as a head and kick.  Returns the head."""
        self._need_started()
        vq = self.queues[vnet.tx_queue(pair)]
        idx = vq.add_raw_descs(entries, indices)
        vq.publish([idx[0]])
        vq.kick(force=True)
        return idx[0]

    def tx_in_flight(self, pair: int | None = None) -> int:
        pairs = range(self.queue_pairs) if pair is None else [pair]
        return sum(self.queues[vnet.tx_queue(p)].in_flight for p in pairs)

    def wait_tx(self, timeout: float | None = None, pair: int | None = None) -> None:
        """Wait until every tx chain (ours and raw ones) of `pair` (default all) came back."""
        self._need_started()
        timeout = self.timeout if timeout is None else timeout
        pairs = list(range(self.queue_pairs)) if pair is None else [pair]
        deadline = time.monotonic() + timeout
        while True:
            for p in pairs:
                self._reap_tx(p)
            busy = [p for p in pairs if self.queues[vnet.tx_queue(p)].in_flight]
            if not busy:
                return
            if not self._wait_calls([vnet.tx_queue(p) for p in busy], deadline):
                raise TimeoutError(f"tx not complete after {timeout}s: " + "; ".join(
                    self.queues[vnet.tx_queue(p)].describe() for p in busy))

    # -- rx --

    def _reap_rx(self, rq: _RxQueue) -> int:
        n = 0
        for uid, ulen in rq.vq.reap():
            cid = rq.posted.pop(uid, None)
            if cid is None:
                raise RingError(f"rx queue {rq.vq.index}: backend returned head {uid} (len "
                                f"{ulen}), which is not a posted buffer")
            cap = sum(ln for _, ln in rq.chains[cid])
            if ulen > cap:
                raise RingError(f"rx queue {rq.vq.index}: used len {ulen} for head {uid} "
                                f"exceeds its {cap}-byte buffer")
            rq.pending.append((cid, ulen))
            n += 1
        self.rx_buffers_used += n
        return n

    def _read_chain(self, cid_chain: list[tuple[int, int]], n: int) -> bytes:
        out = []
        for gpa, ln in cid_chain:
            if n <= 0:
                break
            k = min(ln, n)
            out.append(self.mem.read(gpa, k))
            n -= k
        return b"".join(out)

    def _assemble(self, rq: _RxQueue) -> RxPacket | None:
        """One packet from the front of `rq.pending`, or None if it is not complete yet."""
        if not rq.pending:
            return None
        cid, ulen = rq.pending[0]
        q = rq.vq.index
        if ulen < self.hdr_size:
            raise RingError(f"rx queue {q}: used len {ulen} is shorter than the "
                            f"{self.hdr_size}-byte virtio_net_hdr")
        first = self._read_chain(rq.chains[cid], ulen)
        hdr = parse_net_hdr(first[:self.hdr_size])
        if self.has_mrg_rxbuf:
            nb = hdr["num_buffers"]
            if nb < 1:
                raise RingError(f"rx queue {q}: num_buffers {nb} with MRG_RXBUF")
            if nb > len(rq.pending) + len(rq.posted):
                # the rest can never arrive: fewer buffers are out than the header announces
                raise RingError(f"rx queue {q}: num_buffers {nb} but only {len(rq.pending)} "
                                f"used + {len(rq.posted)} posted buffers")
            if len(rq.pending) < nb:
                return None
        else:
            nb = 1
            if self.hdr_size == vnet.HDR_SIZE and hdr["num_buffers"] != 1:
                # virtio 1.x 5.1.6.4: "num_buffers will always be 1" without MRG_RXBUF (DPDK
                # leaves it unwritten); counted, not fatal: drivers ignore it
                self.rx_num_buffers_not_1 += 1
        parts = [first[self.hdr_size:]]
        lens = [ulen]
        rq.pending.popleft()
        done = [cid]
        for _ in range(nb - 1):
            c2, l2 = rq.pending.popleft()
            if l2 == 0:
                raise RingError(f"rx queue {q}: continuation buffer of a {nb}-buffer packet "
                                f"has used len 0")
            parts.append(self._read_chain(rq.chains[c2], l2))
            lens.append(l2)
            done.append(c2)
        rq.idle.extend(done)
        frame = b"".join(parts)
        self.num_buffers_max = max(self.num_buffers_max, nb)
        self.received += 1
        self.received_per_pair[rq.pair] += 1
        self.rx_bytes += len(frame)
        return RxPacket(hdr, frame, rq.pair, tuple(lens))

    def poll_rx(self, pair: int | None = None) -> list[RxPacket]:
        """Every packet already received (no waiting); consumed buffers are reposted."""
        self._need_started()
        out = []
        for rq in self._rx_queues(pair):
            self._reap_rx(rq)
            while True:
                pkt = self._assemble(rq)
                if pkt is None:
                    break
                out.append(pkt)
            if rq.idle:
                self._post_rx(rq)
        return out

    def recv_packets(self, n: int, timeout: float | None = None,
                     pair: int | None = None) -> list[RxPacket]:
        """Up to `n` packets, waiting at most `timeout` seconds in all (default: the
        frontend's); fewer (maybe none) if the time runs out."""
        self._need_started()
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        rqs = self._rx_queues(pair)
        out: list[RxPacket] = []
        while len(out) < n:
            progressed = False
            for k in range(len(rqs)):
                rq = rqs[(self._rx_rr + k) % len(rqs)]
                self._reap_rx(rq)
                while len(out) < n:
                    pkt = self._assemble(rq)
                    if pkt is None:
                        break
                    out.append(pkt)
                    progressed = True
                if rq.idle:
                    self._post_rx(rq)
            self._rx_rr += 1
            if len(out) >= n or progressed:
                continue
            if not self._wait_calls([rq.vq.index for rq in rqs], deadline):
                break
        return out

    def recv_packet(self, timeout: float | None = None,
                    pair: int | None = None) -> RxPacket | None:
        got = self.recv_packets(1, timeout, pair)
        return got[0] if got else None

    def recv(self, timeout: float | None = None,
             pair: int | None = None) -> tuple[dict, bytes] | None:
        """One received packet as (virtio_net_hdr fields, frame), or None after `timeout`."""
        pkt = self.recv_packet(timeout, pair)
        return None if pkt is None else (pkt.hdr, pkt.frame)

    def recv_many(self, n: int, timeout: float | None = None,
                  pair: int | None = None) -> list[tuple[dict, bytes]]:
        """Up to `n` packets as (hdr, frame) pairs within `timeout` seconds in all."""
        return [(p.hdr, p.frame) for p in self.recv_packets(n, timeout, pair)]

    def drain(self, quiet: float = 0.2, limit: int = 100000,
              pair: int | None = None) -> list[RxPacket]:
        """Receive until nothing arrives for `quiet` seconds (at most `limit` packets)."""
        out: list[RxPacket] = []
        while len(out) < limit:
            got = self.recv_packets(limit - len(out), quiet, pair)
            if not got:
                break
            out += got
        return out

    def recycle_rx(self, pair: int | None = None, collect: list | None = None) -> int:
        """Take every used rx buffer back and post it again *without* parsing it (no header,
        no num_buffers): for tests that change the negotiated header layout under the
        frontend (SET_FEATURES by hand), where the frames are not readable as this frontend
        set them up.  With `collect`, the bytes each used buffer holds (its used length) are
        appended to it, in used-ring order.  Returns the number of used entries taken back."""
        self._need_started()
        n = 0
        for rq in self._rx_queues(pair):
            n += self._reap_rx(rq)
            while rq.pending:
                cid, ulen = rq.pending.popleft()
                if collect is not None:
                    collect.append(self._read_chain(rq.chains[cid], ulen))
                rq.idle.append(cid)
            if rq.idle:
                self._post_rx(rq)
        return n

    def rx_posted(self, pair: int = 0) -> int:
        """Rx chains of `pair` currently posted (owned by the backend)."""
        return len(self._rx[pair].posted)

    def rx_capacity(self, pair: int = 0) -> int:
        """Rx chains of `pair` kept posted (what the ring can hold of them, or `rx_buffers`)."""
        return self._rx[pair].target

    def rx_frames_capacity(self, pair: int = 0, frame_len: int = 1514) -> int:
        """How many `frame_len`-byte frames fit in the rx buffers of `pair` at once."""
        per = 1
        if self.has_mrg_rxbuf:
            per = -(-(frame_len + self.hdr_size) // self.rx_buf_size)
        return self._rx[pair].target // per

    def stats(self) -> dict:
        return dict(sent=self.sent, tx_completed=self.tx_completed,
                    tx_raw_completed=self.tx_raw_completed, received=self.received,
                    tx_bytes=self.tx_bytes, rx_bytes=self.rx_bytes,
                    rx_buffers_used=self.rx_buffers_used, num_buffers_max=self.num_buffers_max,
                    rx_num_buffers_not_1=self.rx_num_buffers_not_1,
                    sent_per_pair=list(self.sent_per_pair),
                    received_per_pair=list(self.received_per_pair))

    def describe(self) -> str:
        return (super().describe() + f"; mac {format_mac(self.mac) if self.mac else '?'}; "
                + ", ".join(f"{k}={v}" for k, v in self.stats().items()))


# --------------------------------------------------------------------------------------------
# Frames for tests and benchmarks
# --------------------------------------------------------------------------------------------

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_TEST = 0x88B5        # IEEE 802 local experimental ethertype 1
BROADCAST = b"\xff" * 6


def inet_checksum(data: bytes, start: int = 0) -> int:
    """RFC 1071 ones' complement sum, complemented (0 is returned as 0)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ones_sum(data: bytes, start: int = 0) -> int:
    """Ones' complement sum (not complemented)."""
    return ~inet_checksum(data, start) & 0xFFFF


def make_frame(size: int, dst: bytes = BROADCAST, src: bytes = b"\x02\0\0\0\0\1",
               seq: int = 0, ethertype: int = ETH_P_TEST) -> bytes:
    """A `size`-byte Ethernet frame (>= 14 + 8) whose payload is `seq` and a pattern derived
    from it, so any corruption or reordering is visible."""
    if size < vnet.ETH_HLEN + 8:
        raise ValueError(f"frame size {size} too small")
    n = size - vnet.ETH_HLEN - 8
    pat = bytes((seq * 7 + i * 13 + (i >> 8)) & 0xFF for i in range(min(n, 509)))
    body = (pat * (n // 509 + 1))[:n] if n > 509 else pat
    return dst + src + struct.pack("!H", ethertype) + struct.pack("!II", seq & 0xFFFFFFFF,
                                                                  size) + body


def tcp4_frame(payload: bytes, *, src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str,
               sport: int = 40000, dport: int = 5001, seq: int = 1, ack: int = 0,
               flags: int = 0x18, ttl: int = 64, ip_id: int = 1,
               partial_csum: bool = False) -> bytes:
    """An Ethernet + IPv4 + TCP frame.  The IPv4 header checksum is always filled; the TCP
    checksum is complete, or with `partial_csum` only the pseudo-header sum (what a driver
    leaves for VIRTIO_NET_HDR_F_NEEDS_CSUM).  IP total length may exceed the MTU (GSO)."""
    src = socket.inet_aton(src_ip)
    dst = socket.inet_aton(dst_ip)
    tcp_len = 20 + len(payload)
    tot = 20 + tcp_len
    if tot > 0xFFFF:
        raise ValueError(f"IPv4 packet of {tot} bytes does not fit the total length field")
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, tot, ip_id & 0xFFFF, 0x4000, ttl, 6, 0, src,
                      dst)
    iph = iph[:10] + struct.pack("!H", inet_checksum(iph)) + iph[12:]
    tcph = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                       5 << 4, flags, 65535, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, tcp_len)
    if partial_csum:
        csum = ones_sum(pseudo)
    else:
        csum = inet_checksum(pseudo + tcph + payload)
    tcph = tcph[:16] + struct.pack("!H", csum) + tcph[18:]
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + iph + tcph + payload


def tcp4_gso_hdr(mss: int = 1448, ecn: bool = False) -> dict:
    """virtio_net_hdr fields for a tcp4_frame(partial_csum=True) to be segmented by `mss`."""
    return dict(flags=vnet.HDR_F_NEEDS_CSUM,
                gso_type=vnet.GSO_TCPV4 | (vnet.GSO_ECN if ecn else 0),
                hdr_len=vnet.ETH_HLEN + 20 + 20, gso_size=mss,
                csum_start=vnet.ETH_HLEN + 20, csum_offset=16)


def tcp4_csum_ok(frame: bytes) -> bool:
    """Whether the TCP checksum of an Ethernet/IPv4/TCP (no options) frame is complete."""
    ihl = (frame[vnet.ETH_HLEN] & 0xF) * 4
    tot = struct.unpack_from("!H", frame, vnet.ETH_HLEN + 2)[0]
    ip = frame[vnet.ETH_HLEN:vnet.ETH_HLEN + tot]
    seg = ip[ihl:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    return inet_checksum(pseudo + seg) == 0
