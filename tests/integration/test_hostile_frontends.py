"""Issue 10: hostile vhost-user frontends through a real socket, each against a `pyvhost serve`
that also serves healthy devices, blk and net, whose I/O must keep completing within a bounded
time while the hostile frontend does its worst; afterwards the victim devices serve a NEW
frontend, and SIGTERM still stops the service with exit status 0 (every device logged as
stopped).

The service (vhost/testing/healthy.py, HostileService): `healthy-blk` (a BlkLoad: 4 KiB write +
read-verify in a loop), switch `sw` with `healthy-a` <-> `healthy-b` (a NetPairLoad: unicast
frames both ways after MAC learning), the victims `victim-blk` and `victim` (a switch port),
`peer` (a well-behaved port flooding frames into the switch, PeerFlood, so that frames reach
`victim`), and `idle-blk` / `idle-net` kept free for probes (a device serves one frontend at a
time, so a NEW connection to a healthy device needs one nobody uses).  stop-timeout is 3 s.
The hostile side is vhost/testing/raw.py (RawFrontend, the fds and payloads) or a normal
frontend that goes on with hand-made messages (VhostUserFrontend.ack).

 1a  tx ring base 0x10000 (SET_VRING_BASE while stopped, then a re-kick): refused, never used;
     then SET_MEM_TABLE with a new memfd (the old memory gone) while `peer` broadcasts.
 1b  the rx call fd replaced hundreds of times (fd numbers reused on both sides, err eventfds
     landing on the numbers freed) while `peer` floods the victim: the latest call fd still
     gets interrupts, no stale number is ever written.
 2   SET_FEATURES toggled between VERSION_1|MRG_RXBUF and nothing while `peer` floods: no
     crash, and every rx buffer the device took comes back used.
 3   a blocking eventfd with a saturated counter as call fd (rx of `victim`, queue 0 of
     `victim-blk`): accepted (made non-blocking), the service keeps answering; a regular
     file, a socket, /dev/null as kick or call fd: refused, nothing changes.
 5   limits: max-guest-memory (SET_MEM_TABLE, ADD_MEM_REG over 1 GiB: refused, then a
     disconnect, the address space does not grow); max-message-fds (a message trickled one
     byte at a time with 8 fds on every byte: refused, then a disconnect, the fd table does
     not grow).
 6   SIGTERM while hostile frontends are mid-conversation and the healthy load runs (both
     event loops).

Every loop is bounded in count and time; all traffic stays in the service's switch.
"""
from __future__ import annotations

import os
import select
import signal
import time

import pytest

from protocols import virtio
from protocols import virtio_blk as vblk
from protocols import virtio_net as vnet
from protocols.vhost_user import (
    HEADER_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Config,
    FrontendReq as R,
    VringState,
    u64,
)
from vhost.testing.blk import Frontend, blk_write
from vhost.testing.errors import FrontendError, VhostUserError
from vhost.testing.healthy import (
    BLK_DEVICES,
    MAC_PEER,
    MAC_VICTIM,
    NET_PORTS,
    SERVICE_EXIT_TIMEOUT,
    HostileService,
    PeerFlood,
    blk_roundtrip,
    get_features_time,
    proc_alive,
    proc_fd_count,
    proc_vm_size,
)
from vhost.testing.net import BROADCAST, NetFrontend, make_frame
from vhost.testing.raw import (
    RawFrontend,
    mem_table,
    saturated_eventfd,
    single_region,
    sparse_memfd,
    vring_fd,
    vring_state,
    wrong_kind_fds,
)

# The healthy loads' longest time without a completed operation during a scenario.  The
# healthy devices share nothing with the victims but the process: their own control threads
# and queue workers, the GIL and this machine's 2 CPUs.  Unattacked, an operation takes well
# under a millisecond and the longest gap measured is ~0.35 s (an O_DIRECT write of the blk
# load waiting for this VM's disk, or a 5 ms GIL switch interval times the test process's busy
# threads).  A hostile frontend that gets at the whole process -- a thread blocked forever with
# the GIL held, a full fd table, a crash -- stops every load for good.  3 s is ~10x the worst
# unattacked gap and as long as stop-timeout, so a victim queue whose stop runs into
# stop-timeout on the victim's control thread must not show on the healthy devices either.
STALL_BOUND = 3.0
# A NEW connection to an idle healthy device: GET_FEATURES is answered by a fresh control
# thread in microseconds; 1 s leaves room for a busy machine, not for a wedged event loop.
PROBE_BOUND = 1.0
VICTIM_TIMEOUT = 5.0        # every wait of a hostile frontend
ALL_DEVICES = set(BLK_DEVICES) | set(NET_PORTS)
MAC_VICTIM2 = bytes.fromhex("02c000000033")
GiB = 1 << 30
UVA = 0x7E00_0000_0000      # frontend addresses of the hostile regions (never dereferenced)
LOOPS = [{"loop": "asyncio"}, {"loop": "uvloop"}]     # `service` params: the service's loop


