"""A hostile or broken frontend against devices served in this process (issue 10), where the
test must look inside the backend: a net pair whose worker is abandoned (WorkerStuck) never
gets a second worker on its ring and leaves nothing attached to the switch, a failed queue
start leaves nothing behind, concurrent stops of one worker retire it once, a blk worker whose
io_uring_enter fails keeps waiting for its in-flight I/O, and a server stopped twice still
waits for its connection's teardown.  Real sockets, the vhost/testing frontends."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest

from devices.net import NetDevice
from protocols.vhost_user import FrontendReq, VringState
from vhost.device import QueueHandle, QueueWorkers, WorkerStuck
from vhost.server import Server
from vhost.testing.net import NetFrontend, make_frame

from inprocess import serving, wait_for

MAC_A = bytes.fromhex("020a00000001")
MAC_B = bytes.fromhex("020b00000002")
TIMEOUT = 10.0


class StopIgnored:
    """A worker that does not react to stop() (as one blocked in the kernel would), for as
    long as `hold` is set; everything else is the real worker's."""

    def __init__(self, worker, hold: threading.Event):
        self._w = worker
        self._hold = hold
        self._stopped = threading.Event()

    def run(self):
        self._w.run()

    def stop(self):
        self._stopped.set()
        if not self._hold.is_set():
            self._w.stop()

    def release(self):
        self._hold.clear()
        self._w.stop()

    def __getattr__(self, name):
        return getattr(self._w, name)


def _switch():
    from cython_ext.net import Switch
    return Switch("sw-test", 300.0)


def _stick_workers(dev: NetDevice, hold: threading.Event, made: list):
    real = dev.queues.start

    def start(key, worker, **kw):
        proxy = StopIgnored(worker, hold)
        made.append(proxy)
        return real(key, proxy, **kw)
    dev.queues.start = start


