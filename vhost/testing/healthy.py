"""healthy.py: a `pyvhost serve` with healthy tenants next to the devices a hostile frontend
attacks, and the healthy load that must keep flowing meanwhile (issue 10).

Owns: `HostileService` -- writes the config (block `healthy-blk`, `victim-blk` and `idle-blk`;
switch `sw` with the net ports `healthy-a`, `healthy-b`, `victim`, `peer` and `idle-net`; the
`idle-*` devices are healthy and kept free for probes, since a device serves one frontend at a
time; `stop-timeout` 3 s; extra [service] keys on request), starts it with vhost.testing.serve.Serve (READY=1 awaited), runs
the healthy load and stops everything (SIGTERM, bounded wait; the process is killed if it does
not exit); the loads, each a bounded thread that counts completed operations and the longest
time without one (`Load.mark` opens a scenario window, `Load.window` reads it): `BlkLoad` (4 KiB
write + read-verify on one blk device), `NetPairLoad` (two switch ports that learn each other's
MAC, then exchange unicast frames both ways, retransmitting after a loss), `PeerFlood` (a
well-behaved port that sends broadcast or unicast frames into the switch as fast as they are
taken, or at a given rate, reusing a fixed set of tx buffers);
probes (`get_features_time`: how long a NEW connection waits for GET_FEATURES;
`blk_roundtrip`: a NEW blk frontend writes and reads back 4 KiB); /proc readings of the service
(`proc_fd_count`, `proc_vm_size`, `proc_alive`).
Must not: judge the results (it reports numbers and errors; the tests assert); run anything
unbounded (every load stops on an Event, after `max_seconds` and after `max_ops`; every wait
has a timeout); import tests, devices, vhost.server, vhost.service or vhost.config (the service
is a program; its config is written here as text).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from protocols import virtio_blk as vblk
from protocols import virtio_net as vnet
from protocols.vhost_user import FrontendReq
from vhost.testing.backends import short_tmpdir
from vhost.testing.blk import Frontend
from vhost.testing.net import BROADCAST, NetFrontend, make_frame
from vhost.testing.raw import RawFrontend
from vhost.testing.serve import Serve

BLK_DEVICES = ("healthy-blk", "victim-blk", "idle-blk")
NET_PORTS = ("healthy-a", "healthy-b", "victim", "peer", "idle-net")
SWITCH = "sw"
MAC_A = bytes.fromhex("02a000000001")
MAC_B = bytes.fromhex("02b000000002")
MAC_VICTIM = bytes.fromhex("02c000000003")
MAC_PEER = bytes.fromhex("02d000000004")
STOP_TIMEOUT = 3            # [service] stop-timeout: a stuck queue costs at most this per stop
SERVICE_EXIT_TIMEOUT = 20.0
LOAD_MAX_SECONDS = 120.0    # no load runs longer than this, whatever the test does
READY_TIMEOUT = 30.0
OP_TIMEOUT = 10.0           # a single healthy operation that takes longer is an error


# -- /proc ------------------------------------------------------------------------------------------

def proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def proc_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_vm_size(pid: int) -> int:
    """VmSize of `pid` in bytes (its whole address space, mapped or not touched)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmSize for pid {pid}")


