"""device.py: the interface every device in devices/ implements, and the QueueHandle the
protocol hands a device when a virtqueue starts.

Modelled on rust-vmm's VhostUserBackend and libvhost-user's VuDevIface: small, with defaults.
Owns no I/O and no protocol state; the protocol (vhost/protocol.py) decides *when* queues start
and stop, the device decides *how* (its Cython worker threads).  Also owns the per-queue counter
vocabulary (COUNTER_KEYS, what each means: Device.queue_counters) and `CounterTotals`, which
keeps those counters cumulative across worker restarts; vhost/metrics.py only reads them.
"""
from __future__ import annotations

import abc
import logging
import threading
from dataclasses import dataclass, field

from protocols.vhost_user import ProtocolFeature
from protocols import virtio

from .memory import GuestMemory

# The per-queue counters every device reports (Device.queue_counters says what they mean).
COUNTER_KEYS = ("requests", "bytes_read", "bytes_written", "errors", "inflight", "kicks",
                "notifications", "dropped", "broken")
# Values "now" rather than running totals: never summed over stopped workers.
GAUGE_KEYS = frozenset({"inflight", "broken"})


def zero_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTER_KEYS, 0)


class CounterTotals:
    """What the stopped workers of each queue counted, so that a device's counters are cumulative
    for the device object's lifetime: a Cython worker's counters start from zero, and workers
    are replaced at every GET_VRING_BASE, memory-table change, reset and reconnect, but a
    Prometheus counter must never go backwards.

    `retire(index, final)` adds a stopped worker's final running totals and latches `broken`
    (the ring is still broken while the queue is stopped); `clear_broken(index)` forgets the
    latch (the frontend set the ring up again, or the device was reset); `view(index, live)`
    is the retired totals plus the live worker's counters (None: no worker now).
    Not thread-safe by itself: the device calls it under its own lock."""

    def __init__(self, num_queues: int):
        self._totals = {i: zero_counters() for i in range(num_queues)}

    def retire(self, index: int, final: dict[str, int]) -> None:
        t = self._totals.setdefault(index, zero_counters())
        for k, v in final.items():
            if k == "broken":
                t[k] = int(bool(t[k] or v))
            elif k not in GAUGE_KEYS:
                t[k] += int(v)

    def clear_broken(self, index: int | None = None) -> None:
        for i in (list(self._totals) if index is None else (index,)):
            self._totals.setdefault(i, zero_counters())["broken"] = 0

    def view(self, index: int, live: dict[str, int] | None = None) -> dict[str, int]:
        out = dict(self._totals.get(index) or zero_counters())
        out["inflight"] = 0
        if live:
            for k, v in live.items():
                if k == "broken":
                    out[k] = int(bool(out[k] or v))
                elif k == "inflight":
                    out[k] = int(v)
                else:
                    out[k] += int(v)
        return out