@pytest.fixture
def service(request):
    """A started HostileService with its healthy loads running; `request.param` (indirect
    parametrization) may give the event loop and extra [service] keys."""
    params = getattr(request, "param", None) or {}
    svc = HostileService(loop=params.get("loop"), service=params.get("service"))
    try:
        svc.start()
        yield svc
    finally:
        svc.close()


# -- checks -----------------------------------------------------------------------------------------

def _tail(svc: HostileService, n: int = 40) -> str:
    return "\n".join(svc.log_text().splitlines()[-n:])


def _death(svc: HostileService) -> str:
    rc = svc.proc.poll()
    if rc is not None and rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"


def assert_healthy(svc: HostileService, what: str) -> None:
    """The service is alive and both healthy loads completed operations during the scenario
    with no gap of STALL_BOUND or more."""
    assert svc.alive(), f"{what}: the service died ({_death(svc)}):\n{_tail(svc)}"
    for name, w in svc.windows().items():
        assert w.error is None, f"{what}: {name} failed: {w.error}\n{_tail(svc)}"
        assert w.ops > 0, f"{what}: {name} completed nothing in {w.seconds:.1f}s"
        assert w.max_stall < STALL_BOUND, \
            f"{what}: {name} stalled {w.max_stall:.2f}s ({w.ops} ops in {w.seconds:.1f}s)"


