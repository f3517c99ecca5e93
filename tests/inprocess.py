"""inprocess.py: backends served *in this process* for the integration tests that look inside
them (counters, workers): `serving((device, socket), ...)` runs a vhost.server.Server per
device on one asyncio loop in a thread, as the service does.

It lives here, not in vhost/testing, because it imports vhost.server (the backend), which the
frontend package must never import.  Not a test module: test modules import it, never each
other, and bench/ never imports it.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
import time

from vhost.server import Server, run

TIMEOUT = 10.0


def wait_for(cond, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(*pairs):
    """Serve each (device, socket path) with its own vhost.server.Server, all on one asyncio
    loop in a thread (as the service does); yields the Servers."""
    servers = [Server(dev, socket_path=str(path)) for dev, path in pairs]
    errors: list[BaseException] = []

    async def main():
        await asyncio.gather(*(s.serve_forever() for s in servers))

    def body():
        try:
            run(main, loop_name="asyncio")
        except BaseException as e:          # noqa: BLE001 - reported to the test
            errors.append(e)

    t = threading.Thread(target=body, name="test-event-loop", daemon=True)
    t.start()

    def listening():
        if errors:
            raise errors[0]
        return all(os.path.exists(p) and stat.S_ISSOCK(os.stat(p).st_mode) for _, p in pairs)

    try:
        wait_for(listening, "sockets listening")
        yield servers
    finally:
        for s in servers:
            s.stop()
        t.join(TIMEOUT)
        assert not t.is_alive(), "event loop thread did not stop"
        assert not errors, errors
