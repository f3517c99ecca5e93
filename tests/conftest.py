"""Shared pytest setup for tests/unit, tests/integration and tests/e2e.

* Makes the repository root importable (protocols, vhost, devices, bench) when pytest is run as
  plain `pytest` rather than `python -m pytest` from the root.
* Marks every test by the folder it lives in: `unit` (tests/unit: in memory, no backend
  process), `integration` (tests/integration: a backend over a real socket, QSD, DPDK, the
  service, systemd, metrics), `e2e` (tests/e2e: real QEMU guests).  Select with `-m unit` etc.;
  the markers are registered in pyproject.toml next to `qsd` and `dpdk`, which tests set
  themselves.
* Shared fixtures: `tmp` and `sockdir` (a short directory under /tmp for AF_UNIX socket paths,
  removed afterwards; a test module may define its own `tmp`, which then wins), `loop_name`
  (every test using it runs under asyncio and under uvloop) and `image` (a 1 MiB image of
  random bytes for the in-memory ring rig; a module may define its own), `ceph_cluster` (one
  throwaway Ceph cluster per run, for the RBD tests).
* A hang watchdog: pytest-timeout (pyproject.toml, signal method) fails a test that runs too
  long only when Python code runs again; a thread stuck in C -- a wait with the GIL held, a
  nogil loop in the main thread -- never lets it.  So every test also arms faulthandler's C
  watchdog for HANG_S: it writes every thread's stack to HANG_FILE (fd 2 is pytest's capture
  then) and ends the run with exit status 1 rather than letting CI run into its own limit
  with nothing to show.  .ci/run prints HANG_FILE when a run fails.

The helpers the tests share (frontend driver, backend launchers, namespaces, guests, DPDK) are
in vhost/testing; the in-process server harness is tests/inprocess.py.  Test modules never
import each other.
"""
import faulthandler
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vhost.testing.backends import short_tmpdir  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
KINDS = ("unit", "integration", "e2e")
LOOPS = ["asyncio", "uvloop"]
HANG_S = int(os.environ.get("PYVHOST_HANG_S", "720"))   # pyproject timeout (600 s) + 2 min
HANG_FILE = os.environ.get("PYVHOST_HANG_FILE", "/tmp/pyvhost-test-hang.txt")
_hang_out = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _hang_out
    if _hang_out is None:
        _hang_out = open(HANG_FILE, "w")
    _hang_out.seek(0)
    _hang_out.truncate()
    _hang_out.write(f"pyvhost: {item.nodeid} ran past {HANG_S} s; every thread's stack:\n")
    _hang_out.flush()
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=_hang_out)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def kind_of(path) -> str | None:
    """`unit`, `integration` or `e2e`: the first folder of `path` below tests/."""
    rel = os.path.relpath(str(path), TESTS)
    top = rel.split(os.sep, 1)[0]
    return top if top in KINDS else None


def pytest_collection_modifyitems(config, items):
    for item in items:
        kind = kind_of(item.path)
        if kind is not None:
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture
def tmp():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sockdir():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=LOOPS)
def loop_name(request):
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return request.param


RIG_IMAGE_SIZE = 1 << 20


@pytest.fixture
def image(tmp_path):
    """A 1 MiB image file of random bytes (the ring rig's backing store); its path."""
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(RIG_IMAGE_SIZE))
    return str(p)


@pytest.fixture(scope="session")
def ceph_cluster():
    """One throwaway Ceph cluster (vhost/testing/ceph.py: a mon and a memstore OSD on
    loopback, cephx) for the whole run, started by the first test that asks (~3 s); tests
    create their own images in its pool.  Skipped, with the reason, only when the Ceph packages
    are missing (.ci/install --test installs them)."""
    from vhost.testing.ceph import CephCluster, have_ceph
    ok, why = have_ceph()
    if not ok:
        pytest.skip(why)
    d = short_tmpdir("ceph")
    try:
        with CephCluster(d) as c:
            yield c
    finally:
        shutil.rmtree(d, ignore_errors=True)