def probe_times(svc: HostileService) -> dict[str, float | str]:
    """GET_FEATURES on a NEW connection to each idle healthy device: seconds, or the error."""
    out: dict[str, float | str] = {}
    for name in ("idle-blk", "idle-net"):
        try:
            out[name] = get_features_time(svc.sock(name), PROBE_BOUND)
        except (FrontendError, OSError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def assert_probes(svc: HostileService, what: str) -> None:
    for name, t in probe_times(svc).items():
        assert isinstance(t, float) and t < PROBE_BOUND, \
            f"{what}: a new connection to {name} got no GET_FEATURES answer within " \
            f"{PROBE_BOUND}s: {t}"


def quiet_close(fe) -> None:
    """Close a hostile frontend: politely if the backend still talks to it, else just drop it."""
    if fe is None:
        return
    try:
        fe.close()
    except (FrontendError, OSError, ValueError):
        fe._release()


def assert_victims_recover(svc: HostileService, peer: NetFrontend | None = None) -> None:
    """A NEW frontend on `victim-blk` writes and reads back 4 KiB; a NEW frontend on `victim`
    receives a broadcast `peer` sends (through `peer`, or a new frontend on it), and `peer`
    receives the unicast frame it sends back (both of the victim's queues work again)."""
    try:
        st, same = blk_roundtrip(svc.sock("victim-blk"))
    except (FrontendError, OSError) as e:
        raise AssertionError(f"victim-blk after the attack: {type(e).__name__}: {e}\n"
                             f"{_tail(svc)}") from None
    assert st == vblk.S_OK and same, f"victim-blk after the attack: status {st}, data " \
        f"{'ok' if same else 'differs'}\n{_tail(svc)}"
    own = peer is None
    got = None
    try:
        if own:
            peer = NetFrontend(svc.sock("peer"), mac=MAC_PEER, timeout=VICTIM_TIMEOUT).connect()
        with NetFrontend(svc.sock("victim"), mac=MAC_VICTIM2, timeout=VICTIM_TIMEOUT) as v2:
            deadline = time.monotonic() + 10
            seq = 0
            while got is None and time.monotonic() < deadline:
                frame = make_frame(100, dst=BROADCAST, src=MAC_PEER, seq=0x7000 + seq)
                peer.send(frame)
                seq += 1
                for p in v2.recv_packets(8, 0.2):
                    if p.frame[6:12] == MAC_PEER:
                        got = p
                peer.poll_rx()
            if got is not None:
                back = make_frame(120, dst=MAC_PEER, src=MAC_VICTIM2, seq=0x7777)
                v2.send(back)
                answered = [p.frame for p in peer.recv_packets(64, 2) if p.frame == back]
                assert answered, f"victim after the attack: its frame did not reach peer\n" \
                    f"{_tail(svc)}"
    except (FrontendError, OSError) as e:
        raise AssertionError(f"victim after the attack: {type(e).__name__}: {e}\n"
                             f"{_tail(svc)}") from None
    finally:
        if own:
            quiet_close(peer)
    assert got is not None, f"victim after the attack: no frame from peer in 10s\n{_tail(svc)}"


def assert_clean_stop(svc: HostileService) -> None:
    """SIGTERM: exit status 0 within SERVICE_EXIT_TIMEOUT, every device logged as stopped."""
    rc = svc.stop()
    assert rc == 0, f"SIGTERM: {'no exit' if rc is None else f'exit status {rc}'} after " \
        f"{svc.stop_seconds:.1f}s\n{_tail(svc)}"
    stopped = {f.get("device") for f in svc.serve.events("device ")
               if f.get("msg", "").endswith(" stopped")}
    assert stopped == ALL_DEVICES, f"devices not logged as stopped: {ALL_DEVICES - stopped}"


def try_ack(fe, request, payload=b"", fds=()) -> int | str:
    """The ack value, or what happened instead (disconnect, no answer)."""
    try:
        return fe.ack(request, payload, fds)
    except (VhostUserError, TimeoutError, OSError) as e:
        return f"{type(e).__name__}: {e}"


def get_vring_base(fe, index: int) -> int:
    st = VringState.parse(fe.call(R.GET_VRING_BASE, vring_state(index, 0)))
    assert st.index == index
    return st.num


def regions_of(fe) -> list[tuple[int, int, int, int]]:
    return [(r.gpa, r.size, fe.mem.region_user_addr(r), r.mmap_offset) for r in fe.mem.regions]


def connect_victim_port(svc: HostileService, **kw) -> NetFrontend:
    """The hostile frontend's normal start on `victim`: full setup, then one broadcast so the
    switch learns MAC_VICTIM (peer's unicast frames then go to the victim alone)."""
    v = NetFrontend(svc.sock("victim"), mac=MAC_VICTIM, timeout=VICTIM_TIMEOUT, **kw)
    v.connect()
    v.send(make_frame(64, dst=BROADCAST, src=MAC_VICTIM, seq=1))
    v.wait_tx()
    return v


def wait_for(cond, timeout: float, svc: HostileService) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if not svc.alive():
            return False
        time.sleep(0.02)
    return cond()


# -- 1a ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("service", LOOPS, indirect=True, ids=["asyncio", "uvloop"])
def test_vring_base_beyond_16_bits_then_memory_replaced(service):
    """SET_VRING_BASE 0x10000 on `victim`'s stopped tx queue must be refused and never used (a
    re-kick runs the queue at the last accepted base, or not at all); then SET_MEM_TABLE with a
    new memfd replaces all guest memory, twice, while `peer` broadcasts into the switch: the
    service survives (it used to die of SIGSEGV: the refused start left the rx queue attached
    to memory that the second table unmapped), and both victim queues work for the next
    frontend."""
    svc = service
    svc.mark()
    v = connect_victim_port(svc)
    flood = None
    try:
        base = get_vring_base(v, 1)                              # tx stopped (QEMU's stop)
        ack_base = try_ack(v, R.SET_VRING_BASE, vring_state(1, 0x10000))
        ack_kick = try_ack(v, R.SET_VRING_KICK, vring_fd(1), [v.queues[1].kick_fd])
        try:
            base_after = get_vring_base(v, 1)
        except (FrontendError, OSError) as e:
            base_after = f"{type(e).__name__}: {e}"
        ack_kick2 = try_ack(v, R.SET_VRING_KICK, vring_fd(1), [v.queues[1].kick_fd])
        # the same layout in a NEW memfd, twice: the memory the rings were set up in goes away,
        # then the memory that replaced it.  The second memfd holds the regions at an offset
        # (a larger mapping), so that it is not mapped where the first one was and anything
        # still pointing there points at nothing
        ack_mem = []
        for shift in (0, v.mem.size):
            fd = sparse_memfd(v.mem.size + shift)
            try:
                regions = [(g, n, u, o + shift) for g, n, u, o in regions_of(v)]
                ack_mem.append(try_ack(v, R.SET_MEM_TABLE, mem_table(regions),
                                       [fd] * len(regions)))
            finally:
                os.close(fd)
        flood = svc.add_load(PeerFlood(svc.sock("peer"), rate=4000))
        wait_for(lambda: flood.sent >= 4000 or flood.error is not None, 5, svc)
        time.sleep(0.5)
        flood.halt()
    finally:
        quiet_close(v)
    assert_healthy(svc, "tx base 0x10000, then new memory under broadcast")
    assert flood.error is None and flood.sent >= 4000, (flood.sent, flood.error)
    assert ack_base != 0, f"SET_VRING_BASE 0x10000 was accepted (ack {ack_base})"
    assert base_after == base, \
        f"after the refused base and a re-kick, GET_VRING_BASE says {base_after}, not {base} " \
        f"(re-kick ack {ack_kick})"
    assert (ack_kick2, ack_mem) == (0, [0, 0]), (ack_kick2, ack_mem)
    assert_victims_recover(svc, flood.fe)
    quiet_close(flood.fe)
    assert_clean_stop(svc)


# -- 1b ---------------------------------------------------------------------------------------------

REPLACEMENTS = 400


def test_rx_call_fd_replaced_hundreds_of_times_under_flood(service):
    """`peer` floods `victim` with unicast frames while the victim replaces its rx call fd
    REPLACEMENTS times, closing each old one at once and opening other files so that its fd
    numbers are reused, and every fourth time gives an err eventfd for the same queue (in the
    backend it lands on the number of the call fd just closed).  The service survives, no err
    eventfd is ever written (nothing writes a stale call fd number), and the latest call fd
    still gets the interrupt for a new frame."""
    svc = service
    svc.mark()
    v = connect_victim_port(svc)
    flood = svc.add_load(PeerFlood(svc.sock("peer"), dst=MAC_VICTIM))
    acks, err_acks, errs, fillers = [], [], [], []
    signalled = None
    received = 0
    failure = None
    try:
        deadline = time.monotonic() + 12
        for n in range(REPLACEMENTS):
            if time.monotonic() > deadline or not svc.alive():
                break
            acks.append(v.replace_call_fd(0, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)))
            fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            if len(fillers) > 4:
                os.close(fillers.pop(0))
            if n % 4 == 0:
                err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                errs.append(err)
                err_acks.append(v.ack(R.SET_VRING_ERR, vring_fd(0), [err]))
            received += len(v.poll_rx())
        flood.halt()
        # the latest call fd: drain what is there, arm, one more frame -> an interrupt
        v.drain(quiet=0.3)
        vq = v.queues[0]
        vq.drain_call()
        assert not vq.arm_interrupt()
        frame = make_frame(200, dst=MAC_VICTIM, src=MAC_PEER, seq=0xABCDEF)
        flood.fe.send(frame)
        p = select.poll()
        p.register(vq.call_fd, select.POLLIN)
        signalled = bool(p.poll(5000))
        got = [x.frame for x in v.recv_packets(1, 2)]
    except (FrontendError, OSError) as e:
        failure = f"{type(e).__name__}: {e}"
    finally:
        flood.halt()
        quiet_close(v)
        for fd in fillers:
            os.close(fd)
    written = []
    for fd in errs:
        try:
            written.append(os.eventfd_read(fd))
        except BlockingIOError:
            pass
        os.close(fd)
    assert_healthy(svc, "rx call fd replaced under flood")
    assert failure is None, f"the victim's conversation failed: {failure}"
    assert len(acks) == REPLACEMENTS and set(acks) == {0}, (len(acks), set(acks))
    assert set(err_acks) == {0}, set(err_acks)
    assert received > 0 and flood.sent > 0, (received, flood.sent)
    assert not written, f"{len(written)} err eventfds were written: a stale call fd number " \
        f"was signalled"
    assert signalled, "the latest call fd got no interrupt for a new frame"
    assert got == [frame]
    assert_victims_recover(svc, flood.fe)
    quiet_close(flood.fe)
    assert_clean_stop(svc)


