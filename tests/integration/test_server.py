"""vhost/server.py over real Unix sockets, under asyncio and uvloop: replies, fds, garbage and
reconnect, socket file handling, an inherited listening fd, SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from protocols import virtio
from protocols import vhost_user as vu
from protocols.vhost_user import FrontendReq as R, ProtocolFeature as PF
from vhost.device import Device
from vhost.server import ServerError, Server, run, serve

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FEATURES = virtio.F_VERSION_1 | virtio.F_RING_EVENT_IDX


class FakeDevice(Device):
    num_queues = 2

    def __init__(self):
        self.running = {}
        self.resets = 0

    def features(self):
        return FEATURES

    def start_queue(self, index, queue):
        self.running[index] = queue

    def stop_queue(self, index):
        return self.running.pop(index).last_avail_idx

    def reset(self):
        self.resets += 1


class ServerThread:
    """serve() on its own loop in a thread, through run() as the CLI uses it."""

    def __init__(self, loop_name, device=None, **kw):
        self.device = device or FakeDevice()
        self.ready = threading.Event()
        self.server: Server | None = None
        self.error: BaseException | None = None

        def on_ready(server):
            self.server = server
            self.ready.set()

        def main():
            try:
                run(lambda: serve(self.device, on_ready=on_ready, **kw), loop_name=loop_name)
            except BaseException as e:          # noqa: BLE001 - reported to the test
                self.error = e
                self.ready.set()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "server did not become ready"
        if self.error:
            raise self.error

    def stop(self):
        if self.server is not None:
            self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "server did not stop"


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "vhost.sock")


@pytest.fixture
def server(loop_name, sock_path):
    s = ServerThread(loop_name, socket_path=sock_path)
    yield s
    s.stop()


def connect(path):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(path)
    return c


def recv_exact(c, n):
    data = b""
    while len(data) < n:
        chunk = c.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def request(c, req, payload=b"", flags=vu.VERSION, fds=()):
    data = vu.build_message(req, payload, flags)
    if fds:
        socket.send_fds(c, [data], list(fds))
    else:
        c.sendall(data)


def reply(c):
    h = vu.Header.parse(recv_exact(c, vu.HEADER_SIZE))
    return h.request, h.flags, recv_exact(c, h.size)


def get_u64(c, req):
    request(c, req)
    r, flags, body = reply(c)
    assert (r, flags, len(body)) == (req, vu.VERSION | vu.FLAG_REPLY, 8)
    return struct.unpack("<Q", body)[0]


def hung_up(c):
    """The server closed the connection (a reset when our garbage was left unread)."""
    try:
        return c.recv(100) == b""
    except ConnectionResetError:
        return True


def wait_for(cond, timeout=5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_get_features_and_protocol_features(server, sock_path):
    with connect(sock_path) as c:
        assert get_u64(c, R.GET_FEATURES) == FEATURES | vu.VHOST_USER_F_PROTOCOL_FEATURES
        pf = get_u64(c, R.GET_PROTOCOL_FEATURES)
        assert pf & PF.REPLY_ACK and pf & PF.CONFIG
        assert get_u64(c, R.GET_QUEUE_NUM) == 2


def test_fds_and_acks_over_the_socket(server, sock_path):
    with connect(sock_path) as c:
        request(c, R.SET_PROTOCOL_FEATURES, vu.u64(PF.REPLY_ACK))
        call = os.eventfd(0)
        # fds on the header, and a second message in the same send: they belong to the first
        data = (vu.build_message(R.SET_VRING_CALL, vu.u64(1), vu.VERSION | vu.FLAG_NEED_REPLY)
                + vu.build_message(R.GET_FEATURES))
        socket.send_fds(c, [data], [call])
        os.close(call)
        assert reply(c) == (R.SET_VRING_CALL, vu.VERSION | vu.FLAG_REPLY, vu.u64(0))
        assert reply(c)[0] == R.GET_FEATURES
        q = server.server.protocol.queue(1)
        assert q.call_fd >= 0 and q.signal_call
        # a payload trickled in pieces
        m = vu.build_message(R.GET_CONFIG, vu.Config.build(dict(offset=0, size=4, flags=0,
                                                                 payload=bytes(4))))
        for i in range(0, len(m), 5):
            c.sendall(m[i:i + 5])
            time.sleep(0.002)
        r, flags, body = reply(c)
        assert r == R.GET_CONFIG and len(body) == 16


def test_garbage_disconnects_and_next_connection_works(server, sock_path):
    with connect(sock_path) as c:
        assert get_u64(c, R.GET_FEATURES)
        c.sendall(b"\xff" * 64)
        assert hung_up(c)
    assert wait_for(lambda: server.device.resets >= 1)
    with connect(sock_path) as c:
        assert get_u64(c, R.GET_PROTOCOL_FEATURES)
        assert server.server.connections == 2


def test_eof_then_reconnect(server, sock_path):
    for _ in range(3):
        with connect(sock_path) as c:
            assert get_u64(c, R.GET_FEATURES)
    assert wait_for(lambda: server.device.resets == 3)


def test_one_connection_at_a_time(server, sock_path):
    with connect(sock_path) as first:
        assert get_u64(first, R.GET_FEATURES)
        second = connect(sock_path)                    # waits in the backlog
        request(second, R.GET_FEATURES)
        second.settimeout(0.2)
        with pytest.raises(socket.timeout):
            second.recv(1)
        second.settimeout(5)
    assert reply(second)[0] == R.GET_FEATURES           # served once the first one left
    second.close()


def test_socket_mode_0600_and_removed_on_stop(loop_name, sock_path):
    s = ServerThread(loop_name, socket_path=sock_path)
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    s.stop()
    assert not os.path.exists(sock_path)


def test_stop_while_connected(loop_name, sock_path):
    s = ServerThread(loop_name, socket_path=sock_path)
    c = connect(sock_path)
    assert get_u64(c, R.GET_FEATURES)
    s.stop()
    assert hung_up(c)
    assert s.device.resets == 1
    c.close()


def test_regular_file_is_refused(loop_name, sock_path):
    with open(sock_path, "w") as f:
        f.write("not a socket")
    with pytest.raises(ServerError, match="not a socket"):
        run(lambda: serve(FakeDevice(), socket_path=sock_path), loop_name=loop_name)
    with open(sock_path) as f:
        assert f.read() == "not a socket"


def test_stale_socket_is_replaced(loop_name, sock_path):
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(sock_path)
    old.close()                                       # the file stays behind
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    s = ServerThread(loop_name, socket_path=sock_path)
    try:
        with connect(sock_path) as c:
            assert get_u64(c, R.GET_FEATURES)
    finally:
        s.stop()


def test_live_socket_is_not_stolen(loop_name, sock_path):
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(sock_path)
    live.listen(1)
    try:
        with pytest.raises(ServerError, match="listening"):
            run(lambda: serve(FakeDevice(), socket_path=sock_path), loop_name=loop_name)
    finally:
        live.close()


def test_inherited_listening_fd(loop_name, sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    fd = listener.detach()                            # the server owns it now, as with --fd
    s = ServerThread(loop_name, listen_fd=fd)
    try:
        with connect(sock_path) as c:
            assert get_u64(c, R.GET_FEATURES)
        with connect(sock_path) as c:
            assert get_u64(c, R.GET_MAX_MEM_SLOTS) == 32
    finally:
        s.stop()
    with pytest.raises(OSError):
        os.fstat(fd)                                  # closed at stop


def test_inherited_fd_must_be_listening(loop_name):
    a, b = socket.socketpair()
    try:
        with pytest.raises(ServerError, match="not listening"):
            run(lambda: serve(FakeDevice(), listen_fd=a.fileno()), loop_name=loop_name)
        os.fstat(a.fileno())                          # not closed behind our back
    finally:
        a.close()
        b.close()


def test_exactly_one_address():
    with pytest.raises(ValueError):
        Server(FakeDevice())
    with pytest.raises(ValueError):
        Server(FakeDevice(), socket_path="/tmp/x", listen_fd=3)


def test_device_factory_per_connection(loop_name, sock_path):
    made = []

    def factory():
        made.append(FakeDevice())
        return made[-1]
    s = ServerThread(loop_name, device=factory, socket_path=sock_path)
    try:
        for _ in range(2):
            with connect(sock_path) as c:
                assert get_u64(c, R.GET_FEATURES)
        assert wait_for(lambda: len(made) == 2 and all(d.resets == 1 for d in made))
    finally:
        s.stop()


SIGTERM_SCRIPT = textwrap.dedent("""
    import logging, sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    logging.basicConfig(level=logging.INFO)
    from test_server import FakeDevice
    from vhost.server import run, serve
    run(lambda: serve(FakeDevice(), socket_path={path!r}), loop_name={loop!r})
    print("clean exit", flush=True)
