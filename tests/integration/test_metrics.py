"""Per-queue counters (Device.queue_counters) and their Prometheus exposition (vhost/metrics.py),
end to end: real devices served by vhost/server.py in an event-loop thread, driven over Unix
sockets by the vhost/testing frontend, scraped over HTTP and parsed with prometheus_client's parser.

Every expected value is derived from the workload the test issues (request sizes, frame sizes,
buffers posted); kicks and notifications, which depend on timing, are bounded by what the
frontend itself counted.  Counters must stay cumulative across disconnects and reconnects, and
a corrupt avail ring must show up on that queue only."""
from __future__ import annotations

import random
import shutil
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cython_ext.net import Switch
from devices.blk import BlkDevice
from devices.net import NetDevice
from protocols import virtio_blk as vb
from protocols import virtio_net as vnet
from vhost.testing.backends import short_tmpdir
from vhost.device import COUNTER_KEYS, CounterTotals, Device
from vhost.testing.blk import BlkRequest, Frontend
from vhost.testing.net import NetFrontend, make_frame
from vhost.metrics import (DeviceSample, MetricsServer, device_sample, parse_address,
                           start_metrics_server)
from tests.inprocess import TIMEOUT, serving, wait_for

MIB = 1 << 20
MAC_A = bytes.fromhex("020a00000001")
MAC_B = bytes.fromhex("020b00000002")
METRIC_OF = {
    "requests": "pyvhost_requests_total",
    "bytes_read": "pyvhost_read_bytes_total",
    "bytes_written": "pyvhost_written_bytes_total",
    "errors": "pyvhost_errors_total",
    "inflight": "pyvhost_inflight_requests",
    "kicks": "pyvhost_kicks_total",
    "notifications": "pyvhost_notifications_total",
    "dropped": "pyvhost_dropped_packets_total",
    "broken": "pyvhost_ring_broken",
}
assert set(METRIC_OF) == set(COUNTER_KEYS)


# -- harness ---------------------------------------------------------------------------------------

@pytest.fixture
def tmp():
    d = short_tmpdir("pvhmet")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sampler(*entries):
    """sample_fn over (name, device, server, socket) entries: what the service will do."""
    def sample():
        return [device_sample(dev, name, connected=srv.protocol is not None, socket=str(sock))
                for name, dev, srv, sock in entries]
    return sample


