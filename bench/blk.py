"""bench/blk.py: pyvhost-blk against qemu-storage-daemon (QSD), side by side, in one run.

For each medium -- `null` (no I/O: pyvhost `--null`, QSD `null-co,read-zeroes=off`), `tmpfs` (an
image in /dev/shm) and `disk` (an image in /var/tmp) -- both backends are started on the *same*
image (each with 2 queues) and every workload is measured alternately, `rounds` times (pyvhost
then QSD, then QSD then pyvhost, ...), each measurement on a fresh vhost-user connection: connect, warm up, sample
the backend's CPU time (utime + stime of all its threads, /proc/PID/stat), measure for `duration`
seconds, sample again.  The driver is `bench.loadgen` (compiled, GIL released, one thread per
queue), set up by `vhost.testing.blk.Frontend`: indirect chains (what a Linux guest sends), EVENT_IDX,
interrupts always armed (a guest's virtio-blk), a short busy-poll of the used ring before
sleeping on the call eventfd.  Random offsets are seeded per (workload, round, queue), so both
backends see the same sequence.

Two more rows per workload measure the same pyvhost process another way: `pyvhost+log` while
the driver has turned dirty logging on as QEMU does during a live migration (SET_LOG_BASE,
VHOST_F_LOG_ALL, VHOST_VRING_F_LOG), with a thread clearing the bitmap every 100 ms as QEMU's
dirty sync does; `pyvhost+packed` over packed virtqueues (VIRTIO_F_RING_PACKED, as QEMU's
`packed=on`).  Their `vs_pyvhost` ratios are the cost of logging / of the packed layout.

Shared storage, the same way: `rbd` (an RBD image of a throwaway one-node Ceph cluster,
vhost/testing/ceph.py: a mon and a memstore OSD on loopback; pyvhost `--rbd`, QSD
`driver=rbd`) and `nbd` (one qemu-nbd export of an image in /dev/shm, shared by both: pyvhost
`--nbd`, QSD `driver=nbd`; qemu-nbd offers no multi-conn for a writable export, so each backend
has one connection), on the workloads REMOTE_WORKLOADS, without the +log/+packed rows.  There
the cluster or the server shares the machine's CPUs with the backend under test, which is
measured alone (its own CPU seconds per million I/Os).

On a medium with a block device under it (`disk`), the device's own view is sampled around the
measured interval from its sysfs stat: the mean queue depth there (iostat's aqu-sz) and device
I/Os per guest I/O (merging) -- whether a backend keeps the device busy or leaves it idle.

Workloads: 4 KiB randread / randwrite at QD 1, 32, 128; 64 KiB sequential read / write at QD 16;
4 KiB randread at QD 32 on each of 2 queues (two driver threads).  Per (workload, medium,
backend): IOPS, MiB/s, p50/p99 latency (us), backend CPU seconds per million I/Os, the rounds'
spread, and for pyvhost the ratio to QSD.  Results carry the exact backend commands and the
options in effect (O_DIRECT or not, QSD's aio/cache fallbacks).

`python -m bench.blk [--quick] [--json FILE]` prints the table.  Everything is bounded: backend
start-up (30 s), every vhost-user reply (10 s), every run (its duration, then a 10 s stall
limit), and the processes are always stopped (SIGTERM, SIGKILL after 10 s).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator, Sequence

from bench.loadgen import QueueLoad, hist_percentile, merge_hists
from vhost.testing.blk import Frontend
from vhost.testing.dirtylog import DirtyLog, log_size_for

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
REPO_ROOT = Path(__file__).resolve().parents[1]
QSD = "qemu-storage-daemon"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NUM_QUEUES = 2                   # every backend is started with this many queues
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
FRONTEND_TIMEOUT = 10.0
STALL_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    op: str                      # "read" / "write"
    bs: int
    random: bool
    qd: int                      # per queue
    queues: int = 1


WORKLOADS = (
    Workload("4k-randread-qd1", "read", 4 * KiB, True, 1),
    Workload("4k-randread-qd32", "read", 4 * KiB, True, 32),
    Workload("4k-randread-qd128", "read", 4 * KiB, True, 128),
    Workload("4k-randwrite-qd1", "write", 4 * KiB, True, 1),
    Workload("4k-randwrite-qd32", "write", 4 * KiB, True, 32),
    Workload("4k-randwrite-qd128", "write", 4 * KiB, True, 128),
    Workload("64k-seqread-qd16", "read", 64 * KiB, False, 16),
    Workload("64k-seqwrite-qd16", "write", 64 * KiB, False, 16),
    Workload("4k-randread-qd32-2q", "read", 4 * KiB, True, 32, 2),
)
QUICK_WORKLOADS = ("4k-randread-qd1", "4k-randread-qd32")
# the rows issue 12 names for shared storage: 4 KiB random QD 1 / 32, 64 KiB sequential
REMOTE_WORKLOADS = ("4k-randread-qd1", "4k-randread-qd32", "4k-randwrite-qd1",
                    "4k-randwrite-qd32", "64k-seqread-qd16", "64k-seqwrite-qd16")
REMOTE_MEDIA = ("rbd", "nbd")
MEDIA = ("null", "tmpfs", "disk") + REMOTE_MEDIA
QUICK_MEDIA = ("null", "tmpfs")
IMAGE_SIZES = {"null": 1 * GiB, "tmpfs": 512 * MiB, "disk": 1 * GiB, "rbd": 256 * MiB,
               "nbd": 256 * MiB}
QUICK_IMAGE_SIZES = {"null": 1 * GiB, "tmpfs": 64 * MiB, "disk": 256 * MiB, "rbd": 64 * MiB,
                     "nbd": 64 * MiB}
MEDIUM_DIRS = {"tmpfs": "/dev/shm", "disk": "/var/tmp"}


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# Media
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Medium:
    name: str
    size: int
    path: Path | None = None     # None: no image (null)
    directory: Path | None = None
    o_direct: bool | None = None  # whether the file system takes O_DIRECT
    notes: list[str] = dataclasses.field(default_factory=list)
    store_args: list[str] | None = None   # pyvhost's store options instead of --blk-file
    qsd_blockdev: str | None = None       # QSD's --blockdev (node-name n0) instead of a file
    block_stat: str | None = None         # sysfs stat of the block device under the image


    def describe(self) -> dict:
        return dict(medium=self.name, image=str(self.path) if self.path else None,
                    size=self.size, o_direct_supported=self.o_direct, notes=list(self.notes))


def _fill_image(path: Path, size: int) -> None:
    """A fully written image (no holes, no unwritten extents: reads must really read)."""
    chunk = bytes((i * 131 + (i >> 9)) & 0xFF for i in range(MiB))
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def _o_direct_ok(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def block_stat_path(path: Path) -> str | None:
    """/sys/dev/block/MAJ:MIN/stat of the block device holding `path` (a partition's own
    file, Documentation/block/stat.rst), or None on a file system without one (tmpfs)."""
    dev = os.stat(path).st_dev
    p = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"
    return p if os.major(dev) and os.path.exists(p) else None


def _block_sample(path: str | None):
    """(t, completed I/Os, time_in_queue ms) from a block stat file (fields 1+5 and 11)."""
    if path is None:
        return None
    v = [int(x) for x in Path(path).read_text().split()]
    return time.monotonic(), v[0] + v[4], v[10]


def _device_queue(s0, s1, guest_ops: int) -> dict:
    """What the block device saw over the interval: its mean queue depth (in flight, the
    scheduler's queue included: weighted time / wall time, as iostat's aqu-sz), the mean time
    an I/O spent there, and device I/Os per guest I/O (< 1: the block layer merged them)."""
    if s0 is None or s1 is None:
        return dict(dev_qd=None, dev_us_per_io=None, dev_ios_per_op=None)
    dt, ios, wq = s1[0] - s0[0], s1[1] - s0[1], s1[2] - s0[2]
    return dict(dev_qd=wq / 1e3 / dt if dt > 0 else None,
                dev_us_per_io=wq * 1e3 / ios if ios else None,
                dev_ios_per_op=ios / guest_ops if guest_ops else None)


@contextlib.contextmanager
def prepared_medium(name: str, size: int, base_dir: str | None = None) -> Iterator[Medium]:
    if name in REMOTE_MEDIA:
        yield from _remote_medium(name, size)
        return
    if name == "null":
        yield Medium("null", size, notes=["no backing store (pyvhost --null, QSD null-co)"])
        return
    parent = base_dir or MEDIUM_DIRS[name]
    d = Path(tempfile.mkdtemp(prefix="pvhb-", dir=parent))
    try:
        img = d / "bench.img"
        t0 = time.monotonic()
        _fill_image(img, size)
        m = Medium(name, size, img, d, _o_direct_ok(img), block_stat=block_stat_path(img))
        m.notes.append(f"{size // MiB} MiB image in {parent}, written in "
                       f"{time.monotonic() - t0:.1f} s; O_DIRECT "
                       f"{'supported' if m.o_direct else 'NOT supported (buffered I/O)'}")
        yield m
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _remote_medium(name: str, size: int) -> Iterator[Medium]:
    """An RBD image on a throwaway cluster, or a qemu-nbd export of a tmpfs image; written
    through (reads must read)."""
    from vhost.testing.backends import short_tmpdir
    d = short_tmpdir("pvhr")
    try:
        img = d / "bench.img"
        t0 = time.monotonic()
        _fill_image(img, size)
        if name == "rbd":
            from vhost.testing.ceph import CephCluster
            with CephCluster(d / "ceph", memstore_bytes=max(1 << 30, 3 * size)) as c:
                spec = f"{c.pool}/bench"
                c.rbd("import", str(img), spec)
                img.unlink()
                m = Medium("rbd", size, None, d, None, store_args=c.pyvhost_args(spec),
                           qsd_blockdev=c.qsd_blockdev(spec, node="n0"))
                m.notes.append(f"{size // MiB} MiB RBD image {spec} on a one-node cluster "
                               f"(memstore OSD, started in {c.start_seconds:.1f} s), imported "
                               f"in {time.monotonic() - t0:.1f} s")
                yield m
            return
        from vhost.testing.nbdserver import NbdServer
        shm = Path(tempfile.mkdtemp(prefix="pvhn-", dir="/dev/shm"))
        try:
            shutil.move(str(img), shm / "bench.img")
            srv = NbdServer("qemu-nbd", d / "nbd.sock", image=shm / "bench.img")
            # two clients at once (both backends stay up), page cache (tmpfs has no O_DIRECT)
            srv.command = lambda: ["qemu-nbd", "-f", "raw", "-x", "disk", "-k", str(srv.sock),
                                   "-t", "-e", "4", "--cache=writeback", "--aio=threads",
                                   "--discard=unmap", str(shm / "bench.img")]
            with srv:
                m = Medium("nbd", size, None, d, None, store_args=["--nbd", srv.uri],
                           qsd_blockdev=f"driver=nbd,node-name=n0,server.type=unix,"
                                        f"server.path={srv.sock},export=disk")
                m.notes.append(f"{size // MiB} MiB image in /dev/shm exported by qemu-nbd "
                               f"(one connection per backend: no multi-conn)")
                yield m
        finally:
            shutil.rmtree(shm, ignore_errors=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Backend processes
# --------------------------------------------------------------------------------------------

def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` (live and exited), seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclasses.dataclass
class BackendProc:
    name: str                    # "pyvhost" / "qsd"
    medium: str
    command: list[str]
    sock: Path
    log_path: Path
    env: dict | None = None
    ready_file: Path | None = None
    options: dict = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    proc: subprocess.Popen | None = None
    restarts: int = 0
    cpus: frozenset | None = None   # CPU affinity of the process and every thread it makes

    def start(self) -> bool:
        """Start and wait for the socket (and the ready file); False if the process exited
        first (its log tail goes to notes).  BenchError on timeout (the process is stopped)."""
        for p in (self.sock, self.ready_file):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        cpus = self.cpus
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                cwd=str(REPO_ROOT), close_fds=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                ok = stat.S_ISSOCK(os.stat(self.sock).st_mode)
            except FileNotFoundError:
                ok = False
            if ok and (self.ready_file is None or self.ready_file.exists()):
                return True
            time.sleep(0.02)
        self.stop()
        raise BenchError(f"{self.name}: socket {self.sock} did not appear within "
                         f"{START_TIMEOUT} s; log:\n{_tail(self.log_path)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def stop(self) -> tuple[int | None, bool]:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT. Returns (exit code, needed SIGKILL)."""
        if self.proc is None:
            return None, False
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                killed = True
        rc = self.proc.returncode
        for p in (self.sock, self.ready_file):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        return rc, killed

    def describe(self) -> dict:
        return dict(command=list(self.command), options=dict(self.options),
                    notes=list(self.notes))