# -- loads ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """What a load did since `mark()`: completed operations, the longest time without a
    completion (counting from the mark and up to now), the window's length, and the error
    that ended the load (None while it runs fine)."""
    ops: int
    max_stall: float
    seconds: float
    error: str | None
    alive: bool


class Load(threading.Thread):
    """A bounded loop of operations in a daemon thread.  Subclasses implement `_setup`, `_op`
    (one complete, verified operation; raise on anything wrong) and `_teardown`."""

    def __init__(self, name: str, *, max_seconds: float = LOAD_MAX_SECONDS,
                 max_ops: int = 10_000_000):
        super().__init__(name=name, daemon=True)
        self.max_seconds = max_seconds
        self.max_ops = max_ops
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.ops = 0
        self.error: str | None = None
        self._lock = threading.Lock()
        self._mark = time.monotonic()
        self._last = self._mark
        self._win_ops = 0
        self._win_stall = 0.0

    # window bookkeeping

    def mark(self) -> None:
        with self._lock:
            self._mark = self._last = time.monotonic()
            self._win_ops = 0
            self._win_stall = 0.0

    def _done_one(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.ops += 1
            self._win_ops += 1
            self._win_stall = max(self._win_stall, now - self._last)
            self._last = now

    def window(self) -> Window:
        now = time.monotonic()
        with self._lock:
            stall = max(self._win_stall, now - self._last)
            return Window(self._win_ops, stall, now - self._mark, self.error, self.is_alive())

    # the thread

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            self._setup()
            self.mark()
            self.ready.set()
            while not self.stop_event.is_set() and self.ops < self.max_ops \
                    and time.monotonic() < deadline:
                self._op()
                self._done_one()
        except BaseException as e:      # noqa: BLE001 - reported through .error
            self.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        finally:
            self.ready.set()
            try:
                self._teardown()
            except BaseException as e:  # noqa: BLE001
                if self.error is None and not self.stop_event.is_set():
                    self.error = f"teardown: {type(e).__name__}: {e}"

    def start_and_wait(self, timeout: float = 30.0) -> None:
        self.start()
        if not self.ready.wait(timeout):
            raise TimeoutError(f"{self.name}: not ready within {timeout}s")
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed to start: {self.error}")

    def halt(self, timeout: float = 15.0) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def _setup(self) -> None:
        pass

    def _op(self) -> None:
        raise NotImplementedError

    def _teardown(self) -> None:
        pass

    def release(self) -> None:
        """Drop whatever the load still holds without talking to the backend (after halt)."""


class BlkLoad(Load):
    """4 KiB write + read-back-and-compare on blk device socket `path`, cycling over 1024
    blocks; one operation = one verified write/read pair."""

    def __init__(self, path, **kw):
        super().__init__("healthy-blk-load", **kw)
        self.path = str(path)
        self.fe: Frontend | None = None

    def _setup(self) -> None:
        self.fe = Frontend(self.path, timeout=OP_TIMEOUT)
        self.fe.connect()

    def _op(self) -> None:
        k = self.ops % 1024
        data = os.urandom(4096)
        st = self.fe.write(k * 8, data)
        if st != vblk.S_OK:
            raise RuntimeError(f"write of block {k}: status {st}")
        st, back = self.fe.read(k * 8, 4096)
        if st != vblk.S_OK or back != data:
            raise RuntimeError(f"read of block {k}: status {st}, data "
                               f"{'ok' if back == data else 'differs'}")

    def _teardown(self) -> None:
        if self.fe is not None:
            if self.stop_event.is_set() and self.error is None:
                self.fe.close()
            else:
                self.fe._release()       # the backend may be gone: nothing to ask it


class NetPairLoad(Load):
    """Two ports of the switch, `a` and `b`: each first sends a broadcast so that the switch
    learns its MAC, then one operation = a unicast frame a -> b and one b -> a, each received
    and compared byte for byte.  A frame lost to congestion (another port's flood fills the
    receiver's rx ring) is sent again after `resend` seconds; other frames are ignored."""

    def __init__(self, path_a, path_b, *, mac_a: bytes = MAC_A, mac_b: bytes = MAC_B,
                 resend: float = 0.5, **kw):
        super().__init__("healthy-net-load", **kw)
        self.paths = (str(path_a), str(path_b))
        self.macs = (mac_a, mac_b)
        self.resend = resend
        self.a: NetFrontend | None = None
        self.b: NetFrontend | None = None
        self.resent = 0
        self.ignored = 0

    def _setup(self) -> None:
        self.a = NetFrontend(self.paths[0], mac=self.macs[0], timeout=OP_TIMEOUT)
        self.a.connect()
        self.b = NetFrontend(self.paths[1], mac=self.macs[1], timeout=OP_TIMEOUT)
        self.b.connect()
        # learning: a broadcast from each (flooded to every port), then make sure each side
        # sees the other's, so the unicast frames below are switched, not flooded
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            self._exchange(src, dst, make_frame(64, dst=BROADCAST, src=src.mac, seq=0xFFFFFF))

    def _exchange(self, src: NetFrontend, dst: NetFrontend, frame: bytes) -> None:
        deadline = time.monotonic() + OP_TIMEOUT
        resend_at = 0.0
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"frame {frame[14:22].hex()} from {src.mac.hex()} not "
                                   f"received by {dst.mac.hex()} within {OP_TIMEOUT}s "
                                   f"({self.resent} resent so far)")
            if now >= resend_at:
                if resend_at:
                    self.resent += 1
                src.send(frame)
                resend_at = now + self.resend
            pkts = dst.poll_rx() or dst.recv_packets(1, min(0.05, resend_at - now))
            for p in pkts:
                if p.frame == frame:
                    return
                self.ignored += 1

    def _op(self) -> None:
        seq = self.ops
        self._exchange(self.a, self.b, make_frame(128, dst=self.macs[1], src=self.macs[0],
                                                  seq=seq))
        self._exchange(self.b, self.a, make_frame(128, dst=self.macs[0], src=self.macs[1],
                                                  seq=seq))

    def _teardown(self) -> None:
        for fe in (self.a, self.b):
            if fe is None:
                continue
            if self.stop_event.is_set() and self.error is None:
                fe.close()
            else:
                fe._release()


