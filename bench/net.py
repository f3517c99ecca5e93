"""bench/net.py: pyvhost-net against DPDK's own vhost-user backend (``net_vhost``), both driven by
the same DPDK frontend (testpmd ``net_virtio_user``), 64 B and 1500 B frames.

    python -m bench.net [--quick] [--duration S] [--rounds N] [--size B ...] [--flood]
                        [--mode forward|sink|source ...] [--json F]

Three modes.  ``forward`` (default, below): the A -> B ring through the backend.  ``sink``: testpmd
txonly on one net_virtio_user port (one queue, one forwarding core) into a backend that only
consumes -- pyvhost-net as a one-port ``--switch`` (every frame popped, validated, its source
learned, its unknown destination flooded to no other port, used entry published) against
net_vhost under testpmd rxonly; "Mpps" is what the frontend got onto the ring, which is full in
steady state, so what the backend consumed (cross-checked against the backend's own count).
This is the ring engine's per-frame cost, with no copy on our side.  ``source``, the reverse:
testpmd rxonly on one net_virtio_user port takes what a backend that only sends puts into its
rx ring -- pyvhost as a switch port fed flat out by a generator port (bench/netsource.py: the
switch's flood path and the rx copy, as any sender's frames take) against net_vhost under
testpmd txonly; "Mpps" is what the frontend received.  bench.run runs all three, five rounds
alternated.

What is compared
----------------
One testpmd frontend instance with two virtio_user ports, P0 on socket A and P1 on socket B, and
one forwarding lcore.  The backend under test joins A and B and moves every frame A -> B:

- pyvhost-net: ``python -m devices.net --switch sw0 --socket-path A --socket-path B`` -- A's tx
  worker thread pops the frame, learns the source and looks up the destination MAC (P1's, learned
  at start: unicast to B) and copies it into B's rx buffers; B's worker sleeps (B sends nothing).
- DPDK: ``dpdk-testpmd --vdev net_vhost0,iface=A --vdev net_vhost1,iface=B --forward-mode=io``
  with one forwarding lcore: dequeue from A (copy into an mbuf), enqueue into B (copy out).

Both do the same job -- one copy of each frame from one guest's tx ring into another guest's rx
ring, with the ring bookkeeping and notifications around it -- on one thread, with no kernel
device behind them (a tap as the backend's sink or source would make the kernel the bottleneck
and measure it, not the backend).  The only extra work on our side is the switch's MAC learning
and lookup, which is what a switch port costs; net_vhost io forwarding reads no header at all.
The frontend, its mbuf pool, ring sizes (QUEUE_SIZE), window and frames are identical for both;
runs are interleaved A B A B (pyvhost, DPDK, pyvhost, DPDK ...) with fresh processes each time,
so a slow drift of the machine's load hits both alike.  ``--flood`` sends to an unknown MAC
instead (the switch floods to every other port -- here only B), our worst case.

How the traffic is generated, and why this way
-----------------------------------------------
The machine has 2 CPUs and every testpmd forwarding lcore busy-polls one.  The obvious open loop,
a txonly testpmd on A and an rxonly testpmd on B, is three busy pollers with net_vhost (two plus
our sleeping worker with pyvhost-net) on two CPUs: the result is then decided by the scheduler
time-sharing a CPU (the receiver gets about one ring's worth per time slice, see vhost/testing/dpdk.py),
and it favours the backend that sleeps.  So the source and the sink are one process with one
poller: with net_vhost exactly two busy pollers, one per CPU; with pyvhost-net one poller plus
our worker.

testpmd cannot run txonly on one port and rxonly on another in one instance (a forwarding mode
applies to every stream; virtio_user supports neither per-queue stop nor deferred start, which
is how testpmd disables a stream), and flowgen on both ports makes the test bidirectional (two
pyvhost workers plus the poller on two CPUs against one DPDK core serving both directions, and a
generator that spends most of its time building frames the full ring refuses).  So the frontend
is a one-way ring: ``set portlist 1`` + ``start tx_first 1`` sends one burst from P1 to its own
MAC (the switch learns where P1 is and drops the burst, no hairpin; net_vhost hands it to P0,
whose rx queue is flushed next); ``set portlist 0`` + ``start tx_first W/32`` puts a window of W
txonly frames of the wanted length, to P1's MAC, on P0 only; the backend carries them to P1; and
with ``set portlist 0,1``, ``set flush_rx off`` and io forwarding the frontend sends whatever P1
receives out of P0 again.  The frontend is a pure source on P0 (tx only) and a pure sink on P1
(rx only); the backend only ever forwards A -> B.  The frontend's per-frame work is the
cheapest testpmd has (io: no frame built or touched, mbufs recycled); it carries 10-15 Mpps
through net_vhost here, well above pyvhost-net.  Against net_vhost it does about the same work
as the backend, so the DPDK figure may be frontend-bound: a lower bound for net_vhost, which
makes the ratio an upper bound for us.

In a closed ring the offered rate equals the delivered rate: "offered" is what P0 puts on A's tx
ring per second, "Mpps" (delivered) what P1 takes off B's rx ring per second.  The window W
(WINDOW) must keep the backend busy: pyvhost-net, which sleeps when its ring is empty and
publishes used entries per batch of up to 256 frames, was latency-bound at W = 128 or 256
(63-72 % of a core, 2.8-3.4 Mpps) and CPU-bound (99 %) from W = 512; net_vhost did not change
with W (measured with 1024-entry rings, 64 B).  W + our 256-frame batch + one burst must fit in
the ring, so no ring can overflow and nothing should be lost.  A frame lost anywhere (frontend
tx refused, backend drop) shrinks the window for the rest of the run; it is reported ("lost"),
and a run that lost more than a quarter of its window is flagged invalid.

Measured per run: the frontend's NIC counters (``show port stats all``) before and after the
interval (P1 rx Mpps and Gbit/s delivered, P0 tx Mpps offered); the CPU time (utime + stime from
/proc/PID/stat, all threads) of the backend process -- pyvhost-net, or the net_vhost testpmd,
~100 % of a core by construction -- and of the frontend; and how busy the rest of the machine
was (/proc/stat minus those two, "others").  The frontend busy-polls, so if it got less than 90 %
of a core it shared a CPU with someone else: the run is marked "CPU contention" (still counted;
repeat in a quiet moment).  Even in quiet runs (others ~1 %) both backends' rates are bimodal
from run to run, at the same CPU use (pyvhost-net 64 B about 3-4 or 6-8 Mpps, net_vhost about 7
or 12-15 Mpps; 1500 B net_vhost 2.3 or 5-6 Mpps) -- presumably where the hypervisor puts the two
vCPUs -- so use several rounds and read the medians and the per-round ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from vhost.testing.dpdk import (DpdkError, TestPmd, child_setup, is_socket, dpdk_available,
                                vhost_backend, virtio_user)

__all__ = ["run_net_bench", "summarize", "format_table", "main", "PKT_LENS", "QUEUE_SIZE", "WINDOW"]

PKT_LENS = (64, 1500)
QUEUE_SIZE = 1024        # ring size of every virtqueue (frontend's choice; both backends take it)
BURST = 32               # testpmd's default burst: tx_first sends WINDOW / BURST bursts
WINDOW = 704             # frames circulating in the one-way ring (see above)
MEM_MB = 256             # hugepage memory per testpmd instance (-m)
MAC_A = "02:00:00:00:0a:01"   # P0's MAC
MAC_B = "02:00:00:00:0a:02"   # P1's MAC (virtio_user gives port i MAC_A + i)
CONTENDED = 0.9          # a frontend poller below this share of a core was not alone on it
WARMUP = 1.0             # seconds of traffic before the measured interval
BACKENDS = ("pyvhost", "dpdk")
NAMES = {"pyvhost": "pyvhost-net", "dpdk": "DPDK net_vhost"}

_CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO_ROOT = Path(__file__).resolve().parents[1]


class BenchError(RuntimeError):
    """A run could not be set up or produced no traffic."""


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all CPUs; /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is inside user)
    return (sum(v[:8]) - v[3] - v[4]) / _CLK_TCK


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------------
# backends

class _Backend:
    def __init__(self, kind: str, pid: int, obj):
        self.kind = kind
        self.pid = pid
        self.obj = obj
        self.drops = 0          # frames the backend dropped (filled in after the run)
        self.detail: dict = {}


@contextlib.contextmanager
def _spawned(cmd: list[str], socks: list[Path], log_path: Path,
             what: str) -> Iterator[subprocess.Popen]:
    """`cmd` (a Python module of this checkout) with its output in `log_path`; yields once every
    socket in `socks` listens; SIGTERM at the end (SIGKILL after 10 s), PR_SET_PDEATHSIG so
    that it dies with us even if we are SIGKILLed; the sockets are removed."""
    for s in socks:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(s)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                cwd=str(REPO_ROOT), close_fds=True, preexec_fn=child_setup)
    try:
        deadline = time.monotonic() + 30.0
        while not all(is_socket(s) for s in socks):
            if proc.poll() is not None:
                raise BenchError(f"{what} exited ({proc.returncode}) before listening; "
                                 f"command: {' '.join(cmd)}\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what} did not listen within 30 s\n{_tail(log_path)}")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10.0)
        for s in socks:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s)


def _tail(log_path: Path) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    return ""


@contextlib.contextmanager
def _pyvhost(socks: list[Path], workdir: Path, queue_size: int) -> Iterator[_Backend]:
    """``python -m vhost.programs pyvhost-net --switch sw0 --socket-path A --socket-path B``
    from this checkout."""
    cmd = [sys.executable, "-m", "vhost.programs", "pyvhost-net", "--switch", "sw0"]
    for s in socks:
        cmd += ["--socket-path", str(s)]
    cmd += ["--queue-size", str(queue_size), "--log-level", "info"]
    log_path = workdir / "pyvhost-net.log"
    with _spawned(cmd, socks, log_path, "pyvhost-net") as proc:
        b = _Backend("pyvhost", proc.pid, proc)
        yield b
    # its last log line (at SIGTERM) has the per-port counters
    stats = _pyvhost_stats(log_path.read_text(errors="replace"))
    b.detail = stats
    if proc.returncode != 0 or not stats:
        raise BenchError(f"pyvhost-net did not stop cleanly (exit {proc.returncode})\n"
                         f"{_tail(log_path)}")
    port_b = stats.get("sw0:1", {})
    port_a = stats.get("sw0:0", {})
    b.drops = sum(v for k, v in port_b.items() if k.startswith("rx_dropped")) + \
        port_a.get("tx_dropped", 0)


def _pyvhost_stats(log: str) -> dict:
    """Per-device counters from the stop-time `stats` lines: the logfmt records of
    vhost/logfmt.py (`msg=stats device=sw0:1 tx_packets=...`), or the older one-line JSON."""
    out: dict = {}
    for line in log.splitlines():
        if " msg=stats " in line:
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            dev = fields.pop("device", None)
            if dev is None:
                continue
            with contextlib.suppress(ValueError):
                out[dev] = {k: int(v) for k, v in fields.items() if v.isdigit()}
    if out:
        return out
    for line in reversed(log.splitlines()):
        i = line.find("INFO: stats ")
        if i >= 0:
            with contextlib.suppress(ValueError):
                return json.loads(line[i + len("INFO: stats "):])
    return {}


@contextlib.contextmanager
def _dpdk(socks: list[Path], workdir: Path, queue_size: int,
          fwd: str = "io", pkt_len: int | None = None) -> Iterator[_Backend]:
    kw = {"txpkts": pkt_len} if pkt_len else {}
    with vhost_backend(socks, fwd=fwd, name="net_vhost", mem_mb=MEM_MB,
                       log_path=workdir / "net_vhost.log", **kw) as be:
        b = _Backend("dpdk", be.proc.pid, be)
        be.start()
        yield b
        f = be.stop()
        b.detail = f
        b.drops = f.get(1, {}).get("tx_dropped", 0) + f.get(0, {}).get("rx_dropped", 0)


_BACKEND_CM = {"pyvhost": _pyvhost, "dpdk": _dpdk}
# sink mode: the backend only consumes (a one-port switch drops what it cannot deliver; DPDK's
# rxonly frees every mbuf it dequeues)
_SINK_CM = {"pyvhost": _pyvhost, "dpdk": functools.partial(_dpdk, fwd="rxonly")}


# ---------------------------------------------------------------------------------------------
# one run

def _interval(fe: TestPmd, be: _Backend, duration: float) -> tuple[dict, dict]:
    """Measure for ``duration`` s while traffic runs: the frontend's per-port NIC counter
    deltas, and the CPU (cores) of the backend, the frontend and everything else meanwhile
    (other benchmarks, this script), with the interval's length ("seconds")."""
    s0 = fe.port_stats()
    c0, f0, m0 = _cpu_seconds(be.pid), _cpu_seconds(fe.proc.pid), _busy_cpu_seconds()
    t0 = time.monotonic()
    time.sleep(duration)
    s1 = fe.port_stats()
    c1, f1, m1 = _cpu_seconds(be.pid), _cpu_seconds(fe.proc.pid), _busy_cpu_seconds()
    dt = time.monotonic() - t0
    d = {p: {k: s1[p].get(k, 0) - s0.get(p, {}).get(k, 0) for k in s1[p]} for p in s1}
    return d, {"backend_cpu": (c1 - c0) / dt, "frontend_cpu": (f1 - f0) / dt,
               "other_cpu": max(0.0, ((m1 - m0) - (c1 - c0) - (f1 - f0)) / dt),
               "seconds": dt}


