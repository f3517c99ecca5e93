"""blk.py: the virtio-blk device type (virtio 1.2 §5.2) on a raw image file or block device, a
Ceph RBD image, or nothing (null).

Owns: its option table (the `pyvhost-blk` options and the `type = "block"` TOML keys), opening
the backing store (a file: O_DIRECT when the file system allows, buffered otherwise, with a log
line; RBD: one cluster connection and one open image per device, cython_ext/rbd.pyx), the
feature set and config space, and one BlkQueueWorker per started queue with that store's
engine (through the framework's QueueWorkers).  Request semantics run in cython_ext/blk.pyx; this module never sees
a request.  Must not: import the server, the service or the command line (the framework turns
the option table into those).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat

from protocols import virtio
from protocols import virtio_blk as vb
from protocols.vhost_user import ProtocolFeature
from vhost.device import Device, QueueHandle, QueueWorkers
from vhost.devtype import DeviceType, Option, OptionProblem

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
    dirty_log = True          # every guest write is logged while migrating (ring.pyx)
    inflight_tracking = True  # restarts resubmit what was in flight (ring.pyx, INFLIGHT_SHMFD)
    packed_ring = True        # ring.pyx serves packed virtqueues too (QEMU packed=on)

    def __init__(self, path: str | None, *, read_only: bool = False, num_queues: int = 1,
                 max_queue_size: int = 1024, serial: str | None = None,
                 use_io_uring: bool = True, direct: bool = True, null_size: int = 0,
                 poll_us: float = 0.0, rbd: str | None = None, ceph_conf: str | None = None,
                 ceph_id: str | None = None, keyring: str | None = None,
                 ceph_timeout: float = 30.0, nbd: str | None = None,
                 nbd_timeout: float = 60.0, nbd_connections: int = 4):
        self.path = path
        self.read_only = read_only
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.writeback = 1
        self.poll_us = poll_us
        self.queues = QueueWorkers(self, "pyvhost-blk")
        self._acked = 0
        self.rbd = None
        self.nbd = None
        if nbd is not None:
            self._open_nbd(nbd, nbd_timeout, nbd_connections, serial)
            return
        if rbd is not None:
            self._open_rbd(rbd, ceph_conf, ceph_id, keyring, ceph_timeout, serial)
            return
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
            from cython_ext.blk import io_uring_available
            ok, why = io_uring_available()
            if not ok:
                log.error("io_uring is not available (%s): every queue falls back to "
                          "SYNCHRONOUS preadv/pwritev, one request at a time", why)
                self.use_io_uring = False
        else:
            log.warning("io_uring disabled: SYNCHRONOUS preadv/pwritev, one request at a time")

    def _remote_store(self, what: str, store, serial: str | None) -> None:
        """The device's side of an RBD image or NBD export opened as `store`: its size, no
        file descriptors, a serial derived from `what` unless one is given."""
        if store.size < vb.SECTOR_SIZE:
            store.close()
            raise ValueError(f"{what}: smaller than one sector")
        self.capacity = store.size // vb.SECTOR_SIZE
        self.fd_direct = self.fd_buffered = -1
        self.use_io_uring = False
        if serial is None:
            serial = "pyvhost-" + hashlib.sha1(what.encode()).hexdigest()[:12]
        self.serial = serial.encode()[:vb.ID_BYTES]

    def _open_rbd(self, spec, conf, client_id, keyring, timeout, serial) -> None:
        try:
            from cython_ext.rbd import RbdImage
        except ImportError as e:
            raise OSError(f"rbd {spec}: this pyvhost was built without the Ceph RBD engine "
                          f"(install librbd-dev and librados-dev, then reinstall): {e}") from None
        self.rbd = RbdImage(spec, conf, client_id, keyring, timeout, self.read_only)
        self._remote_store(f"rbd {spec}", self.rbd, serial)
        log.info("rbd %s: %d bytes, client.%s%s", spec, self.rbd.size, client_id or "admin",
                 ", read-only" if self.read_only else "")

    def _open_nbd(self, uri, timeout, connections, serial) -> None:
        try:
            from cython_ext.nbd import NbdExport
        except ImportError as e:
            raise OSError(f"nbd {uri}: this pyvhost was built without the NBD engine (install "
                          f"libnbd-dev, then reinstall): {e}") from None
        self.nbd = NbdExport(uri, timeout, self.read_only, connections)
        self._remote_store(f"nbd {uri}", self.nbd, serial)
        n = connections if self.nbd.multi_conn else 1
        log.info("nbd %s: %d bytes, up to %d connection%s%s%s", uri, self.nbd.size, n,
                 "s" if n > 1 else "", "" if self.nbd.multi_conn else " (no multi-conn)",
                 "" if self.nbd.can_fua else "; no FUA: write-through writes are not forced")

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
            if self.nbd is not None:        # what the NBD server does not take, we do not offer
                f &= ~((0 if self.nbd.can_trim else vb.F_DISCARD)
                       | (0 if self.nbd.can_zero else vb.F_WRITE_ZEROES))
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
            self.queues.for_each(lambda w: w.set_write_through(not self.writeback))
            log.info("guest set the write cache to %s",
                     "writeback" if self.writeback else "writethrough (every write O_DSYNC)")
            return
        raise ValueError(f"config write {offset}+{len(data)} is not allowed")

    def start_queue(self, index: int, queue: QueueHandle) -> None:
        from cython_ext.blk import BlkQueueWorker
        w = BlkQueueWorker(
            index, queue.size, queue.desc, queue.avail, queue.used, queue.last_avail_idx,
            queue.memory.table_bytes(), queue.kick_fd, queue.call_fd,
            self.fd_direct, self.fd_buffered, self.read_only, self.capacity, self.serial,
            event_idx=queue.event_idx, indirect=queue.indirect,
            signal_call=queue.signal_call, use_io_uring=self.use_io_uring,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS, poll_us=self.poll_us,
            write_through=not self.writeback, log=queue.log, inflight=queue.inflight,
            packed=queue.packed,
            engine=self._store_engine(index))
        self.queues.start(index, w)
        if w.resubmit_count:
            log.info("queue %d: resubmitting %d requests a previous backend left in flight "
                     "(inflight region); resuming at avail %d", index,
                     w.resubmit_count, w.last_avail)
        log.debug("queue %d started (size %d, avail %d, event_idx %s)", index, queue.size,
                  queue.last_avail_idx, queue.event_idx)

    def config_event_fd(self) -> int:
        # an RBD image resized by `rbd resize` (librbd's header watch); files and NBD exports
        # keep their size
        return self.rbd.event_fd if self.rbd is not None else -1

    def config_changed(self) -> bool:
        if self.rbd is None:
            return False
        self.rbd.drain_event()
        capacity = self.rbd.refresh_size() // vb.SECTOR_SIZE
        if capacity == self.capacity:
            return False
        log.info("rbd %s resized: %d -> %d sectors", self.rbd.spec, self.capacity, capacity)
        self.capacity = capacity
        self.queues.for_each(lambda w: w.set_capacity(capacity))
        return True

    def _store_engine(self, index: int):
        if self.rbd is not None:
            return self.rbd.queue_engine(index)
        if self.nbd is not None:
            return self.nbd.queue_engine(index)
        return None             # the file (or null) engine on fd_direct / fd_buffered

    def stop_queue(self, index: int) -> int:
        return self.queues.stop(index).last_avail

    def queue_counters(self) -> dict[int, dict[str, int]]:
        """Device.queue_counters for virtio-blk, per virtqueue:
        requests = requests completed (used-ring entries, failed ones included);
        bytes_read = bytes read from the backing store into guest memory (IN);
        bytes_written = bytes written to the backing store (OUT; not discard/write-zeroes);
        errors = requests completed with IOERR or UNSUPP or returned without a usable status
        byte (bad chains), plus 1 per corrupt avail ring; inflight = requests in the io_uring
        now; dropped = 0; broken = the queue's ring was found corrupt (kept while the queue is
        stopped; cleared when it is started again or the device is reset)."""
        return self.queues.counters()

    def running_queues(self) -> list[int]:
        return self.queues.running()

    def reset(self) -> None:
        self.queues.stop_all()
        # writeback is NOT reset: QEMU does not repeat the guest's CONFIG_WCE choice when it
        # reconnects, and the guest keeps the value it set; forgetting a write-through choice
        # would silently drop its durability.  A new guest reads the value with GET_CONFIG.

    def close(self) -> None:
        self.reset()
        if self.queues.stuck:
            return              # abandoned workers may still use the image fds: leave them open
        if self.rbd is not None:
            self.rbd.close()
            return
        if self.nbd is not None:
            self.nbd.close()
            return
        if self.fd_direct != self.fd_buffered and self.fd_direct >= 0:
            os.close(self.fd_direct)
        if self.fd_buffered >= 0:
            os.close(self.fd_buffered)
        self.fd_direct = self.fd_buffered = -1


def _check_serial(value: str) -> None:
    if len(value.encode()) > vb.ID_BYTES:
        raise OptionProblem(f"is at most {vb.ID_BYTES} bytes")


# One table: the pyvhost-blk options and the [[device]] type = "block" keys.
OPTIONS = (
    Option("blk-file", "str", metavar="IMG", help="raw image file or block device"),
    Option("rbd", "str", metavar="POOL/IMAGE",
           help="a Ceph RBD image instead of a file (POOL/IMAGE or POOL/NAMESPACE/IMAGE)"),
    Option("nbd", "str", metavar="URI", help="an NBD export instead of a file "
           "(nbd+unix:///EXPORT?socket=PATH, nbd://HOST[:PORT]/EXPORT)"),
    # how long I/O waits for a server that went away before it fails (QEMU's NBD client
    # reconnect-delay is 0 by default: fail at once; a storage server restart takes seconds)
    Option("nbd-timeout", "float", 60.0, range=(0, 86400), metavar="S",
           help="fail I/O with EIO after S seconds without the NBD server (default 60)"),
    Option("nbd-connections", "int", 4, range=(1, 16), metavar="N",
           help="NBD connections when the server allows multi-conn (default 4)"),
    Option("ceph-conf", "str", metavar="PATH",
           help="Ceph configuration for --rbd (default: librados' search, /etc/ceph/ceph.conf)"),
    Option("ceph-id", "str", metavar="NAME", help="Ceph client name for --rbd (default admin)"),
    Option("keyring", "str", metavar="PATH", help="Ceph keyring for --rbd (default: the conf's)"),
    # librados waits 300 s for a monitor by default; a start should fail sooner and say why
    Option("ceph-timeout", "float", 30.0, range=(1, 3600), metavar="S",
           help="give up connecting to the Ceph cluster after S seconds (default 30)"),
    Option("read-only", "bool", False, help="export read-only"),
    # QEMU 7.2's vhost-user-blk-pci asks for one queue per vCPU when num-queues is not given
    # and refuses a backend that offers fewer ("The maximum number of queues supported by the
    # backend is 1"); it tells the guest its own count (it overrides config.num_queues).
    # Queues the guest never starts cost no thread and no io_uring, so offer 16 by default:
    # a plain `-device vhost-user-blk-pci,chardev=c0` works up to -smp 16.
    Option("num-queues", "int", 16, range=(1, 256), metavar="N",
           help="queues offered (default 16; QEMU asks for one per vCPU)"),
    Option("queue-size", "int", 1024, pow2=True, metavar="N",
           help="largest virtqueue size accepted (power of two, default 1024)"),
    Option("size", "size", metavar="SIZE",
           help="create a sparse image of this size if the image is missing"),
    Option("serial", "str", check=_check_serial, help="GET_ID serial (20 bytes max)"),
    Option("buffered", "bool", False, help="do not use O_DIRECT"),
    Option("no-io-uring", "bool", False,
           help="use the synchronous preadv/pwritev path (debugging)"),
    Option("poll-us", "float", 0.0, range=(0, 1e6), metavar="US",
           help="busy-poll the ring this long after work before sleeping (0: off)"),
    Option("null", "bool", False, help="no backing store: a --size device whose I/O "
           "completes at once (benchmarks, like QEMU's null-co)"),
)


class BlockType(DeviceType):
    name = "block"
    program = "pyvhost-blk"
    description = "vhost-user-blk backend"
    capabilities = {"type": "block", "features": ["read-only", "blk-file"]}
    options = OPTIONS
    logger = "pyvhost.blk"

    def check(self, spec, names, check_files):
        if spec.nbd is not None:
            if spec.blk_file or spec.null or spec.size or spec.rbd:
                raise ValueError(f"{names('nbd')} takes no {names('blk-file')}, "
                                 f"{names('rbd')}, {names('null')} or {names('size')}")
            if not spec.nbd.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://",
                                        "nbd+vsock://")):
                raise ValueError(f"{names('nbd')} is an NBD URI (nbd+unix:///EXPORT?socket="
                                 f"PATH or nbd://HOST[:PORT]/EXPORT), not {spec.nbd!r}")
            return
        if spec.rbd is not None:
            if spec.blk_file or spec.null or spec.size:
                raise ValueError(f"{names('rbd')} takes no {names('blk-file')}, "
                                 f"{names('null')} or {names('size')}")
            parts = spec.rbd.split("/")
            if len(parts) not in (2, 3) or not all(parts):
                raise ValueError(f"{names('rbd')} is POOL/IMAGE or POOL/NAMESPACE/IMAGE, not "
                                 f"{spec.rbd!r}")
            if check_files:
                for key, path in (("ceph-conf", spec.ceph_conf), ("keyring", spec.keyring)):
                    if path is not None and not os.path.isfile(path):
                        raise ValueError(f"{names(key)} {path} does not exist")
            return
        if spec.ceph_conf or spec.ceph_id or spec.keyring:
            raise ValueError(f"{names('ceph-conf')}, {names('ceph-id')} and {names('keyring')} "
                             f"go with {names('rbd')}")
        if spec.null:
            if spec.blk_file or not spec.size:
                raise ValueError(f"{names('null')} takes {names('size')} and no "
                                 f"{names('blk-file')}")
            return
        if not spec.blk_file:
            raise ValueError(f"{names('blk-file')}, {names('rbd')} or {names('nbd')} is required"
                             + ("" if names.cli else " (or null = true with a size)"))
        if names.cli:
            return                     # a missing image is reported when it is opened
        if not os.path.isabs(spec.blk_file):
            raise ValueError(f"blk-file must be an absolute path, not {spec.blk_file!r}")
        if check_files:
            f = spec.blk_file
            if not os.path.exists(f):
                if spec.size is None:
                    raise ValueError(f"blk-file {f} does not exist (set size to create it)")
                if not os.path.isdir(os.path.dirname(f)):
                    raise ValueError(f"blk-file directory {os.path.dirname(f)} does not exist")
            elif not os.access(f, os.R_OK if spec.read_only else os.R_OK | os.W_OK):
                raise ValueError(f"blk-file {f} is not "
                                 f"{'readable' if spec.read_only else 'readable and writable'}")

    def check_all(self, specs, tables, names):
        for d in specs:
            for other in specs:
                if other is not d and d.blk_file and other.blk_file == d.blk_file \
                        and not (d.read_only and other.read_only):
                    raise ValueError(f"device \"{d.name}\": blk-file {d.blk_file} is also used "
                                     f"by device \"{other.name}\" (only read-only devices may "
                                     f"share an image)")
                if other is not d and d.nbd and other.nbd == d.nbd \
                        and not (d.read_only and other.read_only):
                    raise ValueError(f"device \"{d.name}\": nbd {d.nbd} is also used by device "
                                     f"\"{other.name}\" (only read-only devices may share an "
                                     f"export)")
                if other is not d and d.rbd and other.rbd == d.rbd \
                        and (other.ceph_conf == d.ceph_conf) \
                        and not (d.read_only and other.read_only):
                    raise ValueError(f"device \"{d.name}\": rbd {d.rbd} is also used by device "
                                     f"\"{other.name}\" (only read-only devices may share an "
                                     f"image)")
        return tables

    def from_command_line(self, values, sockets):
        name = "null" if values["null"] else "nbd" if values["nbd"] else (
            values["rbd"].rsplit("/", 1)[-1] if values["rbd"]
            else os.path.basename(values["blk_file"] or "") or "blk")
        return [dict(values, name=name, socket=sockets[0] if sockets else None)], {}

    def build(self, spec, env):
        return BlkDevice.open(None if spec.null else spec.blk_file, create_size=spec.size,
                              read_only=spec.read_only, num_queues=spec.num_queues,
                              max_queue_size=spec.queue_size, serial=spec.serial,
                              use_io_uring=not spec.no_io_uring, direct=not spec.buffered,
                              poll_us=spec.poll_us, rbd=spec.rbd, ceph_conf=spec.ceph_conf,
                              ceph_id=spec.ceph_id, keyring=spec.keyring,
                              ceph_timeout=spec.ceph_timeout, nbd=spec.nbd,
                              nbd_timeout=spec.nbd_timeout,
                              nbd_connections=spec.nbd_connections)

    def describe(self, spec):
        what = "null device" if spec.null else (f"rbd {spec.rbd}" if spec.rbd else
                                                f"nbd {spec.nbd}" if spec.nbd else spec.blk_file)
        ro = ", read-only" if spec.read_only else ""
        return f"block {what}{ro} ({spec.num_queues} queue{'s' if spec.num_queues > 1 else ''})"


DEVICE = BlockType()
