"""`pyvhost serve` under the privileges the shipped units give it (vhost/data/systemd): not root,
no_new_privs, and CAP_NET_ADMIN as the only capability (pyvhost.service), or none at all
(pyvhost-blk@.service, or a block-only config).  There is no systemd as PID 1 here, so
`setpriv` (util-linux) applies the same credentials User=/AmbientCapabilities=/
CapabilityBoundingSet=/NoNewPrivileges= would, to the real program:

  * as nobody with only CAP_NET_ADMIN: READY=1, a block device serves I/O, a tap is created in
    the test's network namespace, and /proc shows exactly those credentials;
  * as nobody with no capability: a block-only config serves; a config with a tap fails at
    start with one line naming the file, the device and the missing permission.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protocols import virtio_blk as vb
from vhost.testing import netns as nsh
from vhost.testing.backends import REPO_ROOT, short_tmpdir
from vhost.testing.serve import TIMEOUT, Serve, blk_dev as _blk_dev
from vhost.testing.blk import Frontend

NOBODY = 65534
CAP_NET_ADMIN = 12

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing"),
]


def _setpriv(caps: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            f"--inh-caps=-all{caps}", f"--ambient-caps=-all{caps}",
            f"--bounding-set=-all{caps}", "--no-new-privs"]


@pytest.fixture
def tmp():
    d = short_tmpdir()
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _can_import(python: str, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*_setpriv(""), python, "-c", "import vhost.service, uvloop"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runtime():
    """(python, env, cwd) with which `nobody` can run pyvhost.  Usually the test's own
    interpreter and checkout; when those live where nobody may look (a clone under /root, mode
    0700, as in the CI chroot; the reason the README installs in /opt), the packages are copied
    into a world-readable directory and run by the base interpreter
    (PYVHOST_TEST_COPY_RUNTIME=1 forces that path)."""
    base = short_tmpdir("pvhrt")
    os.chmod(base, 0o755)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    try:
        if not os.environ.get("PYVHOST_TEST_COPY_RUNTIME") and \
                _can_import(sys.executable, env, base).returncode == 0:
            yield sys.executable, env, base
            return
        lib = base / "lib"
        ignore = shutil.ignore_patterns("__pycache__", "*.c", "build")
        for pkg in ("vhost", "devices", "protocols", "cython_ext"):
            shutil.copytree(REPO_ROOT / pkg, lib / pkg, ignore=ignore)
        import construct
        import posix_ipc
        import prometheus_client
        import uvloop
        for mod in (construct, prometheus_client, uvloop):
            src = Path(mod.__file__).parent
            shutil.copytree(src, lib / src.name, ignore=ignore)
        shutil.copy2(posix_ipc.__file__, lib)
        for root, dirs, files in os.walk(base):
            for n in dirs:
                os.chmod(os.path.join(root, n), 0o755)
            for n in files:
                os.chmod(os.path.join(root, n), 0o644 if not n.endswith(".so") else 0o755)
        python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        env = dict(os.environ, PYTHONPATH=str(lib))
        r = _can_import(python, env, base)
        assert r.returncode == 0, f"nobody cannot run pyvhost with {python}: {r.stderr}"
        yield python, env, base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _own(tmp):
    for root, dirs, files in os.walk(tmp):
        for n in dirs + files:
            os.chown(os.path.join(root, n), NOBODY, NOBODY)
    os.chown(tmp, NOBODY, NOBODY)


def _status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def _service_pid(sv: Serve) -> int:
    """The pid that sent READY=1 is the one that logged `ready` (setpriv and `ip netns exec`
    exec the program, so it is also sv.proc.pid unless nsenter forked)."""
    for f in sv.events("ready:"):
        return int(f["pid"])
    raise AssertionError(sv.log_text())


@pytest.mark.skipif(not nsh.available()[0], reason=nsh.available()[1])
def test_unprivileged_with_net_admin_serves_block_and_tap(tmp, runtime):
    python, env, cwd = runtime
    conf = tmp / "c.toml"
    conf.write_text(_blk_dev(tmp, "vda") + "[[device]]\nname = \"n0\"\ntype = \"net\"\n"
                    f"socket = \"{tmp}/n0.sock\"\ntap = \"sbxtap0\"\n")
    _own(tmp)
    with nsh.namespace(no_ipv6=True) as ns:
        sv = Serve(tmp, conf, ns=ns, argv_prefix=_setpriv(",+net_admin"), python=python,
                   env={"PYTHONPATH": env["PYTHONPATH"]}, cwd=cwd)
        try:
            sv.ready()
            st = _status(_service_pid(sv))
            assert st["Uid"].split()[:2] == [str(NOBODY)] * 2
            assert int(st["CapEff"], 16) == 1 << CAP_NET_ADMIN
            assert int(st["CapBnd"], 16) == 1 << CAP_NET_ADMIN
            assert st["NoNewPrivs"] == "1"
            assert nsh.link_state(ns, "sbxtap0").exists
            assert os.stat(tmp / "vda.sock").st_uid == NOBODY
            with Frontend(str(tmp / "vda.sock"), timeout=TIMEOUT) as fe:
                assert fe.write(0, b"u" * 4096) == vb.S_OK
                assert fe.read(0, 4096) == (vb.S_OK, b"u" * 4096)
        finally:
            rc = sv.stop()
        assert rc == 0, sv.log_text()


def test_no_capabilities_block_only_serves_and_a_tap_fails_in_one_line(tmp, runtime):
    python, env, cwd = runtime
    conf = tmp / "c.toml"
    conf.write_text(_blk_dev(tmp, "vda"))
    _own(tmp)
    sv = Serve(tmp, conf, argv_prefix=_setpriv(""), python=python,
               env={"PYTHONPATH": env["PYTHONPATH"]}, cwd=cwd)
    try:
        sv.ready()
        assert int(_status(_service_pid(sv))["CapEff"], 16) == 0
        with Frontend(str(tmp / "vda.sock"), timeout=TIMEOUT) as fe:
            assert fe.write(8, b"n" * 512) == vb.S_OK
    finally:
        assert sv.stop() == 0, sv.log_text()
    # the same user and no capability, now with a tap: refused at start, one line
    conf2 = tmp / "tap.toml"
    conf2.write_text(_blk_dev(tmp, "vdb") + "[[device]]\nname = \"n0\"\ntype = \"net\"\n"
                     f"socket = \"{tmp}/n0.sock\"\ntap = \"sbxtap1\"\n")
    _own(tmp)
    r = subprocess.run([*_setpriv(""), python, "-m", "vhost.service", "serve",
                        "--config", str(conf2)], capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=cwd, env=env)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("pyvhost: error:")]
    assert len(errors) == 1 and f'{conf2}: device "n0": ' in errors[0] \
        and "not permitted" in errors[0], r.stderr
    assert not (tmp / "vdb.sock").exists()
