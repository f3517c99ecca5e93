"""protocol.py: every vhost-user state transition lives here; no sockets, no event loop.

`BackendProtocol` is one frontend connection's state machine, sans-I/O: the server feeds it the
bytes and file descriptors it read (`receive`) and sends back the reply messages it returns; at
EOF it calls `connection_lost`.  The protocol owns every fd it is given: it keeps the ones a
message legitimately carries (kick/call/err eventfds, the backend request channel) and closes all
others at once (memory region fds right after mapping them, fds riding on messages that take none,
fds of rejected messages), and everything it kept on `connection_lost`.

Queue lifecycle (QEMU 7.2's real behaviour, see ARCHITECTURE.md and tests/data/traces/):

- a queue is *started* (armed) by SET_VRING_KICK and stopped by GET_VRING_BASE and resets;
- it *runs* (``device.start_queue``) only while started, enabled, and its rings (SET_VRING_NUM +
  SET_VRING_ADDR) translate in the current memory table; the check is made again after every
  message that can change one of these, so the order of NUM/ADDR/KICK/ENABLE and memory does not
  matter and a queue that is never set up (queue 1 of a 2-queue blk under one vCPU) is simply
  never run;
- without VHOST_USER_F_PROTOCOL_FEATURES negotiated rings count as enabled; with it they are
  disabled until SET_VRING_ENABLE 1.  SET_FEATURES never disables a ring;
- whatever must change under a running worker (kick/call/err fd, ring addresses, memory table,
  negotiated features) stops it, applies the change and restarts it at the avail index the
  worker stopped at;
- SET_VRING_CALL with an fd asks the next start to signal the call fd once (lost-interrupt
  recovery after a reconnect, as libvhost-user does).
- dirty logging (live migration): with VHOST_F_LOG_ALL negotiated and a log set by
  SET_LOG_BASE, every queue is started with the log (QueueHandle.log), the used ring's guest
  address when SET_VRING_ADDR carried VHOST_VRING_F_LOG; a new log restarts the queues that use
  the old one before it is unmapped.
- inflight tracking (backend restarts without loss, devices with `inflight_tracking`):
  GET_INFLIGHT_FD creates a sealed memfd for the split rings' inflight regions and answers with
  it (a `Reply` carrying the fd); SET_INFLIGHT_FD installs the one the frontend kept (after a
  restart: the one the killed backend filled).  Queues of the size the region was laid out for
  start with their part (QueueHandle.inflight); a new region restarts the queues using the old.

The frontend is untrusted: every field is validated at its message (a ring base fits 16 bits),
every fd it sends is checked for its kind before anything changes (kick/call/err: an eventfd or
a pipe end, made non-blocking; memory: a regular file; the backend channel: a socket), and what
one connection holds is capped (`Limits`: guest memory mapped, fds per message): over a limit a
failure ack and one warning, the next time a disconnect.

Errors: malformed or refused requests get a log line (once per cause) and, with NEED_REPLY and
REPLY_ACK negotiated, a non-zero ack; a request that needs a reply of its own but cannot get a
meaningful one, or a broken header, raises `ProtocolClosed`: the server must disconnect.  No
other exception leaves `receive`.
"""
from __future__ import annotations

import fcntl
import functools
import logging
import os
import stat
from dataclasses import dataclass

from protocols import virtio
from protocols.vhost_user import (
    CONFIG_FLAG_MIGRATION,
    BackendReq,
    Config,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FrontendReq,
    HEADER_SIZE,
    Header,
    Inflight,
    MAX_CONFIG_SIZE,
    MessageError,
    ProtocolFeature,
    VERSION,
    VERSION_MASK,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_ADDR_F_LOG,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    VringState,
    build_message,
    inflight_queue_size,
    parse_payload,
    request_name,
    u64,
)

from .device import Device, QueueHandle, WorkerStuck
from .memory import GuestMemory, GuestMemoryError, MappedRegion, SharedRegion

log = logging.getLogger("pyvhost.protocol")

# Largest `size` a header may announce.  The largest real payload is a few hundred bytes
# (SET_MEM_TABLE with 8 regions, GET_CONFIG with 256 bytes); anything beyond is garbage.
MAX_PAYLOAD_SIZE = 4096 + HEADER_SIZE
# What GET_MAX_MEM_SLOTS reports and ADD_MEM_REG enforces (libvhost-user's
# VHOST_USER_MAX_RAM_SLOTS).
MAX_MEM_SLOTS = 32
# Protocol features this state machine implements; a device's wish list is masked with it.
SUPPORTED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.RESET_DEVICE | ProtocolFeature.STATUS
    | ProtocolFeature.NET_MTU | ProtocolFeature.RARP | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.INFLIGHT_SHMFD | ProtocolFeature.BACKEND_REQ)
# The split ring's indices are 16 bits (virtio 1.2 §2.7); a larger SET_VRING_BASE is an error.
MAX_VRING_BASE = 0xFFFF
# Failure value of a REPLY_ACK ack (QEMU treats any non-zero u64 as failure).
ACK_FAILURE = 1
# Distinct error causes logged per connection before the rest are suppressed.
MAX_LOGGED_CAUSES = 64

# Requests whose answer is a message of their own (not a REPLY_ACK ack).  Those we do not
# implement are only sent by frontends when the matching protocol feature was negotiated; if one
# arrives anyway nothing sensible can be answered, so the connection is closed.
REPLYING_REQUESTS = frozenset({
    FrontendReq.GET_FEATURES, FrontendReq.GET_PROTOCOL_FEATURES, FrontendReq.GET_VRING_BASE,
    FrontendReq.GET_QUEUE_NUM, FrontendReq.GET_CONFIG, FrontendReq.GET_MAX_MEM_SLOTS,
    FrontendReq.GET_STATUS, FrontendReq.GET_INFLIGHT_FD, FrontendReq.GET_SHARED_OBJECT,
    FrontendReq.CREATE_CRYPTO_SESSION, FrontendReq.POSTCOPY_ADVISE,
    FrontendReq.SET_DEVICE_STATE_FD, FrontendReq.CHECK_DEVICE_STATE,
})

REPLY_FLAGS = VERSION | FLAG_REPLY


