"""dpdk.py: a DPDK ``dpdk-testpmd`` harness for the net benchmarks (bench/net.py) and the net
tests (tests/integration/test_dpdk_net.py, test_frontend_dpdk_net.py).  Owns the testpmd
processes: the hugepage setup they need (2 MiB pages, hugetlbfs on /dev/hugepages), their
command lines (EAL + testpmd flags), driving them interactively over a pseudo-terminal
(``start``, ``stop``, ``show port stats all``, ``quit``), parsing their packet counters, and killing them on every exit path (context manager,
atexit, and PR_SET_PDEATHSIG if the driving process dies).
Must not: hold test or benchmark logic; import anything of the project.

Two roles, both from DPDK 22.11 (Debian package dpdk-dev):

- ``vhost_backend([S1, S2], fwd="io")``: DPDK's own vhost-user *backend* (``net_vhost``), the C
  reference; one port per socket, forwarding between them (ports 0<->1, 2<->3, ...).
- ``virtio_user(S, mode="txonly")``: a vhost-user *frontend* without a VM (``net_virtio_user``),
  a traffic source/sink for any backend.  It does not negotiate EVENT_IDX.

    ok, why = dpdk_available()
    with vhost_backend([s1, s2]) as be, virtio_user(s2, "rxonly") as rx, \\
            virtio_user(s1, "txonly", pkt_len=64) as tx:
        be.start(); rx.start(); tx.start()
        mpps = measure(rx, 2.0)            # RX rate of the sink, Mpps
        tx.stop(); be.stop(); rx_stats = rx.stop()

Every instance runs with ``--no-pci --in-memory --single-file-segments -m 256 --no-telemetry``
and a unique ``--file-prefix``: ``--in-memory`` puts nothing in /dev/hugepages (memfd-backed
memory, still shareable over vhost-user) so several instances run at once; the empty runtime
directory EAL still makes under /var/run/dpdk is removed at the end.  Two lcores each (main +
one forwarding core, ``--nb-cores=1``); by default both may float over every CPU
(``--lcores 0@(0,1),1@(0,1)`` on a 2-CPU machine) and the kernel balances them.

Topology and CPUs: each forwarding lcore busy-polls.  With more busy pollers than CPUs (e.g.
txonly -> net_vhost io -> rxonly: three on two CPUs) two of them time-share a CPU, and the
receiver then gets at most one ring's worth of packets per scheduler slice: the rate is about
queue_size x a few hundred per second (0.03 Mpps with 256-entry rings, ~0.5 Mpps with
``queue_size=4096``), whatever the backend.  For a CPU-bound anchor keep the pollers <= CPUs:
one frontend instance with two ports, ``virtio_user([S1, S2], "flowgen")`` (each port sends
and counts what it receives) or ``"io"`` started with ``cmd("start tx_first 8")``.
bench/net.py makes the latter a one-way ring (``set portlist``, ``set flush_rx off``): P0 only
sends, P1 only receives.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import pty
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "TESTPMD", "DpdkError", "hugepage_status", "ensure_hugepages", "dpdk_available",
    "TestPmd", "vhost_backend", "virtio_user", "measure", "rates",
    "parse_port_stats", "parse_fwd_stats", "child_setup", "is_socket",
]

TESTPMD = "dpdk-testpmd"
PROMPT = "testpmd> "
HUGEPAGE_MOUNT = "/dev/hugepages"
HUGEPAGES_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB"
_PMD_GLOBS = ("/usr/lib/*/dpdk/pmds-*/librte_net_{}.so*", "/usr/lib/dpdk/pmds-*/librte_net_{}.so*",
              "/usr/local/lib/*/dpdk/pmds-*/librte_net_{}.so*")


class DpdkError(RuntimeError):
    """testpmd could not be set up, did not answer in time, or died."""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# hugepages

def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _hugetlbfs_mounts() -> list[tuple[str, str]]:
    """(mountpoint, options) of every hugetlbfs mount."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "hugetlbfs":
                out.append((parts[1].replace("\\040", " "), parts[3]))
    return out


