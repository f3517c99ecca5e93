"""Guest fio benchmark: a TCG QEMU guest runs fio 4k randread (QD32 and QD1, O_DIRECT) on a
vhost-user-blk disk served by pyvhost-blk and by qemu-storage-daemon (the C reference), the same
image file for both; reports guest IOPS / latency and the backend's CPU time per I/O.

How one measurement works (one boot per backend and image, both queue depths in that boot):

- the host makes the image (filled with data, so reads are real reads) on /var/tmp and, unless
  ``images`` says otherwise, a second one on tmpfs (/dev/shm); the backend serves it
  (``vhost/testing/backends.py``: QSD with ``cache.direct=on,aio=io_uring`` when the file system
  allows, falling back as recorded in ``backend_notes``; pyvhost-blk with its defaults);
- the guest (``vhost/testing/guest.py``, fio and its shared libraries copied into the initramfs)
  picks the first fio ioengine that works (io_uring, libaio, psync), then per case runs a short
  ramp (a separate fio run, so the measured run's I/O count is exactly the I/Os of the window)
  and the measured run with ``--output-format=json``, printed back between markers;
- the measured fio run's ``exec_prerun`` / ``exec_postrun`` write a marker line to the guest
  console right before the first and after the last I/O; a host thread tailing the console
  samples ``utime+stime`` of the backend process (``/proc/PID/stat``, 10 ms ticks), the summed
  per-thread run time (``/proc/PID/task/*/schedstat``, ns, threads alive at both samples) and
  QEMU's CPU time at each marker. Backend CPU per I/O = backend CPU over the window / the I/Os
  fio reports (``read.total_ios``); ``block_ios`` (guest /sys/block/vda/stat delta over the
  same window) cross-checks the count.

Run: ``python -m bench.guest [--quick] [--rounds N] [--runtime S] [--json OUT]``.
Needs what the e2e tests need (QEMU, the Debian guest kernel, a static busybox), fio on the
host (its binary and libraries are copied into the guest) and qemu-storage-daemon. Every process is bounded by a timeout and stopped at the end; the
images are deleted.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from vhost.testing.backends import BackendError, pyvhost_blk, qsd_blk, short_tmpdir
from vhost.testing import guest as g

FIO = "/usr/bin/fio"
BACKENDS = ("pyvhost", "qsd")
#: image kind -> directory the image file goes in
IMAGE_DIRS = {"var-tmp": "/var/tmp", "tmpfs": "/dev/shm"}
CASES = (("qd32", 32), ("qd1", 1))
ENGINES = ("io_uring", "libaio", "psync")
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
GUEST_MEM = "512M"  # fio + its ~85 MB of libraries live in the initramfs

MARK_RE = re.compile(r"@@PVH-MARK (\S+)@@")
JSON_BLOCK_RE = re.compile(r"@@FIO-JSON-BEGIN (\S+)@@(.*?)@@FIO-JSON-END \1@@", re.S)


# --------------------------------------------------------------------------------------------
# host-side CPU sampling


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime (clock ticks) of process ``pid``: all its threads, dead ones included."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return int(fields[11]) + int(fields[12])


def proc_sched_ns(pid: int) -> dict[int, int]:
    """{tid: ns on CPU} from /proc/PID/task/*/schedstat (needs CONFIG_SCHED_INFO)."""
    out: dict[int, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[int(tid)] = int(f.read().split()[0])
    return out


@dataclasses.dataclass
class Sample:
    t: float
    backend_ticks: int | None
    backend_sched: dict[int, int]
    qemu_ticks: int | None


class ConsoleWatcher:
    """Tails the guest console (from ``run_guest(on_start=...)``) and samples the backend's and
    QEMU's CPU time whenever a ``@@PVH-MARK label@@`` line appears."""

    def __init__(self, backend_pid: int) -> None:
        self.backend_pid = backend_pid
        self.qemu_pid: int | None = None
        self.marks: dict[str, Sample] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def sample(self) -> Sample:
        def ticks(pid: int | None) -> int | None:
            if pid is None:
                return None
            try:
                return proc_cpu_ticks(pid)
            except (FileNotFoundError, ProcessLookupError):
                return None
        return Sample(time.monotonic(), ticks(self.backend_pid),
                      proc_sched_ns(self.backend_pid), ticks(self.qemu_pid))

    def on_start(self, proc: subprocess.Popen, console_path: Path) -> None:
        self.qemu_pid = proc.pid
        f = open(console_path, "rb")  # stays readable after run_guest deletes the file
        self._thread = threading.Thread(target=self._run, args=(proc, f), daemon=True,
                                        name="console-watcher")
        self._thread.start()

    def _run(self, proc: subprocess.Popen, f) -> None:
        buf = b""
        try:
            with f:
                while not self._stop.is_set():
                    data = f.read()
                    if data:
                        buf += data
                        *lines, buf = buf.split(b"\n")
                        for line in lines:
                            m = MARK_RE.search(line.decode(errors="replace"))
                            if m:
                                self.marks[m.group(1)] = self.sample()
                    elif proc.poll() is not None:
                        break
                    else:
                        time.sleep(0.002)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            self.error = e

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


# --------------------------------------------------------------------------------------------
# the guest script


def fio_args(label: str, iodepth: int, runtime: float, engine: str, *,
             json_out: str | None = None, marks: bool = False) -> list[str]:
    """The guest's fio command line for one case (``engine`` may be the shell word
    ``$ENGINE``)."""
    args = [FIO, f"--name={label}", "--filename=/dev/vda", "--rw=randread", "--bs=4k",
            "--direct=1", f"--ioengine={engine}", f"--iodepth={iodepth}", "--numjobs=1",
            "--time_based", f"--runtime={runtime:g}", "--norandommap", "--randrepeat=0"]
    if json_out:
        args += ["--output-format=json", f"--output={json_out}"]
    if marks:
        args += [f"--exec_prerun=sh /tmp/mark.sh {label}-begin",
                 f"--exec_postrun=sh /tmp/mark.sh {label}-end"]
    return args


def _sh(args: Sequence[str]) -> str:
    """Shell words; ``$ENGINE`` stays expandable."""
    return " ".join(f'"{a}"' if a == "--ioengine=$ENGINE" else shlex.quote(a) for a in args)


def guest_script(*, runtime: float, ramp: float, engines: Sequence[str] = ENGINES,
                 cases: Sequence[tuple[str, int]] = CASES) -> str:
    lines = [r"""
cd /tmp
# fio's exec_prerun/exec_postrun redirect the command's output to a file: write to the console
cat > /tmp/mark.sh <<'EOF'
cat /sys/block/vda/stat > /tmp/$1.stat
echo "@@PVH-MARK $1@@" > /dev/console
EOF
echo GUEST_KERNEL=$(uname -r)
echo GUEST_NCPU=$(nproc)
echo GUEST_SCHED=$(cat /sys/block/vda/queue/scheduler)
echo GUEST_NR_REQUESTS=$(cat /sys/block/vda/queue/nr_requests)
ENGINE=
"""]
    for e in engines:  # the probe doubles as the first ramp
        probe = _sh(fio_args("probe", 32, ramp, e)) + " >/tmp/probe.out 2>&1"
        lines.append(f'[ -z "$ENGINE" ] && {{ if {probe}; then ENGINE={e}; else '
                     f'echo "FIO_ENGINE_FAILED_{e}"; tail -n 5 /tmp/probe.out; fi; }}')
    lines.append('echo FIO_ENGINE=$ENGINE\n[ -n "$ENGINE" ] || exit 3\nfail=0')
    for label, qd in cases:
        ramp_cmd = _sh(fio_args(f"{label}ramp", qd, ramp, "$ENGINE"))
        cmd = _sh(fio_args(label, qd, runtime, "$ENGINE", json_out=f"/tmp/{label}.json",
                           marks=True))
        up = label.upper()
        lines.append(f"""
{ramp_cmd} >/tmp/{label}ramp.out 2>&1 || {{ echo "RAMP_FAILED_{up}"; tail -n 5 /tmp/{label}ramp.out; }}
{cmd} >/tmp/{label}.err 2>&1
rc=$?
echo FIO_RC_{up}=$rc
[ $rc = 0 ] || {{ fail=1; tail -n 10 /tmp/{label}.err; }}
echo "BLKSTAT_{up}_BEGIN=$(cat /tmp/{label}-begin.stat 2>/dev/null)"
echo "BLKSTAT_{up}_END=$(cat /tmp/{label}-end.stat 2>/dev/null)"
echo "@@FIO-JSON-BEGIN {label}@@"
cat /tmp/{label}.json 2>/dev/null
echo "@@FIO-JSON-END {label}@@"
""")
    lines.append("exit $fail")
    return "\n".join(lines)


def parse_fio_json(text: str) -> dict:
    """The fio JSON document in ``text`` (ignoring anything before its first ``{``)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in fio output")
    doc, _ = json.JSONDecoder().raw_decode(text[start:])
    return doc


# --------------------------------------------------------------------------------------------
# one boot


def make_image(path: Path, size: int) -> None:
    """A fully written image (a random MiB repeated), so that O_DIRECT reads are real reads."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _backend(kind: str, img: Path, sock: Path, pyvhost_extra: Sequence[str]) -> Iterator:
    if kind == "qsd":
        with qsd_blk(img, sock) as b:
            yield b
    elif kind == "pyvhost":
        with pyvhost_blk(img, sock, extra=pyvhost_extra) as b:
            yield b
    else:
        raise ValueError(kind)


def _case_row(label: str, qd: int, values: dict[str, str], blocks: dict[str, str],
              watcher: ConsoleWatcher) -> dict:
    row: dict = {"case": label, "iodepth": qd}
    up = label.upper()
    row["fio_rc"] = int(values.get(f"FIO_RC_{up}", "-1"))
    try:
        doc = parse_fio_json(blocks.get(label, ""))
        job = doc["jobs"][0]
        rd = job["read"]
        clat = rd.get("clat_ns", {})
        pct = clat.get("percentile", {})
        row.update(
            iops=rd["iops"], ios=rd["total_ios"], fio_runtime_s=rd["runtime"] / 1e3,
            bw_mib_s=rd["bw_bytes"] / MiB,
            lat_mean_us=rd["lat_ns"]["mean"] / 1e3, clat_mean_us=clat.get("mean", 0) / 1e3,
            clat_p50_us=pct.get("50.000000", 0) / 1e3, clat_p99_us=pct.get("99.000000", 0) / 1e3,
            guest_usr_cpu_pct=job.get("usr_cpu"), guest_sys_cpu_pct=job.get("sys_cpu"),
            fio_error=job.get("error", 0),
        )
        du = doc.get("disk_util") or []
        if du:
            row["guest_disk_util_pct"] = du[0].get("util")
    except (ValueError, KeyError, IndexError) as e:
        row["error"] = f"fio output not parsed: {e}"
        return row
    try:
        b0 = int(values[f"BLKSTAT_{up}_BEGIN"].split()[0])
        b1 = int(values[f"BLKSTAT_{up}_END"].split()[0])
        row["block_ios"] = b1 - b0
    except (KeyError, ValueError, IndexError):
        row["block_ios"] = None
    s0, s1 = watcher.marks.get(f"{label}-begin"), watcher.marks.get(f"{label}-end")
    if s0 is None or s1 is None:
        row["error"] = "CPU markers not seen on the console"
        return row
    window = s1.t - s0.t
    row["window_s"] = window
    ios = row["ios"] or 1
    if s0.backend_ticks is not None and s1.backend_ticks is not None:
        cpu = (s1.backend_ticks - s0.backend_ticks) / CLK_TCK
        row["backend_cpu_s"] = cpu
        row["backend_cpu_us_per_io"] = cpu / ios * 1e6
        row["backend_cpu_pct"] = 100 * cpu / window if window > 0 else None
    sched = sum(v - s0.backend_sched[t] for t, v in s1.backend_sched.items()
                if t in s0.backend_sched) / 1e9
    row["backend_sched_cpu_s"] = sched
    row["backend_sched_us_per_io"] = sched / ios * 1e6
    row["backend_threads"] = len(s1.backend_sched)
    if s0.qemu_ticks is not None and s1.qemu_ticks is not None:
        qcpu = (s1.qemu_ticks - s0.qemu_ticks) / CLK_TCK
        row["qemu_cpu_s"] = qcpu
        row["qemu_cpu_pct"] = 100 * qcpu / window if window > 0 else None
    return row


def run_boot(kind: str, img: Path, *, runtime: float, ramp: float,
             cases: Sequence[tuple[str, int]] = CASES, engines: Sequence[str] = ENGINES,
             pyvhost_extra: Sequence[str] = (), boot_timeout: float = 120) -> list[dict]:
    """One boot of the guest on backend ``kind`` serving ``img``; a row per case."""
    sockdir = short_tmpdir("pvhb")
    sock = sockdir / "blk.sock"
    script = guest_script(runtime=runtime, ramp=ramp, engines=engines, cases=cases)
    extra_files = g.binary_with_libs(FIO)
    # probe + per case (ramp + run + fio start-up and JSON printing under TCG)
    timeout = boot_timeout + (ramp + 30) * len(engines) + len(cases) * (ramp + runtime + 60)
    common = {"backend": kind, "image_path": str(img), "host_loadavg": os.getloadavg()[0]}
    rows: list[dict] | None = None
    try:
        try:
            with _backend(kind, img, sock, pyvhost_extra) as be:
                common.update(backend_command=be.command, backend_notes=list(be.notes),
                              backend_pid=be.proc.pid)
                watcher = ConsoleWatcher(be.proc.pid)
                t0 = time.monotonic()
                try:
                    res = g.run_guest(script, devices=g.blk_device_args(sock), mem=GUEST_MEM,
                                      timeout=timeout, extra_files=extra_files,
                                      on_start=watcher.on_start)
                finally:
                    watcher.stop()
                values = res.values()
                blocks = {m.group(1): m.group(2) for m in JSON_BLOCK_RE.finditer(res.console)}
                engine = values.get("FIO_ENGINE", "")
                common.update(qemu_command=res.command, guest_s=time.monotonic() - t0,
                              engine=engine, guest_exit=res.exit_code,
                              guest_kernel=values.get("GUEST_KERNEL"),
                              guest_scheduler=values.get("GUEST_SCHED"))
                rows = []
                for label, qd in cases:
                    row = dict(common)
                    row.update(_case_row(label, qd, values, blocks, watcher))
                    row["fio_command"] = shlex.join(fio_args(
                        label, qd, runtime, engine or "?", json_out=f"/tmp/{label}.json",
                        marks=True))
                    row["fio_ramp_s"] = ramp
                    if "iops" not in row and "error" in row:
                        row["error"] += f"; guest exit {res.exit_code}; console tail:\n" + \
                            res.tail(25)
                    rows.append(row)
        except BackendError as e:
            if rows is None:
                raise
            for row in rows:  # the measurement stands; the unclean stop is worth knowing
                row.setdefault("notes", []).append(f"backend stop: {e}".splitlines()[0])
    except (g.GuestError, BackendError, OSError) as e:
        row = dict(common)
        row.update(case="-", error=f"{type(e).__name__}: {e}")
        return [row]
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------------------------
# the benchmark


def run_guest_bench(*, rounds: int = 1, runtime: float = 10, quick: bool = False,
                    ramp: float | None = None, images: Sequence[str] | None = None,
                    backends: Sequence[str] = BACKENDS, image_size: int | None = None,
                    engines: Sequence[str] = ENGINES, pyvhost_extra: Sequence[str] = (),
                    progress: bool = False) -> list[dict]:
    """Rows (dicts) for every (round, image, backend, case); each boot serves both cases.

    ``quick``: runtime <= 3 s, ramp 1 s, the /var/tmp image only, 256 MiB. Otherwise ``ramp``
    defaults to 2 s, ``images`` to ("var-tmp", "tmpfs"), the image size to 512 MiB. Backends
    alternate within a round (A B A B ... over the rounds). A failed boot yields one row with
    ``error`` (and ``case`` "-"); the rest goes on."""
    if quick:
        runtime = min(runtime, 3)
    ramp = ramp if ramp is not None else (1 if quick else 2)
    images = tuple(images or (("var-tmp",) if quick else ("var-tmp", "tmpfs")))
    image_size = image_size or ((256 if quick else 512) * MiB)
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r} (one of {', '.join(BACKENDS)})")
    for k in images:
        if k not in IMAGE_DIRS:
            raise ValueError(f"unknown image kind {k!r} (one of {', '.join(IMAGE_DIRS)})")
    ok, why = g.have_guest_tools()
    if not ok:
        raise RuntimeError(f"guest tools missing: {why}")
    if not os.access(FIO, os.X_OK):
        raise RuntimeError(f"{FIO} not installed")
    rows: list[dict] = []
    paths = {k: Path(IMAGE_DIRS[k]) / f"pyvhost-bench-guest-{os.getpid()}.img" for k in images}
    try:
        for kind, path in paths.items():
            make_image(path, image_size)
        for rnd in range(rounds):
            for kind in images:
                for be in backends:
                    if progress:
                        print(f"# round {rnd + 1}/{rounds}: {be} on {kind} ...",
                              file=sys.stderr, flush=True)
                    for row in run_boot(be, paths[kind], runtime=runtime, ramp=ramp,
                                        engines=engines, pyvhost_extra=pyvhost_extra):
                        row.update(round=rnd, image=kind, image_size=image_size,
                                   runtime_s=runtime)
                        rows.append(row)
    finally:
        for path in paths.values():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return rows


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[dict]) -> str:
    head = (f"{'image':8} {'backend':8} {'case':5} {'engine':8} {'rnd':>3} {'IOPS':>8} "
            f"{'lat us':>8} {'p99 us':>8} {'be us/IO':>9} {'be sch':>7} {'be CPU%':>7} "
            f"{'qemu%':>6} {'gst%':>5} {'ios':>8} {'blk ios':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        if "iops" not in r:
            out.append(f"{r.get('image', '?'):8} {r.get('backend', '?'):8} "
                       f"{r.get('case', '-'):5} ERROR: {r.get('error', '?').splitlines()[0]}")
            continue
        gst = (r.get("guest_usr_cpu_pct") or 0) + (r.get("guest_sys_cpu_pct") or 0)
        out.append(
            f"{r['image']:8} {r['backend']:8} {r['case']:5} {r.get('engine', ''):8} "
            f"{r.get('round', 0):>3} {r['iops']:>8.0f} {r['lat_mean_us']:>8.1f} "
            f"{r['clat_p99_us']:>8.1f} {_f(r.get('backend_cpu_us_per_io'), '>9.2f')} "
            f"{_f(r.get('backend_sched_us_per_io'), '>7.2f')} "
            f"{_f(r.get('backend_cpu_pct'), '>7.1f')} {_f(r.get('qemu_cpu_pct'), '>6.0f')} "
            f"{gst:>5.0f} {r['ios']:>8} {_f(r.get('block_ios'), '>8')}")
    rounds = {r.get("round", 0) for r in rows}
    if len(rounds) > 1:
        out += ["", "medians over rounds:"]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if "iops" in r:
                groups.setdefault((r["image"], r["backend"], r["case"]), []).append(r)
        for (img, be, case), rs in groups.items():
            cpu = [r["backend_cpu_us_per_io"] for r in rs if r.get("backend_cpu_us_per_io")]
            out.append(f"{img:8} {be:8} {case:5} n={len(rs)} "
                       f"IOPS {statistics.median(r['iops'] for r in rs):.0f}  "
                       f"lat {statistics.median(r['lat_mean_us'] for r in rs):.1f} us  "
                       f"backend {_f(statistics.median(cpu) if cpu else None, '.2f')} us/IO")
    out += ["",
            "lat: fio mean completion latency seen by the guest; be us/IO: backend utime+stime "
            "(/proc/PID/stat) over the measured fio run / fio's I/Os; be sch: the same from "
            "per-thread schedstat (ns); be CPU%, qemu%: of one host core over the run; gst%: "
            "fio's usr+sys CPU in the guest; blk ios: guest block-layer reads in the window."]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.guest", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true",
                   help="3 s runs, 1 s ramp, /var/tmp image only (about a minute)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--runtime", type=float, default=10, help="seconds per fio case")
    p.add_argument("--ramp", type=float, default=None, help="seconds of ramp per case")
    p.add_argument("--images", default=None,
                   help=f"comma-separated image kinds ({', '.join(IMAGE_DIRS)})")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="fio ioengines to try in order; the first that works is used")
    p.add_argument("--pyvhost-args", default="", metavar="ARGS",
                   help="extra pyvhost-blk arguments, e.g. '--poll-us 50'")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    a = p.parse_args(argv)
    rows = run_guest_bench(
        rounds=a.rounds, runtime=a.runtime, quick=a.quick, ramp=a.ramp,
        images=a.images.split(",") if a.images else None, backends=a.backends.split(","),
        engines=a.engines.split(","), pyvhost_extra=shlex.split(a.pyvhost_args), progress=True)
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0 if all("iops" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