class PeerFlood(Load):
    """A well-behaved port (`peer`) sending frames into the switch as fast as the backend takes
    them (or at most `rate` frames per second): `batch` frames of 60..1514 bytes to `dst`
    (BROADCAST by default: flooded to every port; or a learned unicast MAC), each in a tx
    buffer and descriptor of its own laid out once; one operation publishes the whole batch,
    kicks, and waits until every one came back used before publishing the same chains again
    (a driver reusing its tx buffers), so Python's cost per frame is a few avail-ring stores.
    Its own rx ring is drained and refilled as it goes.  `sent` counts frames.  After a clean
    halt `fe` stays connected (its other tx descriptors work as usual: `fe.send`)."""

    def __init__(self, path, *, mac: bytes = MAC_PEER, dst: bytes = BROADCAST,
                 rate: float = 0.0, batch: int = 64, **kw):
        super().__init__("peer-flood", **kw)
        self.path = str(path)
        self.mac = mac
        self.dst = dst
        self.rate = rate
        self.batch = batch
        self.fe: NetFrontend | None = None
        self.sent = 0
        self.frames: list[bytes] = []
        self._heads: list[int] = []
        self._next = 0.0

    def _setup(self) -> None:
        self.fe = NetFrontend(self.path, mac=self.mac, timeout=OP_TIMEOUT)
        self.fe.connect()
        vq = self.fe.queues[vnet.tx_queue(0)]
        if self.batch > vq.size // 2:
            raise ValueError(f"batch {self.batch} leaves too few of {vq.size} descriptors")
        self._heads = vq.reserve_descs(self.batch)
        hdr = bytes(self.fe.hdr_size)
        for k, d in enumerate(self._heads):
            frame = make_frame(60 + k * 37 % 1455, dst=self.dst, src=self.mac, seq=k)
            self.frames.append(frame)
            data = hdr + frame
            gpa = self.fe.mem.alloc(len(data), align=64)
            self.fe.mem.write(gpa, data)
            vq.write_desc(d, gpa, len(data), 0, 0)
        self._next = time.monotonic()

    def _op(self) -> None:
        vq = self.fe.queues[vnet.tx_queue(0)]
        target = (vq.avail_idx + len(self._heads)) & 0xFFFF
        vq.publish(self._heads)
        vq.kick(force=True)
        deadline = time.monotonic() + OP_TIMEOUT
        while vq.used_idx() != target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer: tx batch not completed in {OP_TIMEOUT}s: "
                                   f"{vq.describe()}")
            time.sleep(0.0002)
        vq.last_used_idx = target          # our own chains: nothing to release
        self.sent += len(self._heads)
        self.fe.poll_rx()
        if self.rate:
            self._next += len(self._heads) / self.rate
            delay = self._next - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            else:
                self._next = time.monotonic()

    def _teardown(self) -> None:
        if self.fe is not None and (not self.stop_event.is_set() or self.error is not None):
            self.fe._release()
        # on a clean stop the frontend stays connected for the caller (`fe`, then close())

    def release(self) -> None:
        if self.fe is not None:
            self.fe._release()


# -- probes ---------------------------------------------------------------------------------------

def get_features_time(path, timeout: float = 1.0) -> float:
    """Connect a NEW frontend to `path` and time its GET_FEATURES (seconds); raises
    (TimeoutError, VhostUserError) if no answer comes within `timeout`."""
    t0 = time.monotonic()
    fe = RawFrontend(path, timeout=timeout)
    try:
        fe._connect_socket()
        fe.call_u64(FrontendReq.GET_FEATURES)
        return time.monotonic() - t0
    finally:
        fe._release()


def blk_roundtrip(path, timeout: float = OP_TIMEOUT) -> tuple[int, bool]:
    """A NEW blk frontend on `path` writes 4 KiB at sector 64 and reads it back: (write
    status, data read back equal)."""
    data = os.urandom(4096)
    with Frontend(str(path), timeout=timeout) as fe:
        st = fe.write(64, data)
        st2, back = fe.read(64, 4096)
    return st if st != vblk.S_OK else st2, back == data


# -- the service --------------------------------------------------------------------------------

