"""connection.py: the vhost-user frontend conversation (the role QEMU plays), device-independent.

Owns: `VhostUserFrontend` -- the Unix socket to the backend and QEMU's message sequence
(features, protocol features, queue count, owner, config, memory table via SET_MEM_TABLE or
ADD_MEM_REG, vring setup, enable), REPLY_ACK checks, GET_VRING_BASE on close, the inflight
region kept across `reconnect()` (QEMU's `reconnect=1`), split or packed rings; the guest RAM
(vhost.testing.ram) and the virtqueues (vhost.testing.virtqueue) of one connection.  Device
drivers subclass it: `Frontend` (vhost.testing.blk) and `NetFrontend` (vhost.testing.net).
Must not: be part of the backend (nothing in vhost/server.py, devices/ or cython_ext/ imports
it; it imports only protocols/ and vhost.testing); run an event loop or threads (it is
synchronous); hang (every wait is bounded, a disconnect or a malformed reply raises
VhostUserError naming the message); kill processes (the fixtures own the backend's lifetime);
import tests, devices, vhost.server, vhost.service or vhost.config.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Sequence

from protocols import virtio
from protocols.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_MEM_TABLE_REGIONS,
    VERSION,
    VERSION_MASK,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_ADDR_F_LOG,
    Config,
    FrontendReq,
    Header,
    Log,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    Inflight,
    VringAddr,
    VringState,
    build_message,
    request_name,
    u64,
)
from vhost.testing.errors import FrontendError, VhostUserError
from vhost.testing.inflight import InflightRegion
from vhost.testing.packed import PackedVirtQueue
from vhost.testing.ram import MiB, GuestRAM, Region, one_region_layout, pc_two_region_layout
from vhost.testing.virtqueue import DEFAULT_TIMEOUT, VirtQueue

# Protocol features negotiated when offered (QEMU asks for more; these are what we implement).
WANTED_PROTOCOL_FEATURES = (
    ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.LOG_SHMFD
)
MAX_REPLY_PAYLOAD = 4096


class VhostUserFrontend:
    """The device-independent part of a vhost-user frontend over `socket_path`: the connection,
    guest RAM, feature negotiation and split-ring setup.  `connect()` (or `with ... as f`) runs
    QEMU's setup sequence; `close()` stops the rings and releases everything.  Device drivers
    (`Frontend` for virtio-blk, `NetFrontend` for virtio-net) subclass it and fill in the hooks
    (`_check_queue_count`, `_read_device_config`, `_driver_features`, `_after_features`,
    `_after_start`).

    Options: `regions` (a custom [(gpa, size, mmap_offset), ...] layout of the shm object),
    `two_regions` (QEMU's PC layout with a hole), `use_add_mem_reg` (None: ADD_MEM_REG when
    CONFIGURE_MEM_SLOTS is offered, as QEMU does; True: require it; False: always
    SET_MEM_TABLE), `protocol_features` (mask of protocol features we may negotiate),
    `device_features` (device-specific feature bits we accept), `timeout` (seconds, every wait),
    `listen` (QEMU's `server=on`: listen at socket_path and accept a backend in client mode),
    `packed` (negotiate VIRTIO_F_RING_PACKED: the queues are PackedVirtQueues; the backend
    must offer it), `inflight` (negotiate INFLIGHT_SHMFD when offered and, as QEMU's vhost-user-blk does, get
    an inflight region once and hand it back at every (re)connect; `reconnect()` is QEMU's
    `reconnect=1` after the backend died).
    """

    def __init__(self, socket_path: str | os.PathLike, *, mem_size: int = 64 * MiB,
                 num_queues: int = 1, queue_size: int = 128, two_regions: bool = False,
                 event_idx: bool = True, indirect: bool = True,
                 regions: Sequence[tuple[int, int, int]] | None = None,
                 use_add_mem_reg: bool | None = None,
                 protocol_features: int = WANTED_PROTOCOL_FEATURES,
                 device_features: int = 0,
                 timeout: float = DEFAULT_TIMEOUT, listen: bool = False,
                 inflight: bool = False, packed: bool = False):
        if two_regions and regions is not None:
            raise ValueError("give either two_regions or regions, not both")
        if num_queues < 1:
            raise ValueError("num_queues must be >= 1")
        self.socket_path = os.fspath(socket_path)
        self.mem_size = mem_size
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.layout = (list(regions) if regions is not None else
                       pc_two_region_layout(mem_size) if two_regions else
                       one_region_layout(mem_size))
        self.use_add_mem_reg = use_add_mem_reg
        self.protocol_features_mask = int(protocol_features) | (
            ProtocolFeature.INFLIGHT_SHMFD if inflight else 0)
        self.want_inflight = inflight
        self.want_packed = packed
        self.inflight: InflightRegion | None = None     # kept across reconnects, as QEMU does
        self.reconnects = 0
        self.device_features_mask = device_features
        self.timeout = timeout
        # listen: play QEMU with `-chardev socket,server=on`: listen at socket_path and wait
        # for a backend in client mode to connect (bind first: see listen_now)
        self.listen = listen
        self.listener: socket.socket | None = None

        self.sock: socket.socket | None = None
        self.mem: GuestRAM | None = None
        self.queues: list[VirtQueue] = []
        self._eventfds: list[int] = []
        self.backend_features = 0
        self.features = 0                       # what we sent in SET_FEATURES
        self.backend_protocol_features = 0
        self.protocol_features = 0              # negotiated
        self.max_queues = 1
        self.max_mem_slots: int | None = None
        self.config = None                      # the device's config space, parsed
        self.mem_table_via: str | None = None   # "SET_MEM_TABLE" or "ADD_MEM_REG"
        self.vring_bases: list[int] | None = None
        self._started = False
        self._closed = False

    # -- context manager --

    def __enter__(self):
        return self.connect()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:       # keep the original error visible
                pass

    # -- negotiated state --

    @property
    def has_event_idx(self) -> bool:
        return bool(self.features & virtio.F_RING_EVENT_IDX)

    @property
    def has_packed(self) -> bool:
        return bool(self.features & virtio.F_RING_PACKED)

    @property
    def has_indirect(self) -> bool:
        return bool(self.features & virtio.F_RING_INDIRECT_DESC)

    def has_protocol_feature(self, f: int) -> bool:
        return bool(self.protocol_features & f)

    # -- socket level --

    def listen_now(self) -> None:
        """Bind and listen at socket_path (a stale file is replaced) without waiting for the
        backend yet; connect() then accepts."""
        if self.listener is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(self.socket_path)
            s.listen(1)
        except BaseException:
            s.close()
            raise
        self.listener = s

    def _accept_socket(self) -> None:
        self.listen_now()
        self.listener.settimeout(self.timeout)
        try:
            conn, _ = self.listener.accept()
        except socket.timeout:
            raise VhostUserError(f"no backend connected to {self.socket_path} within "
                                 f"{self.timeout}s") from None
        conn.settimeout(self.timeout)
        self.sock = conn

    def _connect_socket(self) -> None:
        if self.listen:
            self._accept_socket()
            return
        deadline = time.monotonic() + self.timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.settimeout(self.timeout)
                s.connect(self.socket_path)
                self.sock = s
                return
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise VhostUserError(f"cannot connect to {self.socket_path} within "
                                         f"{self.timeout}s: {e}") from e
                time.sleep(0.02)
            except BaseException:
                s.close()
                raise

    def send_message(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
                     flags: int = VERSION) -> None:
        """Send one message (header + payload, fds via SCM_RIGHTS) verbatim."""
        if self.sock is None:
            raise VhostUserError("not connected")
        msg = build_message(request, payload, flags)
        try:
            if fds:
                sent = socket.send_fds(self.sock, [msg], list(fds))
            else:
                sent = self.sock.send(msg)
        except OSError as e:
            raise VhostUserError(f"sending {request_name(request)}: {e}") from e
        if sent != len(msg):
            raise VhostUserError(f"sending {request_name(request)}: short write {sent}/{len(msg)}")

    def _recv_exact(self, n: int, what: str, fds: list | None = None) -> bytes:
        """n bytes of the reply to `what`; with `fds`, the fds riding on them are added."""
        buf = bytearray()
        while len(buf) < n:
            try:
                if fds is not None:
                    chunk, got, _, _ = socket.recv_fds(self.sock, n - len(buf), 4)
                    fds.extend(got)
                else:
                    chunk = self.sock.recv(n - len(buf))
            except socket.timeout:
                raise TimeoutError(f"no reply to {what} within {self.timeout}s") from None
            except OSError as e:
                raise VhostUserError(f"receiving reply to {what}: {e}") from e
            if not chunk:
                raise VhostUserError(f"backend closed the connection while we waited for the "
                                     f"reply to {what}")
            buf += chunk
        return bytes(buf)

    def recv_reply(self, request: int, fds: list | None = None) -> bytes:
        """Read one reply and check it answers `request`; returns its payload (with `fds`:
        the fds it carried are appended there)."""
        name = request_name(request)
        hdr = Header.parse(self._recv_exact(HEADER_SIZE, name, fds))
        if hdr.size > MAX_REPLY_PAYLOAD:
            raise VhostUserError(f"reply to {name}: payload size {hdr.size} is implausible")
        payload = self._recv_exact(hdr.size, name) if hdr.size else b""
        if hdr.request != request:
            raise VhostUserError(f"reply to {name} carries request {request_name(hdr.request)}")
        if not hdr.flags & FLAG_REPLY or (hdr.flags & VERSION_MASK) != VERSION:
            raise VhostUserError(f"reply to {name}: bad flags {hdr.flags:#x}")
        return payload

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send a request that has a reply of its own (GET_*) and return the reply payload."""
        self.send_message(request, payload, fds)
        return self.recv_reply(request)

    def call_u64(self, request: int, payload: bytes = b"") -> int:
        reply = self.call(request, payload)
        if len(reply) != 8:
            raise VhostUserError(f"reply to {request_name(request)}: payload of {len(reply)} "
                                 f"bytes, expected a u64")
        return int.from_bytes(reply, "little")

    def setup(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send a request without a reply of its own; with REPLY_ACK negotiated, set NEED_REPLY
        and check the ack (non-zero = failure)."""
        if self.protocol_features & ProtocolFeature.REPLY_ACK:
            self.send_message(request, payload, fds, VERSION | FLAG_NEED_REPLY)
            reply = self.recv_reply(request)
            if len(reply) != 8:
                raise VhostUserError(f"ack of {request_name(request)}: payload of {len(reply)} "
                                     f"bytes, expected a u64")
            status = int.from_bytes(reply, "little")
            if status != 0:
                raise VhostUserError(f"{request_name(request)} failed: backend acked {status}")
        else:
            self.send_message(request, payload, fds)

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send a request without a reply of its own with NEED_REPLY and return the backend's
        ack value (0: success, anything else: failure) instead of raising on a failure, for
        tests that expect a refusal.  Needs REPLY_ACK negotiated; a disconnect raises
        VhostUserError, no ack within the timeout TimeoutError."""
        if not self.protocol_features & ProtocolFeature.REPLY_ACK:
            raise FrontendError(f"{request_name(request)}: REPLY_ACK was not negotiated")
        self.send_message(request, payload, fds, VERSION | FLAG_NEED_REPLY)
        reply = self.recv_reply(request)
        if len(reply) != 8:
            raise VhostUserError(f"ack of {request_name(request)}: payload of {len(reply)} "
                                 f"bytes, expected a u64")
        return int.from_bytes(reply, "little")

    # -- dirty logging, as QEMU's vhost_migration_log does it around a live migration --

    def log_start(self, log) -> None:
        """Migration starts: SET_LOG_BASE with `log` (a vhost.testing.dirtylog.DirtyLog; the
        backend's u64 reply is read, as with LOG_SHMFD it must be), SET_FEATURES with
        VHOST_F_LOG_ALL added (acked), then SET_VRING_ADDR with VHOST_VRING_F_LOG and the used
        ring's guest address for every queue -- all while the queues run."""
        if not self.backend_features & VHOST_F_LOG_ALL:
            raise FrontendError("the backend does not offer VHOST_F_LOG_ALL")
        if not self.protocol_features & ProtocolFeature.LOG_SHMFD:
            raise FrontendError("LOG_SHMFD was not negotiated")
        reply = self.call(FrontendReq.SET_LOG_BASE,
                          Log.build(dict(mmap_size=log.size, mmap_offset=0)), [log.fd])
        if len(reply) != 8:
            raise VhostUserError(f"reply to SET_LOG_BASE: {len(reply)} bytes, expected a u64")
        self.features |= VHOST_F_LOG_ALL
        self.setup(FrontendReq.SET_FEATURES, u64(self.features))
        self._set_vring_addrs(log=True)

    def log_stop(self) -> None:
        """Migration ends (or is cancelled): LOG_ALL off, rings without VHOST_VRING_F_LOG."""
        self.features &= ~VHOST_F_LOG_ALL
        self.setup(FrontendReq.SET_FEATURES, u64(self.features))
        self._set_vring_addrs(log=False)

    def _set_vring_addrs(self, log: bool) -> None:
        for vq in self.queues:
            desc, used, avail = vq.addresses()
            self.setup(FrontendReq.SET_VRING_ADDR, VringAddr.build(dict(
                index=vq.index, flags=VRING_ADDR_F_LOG if log else 0, descriptor=desc,
                used=used, available=avail, log=vq.used_gpa if log else 0)))

    def replace_call_fd(self, queue: int, fd: int) -> int:
        """Hand the backend `fd` (an eventfd this frontend now owns) as the call fd of `queue`
        (SET_VRING_CALL with NEED_REPLY) and wait on it from now on; the previous call fd is
        closed.  Returns the ack value (0: accepted); on a refusal the old fd stays in use and
        `fd` is closed."""
        vq = self.queues[queue]
        try:
            status = self.ack(FrontendReq.SET_VRING_CALL, u64(queue), [fd])
        except BaseException:
            os.close(fd)
            raise
        if status != 0:
            os.close(fd)
            return status
        old = vq.call_fd
        vq.call_fd = fd
        self._eventfds[self._eventfds.index(old)] = fd
        os.close(old)
        return status

    # -- setup sequence --

    def connect(self):
        """Connect and run QEMU's sequence up to enabled rings."""
        if self.sock is not None or self._closed:
            raise FrontendError("connect() called twice")
        try:
            self._connect()
        except BaseException:
            self._release()
            self._closed = True
            raise
        return self

    def _negotiate_protocol_features(self) -> None:
        """GET_FEATURES, then (when offered) GET/SET_PROTOCOL_FEATURES with our mask."""
        self.backend_features = self.call_u64(FrontendReq.GET_FEATURES)
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.backend_protocol_features = self.call_u64(FrontendReq.GET_PROTOCOL_FEATURES)
            pf = self.backend_protocol_features & self.protocol_features_mask
            self.send_message(FrontendReq.SET_PROTOCOL_FEATURES, u64(pf))
            self.protocol_features = pf

    def _connect(self) -> None:
        self._connect_socket()
        self.mem = GuestRAM(self.mem_size, self.layout)
        self._handshake()
        for q in range(self.num_queues):
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._eventfds.append(kick)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._eventfds.append(call)
            cls = PackedVirtQueue if self.has_packed else VirtQueue
            self.queues.append(cls(self.mem, q, self.queue_size, event_idx=self.has_event_idx,
                                   kick_fd=kick, call_fd=call))
        self._setup_rings([vq.base() if self.has_packed else 0 for vq in self.queues])
        self._started = True
        self._after_start()

    def reconnect(self) -> None:
        """The backend died (or is being replaced): what QEMU does with `reconnect=1` (or, when
        listening, when a client-mode backend dials again).  The guest's RAM, rings and
        requests stay as they are; a new connection runs the setup again with the inflight
        region kept from the first, each ring's base set to its used index (QEMU's
        virtio_queue_restore_last_avail_idx: it could not ask the dead backend)."""
        if not self._started:
            raise FrontendError("reconnect() before connect()")
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._connect_socket()
        self._handshake()
        self._setup_rings([vq.base() if self.has_packed else vq.used_idx()
                           for vq in self.queues])
        self.reconnects += 1

    def _setup_inflight(self) -> None:
        """QEMU's vhost_user_blk_start: GET_INFLIGHT_FD the first time, SET_INFLIGHT_FD with
        the same fd every time."""
        if not (self.want_inflight and self.protocol_features & ProtocolFeature.INFLIGHT_SHMFD):
            return
        if self.inflight is None:
            fds: list[int] = []
            self.send_message(FrontendReq.GET_INFLIGHT_FD, Inflight.build(dict(
                mmap_size=0, mmap_offset=0, num_queues=self.num_queues,
                queue_size=self.queue_size)))
            try:
                reply = self.recv_reply(FrontendReq.GET_INFLIGHT_FD, fds)
                if len(fds) != 1:
                    raise VhostUserError(f"GET_INFLIGHT_FD reply carries {len(fds)} fds")
                info = Inflight.parse(reply)
                self.inflight = InflightRegion(info.queue_size, info.num_queues, fd=fds.pop(),
                                               mmap_size=info.mmap_size,
                                               mmap_offset=info.mmap_offset)
            finally:
                for fd in fds:
                    os.close(fd)
        r = self.inflight
        self.setup(FrontendReq.SET_INFLIGHT_FD, Inflight.build(dict(
            mmap_size=r.mmap_size, mmap_offset=r.mmap_offset, num_queues=r.num_queues,
            queue_size=r.queue_size)), [r.fd])

    def _handshake(self) -> None:
        """Features, queue count, owner, config, inflight region, SET_FEATURES, memory."""
        self._negotiate_protocol_features()
        if self.protocol_features & ProtocolFeature.MQ:
            self.max_queues = self.call_u64(FrontendReq.GET_QUEUE_NUM)
        else:
            self.max_queues = 1
        self._check_queue_count()
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            self.max_mem_slots = self.call_u64(FrontendReq.GET_MAX_MEM_SLOTS)

        self.setup(FrontendReq.SET_OWNER)

        if self.protocol_features & ProtocolFeature.CONFIG:
            self._read_device_config()
        self._setup_inflight()

        wanted = (self._driver_features() | virtio.F_VERSION_1 | virtio.F_ANY_LAYOUT
                  | (virtio.F_RING_EVENT_IDX if self.want_event_idx else 0)
                  | (virtio.F_RING_INDIRECT_DESC if self.want_indirect else 0)
                  | (virtio.F_RING_PACKED if self.want_packed else 0)
                  | VHOST_USER_F_PROTOCOL_FEATURES)
        self.features = self.backend_features & wanted
        if self.want_packed and not self.has_packed:
            raise FrontendError("packed ring requested but the backend does not offer "
                                "VIRTIO_F_RING_PACKED")
        self.setup(FrontendReq.SET_FEATURES, u64(self.features))
        self._after_features()

        self._send_memory_table()

    def _setup_rings(self, bases: Sequence[int]) -> None:
        for vq in self.queues:
            q = vq.index
            self.setup(FrontendReq.SET_VRING_NUM, VringState.build(dict(index=q, num=vq.size)))
            self.setup(FrontendReq.SET_VRING_BASE, VringState.build(dict(index=q,
                                                                         num=bases[q])))
            desc, used, avail = vq.addresses()
            self.setup(FrontendReq.SET_VRING_ADDR, VringAddr.build(dict(
                index=q, flags=0, descriptor=desc, used=used, available=avail, log=0)))
            self.setup(FrontendReq.SET_VRING_KICK, u64(q), [vq.kick_fd])
            self.setup(FrontendReq.SET_VRING_CALL, u64(q), [vq.call_fd])
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            for vq in self.queues:
                self.setup(FrontendReq.SET_VRING_ENABLE,
                           VringState.build(dict(index=vq.index, num=1)))

    # -- hooks for the device drivers --

    def _check_queue_count(self) -> None:
        """After GET_QUEUE_NUM: refuse more queues than the backend has."""
        if self.num_queues > self.max_queues:
            raise FrontendError(f"{self.num_queues} queues requested, backend supports "
                                f"{self.max_queues}"
                                + ("" if self.protocol_features & ProtocolFeature.MQ
                                   else " (protocol feature MQ not negotiated)"))

    def _read_device_config(self) -> None:
        """After SET_OWNER, when protocol feature CONFIG was negotiated: fill `self.config`."""

    def _driver_features(self) -> int:
        """Device-specific feature bits we accept (intersected with the backend's offer)."""
        return self.device_features_mask

    def _after_features(self) -> None:
        """After SET_FEATURES (self.features is final), before the memory table."""

    def _after_start(self) -> None:
        """After the rings are set up and enabled."""

    def _region_dict(self, r: Region) -> dict:
        return dict(guest_addr=r.gpa, size=r.size, user_addr=self.mem.region_user_addr(r),
                    mmap_offset=r.mmap_offset)

    def _send_memory_table(self) -> None:
        slots = bool(self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS)
        if self.use_add_mem_reg and not slots:
            raise FrontendError("ADD_MEM_REG requested but the backend does not offer "
                                "CONFIGURE_MEM_SLOTS")
        regions = self.mem.regions
        if slots and self.use_add_mem_reg is not False:
            if self.max_mem_slots is not None and len(regions) > self.max_mem_slots:
                raise FrontendError(f"{len(regions)} regions, backend has "
                                    f"{self.max_mem_slots} memory slots")
            for r in regions:
                self.setup(FrontendReq.ADD_MEM_REG, SingleMemoryRegion.build(
                    dict(padding=0, region=self._region_dict(r))), [self.mem.fd])
            self.mem_table_via = "ADD_MEM_REG"
        else:
            if len(regions) > MAX_MEM_TABLE_REGIONS:
                raise FrontendError(f"{len(regions)} regions do not fit in SET_MEM_TABLE "
                                    f"(at most {MAX_MEM_TABLE_REGIONS})")
            table = MemoryTable.build(dict(num_regions=len(regions), padding=0,
                                           regions=[self._region_dict(r) for r in regions]))
            self.setup(FrontendReq.SET_MEM_TABLE, table, [self.mem.fd] * len(regions))
            self.mem_table_via = "SET_MEM_TABLE"

    def get_config_raw(self, size: int, offset: int = 0) -> bytes:
        """GET_CONFIG of `size` bytes at `offset`; the raw config bytes."""
        payload = Config.build(dict(offset=offset, size=size, flags=0, payload=bytes(size)))
        reply = self.call(FrontendReq.GET_CONFIG, payload)
        if len(reply) < 12:
            raise VhostUserError(f"GET_CONFIG reply of {len(reply)} bytes")
        c = Config.parse(reply)
        if c.size == 0 or len(c.payload) != size:
            raise VhostUserError(f"GET_CONFIG failed: backend returned {c.size} bytes of config "
                                 f"(asked {size} at offset {offset})")
        return c.payload

    # -- teardown --

    def close(self) -> list[int] | None:
        """Disable the rings and GET_VRING_BASE each (QEMU's stop), then close the socket, the
        eventfds and guest RAM.  Returns the backend's last avail index per queue (None if the
        rings were never started).  Resources are released even if the backend fails."""
        if self._closed:
            return self.vring_bases
        self._closed = True
        try:
            if self._started and self.sock is not None:
                if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
                    for vq in self.queues:
                        self.setup(FrontendReq.SET_VRING_ENABLE,
                                   VringState.build(dict(index=vq.index, num=0)))
                bases = []
                for vq in self.queues:
                    reply = self.call(FrontendReq.GET_VRING_BASE,
                                      VringState.build(dict(index=vq.index, num=0)))
                    if len(reply) != VringState.sizeof():
                        raise VhostUserError(f"GET_VRING_BASE reply of {len(reply)} bytes")
                    st = VringState.parse(reply)
                    if st.index != vq.index:
                        raise VhostUserError(f"GET_VRING_BASE for queue {vq.index} answered for "
                                             f"queue {st.index}")
                    bases.append(st.num)
                self.vring_bases = bases
        finally:
            self._release()
        return self.vring_bases

    def _release(self) -> None:
        # the listener first, as QEMU does: a client-mode backend re-dials the moment its
        # connection drops, and a listener still open then takes that dial into its backlog
        # (a connect that succeeds and is reset when the listener closes a moment later)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if self.mem is not None:
            self.mem.close()

    def describe(self) -> str:
        return (f"{type(self).__name__}({self.socket_path}): features {self.features:#x}, "
                f"protocol features {self.protocol_features:#x}, memory via "
                f"{self.mem_table_via}, " + "; ".join(vq.describe() for vq in self.queues))
