"""sdnotify.py: the systemd service-manager protocols, spoken over plain sockets (no libsystemd,
no python-systemd): sd_notify datagrams (READY=1, STATUS=, RELOADING=1, STOPPING=1, WATCHDOG=1;
sd_notify(3)), the socket-activation environment (LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES;
sd_listen_fds(3)) and the watchdog interval (WATCHDOG_USEC / WATCHDOG_PID; sd_watchdog_enabled(3)).

Owns those protocols only: no event loop, no device knowledge.  Callers decide when to say what.

    notifier = Notifier.from_env()              # disabled (all no-ops) without NOTIFY_SOCKET
    for fd, name in listen_fds():               # [] unless socket-activated for this pid
        ...
    notifier.ready(status="serving 2 devices")
    interval = notifier.watchdog_interval()     # seconds between WATCHDOG=1 pings, or None
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import MutableMapping

log = logging.getLogger("pyvhost.sdnotify")

SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_SEND_TIMEOUT = 2.0     # seconds: never wedge the caller on a full notify queue


def _single_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _parse_int(name: str, value: str) -> int:
    try:
        return int(value.strip(), 10)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None


class Notifier:
    """Sends sd_notify state changes to the service manager.

    `address` is a filesystem path or an abstract name starting with '@' (as in NOTIFY_SOCKET),
    or None for a disabled notifier whose methods do nothing and return False.  Every method
    returns True when the datagram was sent; failures (no listener any more, full queue) are
    logged at debug level and return False: a service never fails because nobody listens.
    """

    def __init__(self, address: str | None, environ: MutableMapping[str, str] | None = None):
        self.address = address
        self._sockaddr: str | bytes | None = None
        if address:
            if address.startswith("@"):
                self._sockaddr = b"\0" + address[1:].encode()
            elif address.startswith("/"):
                self._sockaddr = address
            else:   # sd_notify refuses anything else with -EINVAL (vsock: needs systemd 254)
                log.warning("NOTIFY_SOCKET=%r is not an absolute path or @abstract name; "
                            "not notifying", address)
        # the watchdog variables as they were when we were created (from_env's environ)
        env = os.environ if environ is None else environ
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> "Notifier":
        """A notifier for NOTIFY_SOCKET in `environ` (default os.environ); disabled if unset."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None, env)

    @property
    def enabled(self) -> bool:
        return self._sockaddr is not None

    def send(self, *assignments: str) -> bool:
        """One datagram "A=1\\nB=2".  Each assignment is `NAME=value` without a newline
        (ValueError otherwise: a programming error, not a runtime condition)."""
        for a in assignments:
            if "=" not in a or "\n" in a:
                raise ValueError(f"bad sd_notify assignment {a!r}")
        if self._sockaddr is None or not assignments:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(_SEND_TIMEOUT)
            self._sock.sendto(data, self._sockaddr)
        except OSError as e:    # ENOENT / ECONNREFUSED: listener gone; timeout: queue full
            log.debug("sd_notify to %s failed: %s", self.address, e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (and STATUS=): start-up finished, or a reload did."""
        extra = () if status is None else (f"STATUS={_single_line(status)}",)
        return self.send("READY=1", *extra)

    def status(self, text: str) -> bool:
        """STATUS=text, one line (newlines become spaces): shown by `systemctl status`."""
        return self.send(f"STATUS={_single_line(text)}")

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, as Type=notify-reload in systemd
        253+ requires; 252 ignores the extra field).  Send ready() when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1 (and STATUS=): shutting down."""
        extra = () if status is None else (f"STATUS={_single_line(status)}",)
        return self.send("STOPPING=1", *extra)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
        advises), or None: no watchdog requested, meant for another process (WATCHDOG_PID is
        not ours), or no notify socket to ping.  Non-numeric or non-positive values: ValueError."""
        if self._watchdog_usec is None:
            return None
        usec = _parse_int("WATCHDOG_USEC", self._watchdog_usec)
        if usec <= 0:
            raise ValueError(f"WATCHDOG_USEC={self._watchdog_usec!r} is not positive")
        if self._watchdog_pid is not None:
            pid = _parse_int("WATCHDOG_PID", self._watchdog_pid)
            if pid <= 0:
                raise ValueError(f"WATCHDOG_PID={self._watchdog_pid!r} is not a pid")
            if pid != os.getpid():
                return None
        if not self.enabled:
            return None
        return usec / 2 / 1e6

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Notifier({self.address!r})" if self.enabled else "Notifier(disabled)"


def listen_fds(environ: MutableMapping[str, str] | None = None,
               unset: bool = True) -> list[tuple[int, str]]:
    """Socket-activated fds as [(fd, name)], sd_listen_fds_with_names(3) semantics.

    Only when LISTEN_PID equals our pid (else []).  The fds are 3 .. 3+LISTEN_FDS-1; names come
    from LISTEN_FDNAMES split on ':' (a missing, short or empty list gives "unknown"; extra
    names are ignored); FD_CLOEXEC is set on each.  With `unset` the three variables are removed
    from `environ` (default os.environ, so child processes do not inherit them), on every path
    as sd_listen_fds does.  Bad values (non-numeric, negative, an fd that is not open) raise
    ValueError with a one-line message.
    """
    env = os.environ if environ is None else environ
    try:
        pid_text = env.get("LISTEN_PID")
        if pid_text is None:
            return []
        if _parse_int("LISTEN_PID", pid_text) != os.getpid():
            return []
        fds_text = env.get("LISTEN_FDS")
        if fds_text is None:
            return []
        n = _parse_int("LISTEN_FDS", fds_text)
        if n < 0 or n > 65536:
            raise ValueError(f"LISTEN_FDS={fds_text!r} is out of range")
        names_text = env.get("LISTEN_FDNAMES")
        names = names_text.split(":") if names_text else []
        if len(names) > n:
            log.debug("LISTEN_FDNAMES has %d names for %d fds; extra names ignored",
                      len(names), n)
        result = []
        for k in range(n):
            fd = SD_LISTEN_FDS_START + k
            try:
                os.set_inheritable(fd, False)       # FD_CLOEXEC
            except OSError as e:
                raise ValueError(f"LISTEN_FDS={n}: fd {fd} is not usable: {e.strerror}") \
                    from None
            name = names[k] if k < len(names) and names[k] else "unknown"
            result.append((fd, name))
        return result
    finally:
        if unset:
            for var in _LISTEN_VARS:
                env.pop(var, None)


def socket_path_of(fd: int) -> str | None:
    """The address an inherited AF_UNIX socket is bound to: a path, or '@name' for an abstract
    socket; None for an unbound socket, another family, or an fd that is not a socket.  Used to
    check that a socket-activated fd is the one configured for a device.  Does not take over or
    close `fd`."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.family != socket.AF_UNIX:
            return None
        name = sock.getsockname()
    except OSError:
        return None
    finally:
        sock.detach()
    if isinstance(name, bytes):         # abstract (Linux): b"\0name"
        return "@" + name[1:].decode(errors="surrogateescape") if name[:1] == b"\0" else None
    return name or None