def scrape(m: MetricsServer) -> dict:
    """{(sample name, sorted labels): value} from one GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=TIMEOUT) as r:
        assert r.status == 200
        text = r.read().decode()
    # nothing but ours: no process_* / python_* collectors mixed in
    assert all(ln.startswith(("# ", "pyvhost_")) for ln in text.splitlines() if ln), text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def queue_values(series: dict, device: str, type_: str, queue: int) -> dict[str, int]:
    labels = tuple(sorted(dict(device=device, type=type_, queue=str(queue)).items()))
    return {key: int(series[(name, labels)]) for key, name in METRIC_OF.items()}


def connected(series: dict, device: str, type_: str) -> int:
    return int(series[("pyvhost_frontend_connected",
                       tuple(sorted(dict(device=device, type=type_).items())))])


def expect(**kw) -> dict[str, int]:
    out = dict.fromkeys(COUNTER_KEYS, 0)
    out.update(kw)
    return out


def check_queue(got: dict, want: dict, *, kicks: tuple[int, int], notifications: tuple[int, int]):
    """Exact match except kicks / notifications, which must lie in the given closed ranges."""
    lo, hi = kicks
    assert lo <= got["kicks"] <= hi, (got, kicks)
    lo, hi = notifications
    assert lo <= got["notifications"] <= hi, (got, notifications)
    assert {k: v for k, v in got.items() if k not in ("kicks", "notifications")} == \
        {k: v for k, v in want.items() if k not in ("kicks", "notifications")}


# -- blk -------------------------------------------------------------------------------------------

IMG_SIZE = 8 * MIB


def make_image(path) -> str:
    with open(path, "wb") as f:
        f.truncate(IMG_SIZE)
    return str(path)


@pytest.fixture
def blk(tmp):
    dev = BlkDevice(make_image(tmp / "disk.img"), num_queues=2, max_queue_size=256)
    sock = tmp / "blk.sock"
    try:
        with serving((dev, sock)) as (srv,):
            with start_metrics_server("127.0.0.1:0", sampler(("vda", dev, srv, sock))) as m:
                yield dev, srv, sock, m
    finally:
        dev.close()


def blk_workload(fe: Frontend, wq: int, rq: int, seed: int) -> dict[int, dict[str, int]]:
    """Writes of known sizes on queue wq, reads of known sizes on rq, then on rq one read
    beyond the capacity (IOERR) and one request of an unknown type (UNSUPP), each failing
    alone.  Returns the expected counters per queue (kicks/notifications not included)."""
    rnd = random.Random(seed)
    cap = IMG_SIZE // vb.SECTOR_SIZE
    wsizes = [512, 4096, 8192, 1024, 65536, 512 * rnd.randint(1, 64)]
    rsizes = [512, 4096, 32768, 512 * rnd.randint(1, 64)]
    for k, n in enumerate(wsizes):
        assert fe.write(k * 256, rnd.randbytes(n), queue=wq) == vb.S_OK
    for k, n in enumerate(rsizes):
        st, got = fe.read(k * 256, n, queue=rq)
        assert st == vb.S_OK and len(got) == n
    assert fe.read(cap, 512, queue=rq)[0] == vb.S_IOERR
    assert fe.submit_many([BlkRequest(99, 0)], queue=rq)[0].status == vb.S_UNSUPP
    out = {wq: expect(requests=len(wsizes), bytes_written=sum(wsizes))}
    extra = expect(requests=len(rsizes) + 2, bytes_read=sum(rsizes), errors=2)
    if rq == wq:
        out[wq] = {k: out[wq][k] + extra[k] for k in COUNTER_KEYS}
    else:
        out[rq] = extra
    return out


def add(a: dict, b: dict) -> dict:
    return {q: {k: a.get(q, expect())[k] + b.get(q, expect())[k] for k in COUNTER_KEYS}
            for q in set(a) | set(b)}


def test_blk_exact_counts_cumulative_across_reconnects(blk):
    dev, srv, sock, m = blk
    series = scrape(m)
    assert connected(series, "vda", "block") == 0
    for q in (0, 1):
        assert queue_values(series, "vda", "block", q) == expect()

    # session 1: writes on queue 0, reads and the two bad requests on queue 1; clean close
    with Frontend(str(sock), num_queues=2) as fe:
        want = blk_workload(fe, wq=0, rq=1, seed=1)
        series = scrape(m)
        assert connected(series, "vda", "block") == 1
        fe_kicks = [fe.queues[q].kicks for q in (0, 1)]
        for q in (0, 1):
            got = queue_values(series, "vda", "block", q)
            check_queue(got, want[q], kicks=(1, fe_kicks[q]),
                        notifications=(1, want[q]["requests"]))
    wait_for(lambda: srv.protocol is None, "disconnect noticed")
    series = scrape(m)
    assert connected(series, "vda", "block") == 0
    before = {q: queue_values(series, "vda", "block", q) for q in (0, 1)}
    for q in (0, 1):      # the stopped workers' counters are kept, exactly
        check_queue(before[q], want[q], kicks=(1, fe_kicks[q]),
                    notifications=(1, want[q]["requests"]))

    # session 2: the queues swapped; the frontend vanishes without GET_VRING_BASE
    fe = Frontend(str(sock), num_queues=2, two_regions=True).connect()
    try:
        want2 = blk_workload(fe, wq=1, rq=0, seed=2)
        fe_kicks2 = [fe.queues[q].kicks for q in (0, 1)]
    finally:
        fe._closed = True
        fe._release()          # socket, eventfds and guest RAM gone; no goodbye
    wait_for(lambda: srv.protocol is None, "disconnect noticed")
    series = scrape(m)
    assert connected(series, "vda", "block") == 0
    total = add(want, want2)
    for q in (0, 1):
        got = queue_values(series, "vda", "block", q)
        check_queue(got, total[q],
                    kicks=(before[q]["kicks"] + 1, fe_kicks[q] + fe_kicks2[q]),
                    notifications=(before[q]["notifications"] + 1, total[q]["requests"]))
    # the device's own view is what was exposed
    assert dev.queue_counters() == {q: queue_values(series, "vda", "block", q) for q in (0, 1)}


def test_blk_broken_ring_on_one_queue_only(blk):
    dev, srv, sock, m = blk
    with Frontend(str(sock), num_queues=2) as fe:
        assert fe.write(0, b"a" * 512, queue=1) == vb.S_OK
        vq = fe.queues[1]
        vq.set_avail_idx(vq.avail_idx + vq.size + 1)      # more than a queue ahead: corrupt
        vq.kick(force=True)
        wait_for(lambda: dev.queue_counters()[1]["broken"] == 1, "queue 1 broken")
        assert fe.write(8, b"b" * 4096, queue=0) == vb.S_OK     # queue 0 serves on
        series = scrape(m)
        q0 = queue_values(series, "vda", "block", 0)
        q1 = queue_values(series, "vda", "block", 1)
        assert q0["broken"] == 0 and q0["errors"] == 0
        assert q0["requests"] == 1 and q0["bytes_written"] == 4096
        assert q1["broken"] == 1
        assert q1["errors"] == 1                 # one corrupt avail ring, counted once
        assert q1["requests"] == 1 and q1["bytes_written"] == 512
        assert connected(series, "vda", "block") == 1
    wait_for(lambda: srv.protocol is None, "disconnect noticed")
    # the ring is gone with the connection; the error count stays
    q1 = queue_values(scrape(m), "vda", "block", 1)
    assert q1["broken"] == 0 and q1["errors"] == 1 and q1["requests"] == 1


# -- net -------------------------------------------------------------------------------------------

@pytest.fixture
def switch2(tmp):
    """Two NetDevices on one learning switch (ports 0 and 1), each on its own socket."""
    sw = Switch("sw0", 300.0)
    da = NetDevice(pairs=1, mac=MAC_A, switch=sw, port_index=0, name="sw0:0")
    db = NetDevice(pairs=1, mac=MAC_B, switch=sw, port_index=1, name="sw0:1")
    sa, sb = tmp / "a.sock", tmp / "b.sock"
    try:
        with serving((da, sa), (db, sb)) as (srv_a, srv_b):
            with start_metrics_server("127.0.0.1:0", sampler(("a", da, srv_a, sa),
                                                             ("b", db, srv_b, sb))) as m:
                yield dict(a=(da, srv_a, sa), b=(db, srv_b, sb), m=m)
    finally:
        da.reset()
        db.reset()


SIZES = (60, 64, 100, 128, 255, 512, 777, 1000, 1500, 1514)


def test_net_exact_frames_bytes_drops_cumulative(switch2):
    da, srv_a, sa = switch2["a"]
    db, srv_b, sb = switch2["b"]
    m = switch2["m"]
    posted = 4
    frames = [make_frame(n, dst=MAC_B, src=MAC_A, seq=k) for k, n in enumerate(SIZES)]
    assert len(frames) > posted
    with NetFrontend(str(sb), mac=MAC_B, rx_buffers=posted, timeout=TIMEOUT) as b:
        with NetFrontend(str(sa), mac=MAC_A, timeout=TIMEOUT) as a:
            # B posted 4 rx buffers (one frame each with MRG_RXBUF) and takes none out
            # meanwhile: the first 4 frames land, the other 6 are dropped
            assert a.send_many(frames) == len(frames)
            a.wait_tx(TIMEOUT)
            got = b.recv_many(posted, timeout=TIMEOUT)
            assert [f for _, f in got] == frames[:posted]
            fe_kicks_a = a.queues[vnet.tx_queue(0)].kicks
            series = scrape(m)
            assert connected(series, "a", "net") == 1 and connected(series, "b", "net") == 1
            check_queue(queue_values(series, "a", "net", 1),
                        expect(requests=len(frames), bytes_read=sum(SIZES)),
                        kicks=(1, fe_kicks_a), notifications=(1, len(frames)))
            check_queue(queue_values(series, "b", "net", 0),
                        expect(requests=posted, bytes_written=sum(SIZES[:posted]),
                               dropped=len(frames) - posted),
                        kicks=(0, 0), notifications=(1, posted))
            # nothing went the other way: exact zeros
            assert queue_values(series, "a", "net", 0) == expect()
            assert queue_values(series, "b", "net", 1) == expect()
        wait_for(lambda: srv_a.protocol is None, "A's disconnect noticed")
        assert connected(scrape(m), "a", "net") == 0
        # A comes back (a new tx worker from zero) and sends 3 more; B has reposted buffers
        more = [make_frame(n, dst=MAC_B, src=MAC_A, seq=100 + k)
                for k, n in enumerate((90, 333, 1514))]
        with NetFrontend(str(sa), mac=MAC_A, timeout=TIMEOUT) as a2:
            assert a2.send_many(more) == len(more)
            a2.wait_tx(TIMEOUT)
            got = b.recv_many(len(more), timeout=TIMEOUT)
            assert [f for _, f in got] == more
            fe_kicks_a += a2.queues[vnet.tx_queue(0)].kicks
            series = scrape(m)
    n_tx = len(frames) + len(more)
    check_queue(queue_values(series, "a", "net", 1),
                expect(requests=n_tx, bytes_read=sum(SIZES) + sum(map(len, more))),
                kicks=(2, fe_kicks_a), notifications=(2, n_tx))
    check_queue(queue_values(series, "b", "net", 0),
                expect(requests=posted + len(more),
                       bytes_written=sum(SIZES[:posted]) + sum(map(len, more)),
                       dropped=len(frames) - posted),
                kicks=(0, 0), notifications=(1, posted + len(more)))
    assert queue_values(series, "a", "net", 0) == expect()


def test_net_broken_tx_ring_on_that_queue_only(switch2):
    da, srv_a, sa = switch2["a"]
    db, srv_b, sb = switch2["b"]
    m = switch2["m"]
    with NetFrontend(str(sb), mac=MAC_B, timeout=TIMEOUT) as b, \
            NetFrontend(str(sa), mac=MAC_A, timeout=TIMEOUT) as a:
        good = make_frame(200, dst=MAC_B, src=MAC_A, seq=1)
        a.send(good)
        a.wait_tx(TIMEOUT)
        assert [f for _, f in b.recv_many(1, timeout=TIMEOUT)] == [good]
        vq = a.queues[vnet.tx_queue(0)]
        vq.set_avail_idx(vq.avail_idx + vq.size + 1)
        vq.kick(force=True)
        wait_for(lambda: da.queue_counters()[1]["broken"] == 1, "A's tx queue broken")
        # B -> A still works: only A's tx ring is broken
        back = make_frame(300, dst=MAC_A, src=MAC_B, seq=2)
        b.send(back)
        b.wait_tx(TIMEOUT)
        assert [f for _, f in a.recv_many(1, timeout=TIMEOUT)] == [back]
        series = scrape(m)
        broken = {(d, q): queue_values(series, d, "net", q)["broken"]
                  for d in ("a", "b") for q in (0, 1)}
        assert broken == {("a", 0): 0, ("a", 1): 1, ("b", 0): 0, ("b", 1): 0}
        a_tx = queue_values(series, "a", "net", 1)
        assert a_tx["errors"] == 1 and a_tx["requests"] == 1 and a_tx["bytes_read"] == 200
        assert queue_values(series, "b", "net", 1)["errors"] == 0
        assert queue_values(series, "a", "net", 0)["requests"] == 1      # `back`


# -- the exposition itself -------------------------------------------------------------------------

def test_parse_address():
    assert parse_address("127.0.0.1:9560") == ("127.0.0.1", 9560)
    assert parse_address("[::1]:9560") == ("::1", 9560)
    assert parse_address("localhost:0") == ("localhost", 0)
    assert parse_address("0.0.0.0:65535") == ("0.0.0.0", 65535)
    for bad in (":9560", "9560", "127.0.0.1", "127.0.0.1:", "::1:9560", "[::1]", "[::1]9560",
                "[127.0.0.1]:80", "host:65536", "host:-1", "host:http", " :1", ""):
        with pytest.raises(ValueError) as e:
            parse_address(bad)
        msg = str(e.value)
        assert repr(bad) in msg and "\n" not in msg


def test_close_frees_the_port_and_bind_errors_are_clear():
    m = start_metrics_server("127.0.0.1:0", lambda: [])
    port = m.port
    assert port > 0 and m.address == f"127.0.0.1:{port}"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=TIMEOUT) as r:
        assert b"/metrics" in r.read()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=TIMEOUT)
    assert e.value.code == 404
    # the port is taken while it serves
    with pytest.raises(OSError) as e:
        start_metrics_server(f"127.0.0.1:{port}", lambda: [])
    assert f"127.0.0.1:{port}" in str(e.value)
    t = time.monotonic()
    m.close()
    assert time.monotonic() - t < 3
    m.close()                                     # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    # and can be bound again at once, by anyone
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.close()
    with start_metrics_server(f"127.0.0.1:{port}", lambda: []) as m2:
        assert m2.port == port
        assert scrape(m2) == {}


def test_ipv6_address():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with start_metrics_server("[::1]:0", lambda: []) as m:
        assert m.address == f"[::1]:{m.port}"
        with urllib.request.urlopen(f"http://[::1]:{m.port}/metrics", timeout=TIMEOUT) as r:
            assert r.status == 200


def test_failing_or_malformed_samples_do_not_break_the_scrape():
    calls = []
    good = DeviceSample("ok", "block", True, {0: expect(requests=7)}, socket="/s")

    def sample_fn():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device table changed under us")
        if len(calls) == 2:
            yield good
            raise RuntimeError("half way")
        yield DeviceSample("bad", "net", True, {0: {"requests": 1}})     # keys missing
        yield good

    with start_metrics_server("127.0.0.1:0", sample_fn) as m:
        assert scrape(m) == {}                                     # nothing, but a 200
        for _ in range(2):
            series = scrape(m)
            assert queue_values(series, "ok", "block", 0) == expect(requests=7)
            assert not any(("device", "bad") in labels for _, labels in series)
            assert series[("pyvhost_device_info",
                           (("device", "ok"), ("socket", "/s"), ("type", "block")))] == 1
            assert connected(series, "ok", "block") == 1


def test_default_queue_counters_and_totals():
    class Dummy(Device):
        num_queues = 3

        def features(self):
            return 0

        def start_queue(self, index, queue):
            pass

        def stop_queue(self, index):
            return 0

    assert Dummy().queue_counters() == {q: expect() for q in range(3)}
    t = CounterTotals(2)
    t.retire(1, expect(requests=3, inflight=5, broken=1, kicks=2))
    t.retire(1, dict(requests=4, kicks=1))
    assert t.view(1) == expect(requests=7, kicks=3, broken=1)       # inflight is not summed
    assert t.view(1, expect(requests=1, inflight=2)) == expect(requests=8, kicks=3, inflight=2,
                                                               broken=1)
    t.clear_broken(1)
    assert t.view(1)["broken"] == 0 and t.view(0) == expect()