# -- 2 ----------------------------------------------------------------------------------------------

TOGGLE_SECONDS = 20.0
MAX_TOGGLES = 8000
BURST = 10                  # SET_FEATURES sent back to back, the last one acked


def test_features_toggled_under_flood_no_crash_no_leak(service):
    """`peer` floods `victim` with unicast frames (60..1514 bytes) while the victim toggles
    SET_FEATURES between VERSION_1|MRG_RXBUF and nothing (the protocol-features bit kept) for
    TOGGLE_SECONDS or MAX_TOGGLES, in bursts of BURST messages of which the last asks for an
    ack, taking its rx buffers back and reposting them unparsed between bursts.  The service
    survives (it used to segfault in rx_deliver's memcpy: the header length changed under a
    delivery in progress), every frame delivered meanwhile is laid out with one header length
    (12 or 10 bytes) from start to end, after settling on the victim's own features a frame
    arrives intact, and no rx buffer leaked: the device's rx index (GET_VRING_BASE) equals the used index, so
    every buffer it took came back used and the rest are still available."""
    svc = service
    svc.mark()
    v = connect_victim_port(svc)
    flood = svc.add_load(PeerFlood(svc.sock("peer"), dst=MAC_VICTIM))
    on = virtio.F_VERSION_1 | vnet.F_MRG_RXBUF | VHOST_USER_F_PROTOCOL_FEATURES
    off = VHOST_USER_F_PROTOCOL_FEATURES
    sent = set(flood.frames)
    acks = []
    toggles = 0
    taken = torn = 0
    failure = None
    base = used = outstanding = avail = None
    got = []
    try:
        deadline = time.monotonic() + TOGGLE_SECONDS
        while toggles < MAX_TOGGLES and time.monotonic() < deadline and svc.alive():
            for _ in range(BURST - 1):
                v.send_message(R.SET_FEATURES, u64(off if toggles % 2 == 0 else on))
                toggles += 1
            acks.append(v.ack(R.SET_FEATURES, u64(off if toggles % 2 == 0 else on)))
            toggles += 1
            delivered = []
            taken += v.recycle_rx(collect=delivered)
            # each frame laid out with one header length, 12 (VERSION_1) or 10, start to end
            torn += sum(1 for d in delivered if d[12:] not in sent and d[10:] not in sent)
        acks.append(v.ack(R.SET_FEATURES, u64(v.features)))         # settle
        flood.halt()
        quiet_until = time.monotonic() + 0.3
        while time.monotonic() < quiet_until:
            if v.recycle_rx():
                quiet_until = time.monotonic() + 0.3
            time.sleep(0.01)
        taken += v.recycle_rx()
        frame = make_frame(1000, dst=MAC_VICTIM, src=MAC_PEER, seq=0x5EED)
        flood.fe.send(frame)
        got = [p.frame for p in v.recv_packets(1, VICTIM_TIMEOUT)]
        v.recycle_rx()
        base = get_vring_base(v, 0)
        used = v.queues[0].used_idx()
        outstanding = v.rx_posted(0)
        avail = v.queues[0].avail_idx
    except (FrontendError, OSError) as e:
        failure = f"{type(e).__name__}: {e} (after {toggles} toggles)"
    finally:
        flood.halt()
        quiet_close(v)
    assert_healthy(svc, f"SET_FEATURES toggled under flood ({toggles} toggles)")
    assert failure is None, f"the victim's conversation failed: {failure}"
    assert set(acks) == {0}, f"{len(acks)} acked SET_FEATURES, acks {set(acks)}"
    assert taken > 0, "the device delivered nothing to the victim: the test proved nothing"
    assert torn == 0, f"{torn} of {taken} frames delivered while the features changed are " \
        f"neither header + frame nor legacy header + frame"
    assert got == [frame], "after settling the features the victim's frame did not arrive intact"
    assert base == used, f"rx buffers leaked: the device took {base} (mod 2^16), returned " \
        f"{used}"
    assert (avail - base) & 0xFFFF == outstanding, (avail, base, outstanding)
    assert_victims_recover(svc, flood.fe)
    quiet_close(flood.fe)
    assert_clean_stop(svc)


