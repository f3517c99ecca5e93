"""python -m bench.netcost [--size N ...] [--qsize N] [--reps N] [--json FILE]
                         [--tree DIR --tree DIR ... [--alternations N]]

The switch's rx path per frame, on one core: what bench/net.py's source and forward modes pay
for each frame delivered into a guest's rx ring (switch_forward, port_receive, rx_deliver:
pop, copy, used entry), timed without a second process on the other CPU.  bench/net.py's
figures on this 2-vCPU machine are bimodal (the same build at 2.3 and 6.6 Mpps in one run,
depending on where the hypervisor runs the two busy threads), far wider than a change of
10-20 % of the per-frame cost; this is the A/B number for such a change, the end-to-end
benches the target's.

Each size: a switch with a generator port (cython_ext.net Port.generate, as bench/netsource.py
uses it) and a receiving port (locked MAC: the unicast path) whose rx queue is a split ring of
--qsize 2 KiB buffers in memory of our own (vhost.testing's GuestRAM / VirtQueue, the driver
side).  One rep: every buffer posted (the avail ring written outside the timed part), then
generate() of --qsize frames, all of them delivered; ns/frame is generate()'s own clock over
the frames.  Printed: median and best over the reps.  With --tree (repeatable: checkouts, each
built in place), the same measurement runs as a child per tree with that tree first on the
path, trees alternated --alternations times (the machine drifts within minutes), and per tree
the median of the children's medians and the best are printed: how a change to the rx path is
judged (the figures in issue 13's note).  Owns nothing the product uses.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from cython_ext.net import Port, Switch
from protocols import virtio_net as vn
from vhost.memory import GuestMemory, MappedRegion
from vhost.testing.ram import GuestRAM, one_region_layout
from vhost.testing.virtqueue import VirtQueue

SRC = bytes.fromhex("020000000042")
DST = bytes.fromhex("020000000001")
BUF = 2048                           # DPDK's default mbuf data room


def measure(size: int, qsize: int, reps: int) -> dict:
    mem_size = (qsize * BUF + (4 << 20) + (1 << 20) - 1) & ~((1 << 20) - 1)
    ram = GuestRAM(mem_size, one_region_layout(mem_size))
    mem = GuestMemory(MappedRegion.map(ram.fd, r.gpa, r.size, ram.region_user_addr(r),
                                       r.mmap_offset) for r in ram.regions)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    rx = VirtQueue(ram, 0, qsize, event_idx=True, kick_fd=-1, call_fd=call)
    heads = [rx.add_chain([(ram.alloc(BUF), BUF, True)]) for _ in range(qsize)]
    sw = Switch("cost")
    gen = Port("vhost", 1, sw, 0)
    dst = Port("vhost", 1, sw, 1)
    dst.set_mac(DST, lock=True)
    dst.set_features(hdr_len=vn.HDR_SIZE, mrg_rxbuf=True, guest_csum=True, guest_tso4=True,
                     guest_tso6=True, guest_ufo=False, guest_ecn=False)
    d, u, a = rx.addresses()
    dst.attach_rx(0, qsize, mem.uva_to_host(d, 16 * qsize), mem.uva_to_host(a, 6 + 2 * qsize),
                  mem.uva_to_host(u, 6 + 8 * qsize), 0, mem.table_bytes(), call, True, True)
    body = bytes(range(256)) * (size // 256 + 1)
    frame = DST + SRC + b"\x88\xb5" + body[:size - 14]
    ns = []
    try:
        for rep in range(reps + 1):                    # rep 0 warms up: buffers touched once
            before = rx.used_idx()
            rx.publish(heads)
            sent, secs = gen.generate(frame, qsize, 10.0)
            got = (rx.used_idx() - before) & 0xFFFF
            if got != qsize or sent != qsize:
                raise SystemExit(f"netcost: {sent} generated, {got} delivered of {qsize}")
            if rep:
                ns.append(secs * 1e9 / sent)
    finally:
        dst.detach_rx(0)
        dst.detach()
        gen.detach()
        os.close(call)
        mem.unmap_all()
        ram.close()
    return dict(size=size, qsize=qsize, reps=reps, ns_median=statistics.median(ns),
                ns_best=min(ns), mpps_median=1e3 / statistics.median(ns))


def compare(trees: list[str], args) -> int:
    """Run this module once per tree per alternation; summarize per tree and size."""
    got: dict[tuple[str, int], list[dict]] = {}
    here = os.path.abspath(__file__)
    for _ in range(args.alternations):
        for t in trees:
            argv = ["netcost", "--qsize", str(args.qsize), "--reps", str(args.reps),
                    "--json", "-"]
            for sz in args.size or [64, 1500]:
                argv += ["--size", str(sz)]
            # this file run in the tree (which may predate it), that tree's modules first
            cmd = [sys.executable, "-c", "import runpy, sys; sys.argv = " + repr(argv)
                   + "; runpy.run_path(" + repr(here) + ", run_name='__main__')"]
            env = dict(os.environ, PYTHONPATH=os.path.abspath(t))
            out = subprocess.run(cmd, env=env, cwd=t, check=True, capture_output=True,
                                 text=True).stdout
            for row in json.loads(out):
                got.setdefault((t, row["size"]), []).append(row)
    print(f"{'tree':40} {'size':>5} {'ns/frame median':>16} {'best':>8}")
    rows = []
    for (t, size), rs in got.items():
        med = statistics.median(r["ns_median"] for r in rs)
        best = min(r["ns_best"] for r in rs)
        rows.append(dict(tree=t, size=size, runs=len(rs), ns_median=med, ns_best=best))
        print(f"{t[-40:]:40} {size:5d} {med:16.1f} {best:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.netcost", description=__doc__.split("\n\n")[1])
    p.add_argument("--size", type=int, action="append", help="frame length (repeatable)")
    p.add_argument("--qsize", type=int, default=4096, help="rx ring size: frames per rep")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--json", help="also write the rows as JSON (-: only them, to stdout)")
    p.add_argument("--tree", action="append", help="a built checkout to compare (repeatable)")
    p.add_argument("--alternations", type=int, default=8)
    args = p.parse_args(argv)
    if args.tree:
        return compare(args.tree, args)
    rows = [measure(s, args.qsize, args.reps) for s in (args.size or [64, 1500])]
    if args.json == "-":                               # a --tree child: rows to stdout
        print(json.dumps(rows))
        return 0
    print(f"{'size':>5} {'ns/frame median':>16} {'best':>8} {'Mpps':>7}")
    for r in rows:
        print(f"{r['size']:5d} {r['ns_median']:16.1f} {r['ns_best']:8.1f} {r['mpps_median']:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