def _recv_frame(nf, frame, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in nf.recv_packets(1, timeout=max(0.1, deadline - time.monotonic())):
            if p.frame == frame:
                return True
    return False


@pytest.mark.parametrize("stuck_on", ["disconnect", "get_vring_base_tx"])
def test_stuck_net_worker_no_second_worker_and_next_connection_gets_rx(tmp_path, stuck_on):
    sw = _switch()
    a = NetDevice(pairs=1, mac=MAC_A, switch=sw, port_index=0, name="a")
    b = NetDevice(pairs=1, mac=MAC_B, switch=sw, port_index=1, name="b")
    a.stop_timeout = 0.3
    hold = threading.Event()
    hold.set()
    made: list[StopIgnored] = []
    _stick_workers(a, hold, made)
    sa, sb = tmp_path / "a.sock", tmp_path / "b.sock"
    try:
        with serving((a, sa), (b, sb)):
            fa = NetFrontend(sa, mac=MAC_A, timeout=TIMEOUT).connect()
            wait_for(lambda: a.queues.running() == [0], "a's pair worker")
            if stuck_on == "get_vring_base_tx":
                # the frontend stops the tx queue: its worker does not stop (stuck) ...
                fa.call(FrontendReq.GET_VRING_BASE, VringState.build(dict(index=1, num=0)))
            fa._release()                                 # ... and the frontend goes away
            wait_for(lambda: not a.port.rx_active(0), "a's rx queue detached")
            # the abandoned worker is the only one ever started on that ring
            wait_for(lambda: a.queues.stuck, "a's worker abandoned")
            assert a.queues.running() == [] and len(made) == 1
            hold.clear()                                  # later workers stop normally
            # a new connection: rx attached to its own ring, a new tx worker, traffic flows
            with NetFrontend(sa, mac=MAC_A, timeout=TIMEOUT) as fa2, \
                    NetFrontend(sb, mac=MAC_B, timeout=TIMEOUT) as fb:
                wait_for(lambda: a.port.rx_active(0), "a's new rx queue attached")
                frame = make_frame(100, dst=MAC_A, src=MAC_B, seq=1)
                fb.send(frame)
                assert _recv_frame(fa2, frame), "the new connection gets no rx"
                back = make_frame(90, dst=MAC_B, src=MAC_A, seq=2)
                fa2.send(back)
                assert _recv_frame(fb, back)
    finally:
        for p in made:
            p.release()


def test_failed_net_queue_start_leaves_nothing_attached(tmp_path):
    """All or nothing at the device: a start that fails (here: a tx base beyond the 16-bit
    index, which the protocol now refuses before the device sees it) records nothing and
    leaves the pair running as before."""
    sw = _switch()
    a = NetDevice(pairs=1, mac=MAC_A, switch=sw, port_index=0, name="a")
    sa = tmp_path / "a.sock"
    with serving((a, sa)):
        with NetFrontend(sa, mac=MAC_A, timeout=TIMEOUT) as fa:
            wait_for(lambda: a.queues.running() == [0], "pair worker")
            rx = a._handles[0]
            tx = a._handles[1]
            # stop both (as GET_VRING_BASE would), then start rx again and tx with a bad base
            a.stop_queue(1)
            a.stop_queue(0)
            assert not a.port.rx_active(0)
            bad_tx = QueueHandle(**{**tx.__dict__, "last_avail_idx": 0x10000})
            a.start_queue(0, rx)
            assert a.port.rx_active(0)
            with pytest.raises((OverflowError, ValueError)):
                a.start_queue(1, bad_tx)
            assert 1 not in a._handles and a.port.rx_active(0)      # rx kept, tx not recorded
            # and the failing queue being the rx queue: nothing attached
            a.stop_queue(0)
            bad_rx = QueueHandle(**{**rx.__dict__, "last_avail_idx": 0x10000})
            with pytest.raises((OverflowError, ValueError)):
                a.start_queue(0, bad_rx)
            assert 0 not in a._handles and not a.port.rx_active(0)
            a.start_queue(0, rx)
            a.start_queue(1, tx)
            assert a.queues.running() == [0]


class _SlowWorker:
    def __init__(self):
        self.stopped = threading.Event()
        self.closes = 0

    def run(self):
        self.stopped.wait(TIMEOUT)
        time.sleep(0.2)                     # finishing in-flight work

    def stop(self):
        self.stopped.set()

    def close(self):
        self.closes += 1

    def counters(self):
        return dict(requests=5)


class _Dev:
    num_queues = 1
    stop_timeout = 5.0
    abandoned = 0
    device_type = "test"
    name = "dev"


def test_concurrent_stops_of_one_worker_retire_it_once():
    qw = QueueWorkers(_Dev(), "t")
    w = _SlowWorker()
    qw.start(0, w)
    results, errors = [], []

    def stopper():
        try:
            results.append(qw.stop(0))
        except KeyError as e:
            errors.append(e)
    threads = [threading.Thread(target=stopper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == [w] and len(errors) == 1
    assert w.closes == 1                                   # its fds released once, not twice
    assert qw.counters()[0]["requests"] == 5               # counted once


def test_blk_worker_waits_for_inflight_io_despite_enter_errors(tmp_path):
    from vhost.testing.ringrig import Rig
    from protocols import virtio_blk as vb
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    rig = Rig(str(img), use_io_uring=True)
    try:
        rig.worker.inject_enter_errors(1 << 30)       # the kernel refuses every enter ...
        rig.start()
        heads = [rig.request(vb.T_IN, 8 * k, 4096) for k in range(8)]
        rig.vq.kick()
        wait_for(lambda: rig.worker.stats()["inflight"] == 8, "requests popped")
        stopper = threading.Thread(target=rig.worker.stop)
        stopper.start()
        time.sleep(0.3)
        # ... so the worker must still be waiting: returning now would let the ring and the
        # guest memory go while the kernel may still complete into them
        assert rig.thread.is_alive(), "the worker returned with requests in flight"
        rig.worker.inject_enter_errors(0)               # the kernel recovers
        rig.thread.join(TIMEOUT)
        assert not rig.thread.is_alive()
        rig.thread = None
        st = rig.worker.stats()
        assert st["inflight"] == 0 and st["completed"] == 8 and st["enter_errors"] > 0
        assert all(rig.status_of(s) == vb.S_OK for _, s, _ in heads)
        stopper.join(TIMEOUT)
    finally:
        rig.close()


class _SlowTeardown:
    """A device whose reset (the connection's teardown) takes a while, as in-flight I/O to
    slow storage does."""
    num_queues = 1
    max_queue_size = 256
    stop_timeout = 10.0
    abandoned = 0
    device_type = "test"

    def __init__(self):
        self.reset_done = threading.Event()

    def features(self):
        return 1 << 32

    def protocol_features(self):
        return 0

    def ack_features(self, f):
        pass

    def start_queue(self, i, h):
        pass

    def stop_queue(self, i):
        return 0

    def reset(self):
        time.sleep(0.5)
        self.reset_done.set()


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_server_stopped_twice_still_waits_for_the_teardown(tmp_path, loop_name):
    from vhost.server import running_loop
    dev = _SlowTeardown()
    path = str(tmp_path / "s.sock")
    srv = Server(dev, socket_path=path, name="slow")
    state = {}

    async def main():
        task = asyncio.get_running_loop().create_task(srv.serve_forever())
        while not os.path.exists(path):
            await asyncio.sleep(0.01)
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        while srv.protocol is None:
            await asyncio.sleep(0.01)
        srv.stop()
        # the service's shutdown stops every server, then awaits each device's _stop, which
        # stops its server again: by then the first cancel has reached the teardown wait
        await asyncio.sleep(0.1)
        srv.stop()
        await task
        state["reset_done_when_stopped"] = dev.reset_done.is_set()
        c.close()

    with running_loop(loop_name) as loop:
        loop.run_until_complete(main())
    assert state["reset_done_when_stopped"], "serve_forever returned before the teardown ended"