def hostile_config(tmp: Path, service: dict | None = None) -> str:
    """The config text: [service] (log-level info, stop-timeout 3 s, `service` keys added
    verbatim: {"max-guest-memory": '"1G"'}), the blk devices and the switch ports."""
    lines = ["[service]", 'log-level = "info"', f"stop-timeout = {STOP_TIMEOUT}"]
    lines += [f"{k} = {v}" for k, v in (service or {}).items()]
    out = "\n".join(lines) + "\n\n"
    for name in BLK_DEVICES:
        out += (f'[[device]]\nname = "{name}"\ntype = "block"\nsocket = "{tmp}/{name}.sock"\n'
                f'blk-file = "{tmp}/{name}.img"\nsize = "16M"\n\n')
    for name in NET_PORTS:
        out += (f'[[device]]\nname = "{name}"\ntype = "net"\nsocket = "{tmp}/{name}.sock"\n'
                f'switch = "{SWITCH}"\n\n')
    return out


class HostileService:
    """`pyvhost serve` with the devices of `hostile_config`, in a short temporary directory.

    `start()` starts it (READY=1) and the healthy loads (`blk_load`, `net_load`); `sock(name)`
    is a device's socket path; `pid`; `stop()` halts the loads and sends SIGTERM, returning the
    exit status (None if it had to be killed).  `close()` always leaves nothing behind."""

    def __init__(self, *, loop: str | None = None, service: dict | None = None,
                 loads: bool = True):
        self.tmp = short_tmpdir("pvhh")
        self.loop = loop
        self.service_keys = service
        self.with_loads = loads
        self.serve: Serve | None = None
        self.blk_load: BlkLoad | None = None
        self.net_load: NetPairLoad | None = None
        self.extra_loads: list[Load] = []
        self.returncode: int | None = None
        self.stop_seconds: float | None = None

    def sock(self, name: str) -> str:
        return str(self.tmp / f"{name}.sock")

    @property
    def pid(self) -> int:
        return self.serve.proc.pid

    @property
    def proc(self) -> subprocess.Popen:
        return self.serve.proc

    def start(self) -> "HostileService":
        conf = self.tmp / "hostile.toml"
        conf.write_text(hostile_config(self.tmp, self.service_keys))
        self.serve = Serve(self.tmp, conf, loop=self.loop)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:             # READY=1, or the process's early exit reported at once
            try:
                self.serve.notify.wait_for("READY", "1", timeout=0.2)
                break
            except TimeoutError:
                rc = self.serve.proc.poll()
                if rc is not None:
                    raise RuntimeError(f"pyvhost serve exited with status {rc} before READY=1:"
                                       f"\n{self.serve.log_text()}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pyvhost serve not READY within {READY_TIMEOUT}s:\n"
                                       f"{self.serve.log_text()}") from None
        # read the service's STATUS= updates (one per connect/disconnect) as systemd does
        self.serve.notify.start_draining()
        if self.with_loads:
            self.blk_load = BlkLoad(self.sock("healthy-blk"))
            self.net_load = NetPairLoad(self.sock("healthy-a"), self.sock("healthy-b"))
            self.blk_load.start_and_wait()
            self.net_load.start_and_wait()
        return self

    def loads(self) -> list[Load]:
        return [x for x in (self.blk_load, self.net_load) if x is not None]

    def mark(self) -> None:
        """Open a scenario window on every healthy load."""
        for ld in self.loads():
            ld.mark()

    def windows(self) -> dict[str, Window]:
        return {ld.name: ld.window() for ld in self.loads()}

    def alive(self) -> bool:
        return self.serve is not None and self.serve.proc.poll() is None

    def add_load(self, load: Load) -> Load:
        self.extra_loads.append(load)
        load.start_and_wait()
        return load

    def halt_loads(self) -> None:
        for ld in self.extra_loads + self.loads():
            ld.halt()

    def stop(self, timeout: float = SERVICE_EXIT_TIMEOUT) -> int | None:
        """Halt the loads, SIGTERM, wait at most `timeout`; the exit status (negative: killed
        by that signal; None: it did not exit in time and was killed)."""
        self.halt_loads()
        if self.serve is None:
            return None
        proc = self.serve.proc
        t0 = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.returncode = None
        self.stop_seconds = time.monotonic() - t0
        try:
            self.serve.stop(timeout=1)      # kills it if still there, closes log and listener
        except subprocess.TimeoutExpired:
            pass                            # killed
        return self.returncode

    def log_text(self) -> str:
        return self.serve.log_text() if self.serve is not None else ""

    def close(self) -> None:
        try:
            if self.serve is not None and self.serve.proc.poll() is None:
                self.stop(timeout=5)
            else:
                self.halt_loads()
                if self.serve is not None:
                    try:
                        self.serve.stop(timeout=1)
                    except subprocess.TimeoutExpired:
                        pass
        finally:
            for ld in self.extra_loads:
                if not ld.is_alive():
                    ld.release()
            shutil.rmtree(self.tmp, ignore_errors=True)
