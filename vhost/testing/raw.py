"""raw.py: a hostile vhost-user frontend that sends whatever it is told, and the fds and payloads
hostile tests hand a backend.

Owns: `RawFrontend` -- a `VhostUserFrontend` whose `connect()` only negotiates (GET_FEATURES,
protocol features with REPLY_ACK, SET_OWNER) and sets up no memory and no ring, so that a test
can then send any message with any fds and read the ack (`ack`, inherited), send raw bytes
(`send_bytes`), trickle a message byte by byte with fds riding on every byte (`trickle`) and see
whether the backend hung up (`wait_closed`); the payload builders (`vring_state`, `vring_fd`,
`mem_table`, `single_region`); and the fds such tests pass: `sparse_memfd` (a huge memfd that
costs nothing until touched), `saturated_eventfd` (a counter at 0xfffffffffffffffe, blocking
by default: one more write would block the writer forever), `wrong_kind_fds` (a regular file,
a socket, /dev/null).
Must not: decide what a backend should answer (the tests do); hide a disconnect (it raises
VhostUserError or returns it); wait unboundedly; import tests, devices, vhost.server,
vhost.service or vhost.config.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import tempfile
import time
from typing import Callable, Sequence

from protocols.vhost_user import (
    FLAG_NEED_REPLY,
    HEADER_SIZE,
    VERSION,
    FrontendReq,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    VringState,
    build_message,
    u64,
)
from vhost.testing.connection import VhostUserFrontend
from vhost.testing.errors import VhostUserError
from vhost.testing.virtqueue import DEFAULT_TIMEOUT

# What a RawFrontend negotiates when offered: acks for everything, ADD_MEM_REG, queue counts.
RAW_PROTOCOL_FEATURES = (ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS
                         | ProtocolFeature.MQ)
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE     # the largest value an eventfd counter holds


def vring_state(index: int, num: int) -> bytes:
    return VringState.build(dict(index=index, num=num))


def vring_fd(index: int, nofd: bool = False) -> bytes:
    """The u64 of SET_VRING_KICK/CALL/ERR."""
    return u64(index | ((1 << 8) if nofd else 0))


def mem_table(regions: Sequence[tuple[int, int, int, int]]) -> bytes:
    """SET_MEM_TABLE payload from (guest_addr, size, user_addr, mmap_offset) tuples."""
    return MemoryTable.build(dict(num_regions=len(regions), padding=0, regions=[
        dict(guest_addr=g, size=s, user_addr=u, mmap_offset=o) for g, s, u, o in regions]))


def single_region(guest_addr: int, size: int, user_addr: int, mmap_offset: int = 0) -> bytes:
    """ADD_MEM_REG / REM_MEM_REG payload."""
    return SingleMemoryRegion.build(dict(padding=0, region=dict(
        guest_addr=guest_addr, size=size, user_addr=user_addr, mmap_offset=mmap_offset)))


def sparse_memfd(size: int, name: str = "hostile") -> int:
    """A memfd of `size` bytes, ftruncate'd only: no page is allocated until touched."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def saturated_eventfd(blocking: bool = True) -> int:
    """An eventfd whose counter is at its maximum: a write of 1 blocks the writer (forever, on a
    blocking fd nobody reads) or fails with EAGAIN; it polls readable.  Blocking unless told."""
    fd = os.eventfd(0, os.EFD_CLOEXEC | (0 if blocking else os.EFD_NONBLOCK))
    os.eventfd_write(fd, EVENTFD_MAX)
    return fd


def wrong_kind_fds(tmpdir: str | os.PathLike) -> dict[str, int]:
    """fds that are neither an eventfd nor a pipe, by what they are: a regular file (with
    data: it polls readable for ever), one end of a socketpair (the other end closed) and
    /dev/null.  The caller closes them."""
    out = {}
    fd, path = tempfile.mkstemp(dir=os.fspath(tmpdir), prefix="notanevent")
    os.write(fd, b"x" * 64)
    os.unlink(path)
    out["regular file"] = fd
    a, b = socket.socketpair()
    b.close()
    out["socket"] = a.detach()
    out["/dev/null"] = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    return out


