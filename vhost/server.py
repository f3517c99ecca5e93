"""server.py: the vhost-user sockets: listening and accepting on the event loop, and each
frontend's conversation in a control thread.  Speaks no protocol itself (protocol.py does) and
knows no device (it is handed one); the service layer above it is vhost/service.py.

Listens on a Unix stream socket (`--socket-path`, created 0600 unless told otherwise, a stale
socket file replaced) or an inherited listening socket (`--fd`, socket activation), accepts on
the event loop and serves one frontend connection at a time (vhost-user is 1:1), each with a
fresh `BackendProtocol`.  In client mode (`--client`, `mode = "client"`) it connects to the
socket QEMU listens on instead, and re-dials with bounded back-off (DIAL_FIRST_RETRY doubling up
to DIAL_MAX_RETRY) whenever there is no connection, so QEMU needs nothing when the backend
restarts.

The conversation with a frontend runs in a control thread of its own, not on the event loop:
the protocol is synchronous and some messages (GET_VRING_BASE, SET_MEM_TABLE, the disconnect
itself) stop queue workers, which waits for their in-flight I/O -- up to the device's
stop-timeout when storage does not answer.  On the loop that would stall every other device of
the process, signals, reloads and the systemd watchdog.  The thread polls the non-blocking
socket and a stop eventfd, reads with `socket.recv_fds` exactly one header and then exactly one
payload at a time so that SCM_RIGHTS fds attach to the right message, and writes the protocol's
replies back.  EOF, a read/write error, `ProtocolClosed` or a stop request ends the conversation;
the thread then tears the connection down (`protocol.connection_lost()`: queues stopped,
in-flight I/O completed, memory unmapped, fds closed) and the loop accepts the next frontend.

`run(coro_factory)` runs a coroutine on uvloop (when importable) or asyncio and turns SIGTERM /
SIGINT into a clean, quick exit.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import select
import signal
import socket
import stat
import struct
import threading

from protocols.vhost_user import MAX_FDS

from .protocol import BackendProtocol, Limits, ProtocolClosed

log = logging.getLogger("pyvhost.server")

# A frontend that stops reading its replies for this long is dropped.
SEND_TIMEOUT = 10.0
# Reads handled per wake-up before checking for a stop request again.
READS_PER_WAKEUP = 64
LISTEN_BACKLOG = 4
# Client mode: the first re-dial after a failed connect or a dropped connection, doubling up
# to the bound.  QEMU's own reconnect has a 1 s granularity; 2 s keeps a restarted QEMU's guest
# waiting at most that long for its disk, while a backend whose QEMU is gone for good costs
# one failed connect(2) every 2 s.
DIAL_FIRST_RETRY = 0.05
DIAL_MAX_RETRY = 2.0


class ServerError(Exception):
    """The server cannot start (bad socket path, bad inherited fd)."""


def _is_device(obj) -> bool:
    return hasattr(obj, "start_queue") and hasattr(obj, "stop_queue")


def _peer_description(conn: socket.socket) -> str:
    try:
        pid, uid, gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return f"pid {pid}, uid {uid}"
    except OSError:
        return "peer unknown"


def _send_all(conn: socket.socket, data: bytes) -> None:
    """sendall for a non-blocking socket: replies are tiny, but never spin or drop them.  A
    reply with fds (protocol.Reply) sends them with its first bytes (SCM_RIGHTS)."""
    view = memoryview(data)
    fds = list(getattr(data, "fds", ()))
    poller = None
    while view:
        try:
            if fds:
                sent = socket.send_fds(conn, [view], fds)
                fds = []
            else:
                sent = conn.send(view)
        except (BlockingIOError, InterruptedError):
            if poller is None:                  # poll, not select: fds may be >= 1024
                poller = select.poll()
                poller.register(conn.fileno(), select.POLLOUT)
            if not poller.poll(SEND_TIMEOUT * 1000):
                raise TimeoutError("the frontend does not read its replies") from None
            continue
        view = view[sent:]


def _in_thread(loop: asyncio.AbstractEventLoop, name: str, fn, *args) -> asyncio.Future:
    """Run fn(*args) in a new daemon thread; its result (or exception) resolves the future on
    `loop`.  A daemon thread, unlike an executor's, never holds up the process exit."""
    fut = loop.create_future()

    def settle(method, value):
        if not fut.done():
            getattr(fut, method)(value)

    def body():
        try:
            result = fn(*args)
        except BaseException as e:          # noqa: BLE001 - handed to the awaiting task
            outcome = ("set_exception", e)
        else:
            outcome = ("set_result", result)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:                # the loop is gone (process exiting)
            pass

    threading.Thread(target=body, name=name, daemon=True).start()
    return fut