def pyvhost_backend(medium: Medium, workdir: Path, extra: Sequence[str] = (),
                    cpus: frozenset | None = None) -> BackendProc:
    sock = workdir / f"pyvhost-{medium.name}.sock"
    cmd = [sys.executable, "-m", "vhost.programs", "pyvhost-blk", "--socket-path", str(sock),
           "--num-queues", str(NUM_QUEUES)]
    if medium.store_args is not None:
        cmd += medium.store_args
    elif medium.path is None:
        cmd += ["--null", "--size", str(medium.size)]
    else:
        cmd += ["--blk-file", str(medium.path)]
    cmd += list(extra)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    b = BackendProc("pyvhost", medium.name, cmd, sock, workdir / f"pyvhost-{medium.name}.log",
                    env=env, cpus=cpus)
    if not b.start():
        raise BenchError(f"pyvhost-blk exited ({b.proc.returncode}) at start-up:\n"
                         f"{_tail(b.log_path)}")
    log = b.log_path.read_text(errors="replace")
    if medium.store_args is not None:
        b.options = dict(store=medium.name)
    elif medium.path is None:
        b.options = dict(null=True)
    else:
        b.options = dict(direct="O_DIRECT not supported" not in log
                         and "O_DIRECT disabled" not in log,
                         io_uring="io_uring is not available" not in log
                         and "io_uring disabled" not in log)
        if not b.options["direct"]:
            b.notes.append("buffered I/O (O_DIRECT refused by the file system)")
        if not b.options["io_uring"]:
            b.notes.append("io_uring unavailable: synchronous preadv/pwritev")
    return b