def _seed_ring(fe: TestPmd, window: int, flood: bool) -> None:
    """Put ``window`` frames on P0 only, then forward P1 -> P0 (io) without flushing P1's rx.
    Unless ``flood``, first one burst from P1 to its own MAC, so that a learning switch knows
    where MAC_B is (and drops the burst: no hairpin); net_vhost forwards it to P0, whose rx
    queue the next ``start`` flushes."""
    if not flood:
        fe.cmd("set portlist 1")
        fe.cmd("start tx_first 1")
        time.sleep(0.1)
        fe.stop()
    fe.cmd("set portlist 0")
    fe.cmd("set flush_rx on")
    fe.cmd(f"start tx_first {window // BURST}")
    time.sleep(0.1)
    f = fe.stop()
    sent = f.get(0, {}).get("tx_packets", 0)
    if sent != window:
        raise BenchError(f"seeding the ring: P0 sent {sent} of {window} frames\n{fe.tail()}")
    fe.cmd("set portlist 0,1")
    fe.cmd("set flush_rx off")
    fe.start()


def _run_one(kind: str, pkt_len: int, duration: float, warmup: float, workdir: Path,
             window: int, queue_size: int, flood: bool) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    socks = [workdir / "a.sock", workdir / "b.sock"]
    row: dict = {"backend": kind, "pkt_len": pkt_len, "window": window,
                 "dst": "flood" if flood else "unicast",
                 "queue_size": queue_size, "loadavg_before": _loadavg()}
    with _BACKEND_CM[kind](socks, workdir, queue_size) as be:
        with virtio_user(socks, "io", pkt_len=pkt_len, mac=MAC_A, queue_size=queue_size,
                         name="frontend", mem_mb=MEM_MB, log_path=workdir / "frontend.log",
                         eth_peers=None if flood else {0: MAC_B, 1: MAC_B}) as fe:
            _seed_ring(fe, window, flood)
            time.sleep(warmup)
            d, cpu = _interval(fe, be, duration)
            fwd = fe.stop()
    dt = cpu["seconds"]
    rx = d.get(1, {}).get("rx_packets", 0)
    tx = d.get(0, {}).get("tx_packets", 0)
    lost = fwd.get(0, {}).get("tx_dropped", 0) + be.drops
    row.update({
        "mpps": rx / dt / 1e6,                                         # delivered at P1
        "gbps": d.get(1, {}).get("rx_bytes", 0) * 8 / dt / 1e9,
        "offered_mpps": tx / dt / 1e6,                                 # sent by P0
        **cpu,
        "lost": lost,
        "loadavg_after": _loadavg(),
    })
    row["valid"] = rx > 0 and lost <= window // 4
    return _noted(row, "no traffic" if rx == 0 else
                  None if row["valid"] else f"lost {lost} of the {window}-frame window")


