"""blk.py: the virtio-blk device (virtio 1.2 §5.2) on a raw image file or block device.

Owns: opening the backing store (O_DIRECT when the file system allows, buffered otherwise, with
a log line), the feature set and config space, and one BlkQueueWorker thread per started queue.
Request semantics run in cython_ext/blk.pyx; this module never sees a request.  `main` wires the
CLI to the server and stays thin.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import sys
import threading

from protocols import virtio
from protocols import virtio_blk as vb
from protocols.vhost_user import ProtocolFeature
from vhost.device import CounterTotals, Device, QueueHandle, WorkerStuck, join_worker

from cython_ext.blk import BlkQueueWorker, io_uring_available

log = logging.getLogger("pyvhost.blk")

# Linux caps a request at seg_max data segments; 126 + header + status = 128 descriptors, what
# QEMU's own virtio-blk advertises for a 128-entry queue.  ring.pxd's MAX_SEGS leaves room.
SEG_MAX = 126
# Largest single segment (SIZE_MAX).  Linux's default max_segment_size is 64 KiB; we accept more.
SIZE_MAX = 1 << 20
# One discard / write-zeroes range per request (the worker handles exactly one segment) of at
# most 16 MiB, so one fallocate never runs for long; the same limits qemu-storage-daemon 7.2
# advertises, which keeps the side-by-side tests' seeded workloads identical.
MAX_DISCARD_SECTORS = 32768
MAX_WRITE_ZEROES_SECTORS = 32768


def create_sparse(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    log.info("created sparse image %s (%d bytes)", path, size)


class BlkDevice(Device):
    device_type = "block"

    def __init__(self, path: str | None, *, read_only: bool = False, num_queues: int = 1,
                 max_queue_size: int = 1024, serial: str | None = None,
                 use_io_uring: bool = True, direct: bool = True, null_size: int = 0,
                 poll_us: float = 0.0):
        self.path = path
        self.read_only = read_only
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.writeback = 1
        self.poll_us = poll_us
        self._workers: dict[int, tuple[BlkQueueWorker, threading.Thread]] = {}
        self._stuck: list = []        # abandoned (worker, thread): never freed
        # guards _workers and _totals: the event loop starts/stops workers while a metrics
        # thread reads queue_counters
        self._lock = threading.Lock()
        self._totals = CounterTotals(num_queues)
        self._acked = 0
        if path is None:
            # --null: no backing store (benchmarks of the queue machinery, like QSD's null-co)
            if null_size < vb.SECTOR_SIZE:
                raise ValueError("a null device needs --size")
            self.capacity = null_size // vb.SECTOR_SIZE
            self.fd_direct = self.fd_buffered = -1
            self.serial = (serial or "pyvhost-null").encode()[:vb.ID_BYTES]
            self.use_io_uring = False
            log.info("null device: %d sectors, no I/O", self.capacity)
            return
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd_buffered = os.open(path, flags)
        try:
            st = os.fstat(self.fd_buffered)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ValueError(f"{path}: not a regular file or block device")
            size = os.lseek(self.fd_buffered, 0, os.SEEK_END)
            if size < vb.SECTOR_SIZE:
                raise ValueError(f"{path}: image is smaller than one sector ({size} bytes)")
        except BaseException:
            os.close(self.fd_buffered)
            raise
        self.capacity = size // vb.SECTOR_SIZE
        self.fd_direct = self.fd_buffered
        if direct:
            try:
                self.fd_direct = os.open(path, flags | os.O_DIRECT)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    self.close()
                    raise
                log.info("%s: O_DIRECT not supported by the file system; using buffered I/O",
                         path)
        else:
            log.info("%s: buffered I/O (O_DIRECT disabled)", path)
        if serial is None:
            serial = "pyvhost-" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
        self.serial = serial.encode()[:vb.ID_BYTES]
        self.use_io_uring = use_io_uring
        if use_io_uring:
            ok, why = io_uring_available()
            if not ok:
                log.error("io_uring is not available (%s): every queue falls back to "
                          "SYNCHRONOUS preadv/pwritev, one request at a time", why)
                self.use_io_uring = False
        else:
            log.warning("io_uring disabled: SYNCHRONOUS preadv/pwritev, one request at a time")

    @classmethod
    def open(cls, path: str | None, *, create_size: int | None = None, **kw) -> "BlkDevice":
        if path is None:
            return cls(None, null_size=create_size or 0, **kw)
        if not os.path.exists(path):
            if create_size is None:
                raise FileNotFoundError(f"{path}: no such image (use --size to create one)")
            create_sparse(path, create_size)
        return cls(path, **kw)

    # -- Device interface ------------------------------------------------------------------------

    def features(self) -> int:
        f = (virtio.F_VERSION_1 | virtio.F_RING_INDIRECT_DESC | virtio.F_RING_EVENT_IDX
             | vb.F_SEG_MAX | vb.F_SIZE_MAX | vb.F_BLK_SIZE | vb.F_FLUSH | vb.F_CONFIG_WCE
             | vb.F_TOPOLOGY | vb.F_MQ)
        if self.read_only:
            f |= vb.F_RO
        else:
            f |= vb.F_DISCARD | vb.F_WRITE_ZEROES
        return f

    def protocol_features(self) -> ProtocolFeature:
        return (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.RESET_DEVICE
                | ProtocolFeature.STATUS)

    def ack_features(self, features: int) -> None:
        self._acked = features

    def config_bytes(self) -> bytes:
        return vb.Config.build(dict(
            capacity=self.capacity, size_max=SIZE_MAX, seg_max=SEG_MAX,
            cylinders=0, heads=0, sectors=0, blk_size=vb.SECTOR_SIZE,
            physical_block_exp=0, alignment_offset=0, min_io_size=1, opt_io_size=0,
            writeback=self.writeback, num_queues=self.num_queues,
            max_discard_sectors=0 if self.read_only else MAX_DISCARD_SECTORS,
            max_discard_seg=0 if self.read_only else 1,
            discard_sector_alignment=1,
            max_write_zeroes_sectors=0 if self.read_only else MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg=0 if self.read_only else 1,
            write_zeroes_may_unmap=0 if self.read_only else 1))

    def get_config(self, offset: int, size: int) -> bytes:
        cfg = self.config_bytes()
        if offset < 0 or size < 0 or offset + size > max(len(cfg), 256):
            raise ValueError(f"config read {offset}+{size} out of range")
        return (cfg + bytes(256))[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        # Only the writeback byte is driver-writable (§5.2.5, VIRTIO_BLK_F_CONFIG_WCE).
        if offset == vb.WRITEBACK_OFFSET and len(data) == 1 and data[0] in (0, 1):
            self.writeback = data[0]
            with self._lock:
                for w, _ in self._workers.values():
                    w.set_write_through(not self.writeback)
            log.info("guest set the write cache to %s",
                     "writeback" if self.writeback else "writethrough (every write O_DSYNC)")
            return
        raise ValueError(f"config write {offset}+{len(data)} is not allowed")

    def start_queue(self, index: int, queue: QueueHandle) -> None:
        with self._lock:
            if index in self._workers:
                raise RuntimeError(f"queue {index} already running")
            w = BlkQueueWorker(
                index, queue.size, queue.desc, queue.avail, queue.used, queue.last_avail_idx,
                queue.memory.table_bytes(), queue.kick_fd, queue.call_fd,
                self.fd_direct, self.fd_buffered, self.read_only, self.capacity, self.serial,
                event_idx=queue.event_idx, indirect=queue.indirect,
                signal_call=queue.signal_call, use_io_uring=self.use_io_uring,
                max_discard_sectors=MAX_DISCARD_SECTORS,
                max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS, poll_us=self.poll_us,
                write_through=not self.writeback)
            t = threading.Thread(target=w.run, name=f"pyvhost-blk-q{index}", daemon=True)
            self._workers[index] = (w, t)
            self._totals.clear_broken(index)     # a new ring: the old one's state is gone
            t.start()
        log.debug("queue %d started (size %d, avail %d, event_idx %s)", index, queue.size,
                  queue.last_avail_idx, queue.event_idx)

    def stop_queue(self, index: int) -> int:
        with self._lock:
            entry = self._workers.get(index)
        if entry is None:
            raise KeyError(index)
        w, t = entry
        w.stop()
        try:
            join_worker(t, self.stop_timeout, f"queue {index}")
        except WorkerStuck as e:
            # keep the worker (its C context, io_uring and iovecs) alive forever: it may still
            # complete requests into guest memory
            with self._lock:
                del self._workers[index]
                self._stuck.append(entry)
                self.abandoned += 1
            log.error("%s", e)
            raise
        last = w.last_avail
        final = w.stats()
        # The worker stays listed until its final counters are in the totals, both under the
        # lock, so a scrape never sees the queue's counters dip.
        with self._lock:
            self._totals.retire(index, self._counters_of(final))
            del self._workers[index]
        w.close()
        log.debug("queue %d stopped at avail %d: %s", index, last, final)
        return last

    @staticmethod
    def _counters_of(st: dict) -> dict[str, int]:
        return dict(requests=st["completed"], bytes_read=st["bytes_read"],
                    bytes_written=st["bytes_written"],
                    errors=st["failed"] + st["avail_corrupt"], inflight=st["inflight"],
                    kicks=st["kicks"], notifications=st["notifies"], dropped=0,
                    broken=int(st["broken"]))

    def queue_counters(self) -> dict[int, dict[str, int]]:
        """Device.queue_counters for virtio-blk, per virtqueue:
        requests = requests completed (used-ring entries, failed ones included);
        bytes_read = bytes read from the backing store into guest memory (IN);
        bytes_written = bytes written to the backing store (OUT; not discard/write-zeroes);
        errors = requests completed with IOERR or UNSUPP or returned without a usable status
        byte (bad chains), plus 1 per corrupt avail ring; inflight = requests in the io_uring
        now; dropped = 0; broken = the queue's ring was found corrupt (kept while the queue is
        stopped; cleared when it is started again or the device is reset)."""
        with self._lock:
            live = dict(self._workers)
            out = {}
            # The C structs are read while we hold both the lock (no worker is retired under
            # us) and a reference to each worker (its struct is never freed while read).
            for index in range(self.num_queues):
                entry = live.get(index)
                out[index] = self._totals.view(
                    index, self._counters_of(entry[0].stats()) if entry else None)
        return out

    def running_queues(self) -> list[int]:
        return sorted(self._workers)

    def reset(self) -> None:
        for index in list(self._workers):
            try:
                self.stop_queue(index)
            except WorkerStuck:
                pass                            # logged; the other queues still stop
        with self._lock:
            self._totals.clear_broken()
        # writeback is NOT reset: QEMU does not repeat the guest's CONFIG_WCE choice when it
        # reconnects, and the guest keeps the value it set; forgetting a write-through choice
        # would silently drop its durability.  A new guest reads the value with GET_CONFIG.

    def close(self) -> None:
        self.reset()
        if self._stuck:
            return              # abandoned workers may still use the image fds: leave them open
        if self.fd_direct != self.fd_buffered and self.fd_direct >= 0:
            os.close(self.fd_direct)
        if self.fd_buffered >= 0:
            os.close(self.fd_buffered)
        self.fd_direct = self.fd_buffered = -1


def main(argv=None) -> int:
    """pyvhost-blk: QEMU's backend program conventions; the command line becomes a one-device
    configuration run by vhost/service.py (the same runtime as `pyvhost serve`)."""
    from vhost import cli, config, service

    args = cli.parse_blk(argv)
    if cli.prologue(args, cli.BLK_CAPABILITIES):
        return 0
    name = "null" if args.null else (os.path.basename(args.blk_file) or "blk")
    spec = config.BlockSpec(
        name=name, socket=args.socket_path, listen_fd=args.fd, blk_file=args.blk_file,
        read_only=args.read_only, num_queues=args.num_queues, queue_size=args.queue_size,
        size=args.size, serial=args.serial, buffered=args.buffered,
        no_io_uring=args.no_io_uring, null=args.null, poll_us=args.poll_us)
    conf = config.Config(path=None, devices=(spec,), service=config.ServiceSpec(
        metrics_address=args.metrics_address, log_level=args.log_level, loop=args.loop))
    return service.run_single(conf, "pyvhost-blk", args.loop)


if __name__ == "__main__":
    sys.exit(main())