# -- 3 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["victim-rx", "victim-blk"])
def test_saturated_blocking_call_eventfd(service, target):
    """A blocking eventfd whose counter is at 0xfffffffffffffffe as the call fd of `victim`'s rx
    queue (while `peer` sends it frames) or of `victim-blk`'s queue 0 (with a write in flight):
    accepted, made non-blocking by the backend, so a signal never blocks anyone; the victim's
    ring keeps being served (used entries appear), a NEW connection to a healthy device is
    answered within PROBE_BOUND, and the healthy load keeps its bound."""
    svc = service
    svc.mark()
    sat = saturated_eventfd(blocking=True)
    fe = flood = None
    progressed = None
    flood_error = None
    try:
        if target == "victim-rx":
            fe = connect_victim_port(svc)
            ack = try_ack(fe, R.SET_VRING_CALL, vring_fd(0), [sat])
            flood = PeerFlood(svc.sock("peer"), dst=MAC_VICTIM, rate=2000)
            try:
                svc.add_load(flood)
            except (RuntimeError, TimeoutError) as e:
                flood_error = str(e)
            vq = fe.queues[0]
            progressed = wait_for(lambda: vq.used_idx() != 0, VICTIM_TIMEOUT, svc)
        else:
            fe = Frontend(svc.sock("victim-blk"), timeout=VICTIM_TIMEOUT)
            fe.connect()
            ack = try_ack(fe, R.SET_VRING_CALL, vring_fd(0), [sat])
            vq = fe.queues[0]
            ctx = fe._prepare(vq, blk_write(0, b"s" * 4096), 0)
            vq.publish([ctx.head])
            vq.kick(force=True)
            # nobody can be signalled: look at the used ring itself
            progressed = wait_for(lambda: vq.used_idx() != 0, VICTIM_TIMEOUT, svc)
        time.sleep(1)
        probes = probe_times(svc)
    finally:
        if flood is not None:
            flood.halt()
        quiet_close(fe)
        os.close(sat)
    assert_healthy(svc, f"saturated blocking call eventfd on {target}")
    for name, t in probes.items():
        assert isinstance(t, float) and t < PROBE_BOUND, \
            f"a new connection to {name} got no GET_FEATURES answer within {PROBE_BOUND}s: {t}"
    assert flood_error is None, f"peer could not start: {flood_error}"
    assert ack == 0, f"the saturated eventfd was not accepted: {ack}"
    assert progressed, f"{target}: no used entry within {VICTIM_TIMEOUT}s"
    assert_victims_recover(svc, flood.fe if flood is not None else None)
    if flood is not None:
        quiet_close(flood.fe)
    assert_clean_stop(svc)