def hugepage_status() -> dict:
    """2 MiB hugepage pool and hugetlbfs state: total, free, mounted (at /dev/hugepages)."""
    try:
        total = _read_int(f"{HUGEPAGES_2M}/nr_hugepages")
        free = _read_int(f"{HUGEPAGES_2M}/free_hugepages")
    except OSError:
        total = free = -1
    mounts = _hugetlbfs_mounts()
    return {"total": total, "free": free,
            "mounted": any(m == HUGEPAGE_MOUNT for m, _ in mounts),
            "mounts": [m for m, _ in mounts]}


def ensure_hugepages(n: int = 512) -> None:
    """Make sure at least ``n`` 2 MiB hugepages are free and hugetlbfs is mounted at
    /dev/hugepages; raise DpdkError with the reason otherwise.  Grows the pool (never shrinks
    it, pages in use by others are left alone) and mounts hugetlbfs if needed (root only)."""
    if not os.path.isdir(HUGEPAGES_2M):
        raise DpdkError(f"kernel has no 2 MiB hugepages ({HUGEPAGES_2M} missing)")
    st = hugepage_status()
    if st["free"] < n:
        target = st["total"] + (n - st["free"])
        try:
            with open(f"{HUGEPAGES_2M}/nr_hugepages", "w") as f:
                f.write(f"{target}\n")
        except OSError as e:
            raise DpdkError(f"only {st['free']} free 2 MiB hugepages (need {n}) and cannot grow "
                            f"the pool: {e}") from None
        st = hugepage_status()
        if st["free"] < n:
            raise DpdkError(f"asked the kernel for {target} 2 MiB hugepages, got "
                            f"{st['total']} ({st['free']} free, need {n}): memory fragmented "
                            "or too little RAM")
    if not st["mounted"]:
        try:
            os.makedirs(HUGEPAGE_MOUNT, exist_ok=True)
        except OSError as e:
            raise DpdkError(f"cannot create {HUGEPAGE_MOUNT}: {e}") from None
        r = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "nodev",
                            HUGEPAGE_MOUNT], capture_output=True, text=True, timeout=10)
        if r.returncode != 0 and not hugepage_status()["mounted"]:
            raise DpdkError(f"cannot mount hugetlbfs on {HUGEPAGE_MOUNT}: "
                            f"{(r.stderr or r.stdout).strip()}")


def _pmd_present(name: str) -> bool:
    import glob
    return any(glob.glob(g.format(name)) for g in _PMD_GLOBS)


def dpdk_available(hugepages: int = 512) -> tuple[bool, str]:
    """(True, "") when dpdk-testpmd, the vhost and virtio PMDs and ``hugepages`` free 2 MiB
    pages (obtained here if need be) are all there; else (False, reason) for pytest.skip."""
    if shutil.which(TESTPMD) is None:
        return False, f"{TESTPMD} not installed (Debian package dpdk-dev)"
    for pmd in ("vhost", "virtio"):
        if not _pmd_present(pmd):
            return False, f"DPDK PMD librte_net_{pmd} not found (package librte-net-{pmd}*)"
    try:
        ensure_hugepages(hugepages)
    except DpdkError as e:
        return False, f"hugepages: {e}"
    except subprocess.TimeoutExpired:
        return False, "hugepages: mount timed out"
    return True, ""


# ---------------------------------------------------------------------------------------------
# output parsing

_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9-]*):\s+(\d+)")
_END = re.compile(r"\s*[#+-]{8,}\s*")
_NIC_HDR = re.compile(r"NIC statistics for port (\d+)")
_FWD_HDR = re.compile(r"Forward statistics for port (\d+)")
_ACC_HDR = re.compile(r"Accumulated forward statistics for all ports")


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def _parse_blocks(text: str, headers: Sequence[tuple[re.Pattern, object]]) -> dict:
    out: dict = {}
    current = None
    for line in text.splitlines():
        for pat, key in headers:
            m = pat.search(line)
            if m:
                current = int(m.group(1)) if key is None else key
                out[current] = {}
                break
        else:
            if current is None:
                continue
            if _END.fullmatch(line):
                current = None
                continue
            for name, value in _FIELD.findall(line):
                out[current][_key(name)] = int(value)
    return out