def qsd_backend(medium: Medium, workdir: Path, cpus: frozenset | None = None) -> BackendProc:
    if not shutil.which(QSD):
        raise BenchError(f"{QSD} not installed (Debian package qemu-system-common)")
    sock = workdir / f"qsd-{medium.name}.sock"
    pidfile = workdir / f"qsd-{medium.name}.pid"
    export = ["--export", f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,"
                          f"addr.path={sock},writable=on,num-queues={NUM_QUEUES}",
              "--pidfile", str(pidfile)]
    if medium.qsd_blockdev is not None:
        attempts = [(medium.qsd_blockdev, dict(driver=medium.name))]
    elif medium.path is None:
        attempts = [(f"driver=null-co,node-name=n0,size={medium.size},read-zeroes=off",
                     dict(driver="null-co", read_zeroes=False))]
    else:
        attempts = [(f"driver=file,node-name=n0,filename={medium.path},cache.direct={d},aio={a}",
                     dict(driver="file", cache_direct=d == "on", aio=a))
                    for d, a in (("on", "io_uring"), ("on", "threads"), ("off", "io_uring"),
                                 ("off", "threads"))]
    notes = []
    for blockdev, opts in attempts:
        cmd = [QSD, "--blockdev", blockdev] + export
        b = BackendProc("qsd", medium.name, cmd, sock, workdir / f"qsd-{medium.name}.log",
                        ready_file=pidfile, options=opts, cpus=cpus)
        if b.start():
            b.notes = notes
            if notes:
                b.notes.append(f"fell back to {blockdev.split(',', 3)[-1]}")
            return b
        notes.append(f"{blockdev.split(',', 3)[-1]} refused: "
                     f"{_tail(b.log_path, 2).strip()}")
    raise BenchError(f"{QSD} failed to start:\n" + "\n".join(notes))