""")


def test_sigterm_exits_cleanly(loop_name, sock_path):
    script = SIGTERM_SCRIPT.format(root=ROOT, tests=HERE, path=sock_path,
                                   loop=loop_name)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: os.path.exists(sock_path), 20), proc.stderr.read()
        with connect(sock_path) as c:
            assert get_u64(c, R.GET_FEATURES)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "clean exit" in out
    assert "frontend connected" in err and "frontend disconnected" in err
    assert not os.path.exists(sock_path)


class SlowResetDevice(FakeDevice):
    """reset() (run at every disconnect) blocks until released: a device whose queues take
    long to stop, e.g. in-flight I/O on storage that does not answer."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def reset(self):
        self.entered.set()
        assert self.release.wait(30)
        super().reset()


def test_a_slow_teardown_does_not_stall_other_devices(loop_name, tmp_path):
    """Two devices served by one event loop (as `pyvhost serve` does): while device A's
    disconnect is stuck in its teardown, device B still accepts a frontend and answers it, and
    A's server still stops cleanly once A's teardown finishes."""
    import asyncio
    slow, fast = SlowResetDevice(), FakeDevice()
    pa, pb = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    servers = [Server(slow, socket_path=pa), Server(fast, socket_path=pb)]
    ready = []
    listening = threading.Event()

    def on_ready(server):
        ready.append(server)
        if len(ready) == len(servers):
            listening.set()

    async def main():
        await asyncio.gather(*(s.serve_forever() for s in servers))

    for s in servers:
        s._on_ready = on_ready
    t = threading.Thread(target=run, args=(main, loop_name), daemon=True)
    t.start()
    assert listening.wait(10)
    try:
        with connect(pa) as a:
            assert get_u64(a, R.GET_FEATURES) & FEATURES == FEATURES
        assert slow.entered.wait(10), "A's teardown did not start"
        with connect(pb) as b:                     # 5 s socket timeout
            assert get_u64(b, R.GET_FEATURES) & FEATURES == FEATURES
            assert get_u64(b, R.GET_PROTOCOL_FEATURES) != 0
        assert not slow.release.is_set() and slow.resets == 0    # A is still stuck meanwhile
    finally:
        slow.release.set()
        for s in servers:
            s.stop()
        t.join(15)
    assert not t.is_alive()
    assert slow.resets == 1 and fast.resets == 1