def test_wrong_kind_of_fd_as_kick_or_call_is_refused(service):
    """A regular file, a socket and /dev/null as the kick or call fd of `victim-blk`'s queue and
    of both `victim` queues: each refused with a failure ack, the connection goes on (GET_FEATURES
    answers), and nothing changed: both victims still do I/O with their own eventfds."""
    svc = service
    svc.mark()
    blk = Frontend(svc.sock("victim-blk"), timeout=VICTIM_TIMEOUT)
    net = None
    results: dict[tuple, int | str] = {}
    answered: dict[tuple, bool] = {}
    works = {}
    try:
        blk.connect()
        net = connect_victim_port(svc)
        for fe, dev, q in ((blk, "victim-blk", 0), (net, "victim", 0), (net, "victim", 1)):
            for req in (R.SET_VRING_KICK, R.SET_VRING_CALL):
                for kind, fd in wrong_kind_fds(svc.tmp).items():
                    key = (dev, q, req.name, kind)
                    try:
                        results[key] = try_ack(fe, req, vring_fd(q), [fd])
                    finally:
                        os.close(fd)
                    try:
                        answered[key] = fe.call_u64(R.GET_FEATURES) == fe.backend_features
                    except (FrontendError, OSError):
                        answered[key] = False
        data = os.urandom(4096)
        try:
            works["victim-blk"] = blk.write(8, data) == vblk.S_OK and \
                blk.read(8, 4096) == (vblk.S_OK, data)
        except (FrontendError, OSError) as e:
            works["victim-blk"] = f"{type(e).__name__}: {e}"
        try:
            with NetFrontend(svc.sock("peer"), mac=MAC_PEER, timeout=VICTIM_TIMEOUT) as peer:
                frame = make_frame(300, dst=MAC_VICTIM, src=MAC_PEER, seq=3)
                peer.send(frame)
                works["victim rx"] = [p.frame for p in net.recv_packets(1, VICTIM_TIMEOUT)] \
                    == [frame]
                frame2 = make_frame(300, dst=MAC_PEER, src=MAC_VICTIM, seq=4)
                net.send(frame2)
                works["victim tx"] = [p.frame for p in peer.recv_packets(1, VICTIM_TIMEOUT)] \
                    == [frame2]
        except (FrontendError, OSError) as e:
            works["victim"] = f"{type(e).__name__}: {e}"
    finally:
        quiet_close(blk)
        quiet_close(net)
    assert_healthy(svc, "wrong kinds of fd as kick/call")
    accepted = {k: v for k, v in results.items() if v == 0}
    assert not accepted, f"accepted as kick/call fd: {sorted(accepted)}"
    gone = {k: v for k, v in results.items() if not isinstance(v, int)}
    assert not gone, f"no failure ack: {gone}"
    assert all(answered.values()), [k for k, ok in answered.items() if not ok]
    assert works == {"victim-blk": True, "victim rx": True, "victim tx": True}, works
    assert_probes(svc, "after wrong kinds of fd")
    assert_victims_recover(svc)
    assert_clean_stop(svc)


# -- 5a: max-guest-memory -------------------------------------------------------------------------

LIMITED = {"service": {"max-guest-memory": '"1G"'}}
BIG = 64 * GiB              # a sparse memfd this size costs nothing until touched