class RawFrontend(VhostUserFrontend):
    """A frontend that negotiates and then does only what the test says.

    `connect()` (or `with`): connect, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (the offered ones
    of `protocol_features`, REPLY_ACK included when offered) and, with `owner`, SET_OWNER;
    `features` (if not None) is then sent with SET_FEATURES.  No memory table, no ring: send
    them yourself (`ack`, `send_message`, `send_bytes`, `trickle`).  `close()` just closes."""

    def __init__(self, socket_path: str | os.PathLike, *, owner: bool = True,
                 features: int | None = None,
                 protocol_features: int = RAW_PROTOCOL_FEATURES,
                 timeout: float = DEFAULT_TIMEOUT):
        super().__init__(socket_path, protocol_features=protocol_features, timeout=timeout)
        self.owner = owner
        self.wanted_features = features

    def _connect(self) -> None:
        self._connect_socket()
        self._negotiate_protocol_features()
        if self.owner:
            self.setup(FrontendReq.SET_OWNER)
        if self.wanted_features is not None:
            self.features = self.wanted_features
            self.setup(FrontendReq.SET_FEATURES, u64(self.features))

    def get_features(self) -> int:
        return self.call_u64(FrontendReq.GET_FEATURES)

    def send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> int:
        """One sendmsg of `data` with `fds` (SCM_RIGHTS) attached; returns bytes sent."""
        if fds:
            return socket.send_fds(self.sock, [data], list(fds))
        return self.sock.send(data)

    def trickle(self, data: bytes, fds: Sequence[int], *, every: int = 0,
                on_progress: Callable[[int], None] | None = None) -> tuple[int, str | None]:
        """Send `data` one byte per sendmsg, each byte carrying all of `fds` (the same fds each
        time: the kernel installs a new copy in the receiver for every byte).  `on_progress(n)`
        is called after every `every` bytes.  Stops when the backend hangs up; returns (bytes
        sent, None) or (bytes sent, why it stopped: "EPIPE", "ECONNRESET", ...)."""
        sent = 0
        view = memoryview(data)
        for i in range(len(data)):
            try:
                socket.send_fds(self.sock, [view[i:i + 1]], list(fds))
            except (BrokenPipeError, ConnectionResetError) as e:
                return sent, errno.errorcode.get(e.errno, str(e))
            except socket.timeout:
                return sent, "send timeout"
            sent += 1
            if on_progress is not None and every and sent % every == 0:
                on_progress(sent)
        return sent, None

    def message(self, request: int, payload: bytes = b"", need_reply: bool = True) -> bytes:
        """The bytes of one message (header + payload) as `send_message` would send them."""
        return build_message(request, payload, VERSION | (FLAG_NEED_REPLY if need_reply else 0))

    def wait_closed(self, timeout: float) -> tuple[bool, bytes]:
        """Read until the backend closes the connection or `timeout` passes.  Returns (closed,
        whatever bytes arrived meanwhile)."""
        got = bytearray()
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, bytes(got)
            if not poller.poll(max(1, int(left * 1000))):
                continue
            try:
                chunk = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except (ConnectionResetError, BrokenPipeError):
                return True, bytes(got)
            if not chunk:
                return True, bytes(got)
            got += chunk

    def read_ack(self, request: int) -> int:
        """Read one REPLY_ACK ack for `request` (sent earlier with NEED_REPLY) and return its
        value; VhostUserError on a disconnect."""
        reply = self.recv_reply(request)
        if len(reply) != 8:
            raise VhostUserError(f"ack of {request}: payload of {len(reply)} bytes")
        return int.from_bytes(reply, "little")


__all__ = ["EVENTFD_MAX", "HEADER_SIZE", "RAW_PROTOCOL_FEATURES", "RawFrontend", "mem_table",
           "saturated_eventfd", "single_region", "sparse_memfd", "vring_fd", "vring_state",
           "wrong_kind_fds"]