# --------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------

def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def _run_loads(loads: list[QueueLoad], op: str, kw: dict, seeds: list[int | None],
               duration: float, cpus: frozenset | None = None) -> list[dict]:
    """One run on every queue at once, a thread per queue (the compiled loop holds no GIL);
    `cpus`: the driver threads' affinity."""
    out: list = [None] * len(loads)

    def go(i):
        try:
            if cpus:
                os.sched_setaffinity(0, cpus)       # this thread only
            out[i] = loads[i].run(op, duration=duration, seed=seeds[i], **kw)
        except BaseException as e:       # noqa: BLE001 - re-raised below
            out[i] = e

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(len(loads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 2 * STALL_TIMEOUT + 10)
        if t.is_alive():
            raise BenchError("a driver thread did not finish (bounded run exceeded)")
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


class Variant:
    """The same pyvhost BackendProc measured another way, under another name: `+log` with
    dirty logging on (dirty_log), `+packed` over packed virtqueues (packed)."""
    dirty_log = False
    packed = False

    def __init__(self, backend: BackendProc, suffix: str, **how):
        self.backend = backend
        self.name = f"{backend.name}+{suffix}"
        for k, v in how.items():
            setattr(self, k, v)

    def __getattr__(self, attr):
        return getattr(self.backend, attr)


VARIANTS = (("log", dict(dirty_log=True)), ("packed", dict(packed=True)))


# QEMU syncs (reads and clears) the dirty log once per migration iteration; 100 ms is a busy
# migration's pace, and a cleared bit makes the next write to that page a real store again.
LOG_CLEAR_INTERVAL = 0.1


def measure(backend: BackendProc, wl: Workload, *, size: int, duration: float, warmup: float,
            seed: int, others: Sequence[BackendProc] = (), spin_us: float = 50.0,
            interrupts: str = "always", indirect: bool = True,
            driver_cpus: frozenset | None = None, block_stat: str | None = None) -> dict:
    """Connect, warm up, measure `duration` seconds of `wl`; the backend's CPU time is sampled
    around the measured interval only.  A Variant with dirty_log turns dirty logging on first; one with packed runs packed rings."""
    per = 1 if indirect else 3
    qsize = max(128, _pow2_at_least(wl.qd * per))
    need = wl.queues * (wl.qd * (wl.bs + 128) + 32 * qsize) + 4 * MiB
    mem_size = max(16 * MiB, -(-need // (2 * MiB)) * 2 * MiB)
    kw = dict(random=wl.random, range_len=size // wl.bs * wl.bs, spin_us=spin_us,
              interrupts=interrupts, stall_timeout=STALL_TIMEOUT, keep_hist=True)
    seeds = [seed * 16 + q if wl.random else None for q in range(wl.queues)]
    dlog = clearing = None
    stop_clearing = threading.Event()
    seen = [0]                  # dirty pages the clearing thread found (proof logging is on)
    with Frontend(backend.sock, num_queues=wl.queues, queue_size=qsize, mem_size=mem_size,
                  timeout=FRONTEND_TIMEOUT, packed=getattr(backend, "packed", False)) as fe:
        if getattr(backend, "dirty_log", False):
            dlog = DirtyLog(log_size_for(mem_size))
            fe.log_start(dlog)

            def clear():
                while not stop_clearing.wait(LOG_CLEAR_INTERVAL):
                    seen[0] += len(dlog.dirty())
                    dlog.clear()
            clearing = threading.Thread(target=clear, daemon=True)
            clearing.start()
        loads = [QueueLoad(fe, q, depth=wl.qd, block_size=wl.bs, indirect=indirect)
                 for q in range(wl.queues)]
        try:
            if warmup > 0:
                _run_loads(loads, wl.op, kw, seeds, warmup, driver_cpus)
            others0 = [o.cpu_seconds() for o in others if o.alive()]
            cpu0 = backend.cpu_seconds()
            dev0 = _block_sample(block_stat)
            t0 = time.monotonic()
            res = _run_loads(loads, wl.op, kw, [s + 1 if s is not None else None for s in seeds],
                             duration, driver_cpus)
            wall = time.monotonic() - t0
            dev1 = _block_sample(block_stat)
            cpu1 = backend.cpu_seconds()
            others1 = [o.cpu_seconds() for o in others if o.alive()]
        finally:
            for ld in loads:
                ld.close()
            if clearing is not None:
                stop_clearing.set()
                clearing.join(5)
    if dlog is not None:
        dlog.close()
    ops = sum(r["ops"] for r in res)
    nbytes = sum(r["bytes"] for r in res)
    elapsed = max(r["elapsed_s"] for r in res)
    hist = merge_hists(r["hist"] for r in res)
    cpu = cpu1 - cpu0

    def pct(q):
        v = hist_percentile(hist, q)
        return None if v is None else v / 1e3

    return dict(
        ops=ops, bytes=nbytes, elapsed_s=elapsed, wall_s=wall,
        iops=ops / elapsed if elapsed > 0 else 0.0,
        mib_s=nbytes / elapsed / MiB if elapsed > 0 else 0.0,
        p50_us=pct(0.5), p99_us=pct(0.99), p999_us=pct(0.999),
        lat_mean_us=(sum(r["lat_mean_us"] * r["ops"] for r in res if r["ops"]) / ops
                     if ops else None),
        lat_max_us=max((r["lat_max_us"] or 0) for r in res),
        backend_cpu_s=cpu,
        cpu_s_per_mio=cpu / ops * 1e6 if ops else None,
        idle_other_backend_cpu_s=(sum(others1) - sum(others0)) if others1 else None,
        driver_cpu_s=sum(r["driver_cpu_s"] for r in res),
        errors=sum(r["errors"] for r in res),
        kicks=sum(r["kicks"] for r in res), kicks_suppressed=sum(r["kicks_suppressed"]
                                                                 for r in res),
        calls=sum(r["calls"] for r in res), sleeps=sum(r["sleeps"] for r in res),
        batches=sum(r["batches"] for r in res),
        queue_size=qsize, event_idx=res[0]["event_idx"], indirect=res[0]["indirect"],
        dirty_pages_cleared=seen[0] if dlog is not None else None,
        **_device_queue(dev0, dev1, ops))


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _summarize(medium: Medium, wl: Workload, backend: BackendProc, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    iops = [r["iops"] for r in ok]
    mean_iops = _mean(iops)
    row = dict(
        medium=medium.name, workload=wl.name, op=wl.op, block_size=wl.bs, random=wl.random,
        queue_depth=wl.qd, queues=wl.queues, backend=backend.name,
        rounds=len(runs), failed_rounds=len(runs) - len(ok),
        iops=mean_iops, iops_min=min(iops) if iops else None,
        iops_max=max(iops) if iops else None,
        iops_spread_pct=((max(iops) - min(iops)) / mean_iops * 100) if iops and mean_iops
        else None,
        mib_s=_mean(r["mib_s"] for r in ok),
        p50_us=_mean(r["p50_us"] for r in ok), p99_us=_mean(r["p99_us"] for r in ok),
        lat_mean_us=_mean(r["lat_mean_us"] for r in ok),
        lat_max_us=max((r["lat_max_us"] for r in ok), default=None),
        cpu_s_per_mio=_mean(r["cpu_s_per_mio"] for r in ok),
        dev_qd=_mean(r.get("dev_qd") for r in ok),
        dev_us_per_io=_mean(r.get("dev_us_per_io") for r in ok),
        dev_ios_per_op=_mean(r.get("dev_ios_per_op") for r in ok),
        errors=sum(r.get("errors", 0) for r in ok),
        command=list(backend.command), options=dict(backend.options),
        notes=list(backend.notes) + list(medium.notes), medium_info=medium.describe(),
        runs=runs, vs_qsd=None)
    return row


def _ratios(a: dict, b: dict) -> dict:
    """pyvhost (a) over QSD (b), from the same run."""
    def r(x, y):
        return x / y if x is not None and y else None
    pairs = [r(x.get("iops"), y.get("iops")) for x, y in zip(a["runs"], b["runs"])
             if "error" not in x and "error" not in y]
    return dict(iops=r(a["iops"], b["iops"]), mib_s=r(a["mib_s"], b["mib_s"]),
                p50=r(a["p50_us"], b["p50_us"]), p99=r(a["p99_us"], b["p99_us"]),
                cpu_per_mio=r(a["cpu_s_per_mio"], b["cpu_s_per_mio"]),
                iops_per_round=pairs)


def run_blk_bench(*, duration: float = 3.0, rounds: int = 2, quick: bool = False,
                  workdir: str | os.PathLike | None = None,
                  media: Sequence[str] | None = None, workloads: Sequence[str] | None = None,
                  warmup: float | None = None, image_sizes: dict | None = None,
                  pyvhost_extra: Sequence[str] = (), spin_us: float = 50.0,
                  interrupts: str = "always", indirect: bool = True, pin: bool = False,
                  progress=None) -> list[dict]:
    """Run the suite; returns one dict per (medium, workload, backend) (see the module
    docstring; the pyvhost rows carry `vs_qsd` ratios).  `quick`: null + tmpfs, 4k randread QD1
    and QD32, 1 s per measurement (unless another `duration` than 3.0 is given).  `workdir` keeps sockets and backend logs (default: a
    temporary directory, removed).  `pin`: the backends run on the first half of the CPUs, the
    driver threads on the rest (so they never share a core).  `progress(str)` is called with
    one line per measurement."""
    if quick:
        duration = 1.0 if duration == 3.0 else duration
        media = media or QUICK_MEDIA
        workloads = workloads or QUICK_WORKLOADS
        sizes = dict(QUICK_IMAGE_SIZES)
    else:
        media = media or MEDIA
        sizes = dict(IMAGE_SIZES)
    sizes.update(image_sizes or {})
    wls = [w for w in WORKLOADS if workloads is None or w.name in workloads]
    unknown = set(workloads or ()) - {w.name for w in WORKLOADS}
    if unknown or set(media) - set(MEDIA):
        raise ValueError(f"unknown workloads {sorted(unknown)} or media {list(media)}")
    if warmup is None:
        warmup = min(1.0, max(0.25, duration / 4))
    say = progress or (lambda s: None)
    backend_cpus = driver_cpus = None
    if pin:
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            raise ValueError("pin needs at least 2 CPUs")
        half = len(allowed) // 2
        backend_cpus, driver_cpus = frozenset(allowed[:half]), frozenset(allowed[half:])
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="pvhb", dir="/tmp")) if own_dir else Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        for mname in media:
            with prepared_medium(mname, sizes[mname]) as medium, \
                    contextlib.ExitStack() as stack:
                say(f"[{mname}] " + "; ".join(medium.notes))
                backends = []
                pv = pyvhost_backend(medium, wd, pyvhost_extra, backend_cpus)
                stack.callback(_stop_checked, pv)
                backends.append(pv)
                remote = mname in REMOTE_MEDIA
                measured = [pv] + ([] if remote else
                                   [Variant(pv, suffix, **how) for suffix, how in VARIANTS])
                try:
                    qsd = qsd_backend(medium, wd, backend_cpus)
                    stack.callback(_stop_checked, qsd)
                    backends.append(qsd)
                    measured.append(qsd)
                except BenchError as e:
                    say(f"[{mname}] QSD unavailable: {e}")
                for b in backends:
                    say(f"[{mname}] {b.name}: {' '.join(b.command)}  {b.options} {b.notes}")
                for wl in wls:
                    if remote and wl.name not in REMOTE_WORKLOADS:
                        continue
                    runs: dict[str, list[dict]] = {b.name: [] for b in measured}
                    for rnd in range(rounds):
                        # A A' A'' B, then B A'' A' A: the order alternates so that a medium
                        # whose speed drifts within the run (this machine's virtual disk: 19-57k
                        # IOPS for one backend across rounds) favours neither backend
                        for b in (measured if rnd % 2 == 0 else measured[::-1]):
                            seed = zlib.crc32(f"{wl.name}/{rnd}".encode()) & 0xFFFFFF
                            others = [o for o in backends if o is not getattr(b, "backend", b)]
                            try:
                                if not b.alive():
                                    _restart(b)
                                m = measure(b, wl, size=medium.size, duration=duration,
                                            warmup=warmup, seed=seed, others=others,
                                            spin_us=spin_us, interrupts=interrupts,
                                            indirect=indirect, driver_cpus=driver_cpus,
                                            block_stat=medium.block_stat)
                            except Exception as e:   # noqa: BLE001 - recorded, suite goes on
                                m = dict(error=f"{type(e).__name__}: {e}",
                                         backend_alive=b.alive(),
                                         log_tail=_tail(b.log_path, 10))
                                say(f"[{mname}] {wl.name} {b.name} round {rnd}: FAILED {e}")
                            else:
                                say(f"[{mname}] {wl.name:22s} {b.name:8s} round {rnd}: "
                                    f"{m['iops']:10.0f} IOPS  p50 {m['p50_us']:8.1f} us  "
                                    f"p99 {m['p99_us']:8.1f} us  cpu/MIO "
                                    f"{m['cpu_s_per_mio'] or 0:6.2f} s")
                            m["round"] = rnd
                            if pin:
                                m["pinned"] = dict(backend=sorted(backend_cpus),
                                                   driver=sorted(driver_cpus))
                            runs[b.name].append(m)
                    summary = {b.name: _summarize(medium, wl, b, runs[b.name])
                               for b in measured}
                    variants = [] if remote else [f"pyvhost+{suffix}" for suffix, _ in VARIANTS]
                    if "qsd" in summary:
                        for name in ["pyvhost"] + variants:
                            summary[name]["vs_qsd"] = _ratios(summary[name], summary["qsd"])
                    for name in variants:
                        summary[name]["vs_pyvhost"] = _ratios(summary[name], summary["pyvhost"])
                    rows.extend(summary.values())
                for b in backends:                 # exit status into the rows
                    rc, killed = b.stop()
                    if killed or (b.name == "pyvhost" and rc not in (0, None)):
                        note = (f"{b.name} did not exit cleanly on SIGTERM "
                                f"({'killed' if killed else f'exit {rc}'})")
                        say(f"[{mname}] {note}")
                        for row in rows:
                            if row["medium"] == mname and row["backend"] == b.name:
                                row["notes"].append(note)
    finally:
        if own_dir:
            shutil.rmtree(wd, ignore_errors=True)
    return rows


def _restart(b: BackendProc) -> None:
    b.stop()
    b.restarts += 1
    b.notes.append(f"restarted after it died (restart {b.restarts})")
    if b.restarts > 3 or not b.start():
        raise BenchError(f"{b.name} cannot be restarted:\n{_tail(b.log_path)}")


def _stop_checked(b: BackendProc) -> None:
    b.stop()


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[dict]) -> str:
    hdr = (f"{'medium':6s} {'workload':20s} {'backend':14s} {'IOPS':>9s} {'+-%':>5s} "
           f"{'MiB/s':>8s} {'p50us':>8s} {'p99us':>8s} {'cpu/MIO':>8s} "
           f"{'xIOPS':>6s} {'xp99':>5s} {'xCPU':>5s} {'devQD':>5s} {'devIO':>5s}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        v = r.get("vs_qsd") or {}
        lines.append(
            f"{r['medium']:6s} {r['workload']:20s} {r['backend']:14s} {_f(r['iops'], '9.0f')} "
            f"{_f(r['iops_spread_pct'], '5.1f')} {_f(r['mib_s'], '8.1f')} "
            f"{_f(r['p50_us'], '8.1f')} {_f(r['p99_us'], '8.1f')} "
            f"{_f(r['cpu_s_per_mio'], '8.2f')} {_f(v.get('iops'), '6.2f')} "
            f"{_f(v.get('p99'), '5.2f')} {_f(v.get('cpu_per_mio'), '5.2f')} "
            f"{_f(r.get('dev_qd'), '5.1f')} {_f(r.get('dev_ios_per_op'), '5.2f')}"
            + (f"  (x{r['vs_pyvhost']['iops']:.2f} IOPS, "
               f"x{_f(r['vs_pyvhost']['cpu_per_mio'], '.2f')} CPU of pyvhost)"
               if r.get("vs_pyvhost") and r["vs_pyvhost"].get("iops") else "")
            + (f"  ({r['failed_rounds']} failed)" if r["failed_rounds"] else "")
            + (f"  ({r['errors']} I/O errors)" if r["errors"] else ""))
    lines.append("")
    lines.append("+-%: IOPS spread over the rounds (max-min)/mean; cpu/MIO: backend CPU seconds "
                 "(all threads) per million I/Os; x*: pyvhost / QSD from the same run "
                 "(xIOPS > 1 and xp99, xCPU < 1 favour pyvhost); pyvhost+log: the same "
                 "pyvhost with dirty logging on, as during a live migration; pyvhost+packed: "
                 "the same pyvhost over packed virtqueues (QEMU packed=on); devQD: mean "
                 "queue depth at the block device under the image (iostat's aqu-sz, the "
                 "scheduler's queue included), devIO: its I/Os per guest I/O (< 1: merged)")
    seen = set()
    for r in rows:
        key = (r["medium"], r["backend"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"{r['medium']:6s} {r['backend']:14s}: {' '.join(r['command'])}")
        extra = [f"{k}={v}" for k, v in r["options"].items()] + r["notes"]
        if extra:
            lines.append(f"{'':15s}{'; '.join(extra)}")
    return "\n".join(lines)


def _jsonable(rows):
    def strip(r):
        r = dict(r)
        r["runs"] = [{k: v for k, v in x.items() if k != "hist"} for x in r["runs"]]
        return r
    return [strip(r) for r in rows]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.blk", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="null + tmpfs, 4k randread QD1/QD32, 1 s")
    ap.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds (default 2)")
    ap.add_argument("--media", default=None, help=f"comma list of {','.join(MEDIA)}")
    ap.add_argument("--workloads", default=None,
                    help="comma list of " + ",".join(w.name for w in WORKLOADS))
    ap.add_argument("--workdir", default=None, help="keep sockets and backend logs here")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the result dicts")
    ap.add_argument("--pyvhost-arg", action="append", default=[], metavar="ARG",
                    help="extra pyvhost-blk argument (repeatable), e.g. --pyvhost-arg=--poll-us=20")
    ap.add_argument("--spin-us", type=float, default=50.0,
                    help="driver busy-polls the used ring this long before sleeping")
    ap.add_argument("--interrupts", choices=("always", "sleep"), default="always")
    ap.add_argument("--direct-chains", action="store_true",
                    help="3-descriptor chains instead of indirect tables")
    ap.add_argument("--pin", action="store_true",
                    help="backends on the first half of the CPUs, driver threads on the rest")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per measurement")
    a = ap.parse_args(argv)
    duration = a.duration if a.duration is not None else (1.0 if a.quick else 3.0)
    rounds = a.rounds
    t0 = time.monotonic()
    rows = run_blk_bench(
        duration=duration, rounds=rounds, quick=a.quick, workdir=a.workdir,
        media=a.media.split(",") if a.media else None,
        workloads=a.workloads.split(",") if a.workloads else None,
        pyvhost_extra=a.pyvhost_arg, spin_us=a.spin_us, interrupts=a.interrupts,
        indirect=not a.direct_chains, pin=a.pin,
        progress=(lambda s: print(s, file=sys.stderr, flush=True)) if a.verbose else None)
    print(format_table(rows))
    print(f"\n{len(rows)} rows, {rounds} round(s) of {duration:g} s, "
          f"{time.monotonic() - t0:.0f} s in all")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(_jsonable(rows), f, indent=1)
    failed = sum(r["failed_rounds"] for r in rows)
    return 1 if failed or any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
