"""Microbenchmarks (pytest-benchmark) of the pieces on the data and control paths: the chain walk
(vq_pop over direct and indirect chains), the used-ring push + publish, and vhost-user message
parsing through the sans-I/O protocol.  Each also checks it measured what it claims (the right
number of chains popped, entries pushed, replies produced), so a broken build cannot report a
fast number.  Run: `.venv/bin/python -m pytest bench/micro --benchmark-only` (bench/run.py does,
with --benchmark-json)."""
import struct

import pytest

from cython_ext.ring import RingProbe
from protocols import vhost_user as vu
from vhost.testing.ringrig import MEM
from vhost.device import Device
from vhost.testing.ram import GuestRAM, one_region_layout
from vhost.testing.virtqueue import VirtQueue
from vhost.memory import GuestMemory, MappedRegion
from vhost.protocol import BackendProtocol

QSIZE = 1024


class Ring:
    def __init__(self, segs_per_chain=3, indirect=False):
        self.ram = GuestRAM(MEM * 4, one_region_layout(MEM * 4))
        r = self.ram.regions[0]
        self.mem = GuestMemory([MappedRegion.map(self.ram.fd, r.gpa, r.size,
                                                 self.ram.region_user_addr(r), r.mmap_offset)])
        self.vq = VirtQueue(self.ram, 0, QSIZE, event_idx=True, kick_fd=-1, call_fd=-1)
        bufs = self.ram.alloc(4096 * 8)
        heads = []
        for k in range(QSIZE if not indirect else QSIZE):
            segs = [(bufs, 16, False)] + [(bufs + 512 * j, 512, True)
                                          for j in range(1, segs_per_chain - 1)] + \
                   [(bufs + 4095, 1, True)]
            try:
                heads.append(self.vq.add_chain(segs, indirect=indirect))
            except Exception:
                break
        self.n = len(heads)
        self.vq.publish(heads)
        d, u, a = self.vq.addresses()
        self.addrs = (self.mem.uva_to_host(d, 16 * QSIZE), self.mem.uva_to_host(a, 6 + 2 * QSIZE),
                      self.mem.uva_to_host(u, 6 + 8 * QSIZE))
        self.table = self.mem.table_bytes()

    def probe(self):
        return RingProbe(QSIZE, *self.addrs, 0, self.table, event_idx=True, indirect=True)

    def close(self):
        self.mem.unmap_all()
        self.ram.close()


@pytest.mark.parametrize("kind", ["direct-3", "direct-8", "indirect-8"])
def test_chain_walk(benchmark, kind):
    segs = int(kind.split("-")[1])
    ring = Ring(segs, indirect=kind.startswith("indirect"))
    try:
        def walk():
            return ring.probe().pop_many(ring.n)
        got = benchmark(walk)
        assert got == ring.n
        benchmark.extra_info["chains_per_round"] = ring.n
    finally:
        ring.close()


def test_used_push(benchmark):
    ring = Ring(3)
    try:
        p = ring.probe()
        calls = []

        def push():
            calls.append(1)
            p.push_many(1, 4097, QSIZE)       # QSIZE used entries, one publish
        benchmark(push)
        assert p.used_idx == (QSIZE * len(calls)) % 65536
        used_idx = struct.unpack("<H", ring.ram.read(ring.vq.used_gpa + 2, 2))[0]
        assert used_idx == p.used_idx
        benchmark.extra_info["entries_per_round"] = QSIZE
    finally:
        ring.close()


class NullDevice(Device):
    num_queues = 2

    def features(self):
        return 1 << 32

    def start_queue(self, index, queue):
        pass

    def stop_queue(self, index):
        return 0


@pytest.mark.parametrize("request_name", ["GET_FEATURES", "SET_VRING_NUM+ACK", "GET_CONFIG"])
def test_message_parse(benchmark, request_name):
    proto = BackendProtocol(NullDevice())
    # negotiate REPLY_ACK so NEED_REPLY gets an ack
    proto.receive(vu.build_message(vu.FrontendReq.SET_FEATURES,
                                   vu.u64((1 << 32) | vu.VHOST_USER_F_PROTOCOL_FEATURES)), [])
    proto.receive(vu.build_message(vu.FrontendReq.SET_PROTOCOL_FEATURES,
                                   vu.u64(int(vu.ProtocolFeature.REPLY_ACK
                                              | vu.ProtocolFeature.CONFIG))), [])
    if request_name == "GET_FEATURES":
        m = vu.build_message(vu.FrontendReq.GET_FEATURES)
    elif request_name == "GET_CONFIG":
        m = vu.build_message(vu.FrontendReq.GET_CONFIG, vu.Config.build(
            dict(offset=0, size=60, flags=0, payload=bytes(60))))
    else:
        m = vu.build_message(vu.FrontendReq.SET_VRING_NUM,
                             vu.VringState.build(dict(index=0, num=256)),
                             vu.VERSION | vu.FLAG_NEED_REPLY)
    replies = benchmark(proto.receive, m, [])
    assert len(replies) == 1
    assert vu.Header.parse(replies[0]).flags & vu.FLAG_REPLY
