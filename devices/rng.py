"""rng.py: the virtio-rng device type (virtio 1.2 §5.4, an entropy source): one requestq whose
device-writable buffers the worker fills from getrandom(2), with an optional guest-facing rate
limit like QEMU's virtio-rng `max-bytes` / `period`.

Owns: its option table (`pyvhost-rng` options, `type = "rng"` keys), its feature set, and the
RngQueueWorker of its queue (cython_ext/rng.pyx, on the shared worker runtime).  Everything else
(command line, TOML keys, capabilities, sockets, worker start/stop, counters, metrics) comes from
the framework.  Must not: import the server, the service or the command line.
"""
from __future__ import annotations

import logging

from protocols import virtio
from vhost.device import Device, QueueHandle, QueueWorkers
from vhost.devtype import DeviceType, Option

log = logging.getLogger("pyvhost.rng")


class RngDevice(Device):
    device_type = "rng"
    dirty_log = True          # every guest write is logged while migrating (ring.pyx)
    packed_ring = True        # ring.pyx serves packed virtqueues too
    num_queues = 1                   # §5.4.2: requestq only

    def __init__(self, *, max_bytes: int = 0, period_ms: int = 1000,
                 max_queue_size: int = 1024):
        self.max_bytes = max_bytes
        self.period_ms = period_ms
        self.max_queue_size = max_queue_size
        self.queues = QueueWorkers(self, "pyvhost-rng")

    def features(self) -> int:
        # §5.4.3: no device-specific feature bits
        return virtio.F_VERSION_1 | virtio.F_RING_INDIRECT_DESC | virtio.F_RING_EVENT_IDX

    def start_queue(self, index: int, queue: QueueHandle) -> None:
        from cython_ext.rng import RngQueueWorker
        self.queues.start(index, RngQueueWorker(
            index, queue.size, queue.desc, queue.avail, queue.used, queue.last_avail_idx,
            queue.memory.table_bytes(), queue.kick_fd, queue.call_fd,
            event_idx=queue.event_idx, indirect=queue.indirect, signal_call=queue.signal_call,
            max_bytes=self.max_bytes, period_ms=self.period_ms, log=queue.log,
            packed=queue.packed))

    def stop_queue(self, index: int) -> int:
        return self.queues.stop(index).last_avail

    def queue_counters(self) -> dict[int, dict[str, int]]:
        """requests = buffers returned; bytes_written = entropy bytes written into guest
        memory; errors = buffers returned empty because their chain was bad (a device-readable
        descriptor, an address outside guest memory, ...), plus 1 per corrupt avail ring;
        inflight and dropped are 0; kicks / notifications / broken as for every device."""
        return self.queues.counters()

    def reset(self) -> None:
        self.queues.stop_all()


OPTIONS = (
    Option("queue-size", "int", 1024, pow2=True, metavar="N",
           help="largest virtqueue size accepted (power of two, default 1024)"),
    Option("max-bytes", "int", 0, range=(0, 1 << 62), metavar="BYTES",
           help="give the guest at most this many bytes per period (0: no limit; QEMU's "
                "virtio-rng max-bytes)"),
    Option("period", "int", 1000, range=(1, 3_600_000), metavar="MS",
           help="the rate limit's period in milliseconds (default 1000)"),
)


class RngType(DeviceType):
    name = "rng"
    program = "pyvhost-rng"
    description = "vhost-user-rng backend (entropy from getrandom)"
    capabilities = {"type": "rng", "features": []}
    options = OPTIONS
    logger = "pyvhost.rng"

    def from_command_line(self, values, sockets):
        return [dict(values, name="rng", socket=sockets[0] if sockets else None)], {}

    def build(self, spec, env):
        return RngDevice(max_bytes=spec.max_bytes, period_ms=spec.period,
                         max_queue_size=spec.queue_size)

    def describe(self, spec):
        limit = f"{spec.max_bytes} bytes per {spec.period} ms" if spec.max_bytes else "no limit"
        return f"rng getrandom ({limit})"


DEVICE = RngType()
