"""control.py: the control API's transport -- newline-delimited JSON-RPC 2.0 on a Unix socket
(`control-socket` in [service], `pyvhost serve --control-socket PATH`), as QSD has QMP and SPDK
its JSON-RPC socket.  One request object per line, one response object per line; notifications
(`{"method": "event", ...}`) are written to clients that subscribed.

Owns: binding the socket (0600, the service's socket-group if set: the same rules as device
sockets), framing and the JSON-RPC error objects (-32700 parse error, -32600 invalid request,
-32601 unknown method, -32602 bad params, -32000 a method's refusal), the caller's credentials
(SO_PEERCRED) logged with every call, one task per client with a capped line length (a longer
line is answered with an error and skipped), and the
event fan-out with a bounded queue per subscriber (a subscriber that does not read is
disconnected, never slows the service).
Must not: know devices or the service (the methods are callables it is given), let one client's
malformed request or slow reading affect another client, or raise into the event loop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from typing import Any, Awaitable, Callable

from .server import ServerError, _bind_unix

log = logging.getLogger("pyvhost.control")

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602
INTERNAL_ERROR, REFUSED = -32603, -32000
MAX_LINE = 1 << 20          # one request; a device table is a few hundred bytes
EVENT_BACKLOG = 1024        # events queued for one subscriber before it is dropped


class RpcError(Exception):
    """A method's refusal: becomes the JSON-RPC error object (code REFUSED unless given)."""

    def __init__(self, message: str, code: int = REFUSED, data: Any = None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


Method = Callable[[dict, "Caller"], Any | Awaitable[Any]]


class Caller:
    """Who is calling (SO_PEERCRED) and, once it subscribed, its event queue."""

    def __init__(self, pid: int, uid: int, gid: int):
        self.pid, self.uid, self.gid = pid, uid, gid
        self.events: asyncio.Queue | None = None

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


def _credentials(sock) -> Caller:
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
    except (OSError, AttributeError):
        pid = uid = gid = -1
    return Caller(pid, uid, gid)


def _error(rid, code: int, message: str, data: Any = None) -> dict:
    err = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": rid}


class ControlServer:
    def __init__(self, path: str, methods: dict[str, Method], group: str | None = None):
        self.path = path
        self.methods = dict(methods)
        self.methods.setdefault("subscribe", self._subscribe)
        self.group = group
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()
        self._subscribers: set[Caller] = set()

    async def start(self) -> None:
        try:
            listener, _ = _bind_unix(self.path, 0o600, self.group)
        except ServerError as e:
            raise OSError(f"control-socket: {e}") from None
        listener.setblocking(False)
        self._server = await asyncio.start_unix_server(self._client, sock=listener,
                                                       limit=MAX_LINE)
        log.info("control API on %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        for t in list(self._clients):
            t.cancel()
        for t in list(self._clients):
            try:
                await t
            except BaseException:
                pass

    @property
    def subscribed(self) -> bool:
        """Whether any client subscribed to events."""
        return bool(self._subscribers)

    def publish(self, event: str, **fields) -> None:
        """An event to every subscriber (never blocks: a full queue drops that subscriber)."""
        note = {"jsonrpc": "2.0", "method": "event", "params": dict(event=event, **fields)}
        for c in list(self._subscribers):
            try:
                c.events.put_nowait(note)
            except asyncio.QueueFull:
                log.warning("control client %s does not read its events: disconnected", c)
                self._subscribers.discard(c)
                while not c.events.empty():
                    c.events.get_nowait()
                c.events.put_nowait(None)        # its pump closes the connection

    def _subscribe(self, params: dict, caller: Caller):
        if caller.events is None:
            caller.events = asyncio.Queue(EVENT_BACKLOG)
        self._subscribers.add(caller)
        return {"subscribed": True}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients.add(task)
        caller = _credentials(writer.get_extra_info("socket"))
        sender = None
        lock = asyncio.Lock()

        async def send(obj) -> None:
            async with lock:
                writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
                await writer.drain()

        async def pump() -> None:
            while True:
                note = await caller.events.get()
                if note is None:
                    writer.close()
                    return
                await send(note)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:           # longer than MAX_LINE: answered, skipped to its end
                    await send(_error(None, INVALID_REQUEST, f"request longer than {MAX_LINE} "
                                                             f"bytes"))
                    while True:
                        try:
                            tail = await reader.readline()
                        except ValueError:   # readline dropped another MAX_LINE of it
                            continue
                        break
                    if not tail:
                        return
                    continue
                if not line:
                    return
                if not line.strip():
                    continue
                reply = await self._handle(line, caller)
                if reply is not None:
                    await send(reply)
                if caller.events is not None and sender is None:
                    sender = asyncio.get_running_loop().create_task(pump())
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:                    # never into the loop: log, close this client
            log.exception("control client %s", caller)
        finally:
            self._subscribers.discard(caller)
            if sender is not None:
                sender.cancel()
            writer.close()
            self._clients.discard(task)

    async def _handle(self, line: bytes, caller: Caller) -> dict | None:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            log.info("control call from %s: not JSON", caller)
            return _error(None, PARSE_ERROR, f"parse error: {e}")
        if not isinstance(req, dict):
            return _error(None, INVALID_REQUEST, "one request object per line (no batches)")
        rid = req.get("id")
        method, params = req.get("method"), req.get("params", {})
        if req.get("jsonrpc") != "2.0" or not isinstance(method, str) \
                or not isinstance(rid, (str, int, type(None))) or isinstance(rid, bool):
            return _error(rid if isinstance(rid, (str, int)) else None, INVALID_REQUEST,
                          'a request needs "jsonrpc": "2.0", a string "method" and an id')
        notification = "id" not in req
        if not isinstance(params, dict):
            return None if notification else _error(rid, INVALID_PARAMS,
                                                    "params must be an object")
        fn = self.methods.get(method)
        who = {"fields": {"method": method, "uid": caller.uid, "pid": caller.pid}}
        log.info("control call %s from %s", method, caller, extra=who)
        if fn is None:
            return None if notification else _error(rid, METHOD_NOT_FOUND,
                                                    f"unknown method {method!r}",
                                                    sorted(self.methods))
        try:
            result = fn(params, caller)
            if asyncio.iscoroutine(result):
                result = await result
        except RpcError as e:
            log.info("control call %s from %s refused: %s", method, caller, e.message, extra=who)
            return None if notification else _error(rid, e.code, e.message, e.data)
        except Exception as e:                # a bug: the client gets an error, not a hang
            log.exception("control call %s from %s failed", method, caller, extra=who)
            return None if notification else _error(rid, INTERNAL_ERROR,
                                                    f"internal error: {e}")
        return None if notification else {"jsonrpc": "2.0", "result": result, "id": rid}
