"""net.py: the virtio-net device (virtio 1.2 §5.1) on a tap device or a port of the in-process
L2 switch.

Owns: the feature set and config space, opening and configuring taps (IFF_TAP|IFF_NO_PI|
IFF_VNET_HDR, IFF_MULTI_QUEUE for several pairs, TUNSETVNETHDRSZ to the negotiated header size,
TUNSETOFFLOAD to the offloads the guest acked), and which worker thread serves which queue: one
per queue pair (tap mode: tx + rx of the pair; switch mode: the pair's tx, its rx being written by
the senders).  Packets never pass through here; cython_ext/net.pyx moves them.  `main` wires the
CLI to one server per socket and stays thin.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import struct
import sys
import threading

from protocols import virtio
from protocols import virtio_net as vn
from protocols.vhost_user import ProtocolFeature
from vhost.device import (CounterTotals, Device, QueueHandle, WorkerStuck, join_worker,
                          zero_counters)

from cython_ext.net import NetWorker, Port, Switch

log = logging.getLogger("pyvhost.net")

# <linux/if_tun.h>, <linux/sockios.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO = 0x01, 0x02, 0x04, 0x08, 0x10
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFMTU = 0x8913, 0x8914, 0x8922
IFF_UP = 0x1
MAX_PAIRS = 16
# Port counters that are frames the backend could not deliver into a guest's rx queue.
RX_DROP_STATS = ("rx_dropped_no_room", "rx_dropped_offload", "rx_dropped_too_small",
                 "rx_dropped_fault")


def _ifreq(name: str, fmt: str, *values) -> bytes:
    return struct.pack("16s" + fmt, name.encode(), *values).ljust(40, b"\0")


class Tap:
    """A tap interface opened once per queue pair (IFF_MULTI_QUEUE when more than one)."""

    def __init__(self, name: str, pairs: int = 1, mtu: int | None = None):
        if not name or len(name.encode()) > 15:
            raise ValueError(f"bad tap name {name!r} (1..15 bytes)")
        self.name = name
        try:        # asks the kernel in this process's network namespace (sysfs may not)
            socket.if_nametoindex(name)
            self.created = False
        except OSError:
            self.created = True
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if pairs > 1 else 0)
        self.fds: list[int] = []
        try:
            for _ in range(pairs):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
                self.fds.append(fd)
                try:
                    fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, "H", flags))
                except OSError as e:
                    raise OSError(e.errno, f"tap {name}: TUNSETIFF failed ({e.strerror}); an "
                                  f"existing tap must be a {'multi-queue ' if pairs > 1 else ''}"
                                  f"tap with vnet headers") from None
            self.set_vnet_hdr_size(vn.HDR_SIZE)
            if mtu:
                self.set_mtu(mtu)
            if self.created:
                self._set_up()
        except BaseException:
            self.close()
            raise
        log.info("%s tap %s (%d queue%s)", "created" if self.created else "attached to", name,
                 pairs, "s" if pairs > 1 else "")

    def _ctl(self, request: int, ifr: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return fcntl.ioctl(s.fileno(), request, ifr)

    def _set_up(self) -> None:
        cur = struct.unpack_from("H", self._ctl(SIOCGIFFLAGS, _ifreq(self.name, "H", 0)), 16)[0]
        self._ctl(SIOCSIFFLAGS, _ifreq(self.name, "H", cur | IFF_UP))

    def set_mtu(self, mtu: int) -> None:
        self._ctl(SIOCSIFMTU, _ifreq(self.name, "i", mtu))

    def set_vnet_hdr_size(self, size: int) -> None:
        for fd in self.fds:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", size))

    def set_offload(self, features: int) -> None:
        """TUNSETOFFLOAD to what the guest can receive: the kernel then hands us only frames
        the guest accepts (it segments / checksums the rest itself)."""
        off = 0
        if features & vn.F_GUEST_CSUM:
            off |= TUN_F_CSUM
            if features & vn.F_GUEST_TSO4:
                off |= TUN_F_TSO4
            if features & vn.F_GUEST_TSO6:
                off |= TUN_F_TSO6
            if features & vn.F_GUEST_ECN and off & (TUN_F_TSO4 | TUN_F_TSO6):
                off |= TUN_F_TSO_ECN
            if features & vn.F_GUEST_UFO:
                off |= TUN_F_UFO
        try:
            fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, off)
        except OSError as e:     # e.g. UFO on a kernel that dropped it: retry without
            if off & TUN_F_UFO:
                fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, off & ~TUN_F_UFO)
            else:
                raise OSError(e.errno, f"tap {self.name}: TUNSETOFFLOAD {off:#x}: {e.strerror}")

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {text!r}")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


def default_mac(seed: str) -> bytes:
    """52:54:00:xx:xx:xx (QEMU's prefix), stable for a given socket path."""
    return b"\x52\x54\x00" + hashlib.sha1(seed.encode()).digest()[:3]


class NetDevice(Device):
    device_type = "net"

    def __init__(self, *, pairs: int = 1, mac: bytes, mtu: int = vn.DEFAULT_MTU,
                 tap: Tap | None = None, switch: Switch | None = None, port_index: int = 0,
                 max_queue_size: int = 1024, name: str = "net0"):
        if not 1 <= pairs <= MAX_PAIRS:
            raise ValueError(f"queue pairs must be 1..{MAX_PAIRS}")
        if (tap is None) == (switch is None):
            raise ValueError("a net device needs exactly one of a tap and a switch")
        self.pairs = pairs
        self.num_queues = 2 * pairs
        self.max_queue_size = max_queue_size
        self.mac = mac
        self.mtu = mtu
        self.tap = tap
        self.switch = switch
        self.name = name
        self.port = Port("vhost", pairs, switch, port_index) if switch is not None else \
            Port("vhost", pairs)
        self._acked = 0
        self._handles: dict[int, QueueHandle] = {}
        self._workers: dict[int, tuple[NetWorker, threading.Thread]] = {}
        self._stuck: list = []                  # abandoned (worker, thread): never freed
        # guards _handles, _workers and _totals: the event loop starts/stops queues while a
        # metrics thread reads queue_counters
        self._lock = threading.RLock()
        self._done_stats: dict[str, int] = {}     # tx-side counters of stopped workers
        self._totals = CounterTotals(self.num_queues)

    # -- Device interface ------------------------------------------------------------------------

    def features(self) -> int:
        return (virtio.F_VERSION_1 | virtio.F_RING_INDIRECT_DESC | virtio.F_RING_EVENT_IDX
                | vn.F_MAC | vn.F_STATUS | vn.F_MTU | vn.F_MRG_RXBUF | vn.F_MQ
                | vn.F_CSUM | vn.F_GUEST_CSUM | vn.F_HOST_TSO4 | vn.F_HOST_TSO6 | vn.F_HOST_ECN
                | vn.F_HOST_UFO | vn.F_GUEST_TSO4 | vn.F_GUEST_TSO6 | vn.F_GUEST_ECN
                | vn.F_GUEST_UFO)

    def protocol_features(self) -> ProtocolFeature:
        return (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.RESET_DEVICE
                | ProtocolFeature.STATUS | ProtocolFeature.NET_MTU)

    def ack_features(self, features: int) -> None:
        self._acked = features
        # 5.1.6: the 12-byte header (with num_buffers) with VERSION_1 or MRG_RXBUF, else 10.
        hdr = vn.HDR_SIZE if features & (virtio.F_VERSION_1 | vn.F_MRG_RXBUF) else \
            vn.LEGACY_HDR_SIZE
        self.port.set_features(
            hdr_len=hdr, mrg_rxbuf=bool(features & vn.F_MRG_RXBUF),
            guest_csum=bool(features & vn.F_GUEST_CSUM),
            guest_tso4=bool(features & vn.F_GUEST_TSO4),
            guest_tso6=bool(features & vn.F_GUEST_TSO6),
            guest_ufo=bool(features & vn.F_GUEST_UFO),
            guest_ecn=bool(features & vn.F_GUEST_ECN))
        if self.tap is not None:
            self.tap.set_vnet_hdr_size(hdr)
            self.tap.set_offload(features)

    def config_bytes(self) -> bytes:
        return vn.Config.build(dict(mac=self.mac, status=vn.S_LINK_UP,
                                    max_virtqueue_pairs=self.pairs, mtu=self.mtu,
                                    speed=0xFFFFFFFF, duplex=0xFF))

    def get_config(self, offset: int, size: int) -> bytes:
        cfg = self.config_bytes() + bytes(256)
        if offset < 0 or size < 0 or offset + size > 256:
            raise ValueError(f"config read {offset}+{size} out of range")
        return cfg[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        # The MAC is writable by legacy drivers only (5.1.4); VERSION_1 guests use the ctrl vq,
        # which QEMU keeps.
        if offset + len(data) <= 6:
            mac = bytearray(self.mac)
            mac[offset:offset + len(data)] = data
            self.mac = bytes(mac)
            return
        raise ValueError(f"config write {offset}+{len(data)} is not allowed")

    def set_mtu(self, mtu: int) -> None:
        if not vn.MIN_MTU <= mtu <= vn.MAX_MTU:
            raise ValueError(f"MTU {mtu} out of range")
        self.mtu = mtu
        if self.tap is not None:
            self.tap.set_mtu(mtu)
        log.info("%s: frontend set MTU %d", self.name, mtu)

    def start_queue(self, index: int, queue: QueueHandle) -> None:
        with self._lock:
            if index in self._handles:
                raise RuntimeError(f"queue {index} already running")
            self._handles[index] = queue
            self._totals.clear_broken(index)     # a new ring: the old one's state is gone
            self._restart_pair(index // 2)

    def stop_queue(self, index: int) -> int:
        with self._lock:
            if index not in self._handles:
                raise KeyError(index)
            pair = index // 2
            self._stop_worker(pair)
            h = self._handles.pop(index)
            if index % 2 == 0:
                last = self.port.detach_rx(pair)
                # the rx virtqueue's own counters restart at the next attach; its frame
                # counters live on in the Port
                rc = self.port.rx_counters(pair)
                self._totals.retire(index, dict(kicks=rc["kicks"],
                                                notifications=rc["notifies"],
                                                errors=rc["faults"], broken=rc["broken"]))
            else:
                last = h.last_avail_idx
            self._restart_pair(pair)
            return last

    def reset(self) -> None:
        with self._lock:
            for index in sorted(self._handles):
                try:
                    self.stop_queue(index)
                except WorkerStuck:
                    self._handles.pop(index, None)      # logged; go on with the others
            self._totals.clear_broken()

    # -- workers ---------------------------------------------------------------------------------

    def _stop_worker(self, pair: int) -> None:
        entry = self._workers.pop(pair, None)
        if entry is None:
            return
        w, t = entry
        w.stop()
        try:
            join_worker(t, self.stop_timeout, f"{self.name}: pair {pair}")
        except WorkerStuck as e:
            self._stuck.append(entry)           # never freed: it may still touch the rings
            self.abandoned += 1
            log.error("%s", e)
            raise
        # every worker starts from zero: its tx queue's final counters go to the totals
        self._totals.retire(2 * pair + 1, self._tx_counters(w))
        tx = self._handles.get(2 * pair + 1)
        if tx is not None and w.tx_last_avail is not None:   # the worker served this tx queue
            tx.last_avail_idx = w.tx_last_avail
        for k, v in w.stats().items():
            self._done_stats[k] = self._done_stats.get(k, 0) + v
        faults = w.tx_faults()
        if faults:
            log.info("%s: pair %d tx faults: %s", self.name, pair, faults)

    def _restart_pair(self, pair: int) -> None:
        self._stop_worker(pair)
        rx = self._handles.get(2 * pair)
        tx = self._handles.get(2 * pair + 1)
        if rx is not None and not self.port.rx_active(pair):
            self.port.attach_rx(pair, rx.size, rx.desc, rx.avail, rx.used, rx.last_avail_idx,
                                rx.memory.table_bytes(), rx.call_fd, rx.event_idx, rx.indirect,
                                rx.signal_call)
            rx.signal_call = False
        tx_args, table = None, b""
        if tx is not None:
            tx_args = (tx.size, tx.desc, tx.avail, tx.used, tx.last_avail_idx, tx.kick_fd,
                       tx.call_fd, tx.event_idx, tx.indirect, tx.signal_call)
            tx.signal_call = False
            table = tx.memory.table_bytes()
        if self.tap is not None:
            if rx is None and tx is None:
                return
            w = NetWorker("tap", self.port, pair, None, self.tap.fds[pair], tx_args,
                          rx.kick_fd if rx is not None else -1, table)
        else:
            if tx is None:
                return                       # rx is passive in switch mode
            w = NetWorker("switch", self.port, pair, self.switch, -1, tx_args, -1, table)
        t = threading.Thread(target=w.run, name=f"pyvhost-net-{self.name}-p{pair}", daemon=True)
        self._workers[pair] = (w, t)
        t.start()

    @staticmethod
    def _tx_counters(w: NetWorker) -> dict[str, int]:
        st, tc = w.stats(), w.tx_counters()
        return dict(requests=st["tx_packets"], bytes_read=st["tx_bytes"],
                    dropped=st["tx_dropped"], errors=tc["faults"], kicks=tc["kicks"],
                    notifications=tc["notifies"], broken=int(tc["broken"]))

    def _rx_counters(self, pair: int) -> dict[str, int]:
        rc = self.port.rx_counters(pair)
        out = dict(requests=rc["rx_packets"], bytes_written=rc["rx_bytes"],
                   dropped=sum(rc[k] for k in RX_DROP_STATS))
        if rc["active"]:        # a detached queue's virtqueue counters are already retired
            out.update(kicks=rc["kicks"], notifications=rc["notifies"], errors=rc["faults"],
                       broken=int(rc["broken"]))
        return out

    def queue_counters(self) -> dict[int, dict[str, int]]:
        """Device.queue_counters for virtio-net; virtqueue 2p is the rx queue of pair p, 2p+1
        its tx queue.  Frame sizes exclude the virtio_net_hdr.
        rx: requests = frames delivered into the guest; bytes_written = their bytes;
        dropped = frames meant for this queue that were lost: no rx buffers (or the queue not
        running), a GSO frame the guest cannot take, buffers too small without MRG_RXBUF, bad
        rx buffers or a broken ring; errors = bad rx buffers the guest posted, plus 1 per
        corrupt avail ring; kicks = rx kicks consumed (tap mode, only while a frame waits for
        buffers; the switch never waits for them: 0); notifications = interrupts for rx.
        tx: requests = frames taken from the guest; bytes_read = their bytes; dropped = tx
        frames not sent (bad chains, too short to switch, tap write failures); errors = bad tx
        chains, plus 1 per corrupt avail ring; kicks / notifications of the tx queue.
        inflight is always 0 (a frame is handled synchronously).  broken: as for every device
        (kept while the queue is stopped, cleared when it starts again or at reset)."""
        with self._lock:
            live = dict(self._workers)
            out = {}
            for pair in range(self.pairs):
                out[2 * pair] = self._totals.view(2 * pair, self._rx_counters(pair))
                entry = live.get(pair)
                # holding the lock and the worker object: its struct stays alive while read
                out[2 * pair + 1] = self._totals.view(
                    2 * pair + 1, self._tx_counters(entry[0]) if entry else None)
        return out

    def stats(self) -> dict:
        out = self.port.stats()
        for k, v in self._done_stats.items():
            out[k] += v
        for w, _ in list(self._workers.values()):
            for k, v in w.stats().items():
                out[k] += v
        return out


class Uplink:
    """A tap joined to a switch as a port: a reader thread forwards what the host sends."""

    def __init__(self, tap: Tap, switch: Switch, index: int):
        self.tap = tap
        self.port = Port("tap", 1, switch, index, tap.fds[0])
        # The switch passes guests' frames through with their virtio_net_hdr; the tap takes them.
        # No receive offloads: the kernel segments and checksums what it sends us, so any guest
        # can take it.
        tap.set_offload(0)
        self.worker = NetWorker("uplink", self.port, 0, switch, tap.fds[0])
        self.thread = threading.Thread(target=self.worker.run, name="pyvhost-net-uplink",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join()
        self.port.detach()

    def stats(self) -> dict:
        out = self.port.stats()
        for k, v in self.worker.stats().items():
            out[k] += v
        return out

    def queue_counters(self) -> dict[int, dict[str, int]]:
        """The uplink in the vocabulary of Device.queue_counters, seen from the switch as a
        guest port is: 0 = towards the host (requests / bytes_written = frames written to the
        tap; dropped = tap writes that failed), 1 = from the host (requests / bytes_read =
        frames read from the tap; dropped = frames the switch could not take).  No virtqueues:
        kicks, notifications, errors, inflight and broken are 0.  The reader thread lives as
        long as the Uplink, so the values are cumulative without bookkeeping."""
        port, tx = self.port.stats(), self.worker.stats()
        to_host, from_host = zero_counters(), zero_counters()
        to_host.update(requests=port["rx_packets"], bytes_written=port["rx_bytes"],
                       dropped=sum(port[k] for k in RX_DROP_STATS))
        from_host.update(requests=tx["tx_packets"], bytes_read=tx["tx_bytes"],
                         dropped=tx["tx_dropped"])
        return {0: to_host, 1: from_host}


def main(argv=None) -> int:
    """pyvhost-net: one tap device, or several sockets joined by a switch (with an optional
    uplink tap); the command line becomes a configuration run by vhost/service.py.  At exit
    every port logs one `stats` line with its counters."""
    from vhost import cli, config, service

    args = cli.parse_net(argv)
    if cli.prologue(args, cli.NET_CAPABILITIES):
        return 0
    sockets = args.socket_path or [None]
    try:
        mac = parse_mac(args.mac) if args.mac else None
    except ValueError as e:
        sys.stderr.write(f"pyvhost-net: error: {e}\n")
        return 1
    common = dict(queues=args.queues, mtu=args.mtu, queue_size=args.queue_size, listen_fd=args.fd)
    switches = {}
    if args.switch:
        devices = tuple(
            config.NetSpec(name=f"{args.switch}:{k}", socket=path, switch=args.switch,
                           mac=(mac[:5] + bytes([(mac[5] + k) & 0xFF])).hex(":") if mac else
                           None, **common)
            for k, path in enumerate(sockets))
        switches[args.switch] = config.SwitchSpec(name=args.switch, tap=args.tap,
                                                  mac_ageing=args.mac_ageing, mtu=args.mtu)
    else:
        devices = (config.NetSpec(name=args.tap, socket=sockets[0], tap=args.tap,
                                  mac=args.mac, **common),)
    conf = config.Config(path=None, devices=devices, switches=switches,
                         service=config.ServiceSpec(metrics_address=args.metrics_address,
                                                    log_level=args.log_level, loop=args.loop))
    return service.run_single(conf, "pyvhost-net", args.loop)


if __name__ == "__main__":
    sys.exit(main())