def _noted(row: dict, problem: str | None) -> dict:
    """The row's note: what made it invalid, and CPU contention: the frontend busy-polls, so
    less than ~a whole core means it shared a CPU with someone (still counted)."""
    notes = [problem] if problem else []
    if row["frontend_cpu"] < CONTENDED:
        notes.append(f"CPU contention (frontend got {100 * row['frontend_cpu']:.0f}% of a core)")
    row["contended"] = row["frontend_cpu"] < CONTENDED
    if notes:
        row["note"] = "; ".join(notes)
    return row


def _run_sink(kind: str, pkt_len: int, duration: float, warmup: float, workdir: Path,
              queue_size: int) -> dict:
    """Sink mode: testpmd txonly on one net_virtio_user port (one queue, one forwarding core)
    sends as fast as the backend takes frames off the ring; the backend consumes and drops
    them.  pyvhost-net is a one-port switch (every frame popped, validated, translated, its
    source learned, its unknown destination flooded to no other port, its used entry
    published); DPDK is net_vhost under testpmd rxonly (dequeue into an mbuf, free it).  The
    frontend's ring is full in steady state, so what it sends is what the backend consumed."""
    workdir.mkdir(parents=True, exist_ok=True)
    socks = [workdir / "a.sock"]
    row: dict = {"backend": kind, "mode": "sink", "pkt_len": pkt_len, "dst": "unknown",
                 "queue_size": queue_size, "loadavg_before": _loadavg()}
    with _SINK_CM[kind](socks, workdir, queue_size) as be:
        with virtio_user(socks, "txonly", pkt_len=pkt_len, mac=MAC_A, queue_size=queue_size,
                         name="frontend", mem_mb=MEM_MB, log_path=workdir / "frontend.log",
                         peer=MAC_B) as fe:
            fe.start()
            time.sleep(warmup)
            d, cpu = _interval(fe, be, duration)
            fe.stop()
    dt = cpu["seconds"]
    tx = d.get(0, {}).get("tx_packets", 0)
    txb = d.get(0, {}).get("tx_bytes", 0)
    # the backend's own count of what it took, over the whole run (a cross-check)
    if kind == "pyvhost":
        taken = be.detail.get("sw0:0", {}).get("tx_packets", 0)
    else:
        taken = be.detail.get(0, {}).get("rx_packets", 0)
    row.update({
        "mpps": tx / dt / 1e6, "gbps": txb * 8 / dt / 1e9, "offered_mpps": tx / dt / 1e6,
        **cpu, "lost": 0, "backend_taken": taken, "loadavg_after": _loadavg(),
    })
    row["valid"] = tx > 0 and taken >= tx
    return _noted(row, "no traffic" if tx == 0 else None if taken >= tx else
                  f"backend counted {taken} frames, frontend sent {tx} in the interval")