class Reply(bytes):
    """A reply message (or, from a handler, a reply payload) that carries file descriptors
    (SCM_RIGHTS), e.g. GET_INFLIGHT_FD's memfd.  The fds are borrowed: the protocol keeps them open until it is done with them (at
    least until the next receive() or connection_lost()), the sender only passes them on."""
    fds: tuple[int, ...]

    def __new__(cls, data: bytes, fds=()):
        obj = super().__new__(cls, data)
        obj.fds = tuple(fds)
        return obj


class ProtocolClosed(Exception):
    """The connection cannot go on; the server must disconnect.  str() is the reason."""


class RequestError(Exception):
    """A request refused for a semantic reason (failure ack, the connection goes on)."""


class LimitExceeded(RequestError):
    """A request over one of the connection's limits: a failure ack the first time, a
    disconnect if the frontend goes on."""


@functools.lru_cache(maxsize=1)
def host_memory() -> int:
    """This host's RAM in bytes (MemTotal), read once: every connection's default limit uses
    it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Defaults of the per-connection limits ([service] max-guest-memory, max-message-fds).
# Guest memory: twice this host's RAM.  A guest's RAM is normally smaller than the host's; a
# frontend may overcommit, and memory hotplug adds regions, so leave room, while one frontend
# can no longer take the process's 128 TiB address space (32 slots of up to 2^47 bytes) from
# every other tenant.
GUEST_MEMORY_FACTOR = 2
# fds one message may carry: the largest legitimate message (SET_MEM_TABLE, 8 regions) carries
# 8; a message whose bytes trickle in with more fds each time is an attack on the fd table.
DEFAULT_MAX_MESSAGE_FDS = 32


@dataclass(frozen=True)
class Limits:
    """What one frontend connection may hold."""
    max_guest_memory: int = 0           # bytes mapped at once; 0: GUEST_MEMORY_FACTOR x RAM
    max_message_fds: int = DEFAULT_MAX_MESSAGE_FDS

    def guest_memory(self) -> int:
        return self.max_guest_memory or GUEST_MEMORY_FACTOR * host_memory()


_ANON_INODE = None


def _anon_inode() -> tuple[int, int]:
    global _ANON_INODE
    if _ANON_INODE is None:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            st = os.fstat(fd)
            _ANON_INODE = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)
    return _ANON_INODE


def check_event_fd(fd: int, write: bool) -> str:
    """A kick (read) or call/err (write) fd must be an eventfd or a pipe end open for that
    direction; it is made non-blocking, so that no signal or drain ever blocks a worker (or,
    worse, a thread holding the GIL or a lock other tenants need) on a saturated eventfd or a
    full pipe.  Returns its kind; RequestError for anything else."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise RequestError(f"bad fd: {e}") from None
    if stat.S_ISFIFO(st.st_mode):
        kind = "pipe"
    else:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            # no /proc: every anonymous-inode fd shares one inode; accept it if it is ours
            target = "anon_inode:[eventfd]" if _anon_inode() == (st.st_dev, st.st_ino) else ""
        if target != "anon_inode:[eventfd]":
            what = ("a regular file" if stat.S_ISREG(st.st_mode) else
                    "a socket" if stat.S_ISSOCK(st.st_mode) else
                    "a character device" if stat.S_ISCHR(st.st_mode) else
                    "a directory" if stat.S_ISDIR(st.st_mode) else target or "unknown")
            raise RequestError(f"fd is {what}, not an eventfd or a pipe")
        kind = "eventfd"
    acc = flags & os.O_ACCMODE
    if write and acc not in (os.O_WRONLY, os.O_RDWR):
        raise RequestError(f"{kind} is not open for writing")
    if not write and acc not in (os.O_RDONLY, os.O_RDWR):
        raise RequestError(f"{kind} is not open for reading")
    if not flags & os.O_NONBLOCK:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        except OSError as e:
            raise RequestError(f"cannot make the {kind} non-blocking: {e}") from None
    return kind


# --- per-queue state -------------------------------------------------------------------------

@dataclass(eq=False)
class _Queue:
    index: int
    size: int = 0                       # SET_VRING_NUM; 0 = not set
    base: int = 0                       # next avail index (SET_VRING_BASE / stop_queue)
    addr: tuple | None = None           # (desc, used, avail) frontend virtual addresses
    host: tuple | None = None           # (desc, avail, used) host addresses in current memory
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    started: bool = False               # armed by SET_VRING_KICK
    enabled: bool = False               # SET_VRING_ENABLE
    running: bool = False               # the device has a worker on it
    signal_call: bool = False           # write the call fd once on the next start
    run_features: int = 0               # features the running worker was started with
    run_log: bool = False               # the running worker logs into the current log
    run_inflight: bool = False          # the running worker tracks in the inflight region
    log_used: bool = False              # SET_VRING_ADDR's VHOST_VRING_F_LOG
    log_gpa: int = 0                    # ... and its log_guest_addr (the used ring's GPA)


@dataclass(frozen=True)
class QueueInfo:
    """Read-only snapshot of one queue's protocol state (for tests and diagnostics)."""
    index: int
    size: int
    base: int
    started: bool
    enabled: bool
    running: bool
    kick_fd: int
    call_fd: int
    err_fd: int
    desc_addr: int | None       # frontend virtual addresses from SET_VRING_ADDR
    used_addr: int | None
    avail_addr: int | None
    desc_host: int | None       # their host translations in the current memory table
    avail_host: int | None
    used_host: int | None
    signal_call: bool


class _Message:
    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int, payload: bytes, fds: list[int]):
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds

    def take_fd(self) -> int:
        """Keep one fd of this message (the rest are closed after the handler)."""
        return self.fds.pop(0)

    def expect_fds(self, n: int) -> None:
        if len(self.fds) != n:
            raise RequestError(f"carries {len(self.fds)} fds, expected {n}")


def _close(fd: int) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- the state machine -----------------------------------------------------------------------

