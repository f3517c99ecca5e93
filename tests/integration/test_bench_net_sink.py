"""bench/net.py's sink and source modes (issue 13) measure what they say: testpmd txonly on one
net_virtio_user port into a backend that only consumes -- pyvhost-net as a one-port switch, DPDK's
net_vhost under rxonly -- and every frame the frontend counts as sent is one the backend counts
as taken off its ring; the reverse (source: testpmd rxonly fed by pyvhost's generator port or
by net_vhost under txonly) counts only frames the source put into the ring.  A short run of
each; the rates themselves are bench's, not asserted."""
from __future__ import annotations

import pytest

from bench.net import MEM_MB, run_net_bench, summarize
from vhost.testing.dpdk import dpdk_available

pytestmark = [pytest.mark.dpdk, pytest.mark.timeout(240)]


@pytest.fixture(scope="module", autouse=True)
def _need_dpdk():
    ok, why = dpdk_available(hugepages=2 * MEM_MB // 2 + 32)   # as run_net_bench asks
    if not ok:
        pytest.skip(why)


def test_sink_rows_are_frames_the_backends_consumed():
    rows = run_net_bench(duration=0.5, rounds=1, pkt_lens=(64, 1500), modes=("sink",))
    assert {(r["backend"], r["pkt_len"]) for r in rows} == \
        {(b, n) for b in ("pyvhost", "dpdk") for n in (64, 1500)}
    for r in rows:
        assert r["mode"] == "sink"
        assert r["valid"], r
        assert r["mpps"] > 0.01, r
        # the backend's own counter covers the whole run, the frontend's the measured interval
        assert r["backend_taken"] >= r["mpps"] * 1e6 * r["seconds"], r
        assert abs(r["gbps"] - r["mpps"] * r["pkt_len"] * 8 / 1e3) < 0.02 * r["gbps"] + 1e-3, r
    for r in rows:
        if r["backend"] == "pyvhost":
            assert "ratio" in r and r["ratio"] > 0
    s = {x["pkt_len"]: x for x in summarize(rows)}
    assert s[64]["mode"] == "sink" and s[64]["pyvhost_runs"] == 1 and s[64]["dpdk_runs"] == 1


def test_source_rows_are_frames_the_frontend_received():
    """The reverse: testpmd rxonly fed by pyvhost's generator port (bench/netsource.py) and by
    net_vhost under txonly; what the frontend counts as received the source counts as given."""
    rows = run_net_bench(duration=0.5, rounds=1, pkt_lens=(64, 1500), modes=("source",))
    assert {(r["backend"], r["pkt_len"]) for r in rows} == \
        {(b, n) for b in ("pyvhost", "dpdk") for n in (64, 1500)}
    for r in rows:
        assert r["mode"] == "source" and r["valid"], r
        assert r["mpps"] > 0.01, r
        assert r["backend_given"] >= r["mpps"] * 1e6 * r["seconds"], r
    assert all(r["ratio"] > 0 for r in rows if r["backend"] == "pyvhost")