@dataclass
class QueueHandle:
    """What a queue worker needs, all validated by the protocol before start_queue."""
    index: int
    size: int                 # queue size (power of two)
    desc: int                 # host address of the descriptor table
    avail: int                # host address of the avail ring
    used: int                 # host address of the used ring
    last_avail_idx: int       # where to resume (SET_VRING_BASE / previous GET_VRING_BASE)
    kick_fd: int              # eventfd the frontend kicks; -1 = polling (NOFD)
    call_fd: int              # eventfd we signal; -1 = no interrupts
    err_fd: int = -1
    features: int = 0         # negotiated virtio features
    memory: GuestMemory = field(default_factory=GuestMemory)
    signal_call: bool = False  # write call_fd once on start (lost-interrupt recovery)
    # Dirty logging (VHOST_F_LOG_ALL negotiated and a log set by SET_LOG_BASE): the workers
    # mark every guest page they write, the used ring's too when log_used_gpa >= 0.
    log_addr: int = 0         # host address of the log bitmap; 0: not logging
    log_size: int = 0         # its size in bytes
    log_used_gpa: int = -1    # guest address of the used ring (SET_VRING_ADDR's log address)
    # Inflight tracking (INFLIGHT_SHMFD negotiated and an inflight fd set): this queue's
    # QueueRegionSplit, where the worker marks what it popped and has not completed.
    inflight_addr: int = 0    # host address; 0: not tracking
    inflight_size: int = 0    # bytes of this queue's part of the region

    @property
    def log(self):
        """What the Cython workers take as `log`: None, or (address, size, used-ring gpa)."""
        if not self.log_addr:
            return None
        return (self.log_addr, self.log_size, self.log_used_gpa)

    @property
    def inflight(self):
        """What the Cython workers take as `inflight`: None, or (address, size)."""
        if not self.inflight_addr:
            return None
        return (self.inflight_addr, self.inflight_size)

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED: desc/avail/used are the descriptor ring and the driver and
        device event suppression structures; last_avail_idx carries wrap counters."""
        return bool(self.features & virtio.F_RING_PACKED)

    @property
    def event_idx(self) -> bool:
        return bool(self.features & virtio.F_RING_EVENT_IDX)

    @property
    def indirect(self) -> bool:
        return bool(self.features & virtio.F_RING_INDIRECT_DESC)


# How long stop_queue waits for a worker to finish its in-flight requests before giving up on it
# (config stop-timeout).  A worker blocked on storage that never answers (a hung NFS server, a
# dead multipath device) must not hang the control plane, SIGTERM included, forever.
DEFAULT_STOP_TIMEOUT = 10.0


class WorkerStuck(RuntimeError):
    """A queue worker did not stop within the stop timeout and was abandoned.  It may still read
    and write guest memory and signal its eventfds, so whoever raised this keeps the worker's
    state alive, and the protocol keeps the memory mapped and the fds open (leaked, not reused)."""


def join_worker(thread, timeout: float | None, what: str) -> None:
    """Join a stopped worker thread, waiting at most `timeout` seconds (None: forever)."""
    thread.join(timeout)
    if thread.is_alive():
        raise WorkerStuck(f"{what}: the worker did not finish its in-flight I/O within "
                          f"{timeout:g} s; abandoning it")


class QueueWorkers:
    """The worker threads of one device: start, stop bounded by the device's stop_timeout,
    abandon a worker that does not stop (WorkerStuck: it is kept alive forever, with everything
    it may touch), and keep the device's counters cumulative (CounterTotals) across worker
    restarts.  Workers are keyed by what the device starts them for (blk, rng: the queue index;
    net: the queue pair) and count into one virtqueue index each (`queue`).

    A worker is any object with run() (the thread body, GIL released), stop() (ask it to finish
    in-flight requests and return), optionally close() (release its fds once run() returned),
    and whatever `counters_of(worker)` reads (default: worker.counters(), a dict of
    COUNTER_KEYS).  Thread-safe: the control thread starts and stops queues while a metrics
    thread reads counters()."""

    def __init__(self, device: "Device", thread_name: str, *, counters_of=None,
                 key_name: str = "queue"):
        self._device = device
        self._thread_name = thread_name
        self._key_name = key_name
        self._counters_of = counters_of or (lambda w: w.counters())
        self._workers: dict[int, tuple[object, threading.Thread, int]] = {}
        self._stuck: list = []               # abandoned (worker, thread, queue): never freed
        self._lock = threading.Lock()
        # one stop at a time: the control thread (disconnect) and the service (device removal)
        # may stop the same worker; the second must find it gone, not retire its counters and
        # close its fds a second time
        self._stop_lock = threading.Lock()
        self._totals = CounterTotals(device.num_queues)
        self._log = logging.getLogger(f"pyvhost.{device.device_type}")

    def __contains__(self, key: int) -> bool:
        return key in self._workers

    def start(self, key: int, worker, *, queue: int | None = None,
              clear_broken: bool = True) -> None:
        """Run `worker` in a new thread; its counters count for virtqueue `queue` (default:
        `key`).  `clear_broken`: a new ring, so the old one's broken latch goes."""
        queue = key if queue is None else queue
        with self._lock:
            if key in self._workers:
                raise RuntimeError(f"{self._key_name} {key} already running")
            t = threading.Thread(target=worker.run, daemon=True,
                                 name=f"{self._thread_name}-{self._key_name[0]}{key}")
            # all or nothing: a thread that cannot be created (the process is at its limit)
            # leaves no entry behind, so nobody waits for or "stops" a worker that never ran
            t.start()
            self._workers[key] = (worker, t, queue)
            if clear_broken:
                self._totals.clear_broken(queue)

    def stop(self, key: int):
        """Stop `key`'s worker and wait for it (at most stop_timeout); its final counters go to
        the totals.  Returns the stopped worker (to read e.g. its last avail index)."""
        with self._stop_lock:
            return self._stop(key)

    def _stop(self, key: int):
        with self._lock:
            entry = self._workers.get(key)
        if entry is None:
            raise KeyError(key)
        w, t, queue = entry
        w.stop()
        try:
            join_worker(t, self._device.stop_timeout, f"{self._label()}{self._key_name} {key}")
        except WorkerStuck as e:
            # keep the worker (its C context, io_uring, iovecs) alive forever: it may still
            # complete requests into guest memory
            with self._lock:
                del self._workers[key]
                self._stuck.append(entry)
                self._device.abandoned += 1
            self._log.error("%s", e)
            raise
        final = self._counters_of(w)
        # The worker stays listed until its final counters are in the totals, both under the
        # lock, so a scrape never sees the queue's counters dip.
        with self._lock:
            self._totals.retire(queue, final)
            del self._workers[key]
        close = getattr(w, "close", None)
        if close is not None:
            close()
        self._log.debug("%s%s %d stopped: %s", self._label(), self._key_name, key, final)
        return w

    def _label(self) -> str:
        name = getattr(self._device, "name", None)
        return f"{name}: " if name else ""

    def stop_all(self) -> None:
        """Stop every worker (reset); a stuck one is logged and the others still stop."""
        for key in sorted(self._workers):
            try:
                self.stop(key)
            except (WorkerStuck, KeyError):
                pass
        self.clear_broken()

    def retire(self, queue: int, final: dict[str, int]) -> None:
        """Add counters kept outside a worker (net: a detached rx queue's) to the totals."""
        with self._lock:
            self._totals.retire(queue, final)

    def clear_broken(self, queue: int | None = None) -> None:
        with self._lock:
            self._totals.clear_broken(queue)

    def for_each(self, fn) -> None:
        """fn(worker) for every running worker, under the lock (e.g. a config change that
        applies to running queues)."""
        with self._lock:
            for w, _, _ in self._workers.values():
                fn(w)

    def counters(self, live: dict[int, dict] | None = None) -> dict[int, dict[str, int]]:
        """Per virtqueue 0..num_queues-1: the totals plus the live worker's counters, or plus
        `live[index]` for a queue whose counters the device keeps elsewhere (net rx)."""
        with self._lock:
            # The C structs are read while we hold both the lock (no worker is retired under
            # us) and a reference to each worker (its struct is never freed while read).
            now = dict(live or {})
            for w, _, queue in self._workers.values():
                now[queue] = self._counters_of(w)
            return {i: self._totals.view(i, now.get(i))
                    for i in range(self._device.num_queues)}

    def running(self) -> list[int]:
        return sorted(self._workers)

    def live(self) -> list:
        """The running workers (for device-specific counters; read them while holding the
        list: a worker object is never freed while referenced)."""
        with self._lock:
            return [w for w, _, _ in self._workers.values()]

    @property
    def stuck(self) -> bool:
        return bool(self._stuck)