def parse_port_stats(text: str) -> dict[int, dict[str, int]]:
    """``show port stats all`` -> {port: {"rx_packets", "rx_missed", "rx_bytes", "rx_errors",
    "rx_nombuf", "tx_packets", "tx_errors", "tx_bytes", "rx_pps", ...}} (cumulative since the
    port started or the last ``clear port stats``)."""
    return _parse_blocks(text, [(_NIC_HDR, None)])


def parse_fwd_stats(text: str) -> dict:
    """The forward statistics ``stop`` prints -> {port: {"rx_packets", "rx_dropped",
    "rx_total", "tx_packets", "tx_dropped", "tx_total", ...}, "all": {...}} (since the last
    ``start``; "all" is the accumulated block).  TX-dropped = packets the PMD refused."""
    return _parse_blocks(text, [(_FWD_HDR, None), (_ACC_HDR, "all")])


# ---------------------------------------------------------------------------------------------
# the process

_seq = itertools.count()
_live: "weakref.WeakSet[TestPmd]" = weakref.WeakSet()
_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def child_setup() -> None:  # runs in the child between fork and exec: no locks, no allocs
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _default_lcores() -> str:
    cpus = sorted(os.sched_getaffinity(0))
    span = ",".join(str(c) for c in cpus)
    return f"0@({span}),1@({span})"


@atexit.register
def _kill_all() -> None:
    for p in list(_live):
        with contextlib.suppress(Exception):
            p.kill()


