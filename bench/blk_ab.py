"""bench/blk_ab.py: pyvhost-blk builds from several source trees side by side, with
qemu-storage-daemon as the common anchor, on one medium, in one run.

Each `--tree NAME=PATH[,VAR=VALUE...]` is a checkout with its extensions built in place
(`python setup.py build_ext --inplace`); its pyvhost-blk runs with PYTHONPATH=PATH and the
given environment.  All backends serve the same image at once; every workload is measured
`rounds` times, the backend order reversed every other round (a drifting disk favours none),
each measurement on a fresh connection (bench.blk.measure: warm up, then the backend's CPU
time around the measured interval).  Prints, per workload, the median IOPS and CPU seconds
per million I/Os of each backend and its ratio to QSD.  How a change to the engine was judged
(issue 13: the file engine through liburing, `bench/experiments/liburing.patch`):

    git worktree add /var/tmp/lu HEAD && cd /var/tmp/lu && git apply bench/experiments/liburing.patch
    python setup.py build_ext --inplace && cd -
    python -m bench.blk_ab --tree hand=. --tree liburing=/var/tmp/lu \\
        --tree liburing+fixed=/var/tmp/lu,PYVHOST_URING_FIXED=1 --media tmpfs,disk --rounds 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import zlib
from pathlib import Path

from bench import blk as B


def parse_tree(spec: str) -> tuple[str, Path, dict]:
    name, _, rest = spec.partition("=")
    path, *envs = rest.split(",")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--tree NAME=PATH[,VAR=VALUE...], not {spec!r}")
    return name, Path(path).resolve(), dict(e.split("=", 1) for e in envs)


def tree_backend(name: str, root: Path, env_extra: dict, medium: B.Medium) -> B.BackendProc:
    wd = Path(tempfile.mkdtemp(prefix=f"pvhab-{name.replace('+', '-')}-", dir="/tmp"))
    sock = wd / "blk.sock"
    cmd = [sys.executable, "-m", "vhost.programs", "pyvhost-blk", "--socket-path", str(sock),
           "--num-queues", str(B.NUM_QUEUES), "--blk-file", str(medium.path)]
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONUNBUFFERED="1", **env_extra)
    b = B.BackendProc(name, medium.name, cmd, sock, wd / "backend.log", env=env)
    if not b.start():
        raise B.BenchError(f"{name} exited at start-up:\n{B._tail(b.log_path)}")
    return b


def run(trees, media, workloads, rounds, duration, warmup=0.75) -> list[dict]:
    rows = []
    for mname in media:
        with B.prepared_medium(mname, B.IMAGE_SIZES[mname]) as medium:
            bks: list[B.BackendProc] = []
            try:
                for name, root, env in trees:
                    bks.append(tree_backend(name, root, env, medium))
                bks.append(B.qsd_backend(
                    medium, Path(tempfile.mkdtemp(prefix="pvhab-qsd-", dir="/tmp"))))
                for wl in workloads:
                    res: dict[str, list[dict]] = {b.name: [] for b in bks}
                    for r in range(rounds):
                        for b in (bks if r % 2 == 0 else bks[::-1]):
                            seed = zlib.crc32(f"{wl.name}/{r}".encode()) & 0xFFFFFF
                            res[b.name].append(B.measure(
                                b, wl, size=medium.size, duration=duration, warmup=warmup,
                                seed=seed, others=[o for o in bks if o is not b],
                                block_stat=medium.block_stat))
                    q = statistics.median(m["iops"] for m in res["qsd"])
                    for b in bks:
                        iops = [m["iops"] for m in res[b.name]]
                        rows.append(dict(
                            medium=mname, workload=wl.name, backend=b.name,
                            iops=statistics.median(iops), iops_rounds=iops,
                            cpu_s_per_mio=statistics.median(m["cpu_s_per_mio"]
                                                            for m in res[b.name]),
                            dev_qd=B._mean(m.get("dev_qd") for m in res[b.name]),
                            x_qsd=statistics.median(iops) / q if q else None))
                    print(format_rows(rows[-len(bks):]), flush=True)
            finally:
                for b in bks:
                    b.stop()
    return rows


def format_rows(rows: list[dict]) -> str:
    return "\n".join(
        f"{r['medium']:6s} {r['workload']:20s} {r['backend']:16s} {r['iops']:9.0f} IOPS "
        f"({min(r['iops_rounds']):.0f}..{max(r['iops_rounds']):.0f})  "
        f"{r['cpu_s_per_mio']:6.2f} s/MIO  x{r['x_qsd']:.2f} QSD" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", type=parse_tree, required=True)
    ap.add_argument("--media", default="tmpfs,disk")
    ap.add_argument("--workloads", default="4k-randread-qd32,4k-randwrite-qd32,64k-seqread-qd16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    wls = [w for w in B.WORKLOADS if w.name in a.workloads.split(",")]
    rows = run(a.tree, a.media.split(","), wls, a.rounds, a.duration)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
