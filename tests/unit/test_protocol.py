"""Sans-I/O tests of vhost/protocol.py: every message, acks, fd ownership, the queue lifecycle,
memory changes, and replays of the recorded QEMU/DPDK conversations in tests/data/traces/."""
from __future__ import annotations

import ctypes
import errno
import glob
import json
import fcntl
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocols import virtio
from protocols import vhost_user as vu
from protocols.vhost_user import FrontendReq as R, ProtocolFeature as PF
from vhost.device import Device, QueueHandle, WorkerStuck
from vhost.protocol import MAX_MEM_SLOTS, SUPPORTED_PROTOCOL_FEATURES, BackendProtocol, \
    Limits, ProtocolClosed, check_event_fd

# The recorded conversations live in the repository (tests/data/traces, see its README.md); no
# fallback: a missing directory must fail the replay, not collect zero cases.
TRACE_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data",
                                          "traces"))
TRACES = sorted(glob.glob(os.path.join(TRACE_DIR, "*.jsonl")))

NEED = vu.VERSION | vu.FLAG_NEED_REPLY
REPLY = vu.VERSION | vu.FLAG_REPLY
BIT30 = vu.VHOST_USER_F_PROTOCOL_FEATURES
BASE_FEATURES = virtio.F_VERSION_1 | virtio.F_RING_EVENT_IDX | virtio.F_RING_INDIRECT_DESC

MEM_SIZE = 1 << 20
GPA = 0x0
UVA = 0x7F00_0000_0000
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000      # offsets of the rings in the region
QSIZE = 256


# --- a recording fake device -----------------------------------------------------------------

class FakeDevice(Device):
    """Records start/stop; stop returns `position[index]` if set, else the start index plus
    `advance[index]` (what a worker that processed that many requests would report)."""

    def __init__(self, num_queues=2, features=BASE_FEATURES, protocol_features=None,
                 config=bytes(range(60)), max_queue_size=1024):
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self._features = features
        self._pf = protocol_features
        self.config = bytearray(config)
        self.events = []
        self.running: dict[int, QueueHandle] = {}
        self.advance: dict[int, int] = {}
        self.position: dict[int, int] = {}
        self.acked = []
        self.resets = 0
        self.fail_start = False
        self.stop_saw_unmapped = []      # memory of a stopped worker unmapped before its stop?

    def features(self):
        return self._features

    def protocol_features(self):
        return super().protocol_features() if self._pf is None else self._pf

    def ack_features(self, features):
        self.acked.append(features)

    def get_config(self, offset, size):
        if offset + size > len(self.config):
            raise ValueError("beyond config space")
        return bytes(self.config[offset:offset + size])

    def set_config(self, offset, data):
        if offset + len(data) > len(self.config):
            raise ValueError("beyond config space")
        self.config[offset:offset + len(data)] = data

    def start_queue(self, index, queue):
        assert index not in self.running, "started twice"
        if self.fail_start:
            raise RuntimeError("no worker for you")
        self.running[index] = queue
        self.events.append(("start", index, queue))

    def stop_queue(self, index):
        handle = self.running.pop(index)
        value = self.position.get(index, handle.last_avail_idx + self.advance.get(index, 0))
        self.stop_saw_unmapped.append(any(r.map_base == 0 for r in handle.memory.regions))
        self.events.append(("stop", index, value))
        return value

    def reset(self):
        assert not self.running, "reset with running queues"
        self.resets += 1

    def starts(self, index=None):
        return [e[2] for e in self.events if e[0] == "start" and index in (None, e[1])]

    def stops(self, index=None):
        return [e[2] for e in self.events if e[0] == "stop" and index in (None, e[1])]


# --- helpers ---------------------------------------------------------------------------------

def msg(request, payload=b"", flags=vu.VERSION):
    return vu.build_message(request, payload, flags)


def parse_reply(data):
    h = vu.Header.parse(data[:vu.HEADER_SIZE])
    payload = data[vu.HEADER_SIZE:]
    assert len(payload) == h.size
    return h.request, h.flags, payload


def u64_of(payload):
    assert len(payload) == 8
    return struct.unpack("<Q", payload)[0]


def state(index, num):
    return vu.VringState.build(dict(index=index, num=num))


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError as e:
        assert e.errno == errno.EBADF
        return False


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def eventfd():
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def sockfd():
    """One end of a socketpair (the backend request channel is a socket); the other end is
    closed."""
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def memfd(size):
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def region(gpa, size, uva, off=0):
    return dict(guest_addr=gpa, size=size, user_addr=uva, mmap_offset=off)


def mem_table(*regions):
    return vu.MemoryTable.build(dict(num_regions=len(regions), padding=0, regions=list(regions)))


def single_region(r):
    return vu.SingleMemoryRegion.build(dict(padding=0, region=r))


def vring_addr(index, desc, used, avail, flags=0):
    return vu.VringAddr.build(dict(index=index, flags=flags, descriptor=desc, used=used,
                                   available=avail, log=0))


class Peer:
    """Drives a BackendProtocol like a frontend would."""

    def __init__(self, device=None, **kw):
        self.device = device or FakeDevice(**kw)
        self.proto = BackendProtocol(self.device, name="test")

    def send(self, request, payload=b"", flags=vu.VERSION, fds=()):
        return [parse_reply(r) for r in self.proto.receive(msg(request, payload, flags),
                                                           list(fds))]

    def get(self, request, payload=b""):
        replies = self.send(request, payload)
        assert len(replies) == 1
        req, flags, body = replies[0]
        assert req == request and flags == REPLY
        return body

    def ack(self, request, payload=b"", fds=()):
        """Send with NEED_REPLY; return the ack value (REPLY_ACK must be negotiated)."""
        replies = self.send(request, payload, NEED, fds)
        assert len(replies) == 1, replies
        req, flags, body = replies[0]
        assert req == request and flags == REPLY
        return u64_of(body)

    # -- common sequences --

    def negotiate(self, features=None, protocol=True):
        offered = u64_of(self.get(R.GET_FEATURES))
        pf = u64_of(self.get(R.GET_PROTOCOL_FEATURES))
        assert self.send(R.SET_PROTOCOL_FEATURES, vu.u64(pf)) == []
        self.send(R.SET_OWNER)
        if features is None:
            features = offered if protocol else offered & ~BIT30
        assert self.ack(R.SET_FEATURES, vu.u64(features)) == 0
        return features

    def add_memory(self, size=MEM_SIZE, gpa=GPA, uva=UVA):
        fd = memfd(size)
        assert self.ack(R.SET_MEM_TABLE, mem_table(region(gpa, size, uva)), [fd]) == 0
        return fd

    def setup_ring(self, index=0, size=QSIZE, base=0, uva=UVA, kick=True, call=True):
        assert self.ack(R.SET_VRING_NUM, state(index, size)) == 0
        assert self.ack(R.SET_VRING_BASE, state(index, base)) == 0
        off = index * 0x10000
        assert self.ack(R.SET_VRING_ADDR, vring_addr(index, uva + DESC + off, uva + USED + off,
                                                     uva + AVAIL + off)) == 0
        fds = {}
        if call:
            fds["call"] = eventfd()
            assert self.ack(R.SET_VRING_CALL, vu.u64(index), [fds["call"]]) == 0
        if kick:
            fds["kick"] = eventfd()
            assert self.ack(R.SET_VRING_KICK, vu.u64(index), [fds["kick"]]) == 0
        return fds

    def enable(self, index, on=True):
        return self.ack(R.SET_VRING_ENABLE, state(index, int(on)))


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.proto.connection_lost()


@pytest.fixture
def ready(peer):
    """Negotiated (with PROTOCOL_FEATURES and REPLY_ACK), 1 MiB of memory."""
    peer.negotiate()
    peer.add_memory()
    return peer


# --- features, owner, simple GETs ------------------------------------------------------------

def test_get_features_offers_protocol_features_bit(peer):
    assert u64_of(peer.get(R.GET_FEATURES)) == BASE_FEATURES | BIT30


def test_set_features_accepts_subset_and_rejects_unoffered(peer):
    peer.negotiate()
    assert peer.proto.features == BASE_FEATURES | BIT30
    assert peer.ack(R.SET_FEATURES, vu.u64(virtio.F_VERSION_1)) == 0     # may be repeated
    assert peer.proto.features == virtio.F_VERSION_1
    assert peer.ack(R.SET_FEATURES, vu.u64(virtio.F_VERSION_1 | 1 << 40)) != 0
    assert peer.proto.features == virtio.F_VERSION_1
    assert peer.device.acked == [BASE_FEATURES | BIT30, virtio.F_VERSION_1]


def test_protocol_features_masked_to_supported():
    p = Peer(protocol_features=PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.LOG_SHMFD | PF.CONFIG)
    assert u64_of(p.get(R.GET_PROTOCOL_FEATURES)) == PF.MQ | PF.REPLY_ACK | PF.CONFIG
    assert p.send(R.SET_PROTOCOL_FEATURES, vu.u64(PF.REPLY_ACK | PF.CONFIG)) == []
    assert p.proto.protocol_features == PF.REPLY_ACK | PF.CONFIG
    # bits not offered are refused, the negotiated set stays
    assert p.ack(R.SET_PROTOCOL_FEATURES, vu.u64(PF.REPLY_ACK | PF.BACKEND_REQ)) != 0
    assert p.proto.protocol_features == PF.REPLY_ACK | PF.CONFIG
    p.proto.connection_lost()