@pytest.mark.parametrize("service", [LIMITED], indirect=True, ids=["max-guest-memory=1G"])
@pytest.mark.parametrize("how", ["SET_MEM_TABLE", "ADD_MEM_REG"])
def test_guest_memory_over_the_limit_refused_then_disconnected(service, how):
    """With max-guest-memory = "1G": SET_MEM_TABLE with 8 regions of 64 GiB (or, separately,
    ADD_MEM_REG of 3 x 256 MiB, which fit, then 64 GiB regions up to the 32 slots) gets a
    failure ack; trying again disconnects; the service's address space (VmSize) never grows
    by 1.5 GiB; the healthy load is unaffected."""
    svc = service
    svc.mark()
    pid = svc.pid
    vm0 = proc_vm_size(pid)
    vm_peak = vm0
    raw = RawFrontend(svc.sock("victim-blk"), timeout=VICTIM_TIMEOUT).connect()
    big = sparse_memfd(BIG)
    small_acks, acks = [], []
    closed = None
    try:
        if how == "SET_MEM_TABLE":
            regions = [(k * BIG, BIG, UVA + k * BIG, 0) for k in range(8)]       # 512 GiB
            for _ in range(2):
                acks.append(try_ack(raw, R.SET_MEM_TABLE, mem_table(regions), [big] * 8))
                if proc_alive(pid):
                    vm_peak = max(vm_peak, proc_vm_size(pid))
                if not isinstance(acks[-1], int):
                    break
        else:
            small = sparse_memfd(256 << 20)
            try:
                for k in range(3):
                    small_acks.append(try_ack(raw, R.ADD_MEM_REG, single_region(
                        k << 28, 256 << 20, UVA + (k << 28)), [small]))
            finally:
                os.close(small)
            for k in range(29):                                       # the slots left
                acks.append(try_ack(raw, R.ADD_MEM_REG, single_region(
                    GiB + k * BIG, BIG, UVA + GiB + k * BIG), [big]))
                if proc_alive(pid):
                    vm_peak = max(vm_peak, proc_vm_size(pid))
                if not isinstance(acks[-1], int):
                    break
        closed = raw.wait_closed(VICTIM_TIMEOUT)[0] if raw.sock is not None else True
    finally:
        os.close(big)
        raw._release()
    assert_healthy(svc, f"{how} over max-guest-memory")
    assert small_acks == ([0, 0, 0] if how == "ADD_MEM_REG" else []), small_acks
    assert len(acks) == 2 and isinstance(acks[0], int) and acks[0] != 0 \
        and not isinstance(acks[1], int), f"expected a failure ack, then a disconnect: {acks}"
    assert closed, "the backend did not close the connection"
    assert vm_peak - vm0 < 1.5 * GiB, \
        f"VmSize grew by {(vm_peak - vm0) / GiB:.1f} GiB (max-guest-memory 1G)"
    assert_victims_recover(svc)
    assert_clean_stop(svc)


# -- 5b: max-message-fds --------------------------------------------------------------------------

FDS_PER_BYTE = 8
FD_GROWTH_BOUND = 200


def test_fds_trickled_one_byte_at_a_time_refused_then_disconnected(service):
    """A SET_CONFIG with a 4096-byte payload (the largest a header may announce) is sent to
    `victim-blk` one byte per sendmsg, each byte carrying 8 fds: 4108 segments, ~33000 fds for
    one message, and then the same message again.  The service's fd count stays within
    FD_GROWTH_BOUND of what it was (it used to take them all, up to its RLIMIT_NOFILE, after
    which accept() fails for every device); the backend refuses the message (a failure ack,
    if the message gets through at all) and, as the frontend goes on over the limit,
    disconnects; a NEW connection to a healthy device is answered meanwhile; the healthy load
    is unaffected."""
    svc = service
    svc.mark()
    pid = svc.pid
    fds0 = proc_fd_count(pid)
    peak = fds0
    probes: list[tuple[int, str, float | str]] = []      # (segments sent, device, result)
    raw = RawFrontend(svc.sock("victim-blk"), timeout=VICTIM_TIMEOUT).connect()
    size = 4096 - 12
    msg = raw.message(R.SET_CONFIG, Config.build(dict(offset=0, size=size, flags=0,
                                                      payload=bytes(size))))
    assert len(msg) == HEADER_SIZE + 4096
    riders = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(FDS_PER_BYTE)]

    def sample(n):
        nonlocal peak
        if proc_alive(pid):
            peak = max(peak, proc_fd_count(pid))
        if n % 512 == 0:        # every 512 segments and when a message ends or is cut off
            probes.extend((n, name, t) for name, t in probe_times(svc).items())

    acks = []                   # the ack of each message that got through
    rounds = []                 # (bytes sent, why the backend stopped us or None) per message
    closed = False
    try:
        for _ in range(2):
            sent, why = raw.trickle(msg, riders, every=128, on_progress=sample)
            rounds.append((sent, why))
            sample(0)
            if why is not None:
                closed = True
                break
            try:
                acks.append(raw.read_ack(R.SET_CONFIG))
            except (FrontendError, OSError) as e:
                acks.append(f"{type(e).__name__}: {e}")
                closed = True
                break
        if not closed:
            closed = raw.wait_closed(VICTIM_TIMEOUT)[0]
    finally:
        for fd in riders:
            os.close(fd)
        raw._release()
    time.sleep(0.5)
    after = proc_fd_count(pid) if proc_alive(pid) else None
    assert_healthy(svc, "fds trickled into one message")
    assert peak - fds0 < FD_GROWTH_BOUND, \
        f"the service's fd count grew from {fds0} to {peak} (sent per message: {rounds})"
    late = [(n, name, t) for n, name, t in probes if not (isinstance(t, float)
                                                           and t < PROBE_BOUND)]
    assert probes and not late, \
        f"during the trickle new connections to healthy devices were not answered: {late}"
    assert all(isinstance(a, int) and a != 0 for a in acks[:1]), \
        f"a message over max-message-fds was not refused: acks {acks} ({rounds})"
    assert closed and len(acks) <= 1, \
        f"going on over max-message-fds did not disconnect: acks {acks} ({rounds})"
    assert after is not None and after - fds0 < FD_GROWTH_BOUND, (fds0, after)
    assert_probes(svc, "after the trickle")
    assert_victims_recover(svc)
    assert_clean_stop(svc)


