"""python -m bench.netsource --socket-path PATH [--pkt-len N] [--queue-size N] [--seconds S]

pyvhost as a frame source, for bench/net.py's source mode (issue 13: the reverse direction of
the sink): a switch whose port 0 is a vhost-user net device on PATH (NetDevice, served by
vhost.server as pyvhost-net serves a --switch port) and whose port 1 is a generator
(cython_ext.net Port.generate: the same frame sent into the switch flat out, with the GIL
released, as a guest's tx worker would hand frames to the switch). The generator's frames
have an unknown destination, so the switch floods them to port 0, whose guest (testpmd rxonly
on net_virtio_user) receives them through the product's rx path: rx_deliver into its
buffers, used entries published once per batch. When the ring is full the frame is dropped
and counted, as for any sender.

At SIGTERM (or after --seconds) it prints one JSON line: frames generated, and port 0's rx
counters (delivered, dropped). Owns nothing the product uses (bench/net.py and
tests/integration/test_net_generate.py run it as a program).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time

import devices.net
from cython_ext.net import Port, Switch
from vhost.server import Server, new_event_loop

SRC_MAC = bytes.fromhex("020000000042")
DST_MAC = bytes.fromhex("02000000ee01")      # nobody's: flooded to port 0
PORT_MAC = bytes.fromhex("020000000001")
CHUNK = 0.1                                  # s per generate() call: SIGTERM is seen this soon


def frame(pkt_len: int) -> bytes:
    """An Ethernet frame of pkt_len bytes (no FCS), ethertype 0x88b5 (local experimental)."""
    body = bytes(range(256)) * (pkt_len // 256 + 1)
    return DST_MAC + SRC_MAC + b"\x88\xb5" + body[:pkt_len - 14]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.netsource")
    ap.add_argument("--socket-path", required=True)
    ap.add_argument("--pkt-len", type=int, default=64)
    ap.add_argument("--queue-size", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=600.0, help="bound on the run")
    args = ap.parse_args(argv)
    sw = Switch("sw0")
    dev = devices.net.NetDevice(pairs=1, mac=PORT_MAC, switch=sw, port_index=0,
                                max_queue_size=args.queue_size, name="sw0:0")
    gen = Port("vhost", 1, sw, 1)
    data = frame(args.pkt_len)
    stop = threading.Event()
    total = [0, 0.0]

    def generate() -> None:
        deadline = time.monotonic() + args.seconds
        while not stop.is_set() and time.monotonic() < deadline:
            n, dt = gen.generate(data, 1 << 62, CHUNK)
            total[0] += n
            total[1] += dt

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    server = Server(dev, socket_path=args.socket_path, name="sw0:0")
    task = loop.create_task(server.serve_forever())
    loop.add_signal_handler(signal.SIGTERM, server.stop)
    loop.add_signal_handler(signal.SIGINT, server.stop)
    t = threading.Thread(target=generate, name="pyvhost-gen", daemon=True)
    t.start()
    loop.call_later(args.seconds, server.stop)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    finally:
        stop.set()
        t.join(CHUNK * 20)
        counters = dev.queue_counters()
        dev.reset()
        dev.close()
        gen.detach()
        loop.close()
    rx = counters.get(0, {})          # queue 0: the guest's rx queue (pair 0)
    print(json.dumps({"generated": total[0], "generate_seconds": round(total[1], 3),
                      "delivered": rx.get("requests", 0), "dropped": rx.get("dropped", 0)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