def _bind_unix(path: str, mode: int = 0o600,
               group: str | None = None) -> tuple[socket.socket, tuple[int, int]]:
    """Listen at `path` (mode 0600 unless `mode`; group `group` if given, so that QEMU running
    as another user in that group can connect).  A stale socket file is replaced; a socket
    someone still listens on, or any other kind of file, is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass                                    # stale: nobody listens any more
        except BlockingIOError:
            raise ServerError(f"{path}: another process is listening on it") from None
        except OSError as e:
            raise ServerError(f"{path}: cannot check the existing socket: {e}") from None
        else:
            raise ServerError(f"{path}: another process is listening on it")
        finally:
            probe.close()
        log.info("replacing stale socket %s", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise ServerError(f"cannot bind {path}: {e}") from None
    finally:
        os.umask(old_umask)
    try:
        # bound 0600 by the umask first, widened only now: never briefly open to everyone
        if group is not None:
            import grp
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        if mode != 0o600:
            os.chmod(path, mode)
    except (OSError, KeyError) as e:
        sock.close()
        os.unlink(path)
        raise ServerError(f"cannot set group/mode of {path}: {e}") from None
    sock.listen(LISTEN_BACKLOG)
    st = os.stat(path)
    return sock, (st.st_dev, st.st_ino)


def _adopt_listen_fd(fd: int) -> socket.socket:
    """Take over an inherited listening stream socket (we own and close it from now on)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ServerError(f"--fd {fd}: not a usable socket: {e}") from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ServerError(f"--fd {fd}: not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ServerError(f"--fd {fd}: socket is not listening")
    except (ServerError, OSError) as e:
        sock.detach()
        if isinstance(e, ServerError):
            raise
        raise ServerError(f"--fd {fd}: {e}") from None
    return sock


class Server:
    """Accepts one frontend at a time and runs a BackendProtocol per connection.

    `device_factory_or_device` is either a Device (reused across connections; the protocol
    resets it at every disconnect) or a zero-argument callable returning a Device per
    connection.  `on_ready(server)` (plain or async) is called once the socket listens;
    `on_connection(server, connected)` when a frontend connects (True) and after it is gone
    (False); `on_queue(server, index, state, avail)` on the event loop after one of the
    connection's queues started or stopped (BackendProtocol's `on_queue`, handed over from the
    control thread).  `name` labels the log lines (the device name).
    """

    def __init__(self, device_factory_or_device, *, socket_path: str | None = None,
                 listen_fd: int | None = None, on_ready=None, on_connection=None,
                 socket_mode: int = 0o600, socket_group: str | None = None,
                 name: str | None = None, limits: Limits | None = None, client: bool = False,
                 on_queue=None):
        if (socket_path is None) == (listen_fd is None):
            raise ValueError("exactly one of socket_path and listen_fd is required")
        if client and socket_path is None:
            raise ValueError("client mode connects to a socket_path")
        self.client = client
        self._device_source = device_factory_or_device
        self.socket_path = socket_path
        self.listen_fd = listen_fd
        self._on_ready = on_ready
        self._on_connection = on_connection
        self._on_queue = on_queue
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.name = name
        self.limits = limits or Limits()
        self._log_fields = {"device": name} if name else {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._listener: socket.socket | None = None
        self._identity = None
        self._where = ""
        self.connections = 0            # connections accepted so far
        self.peer: str | None = None    # the connected frontend (pid/uid), for the control API
        self.protocol: BackendProtocol | None = None    # the current connection's, if any

    def _device(self):
        src = self._device_source
        return src if _is_device(src) else src()

    def stop(self) -> None:
        """Stop serving (thread-safe): stop accepting at once (while a frontend is connected the
        listening socket is closed and its file removed before the connection is torn down,
        so nobody connects to a backend that is going away), drop the current connection,
        serve_forever returns."""
        if self._stopping:
            # once: a second cancel would abort serve_forever's wait for the teardown of the
            # current connection (in-flight I/O completing), and the caller would then reset
            # the device while the control thread is still stopping its queues
            return
        self._stopping = True
        loop, task = self._loop, self._task
        if loop is None or task is None:
            return

        def stop_in_loop():
            if self.protocol is not None:   # no accept is pending on the listener now
                self._close_listener()
            task.cancel()

        try:
            loop.call_soon_threadsafe(stop_in_loop)
        except RuntimeError:        # loop already closed: nothing left to stop
            pass

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        if self._identity is not None:
            try:
                st = os.stat(self.socket_path)
                if (st.st_dev, st.st_ino) == self._identity:
                    os.unlink(self.socket_path)     # only the socket we bound, never another's
            except OSError:
                pass
        log.info("stopped listening on %s", self._where, extra={"fields": self._log_fields})

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._task = loop, asyncio.current_task()
        self._identity = None
        if self.client:
            await self._dial_forever(loop)
            return
        if self.socket_path is not None:
            listener, self._identity = _bind_unix(self.socket_path, self.socket_mode,
                                                  self.socket_group)
            self._where = self.socket_path
        else:
            listener = _adopt_listen_fd(self.listen_fd)
            self._where = f"fd {self.listen_fd}"
        listener.setblocking(False)
        self._listener = listener
        log.info("listening on %s", self._where, extra={"fields": self._log_fields})
        try:
            if not await self._ready():
                return
            while True:
                conn, _ = await loop.sock_accept(listener)
                await self._serve_connection(loop, conn)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            self._close_listener()

    async def _ready(self) -> bool:
        """Call on_ready (plain or async) unless stopping already; False: stop instead."""
        if self._stopping:
            return False
        if self._on_ready is not None:
            result = self._on_ready(self)
            if inspect.isawaitable(result):
                await result
        return True

    async def _dial_forever(self, loop) -> None:
        """Client mode: connect to socket_path, serve the conversation, dial again; while the
        frontend is not there, retry with back-off (logged once per outage)."""
        self._where = self.socket_path
        try:
            if not await self._ready():
                return
            log.info("connecting to %s (client mode)", self._where,
                     extra={"fields": self._log_fields})
            delay, waiting = DIAL_FIRST_RETRY, False
            while True:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.setblocking(False)
                try:
                    await loop.sock_connect(conn, self.socket_path)
                except OSError as e:
                    conn.close()
                    if not waiting:
                        log.info("no frontend at %s (%s); retrying every %g s at most",
                                 self._where, e.strerror or e, DIAL_MAX_RETRY,
                                 extra={"fields": self._log_fields})
                        waiting = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, DIAL_MAX_RETRY)
                    continue
                except BaseException:
                    conn.close()
                    raise
                delay, waiting = DIAL_FIRST_RETRY, False
                await self._serve_connection(loop, conn)
                if self._stopping:
                    return
        except asyncio.CancelledError:
            if not self._stopping:
                raise

    async def _serve_connection(self, loop, conn: socket.socket) -> None:
        """One frontend: its conversation runs in a control thread of its own (see the module
        docstring); the event loop only waits for it, so a device whose queues take long to
        stop (storage that does not answer) never stalls accepting, signals, reloads or the
        other devices' frontends."""
        self.connections += 1
        peer = _peer_description(conn)
        conn.setblocking(False)
        protocol = None
        try:
            label = f"connection {self.connections}"
            protocol = BackendProtocol(self._device(), limits=self.limits,
                                       name=f"{self.name}: {label}" if self.name else label,
                                       on_queue=self._queue_observer(loop))
        except BaseException:
            conn.close()
            raise
        self.protocol = protocol
        self.peer = peer
        log.info("frontend connected (%s)", peer, extra={"fields": self._log_fields})
        self._notify_connection(True)
        stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        name = f"pyvhost-ctl-{self.name or 'dev'}"[:15]
        done = _in_thread(loop, name, self._conversation, conn, protocol, stop_fd)
        try:
            try:
                reason = await asyncio.shield(done)
            except asyncio.CancelledError:
                os.eventfd_write(stop_fd, 1)        # the thread ends the conversation, tears down
                try:
                    reason = await done             # in-flight I/O completes (bounded)
                except asyncio.CancelledError:
                    pass                            # cancelled again: stop waiting
                raise
        finally:
            if done.done() and not done.cancelled():
                reason = done.result() if done.exception() is None else \
                    f"internal error: {done.exception()}"
                log.info("frontend disconnected (%s): %s", peer, reason,
                         extra={"fields": self._log_fields})
                os.close(stop_fd)
            self.protocol = None
            self.peer = None
            self._notify_connection(False)

    def _queue_observer(self, loop: asyncio.AbstractEventLoop):
        """BackendProtocol's on_queue for this connection: it runs in the control thread, so
        the server's on_queue is called on the loop instead."""
        if self._on_queue is None:
            return None

        def observed(index: int, state: str, avail: int) -> None:
            try:
                loop.call_soon_threadsafe(self._notify_queue, index, state, avail)
            except RuntimeError:            # the loop is closed: nobody is listening
                pass
        return observed

    def _notify_queue(self, index: int, state: str, avail: int) -> None:
        try:
            self._on_queue(self, index, state, avail)
        except Exception:
            log.exception("queue callback failed")

    def _notify_connection(self, connected: bool) -> None:
        if self._on_connection is not None:
            try:
                self._on_connection(self, connected)
            except Exception:
                log.exception("connection callback failed")

    @staticmethod
    def _conversation(conn: socket.socket, protocol: BackendProtocol, stop_fd: int) -> str:
        """Control thread body: read exactly one header then one payload at a time (so fds
        attach to the right message), feed the protocol, send its replies; then tear down
        (stop the queues: in-flight I/O completes) and close the connection."""
        try:
            reason = Server._converse(conn, protocol, stop_fd)
        except Exception as e:                  # never lose the teardown below
            log.exception("connection failure")
            reason = f"internal error: {type(e).__name__}: {e}"
        try:
            protocol.connection_lost()
        except Exception:
            log.exception("connection cleanup failed")
        conn.close()
        return reason

    @staticmethod
    def _converse(conn: socket.socket, protocol: BackendProtocol, stop_fd: int) -> str:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        config_fd = protocol.device.config_event_fd()
        if config_fd >= 0:
            poller.register(config_fd, select.POLLIN)
        while True:
            ready = [fd for fd, _ in poller.poll()]
            if stop_fd in ready:
                return "stopped"
            if config_fd in ready:
                # the device's config changed (an RBD image resized): tell the frontend on the
                # backend channel (non-blocking, bounded: a frontend that does not read it
                # loses the message, never this thread)
                for msg in protocol.config_events():
                    try:
                        with socket.socket(fileno=os.dup(protocol.backend_req_fd)) as chan:
                            _send_all(chan, msg)
                    except OSError as e:
                        log.warning("config change not delivered: %s", e)
                if conn.fileno() not in ready:
                    continue
            for _ in range(READS_PER_WAKEUP):
                try:
                    data, fds, flags, _ = socket.recv_fds(conn, protocol.next_read_size, MAX_FDS,
                                                          socket.MSG_CMSG_CLOEXEC)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    return f"read error: {e}"
                if flags & socket.MSG_CTRUNC or not data:
                    for fd in fds:
                        os.close(fd)
                    return "file descriptors were truncated" if data else "EOF"
                try:
                    replies = protocol.receive(data, fds)
                except ProtocolClosed as e:
                    return f"protocol error: {e}"
                except Exception as e:     # BackendProtocol promises not to; never hang
                    log.exception("protocol failure")
                    return f"internal error: {type(e).__name__}: {e}"
                try:
                    for reply in replies:
                        _send_all(conn, reply)
                except OSError as e:
                    return f"write error: {e}"


async def serve(device_factory_or_device, *, socket_path: str | None = None,
                listen_fd: int | None = None, on_ready=None, **kw) -> None:
    """Serve frontends until stopped (`server.stop()`, task cancellation, SIGTERM via run).
    `on_ready(server)` is called with the Server once the socket listens; other keywords as
    Server."""
    server = Server(device_factory_or_device, socket_path=socket_path, listen_fd=listen_fd,
                    on_ready=on_ready, **kw)
    await server.serve_forever()


def default_loop_name() -> str:
    name = os.environ.get("PYVHOST_LOOP")
    if name:
        return name
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def new_event_loop(loop_name: str | None = None) -> asyncio.AbstractEventLoop:
    name = loop_name or default_loop_name()
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    if name == "asyncio":
        return asyncio.new_event_loop()
    raise ValueError(f"unknown event loop {name!r} (expected 'uvloop' or 'asyncio')")


@contextlib.contextmanager
def running_loop(loop_name: str | None = None, signals=None):
    """A fresh event loop (PYVHOST_LOOP, else uvloop when importable, else asyncio) set as the
    current one, with `signals` ({signum: callback(signum)}) installed as loop signal handlers
    where possible (only from the main thread); everything undone and the loop closed at exit."""
    name = loop_name or default_loop_name()
    loop = new_event_loop(name)
    log.debug("event loop: %s", name)
    installed = []
    try:
        asyncio.set_event_loop(loop)
        for signum, callback in (signals or {}).items():
            try:
                loop.add_signal_handler(signum, callback, signum)
                installed.append(signum)
            except (ValueError, RuntimeError, NotImplementedError):
                pass
        yield loop
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def run(coro_factory, loop_name: str | None = None):
    """Run `coro_factory()` to completion on the selected loop (see running_loop).  SIGTERM/
    SIGINT cancel it and run returns None (exit 0)."""
    signalled = []
    task = None

    def on_signal(signum):
        log.info("received %s, stopping", signal.Signals(signum).name)
        signalled.append(signum)
        task.cancel()

    with running_loop(loop_name, {signal.SIGTERM: on_signal, signal.SIGINT: on_signal}) as loop:
        task = loop.create_task(coro_factory())
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if signalled:
                return None
            raise