# -- 6 ----------------------------------------------------------------------------------------------

def _flood_unread_requests(fe: RawFrontend, limit: int = 100_000) -> int:
    """Send GET_FEATURES requests and never read the replies, until the socket takes no more
    (the backend's replies fill both socket buffers and its control thread waits to write);
    returns how many were sent."""
    msg = fe.message(R.GET_FEATURES, need_reply=False)
    fe.sock.setblocking(False)
    n = 0
    try:
        while n < limit:
            try:
                fe.sock.send(msg)
            except BlockingIOError:
                time.sleep(0.05)
                try:
                    fe.sock.send(msg)
                except BlockingIOError:
                    break
            n += 1
    finally:
        fe.sock.settimeout(fe.timeout)
    return n


@pytest.mark.parametrize("service", LOOPS, indirect=True, ids=["asyncio", "uvloop"])
def test_sigterm_with_hostile_frontends_mid_conversation(service):
    """SIGTERM while `victim-blk` has half a message with an fd pending, `victim` has running
    rings and a full rx ring that `peer` keeps flooding, the frontend on `idle-blk` sent
    thousands of requests and reads none of the replies (its control thread is stuck writing),
    and the healthy loads run: exit status 0 within SERVICE_EXIT_TIMEOUT, and every device
    logs "device <name> stopped" only after its frontend's connection was torn down
    ("frontend disconnected" first: the service waited for each teardown)."""
    svc = service
    raw = RawFrontend(svc.sock("victim-blk"), timeout=VICTIM_TIMEOUT).connect()
    deaf = RawFrontend(svc.sock("idle-blk"), timeout=VICTIM_TIMEOUT).connect()
    v = flood = None
    ev = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    connected = {"healthy-blk", "healthy-a", "healthy-b", "victim-blk", "idle-blk", "victim",
                 "peer"}
    try:
        half = raw.message(R.SET_VRING_CALL, vring_fd(0))[:HEADER_SIZE + 3]
        raw.send_bytes(half, [ev])
        unread = _flood_unread_requests(deaf)
        v = connect_victim_port(svc)
        flood = svc.add_load(PeerFlood(svc.sock("peer"), dst=MAC_VICTIM))
        time.sleep(1)
        svc.mark()
        time.sleep(1)
        assert_healthy(svc, "before SIGTERM")
        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        try:
            rc = svc.proc.wait(timeout=SERVICE_EXIT_TIMEOUT)
        except Exception:           # noqa: BLE001 - reported below
            rc = None
        took = time.monotonic() - t0
    finally:
        svc.halt_loads()            # the loads first: they may still use their frontends
        os.close(ev)
        for fe in (raw, deaf, v, flood.fe if flood is not None else None):
            if fe is not None:
                fe._release()
    assert rc == 0, f"SIGTERM: {'no exit' if rc is None else f'exit status {rc}'} after " \
        f"{took:.1f}s\n{_tail(svc)}"
    events = svc.serve.events()
    stopped = {f.get("device") for f in events if f.get("msg", "").startswith("device ")
               and f["msg"].endswith(" stopped")}
    assert stopped == ALL_DEVICES, f"devices not logged as stopped: {ALL_DEVICES - stopped}"
    order = {}
    for k, f in enumerate(events):
        msg = f.get("msg", "")
        if msg.startswith("frontend disconnected"):
            order.setdefault(f.get("device"), {})["disconnected"] = k
        elif msg.startswith("device ") and msg.endswith(" stopped"):
            order.setdefault(f.get("device"), {})["stopped"] = k
    early = sorted(d for d in connected
                   if order.get(d, {}).get("disconnected", 1 << 30) > order[d]["stopped"])
    assert not early, f"declared stopped before their connection was torn down: {early} " \
        f"({unread} unread requests on idle-blk; exit after {took:.1f}s)\n{_tail(svc, 30)}"