class Device(abc.ABC):
    """A virtio device served over vhost-user."""

    num_queues: int = 1
    stop_timeout: float | None = DEFAULT_STOP_TIMEOUT
    abandoned: int = 0          # workers given up on (WorkerStuck)
    max_queue_size: int = 1024
    device_type: str = "unknown"
    # Whether the workers log their guest writes when the handle carries a log
    # (QueueHandle.log): the protocol then offers VHOST_F_LOG_ALL and LOG_SHMFD, which QEMU
    # needs to live-migrate the guest.  A device that writes guest memory any other way must
    # leave this False.
    dirty_log: bool = False
    # Whether the workers track popped-but-not-completed heads in the frontend's inflight
    # region when the handle carries one (QueueHandle.inflight): the protocol then offers
    # INFLIGHT_SHMFD, and a restarted backend resubmits what the killed one left in flight.
    # Only for a device whose requests may be done twice (blk: reads and writes of the same
    # bytes); never for one that consumes guest buffers (net rx).
    inflight_tracking: bool = False
    # Whether the workers run packed rings (VIRTIO_F_RING_PACKED, ring.pyx; `packed=` of the
    # Cython workers): the protocol then offers the feature bit.
    packed_ring: bool = False

    @abc.abstractmethod
    def features(self) -> int:
        """Virtio feature bits offered (VHOST_USER_F_PROTOCOL_FEATURES is added by the protocol)."""

    def protocol_features(self) -> ProtocolFeature:
        return (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.RESET_DEVICE
                | ProtocolFeature.STATUS)

    def ack_features(self, features: int) -> None:
        """The frontend's SET_FEATURES (may be repeated; never disables rings)."""

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def set_config(self, offset: int, data: bytes) -> None:
        raise ValueError("config space is read-only")

    @abc.abstractmethod
    def start_queue(self, index: int, queue: QueueHandle) -> None:
        """Start serving queue `index` (spawn its worker)."""

    @abc.abstractmethod
    def stop_queue(self, index: int) -> int:
        """Stop the worker for `index`, completing in-flight requests first; return the next
        avail index to process (the value GET_VRING_BASE reports)."""

    def config_event_fd(self) -> int:
        """An fd that becomes readable when the device's config may have changed under the
        guest (an RBD image resized), or -1 (never).  The control thread of the connection
        polls it and then calls config_changed()."""
        return -1

    def config_changed(self) -> bool:
        """After config_event_fd() was readable: drain it, re-read the store; True when the
        guest-visible config changed (the protocol then sends CONFIG_CHANGE_MSG)."""
        return False

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (net devices with protocol feature NET_MTU)."""
        raise ValueError("this device has no MTU")

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: announce `mac` on the device's network (net devices, protocol feature RARP)."""
        raise ValueError("this device cannot send RARP")

    def queue_counters(self) -> dict[int, dict[str, int]]:
        """Per-virtqueue counters for monitoring: for every queue index 0..num_queues-1, started
        or not, a dict with exactly the COUNTER_KEYS, all ints:

        requests       requests (blk) or frames (net) the queue completed
        bytes_read     bytes the device read: blk from the backing store into guest memory
                       (virtio IN), net from guest memory (tx frames: Ethernet frame bytes,
                       the virtio_net_hdr not counted)
        bytes_written  bytes the device wrote: blk to the backing store (OUT), net into guest
                       memory (rx frames, likewise without the header)
        errors         requests or buffers that failed on this queue, plus corrupt avail rings
        inflight       requests submitted to the backing store and not yet completed (gauge)
        kicks          kick eventfd wake-ups the queue's worker consumed
        notifications  call eventfd signals the queue's worker sent to the frontend
        dropped        frames dropped (net); 0 for blk
        broken         1 while the queue's ring is marked broken (corrupt avail ring) (gauge)

        Everything but the two gauges is cumulative for the lifetime of the device object
        (across worker restarts and frontend reconnects).  Devices spell out the details in
        their own queue_counters.  Called from a monitoring thread while the event loop starts
        and stops workers: implementations must not race with that (take the device's lock).
        This default reports zeros."""
        return {i: zero_counters() for i in range(self.num_queues)}

    def reset(self) -> None:
        """Device reset (RESET_DEVICE / RESET_OWNER / disconnect); queues are already stopped."""

    def stats(self) -> dict[str, int]:
        """The counters logged in one `stats` line when the device stops: by default the
        queue counters summed over the queues."""
        out: dict[str, int] = {}
        for q in self.queue_counters().values():
            for k, v in q.items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        """Release what the device holds (backing store, tap, switch port); queues are
        stopped.  Called once, when the service removes the device."""
