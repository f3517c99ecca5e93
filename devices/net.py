"""net.py: the virtio-net device type (virtio 1.2 §5.1) on a tap device or a port of the
in-process L2 switch.

Owns: its option table (`pyvhost-net` options, `type = "net"` keys) and the `[[switch]]` table,
the feature set and config space, opening and configuring taps (IFF_TAP|IFF_NO_PI|
IFF_VNET_HDR, IFF_MULTI_QUEUE for several pairs, TUNSETVNETHDRSZ to the negotiated header size,
TUNSETOFFLOAD to the offloads the guest acked), the switches of one process and their uplink
taps (NetEnv), and which worker thread serves which queue: one per queue pair (tap mode: tx +
rx of the pair; switch mode: the pair's tx, its rx being written by the senders).  Packets never
pass through here; cython_ext/net.pyx moves them.  Must not: import the server, the service or
the command line.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import socket
import struct
import threading
from dataclasses import dataclass, field

from protocols import ethernet, virtio
from protocols import virtio_net as vn
from protocols.vhost_user import ProtocolFeature
from vhost.device import Device, QueueHandle, QueueWorkers, WorkerStuck, zero_counters
from vhost.devtype import DeviceEnv, DeviceType, Option, OptionProblem

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
MAX_PAIRS = 16                  # cython_ext/net.pyx MAX_PAIRS
MAX_SWITCH_PORTS = 64           # cython_ext/net.pyx MAX_PORTS (uplink included)
MAC_TABLE_SIZE = 4096           # cython_ext/net.pyx MAC_TABLE_SIZE (one table per switch)
# Learned MACs one switch port may hold at once.  A guest normally sends from one MAC; one that
# bridges containers or nested guests, from a few dozen.  256 leaves those ample room, while a
# port flooding random source MACs fills at most 1/16 of the table, so the 16-slot
# neighbourhoods of the other stations keep free slots and nobody else's entry is pushed out.
# 0 means no limit, as for a Linux bridge port's max_learned.
DEFAULT_MAC_LIMIT = 256
# Port counters that are frames the backend could not deliver into a guest's rx queue.
RX_DROP_STATS = ("rx_dropped_no_room", "rx_dropped_offload", "rx_dropped_too_small",
                 "rx_dropped_fault")


def check_tap_name(name: str) -> None:
    if not name or len(name.encode()) > 15 or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"bad tap name {name!r} (1..15 bytes, no '/' or whitespace)")


def _ifreq(name: str, fmt: str, *values) -> bytes:
    return struct.pack("16s" + fmt, name.encode(), *values).ljust(40, b"\0")


class Tap:
    """A tap interface opened once per queue pair (IFF_MULTI_QUEUE when more than one)."""

    def __init__(self, name: str, pairs: int = 1, mtu: int | None = None):
        check_tap_name(name)
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
    dirty_log = True          # every guest write is logged while migrating (ring.pyx)
    packed_ring = True        # ring.pyx serves packed virtqueues too (rx and tx)

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
        from cython_ext.net import Port
        self.port = Port("vhost", pairs, switch, port_index) if switch is not None else \
            Port("vhost", pairs)
        self._release = None                    # set by NetType.build: give back tap / port
        self._acked = 0
        self._handles: dict[int, QueueHandle] = {}
        # one worker per queue pair, counting into the pair's tx queue (2p+1); rx counters
        # live in the Port, written by whoever delivers to it
        self.queues = QueueWorkers(self, f"pyvhost-net-{name}", key_name="pair",
                                   counters_of=self._tx_counters)
        # guards _handles: the control thread starts/stops queues while a metrics thread reads
        # queue_counters
        self._lock = threading.RLock()
        self._done_stats: dict[str, int] = {}     # tx-side counters of stopped workers
        # Pairs whose worker was abandoned (WorkerStuck): it may still read that pair's tx ring
        # and, in tap mode, the pair's tap queue fd, so no worker is started on the pair again:
        # in switch mode until the device is reset (the next connection brings new rings and
        # fds), in tap mode never (the tap queue fd is the stuck worker's).
        self._stuck_pairs: set[int] = set()

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
                | ProtocolFeature.STATUS | ProtocolFeature.NET_MTU | ProtocolFeature.RARP)

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

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP (QEMU sends it after a live migration when the guest did not ack
        GUEST_ANNOUNCE, which pyvhost does not offer): QEMU's RARP announcement for `mac`, out
        of the tap (with an all-zero virtio_net_hdr: no offloads) or into the switch as if the
        guest had sent it, so every other port and the uplink see it and the switch learns the
        MAC at this port."""
        frame = ethernet.rarp_announce(bytes(mac))
        if self.tap is not None:
            hdr = bytes(vn.HDR_SIZE if self._acked & (virtio.F_VERSION_1 | vn.F_MRG_RXBUF)
                        else vn.LEGACY_HDR_SIZE)
            try:
                os.write(self.tap.fds[0], hdr + frame)      # our own tap fd, non-blocking
            except OSError as e:
                raise ValueError(f"RARP not sent on {self.tap.name}: {e}") from None
        else:
            self.port.inject(frame)
        log.info("%s: sent a RARP announcement for %s", self.name,
                 ":".join(f"{b:02x}" for b in mac))

    def set_mtu(self, mtu: int) -> None:
        if not vn.MIN_MTU <= mtu <= vn.MAX_MTU:
            raise ValueError(f"MTU {mtu} out of range")
        self.mtu = mtu
        if self.tap is not None:
            self.tap.set_mtu(mtu)
        log.info("%s: frontend set MTU %d", self.name, mtu)

    def start_queue(self, index: int, queue: QueueHandle) -> None:
        """All or nothing: when the pair's worker cannot be (re)started with this queue, the
        queue is not recorded, its rx ring is not left attached to the port, and the pair runs
        on as before; the error goes back to the protocol (a failure reply, queue stopped)."""
        with self._lock:
            if index in self._handles:
                raise RuntimeError(f"queue {index} already running")
            pair = index // 2
            if pair in self._stuck_pairs:
                raise RuntimeError(f"queue pair {pair} has a stuck worker"
                                   + ("; restart the service" if self.tap is not None else ""))
            self._handles[index] = queue
            try:
                self._restart_pair(pair)
            except BaseException:
                self._handles.pop(index, None)
                if index % 2 == 0 and self.port.rx_active(pair):
                    self.port.detach_rx(pair)
                try:
                    self._restart_pair(pair)         # the pair's other queue runs on
                except Exception:
                    log.exception("%s: pair %d could not be restarted", self.name, pair)
                raise
            self.queues.clear_broken(index)      # a new ring: the old one's state is gone

    def stop_queue(self, index: int) -> int:
        with self._lock:
            if index not in self._handles:
                raise KeyError(index)
            pair = index // 2
            stuck = None
            try:
                self._stop_worker(pair)
            except WorkerStuck as e:
                stuck = e
                self._stuck_pairs.add(pair)
            h = self._handles.pop(index)
            if index % 2 == 0:
                # detached even with a stuck worker: nothing is delivered into this ring any
                # more, and a new connection's rx queue can be attached
                last = self.port.detach_rx(pair) if self.port.rx_active(pair) else \
                    h.last_avail_idx
                # the rx virtqueue's own counters restart at the next attach; its frame
                # counters live on in the Port
                rc = self.port.rx_counters(pair)
                self.queues.retire(index, dict(kicks=rc["kicks"], notifications=rc["notifies"],
                                               errors=rc["faults"], broken=rc["broken"]))
            else:
                last = h.last_avail_idx
            if stuck is not None:
                raise stuck                      # no new worker on a ring the stuck one owns
            self._restart_pair(pair)
            return last

    def reset(self) -> None:
        with self._lock:
            for index in sorted(self._handles):
                try:
                    self.stop_queue(index)
                except WorkerStuck:
                    pass                # logged; stop_queue cleaned up; go on with the others
            self.queues.clear_broken()
            if self.tap is None:
                self._stuck_pairs.clear()       # switch mode: the next rings are new ones

    @property
    def stuck(self) -> bool:
        return bool(self._stuck_pairs) or self.queues.stuck

    # -- workers ---------------------------------------------------------------------------------

    def _stop_worker(self, pair: int) -> None:
        if pair not in self.queues:
            return
        w = self.queues.stop(pair)     # WorkerStuck: logged, the worker kept alive forever
        tx = self._handles.get(2 * pair + 1)
        if tx is not None and w.tx_last_avail is not None:   # the worker served this tx queue
            tx.last_avail_idx = w.tx_last_avail
        for k, v in w.stats().items():
            self._done_stats[k] = self._done_stats.get(k, 0) + v
        faults = w.tx_faults()
        if faults:
            log.info("%s: pair %d tx faults: %s", self.name, pair, faults)

    def _restart_pair(self, pair: int) -> None:
        if pair in self._stuck_pairs:
            return                  # never a second worker on rings a stuck one may use
        self._stop_worker(pair)
        rx = self._handles.get(2 * pair)
        tx = self._handles.get(2 * pair + 1)
        if rx is not None and not self.port.rx_active(pair):
            self.port.attach_rx(pair, rx.size, rx.desc, rx.avail, rx.used, rx.last_avail_idx,
                                rx.memory.table_bytes(), rx.call_fd, rx.event_idx, rx.indirect,
                                rx.signal_call, log=rx.log, packed=rx.packed)
            rx.signal_call = False
        tx_args, table = None, b""
        if tx is not None:
            tx_args = (tx.size, tx.desc, tx.avail, tx.used, tx.last_avail_idx, tx.kick_fd,
                       tx.call_fd, tx.event_idx, tx.indirect, tx.signal_call, tx.packed)
            tx.signal_call = False
            table = tx.memory.table_bytes()
        from cython_ext.net import NetWorker
        if self.tap is not None:
            if rx is None and tx is None:
                return
            w = NetWorker("tap", self.port, pair, None, self.tap.fds[pair], tx_args,
                          rx.kick_fd if rx is not None else -1, table,
                          tx_log=tx.log if tx is not None else None)
        else:
            if tx is None:
                return                       # rx is passive in switch mode
            w = NetWorker("switch", self.port, pair, self.switch, -1, tx_args, -1, table,
                          tx_log=tx.log)
        # broken latches are cleared by start_queue for the queue that (re)started only
        self.queues.start(pair, w, queue=2 * pair + 1, clear_broken=False)

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
        frames not sent (bad chains, too short to switch, a source MAC the switch port may not
        use, tap write failures); errors = bad tx chains, plus 1 per corrupt avail ring;
        kicks / notifications of the tx queue.
        inflight is always 0 (a frame is handled synchronously).  broken: as for every device
        (kept while the queue is stopped, cleared when it starts again or at reset)."""
        with self._lock:
            return self.queues.counters(
                live={2 * pair: self._rx_counters(pair) for pair in range(self.pairs)})

    def close(self) -> None:
        """Queues are stopped (reset): give back the tap or the switch port."""
        if self._release is not None:
            self._release(self)
            self._release = None

    def stats(self) -> dict:
        out = self.port.stats()
        for k, v in self._done_stats.items():
            out[k] += v
        for w in self.queues.live():
            for k, v in w.stats().items():
                out[k] += v
        return out


def _close_tap(dev: NetDevice) -> None:
    if dev.queues.stuck:
        # an abandoned worker may still read and write these tap queue fds: a closed number
        # could be reused by another tenant's fd
        log.error("%s: leaving tap %s open for a stuck worker", dev.name, dev.tap.name)
        return
    dev.tap.close()


class Uplink:
    """A tap joined to a switch as a port: a reader thread forwards what the host sends."""

    def __init__(self, tap: Tap, switch, index: int):
        from cython_ext.net import NetWorker, Port
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


# -- the device type --------------------------------------------------------------------------------

# Switch names are metric labels and LISTEN_FDNAMES-safe, as device names are (vhost/config.py).
SWITCH_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_switch_name(value: str) -> None:
    if not SWITCH_NAME_RE.match(value):
        raise ValueError(f"switch name {value!r} must match {SWITCH_NAME_RE.pattern}")


def _check_positive(value: float) -> None:
    if not value > 0:
        raise OptionProblem("must be positive")


MTU = Option("mtu", "int", vn.DEFAULT_MTU, range=(vn.MIN_MTU, vn.MAX_MTU), metavar="N")
MAC_AGEING = Option("mac-ageing", "float", 300.0, check=_check_positive, metavar="SECONDS",
                    help="forget learned MACs after this long (default 300, as Linux bridges)")

OPTIONS = (
    Option("tap", "str", check=check_tap_name, metavar="NAME",
           help="tap device (created if missing); with --switch: an uplink port of the switch"),
    Option("switch", "str", check=_check_switch_name, metavar="NAME",
           help="join the sockets by an in-process learning L2 switch"),
    Option("mac", "str", check=lambda v: parse_mac(v), metavar="MAC",
           help="MAC offered to the guest (config space)"),
    Option("mac-lock", "bool", None,
           help="switch port security: drop frames whose source is not the port's --mac "
                "(a locked entry of the MAC table); default: on when --mac is given"),
    Option("mac-limit", "int", DEFAULT_MAC_LIMIT, range=(0, MAC_TABLE_SIZE), metavar="N",
           help=f"MAC addresses a switch port may have learned at once (0: no limit; "
                f"default {DEFAULT_MAC_LIMIT})"),
    Option("queues", "int", 1, range=(1, MAX_PAIRS), metavar="N", help="queue pairs"),
    MTU,
    Option("queue-size", "int", 1024, pow2=True, metavar="N"),
    # On the command line the switch is implicit, so its ageing is the program's option; in a
    # file it is a [[switch]] key.
    Option(MAC_AGEING.name, "float", MAC_AGEING.default, MAC_AGEING.help,
           check=MAC_AGEING.check, metavar=MAC_AGEING.metavar, where="cli"),
)

SWITCH_OPTIONS = (
    Option("tap", "str", check=check_tap_name, help="uplink tap (created if missing)"),
    MAC_AGEING,
    MTU,
)


def mac_locked(spec) -> bool:
    """Whether a switch port is locked to its MAC: `mac-lock`, by default on when the port
    has a configured `mac`."""
    return bool(spec.mac) if spec.mac_lock is None else bool(spec.mac_lock)


@dataclass
class SwitchRuntime:
    spec: object
    switch: object
    uplink: Uplink | None = None
    ports: dict = field(default_factory=dict)      # device name -> port index
    # Ports of removed devices stay allocated: another sender may still hold a pointer to them
    # in the middle of a batch (cython_ext/net.pyx forwards without the switch lock), so a
    # port_t is only freed with the whole switch, once none of its workers runs.
    retired: list = field(default_factory=list)

    def free_index(self) -> int:
        used = set(self.ports.values()) | {p.index for p in self.retired}
        if self.uplink is not None:
            used.add(self.uplink.port.index)
        for k in range(MAX_SWITCH_PORTS):
            if k not in used:
                return k
        raise ValueError(f"switch {self.spec.name} has no free port left (ports of removed "
                         f"devices are reclaimed when the service restarts)")

    def stop_uplink(self) -> None:
        if self.uplink is not None:
            self.uplink.stop()
            log.info("stats", extra={"fields": dict(device=f"uplink:{self.uplink.tap.name}",
                                                    **self.uplink.stats())})
            self.uplink.tap.close()
            self.uplink = None


class NetEnv(DeviceEnv):
    """The switches of one process, built when their first port is, with their uplinks."""

    def __init__(self, tables):
        super().__init__(tables)
        self.switches: dict[str, SwitchRuntime] = {}

    def switch_for(self, name: str) -> SwitchRuntime:
        sr = self.switches.get(name)
        if sr is not None:
            return sr
        from cython_ext.net import Switch
        spec = self.tables["switch"][name]
        sr = SwitchRuntime(spec=spec, switch=Switch(spec.name, spec.mac_ageing))
        if spec.tap:
            tap = Tap(spec.tap, 1, spec.mtu if spec.mtu != vn.DEFAULT_MTU else None)
            try:
                sr.uplink = Uplink(tap, sr.switch, 0)
            except BaseException:
                tap.close()
                raise
            log.info("switch %s: uplink tap %s", name, spec.tap,
                     extra={"fields": dict(switch=name)})
        self.switches[name] = sr
        return sr

    def affected(self, old_tables, new_tables, spec) -> bool:
        return spec.switch is not None and \
            old_tables.get("switch", {}).get(spec.switch) != \
            new_tables.get("switch", {}).get(spec.switch)

    def reconfigure(self, new_tables) -> None:
        old = self.tables.get("switch", {})
        new = new_tables.get("switch", {})
        for name in list(self.switches):
            sr = self.switches[name]
            if old.get(name) != new.get(name) or not sr.ports:
                # changed (its ports were all stopped first) or unused: rebuilt when needed
                sr.stop_uplink()
                self._log_switch(name, sr)
                del self.switches[name]
        self.tables = new_tables

    def _log_switch(self, name, sr) -> None:
        log.info("stats", extra={"fields": dict(device=f"switch:{name}", **sr.switch.stats())})

    def ports(self) -> list:
        return [(f"{name}:uplink", f"tap {sr.uplink.tap.name}", sr.uplink.queue_counters)
                for name, sr in list(self.switches.items()) if sr.uplink is not None]

    def describe(self) -> dict:
        """Each running switch: its ports (device name -> port index), uplink, counters and
        learned/locked MACs with the port (device name, or "uplink") they are on."""
        out = {}
        for name, sr in list(self.switches.items()):
            where = {i: n for n, i in sr.ports.items()}
            if sr.uplink is not None:
                where[sr.uplink.port.index] = "uplink"
            out[name] = dict(
                ports=dict(sorted(sr.ports.items())),
                uplink=sr.uplink.tap.name if sr.uplink is not None else None,
                stats=sr.switch.stats(),
                macs=[dict(mac=m, port=where.get(p, f"#{p}"), locked=locked,
                           age_s=round(age / 1000, 1))
                      for m, p, locked, age in sr.switch.macs()])
        return out

    def close(self) -> None:
        for name in list(self.switches):
            sr = self.switches.pop(name)
            sr.stop_uplink()
            self._log_switch(name, sr)


class NetType(DeviceType):
    name = "net"
    program = "pyvhost-net"
    description = "vhost-user-net backend (tap or L2 switch)"
    capabilities = {"type": "net", "features": ["tap", "switch", "mq", "mtu"]}
    options = OPTIONS
    tables = {"switch": SWITCH_OPTIONS}
    logger = "pyvhost.net"
    multi_socket = True

    def check(self, spec, names, check_files):
        if (spec.tap is None) == (spec.switch is None):
            raise ValueError(f"exactly one of {names('tap')} and {names('switch')} is required")
        if spec.mac_lock and spec.switch is None:
            raise ValueError(f"{names('mac-lock')} is for switch ports (a tap device's frames "
                             f"do not pass the switch)")
        if spec.mac_lock and not spec.mac:
            raise ValueError(f"{names('mac-lock')} needs {names('mac')}, the address the port "
                             f"is locked to")

    def check_all(self, specs, tables, names):
        switches = dict(tables.get("switch", {}))
        taps = {s.tap: f"switch \"{s.name}\"" for s in switches.values() if s.tap}
        for spec in specs:
            if spec.tap:
                if spec.tap in taps:
                    raise ValueError(f"device \"{spec.name}\": tap {spec.tap} is already used "
                                     f"by {taps[spec.tap]}")
                taps[spec.tap] = f"device \"{spec.name}\""
            elif spec.switch not in switches:
                switches[spec.switch] = self.table_class("switch")(name=spec.switch)
        locked = {}
        for spec in specs:
            if spec.switch and mac_locked(spec):
                key = (spec.switch, parse_mac(spec.mac))
                if key in locked:
                    raise ValueError(f"device \"{spec.name}\": MAC {spec.mac} is already "
                                     f"locked to device \"{locked[key]}\" on switch "
                                     f"\"{spec.switch}\"")
                locked[key] = spec.name
        for sw in switches.values():
            ports = sum(1 for d in specs if d.switch == sw.name) + (1 if sw.tap else 0)
            if ports > MAX_SWITCH_PORTS:
                raise ValueError(f"switch \"{sw.name}\": more than {MAX_SWITCH_PORTS} ports")
        return dict(tables, switch=switches)

    def command_line_check(self, values, sockets, names):
        if not values["tap"] and not values["switch"]:
            raise ValueError("one of --tap and --switch is required")
        if not values["switch"] and len(sockets) > 1:
            raise ValueError("several --socket-path need --switch")

    def from_command_line(self, values, sockets):
        """One tap device, or one switch port per socket (the switch's uplink is --tap)."""
        sockets = sockets or [None]
        ageing = values.pop("mac_ageing")
        mac = parse_mac(values["mac"]) if values["mac"] else None
        if not values["switch"]:
            return [dict(values, name=values["tap"], socket=sockets[0])], {}
        sw = values["switch"]
        devices = [dict(values, name=f"{sw}:{k}", socket=path, tap=None,
                        mac=(mac[:5] + bytes([(mac[5] + k) & 0xFF])).hex(":") if mac else None)
                   for k, path in enumerate(sockets)]
        table = self.table_class("switch")(name=sw, tap=values["tap"], mac_ageing=ageing,
                                           mtu=values["mtu"])
        return devices, {"switch": {sw: table}}

    def environment(self, tables):
        return NetEnv(tables)

    def uses(self, spec):
        return (("switch", spec.switch),) if spec.switch else ()

    def build(self, spec, env: NetEnv):
        if spec.tap:
            mac = parse_mac(spec.mac) if spec.mac else default_mac(spec.tap)
            tap = Tap(spec.tap, spec.queues, spec.mtu if spec.mtu != vn.DEFAULT_MTU else None)
            try:
                dev = NetDevice(pairs=spec.queues, mac=mac, mtu=spec.mtu, tap=tap,
                                max_queue_size=spec.queue_size, name=spec.name)
            except BaseException:
                tap.close()
                raise
            dev._release = _close_tap
            return dev
        mac = parse_mac(spec.mac) if spec.mac else default_mac(f"{spec.switch}:{spec.socket}")
        sr = env.switch_for(spec.switch)
        index = sr.free_index()
        dev = NetDevice(pairs=spec.queues, mac=mac, mtu=spec.mtu, switch=sr.switch,
                        port_index=index, max_queue_size=spec.queue_size, name=spec.name)
        try:
            dev.port.set_mac(mac, lock=mac_locked(spec), limit=spec.mac_limit)
        except ValueError:          # e.g. the MAC is still locked to a port being replaced
            dev.port.detach()
            sr.retired.append(dev.port)      # may already be in a flood scan: kept allocated
            raise
        sr.ports[spec.name] = index

        def release(d, sr=sr, name=spec.name):
            sr.ports.pop(name, None)
            d.port.detach()
            sr.retired.append(d.port)
        dev._release = release
        return dev

    def describe(self, spec):
        what = f"tap {spec.tap}" if spec.tap else f"switch {spec.switch}"
        if spec.switch and mac_locked(spec):
            what += f" locked to {spec.mac}"
        return f"net {what} ({spec.queues} pair{'s' if spec.queues > 1 else ''})"


DEVICE = NetType()