@contextlib.contextmanager
def _netsource(socks: list[Path], workdir: Path, queue_size: int,
               pkt_len: int) -> Iterator[_Backend]:
    """``python -m bench.netsource`` (pyvhost as a frame source: a switch port fed by a
    generator port, see that module); its exit line gives what it generated and delivered."""
    cmd = [sys.executable, "-m", "bench.netsource", "--socket-path", str(socks[0]),
           "--pkt-len", str(pkt_len), "--queue-size", str(queue_size)]
    log_path = workdir / "netsource.log"
    with _spawned(cmd, socks, log_path, "bench.netsource") as proc:
        b = _Backend("pyvhost", proc.pid, proc)
        yield b
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines()
             if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"bench.netsource did not stop cleanly (exit {proc.returncode})\n"
                         f"{_tail(log_path)}")
    b.detail = json.loads(lines[-1])


def _run_source(kind: str, pkt_len: int, duration: float, warmup: float, workdir: Path,
                queue_size: int) -> dict:
    """Source mode, the sink's reverse: testpmd rxonly on one net_virtio_user port (one queue,
    one core) takes what the backend puts into its rx ring as fast as it comes.  pyvhost is a
    switch port fed by a generator port (bench/netsource.py: every frame switched, flooded to
    the port, copied into the guest's rx buffers, used entries published per batch); DPDK is
    net_vhost under testpmd txonly (an mbuf built per frame, enqueued into the guest's ring).
    Both sources are flat out: what the frontend receives is the measure; frames a full ring
    could not take are dropped at the source."""
    workdir.mkdir(parents=True, exist_ok=True)
    socks = [workdir / "a.sock"]
    row: dict = {"backend": kind, "mode": "source", "pkt_len": pkt_len, "dst": "flood",
                 "queue_size": queue_size, "loadavg_before": _loadavg()}
    cm = _netsource(socks, workdir, queue_size, pkt_len) if kind == "pyvhost" else \
        _dpdk(socks, workdir, queue_size, fwd="txonly", pkt_len=pkt_len)
    with cm as be:
        with virtio_user(socks, "rxonly", pkt_len=pkt_len, mac=MAC_A, queue_size=queue_size,
                         name="frontend", mem_mb=MEM_MB,
                         log_path=workdir / "frontend.log") as fe:
            fe.start()
            time.sleep(warmup)
            d, cpu = _interval(fe, be, duration)
            fe.stop()
    dt = cpu["seconds"]
    rx = d.get(0, {}).get("rx_packets", 0)
    rxb = d.get(0, {}).get("rx_bytes", 0)
    # the source's own count of what it put into the ring, over the whole run (a cross-check)
    if kind == "pyvhost":
        given = be.detail.get("delivered", 0)
    else:
        given = be.detail.get(0, {}).get("tx_packets", 0)
    row.update({"mpps": rx / dt / 1e6, "gbps": rxb * 8 / dt / 1e9, "offered_mpps": rx / dt / 1e6,
                **cpu, "lost": 0, "backend_given": given, "loadavg_after": _loadavg()})
    row["valid"] = rx > 0 and given >= rx
    return _noted(row, "no traffic" if rx == 0 else None if given >= rx else
                  f"backend counted {given} frames, frontend received {rx} in the interval")


