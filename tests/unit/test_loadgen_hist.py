"""bench/loadgen.pyx's latency histogram (in memory): bucket accuracy, monotonic contiguous
buckets, percentiles.  The driver loop against a real backend is
tests/integration/test_loadgen.py."""
from __future__ import annotations

import pytest

loadgen = pytest.importorskip("bench.loadgen", reason="bench.loadgen not built "
                              "(python setup.py build_ext --inplace)")
from bench.loadgen import bucket_index, bucket_mid, hist_percentile  # noqa: E402


def test_histogram_accuracy():
    for v in [0, 1, 127, 128, 129, 1000, 4095, 12345, 10**6, 3 * 10**9, 2**63 + 5]:
        mid = bucket_mid(bucket_index(v))
        assert abs(mid - v) <= max(0.5, v / 128), (v, mid)
    # buckets are monotonic and contiguous
    prev = -1
    for v in range(0, 1 << 16, 7):
        i = bucket_index(v)
        assert i >= prev
        prev = i
    hist = {bucket_index(10_000): 98, bucket_index(200_000): 2}
    assert abs(hist_percentile(hist, 0.5) - 10_000) < 100
    assert abs(hist_percentile(hist, 0.99) - 200_000) < 2000
    assert hist_percentile({}, 0.5) is None