class BackendProtocol:
    """One frontend connection's vhost-user state machine.

    `receive(data, fds)` -> list of reply messages to send, in order.  `connection_lost()` at
    EOF.  `next_read_size` tells a server how many bytes finish the current header or payload,
    so that it can read message by message and fds attach to the right one.
    `on_queue(index, state, avail)`, if given, is called after a queue started ("started") or
    stopped ("stopped"), with the avail index it starts or stopped at; it runs in the caller of
    `receive` / `connection_lost` and must not raise or block.
    """

    def __init__(self, device: Device, *, name: str = "", limits: Limits | None = None,
                 on_queue=None):
        self.device = device
        self._on_queue = on_queue
        self.name = name
        self._prefix = f"{name}: " if name else ""
        self.limits = limits or Limits()
        self._max_memory = self.limits.guest_memory()
        self._buf = bytearray()
        self._header = None
        self._pending_fds: list[int] = []
        self._fds_over = False       # the message being read carried too many fds
        self._strikes = 0            # limits exceeded so far (the second one disconnects)
        self._dead = False
        self._failed = ""            # why the connection must close (set with ProtocolClosed)
        # A worker that did not stop (WorkerStuck) may still use guest memory and its eventfds:
        # from then on nothing is unmapped or closed (kept here, leaked on purpose) and the
        # connection ends after the current message.
        self._stuck = False
        self._leaked: list = []

        self._features = 0
        self._protocol_features = ProtocolFeature(0)
        self._owner = False
        self._status = 0
        self._backend_req_fd = -1
        self._memory = GuestMemory()
        self._dirty_log: SharedRegion | None = None     # SET_LOG_BASE's bitmap
        self._log_fd = -1                            # SET_LOG_FD's eventfd (kept, unused)
        # inflight tracking: the mapped region, how it is laid out, and the memfd we created
        # for GET_INFLIGHT_FD (kept open while its reply may still be on its way)
        self._inflight: SharedRegion | None = None
        self._inflight_layout = (0, 0)               # (num_queues, queue_size)
        self._inflight_fd = -1
        self._queues = [_Queue(i) for i in range(device.num_queues)]
        self._logged: set[str] = set()
        self._suppressed = False

        self._handlers = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
            FrontendReq.SET_LOG_BASE: self._set_log_base,
            FrontendReq.SET_LOG_FD: self._set_log_fd,
            FrontendReq.SET_VRING_NUM: self._set_vring_num,
            FrontendReq.SET_VRING_ADDR: self._set_vring_addr,
            FrontendReq.SET_VRING_BASE: self._set_vring_base,
            FrontendReq.GET_VRING_BASE: self._get_vring_base,
            FrontendReq.SET_VRING_KICK: self._set_vring_fd,
            FrontendReq.SET_VRING_CALL: self._set_vring_fd,
            FrontendReq.SET_VRING_ERR: self._set_vring_fd,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.GET_QUEUE_NUM: self._get_queue_num,
            FrontendReq.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendReq.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            FrontendReq.SET_VRING_ENDIAN: self._set_vring_endian,
            FrontendReq.GET_CONFIG: self._get_config,
            FrontendReq.SET_CONFIG: self._set_config,
            FrontendReq.RESET_DEVICE: self._reset_device_req,
            FrontendReq.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FrontendReq.ADD_MEM_REG: self._add_mem_reg,
            FrontendReq.REM_MEM_REG: self._rem_mem_reg,
            FrontendReq.SET_STATUS: self._set_status,
            FrontendReq.GET_STATUS: self._get_status,
            FrontendReq.NET_SET_MTU: self._net_set_mtu,
            FrontendReq.SEND_RARP: self._send_rarp,
            FrontendReq.GET_INFLIGHT_FD: self._get_inflight_fd,
            FrontendReq.SET_INFLIGHT_FD: self._set_inflight_fd,
        }

    # -- read-only state ----------------------------------------------------------------------

    @property
    def offered_features(self) -> int:
        log_all = VHOST_F_LOG_ALL if self.device.dirty_log else 0
        packed = virtio.F_RING_PACKED if self.device.packed_ring else 0
        return int(self.device.features()) | VHOST_USER_F_PROTOCOL_FEATURES | log_all | packed

    @property
    def _packed(self) -> bool:
        return bool(self._features & virtio.F_RING_PACKED)

    @property
    def offered_protocol_features(self) -> ProtocolFeature:
        # QEMU refuses to migrate a vhost-user device without both LOG_ALL and LOG_SHMFD
        offered = int(self.device.protocol_features()) & int(SUPPORTED_PROTOCOL_FEATURES)
        # BACKEND_REQ only for a device whose config can change under the guest (an RBD image
        # resized): its only message here is CONFIG_CHANGE_MSG
        for feature, wanted in ((ProtocolFeature.LOG_SHMFD, self.device.dirty_log),
                                (ProtocolFeature.INFLIGHT_SHMFD, self.device.inflight_tracking),
                                (ProtocolFeature.BACKEND_REQ,
                                 self.device.config_event_fd() >= 0)):
            offered = offered | feature if wanted else offered & ~feature
        return ProtocolFeature(offered)

    @property
    def features(self) -> int:
        """Negotiated virtio features (last SET_FEATURES; 0 before)."""
        return self._features

    @property
    def protocol_features(self) -> ProtocolFeature:
        return self._protocol_features

    def queues_running(self) -> frozenset[int]:
        """Indices of the queues that have a worker now (read from another thread: a snapshot
        of plain bools, may be one message stale)."""
        return frozenset(q.index for q in list(self._queues) if q.running)

    @property
    def owner(self) -> bool:
        return self._owner

    @property
    def status(self) -> int:
        return self._status

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def backend_req_fd(self) -> int:
        return self._backend_req_fd

    def config_events(self) -> list[bytes]:
        """The device's config_event_fd() was readable: the messages to send on the backend
        channel (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, no reply asked, when the guest-visible
        config changed and the frontend set up the channel with CONFIG negotiated; QEMU then
        reads the config again with GET_CONFIG and tells the guest)."""
        changed = self.device.config_changed()
        if not changed or self._dead or self._backend_req_fd < 0 or \
                not self._protocol_features & ProtocolFeature.BACKEND_REQ or \
                not self._protocol_features & ProtocolFeature.CONFIG:
            return []
        log.info("%sconfig changed: CONFIG_CHANGE_MSG to the frontend", self._prefix)
        return [Header.build(dict(request=int(BackendReq.CONFIG_CHANGE_MSG), flags=VERSION,
                                  size=0))]

    @property
    def closed(self) -> bool:
        return self._dead

    @property
    def queues(self) -> tuple[QueueInfo, ...]:
        return tuple(self.queue(i) for i in range(len(self._queues)))

    def queue(self, index: int) -> QueueInfo:
        q = self._queues[index]
        addr = q.addr or (None, None, None)
        host = q.host or (None, None, None)
        return QueueInfo(q.index, q.size, q.base, q.started, q.enabled, q.running, q.kick_fd,
                         q.call_fd, q.err_fd, addr[0], addr[1], addr[2], host[0], host[1],
                         host[2], q.signal_call)

    @property
    def next_read_size(self) -> int:
        """Bytes still missing from the current header, or from the current payload (>= 1)."""
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return self._header.size - len(self._buf)

    # -- framing ------------------------------------------------------------------------------

    def receive(self, data: bytes, fds=()) -> list[bytes]:
        """Feed bytes read from the socket and the fds that came with them.  The fds belong to
        the message the first of these bytes belongs to (SCM_RIGHTS semantics)."""
        fds = list(fds)
        if self._dead:
            for fd in fds:
                _close(fd)
            raise ProtocolClosed("connection already closed")
        if self._failed:
            for fd in fds:
                _close(fd)
            raise ProtocolClosed(self._failed)
        if fds and (self._fds_over
                    or len(self._pending_fds) + len(fds) > self.limits.max_message_fds):
            # never hold them: close at once, refuse the message, disconnect if it goes on
            for fd in self._pending_fds + fds:
                _close(fd)
            self._pending_fds, fds = [], []
            if self._fds_over or self._strikes:
                self._broken(f"a message carries more than {self.limits.max_message_fds} fds "
                             f"after a limit was exceeded (limit max-message-fds)")
            self._fds_over = True
        self._pending_fds.extend(fds)
        self._buf += data
        replies: list[bytes] = []
        while True:
            if self._header is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                header = Header.parse(bytes(self._buf[:HEADER_SIZE]))
                del self._buf[:HEADER_SIZE]
                if header.flags & VERSION_MASK != VERSION:
                    self._broken(f"bad header: version {header.flags & VERSION_MASK} "
                                 f"(flags {header.flags:#x}) in {request_name(header.request)}")
                if header.size > MAX_PAYLOAD_SIZE:
                    self._broken(f"bad header: {request_name(header.request)} announces "
                                 f"{header.size} payload bytes")
                self._header = header
            header = self._header
            if len(self._buf) < header.size:
                break
            payload = bytes(self._buf[:header.size])
            del self._buf[:header.size]
            msg_fds, self._pending_fds = self._pending_fds, []
            self._header = None
            if self._fds_over:
                self._fds_over = False
                replies.extend(self._refuse_over_limit(
                    header, f"carries more than {self.limits.max_message_fds} fds "
                    f"(limit max-message-fds)"))
                continue
            replies.extend(self._dispatch(_Message(header.request, header.flags, payload,
                                                   msg_fds)))
        return replies

    def _replies(self, request: int) -> bool:
        """Whether `request` is answered by a message of its own.  SET_LOG_BASE is, with
        LOG_SHMFD negotiated: the frontend then waits for a u64 (QEMU's
        vhost_user_set_log_base reads one and checks only its type), so a log that cannot be
        mapped cannot be answered with a failure it would notice, and migrating without
        logging would corrupt the guest: a failure closes the connection."""
        return request in REPLYING_REQUESTS or (
            request == FrontendReq.SET_LOG_BASE
            and bool(self._protocol_features & ProtocolFeature.LOG_SHMFD))

    def _refuse_over_limit(self, header, cause: str) -> list[bytes]:
        msg = _Message(header.request, header.flags, b"", [])
        name = request_name(header.request)
        self._strike(f"{name}: {cause}")
        if self._replies(header.request):
            self._broken(f"{name}: {cause}")
        return self._ack(msg, ACK_FAILURE)

    def _strike(self, cause: str) -> None:
        """A limit was exceeded: logged (once: the second time disconnects)."""
        self._strikes += 1
        if self._strikes > 1:
            self._broken(f"{cause}; over a limit again")
        log.warning("%s%s; refused (the next time over a limit disconnects)",
                    self._prefix, cause)

    def _release_fd(self, fd: int) -> None:
        if self._stuck:
            if fd >= 0:
                self._leaked.append(fd)
        else:
            _close(fd)

    def _release_queue_fds(self, q) -> None:
        for attr in ("kick_fd", "call_fd", "err_fd"):
            self._release_fd(getattr(q, attr))
            setattr(q, attr, -1)

    def _release_region(self, r: MappedRegion) -> None:
        if self._stuck:
            self._leaked.append(r)
        else:
            r.unmap()

    def _broken(self, reason: str):
        for fd in self._pending_fds:
            _close(fd)
        self._pending_fds = []
        self._buf.clear()
        self._header = None
        self._failed = reason
        log.warning("%s%s; closing the connection", self._prefix, reason)
        raise ProtocolClosed(reason)

    # -- dispatch -----------------------------------------------------------------------------

    def _dispatch(self, msg: _Message) -> list[bytes]:
        try:
            return self._handle(msg)
        except ProtocolClosed as e:
            for fd in self._pending_fds:
                _close(fd)
            self._pending_fds = []
            self._failed = str(e) or "connection closed"
            raise
        finally:
            for fd in msg.fds:          # every fd the handler did not take
                _close(fd)
            msg.fds = []

    def _handle(self, msg: _Message) -> list[bytes]:
        name = request_name(msg.request)
        handler = self._handlers.get(msg.request)
        try:
            if handler is None:
                try:
                    FrontendReq(msg.request)
                except ValueError:
                    raise RequestError("unknown request") from None
                raise RequestError("not supported")
            body = parse_payload(msg.request, msg.payload)
            result = handler(msg, body)
        except ProtocolClosed as e:
            log.warning("%s%s; closing the connection", self._prefix, e)
            raise
        except MessageError as e:
            cause = f"malformed {e}"
        except LimitExceeded as e:
            self._strike(f"{name}: {e}")             # logged here, or ProtocolClosed
            if self._replies(msg.request):
                raise ProtocolClosed(f"{name}: {e}") from None
            return self._ack(msg, ACK_FAILURE)
        except (RequestError, GuestMemoryError) as e:
            cause = f"{name}: {e}"
        except Exception as e:  # a device bug must not take the connection down
            cause = f"{name}: {type(e).__name__}: {e}"
            log.debug("%s%s", self._prefix, cause, exc_info=True)
        else:
            if self._replies(msg.request):
                reply = build_message(msg.request, result, REPLY_FLAGS)
                return [Reply(reply, result.fds) if isinstance(result, Reply) else reply]
            return self._ack(msg, 0)
        if self._replies(msg.request):
            log.warning("%s%s; no meaningful reply, closing the connection", self._prefix, cause)
            raise ProtocolClosed(cause)
        self._log_once(cause)
        return self._ack(msg, ACK_FAILURE)

    def _ack(self, msg: _Message, value: int) -> list[bytes]:
        if msg.flags & FLAG_NEED_REPLY and self._protocol_features & ProtocolFeature.REPLY_ACK:
            return [build_message(msg.request, u64(value), REPLY_FLAGS)]
        return []

    def _log_once(self, cause: str) -> None:
        if cause in self._logged:
            return
        if len(self._logged) >= MAX_LOGGED_CAUSES:
            if not self._suppressed:
                self._suppressed = True
                log.warning("%sfurther distinct request errors are not logged", self._prefix)
            return
        self._logged.add(cause)
        log.warning("%s%s", self._prefix, cause)

    def _queue_for(self, index: int) -> _Queue:
        if not 0 <= index < len(self._queues):
            raise RequestError(f"queue index {index} out of range "
                               f"(device has {len(self._queues)})")
        return self._queues[index]

    # -- queue lifecycle ----------------------------------------------------------------------

    def _ring_enabled(self, q: _Queue) -> bool:
        return q.enabled or not self._features & VHOST_USER_F_PROTOCOL_FEATURES

    def _reconcile(self, q: _Queue) -> None:
        """Start or stop q so that it runs iff started, enabled and its rings translate."""
        want = q.started and q.size > 0 and q.host is not None and self._ring_enabled(q)
        if want and not q.running and self._stuck:
            # an abandoned worker may still be on some ring: never start a second one there
            # (the connection ends after this message anyway)
            log.error("%squeue %d not started: a worker is stuck", self._prefix, q.index)
        elif want and not q.running:
            self._start(q)
        elif q.running and not want:
            self._stop(q)

    def _reconcile_all(self) -> None:
        errors = []
        for q in self._queues:
            try:
                self._reconcile(q)
            except RequestError as e:
                errors.append(str(e))
        if errors:
            raise RequestError("; ".join(errors))

    def _start(self, q: _Queue) -> None:
        desc, avail, used = q.host
        log_addr = log_size = 0
        if self._features & VHOST_F_LOG_ALL:
            if self._dirty_log is None:
                self._log_once(f"queue {q.index}: LOG_ALL negotiated before SET_LOG_BASE; "
                               f"its writes are not logged")
            else:
                log_addr, log_size = self._dirty_log.host_addr, self._dirty_log.size
        handle = QueueHandle(
            index=q.index, size=q.size, desc=desc, avail=avail, used=used,
            last_avail_idx=q.base, kick_fd=q.kick_fd, call_fd=q.call_fd, err_fd=q.err_fd,
            features=self._features, memory=self._memory, signal_call=q.signal_call,
            log_addr=log_addr, log_size=log_size,
            log_used_gpa=q.log_gpa if q.log_used and log_addr else -1,
            **self._inflight_for(q))
        try:
            self.device.start_queue(q.index, handle)
        except Exception as e:
            log.debug("%sstart_queue(%d) failed", self._prefix, q.index, exc_info=True)
            raise RequestError(f"queue {q.index} failed to start: "
                               f"{type(e).__name__}: {e}") from None
        q.running = True
        q.signal_call = False
        q.run_features = self._features
        q.run_log = bool(log_addr)
        q.run_inflight = bool(handle.inflight_addr)
        log.debug("%squeue %d running (size %d, base %d)", self._prefix, q.index, q.size, q.base)
        self._queue_event(q, "started")

    def _queue_event(self, q: _Queue, state: str) -> None:
        if self._on_queue is not None:
            try:
                self._on_queue(q.index, state, q.base)
            except Exception:           # an observer never breaks the conversation
                log.exception("%squeue event callback failed", self._prefix)

    def _inflight_for(self, q: _Queue) -> dict:
        """q's part of the inflight region, as QueueHandle keywords (none: not tracked)."""
        nq, qsize = self._inflight_layout
        if self._inflight is None or q.index >= nq:
            return {}
        if q.size != qsize:
            self._log_once(f"queue {q.index}: size {q.size}, but the inflight region is laid "
                           f"out for {qsize}; its requests are not tracked")
            return {}
        per = inflight_queue_size(qsize)
        return dict(inflight_addr=self._inflight.host_addr + q.index * per, inflight_size=per)

    def _restart_users(self, uses, install) -> None:
        """Replace a mapping running workers use (`uses(q)`: whether q's worker uses the old
        one or is to use the new one): stop those workers, install() the new mapping,
        restart them on it."""
        for q in self._queues:
            if q.running and uses(q):
                self._stop(q)
        install()
        self._reconcile_all()

    def _stop(self, q: _Queue) -> int:
        """Stop a running queue; keep and return the avail index it stopped at."""
        if q.running:
            q.running = False
            try:
                base = self.device.stop_queue(q.index)
            except WorkerStuck as e:
                self._stuck = True
                self._failed = str(e)
                log.error("%s%s; its guest memory and fds stay mapped and open",
                          self._prefix, e)
            except Exception as e:
                self._log_once(f"queue {q.index} failed to stop cleanly: "
                               f"{type(e).__name__}: {e}")
            else:
                if base is not None:
                    q.base = int(base)
            log.debug("%squeue %d stopped at %d", self._prefix, q.index, q.base)
            self._queue_event(q, "stopped")
        return q.base

    def _stop_all(self) -> None:
        for q in self._queues:
            self._stop(q)

    @staticmethod
    def _translate(memory: GuestMemory, size: int, addr: tuple, packed: bool = False) -> tuple:
        """Host addresses of a queue's three areas: split, the descriptor table, avail and
        used rings; packed (VIRTIO_F_RING_PACKED, §2.8: SET_VRING_ADDR's "avail" and "used"
        are the driver and device event suppression structures), the descriptor ring and the
        two 4-byte structures."""
        desc_uva, used_uva, avail_uva = addr
        if packed:
            desc = memory.uva_to_host(desc_uva, virtio.packed_ring_size(size))
            avail = memory.uva_to_host(avail_uva, virtio.EVENT_SUPPRESS_SIZE)
            used = memory.uva_to_host(used_uva, virtio.EVENT_SUPPRESS_SIZE)
            checks = (("descriptor ring", desc, virtio.DESC_ALIGN),
                      ("driver event suppression", avail, virtio.EVENT_SUPPRESS_ALIGN),
                      ("device event suppression", used, virtio.EVENT_SUPPRESS_ALIGN))
        else:
            desc = memory.uva_to_host(desc_uva, virtio.desc_table_size(size))
            avail = memory.uva_to_host(avail_uva, virtio.avail_ring_size(size))
            used = memory.uva_to_host(used_uva, virtio.used_ring_size(size))
            checks = (("descriptor table", desc, virtio.DESC_ALIGN),
                      ("avail ring", avail, virtio.AVAIL_ALIGN),
                      ("used ring", used, virtio.USED_ALIGN))
        for what, host, align in checks:
            if host % align:
                raise GuestMemoryError(f"{what} at {host:#x} is not {align}-byte aligned")
        return desc, avail, used

    def _reset_queues(self) -> None:
        """Stop every queue, reset the device, forget all ring state (fds closed)."""
        self._stop_all()
        try:
            self.device.reset()
        except Exception as e:
            self._log_once(f"device reset failed: {type(e).__name__}: {e}")
        for q in self._queues:
            self._release_queue_fds(q)
        self._queues = [_Queue(i) for i in range(len(self._queues))]
        self._features = 0
        self._status = 0

    # -- memory -------------------------------------------------------------------------------

    def _change_memory(self, new: GuestMemory) -> None:
        """Install a new snapshot: stop running queues, re-translate rings, restart them at
        their stopped indices, then unmap the regions the new snapshot no longer uses."""
        old = self._memory
        self._stop_all()
        self._memory = new
        errors = []
        for q in self._queues:
            if q.addr is not None and q.size:
                try:
                    q.host = self._translate(new, q.size, q.addr, self._packed)
                except GuestMemoryError as e:
                    q.host = None
                    errors.append(f"queue {q.index} rings do not translate in the new table: {e}")
            else:
                q.host = None
        try:
            self._reconcile_all()
        except RequestError as e:
            errors.append(str(e))
        keep = {id(r) for r in new.regions}
        for r in old.regions:
            if id(r) not in keep:
                self._release_region(r)
        if errors:
            raise RequestError("; ".join(errors))

    def _map(self, fd: int, region) -> MappedRegion:
        return MappedRegion.map(fd, region.guest_addr, region.size, region.user_addr,
                                region.mmap_offset)

    # -- handlers: each returns the reply payload (replying requests) or None ------------------

    def _get_features(self, msg, body):
        return u64(self.offered_features)

    def _set_features(self, msg, body):
        value = body.value
        extra = value & ~self.offered_features
        if extra:
            raise RequestError(f"features {extra:#x} were not offered")
        # Running workers latched EVENT_IDX, the header length etc. at start: stop them
        # *before* the device sees the new set (a net port's rx queue is written by other
        # ports' workers, which must never see a half-changed header length), then restart
        # them with it at the index they stopped at.  QEMU does send SET_FEATURES to running
        # queues (LOG_ALL around migration): applied, not refused.
        for q in self._queues:
            if q.running and q.run_features != value:
                self._stop(q)
        relayout = bool((self._features ^ value) & virtio.F_RING_PACKED)
        if value != self._features:
            log.info("%svirtio features %#x%s", self._prefix, value,
                     " (packed virtqueues)" if value & virtio.F_RING_PACKED else "")
        self._features = value
        self.device.ack_features(value)
        if relayout:            # the same addresses name other structures now
            for q in self._queues:
                q.host = None
                if q.addr is not None and q.size and len(self._memory):
                    try:
                        q.host = self._translate(self._memory, q.size, q.addr, self._packed)
                    except GuestMemoryError as e:
                        self._log_once(f"queue {q.index}: {e}")
        self._reconcile_all()

    def _set_owner(self, msg, body):
        self._owner = True

    def _reset_owner(self, msg, body):
        self._reset_queues()
        self._owner = False

    def _reset_device_req(self, msg, body):
        self._reset_queues()

    def _get_protocol_features(self, msg, body):
        return u64(int(self.offered_protocol_features))

    def _set_protocol_features(self, msg, body):
        value = body.value
        extra = value & ~int(self.offered_protocol_features)
        if extra:
            raise RequestError(f"protocol features {extra:#x} were not offered")
        self._protocol_features = ProtocolFeature(value)

    def _get_queue_num(self, msg, body):
        return u64(len(self._queues))

    def _get_max_mem_slots(self, msg, body):
        return u64(MAX_MEM_SLOTS)

    def _set_vring_num(self, msg, body):
        q = self._queue_for(body.index)
        num = body.num
        limit = min(int(self.device.max_queue_size), virtio.MAX_QUEUE_SIZE)
        if not _is_pow2(num) or num > limit:
            raise RequestError(f"queue {q.index} size {num} is not a power of two <= {limit}")
        if q.running:
            raise RequestError(f"queue {q.index} is running")
        host = q.host
        if q.addr is not None and len(self._memory):
            try:
                host = self._translate(self._memory, num, q.addr, self._packed)
            except GuestMemoryError as e:
                raise RequestError(f"queue {q.index} rings do not fit size {num}: {e}") from None
        q.size, q.host = num, host
        self._reconcile(q)

    def _set_vring_addr(self, msg, body):
        q = self._queue_for(body.index)
        if body.flags & ~VRING_ADDR_F_LOG:
            raise RequestError(f"queue {q.index}: unknown flags {body.flags:#x}")
        addr = (body.descriptor, body.used, body.available)
        host = None
        if q.size and len(self._memory):
            try:
                host = self._translate(self._memory, q.size, addr, self._packed)
            except GuestMemoryError as e:
                raise RequestError(f"queue {q.index}: {e}") from None
        if q.running:
            self._stop(q)
        q.addr, q.host = addr, host
        # QEMU sets VHOST_VRING_F_LOG (with the used ring's guest address) on running queues
        # when migration starts and clears it at the end: the restart picks it up
        q.log_used, q.log_gpa = bool(body.flags & VRING_ADDR_F_LOG), body.log
        self._reconcile(q)

    def _set_vring_base(self, msg, body):
        q = self._queue_for(body.index)
        if q.running:
            raise RequestError(f"queue {q.index} is running")
        if self._packed:
            # positions and wrap counters (bits 0-14/15 avail, 16-30/31 used, QEMU's layout);
            # a position beyond the ring is refused when the queue starts
            pass
        elif body.num > MAX_VRING_BASE:
            raise RequestError(f"queue {q.index} base {body.num:#x} does not fit the split "
                               f"ring's 16-bit index")
        q.base = body.num

    def _get_vring_base(self, msg, body):
        try:
            q = self._queue_for(body.index)
        except RequestError as e:
            raise ProtocolClosed(f"GET_VRING_BASE: {e}") from None
        base = self._stop(q)
        q.started = False
        return VringState.build(dict(index=q.index, num=base))

    def _set_vring_fd(self, msg, body):
        value = body.value
        q = self._queue_for(value & VRING_IDX_MASK)
        nofd = bool(value & VRING_NOFD_MASK)
        msg.expect_fds(0 if nofd else 1)
        if not nofd:        # checked (and made non-blocking) before anything changes
            check_event_fd(msg.fds[0], write=msg.request != FrontendReq.SET_VRING_KICK)
        fd = -1 if nofd else msg.take_fd()
        attr = {FrontendReq.SET_VRING_KICK: "kick_fd", FrontendReq.SET_VRING_CALL: "call_fd",
                FrontendReq.SET_VRING_ERR: "err_fd"}[msg.request]
        if q.running:          # the worker polls the old fd: stop it before closing that
            self._stop(q)
        self._release_fd(getattr(q, attr))
        setattr(q, attr, fd)
        if msg.request == FrontendReq.SET_VRING_KICK:
            q.started = True
            if q.size == 0 or q.host is None:
                log.debug("%squeue %d kicked before its rings are set; it starts when they are",
                          self._prefix, q.index)
        elif msg.request == FrontendReq.SET_VRING_CALL:
            q.signal_call = fd >= 0
        self._reconcile(q)

    def _set_vring_enable(self, msg, body):
        q = self._queue_for(body.index)
        q.enabled = bool(body.num)
        self._reconcile(q)

    def _set_backend_req_fd(self, msg, body):
        msg.expect_fds(1)
        try:
            st = os.fstat(msg.fds[0])
        except OSError as e:
            raise RequestError(f"bad fd: {e}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise RequestError("the backend request channel is not a socket")
        # kept for the connection's lifetime (closing it would look like a dead channel to the
        # frontend); the server sends config_events() on it, non-blocking
        _close(self._backend_req_fd)
        self._backend_req_fd = msg.take_fd()
        os.set_blocking(self._backend_req_fd, False)

    def _set_vring_endian(self, msg, body):
        raise RequestError("rings are always little-endian (VERSION_1 only)")

    def _set_log_base(self, msg, body):
        if not self._protocol_features & ProtocolFeature.LOG_SHMFD:
            # the old form (a u64, no fd, no reply): nothing we could log into
            raise RequestError("without protocol feature LOG_SHMFD")
        msg.expect_fds(1)
        self._check_memory_limit(self._mapped_bytes(log=False) + body.mmap_size)
        fd = msg.take_fd()
        try:
            new = SharedRegion.map(fd, body.mmap_size, body.mmap_offset, "log")
        finally:
            _close(fd)
        # QEMU replaces the log while queues log into it (it grows with guest memory): stop
        # the workers that use the old one, restart them on the new one, and only then unmap
        # the old
        old = self._dirty_log
        try:
            self._restart_users(lambda q: q.run_log,
                                lambda: setattr(self, "_dirty_log", new))
        finally:
            if old is not None:
                self._release_region(old)
        log.debug("%sdirty log of %d bytes at offset %d", self._prefix, body.mmap_size,
                  body.mmap_offset)
        return u64(0)

    def _set_log_fd(self, msg, body):
        # The eventfd a back-end may signal after updating the log.  QEMU polls the bitmap and
        # never sends this; kept (checked, non-blocking) for the connection, not signalled.
        if not self.device.dirty_log:
            raise RequestError("dirty logging was not offered")
        msg.expect_fds(1)
        check_event_fd(msg.fds[0], write=True)
        _close(self._log_fd)
        self._log_fd = msg.take_fd()

    def _mapped_bytes(self, log: bool = True, inflight: bool = True) -> int:
        """Guest memory, (with log) the dirty log and (with inflight) the inflight region
        this connection has mapped."""
        total = sum(r.map_len for r in self._memory.regions)
        if log and self._dirty_log is not None:
            total += self._dirty_log.size
        if inflight and self._inflight is not None:
            total += self._inflight.size
        return total

    def _inflight_layout_of(self, body) -> tuple[int, int, int]:
        """Check GET/SET_INFLIGHT_FD's queue count and size; (queues, size, bytes needed)."""
        if not self._protocol_features & ProtocolFeature.INFLIGHT_SHMFD:
            raise RequestError("without protocol feature INFLIGHT_SHMFD")
        nq, qsize = body.num_queues, body.queue_size
        if not 1 <= nq <= len(self._queues):
            raise RequestError(f"{nq} queues (the device has {len(self._queues)})")
        limit = min(int(self.device.max_queue_size), virtio.MAX_QUEUE_SIZE)
        if not _is_pow2(qsize) or qsize > limit:
            raise RequestError(f"queue size {qsize} is not a power of two <= {limit}")
        return nq, qsize, nq * inflight_queue_size(qsize)

    def _install_inflight(self, region: SharedRegion, layout: tuple[int, int],
                          fd: int) -> None:
        old, old_fd = self._inflight, self._inflight_fd

        def install():
            self._inflight, self._inflight_layout, self._inflight_fd = region, layout, fd
        try:
            # a running queue that tracks in the old region, or has a part in the new one
            self._restart_users(lambda q: q.run_inflight or q.index < layout[0], install)
        finally:
            if old is not None:
                self._release_region(old)
            if old_fd >= 0 and old_fd != fd:
                _close(old_fd)

    def _get_inflight_fd(self, msg, body):
        # The frontend asks for a region for `num_queues` rings of `queue_size`; it keeps the
        # fd and hands it back with SET_INFLIGHT_FD after every (re)connect.  Ours is a memfd
        # sealed against shrinking, so nobody can make our mapping SIGBUS.
        nq, qsize, size = self._inflight_layout_of(body)
        self._check_memory_limit(self._mapped_bytes(inflight=False) + size)
        fd = os.memfd_create("pyvhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            region = SharedRegion.map(fd, size, 0, "inflight region")
        except BaseException:
            _close(fd)
            raise
        self._install_inflight(region, (nq, qsize), fd)
        log.debug("%sinflight region of %d bytes for %d queues of %d", self._prefix, size, nq,
                  qsize)
        return Reply(Inflight.build(dict(mmap_size=size, mmap_offset=0, num_queues=nq,
                                            queue_size=qsize)), (fd,))

    def _set_inflight_fd(self, msg, body):
        msg.expect_fds(1)
        nq, qsize, size = self._inflight_layout_of(body)
        if body.mmap_size < size:
            raise RequestError(f"inflight region of {body.mmap_size} bytes, {nq} queues of "
                               f"{qsize} need {size}")
        self._check_memory_limit(self._mapped_bytes(inflight=False) + body.mmap_size)
        fd = msg.take_fd()
        try:
            region = SharedRegion.map(fd, body.mmap_size, body.mmap_offset, "inflight region")
        finally:
            _close(fd)
        self._install_inflight(region, (nq, qsize), -1)

    def _get_config(self, msg, body):
        offset, size, flags = body.offset, body.size, body.flags
        try:
            if offset + size > MAX_CONFIG_SIZE:
                raise ValueError(f"offset {offset} + size {size} beyond {MAX_CONFIG_SIZE}")
            data = bytes(self.device.get_config(offset, size))
            if len(data) != size:
                raise ValueError(f"device returned {len(data)} bytes, asked {size}")
        except Exception as e:
            # libvhost-user's convention, which QEMU detects: a reply of size 0 is a failure.
            self._log_once(f"GET_CONFIG offset {offset} size {size}: {e}")
            return b""
        return Config.build(dict(offset=offset, size=size, flags=flags, payload=data))

    def _set_config(self, msg, body):
        if body.offset + body.size > MAX_CONFIG_SIZE:
            raise RequestError(f"offset {body.offset} + size {body.size} beyond "
                               f"{MAX_CONFIG_SIZE}")
        if body.flags & ~CONFIG_FLAG_MIGRATION:
            raise RequestError(f"unknown flags {body.flags:#x}")
        self.device.set_config(body.offset, bytes(body.payload))

    def _check_memory_limit(self, total: int) -> None:
        if total > self._max_memory:
            raise LimitExceeded(f"guest memory of {total} bytes is over the connection's limit "
                                f"of {self._max_memory} (max-guest-memory)")

    def _set_mem_table(self, msg, body):
        msg.expect_fds(body.num_regions)
        self._check_memory_limit(sum(r.size + r.mmap_offset for r in body.regions)
                                 + (self._dirty_log.size if self._dirty_log else 0))
        mapped = []
        try:
            for region, fd in zip(body.regions, msg.fds):
                mapped.append(self._map(fd, region))
            new = GuestMemory(mapped)
        except GuestMemoryError:
            for r in mapped:
                r.unmap()
            raise
        finally:
            for fd in msg.fds:          # mapped (or failed): the fds are not needed any more
                _close(fd)
            msg.fds = []
        self._change_memory(new)

    def _add_mem_reg(self, msg, body):
        msg.expect_fds(1)
        region = body.region
        for r in self._memory.regions:
            if (r.guest_addr, r.size, r.user_addr, r.mmap_offset) == (
                    region.guest_addr, region.size, region.user_addr, region.mmap_offset):
                return          # QEMU may re-add a region it already sent: nothing to do
        if len(self._memory) >= MAX_MEM_SLOTS:
            raise RequestError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        self._check_memory_limit(self._mapped_bytes() + region.size + region.mmap_offset)
        fd = msg.take_fd()
        try:
            new_region = self._map(fd, region)
        finally:
            _close(fd)
        try:
            new = self._memory.with_region(new_region)
        except GuestMemoryError:
            new_region.unmap()
            raise
        self._change_memory(new)

    def _rem_mem_reg(self, msg, body):
        region = body.region      # an fd may ride along (QEMU sends one): closed by dispatch
        new, _removed = self._memory.without_region(region.guest_addr, region.size,
                                                    region.user_addr)
        self._change_memory(new)

    def _set_status(self, msg, body):
        self._status = body.value & 0xFF

    def _get_status(self, msg, body):
        return u64(self._status)

    def _net_set_mtu(self, msg, body):
        # Only sent when NET_MTU was negotiated; the device decides what it accepts.
        if not self._protocol_features & ProtocolFeature.NET_MTU:
            raise RequestError("NET_SET_MTU without protocol feature NET_MTU")
        self.device.set_mtu(body.value)

    def _send_rarp(self, msg, body):
        # The u64 carries the guest's MAC in its first 6 bytes (live migration announce).
        if not self._protocol_features & ProtocolFeature.RARP:
            raise RequestError("SEND_RARP without protocol feature RARP")
        self.device.send_rarp(body.value.to_bytes(8, "little")[:6])

    # -- end of connection --------------------------------------------------------------------

    def connection_lost(self, exc: BaseException | None = None) -> None:
        """The frontend is gone: stop all queues, reset the device, unmap memory, close every fd
        kept.  Idempotent; the object is dead afterwards."""
        if self._dead:
            return
        self._dead = True
        try:
            self._stop_all()
            try:
                self.device.reset()
            except Exception as e:
                log.warning("%sdevice reset failed: %s: %s", self._prefix, type(e).__name__, e)
        finally:
            for q in self._queues:
                self._release_queue_fds(q)
                q.host = None
            if self._dirty_log is not None:
                self._release_region(self._dirty_log)
                self._dirty_log = None
            if self._inflight is not None:
                self._release_region(self._inflight)
                self._inflight = None
            _close(self._inflight_fd)
            self._inflight_fd = -1
            if self._stuck:
                self._leaked.extend(self._memory.regions)
                log.error("%sleaving guest memory mapped and %d fds open for a stuck worker",
                          self._prefix, sum(1 for x in self._leaked if isinstance(x, int)))
            else:
                self._memory.unmap_all()
            self._memory = GuestMemory()
            _close(self._log_fd)
            self._log_fd = -1
            _close(self._backend_req_fd)
            self._backend_req_fd = -1
            for fd in self._pending_fds:
                _close(fd)
            self._pending_fds = []
            self._buf.clear()
            self._header = None
