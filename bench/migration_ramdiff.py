"""bench/migration_ramdiff.py: does a live migration lose guest writes?  Runs the e2e migration
guest (tests/e2e/test_migration.py's workload: write+verify passes while the migration iterates
at 8 MiB/s, then idle) with the destination paused after the switch-over, dumps both sides'
guest RAM and counts the 4 KiB pages that differ.  A page that differs is a write the migration
did not carry: by the device (a missing dirty-log bit) or by the guest's CPU (QEMU's own dirty
tracking).  The disk is pyvhost-blk (split or packed rings) or QEMU's built-in virtio-blk on the
same image, which takes vhost-user out of the picture.

    .venv/bin/python -m bench.migration_ramdiff [--disk pyvhost|builtin] [--ring split|packed]
                                                 [--queues N] [--runs N] [--accel tcg,...]

Prints one line per run (pages that differ, their addresses, how many of them the source's
pyvhost ever wrote -- PYVHOST_LOG_SHADOW, cython_ext/ring.pyx: a copy of every dirty-log bit
that nobody clears --, whether the destination guest then finished its checks) and a summary.
A lost page the device never wrote was written by the guest's CPU: QEMU's to track.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from vhost.testing import guest as g
from vhost.testing.backends import pyvhost_blk
from vhost.testing.migrate import MigrationRun, shadow_pages

MiB = 1 << 20
P1, P2, SLOTS = 20, 40, 16
BANDWIDTH = 8 << 20


def workload_script(cpus: int) -> str:
    """The e2e test's guest script (read from the test file: one source of truth)."""
    text = (Path(__file__).resolve().parents[1] / "tests/e2e/test_migration.py").read_text()
    script = re.search(r'^SCRIPT = r"""(.*?)^"""', text, re.S | re.M).group(1)
    return (script.replace("@P1@", str(P1)).replace("@P2@", str(P2))
            .replace("@SLOTS@", str(SLOTS)).replace("@CPUS@", str(cpus)))


KEEP = None          # --keep DIR: the RAM dumps of the last run stay there


def one_run(disk: str, ring: str, queues: int,
            accel: str | None) -> tuple[list[int], set[int], int, str]:
    work = Path(tempfile.mkdtemp(prefix="ramdiff-", dir="/var/tmp"))
    sockdir = g.short_tmpdir("rdif")
    img = work / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    extra = "packed=on" if ring == "packed" else ""
    try:
        with contextlib.ExitStack() as stack:
            shadow = work / "shadow.bin"
            if disk == "pyvhost":
                os.environ["PYVHOST_LOG_SHADOW"] = str(shadow)
                try:
                    src = stack.enter_context(pyvhost_blk(img, sockdir / "src.sock",
                                                          num_queues=queues))
                finally:
                    del os.environ["PYVHOST_LOG_SHADOW"]
                dst = stack.enter_context(pyvhost_blk(img, sockdir / "dst.sock",
                                                      num_queues=queues))
                devs = [g.blk_device_args(b.sock, queues, extra=extra) for b in (src, dst)]
            else:
                d = ["-blockdev", f"driver=file,filename={img},node-name=f0,locking=off,"
                     "cache.direct=on",
                     "-device", f"virtio-blk-pci,drive=f0,num-queues={queues}"
                     + (f",{extra}" if extra else "")]
                devs = [d, d]
            run = stack.enter_context(MigrationRun(
                workload_script(queues), cpus=queues, extra_append="init_on_alloc=0",
                source_devices=devs[0], dest_devices=devs[1], pause_destination=True))
            if accel:
                for cmd in run.cmds.values():
                    cmd[cmd.index("tcg")] = accel
            run.start()
            run.wait_console("source", "PASS 2\n", timeout=120)
            run.start_migration(max_bandwidth=BANDWIDTH, downtime_limit_ms=1)
            run.wait_console("source", "PHASE2\n", timeout=P1 + 120)
            run.set_parameters(**{"downtime-limit": 300})
            run.wait_migration(timeout=240)
            pages = run.ram_diff(keep=KEEP)
            device = shadow_pages(shadow)
            if KEEP and shadow.exists():
                shutil.copy(shadow, os.path.join(KEEP, "device-pages.bin"))
            written, logged = device & set(pages), len(device)
            run.resume_destination()
            try:
                _, _, rc = run.wait(timeout=P2 + 180)
                outcome = "guest ok" if rc == 0 else f"guest checks failed ({rc})"
            except g.GuestError as e:
                outcome = f"guest died: {str(e).splitlines()[-1][:100]}"
        return pages, written, logged, outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--disk", choices=("pyvhost", "builtin"), default="pyvhost")
    p.add_argument("--ring", choices=("split", "packed"), default="split")
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--accel", help="QEMU -accel value instead of tcg (e.g. tcg,thread=single)")
    p.add_argument("--keep", help="keep the last run's RAM dumps and device page map here")
    a = p.parse_args(argv)
    global KEEP
    KEEP = a.keep
    diverged = by_device = 0
    for k in range(a.runs):
        pages, written, logged, outcome = one_run(a.disk, a.ring, a.queues, a.accel)
        diverged += bool(pages)
        by_device += bool(written)
        print(f"run {k + 1}: {len(pages)} pages differ {[hex(x) for x in pages[:8]]}"
              + (f", {len(written)} of them written by the device "
                 f"{[hex(x) for x in sorted(written)[:8]]} (it logged {logged} pages)"
                 if a.disk == "pyvhost" else "")
              + f"; {outcome}", flush=True)
    print(f"{a.disk} {a.ring} queues={a.queues}: {diverged} of {a.runs} migrations lost "
          f"writes" + (f", {by_device} of them pages the device wrote"
                       if a.disk == "pyvhost" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