class ResizableDevice(FakeDevice):
    """A device whose config may change under the guest (as an RBD image resized)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.event_fd = eventfd()
        self.change = False

    def config_event_fd(self):
        return self.event_fd

    def config_changed(self):
        os.eventfd_read(self.event_fd)
        return self.change


def test_config_change_goes_on_the_backend_channel():
    dev = ResizableDevice()
    p = Peer(dev)
    offered = u64_of(p.get(R.GET_PROTOCOL_FEATURES))
    assert offered & PF.BACKEND_REQ                 # only a device with a config event fd
    assert p.send(R.SET_PROTOCOL_FEATURES,
                  vu.u64(PF.REPLY_ACK | PF.CONFIG | PF.BACKEND_REQ)) == []
    dev.change = True
    os.eventfd_write(dev.event_fd, 1)
    assert p.proto.config_events() == []            # no channel yet: nothing to send
    dev.change = False
    ours, theirs = socket.socketpair()
    assert p.ack(R.SET_BACKEND_REQ_FD, b"", [theirs.detach()]) == 0
    assert not os.get_blocking(p.proto.backend_req_fd)     # sent to without blocking
    os.eventfd_write(dev.event_fd, 1)
    assert p.proto.config_events() == []            # the store says nothing changed
    dev.change = True
    os.eventfd_write(dev.event_fd, 1)
    (m,) = p.proto.config_events()
    h = vu.Header.parse(m)
    assert (h.request, h.flags, h.size, len(m)) == (vu.BackendReq.CONFIG_CHANGE_MSG, vu.VERSION,
                                                     0, vu.HEADER_SIZE)
    p.proto.connection_lost()
    ours.close()
    os.close(dev.event_fd)


def test_default_protocol_features(peer):
    offered = u64_of(peer.get(R.GET_PROTOCOL_FEATURES))
    assert offered == int(Device.protocol_features(peer.device)) & int(SUPPORTED_PROTOCOL_FEATURES)
    assert offered & PF.REPLY_ACK and offered & PF.CONFIG and not offered & PF.BACKEND_REQ


def test_reply_ack_only_when_negotiated(peer):
    # NEED_REPLY without REPLY_ACK negotiated: no ack
    assert peer.send(R.SET_OWNER, flags=NEED) == []
    assert peer.proto.owner
    assert peer.send(R.SET_PROTOCOL_FEATURES, vu.u64(PF.REPLY_ACK), NEED) == [
        (R.SET_PROTOCOL_FEATURES, REPLY, vu.u64(0))]
    assert peer.send(R.SET_OWNER, flags=NEED) == [(R.SET_OWNER, REPLY, vu.u64(0))]
    assert peer.send(R.SET_OWNER) == []                 # no NEED_REPLY: silent
    assert peer.send(R.SET_VRING_ENDIAN, state(0, 0)) == []   # failure without NEED_REPLY


def test_get_with_need_reply_gets_exactly_its_reply(peer):
    peer.send(R.SET_PROTOCOL_FEATURES, vu.u64(PF.REPLY_ACK))
    replies = peer.send(R.GET_FEATURES, flags=NEED)
    assert len(replies) == 1 and replies[0][0] == R.GET_FEATURES and len(replies[0][2]) == 8


def test_simple_gets(peer):
    assert u64_of(peer.get(R.GET_QUEUE_NUM)) == 2
    assert u64_of(peer.get(R.GET_MAX_MEM_SLOTS)) == MAX_MEM_SLOTS == 32
    assert u64_of(peer.get(R.GET_STATUS)) == 0
    peer.negotiate()
    assert peer.ack(R.SET_STATUS, vu.u64(virtio.STATUS_FEATURES_OK)) == 0
    assert u64_of(peer.get(R.GET_STATUS)) == virtio.STATUS_FEATURES_OK
    assert peer.proto.status == virtio.STATUS_FEATURES_OK


def test_unsupported_requests_fail(ready):
    p = ready
    assert p.ack(R.SET_VRING_ENDIAN, state(0, 1)) != 0
    assert p.ack(R.SET_LOG_BASE, vu.Log.build(dict(mmap_size=4096, mmap_offset=0))) != 0
    fd = eventfd()
    assert p.ack(R.SET_LOG_FD, fds=[fd]) != 0
    assert not is_open(fd)
    assert p.ack(R.SEND_RARP, vu.u64(0)) != 0
    assert u64_of(p.get(R.GET_FEATURES))            # still working


def test_unsupported_request_needing_a_reply_closes(peer):
    inflight = vu.Inflight.build(dict(mmap_size=0, mmap_offset=0, num_queues=1, queue_size=128))
    with pytest.raises(ProtocolClosed):
        peer.send(R.GET_INFLIGHT_FD, inflight)
    with pytest.raises(ProtocolClosed):             # and stays closed
        peer.send(R.GET_FEATURES)


def test_unknown_request_error_ack_and_still_working(peer):
    peer.negotiate()
    assert peer.ack(99, b"whatever") != 0
    assert peer.send(99, b"") == []
    fd = eventfd()
    assert peer.ack(99, fds=[fd]) != 0
    assert not is_open(fd)
    assert u64_of(peer.get(R.GET_FEATURES)) == BASE_FEATURES | BIT30


# --- config ----------------------------------------------------------------------------------

def config(offset, size, flags=0, data=None):
    return vu.Config.build(dict(offset=offset, size=size, flags=flags,
                                payload=bytes(size) if data is None else data))


def test_get_config_echoes_header_with_payload(peer):
    body = peer.get(R.GET_CONFIG, config(4, 8, vu.CONFIG_FLAG_MIGRATION))
    c = vu.Config.parse(body)
    assert (c.offset, c.size, c.flags) == (4, 8, vu.CONFIG_FLAG_MIGRATION)
    assert c.payload == bytes(range(4, 12))


def test_get_config_failure_replies_size_zero(peer):
    replies = peer.send(R.GET_CONFIG, config(50, 20))        # beyond the 60-byte space
    assert replies == [(R.GET_CONFIG, REPLY, b"")]
    replies = peer.send(R.GET_CONFIG, config(250, 10))       # beyond VHOST_USER_MAX_CONFIG_SIZE
    assert replies == [(R.GET_CONFIG, REPLY, b"")]
    assert vu.Config.parse(peer.get(R.GET_CONFIG, config(0, 4))).payload == bytes(range(4))


def test_get_config_malformed_closes(peer):
    with pytest.raises(ProtocolClosed):
        peer.send(R.GET_CONFIG, struct.pack("<III", 0, 8, 0) + b"\0" * 3)


def test_set_config(ready):
    assert ready.ack(R.SET_CONFIG, config(2, 3, 0, b"abc")) == 0
    assert bytes(ready.device.config[2:5]) == b"abc"
    assert ready.ack(R.SET_CONFIG, config(59, 3, 0, b"xyz")) != 0
    assert ready.ack(R.SET_CONFIG, config(0, 1, 0x80, b"x")) != 0


# --- vring messages --------------------------------------------------------------------------

def test_set_vring_num_validation(ready):
    p = ready
    assert p.ack(R.SET_VRING_NUM, state(0, 256)) == 0
    assert p.proto.queue(0).size == 256
    for bad in (0, 3, 100, 2048):                       # not a power of two / > max_queue_size
        assert p.ack(R.SET_VRING_NUM, state(0, bad)) != 0
    assert p.proto.queue(0).size == 256
    assert p.ack(R.SET_VRING_NUM, state(2, 256)) != 0   # queue index out of range


def test_queue_index_out_of_range_everywhere(ready):
    p = ready
    assert p.ack(R.SET_VRING_BASE, state(2, 0)) != 0
    assert p.ack(R.SET_VRING_ADDR, vring_addr(7, UVA, UVA + 0x2000, UVA + 0x1000)) != 0
    assert p.ack(R.SET_VRING_ENABLE, state(2, 1)) != 0
    for req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        fd = eventfd()
        assert p.ack(req, vu.u64(5), [fd]) != 0
        assert not is_open(fd)
    with pytest.raises(ProtocolClosed):
        p.send(R.GET_VRING_BASE, state(2, 0))


def test_set_vring_addr_translates(ready):
    p = ready
    assert p.ack(R.SET_VRING_NUM, state(0, QSIZE)) == 0
    assert p.ack(R.SET_VRING_ADDR, vring_addr(0, UVA + DESC, UVA + USED, UVA + AVAIL)) == 0
    q = p.proto.queue(0)
    mem = p.proto.memory
    assert (q.desc_addr, q.used_addr, q.avail_addr) == (UVA + DESC, UVA + USED, UVA + AVAIL)
    assert q.desc_host == mem.uva_to_host(UVA + DESC, 16 * QSIZE)
    assert q.avail_host == mem.regions[0].host_addr + AVAIL
    assert q.used_host == mem.regions[0].host_addr + USED
    # the translation is real: what the host pointer writes, guest memory reads
    ctypes.memmove(q.used_host, b"\x01\x00\x07\x00", 4)
    assert mem.read(GPA + USED, 4) == b"\x01\x00\x07\x00"


def test_set_vring_addr_rejects_untranslatable(ready):
    p = ready
    assert p.ack(R.SET_VRING_NUM, state(0, QSIZE)) == 0
    assert p.ack(R.SET_VRING_ADDR, vring_addr(0, UVA + MEM_SIZE, UVA + USED, UVA + AVAIL)) != 0
    # used ring straddles the end of the region
    assert p.ack(R.SET_VRING_ADDR, vring_addr(0, UVA + DESC, UVA + MEM_SIZE - 8, UVA + AVAIL)) != 0
    # misaligned descriptor table
    assert p.ack(R.SET_VRING_ADDR, vring_addr(0, UVA + DESC + 8, UVA + USED, UVA + AVAIL)) != 0
    assert p.proto.queue(0).desc_addr is None


def test_vring_fd_counts_and_nofd(ready):
    p = ready
    fds = [eventfd(), eventfd()]
    assert p.ack(R.SET_VRING_KICK, vu.u64(0), fds) != 0          # two fds: refused, both closed
    assert not any(is_open(fd) for fd in fds)
    assert p.ack(R.SET_VRING_KICK, vu.u64(0)) != 0               # none and no NOFD bit
    fd = eventfd()
    assert p.ack(R.SET_VRING_CALL, vu.u64(0 | vu.VRING_NOFD_MASK), [fd]) != 0   # NOFD plus an fd
    assert not is_open(fd)
    assert p.ack(R.SET_VRING_KICK, vu.u64(1 | vu.VRING_NOFD_MASK)) == 0
    q = p.proto.queue(1)
    assert q.kick_fd == -1 and q.started
    err = eventfd()
    assert p.ack(R.SET_VRING_ERR, vu.u64(1), [err]) == 0
    assert p.proto.queue(1).err_fd == err
    err2 = eventfd()
    assert p.ack(R.SET_VRING_ERR, vu.u64(1), [err2]) == 0
    assert not is_open(err) and p.proto.queue(1).err_fd == err2


def test_nofd_kick_queue_runs_polling(ready):
    p = ready
    p.setup_ring(0, kick=False)
    assert p.ack(R.SET_VRING_KICK, vu.u64(vu.VRING_NOFD_MASK)) == 0
    p.enable(0)
    (h,) = p.device.starts(0)
    assert h.kick_fd == -1 and h.call_fd == p.proto.queue(0).call_fd


# --- queue lifecycle -------------------------------------------------------------------------

def test_queue_runs_only_when_started_and_enabled(ready):
    p = ready
    fds = p.setup_ring(0, base=3)
    q = p.proto.queue(0)
    assert q.started and not q.enabled and not q.running       # PROTOCOL_FEATURES: disabled
    assert p.device.events == []
    assert p.enable(0) == 0
    (h,) = p.device.starts(0)
    assert p.proto.queue(0).running
    assert (h.index, h.size, h.last_avail_idx) == (0, QSIZE, 3)
    assert (h.kick_fd, h.call_fd, h.err_fd) == (fds["kick"], fds["call"], -1)
    assert h.desc == p.proto.queue(0).desc_host and h.avail and h.used
    assert h.features == BASE_FEATURES | BIT30 and h.event_idx and h.indirect
    assert h.memory is p.proto.memory
    assert h.signal_call                   # SET_VRING_CALL since the last start
    p.device.advance[0] = 5
    assert p.enable(0, False) == 0          # SET_VRING_ENABLE 0 stops, keeps the index
    assert p.device.stops(0) == [8]
    q = p.proto.queue(0)
    assert not q.running and q.started and q.base == 8
    assert p.enable(0) == 0                 # re-enabled: resumes where it stopped
    assert p.device.starts(0)[-1].last_avail_idx == 8
    assert not p.device.starts(0)[-1].signal_call


def test_enable_before_setup_starts_at_kick(ready):
    p = ready
    assert p.enable(0) == 0 and p.enable(1) == 0   # QEMU net: enabled long before setup
    assert p.device.events == []
    p.setup_ring(0, kick=False)
    assert p.device.events == []                    # not started without a kick
    kick = eventfd()
    assert p.ack(R.SET_VRING_KICK, vu.u64(0), [kick]) == 0
    assert [e[:2] for e in p.device.events] == [("start", 0)]
    assert not p.proto.queue(1).running             # queue 1 never set up: never run


def test_without_protocol_features_rings_start_enabled():
    p = Peer()
    p.send(R.SET_PROTOCOL_FEATURES, vu.u64(PF.REPLY_ACK))
    p.negotiate(protocol=False)
    p.add_memory()
    p.setup_ring(0)
    assert p.proto.queue(0).running
    assert not p.proto.queue(0).enabled
    p.proto.connection_lost()


def test_kick_before_addr_starts_when_ready(ready):
    p = ready
    p.enable(0)
    kick = eventfd()
    assert p.ack(R.SET_VRING_KICK, vu.u64(0), [kick]) == 0
    assert p.device.events == []
    assert p.ack(R.SET_VRING_NUM, state(0, QSIZE)) == 0
    assert p.ack(R.SET_VRING_ADDR, vring_addr(0, UVA + DESC, UVA + USED, UVA + AVAIL)) == 0
    assert p.proto.queue(0).running


def test_get_vring_base_round_trip_and_stop(ready):
    p = ready
    p.setup_ring(0, base=7)
    p.enable(0)
    p.device.advance[0] = 5
    body = p.get(R.GET_VRING_BASE, state(0, 0))
    assert vu.VringState.parse(body) == dict(index=0, num=12)
    q = p.proto.queue(0)
    assert not q.running and not q.started and q.base == 12
    # not running: the stored base, and nothing restarts it until a new kick
    assert vu.VringState.parse(p.get(R.GET_VRING_BASE, state(0, 0))).num == 12
    assert p.enable(0) == 0 and not p.proto.queue(0).running
    assert p.ack(R.SET_VRING_BASE, state(0, 12)) == 0
    kick = eventfd()
    assert p.ack(R.SET_VRING_KICK, vu.u64(0), [kick]) == 0
    assert p.proto.queue(0).running
    assert p.device.starts(0)[-1].last_avail_idx == 12
    # never-configured queue: reply its stored base (0)
    assert vu.VringState.parse(p.get(R.GET_VRING_BASE, state(1, 0))) == dict(index=1, num=0)


def test_set_vring_num_base_refused_while_running(ready):
    p = ready
    p.setup_ring(0)
    p.enable(0)
    assert p.ack(R.SET_VRING_NUM, state(0, 128)) != 0
    assert p.ack(R.SET_VRING_BASE, state(0, 9)) != 0
    assert p.proto.queue(0).running and p.proto.queue(0).size == QSIZE


def test_new_kick_swaps_fd_and_restarts_at_stopped_index(ready):
    p = ready
    fds = p.setup_ring(0)
    p.enable(0)
    p.device.advance[0] = 4
    new_kick = eventfd()
    assert p.ack(R.SET_VRING_KICK, vu.u64(0), [new_kick]) == 0
    assert not is_open(fds["kick"])
    assert [e[:2] for e in p.device.events] == [("start", 0), ("stop", 0), ("start", 0)]
    h = p.device.starts(0)[-1]
    assert h.kick_fd == new_kick and h.last_avail_idx == 4
    assert is_open(fds["call"])


def test_new_call_swaps_fd_and_signals_once(ready):
    p = ready
    fds = p.setup_ring(0)
    p.enable(0)
    assert p.device.starts(0)[-1].signal_call
    p.device.advance[0] = 2
    new_call = eventfd()
    assert p.ack(R.SET_VRING_CALL, vu.u64(0), [new_call]) == 0
    assert not is_open(fds["call"])
    h = p.device.starts(0)[-1]
    assert h.call_fd == new_call and h.signal_call and h.last_avail_idx == 2
    assert p.enable(0, False) == 0 and p.enable(0) == 0
    assert not p.device.starts(0)[-1].signal_call      # only once
    assert p.ack(R.SET_VRING_CALL, vu.u64(0 | vu.VRING_NOFD_MASK)) == 0
    h = p.device.starts(0)[-1]
    assert h.call_fd == -1 and not h.signal_call and not is_open(new_call)


def test_call_before_reconnect_style_start_signals(ready):
    """QEMU sends SET_VRING_CALL right after connecting, long before the ring starts."""
    p = ready
    call = eventfd()
    assert p.ack(R.SET_VRING_CALL, vu.u64(0), [call]) == 0
    assert p.proto.queue(0).signal_call
    p.setup_ring(0, call=False)
    p.enable(0)
    assert p.device.starts(0)[-1].signal_call and p.device.starts(0)[-1].call_fd == call


def test_repeated_set_features_never_disables_and_relatches(ready):
    p = ready
    p.setup_ring(0)
    p.enable(0)
    f = p.proto.features
    assert p.ack(R.SET_FEATURES, vu.u64(f)) == 0
    assert p.proto.queue(0).running and len(p.device.starts(0)) == 1    # same set: untouched
    p.device.advance[0] = 3
    assert p.ack(R.SET_FEATURES, vu.u64(f & ~virtio.F_RING_EVENT_IDX)) == 0
    assert p.proto.queue(0).running
    h = p.device.starts(0)[-1]
    assert not h.event_idx and h.last_avail_idx == 3 and len(p.device.starts(0)) == 2


def test_start_failure_is_an_error_ack(ready):
    p = ready
    p.setup_ring(0)
    p.device.fail_start = True
    assert p.enable(0) != 0
    assert not p.proto.queue(0).running
    p.device.fail_start = False
    assert p.enable(0) == 0 and p.proto.queue(0).running


def test_two_queues_independent(ready):
    p = ready
    p.setup_ring(0)
    p.setup_ring(1)
    p.enable(1)
    assert [e[:2] for e in p.device.events] == [("start", 1)]
    p.enable(0)
    assert p.proto.queue(0).running and p.proto.queue(1).running


def test_reset_device_stops_and_forgets(ready):
    p = ready
    fds = p.setup_ring(0)
    p.enable(0)
    assert p.ack(R.RESET_DEVICE) == 0
    assert p.device.resets == 1 and not p.device.running
    q = p.proto.queue(0)
    assert (q.running, q.started, q.enabled, q.size, q.kick_fd, q.call_fd) == (
        False, False, False, 0, -1, -1)
    assert not is_open(fds["kick"]) and not is_open(fds["call"])
    assert len(p.proto.memory) == 1                      # memory survives a device reset
    assert p.proto.features == 0


def test_reset_owner(ready):
    p = ready
    p.setup_ring(0)
    p.enable(0)
    assert p.ack(R.RESET_OWNER) == 0
    assert not p.proto.owner and p.device.resets == 1 and not p.device.running


# --- memory ----------------------------------------------------------------------------------

def test_set_mem_table_maps_and_closes_fds(peer):
    peer.negotiate()
    fds = [memfd(MEM_SIZE), memfd(2 * MEM_SIZE)]
    table = mem_table(region(0, MEM_SIZE, UVA), region(0x100000000, MEM_SIZE, UVA + 0x1000000,
                                                          MEM_SIZE))
    assert peer.ack(R.SET_MEM_TABLE, table, fds) == 0
    assert not any(is_open(fd) for fd in fds)
    mem = peer.proto.memory
    assert len(mem) == 2
    mem.write(0x100000010, b"hello")
    assert mem.read(0x100000010, 5) == b"hello"


def test_set_mem_table_fd_count_mismatch(peer):
    peer.negotiate()
    fd = memfd(MEM_SIZE)
    table = mem_table(region(0, MEM_SIZE // 2, UVA), region(MEM_SIZE // 2, MEM_SIZE // 2,
                                                            UVA + MEM_SIZE // 2))
    assert peer.ack(R.SET_MEM_TABLE, table, [fd]) != 0
    assert not is_open(fd) and len(peer.proto.memory) == 0


def test_mapping_failure_keeps_old_table(ready):
    p = ready
    p.setup_ring(0)
    p.enable(0)
    old = p.proto.memory
    fds = [memfd(MEM_SIZE), memfd(4096)]      # second file too small for its region
    table = mem_table(region(0, MEM_SIZE, UVA), region(1 << 32, MEM_SIZE, UVA + (1 << 32)))
    before = fd_count()
    assert p.ack(R.SET_MEM_TABLE, table, fds) != 0
    assert fd_count() == before - 2 and not any(is_open(fd) for fd in fds)
    assert p.proto.memory is old and old.regions[0].map_base
    assert [e[0] for e in p.device.events] == ["start"]      # the running queue untouched


def test_overlapping_regions_rejected(ready):
    p = ready
    fds = [memfd(MEM_SIZE), memfd(MEM_SIZE)]
    table = mem_table(region(0, MEM_SIZE, UVA), region(MEM_SIZE // 2, MEM_SIZE, UVA + (1 << 30)))
    assert p.ack(R.SET_MEM_TABLE, table, fds) != 0
    assert not any(is_open(fd) for fd in fds)
    fd = memfd(MEM_SIZE)
    assert p.ack(R.ADD_MEM_REG, single_region(region(MEM_SIZE // 2, MEM_SIZE, UVA + (1 << 30))),
                 [fd]) != 0
    assert not is_open(fd) and len(p.proto.memory) == 1


def test_memory_change_restarts_running_queue(ready):
    p = ready
    p.setup_ring(0)
    p.enable(0)
    p.device.advance[0] = 6
    old_region = p.proto.memory.regions[0]
    # ADD_MEM_REG: stop, new snapshot, restart at the stopped index
    fd = memfd(MEM_SIZE)
    assert p.ack(R.ADD_MEM_REG, single_region(region(1 << 32, MEM_SIZE, UVA + (1 << 32))),
                 [fd]) == 0
    assert not is_open(fd)
    assert [e[:2] for e in p.device.events] == [("start", 0), ("stop", 0), ("start", 0)]
    h = p.device.starts(0)[-1]
    assert h.last_avail_idx == 6 and len(h.memory) == 2 and h.memory is p.proto.memory
    assert h.memory.regions[0] is old_region and old_region.map_base       # shared, still mapped
    # REM_MEM_REG (QEMU attaches an fd: closed): the removed region is unmapped after restart
    added = p.proto.memory.regions[1]
    fd = memfd(MEM_SIZE)
    assert p.ack(R.REM_MEM_REG, single_region(region(1 << 32, MEM_SIZE, UVA + (1 << 32))),
                 [fd]) == 0
    assert not is_open(fd)
    assert added.map_base == 0 and len(p.proto.memory) == 1
    assert p.device.starts(0)[-1].last_avail_idx == 12
    # SET_MEM_TABLE replaces all: old regions unmapped, only after the worker stopped
    p.add_memory()
    assert old_region.map_base == 0
    assert p.device.stop_saw_unmapped == [False, False, False]
    h = p.device.starts(0)[-1]
    assert h.last_avail_idx == 18 and h.memory.regions[0] is not old_region
    assert h.desc == h.memory.regions[0].host_addr + DESC


def test_add_mem_reg_duplicate_and_slot_limit(ready):
    p = ready
    fd = memfd(MEM_SIZE)
    assert p.ack(R.ADD_MEM_REG, single_region(region(GPA, MEM_SIZE, UVA)), [fd]) == 0  # dup
    assert len(p.proto.memory) == 1 and not is_open(fd)
    assert p.ack(R.ADD_MEM_REG, single_region(region(1 << 32, MEM_SIZE, UVA + (1 << 32)))) != 0
    for i in range(1, MAX_MEM_SLOTS):
        fd = memfd(4096)
        assert p.ack(R.ADD_MEM_REG, single_region(region(i << 32, 4096, UVA + (i << 32))),
                     [fd]) == 0
    fd = memfd(4096)
    assert p.ack(R.ADD_MEM_REG, single_region(region(99 << 32, 4096, UVA + (99 << 32))),
                 [fd]) != 0
    assert not is_open(fd) and len(p.proto.memory) == MAX_MEM_SLOTS


def test_rem_mem_reg_unknown_region(ready):
    assert ready.ack(R.REM_MEM_REG, single_region(region(1 << 40, 4096, 0))) != 0
    assert len(ready.proto.memory) == 1


def test_memory_change_that_loses_the_rings(ready):
    p = ready
    p.setup_ring(0)
    p.enable(0)
    fd = memfd(MEM_SIZE)
    assert p.ack(R.SET_MEM_TABLE, mem_table(region(0, MEM_SIZE, UVA + (1 << 30))), [fd]) != 0
    q = p.proto.queue(0)
    assert not q.running and q.desc_host is None          # new table in force, queue idle
    assert p.ack(R.SET_VRING_ADDR, vring_addr(0, UVA + (1 << 30) + DESC, UVA + (1 << 30) + USED,
                                              UVA + (1 << 30) + AVAIL)) == 0
    assert p.proto.queue(0).running


def test_rings_set_before_memory(peer):
    peer.negotiate()
    peer.enable(0)
    fds = peer.setup_ring(0)
    assert not peer.proto.queue(0).running and peer.proto.queue(0).desc_host is None
    peer.add_memory()
    assert peer.proto.queue(0).running
    assert peer.device.starts(0)[0].kick_fd == fds["kick"]


# --- malformed input -------------------------------------------------------------------------

SET_REQUESTS = [R.SET_FEATURES, R.SET_MEM_TABLE, R.SET_VRING_NUM, R.SET_VRING_ADDR,
                R.SET_VRING_BASE, R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR,
                R.SET_PROTOCOL_FEATURES, R.SET_VRING_ENABLE, R.SET_CONFIG, R.ADD_MEM_REG,
                R.REM_MEM_REG, R.SET_STATUS, R.SET_OWNER, R.RESET_DEVICE, R.SET_BACKEND_REQ_FD]


@pytest.mark.parametrize("request_", SET_REQUESTS, ids=lambda r: r.name)
@pytest.mark.parametrize("size", [1, 7, 9, 13, 41, 300])
def test_malformed_payload_error_ack(ready, request_, size):
    fd = eventfd()
    if request_ in (R.SET_MEM_TABLE,) and size >= 8:
        payload = struct.pack("<II", 1, 0) + bytes(size - 8)
    elif request_ is R.SET_CONFIG and size >= 12:
        payload = struct.pack("<III", 0, 1000, 0) + bytes(size - 12)
    else:
        payload = bytes(size)
    if vu.REQUEST_PAYLOAD[request_] is None and size == 8:
        pytest.skip("an 8-byte u64 is tolerated on payload-less requests")
    assert ready.ack(request_, payload, [fd]) != 0
    assert not is_open(fd)
    assert u64_of(ready.get(R.GET_FEATURES))


@pytest.mark.parametrize("request_", [R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
                                      R.GET_VRING_BASE, R.GET_MAX_MEM_SLOTS, R.GET_STATUS,
                                      R.GET_CONFIG], ids=lambda r: r.name)
def test_malformed_get_closes(peer, request_):
    fd = eventfd()
    with pytest.raises(ProtocolClosed):
        peer.send(request_, bytes(5), fds=[fd])
    assert not is_open(fd)


def test_bad_version_closes_and_closes_fds(peer):
    fd = eventfd()
    with pytest.raises(ProtocolClosed, match="version"):
        peer.proto.receive(vu.Header.build(dict(request=1, flags=2, size=0)), [fd])
    assert not is_open(fd)


def test_oversized_header_closes_before_payload():
    p = Peer()
    with pytest.raises(ProtocolClosed):
        p.proto.receive(vu.Header.build(dict(request=5, flags=1, size=1 << 20)))
    p.proto.connection_lost()


def test_header_flags_zero_closes(peer):
    with pytest.raises(ProtocolClosed):
        peer.proto.receive(vu.Header.build(dict(request=1, flags=0, size=0)))


# --- framing ---------------------------------------------------------------------------------

def test_byte_by_byte_and_fds_attach_to_their_message(ready):
    p = ready
    p.setup_ring(0, kick=False, call=False)
    kick = eventfd()
    data = (msg(R.SET_VRING_KICK, vu.u64(0), NEED) + msg(R.GET_FEATURES)
            + msg(R.GET_VRING_BASE, state(0, 0)))
    assert p.proto.next_read_size == 12
    replies = p.proto.receive(data[:1], [kick])      # fds ride on the first byte
    assert replies == [] and p.proto.next_read_size == 11
    for i in range(1, len(data)):
        replies += p.proto.receive(data[i:i + 1])
    assert [parse_reply(r)[0] for r in replies] == [R.SET_VRING_KICK, R.GET_FEATURES,
                                                    R.GET_VRING_BASE]
    assert u64_of(parse_reply(replies[0])[2]) == 0
    assert p.proto.queue(0).kick_fd == kick


def test_next_read_size_header_then_payload(peer):
    m = msg(R.SET_VRING_NUM, state(0, 8))
    assert peer.proto.next_read_size == 12
    peer.proto.receive(m[:12])
    assert peer.proto.next_read_size == 8
    peer.proto.receive(m[12:15])
    assert peer.proto.next_read_size == 5
    peer.proto.receive(m[15:])
    assert peer.proto.next_read_size == 12


def test_many_messages_in_one_chunk(peer):
    data = msg(R.GET_FEATURES) * 3 + msg(R.GET_QUEUE_NUM)
    replies = [parse_reply(r) for r in peer.proto.receive(data)]
    assert [r[0] for r in replies] == [1, 1, 1, 17]


def test_fds_on_message_that_takes_none_are_closed(peer):
    fds = [eventfd(), eventfd()]
    assert peer.send(R.SET_OWNER, fds=fds) == []
    assert not any(is_open(fd) for fd in fds)
    fd = eventfd()
    assert len(peer.proto.receive(msg(R.GET_FEATURES), [fd])) == 1
    assert not is_open(fd)


# --- backend request channel and connection loss ---------------------------------------------

def test_backend_req_fd_kept_and_replaced(ready):
    p = ready
    a, b = sockfd(), sockfd()
    e = eventfd()
    assert p.ack(R.SET_BACKEND_REQ_FD, fds=[e]) != 0            # not a socket: refused
    assert not is_open(e) and p.proto.backend_req_fd == -1
    assert p.ack(R.SET_BACKEND_REQ_FD, fds=[a]) == 0
    assert p.proto.backend_req_fd == a and is_open(a)
    assert p.ack(R.SET_BACKEND_REQ_FD, fds=[b]) == 0
    assert not is_open(a) and p.proto.backend_req_fd == b
    assert p.ack(R.SET_BACKEND_REQ_FD) != 0
    p.proto.connection_lost()
    assert not is_open(b)


def test_connection_lost_releases_everything():
    before = fd_count()
    p = Peer()
    p.negotiate()
    p.add_memory()
    p.setup_ring(0)
    p.setup_ring(1)
    err = eventfd()
    assert p.ack(R.SET_VRING_ERR, vu.u64(0), [err]) == 0
    p.enable(0)
    assert p.ack(R.SET_BACKEND_REQ_FD, fds=[sockfd()]) == 0
    p.proto.receive(msg(R.SET_VRING_CALL, vu.u64(1))[:5], [eventfd()])   # half a message
    region_ = p.proto.memory.regions[0]
    assert fd_count() == before + 7
    p.proto.connection_lost()
    assert fd_count() == before
    assert not p.device.running and p.device.resets == 1
    assert p.device.stops(0) == [0]
    assert region_.map_base == 0 and len(p.proto.memory) == 0
    assert p.proto.closed
    p.proto.connection_lost()                               # idempotent
    fd = eventfd()
    with pytest.raises(ProtocolClosed):
        p.proto.receive(msg(R.GET_FEATURES), [fd])
    assert not is_open(fd)


def test_protocol_closed_then_connection_lost_releases_fds():
    before = fd_count()
    p = Peer()
    p.negotiate()
    p.add_memory()
    p.setup_ring(0)
    p.enable(0)
    with pytest.raises(ProtocolClosed):
        p.proto.receive(b"\xff" * 12, [eventfd()])
    p.proto.connection_lost()
    assert fd_count() == before and not p.device.running


class StuckDevice(FakeDevice):
    """stop_queue of queue 0 gives up on its worker, as BlkDevice does after stop-timeout."""

    def stop_queue(self, index):
        if index == 0:
            self.running.pop(index)
            raise WorkerStuck("queue 0: the worker did not finish its in-flight I/O within "
                              "0.1 s; abandoning it")
        return super().stop_queue(index)


def test_stuck_worker_keeps_memory_and_fds_and_ends_the_connection():
    """A worker that did not stop may still write guest memory and signal its eventfds: the
    protocol answers the current message, then ends the connection, and neither unmaps the
    memory nor closes (and so frees for reuse) any fd the worker could touch."""
    before = fd_count()
    p = Peer(device=StuckDevice())
    p.negotiate()
    p.add_memory()
    fds = p.setup_ring(0)
    p.setup_ring(1)
    p.enable(0)
    p.enable(1)
    region_ = p.proto.memory.regions[0]
    starts = len(p.device.starts(0))
    # a new kick stops the queue (stuck) and would restart it: no second worker on that ring
    assert p.ack(R.SET_VRING_KICK, vu.u64(0), [eventfd()]) == 0
    assert len(p.device.starts(0)) == starts
    with pytest.raises(ProtocolClosed, match="abandoning"):
        p.send(R.GET_VRING_BASE, state(1, 0))
    p.proto.connection_lost()
    assert region_.map_base != 0, "guest memory unmapped under a live worker"
    assert is_open(fds["kick"]) and is_open(fds["call"])
    assert p.device.stops(1) == [0]                     # the healthy queue still stopped
    leaked = [x for x in p.proto._leaked if isinstance(x, int)]
    # queue 0: its old and new kick fd and its call fd; queue 1: kick and call
    assert fd_count() == before + len(leaked) and len(leaked) == 5
    for fd in leaked:
        os.close(fd)
    region_.unmap()


def test_join_worker_is_bounded():
    import threading
    import time
    from vhost.device import join_worker
    release = threading.Event()
    t = threading.Thread(target=release.wait, daemon=True)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(WorkerStuck, match="within 0.2 s"):
        join_worker(t, 0.2, "queue 3")
    assert 0.2 <= time.monotonic() - t0 < 2
    release.set()
    join_worker(t, 5, "queue 3")                        # a thread that ends joins quietly


# --- fuzz: nothing but ProtocolClosed ever escapes -------------------------------------------

message_st = st.tuples(
    st.sampled_from([int(r) for r in R] + [0, 44, 99, 0xFFFFFFFF]),
    st.sampled_from([vu.VERSION, NEED, vu.VERSION | vu.FLAG_REPLY]),
    st.one_of(st.binary(max_size=64),
              st.sampled_from([state(0, 1), state(1, 256), vu.u64(0), vu.u64(1 << 8),
                               vring_addr(0, UVA + DESC, UVA + USED, UVA + AVAIL)])),
    st.integers(0, 2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(message_st, max_size=25))
def test_fuzz_only_protocol_closed_escapes(messages):
    before = fd_count()
    p = Peer()
    p.negotiate()
    try:
        p.add_memory()
        for request, flags, payload, nfds in messages:
            fds = [eventfd() for _ in range(nfds)]
            try:
                replies = p.proto.receive(msg(request, payload, flags), fds)
            except ProtocolClosed:
                break
            for r in replies:
                req, rflags, _ = parse_reply(r)
                assert req == request and rflags == REPLY
    finally:
        p.proto.connection_lost()
    assert fd_count() == before
    assert not p.device.running


# --- replay of recorded conversations --------------------------------------------------------

def load_trace(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def replay_device(events):
    """A fake device that offers what the recorded backend offered."""
    def first_reply(name):
        for e in events:
            if e.get("dir") == "backend->frontend" and e["name"] == name:
                return bytes.fromhex(e["payload"])
        return None
    features = first_reply("GET_FEATURES")
    pf = first_reply("GET_PROTOCOL_FEATURES")
    qn = first_reply("GET_QUEUE_NUM")
    cfg = first_reply("GET_CONFIG")
    config = b""
    if cfg:
        c = vu.Config.parse(cfg)
        config = bytes(c.offset) + c.payload
    return FakeDevice(num_queues=u64_of(qn) if qn else 2,
                      features=u64_of(features) & ~BIT30,
                      protocol_features=PF(u64_of(pf)),
                      config=config or bytes(64))


def frontend_fds(event, payload):
    """Fresh fds standing in for the recorded ones: memfds big enough for memory messages
    (sparse, nothing is touched), a socket for the backend channel, eventfds otherwise."""
    if not event["nfds"]:
        return []
    name = event["name"]
    if name == "SET_MEM_TABLE":
        table = vu.MemoryTable.parse(payload)
        assert len(table.regions) == event["nfds"]
        return [memfd(r.size + r.mmap_offset) for r in table.regions]
    if name in ("ADD_MEM_REG", "REM_MEM_REG"):
        r = vu.SingleMemoryRegion.parse(payload).region
        return [memfd(r.size + r.mmap_offset)]
    if name == "SET_BACKEND_REQ_FD":
        return [sockfd()]
    return [eventfd() for _ in range(event["nfds"])]


def test_recorded_traces_are_present():
    assert TRACES, f"no recorded conversations (*.jsonl) in {TRACE_DIR}"


@pytest.mark.parametrize("path", [pytest.param(p, id=os.path.basename(p)) for p in TRACES]
                         or [pytest.param(None, id="no-traces-found")])
def test_replay_trace(path):
    assert path is not None, f"no recorded conversations (*.jsonl) in {TRACE_DIR}: nothing replayed"
    events = load_trace(path)
    msgs = [e for e in events if "dir" in e]
    assert msgs, path
    before = fd_count()
    device = replay_device(events)
    proto = BackendProtocol(device, name=os.path.basename(path))
    offered_pf = int(proto.offered_protocol_features)

    # The worker's progress: before each message, each queue "has processed" up to the value
    # the recorded backend reported at the next GET_VRING_BASE for that queue.
    upcoming = []
    for i, m in enumerate(msgs):
        nxt = {}
        for later in msgs[i:]:
            if later["dir"] == "backend->frontend" and later["name"] == "GET_VRING_BASE":
                s = vu.VringState.parse(bytes.fromhex(later["payload"]))
                nxt.setdefault(s.index, s.num)
        upcoming.append(nxt)

    ours, recorded = [], []
    regions_seen = []
    for i, m in enumerate(msgs):
        payload = bytes.fromhex(m["payload"])
        if m["dir"] == "backend->frontend":
            recorded.append((m["request"], m["flags"], m["size"], payload))
            continue
        if m["name"] == "SET_PROTOCOL_FEATURES":      # we offer a subset of the C backend's
            payload = vu.u64(u64_of(payload) & offered_pf)
        device.position = dict(upcoming[i])
        fds = frontend_fds(m, payload)
        data = vu.build_message(m["request"], payload, m["flags"])
        assert len(data) == vu.HEADER_SIZE + m["size"]
        for r in proto.receive(data, fds):
            ours.append(parse_reply(r))
        regions_seen.extend(proto.memory.regions)

    assert len(ours) == len(recorded), (ours, recorded)
    for (oreq, oflags, opayload), (rreq, rflags, rsize, rpayload) in zip(ours, recorded):
        assert (oreq, oflags, len(opayload)) == (rreq, rflags, rsize)
        if oreq == R.GET_PROTOCOL_FEATURES:
            assert u64_of(opayload) == u64_of(rpayload) & offered_pf
        else:   # features, queue num, config, acks, mem slots, status, vring bases: identical
            assert opayload == rpayload, R(oreq).name

    # what the conversation did to the rings
    started = {e[1] for e in device.events if e[0] == "start"}
    assert 0 in started
    if "blk" in path:
        assert started == {0}          # queue 1 is enabled but never set up: never run
        assert len(device.starts(0)) == 2
        assert [h.last_avail_idx for h in device.starts(0)] == [0, 0]
        # SeaBIOS drives the ring without EVENT_IDX, Linux with it: latched per start
        assert [h.event_idx for h in device.starts(0)] == [False, True]
    else:
        assert started == {0, 1}
    assert not device.running                         # every start was matched by a stop
    assert all(not q.running for q in proto.queues)
    proto.connection_lost()
    assert fd_count() == before
    assert all(r.map_base == 0 for r in regions_seen)


# --- a hostile frontend (issue 10): ring bases validated at the message, received fds checked
# for their kind and made non-blocking, per-connection limits (guest memory, fds per message)
# with a failure ack first and a disconnect if the frontend goes on, and feature changes applied
# to stopped queues only.


def blocking(fd):
    return not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


class LimitedPeer(Peer):
    def __init__(self, limits, **kw):
        super().__init__(**kw)
        self.proto = BackendProtocol(self.device, name="test", limits=limits)


def test_vring_base_above_16_bits_is_refused(ready):
    assert ready.ack(R.SET_VRING_BASE, state(0, 0x10000)) != 0
    assert ready.proto.queue(0).base == 0
    assert ready.ack(R.SET_VRING_BASE, state(0, 0xFFFF)) == 0
    assert ready.proto.queue(0).base == 0xFFFF
    # the queue never runs with a refused base: a start sees the last accepted one
    ready.setup_ring(0, base=0x1234)
    ready.enable(0)
    assert ready.device.starts(0)[-1].last_avail_idx == 0x1234


def test_vring_addr_unknown_flags_refused(ready):
    assert ready.ack(R.SET_VRING_ADDR, vring_addr(0, UVA, UVA + 0x2000, UVA + 0x1000,
                                                  flags=0x2)) != 0
    assert ready.proto.queue(0).desc_addr is None


@pytest.mark.parametrize("request_", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_vring_fds_of_the_wrong_kind_are_refused(ready, tmp_path, request_):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 64)
    a, b = socket.socketpair()
    r, w = os.pipe()
    wrong = {
        "regular file": os.open(path, os.O_RDWR),
        "socket": a.detach(),
        "/dev/null": os.open("/dev/null", os.O_RDWR),
        "memfd": memfd(4096),
        # a pipe end in the wrong direction: kicks are read, calls/errs written
        "pipe end": w if request_ == R.SET_VRING_KICK else r,
    }
    for what, fd in wrong.items():
        assert ready.ack(request_, vu.u64(0), [fd]) != 0, what
        assert not is_open(fd), what                   # refused fds are closed at once
    b.close()
    os.close(w if request_ != R.SET_VRING_KICK else r)
    q = ready.proto.queue(0)
    assert (q.kick_fd, q.call_fd, q.err_fd) == (-1, -1, -1)
    # the connection goes on
    assert len(ready.send(R.GET_FEATURES)) == 1


def test_blocking_eventfd_and_pipe_are_made_nonblocking(ready):
    ev = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(ev, 0xFFFF_FFFF_FFFF_FFFE)                 # saturated, and blocking
    assert blocking(ev)
    assert ready.ack(R.SET_VRING_CALL, vu.u64(0), [ev]) == 0
    assert ready.proto.queue(0).call_fd == ev and not blocking(ev)
    # a write that would have blocked the writer forever now fails at once
    with pytest.raises(BlockingIOError):
        os.eventfd_write(ev, 1)
    r, w = os.pipe()
    assert blocking(r) and blocking(w)
    assert ready.ack(R.SET_VRING_KICK, vu.u64(0), [r]) == 0
    assert ready.ack(R.SET_VRING_ERR, vu.u64(0), [w]) == 0
    assert not blocking(r) and not blocking(w)


def test_check_event_fd_kinds():
    ev = os.eventfd(0)
    r, w = os.pipe()
    try:
        assert check_event_fd(ev, write=True) == "eventfd"
        assert check_event_fd(r, write=False) == "pipe"
        assert check_event_fd(w, write=True) == "pipe"
    finally:
        for fd in (ev, r, w):
            os.close(fd)


def test_memory_region_fd_must_be_a_regular_file(peer):
    peer.negotiate()
    null = os.open("/dev/zero", os.O_RDWR)
    assert peer.ack(R.SET_MEM_TABLE, mem_table(region(0, MEM_SIZE, UVA)), [null]) != 0
    assert not is_open(null) and len(peer.proto.memory) == 0


def test_guest_memory_limit_refuses_then_disconnects():
    limit = 4 << 20
    p = LimitedPeer(Limits(max_guest_memory=limit))
    p.negotiate()
    big = 1 << 40                                   # sparse: costs nothing until mapped
    fd = memfd(big)
    assert p.ack(R.SET_MEM_TABLE, mem_table(region(0, big, UVA)), [fd]) != 0
    assert len(p.proto.memory) == 0 and not is_open(fd)
    # within the limit: fine
    assert p.ack(R.SET_MEM_TABLE, mem_table(region(0, MEM_SIZE, UVA)), [memfd(MEM_SIZE)]) == 0
    # ADD_MEM_REG counts what is already mapped
    r = region(MEM_SIZE, limit, UVA + MEM_SIZE)
    with pytest.raises(ProtocolClosed, match="max-guest-memory"):
        p.send(R.ADD_MEM_REG, single_region(r), vu.VERSION | vu.FLAG_NEED_REPLY,
               [memfd(limit)])
    assert p.proto.memory.regions[0].size == MEM_SIZE      # nothing more was mapped
    p.proto.connection_lost()


def test_guest_memory_limit_default_is_twice_host_ram():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")     # = MemTotal
    assert Limits().guest_memory() == 2 * ram > 0
    assert Limits(max_guest_memory=5 << 30).guest_memory() == 5 << 30


def test_fds_trickling_into_one_message_are_capped():
    before = fd_count()
    p = LimitedPeer(Limits(max_message_fds=16))
    p.negotiate()
    data = msg(R.SET_VRING_CALL, vu.u64(0), vu.VERSION | vu.FLAG_NEED_REPLY)
    # the first two bytes carry 8 fds each: still under the cap, held for the message
    assert p.proto.receive(data[:1], [eventfd() for _ in range(8)]) == []
    assert p.proto.receive(data[1:2], [eventfd() for _ in range(8)]) == []
    assert fd_count() == before + 16
    # over the cap: every fd of the message is closed at once; the message gets a failure ack
    replies = p.proto.receive(data[2:3], [eventfd() for _ in range(8)])
    assert replies == [] and fd_count() == before
    replies = p.proto.receive(data[3:])
    assert len(replies) == 1                        # the failure ack of the refused message
    req, flags, body = parse_reply(replies[0])
    assert req == R.SET_VRING_CALL and u64_of(body) != 0
    assert p.proto.queue(0).call_fd == -1
    # a normal message afterwards works
    fd = eventfd()
    assert p.ack(R.SET_VRING_CALL, vu.u64(0), [fd]) == 0
    # going on: the next message over the cap disconnects, holding nothing
    p.proto.receive(data[:1], [eventfd() for _ in range(8)])
    p.proto.receive(data[1:2], [eventfd() for _ in range(8)])
    with pytest.raises(ProtocolClosed, match="max-message-fds"):
        p.proto.receive(data[2:3], [eventfd() for _ in range(8)])
    p.proto.connection_lost()
    assert fd_count() == before


def test_set_features_stops_queues_before_the_device_sees_the_change(ready):
    events = []
    dev = ready.device
    orig_ack, orig_stop = dev.ack_features, dev.stop_queue
    dev.ack_features = lambda f: (events.append(("ack", f)), orig_ack(f))[1]
    dev.stop_queue = lambda i: (events.append(("stop", i)), orig_stop(i))[1]
    ready.setup_ring(0)
    ready.enable(0)
    assert 0 in dev.running
    feats = dev.acked[-1]
    assert ready.ack(R.SET_FEATURES, vu.u64(feats & ~0x10000000)) == 0     # EVENT_IDX off
    assert events[:2] == [("stop", 0), ("ack", feats & ~0x10000000)]
    assert 0 in dev.running                           # restarted with the new set
    assert dev.starts(0)[-1].features == feats & ~0x10000000


# --- dirty logging (VHOST_F_LOG_ALL, LOG_SHMFD) ------------------------------------------------

class LoggingDevice(FakeDevice):
    """A FakeDevice whose workers would log (dirty_log); stop records whether the log its
    worker had was still mapped at that moment."""
    dirty_log = True

    def __init__(self, proto_ref, **kw):
        super().__init__(**kw)
        self.proto_ref = proto_ref
        self.log_mapped_at_stop = []

    def stop_queue(self, index):
        h = self.running[index]
        if h.log is not None:
            # the log the worker had is still mapped: its first byte is readable here
            self.log_mapped_at_stop.append(ctypes.c_uint8.from_address(h.log_addr).value >= 0)
        return super().stop_queue(index)


def log_base(size, offset=0):
    return vu.Log.build(dict(mmap_size=size, mmap_offset=offset))


@pytest.fixture
def logging_peer():
    ref = []
    p = Peer(LoggingDevice(ref))
    yield p
    p.proto.connection_lost()


def test_dirty_log_offered_only_by_devices_that_log(peer, logging_peer):
    assert not u64_of(peer.get(R.GET_FEATURES)) & vu.VHOST_F_LOG_ALL
    assert not u64_of(peer.get(R.GET_PROTOCOL_FEATURES)) & PF.LOG_SHMFD
    assert u64_of(logging_peer.get(R.GET_FEATURES)) & vu.VHOST_F_LOG_ALL
    assert u64_of(logging_peer.get(R.GET_PROTOCOL_FEATURES)) & PF.LOG_SHMFD


def test_set_log_base_replies_and_queues_log_while_log_all(logging_peer):
    p = logging_peer
    features = p.negotiate(u64_of(p.get(R.GET_FEATURES)) & ~vu.VHOST_F_LOG_ALL)
    p.add_memory()
    p.setup_ring(0)
    p.enable(0)
    assert p.device.running[0].log is None               # no LOG_ALL: not logging
    lfd = memfd(4096)
    # with LOG_SHMFD the reply is a message of its own (QEMU reads it), no NEED_REPLY needed
    assert p.send(R.SET_LOG_BASE, log_base(4096), fds=[lfd]) == [
        (R.SET_LOG_BASE, REPLY, vu.u64(0))]
    assert not is_open(lfd)                              # mapped, fd closed
    assert p.device.running[0].log is None               # still no LOG_ALL
    # migration starts: LOG_ALL on a running queue, then VHOST_VRING_F_LOG with the used ring
    assert p.ack(R.SET_FEATURES, vu.u64(features | vu.VHOST_F_LOG_ALL)) == 0
    h = p.device.running[0]
    assert h.log is not None and h.log[1] == 4096 and h.log[2] == -1
    used_gpa = GPA + USED
    addr = vu.VringAddr.build(dict(index=0, flags=vu.VRING_ADDR_F_LOG, descriptor=UVA + DESC,
                                   used=UVA + USED, available=UVA + AVAIL, log=used_gpa))
    assert p.ack(R.SET_VRING_ADDR, addr) == 0
    assert p.device.running[0].log == (h.log_addr, 4096, used_gpa)
    # migration ends: LOG_ALL off: the queue runs on without a log, at the index it stopped
    p.device.advance[0] = 5
    assert p.ack(R.SET_FEATURES, vu.u64(features)) == 0
    assert p.device.running[0].log is None
    assert p.device.running[0].last_avail_idx == 5
    assert p.device.log_mapped_at_stop == [True, True]


def test_a_new_log_restarts_the_logging_queues_before_the_old_is_unmapped(logging_peer):
    p = logging_peer
    features = p.negotiate()
    assert features & vu.VHOST_F_LOG_ALL
    p.add_memory()
    first = memfd(4096)
    assert p.send(R.SET_LOG_BASE, log_base(4096), fds=[first])[0][2] == vu.u64(0)
    p.setup_ring(0)
    p.enable(0)
    old = p.device.running[0].log_addr
    assert old
    second = memfd(8192)
    assert p.send(R.SET_LOG_BASE, log_base(8192), fds=[second])[0][2] == vu.u64(0)
    h = p.device.running[0]
    assert h.log_addr and h.log_size == 8192
    assert p.device.stops(0) == [0]                   # the worker on the old log stopped ...
    assert p.device.log_mapped_at_stop == [True]      # ... while it was still mapped
    # the old mapping is gone now
    with open("/proc/self/maps") as f:
        starts = {int(line.split("-")[0], 16) for line in f}
    assert old not in starts and h.log_addr in starts


def test_set_log_base_refusals(logging_peer):
    p = logging_peer
    # LOG_SHMFD not negotiated: the old form, nothing to log into: a failure ack
    p.send(R.SET_PROTOCOL_FEATURES, vu.u64(PF.REPLY_ACK))
    fd = memfd(4096)
    assert p.ack(R.SET_LOG_BASE, log_base(4096), [fd]) != 0
    assert not is_open(fd)
    # negotiated: a log that cannot be mapped closes the connection (the frontend would take
    # any reply for success and migrate without a log)
    for payload, fds in ((log_base(8192), [memfd(4096)]),        # fd shorter than the log
                         (log_base(4096), [eventfd()]),          # not a regular file
                         (log_base(4096, 100), [memfd(8192)]),   # unaligned offset
                         (log_base(4096), [])):                  # no fd
        q = Peer(LoggingDevice([]))
        q.negotiate()
        with pytest.raises(ProtocolClosed):
            q.send(R.SET_LOG_BASE, payload, fds=fds)
        assert all(not is_open(f) for f in fds)
        q.proto.connection_lost()


def test_log_counts_towards_the_memory_limit():
    p = Peer(LoggingDevice([]))
    p.proto = BackendProtocol(p.device, name="test", limits=Limits(max_guest_memory=MEM_SIZE
                                                                   + 4096))
    p.negotiate()
    p.add_memory()
    fd = memfd(8192)
    with pytest.raises(ProtocolClosed):
        p.send(R.SET_LOG_BASE, log_base(8192), fds=[fd])
    assert not is_open(fd)
    p.proto.connection_lost()


def test_set_log_fd_kept_checked_and_closed_at_the_end(logging_peer):
    p = logging_peer
    p.negotiate()
    fd = memfd(4096)
    assert p.ack(R.SET_LOG_FD, fds=[fd]) != 0              # not an eventfd
    assert not is_open(fd)
    efd = os.eventfd(0, os.EFD_CLOEXEC)                    # blocking: made non-blocking
    assert p.ack(R.SET_LOG_FD, fds=[efd]) == 0
    assert is_open(efd) and fcntl.fcntl(efd, fcntl.F_GETFL) & os.O_NONBLOCK
    p.proto.connection_lost()
    assert not is_open(efd)


def test_connection_lost_unmaps_the_log(logging_peer):
    p = logging_peer
    p.negotiate()
    assert p.send(R.SET_LOG_BASE, log_base(4096), fds=[memfd(4096)])[0][2] == vu.u64(0)
    addr = p.proto._dirty_log.host_addr
    p.proto.connection_lost()
    with open("/proc/self/maps") as f:
        assert addr not in {int(line.split("-")[0], 16) for line in f}


# --- inflight tracking (GET/SET_INFLIGHT_FD) -------------------------------------------------

class InflightDevice(FakeDevice):
    inflight_tracking = True


def inflight_msg(nq, qsize, size=0, offset=0):
    return vu.Inflight.build(dict(mmap_size=size, mmap_offset=offset, num_queues=nq,
                                  queue_size=qsize))


def mapped_starts():
    with open("/proc/self/maps") as f:
        return {int(line.split("-")[0], 16) for line in f}


@pytest.fixture
def inflight_peer():
    p = Peer(InflightDevice())
    yield p
    p.proto.connection_lost()


def test_inflight_offered_only_by_devices_that_track(peer, inflight_peer):
    assert not u64_of(peer.get(R.GET_PROTOCOL_FEATURES)) & PF.INFLIGHT_SHMFD
    assert u64_of(inflight_peer.get(R.GET_PROTOCOL_FEATURES)) & PF.INFLIGHT_SHMFD


def test_get_inflight_fd_answers_with_a_sealed_memfd_the_queues_track_in(inflight_peer):
    p = inflight_peer
    p.negotiate()
    replies = p.proto.receive(msg(R.GET_INFLIGHT_FD, inflight_msg(2, QSIZE)), [])
    assert len(replies) == 1 and len(replies[0].fds) == 1
    req, flags, body = parse_reply(replies[0])
    assert (req, flags) == (R.GET_INFLIGHT_FD, REPLY)
    info = vu.Inflight.parse(body)
    per = vu.inflight_queue_size(QSIZE)
    assert (info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size) == \
        (2 * per, 0, 2, QSIZE)
    fd = replies[0].fds[0]
    assert os.fstat(fd).st_size == 2 * per
    with pytest.raises(OSError):                 # sealed: the frontend cannot shrink it
        os.ftruncate(fd, 0)
    p.add_memory()
    p.setup_ring(0)
    p.setup_ring(1)
    p.enable(0)
    p.enable(1)
    h0, h1 = p.device.running[0], p.device.running[1]
    assert h0.inflight_addr and h1.inflight_addr == h0.inflight_addr + per
    assert h0.inflight == (h0.inflight_addr, per)
    p.proto.connection_lost()                    # the fd the reply borrowed is ours: closed
    assert not is_open(fd) and h0.inflight_addr not in mapped_starts()


def test_set_inflight_fd_replaces_the_region_under_running_queues(inflight_peer):
    p = inflight_peer
    p.negotiate()
    p.add_memory()
    p.setup_ring(0)
    p.enable(0)
    assert p.device.running[0].inflight is None          # no region yet: not tracking
    per = vu.inflight_queue_size(QSIZE)
    first = memfd(per)
    assert p.ack(R.SET_INFLIGHT_FD, inflight_msg(1, QSIZE, per), [first]) == 0
    assert not is_open(first)                             # mapped, fd closed
    old = p.device.running[0].inflight_addr
    assert old and p.device.stops(0) == [0]               # restarted to pick it up
    second = memfd(2 * per)
    assert p.ack(R.SET_INFLIGHT_FD, inflight_msg(1, QSIZE, 2 * per), [second]) == 0
    new = p.device.running[0].inflight_addr
    assert new != old and new in mapped_starts() and old not in mapped_starts()
    # a queue of another size than the region's is served without tracking
    p.setup_ring(1, size=QSIZE // 2)
    p.enable(1)
    assert 1 in p.device.running and p.device.running[1].inflight is None


def test_inflight_refusals(inflight_peer):
    p = inflight_peer
    per = vu.inflight_queue_size(QSIZE)
    # not negotiated: refused (GET has a reply of its own: the connection closes)
    p.send(R.SET_PROTOCOL_FEATURES, vu.u64(PF.REPLY_ACK))
    fd = memfd(per)
    assert p.ack(R.SET_INFLIGHT_FD, inflight_msg(1, QSIZE, per), [fd]) != 0
    assert not is_open(fd)
    p.negotiate()
    for payload, fds in ((inflight_msg(1, QSIZE, per), [memfd(per - 64)]),   # fd too short
                         (inflight_msg(1, QSIZE, per - 64), [memfd(per)]),    # size too small
                         (inflight_msg(3, QSIZE, 3 * per), [memfd(3 * per)]),  # > num_queues
                         (inflight_msg(0, QSIZE, per), [memfd(per)]),          # no queues
                         (inflight_msg(1, 100, per), [memfd(per)]),           # not a power of 2
                         (inflight_msg(1, QSIZE, per, 100), [memfd(2 * per)]),  # unaligned
                         (inflight_msg(1, QSIZE, per), [eventfd()]),           # not a file
                         (inflight_msg(1, QSIZE, per), [])):                   # no fd
        assert p.ack(R.SET_INFLIGHT_FD, payload, fds) != 0
        assert all(not is_open(f) for f in fds)
    assert p.proto._inflight is None
    for bad in (inflight_msg(3, QSIZE), inflight_msg(1, 3 * QSIZE)):
        q = Peer(InflightDevice())
        q.negotiate()
        with pytest.raises(ProtocolClosed):
            q.send(R.GET_INFLIGHT_FD, bad)
        q.proto.connection_lost()


def test_inflight_region_counts_towards_the_memory_limit():
    p = Peer(InflightDevice())
    per = vu.inflight_queue_size(1024)
    p.proto = BackendProtocol(p.device, name="test",
                              limits=Limits(max_guest_memory=MEM_SIZE + per))
    p.negotiate()
    p.add_memory()
    fd = memfd(2 * per)
    assert p.ack(R.SET_INFLIGHT_FD, inflight_msg(2, 1024, 2 * per), [fd]) != 0
    assert not is_open(fd) and p.proto._inflight is None
    fd = memfd(per)
    assert p.ack(R.SET_INFLIGHT_FD, inflight_msg(1, 1024, per), [fd]) == 0
    p.proto.connection_lost()


def test_a_header_read_out_of_a_payload_after_a_lying_size_gets_a_failure_ack(peer):
    """Found by the long protocol fuzz run (tests/fuzz/crashes/protocol/): a frontend that
    announces fewer payload bytes than it sends makes the rest of its payload the next header;
    an unknown request there with NEED_REPLY is answered with a failure ack of that request
    number, and the connection goes on."""
    peer.negotiate()
    garbage = vu.Header.build(dict(request=8995, flags=NEED, size=0))
    data = vu.Header.build(dict(request=R.GET_FEATURES, flags=vu.VERSION, size=0)) + garbage
    replies = [parse_reply(r) for r in peer.proto.receive(data)]
    assert replies[0][0] == R.GET_FEATURES
    assert replies[1] == (8995, REPLY, vu.u64(1))
    assert u64_of(peer.get(R.GET_FEATURES))                 # still serving
