"""python -m tests.fuzz.seeds: (re)write the committed seed corpora in tests/fuzz/corpus/.

protocol: the recorded QEMU / DPDK conversations of tests/data/traces (every frontend message
with fresh fds of the right kind, features masked to what our device offers, as
tests/unit/test_protocol.py replays them) and one queue started on each device type with a
request in its ring and a kick.  config: the shipped example, the README's example and the
kinds of files tests/unit/test_config.py writes.  The ring and net targets start from nothing
(their inputs are layouts, not texts; the fuzzer builds them within seconds).
Seeds are named by their SHA-1, as libFuzzer names corpus files.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import struct

from protocols import vhost_user as vu
from protocols import virtio_blk as vb

from tests.fuzz.data import Writer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CORPUS = os.path.join(HERE, "corpus")
TRACES = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "traces", "*.jsonl")))

# tests/fuzz/protocol.py: step numbers and fd kinds
MSG, SETUP, POKE, KICK = 0, 3, 4, 5
FIT, EVENTFD, SOCKET = 0, 2, 6
DEV_RNG, DEV_BLK, DEV_NET = 0, 1, 2


def offered(kind: int, queues: int = 1) -> tuple[int, int]:
    """(virtio features, protocol features) our device of that kind offers."""
    from vhost.protocol import BackendProtocol
    if kind == DEV_RNG:
        from devices.rng import RngDevice
        dev = RngDevice()
    elif kind == DEV_BLK:
        from devices.blk import BlkDevice
        dev = BlkDevice(None, null_size=1 << 20, num_queues=queues)
    else:
        from cython_ext.net import Switch
        from devices.net import NetDevice
        dev = NetDevice(pairs=queues, mac=b"\x52\x54\x00\x00\x00\x01", switch=Switch(),
                        name="seed")
    p = BackendProtocol(dev)
    return p.offered_features, int(p.offered_protocol_features)


def msg(w: Writer, request: int, payload: bytes, flags: int, fd_kinds=(), delivery=1) -> None:
    w.u8(MSG)
    if request < 64:
        w.u8(request)
    else:
        w.u8(0xFF).u32(request)
    w.u8(flags & 0x0F)
    w.u16(len(payload)).bytes(payload)
    w.u8(len(fd_kinds))
    for k in fd_kinds:
        w.u8(k)
    w.u8(delivery)


def trace_seed(path: str) -> bytes:
    events = [json.loads(line) for line in open(path) if line.strip()]
    replies = {e["name"]: bytes.fromhex(e["payload"]) for e in reversed(events)
               if e.get("dir") == "backend->frontend"}
    qn = struct.unpack("<Q", replies["GET_QUEUE_NUM"])[0] if "GET_QUEUE_NUM" in replies else 1
    if "blk" in os.path.basename(path):
        kind, sel, queues = DEV_BLK, DEV_BLK | (qn - 1) << 2, qn
    else:
        kind, sel, queues = DEV_NET, DEV_NET, 1          # both recordings: one pair
    features, pfeatures = offered(kind, queues)
    w = Writer().u8(sel)
    for e in events:
        if e.get("dir") != "frontend->backend":
            continue
        payload = bytes.fromhex(e["payload"])
        if e["name"] == "SET_FEATURES":
            payload = vu.u64(struct.unpack("<Q", payload)[0] & features)
        elif e["name"] == "SET_PROTOCOL_FEATURES":
            payload = vu.u64(struct.unpack("<Q", payload)[0] & pfeatures)
        if e["name"] in ("SET_MEM_TABLE", "ADD_MEM_REG", "REM_MEM_REG"):
            fds = [FIT] * e["nfds"]
        elif e["name"] == "SET_BACKEND_REQ_FD":
            fds = [SOCKET] * e["nfds"]
        else:
            fds = [EVENTFD] * e["nfds"]
        msg(w, e["request"], payload, e["flags"], fds)
    return w.getvalue()


def poke(w: Writer, offset: int, data: bytes) -> None:
    """Into the SETUP memory (queue q's rings are at q * 0x4000: desc, +0x2000 avail,
    +0x3000 used)."""
    for k in range(0, len(data), 64):               # a POKE writes at most 64 bytes
        part = data[k:k + 64]
        w.u8(POKE).u8(0x80).u32(offset + k).u8(len(part) - 1).bytes(part)


def desc(addr: int, length: int, flags: int, nxt: int = 0) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


def setup_seed(sel: int, q: int, chain: list, opts: int = 1, data=()) -> bytes:
    """SETUP of queue q (16 entries, every offered feature), `data` [(offset, bytes)] and one
    chain in its ring, a kick, GET_VRING_BASE."""
    w = Writer().u8(sel)
    w.u8(SETUP).u8(q).u8(4).u64((1 << 64) - 1).u8(opts).u16(0)
    base = q * 0x4000
    for offset, b in data:
        poke(w, offset, b)
    poke(w, base, b"".join(desc(*d) for d in chain))
    poke(w, base + 0x2000, struct.pack("<HHH", 0, 1, 0))
    w.u8(KICK).u8(1)                    # our eventfd dups: [call, kick]
    msg(w, vu.FrontendReq.GET_VRING_BASE, vu.VringState.build(dict(index=q, num=0)), 1)
    return w.getvalue()


def protocol_seeds() -> list[bytes]:
    seeds = [trace_seed(p) for p in TRACES]
    hdr = vb.ReqHeader.build(dict(type=vb.T_IN, reserved=0, sector=8))
    blk_mem = 0x20000
    seeds.append(setup_seed(DEV_RNG, 0, [(0x20000, 256, 2)]))
    seeds.append(setup_seed(DEV_BLK, 0, [(blk_mem - 0x100, 16, 1, 1), (blk_mem, 512, 3, 2),
                                         (blk_mem + 512, 1, 2)], data=[(blk_mem - 0x100, hdr)]))
    frame = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x01" + b"\x08\x06" + bytes(46)
    seeds.append(setup_seed(DEV_NET, 1, [(0x20000, 12 + len(frame), 0)],
                            data=[(0x20000, bytes(12) + frame)]))
    seeds.append(setup_seed(DEV_NET, 0, [(0x20000, 2048, 2)], opts=1 | 2 | 8))
    return seeds


def config_seeds() -> list[bytes]:
    texts = [open(os.path.join(ROOT, "vhost", "data", "pyvhost.toml")).read()]
    readme = open(os.path.join(ROOT, "README.md")).read()
    texts += re.findall(r"```toml\n(.*?)```", readme, re.S)
    d = "/tmp"
    texts += [
        f'[[device]]\nname = "vda"\ntype = "block"\nsocket = "{d}/vda.sock"\nnull = true\n'
        'size = "1G"\nnum-queues = 4\nserial = "abc"\n',
        f'[[device]]\nname = "r"\ntype = "rng"\nsocket = "{d}/r.sock"\nmax-bytes = 4096\n'
        'period = 500\n',
        f'[[switch]]\nname = "sw0"\nmac-ageing = 300\n[[device]]\nname = "p"\ntype = "net"\n'
        f'socket = "{d}/p.sock"\nswitch = "sw0"\nqueues = 2\nmtu = 9000\n'
        'mac = "52:54:00:00:00:01"\n',
        f'[[device]]\nname = "n"\ntype = "net"\nsocket = "{d}/n.sock"\ntap = "t0"\n'
        'switch = "s"\n',
        '[service]\nmetrics-address = "[::1]:9560"\nlog-level = "debug"\nsocket-mode = "0660"\n'
        'stop-timeout = 2.5\nloop = "asyncio"\n',
    ]
    seeds = [b"\x00" + t.encode() for t in texts] + [b"\x01" + t.encode() for t in texts[:2]]
    seeds += [b"\x02" + bytes(range(1, 40)), b"\x03" + bytes(range(7, 90, 3))]
    return seeds


def write(target: str, seeds: list[bytes]) -> None:
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    for old in glob.glob(os.path.join(d, "*")):
        os.unlink(old)
    for s in seeds:
        with open(os.path.join(d, hashlib.sha1(s).hexdigest()), "wb") as f:
            f.write(s)
    print(f"{d}: {len(seeds)} seeds, {sum(map(len, seeds))} bytes")


def main() -> None:
    import logging
    logging.disable(logging.CRITICAL)
    write("protocol", protocol_seeds())
    write("config", config_seeds())


if __name__ == "__main__":
    main()