class TestPmd:
    """One interactive ``dpdk-testpmd -i`` process, driven over a pty.

    ``with TestPmd(vdevs, fwd="io") as pmd:`` launches it and waits for the first prompt (ports
    configured and started, forwarding not yet); ``pmd.start()`` / ``pmd.stop()`` start and stop
    forwarding (``stop`` returns the parsed forward statistics); ``pmd.port_stats()`` parses
    ``show port stats all``; ``pmd.cmd(any)`` runs any command and returns its output.  Leaving
    the block sends ``quit`` and, if testpmd does not exit within ``quit_timeout``, SIGTERM and
    then SIGKILL; the process is always reaped.  Every wait is bounded; errors carry the tail of
    the output (``pmd.output``)."""

    __test__ = False  # not a pytest test class

    def __init__(self, vdevs: Iterable[str], *, fwd: str = "io", name: str = "testpmd",
                 lcores: str | None = None, mem_mb: int = 256, nb_mbufs: int = 8192,
                 queues: int = 1, txpkts: int | Sequence[int] | None = None,
                 eth_peers: dict[int, str] | None = None, rxd: int | None = None,
                 txd: int | None = None, burst: int | None = None, nb_cores: int = 1,
                 extra_eal: Sequence[str] = (), extra_args: Sequence[str] = (),
                 launch_timeout: float = 30.0, cmd_timeout: float = 15.0,
                 quit_timeout: float = 10.0, log_path: str | os.PathLike | None = None,
                 wait_files: Sequence[str | os.PathLike] = (),
                 cleanup_files: Sequence[str | os.PathLike] = ()):
        self.name = name
        self.vdevs = list(vdevs)
        self.fwd = fwd
        self.prefix = f"pvh{os.getpid()}_{next(_seq)}_{name}"[:60]
        self.launch_timeout = launch_timeout
        self.cmd_timeout = cmd_timeout
        self.quit_timeout = quit_timeout
        self.log_path = Path(log_path) if log_path else None
        self.wait_files = [Path(p) for p in wait_files]
        self.cleanup_files = [Path(p) for p in cleanup_files]
        eal = [TESTPMD, "--lcores", lcores or _default_lcores(), "--no-pci", "--in-memory",
               "--single-file-segments", "-m", str(mem_mb), "--file-prefix", self.prefix,
               "--no-telemetry"]
        for v in self.vdevs:
            eal += ["--vdev", v]
        eal += list(extra_eal)
        app = ["-i", f"--forward-mode={fwd}", f"--nb-cores={nb_cores}", f"--txq={queues}",
               f"--rxq={queues}", f"--total-num-mbufs={nb_mbufs}"]
        if txpkts is not None:
            segs = [txpkts] if isinstance(txpkts, int) else list(txpkts)
            app.append("--txpkts=" + ",".join(str(s) for s in segs))
        for port, mac in (eth_peers or {}).items():
            app.append(f"--eth-peer={port},{mac}")
        if rxd:
            app.append(f"--rxd={rxd}")
        if txd:
            app.append(f"--txd={txd}")
        if burst:
            app.append(f"--burst={burst}")
        app += list(extra_args)
        self.command = eal + ["--"] + app
        self.proc: subprocess.Popen | None = None
        self._master: int | None = None
        self._buf: list[str] = []
        self._text = ""           # joined lazily
        self._len = 0
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> "TestPmd":
        self.launch()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def launch(self) -> "TestPmd":
        if self.proc is not None:
            raise DpdkError(f"{self.name}: already launched")
        master, slave = pty.openpty()
        try:
            self.proc = subprocess.Popen(self.command, stdin=slave, stdout=slave, stderr=slave,
                                         close_fds=True, start_new_session=True, cwd="/",
                                         preexec_fn=child_setup)
        finally:
            os.close(slave)
        self._master = master
        _live.add(self)
        self._reader = threading.Thread(target=self._read_loop, name=f"testpmd-{self.name}",
                                        daemon=True)
        self._reader.start()
        try:
            self._wait_prompt(0, self.launch_timeout, "start up")
            deadline = time.monotonic() + 5.0
            for f in self.wait_files:
                while not is_socket(f):
                    if time.monotonic() > deadline:
                        raise DpdkError(f"{self.name}: {f} did not appear\n" + self._context())
                    time.sleep(0.02)
        except BaseException:
            self.kill()
            raise
        return self

    def close(self) -> int | None:
        """quit (bounded), else SIGTERM, else SIGKILL; reap; write the log; remove files."""
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None and not self._eof:
                with contextlib.suppress(OSError, DpdkError):
                    self._write("quit\n")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=self.quit_timeout)
        finally:
            rc = self.kill()  # no-op for the process if it quit; always releases the rest
        return rc

    def kill(self) -> int:
        """Stop the process now (SIGTERM, 3 s, SIGKILL) and release everything."""
        p = self.proc
        assert p is not None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.kill()
                p.wait(timeout=10.0)
        if self._reader is not None:
            self._reader.join(timeout=2.0)
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.close(self._master)
            self._master = None
        _live.discard(self)
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.write_text(self.output)
        for f in self.cleanup_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
        # EAL makes <runtime dir>/<file-prefix>/ even with --in-memory; the prefix is ours alone
        shutil.rmtree(_runtime_dir() / self.prefix, ignore_errors=True)
        return p.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- output -----------------------------------------------------------------------------

    def _read_loop(self) -> None:
        fd = self._master
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: every slave end closed (process gone)
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                chunk = data.decode(errors="replace").replace("\r", "")
                self._buf.append(chunk)
                self._len += len(chunk)
                self._cond.notify_all()

    @property
    def output(self) -> str:
        """Everything testpmd printed so far (\\r stripped)."""
        with self._cond:
            return self._output_unlocked()

    def tail(self, lines: int = 40) -> str:
        return _tail(self.output, lines)

    def _context(self) -> str:
        rc = self.proc.poll() if self.proc else None
        state = "running" if rc is None else f"exited with {rc}"
        return (f"testpmd {self.name!r} ({state}); command:\n  {' '.join(self.command)}\n"
                f"output tail:\n{self.tail()}")

    def _wait_prompt(self, pos: int, timeout: float, what: str) -> tuple[int, int]:
        """Wait for the first prompt at a line start after ``pos``; return its (start, end)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._output_unlocked()
                i = text.find("\n" + PROMPT, max(0, pos - 1)) if pos else _find_prompt0(text)
                if i >= 0:
                    start = i + 1 if text[i] == "\n" else i
                    return start, start + len(PROMPT)
                if self._eof or (self.proc is not None and self.proc.poll() is not None):
                    # let the reader drain what is left
                    if not self._eof:
                        self._cond.wait(0.2)
                        continue
                    raise DpdkError(f"{self.name}: testpmd died while waiting to {what}\n"
                                    + self._context())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DpdkError(f"{self.name}: no prompt within {timeout:.0f} s while "
                                    f"waiting to {what}\n" + self._context())
                self._cond.wait(min(left, 0.5))

    def _output_unlocked(self) -> str:
        if len(self._buf) > 1:
            self._buf[:] = ["".join(self._buf)]
        return self._buf[0] if self._buf else ""

    def _write(self, data: str) -> None:
        if self._master is None or not self.alive:
            raise DpdkError(f"{self.name}: testpmd is not running\n" + self._context())
        os.write(self._master, data.encode())

    # -- commands ---------------------------------------------------------------------------

    def cmd(self, command: str, timeout: float | None = None) -> str:
        """Run one interactive command; return what it printed before the next prompt."""
        if "\n" in command:
            raise ValueError("one command at a time")
        with self._cond:
            pos = self._len
        self._write(command + "\n")
        start, _ = self._wait_prompt(pos, timeout or self.cmd_timeout, f"run {command!r}")
        text = self.output[pos:start]
        # drop the echoed command line
        nl = text.find("\n")
        return text[nl + 1:] if nl >= 0 else ""

    def start(self) -> str:
        """Start forwarding (in the mode given at construction)."""
        return self.cmd("start")

    def stop(self) -> dict:
        """Stop forwarding; the forward statistics since ``start`` (see parse_fwd_stats)."""
        return parse_fwd_stats(self.cmd("stop"))

    def port_stats(self) -> dict[int, dict[str, int]]:
        """NIC counters of every port (see parse_port_stats)."""
        return parse_port_stats(self.cmd("show port stats all"))

    def clear_stats(self) -> None:
        self.cmd("clear port stats all")

    def set_fwd(self, mode: str) -> None:
        self.cmd(f"set fwd {mode}")
        self.fwd = mode

    def quit(self, timeout: float | None = None) -> int:
        """``quit`` and wait (bounded); the exit code.  Killed if it hangs."""
        assert self.proc is not None
        self._write("quit\n")
        try:
            return self.proc.wait(timeout=timeout or self.quit_timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DpdkError(f"{self.name}: did not quit within "
                            f"{timeout or self.quit_timeout} s; killed\n" + self._context())
        finally:
            if self.proc.poll() is not None:
                self.kill()  # reap, close the pty, remove files


def _find_prompt0(text: str) -> int:
    if text.startswith(PROMPT):
        return 0
    i = text.find("\n" + PROMPT)
    return i


def _runtime_dir() -> Path:
    """Where EAL puts its per-prefix runtime directory (eal_get_runtime_dir)."""
    if os.geteuid() == 0:
        return Path("/var/run/dpdk")
    return Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / "dpdk"


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------
# convenience constructors

def vhost_backend(socks: Sequence[str | os.PathLike], queues: int = 1, fwd: str = "io",
                  *, name: str = "vhost", extra_vdev: str = "", **kw) -> TestPmd:
    """DPDK's vhost-user backend (``net_vhost{i},iface=SOCK,queues=N``), one port per socket,
    forwarding ``fwd`` between paired ports (0<->1, ...).  The sockets are created (server mode)
    by the time the ``with`` block is entered, and removed at the end."""
    socks = [Path(s) for s in socks]
    for s in socks:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(s)  # a stale socket file makes the vhost library's bind() fail
    vdevs = [f"net_vhost{i},iface={s},queues={queues}" + (f",{extra_vdev}" if extra_vdev else "")
             for i, s in enumerate(socks)]
    kw.setdefault("wait_files", socks)
    kw.setdefault("cleanup_files", socks)
    return TestPmd(vdevs, fwd=fwd, name=name, queues=queues, **kw)


def virtio_user(sock: str | os.PathLike | Sequence[str | os.PathLike], mode: str = "txonly",
                queues: int = 1, pkt_len: int = 64, mac: str | None = None, *,
                peer: str | None = None, name: str | None = None,
                queue_size: int | None = None, extra_vdev: str = "", **kw) -> TestPmd:
    """A vhost-user frontend on ``sock`` (``net_virtio_user0,path=SOCK,queues=N``, client mode:
    the backend must already listen) running ``mode`` (txonly / rxonly / io / macswap ...).
    ``pkt_len``: the frame length txonly sends, without FCS (``--txpkts``; passed in every mode
    so that ``set fwd txonly`` works later); ``mac``: the port's own MAC (default: random);
    ``peer``: the destination MAC of txonly (``--eth-peer=0,...``; testpmd's default is
    02:00:00:00:00:00, an unknown unicast for a learning switch); ``queue_size``: ring size
    (default 256).  A list of sockets gives one port per socket (``net_virtio_user{i}``), e.g.
    ``virtio_user([S1, S2], "io")`` for a loop through a forwarding backend (start it with
    ``pmd.cmd("start tx_first")``)."""
    socks = [sock] if isinstance(sock, (str, os.PathLike)) else list(sock)
    vdevs = []
    for i, s in enumerate(socks):
        vdev = f"net_virtio_user{i},path={s},queues={queues}"
        if mac:
            vdev += f",mac={mac}" if i == 0 else f",mac={_mac_plus(mac, i)}"
        if queue_size:
            vdev += f",queue_size={queue_size}"
        if extra_vdev:
            vdev += f",{extra_vdev}"
        vdevs.append(vdev)
    kw.setdefault("txpkts", pkt_len)
    if peer:
        kw.setdefault("eth_peers", {0: peer})
    if queue_size:
        kw.setdefault("rxd", queue_size)
        kw.setdefault("txd", queue_size)
        kw.setdefault("nb_mbufs", max(8192, 4 * queue_size * queues * len(socks) + 4096))
    return TestPmd(vdevs, fwd=mode, name=name or f"virtio_{mode}", queues=queues, **kw)


def _mac_plus(mac: str, n: int) -> str:
    v = (int(mac.replace(":", ""), 16) + n) & ((1 << 48) - 1)
    return ":".join(f"{(v >> (8 * i)) & 0xff:02x}" for i in range(5, -1, -1))


# ---------------------------------------------------------------------------------------------
# rates

def rates(pmd: TestPmd, seconds: float) -> dict[int, dict[str, float]]:
    """Per-port packet and bit rates over ``seconds`` (NIC counters before/after; bounded by
    ``seconds`` + two command round trips): {port: {"rx_mpps", "tx_mpps", "rx_gbps",
    "tx_gbps", "rx_missed", "seconds"}}."""
    if not (0 < seconds <= 600):
        raise ValueError("seconds must be in (0, 600]")
    s0 = pmd.port_stats()
    t0 = time.monotonic()
    time.sleep(seconds)
    s1 = pmd.port_stats()
    dt = time.monotonic() - t0
    out = {}
    for port, c1 in s1.items():
        c0 = s0.get(port, {})
        d = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
        out[port] = {"rx_mpps": d.get("rx_packets", 0) / dt / 1e6,
                     "tx_mpps": d.get("tx_packets", 0) / dt / 1e6,
                     "rx_gbps": d.get("rx_bytes", 0) * 8 / dt / 1e9,
                     "tx_gbps": d.get("tx_bytes", 0) * 8 / dt / 1e9,
                     "rx_missed": d.get("rx_missed", 0), "seconds": dt}
    return out


def measure(pmd: TestPmd, seconds: float = 2.0, *, direction: str = "rx",
            port: int | None = None) -> float:
    """Mpps ``pmd`` receives (``direction="rx"``) or sends (``"tx"``) over ``seconds``, on
    ``port`` or summed over all ports.  Call it while forwarding runs."""
    if direction not in ("rx", "tx"):
        raise ValueError(direction)
    r = rates(pmd, seconds)
    ports = [port] if port is not None else list(r)
    return sum(r[p][f"{direction}_mpps"] for p in ports if p in r)