# ---------------------------------------------------------------------------------------------
# the suite

def run_net_bench(*, duration: float = 5.0, rounds: int = 2, quick: bool = False,
                  pkt_lens: tuple[int, ...] = PKT_LENS, window: int = WINDOW,
                  queue_size: int = QUEUE_SIZE, flood: bool = False,
                  backends: tuple[str, ...] = BACKENDS, modes: tuple[str, ...] = ("forward",),
                  progress=None) -> list[dict]:
    """Run the comparison; one dict per run: ``backend`` ("pyvhost" / "dpdk"), ``pkt_len``,
    ``round``, ``mpps`` (delivered), ``gbps``, ``offered_mpps``, ``backend_cpu``,
    ``frontend_cpu`` and ``other_cpu`` (cores), ``lost`` (frames), ``valid``, ``contended``,
    ``note`` (if any), and on pyvhost rows ``ratio`` (its Mpps over the DPDK run of the same
    round and size).  Per round and size: pyvhost then DPDK (A B A B ...), fresh processes
    each.  ``quick``: 1 s per run, one round.  Raises DpdkError when DPDK or hugepages are
    unavailable.  ``progress``: called with each row once its A B pair is measured."""
    if quick:
        duration, rounds = min(duration, 1.0), 1
    if not (0 < duration <= 120) or not (1 <= rounds <= 20):
        raise ValueError("duration must be in (0, 120] s and rounds in [1, 20]")
    if window % BURST or not (BURST <= window <= queue_size - 256 - BURST):
        raise ValueError(f"window must be a multiple of {BURST} in [{BURST}, "
                         f"{queue_size - 256 - BURST}] (queue size {queue_size})")
    warmup = 0.5 if quick else WARMUP
    # two testpmd instances at once (frontend + net_vhost), MEM_MB each, plus slack
    ok, why = dpdk_available(hugepages=2 * MEM_MB // 2 + 32)
    if not ok:
        raise DpdkError(why)
    rows: list[dict] = []
    top = Path(tempfile.mkdtemp(prefix="pvhnet", dir="/tmp"))   # short: sun_path is 108 bytes
    try:
        for rnd in range(rounds):
            for mode, pkt_len in ((m, n) for m in modes for n in pkt_lens):
                by_kind = {}
                for kind in backends:
                    wd = top / f"r{rnd}-{mode}-{pkt_len}-{kind}"
                    if mode == "sink":
                        row = _run_sink(kind, pkt_len, duration, warmup, wd, queue_size)
                    elif mode == "source":
                        row = _run_source(kind, pkt_len, duration, warmup, wd, queue_size)
                    else:
                        row = _run_one(kind, pkt_len, duration, warmup, wd, window,
                                       queue_size, flood)
                        row["mode"] = "forward"
                    row["round"] = rnd
                    by_kind[kind] = row
                    rows.append(row)
                p, d = by_kind.get("pyvhost"), by_kind.get("dpdk")
                if p and d and d["mpps"] > 0:
                    p["ratio"] = p["mpps"] / d["mpps"]
                if progress:
                    for row in by_kind.values():
                        progress(row)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per mode and packet length: median Mpps of each backend over the valid runs, the
    spread (min..max), and their ratio."""
    out = []
    for mode, pkt_len in sorted({(r.get("mode", "forward"), r["pkt_len"]) for r in rows}):
        mine = [r for r in rows if r.get("mode", "forward") == mode and r["pkt_len"] == pkt_len]
        s: dict = {"mode": mode, "pkt_len": pkt_len}
        for kind in BACKENDS:
            v = [r for r in mine if r["backend"] == kind and r["valid"]]
            s[kind] = statistics.median(r["mpps"] for r in v) if v else None
            s[f"{kind}_range"] = (min(r["mpps"] for r in v), max(r["mpps"] for r in v)) \
                if v else None
            s[f"{kind}_cpu"] = statistics.median(r["backend_cpu"] for r in v) if v else None
            s[f"{kind}_runs"] = len(v)
        ratios = [r["ratio"] for r in mine if "ratio" in r]
        s["ratio"] = (s["pyvhost"] / s["dpdk"]) if s["pyvhost"] and s["dpdk"] else None
        s["ratio_range"] = (min(ratios), max(ratios)) if ratios else None
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# CLI

HEADER = (f"{'mode':<7} {'size':>5}  {'backend':<15} {'rnd':>3}  {'Mpps':>7} {'Gbit/s':>7} "
          f"{'offered':>7} {'lost':>5} {'be CPU':>7} {'Mpps/core':>9} {'fe CPU':>7} "
          f"{'others':>6} {'ratio':>6}  note")
LEGEND = ("Mpps: delivered at P1; offered: sent by P0; lost: frames refused or dropped (the "
          "window shrinks); be/fe CPU: backend/frontend process CPU, % of one core; Mpps/core: "
          "Mpps per backend core; others: the rest of the machine, cores %; ratio: pyvhost / "
          "DPDK of the same round")


def _fmt_row(r: dict) -> str:
    per_core = r["mpps"] / r["backend_cpu"] if r["backend_cpu"] > 0.01 else float("nan")
    ratio = f"{r['ratio']:6.2f}" if "ratio" in r else " " * 6
    return (f"{r.get('mode', 'forward'):<7} {r['pkt_len']:>5}  {NAMES[r['backend']]:<15} {r.get('round', 0):>3}  "
            f"{r['mpps']:7.3f} {r['gbps']:7.2f} {r['offered_mpps']:7.3f} {r['lost']:>5} "
            f"{100 * r['backend_cpu']:6.0f}% {per_core:9.3f} {100 * r['frontend_cpu']:6.0f}% "
            f"{100 * r['other_cpu']:5.0f}% {ratio}  {r.get('note', '')}")


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'mode':<7} {'size':>5}  {'pyvhost Mpps':>12} {'(spread)':>13} {'DPDK Mpps':>10} "
             f"{'(spread)':>13} {'ratio':>6} {'(per round)':>14}  {'pyvhost CPU':>11} "
             f"{'DPDK CPU':>8}  (medians of valid runs)"]

    def num(v, w, spec):
        return f"{v:{w}{spec}}" if v is not None else f"{'-':>{w}}"

    def pct(v):
        return f"{100 * v:.0f}%" if v is not None else "-"

    def spread(v):
        return f"{v[0]:.2f}..{v[1]:.2f}" if v else "-"

    for s in summarize(rows):
        lines.append(f"{s['mode']:<7} {s['pkt_len']:>5}  {num(s['pyvhost'], 12, '.3f')} "
                     f"{spread(s['pyvhost_range']):>13} {num(s['dpdk'], 10, '.3f')} "
                     f"{spread(s['dpdk_range']):>13} {num(s['ratio'], 6, '.2f')} "
                     f"{spread(s['ratio_range']):>14}  "
                     f"{pct(s['pyvhost_cpu']):>11} {pct(s['dpdk_cpu']):>8}")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """Every run, then the per-size summary (bench/run.py prints this)."""
    return "\n".join([HEADER] + [_fmt_row(r) for r in rows] + ["", format_summary(rows), "",
                                                                LEGEND])


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)   # unwind: every with-block stops its processes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.net", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per run, one round")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds per packet size")
    ap.add_argument("--window", type=int, default=WINDOW, help="frames in the ring")
    ap.add_argument("--size", type=int, action="append", help="packet length (repeatable)")
    ap.add_argument("--flood", action="store_true",
                    help="send to an unknown MAC (the switch floods) instead of P1's MAC")
    ap.add_argument("--mode", action="append", choices=("forward", "sink", "source"),
                    help="forward: the A -> B ring through the backend (default); sink: "
                         "testpmd txonly into a backend that only consumes; source: a "
                         "backend that only sends into testpmd rxonly (repeatable)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    t0 = time.monotonic()
    print(f"pyvhost-net vs DPDK net_vhost: testpmd virtio_user one-way ring P0 -> backend -> P1,"
          f" {'flooded' if args.flood else 'unicast'}, window {args.window} frames, rings "
          f"{QUEUE_SIZE}, one forwarding core each; "
          f"{os.cpu_count()} CPUs, load {_loadavg()}", flush=True)
    print(HEADER, flush=True)
    try:
        rows = run_net_bench(duration=args.duration, rounds=args.rounds, quick=args.quick,
                             pkt_lens=tuple(args.size or PKT_LENS), window=args.window,
                             flood=args.flood, modes=tuple(args.mode or ("forward",)),
                             progress=lambda r: print(_fmt_row(r), flush=True))
    except DpdkError as e:
        print(f"bench.net: cannot run: {e}", file=sys.stderr)
        return 2
    print()
    print(format_summary(rows))
    print(LEGEND)
    print(f"\n{len(rows)} runs in {time.monotonic() - t0:.0f} s; load now {_loadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["valid"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
