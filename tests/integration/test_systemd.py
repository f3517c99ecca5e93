"""systemd integration: vhost/sdnotify.py against real sockets (a NOTIFY_SOCKET listener this test
binds, socket-activated fds in child processes), pyvhost-blk socket-activated for real by
systemd-socket-activate and driven by vhost/testing, and `systemd-analyze verify` on the
shipped unit files (vhost/data/systemd/)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocols import virtio_blk as vb
from vhost.testing.backends import REPO_ROOT, short_tmpdir
from vhost.testing.blk import Frontend
from vhost.sdnotify import Notifier, listen_fds, socket_path_of

BIN_DIR = Path(sys.executable).parent
UNIT_DIR = REPO_ROOT / "vhost" / "data" / "systemd"
UNITS = ["pyvhost.service", "pyvhost-device@.socket", "pyvhost-blk@.service",
         "pyvhost-blk@.socket"]
ACTIVATE = shutil.which("systemd-socket-activate")
ANALYZE = shutil.which("systemd-analyze")
need_activate = pytest.mark.skipif(
    not ACTIVATE, reason="systemd-socket-activate not installed (.ci/install --test installs "
                         "the systemd package)")
need_analyze = pytest.mark.skipif(
    not ANALYZE, reason="systemd-analyze not installed (.ci/install --test installs systemd)")


@pytest.fixture
def tmp():
    d = short_tmpdir("pvsd")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- a NOTIFY_SOCKET listener ----------------------------------------------------------------------

class NotifyListener:
    """What the service manager does: an AF_UNIX datagram socket with SO_PASSCRED, so every
    message comes with the sender's pid (NotifyAccess=main relies on it)."""

    def __init__(self, address: str):
        self.address = address          # NOTIFY_SOCKET form: a path or "@name"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)

    def recv(self, timeout: float = 10.0) -> tuple[list[str], int]:
        """(lines of one datagram, sender pid); TimeoutError when nothing arrives."""
        self.sock.settimeout(timeout)
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        return data.decode().split("\n"), pid

    def wait_for(self, line: str, timeout: float = 30.0) -> list[tuple[list[str], int]]:
        """Every datagram up to and including the first one containing `line`."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {line!r} within {timeout} s; got {got}")
            try:
                msg = self.recv(left)
            except (TimeoutError, socket.timeout):
                raise TimeoutError(f"no {line!r} within {timeout} s; got {got}") from None
            got.append(msg)
            if line in msg[0]:
                return got

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp):
    address = (str(tmp / "notify") if request.param == "path"
               else f"@pyvhost-test-{os.getpid()}-{time.monotonic_ns()}")
    lst = NotifyListener(address)
    yield lst
    lst.close()


def test_ready_with_status(listener):
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.address})
    assert n.enabled
    assert n.ready(status="serving 2 devices\n(vda, vdb)") is True
    lines, pid = listener.recv()
    assert lines == ["READY=1", "STATUS=serving 2 devices (vda, vdb)"]   # one line, one datagram
    assert pid == os.getpid()
    n.close()


def test_status_watchdog_stopping(listener):
    with Notifier.from_env({"NOTIFY_SOCKET": listener.address}) as n:
        assert n.status("line one\r\nline two\n")
        assert listener.recv()[0] == ["STATUS=line one line two"]
        assert n.watchdog()
        assert listener.recv()[0] == ["WATCHDOG=1"]
        assert n.stopping()
        assert listener.recv()[0] == ["STOPPING=1"]
        assert n.stopping(status="draining")
        assert listener.recv()[0] == ["STOPPING=1", "STATUS=draining"]
        assert n.ready()
        assert listener.recv()[0] == ["READY=1"]
        assert n.send("EXTEND_TIMEOUT_USEC=5000000", "STATUS=x")
        assert listener.recv()[0] == ["EXTEND_TIMEOUT_USEC=5000000", "STATUS=x"]
        with pytest.raises(ValueError):
            n.send("READY=1\nSTATUS=smuggled")
        with pytest.raises(ValueError):
            n.send("READY")


def test_reloading_carries_monotonic_usec(listener):
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines, _ = listener.recv()
    assert lines[0] == "RELOADING=1" and len(lines) == 2
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after
    n.close()


def test_disabled_without_notify_socket(tmp):
    n = Notifier.from_env({"PATH": "/usr/bin"})
    assert not n.enabled
    assert n.ready("x") is False and n.status("x") is False and n.watchdog() is False
    assert n.reloading() is False and n.stopping() is False and n.send("A=1") is False
    assert n.watchdog_interval() is None
    n.close()
    assert not Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled
    assert not Notifier.from_env({"NOTIFY_SOCKET": "relative/path"}).enabled


def test_from_env_reads_os_environ(monkeypatch, listener):
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    n = Notifier.from_env()
    assert n.enabled and n.ready()
    assert listener.recv()[0] == ["READY=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier.from_env().enabled


def test_vanished_listener_is_not_an_error(tmp):
    path = str(tmp / "notify")
    lst = NotifyListener(path)
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.ready()
    lst.sock.close()                # socket file still there, nobody bound: ECONNREFUSED
    assert n.watchdog() is False
    os.unlink(path)                 # and gone: ENOENT
    assert n.stopping() is False
    lst = NotifyListener(path)      # a new manager: the same notifier works again
    assert n.watchdog() is True
    assert lst.recv()[0] == ["WATCHDOG=1"]
    lst.close()
    n.close()
    ab = Notifier.from_env({"NOTIFY_SOCKET": f"@pyvhost-nobody-{os.getpid()}"})
    assert ab.enabled and ab.ready() is False
    ab.close()


def test_watchdog_interval(listener):
    base = {"NOTIFY_SOCKET": listener.address}
    assert Notifier.from_env(base).watchdog_interval() is None
    env = dict(base, WATCHDOG_USEC="30000000")
    assert Notifier.from_env(env).watchdog_interval() == 15.0
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_env(env).watchdog_interval() == 15.0
    env["WATCHDOG_PID"] = str(os.getpid() + 1)      # meant for another process
    assert Notifier.from_env(env).watchdog_interval() is None
    # no notify socket: nobody to ping
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None
    for bad in ({"WATCHDOG_USEC": "30s"}, {"WATCHDOG_USEC": "0"},
                {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}):
        with pytest.raises(ValueError) as e:
            Notifier.from_env(dict(base, **bad)).watchdog_interval()
        assert "\n" not in str(e.value)


# -- listen_fds ---------------------------------------------------------------------------------

def _listening(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


# Runs in a child: moves the passed sockets to fds 3.. (dup2 clears FD_CLOEXEC, as systemd
# leaves them), optionally sets LISTEN_PID to its own pid, calls listen_fds and reports the
# result, the fd flags before/after, socket_path_of each fd, and what a grandchild spawned
# afterwards (close_fds=False) inherits.
CHILD = r"""
import fcntl, json, os, stat, subprocess, sys
spec = json.loads(sys.argv[1])
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in spec["fds"]]
for fd in spec["fds"]:
    os.close(fd)
for k, fd in enumerate(high):
    os.dup2(fd, 3 + k)
    os.close(fd)
n = len(high)
if spec["self_pid"]:
    os.environ["LISTEN_PID"] = str(os.getpid())
from vhost.sdnotify import listen_fds, socket_path_of
cloexec = lambda fd: bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
out = {"before": [cloexec(3 + k) for k in range(n)]}
try:
    out["result"] = listen_fds(unset=spec["unset"])
except ValueError as e:
    out["error"] = str(e)
out["after"] = [cloexec(3 + k) for k in range(n)]
out["paths"] = [socket_path_of(3 + k) for k in range(n)]
out["env"] = {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")}
probe = ("import json, os, stat\n"
         "def sock(fd):\n"
         "    try: return stat.S_ISSOCK(os.fstat(fd).st_mode)\n"
         "    except OSError: return False\n"
         "env = {k: v for k, v in os.environ.items() if k.startswith('LISTEN_')}\n"
         "print(json.dumps({'env': env, 'socks': [fd for fd in range(3, 3 + %d) if sock(fd)]}))"
         % n)
r = subprocess.run([sys.executable, "-c", probe], close_fds=False, stdout=subprocess.PIPE,
                   text=True, timeout=60)
out["grandchild"] = json.loads(r.stdout)
print(json.dumps(out))
"""


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def run_child(socks, env: dict, self_pid: bool = True, unset: bool = True) -> dict:
    fds = [s.fileno() for s in socks]
    spec = {"fds": fds, "self_pid": self_pid, "unset": unset}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], pass_fds=fds,
                       env=_clean_env(**env), capture_output=True, text=True, timeout=60,
                       cwd=str(REPO_ROOT))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    if "result" in out:
        out["result"] = [tuple(x) for x in out["result"]]
    return out


def test_listen_fds_names_cloexec_and_unset(tmp):
    socks = [_listening(tmp / "vda.sock"), _listening(tmp / "vdb.sock")]
    out = run_child(socks, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "vda:vdb"})
    assert out["result"] == [(3, "vda"), (4, "vdb")]
    assert out["before"] == [False, False] and out["after"] == [True, True]
    assert out["paths"] == [str(tmp / "vda.sock"), str(tmp / "vdb.sock")]
    assert out["env"] == {}                                 # unset from os.environ
    assert out["grandchild"] == {"env": {}, "socks": []}    # neither env nor fds leak
    for s in socks:
        s.close()


def test_listen_fds_missing_or_short_names(tmp):
    socks = [_listening(tmp / "a.sock"), _listening(tmp / "b.sock")]
    assert run_child(socks, {"LISTEN_FDS": "2"})["result"] == [(3, "unknown"), (4, "unknown")]
    assert run_child(socks, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "vda"})["result"] == \
        [(3, "vda"), (4, "unknown")]
    assert run_child(socks, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": ":vdb"})["result"] == \
        [(3, "unknown"), (4, "vdb")]
    assert run_child(socks, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "vda:vdb"})["result"] == \
        [(3, "vda")]
    for s in socks:
        s.close()


def test_listen_fds_other_pid(tmp):
    socks = [_listening(tmp / "a.sock")]
    out = run_child(socks, {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "vda"},
                    self_pid=False)
    assert out["result"] == []
    assert out["after"] == [False]          # not ours: untouched
    assert out["env"] == {}                 # but unset, as sd_listen_fds(unset_environment=1)
    socks[0].close()


def test_listen_fds_unset_false_keeps_env(tmp):
    socks = [_listening(tmp / "a.sock")]
    out = run_child(socks, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "vda"}, unset=False)
    assert out["result"] == [(3, "vda")]
    assert set(out["env"]) == {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}
    assert set(out["grandchild"]["env"]) == {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}
    assert out["grandchild"]["socks"] == []     # CLOEXEC still set
    socks[0].close()


def test_listen_fds_fd_not_open(tmp):
    out = run_child([], {"LISTEN_FDS": "1"})
    assert "fd 3" in out["error"] and "\n" not in out["error"]


def test_listen_fds_bad_values_in_process():
    me = str(os.getpid())
    assert listen_fds({}) == []
    assert listen_fds({"LISTEN_PID": me, "LISTEN_FDS": "0"}) == []
    for env in ({"LISTEN_PID": "me", "LISTEN_FDS": "1"}, {"LISTEN_PID": me, "LISTEN_FDS": "two"},
                {"LISTEN_PID": me, "LISTEN_FDS": "-1"}):
        env = dict(env)
        with pytest.raises(ValueError) as e:
            listen_fds(env)
        assert "\n" not in str(e.value) and "LISTEN_" in str(e.value)
        assert env == {}                    # unset on the error path too
    env = {"LISTEN_PID": me, "LISTEN_FDS": "x"}
    with pytest.raises(ValueError):
        listen_fds(env, unset=False)
    assert set(env) == {"LISTEN_PID", "LISTEN_FDS"}


def test_socket_path_of(tmp):
    s = _listening(tmp / "x.sock")
    assert socket_path_of(s.fileno()) == str(tmp / "x.sock")
    os.fstat(s.fileno())                    # still open, still ours
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    s.close()
    name = f"pyvhost-abs-{os.getpid()}"
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    a.bind(b"\0" + name.encode())
    assert socket_path_of(a.fileno()) == "@" + name
    a.close()
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    assert socket_path_of(u.fileno()) is None           # unbound
    u.close()
    i = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    assert socket_path_of(i.fileno()) is None           # not AF_UNIX
    i.close()
    r, w = os.pipe()
    assert socket_path_of(r) is None                    # not a socket
    os.fstat(r)
    os.close(r)
    os.close(w)
    assert socket_path_of(r) is None                    # closed fd


# -- real socket activation: systemd-socket-activate ---------------------------------------------

def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def _wait_path(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and stat.S_ISSOCK(path.stat().st_mode)):
        assert proc.poll() is None, f"activator exited ({proc.returncode})"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@need_activate
def test_listen_fds_under_systemd_socket_activate(tmp):
    """The environment systemd itself sets (through its own tool) parses as expected."""
    script = ("import json; from vhost.sdnotify import listen_fds, socket_path_of; "
              "r = listen_fds(); print(json.dumps([r, [socket_path_of(fd) for fd, _ in r]]))")
    a, b = tmp / "a.sock", tmp / "b.sock"
    proc = subprocess.Popen([ACTIVATE, "-l", str(a), "-l", str(b), "--fdname=vda:vdb",
                             sys.executable, "-c", script], env=_clean_env(),
                            cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_path(b, proc)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(a))               # the activator execs on the first connection
            out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    fds, paths = json.loads(out)
    assert [tuple(x) for x in fds] == [(3, "vda"), (4, "vdb")]
    assert paths == [str(a), str(b)]


@contextlib.contextmanager
def activated_blk(tmp: Path, env: dict | None = None):
    """pyvhost-blk --fd 3 under systemd-socket-activate; yields (proc, sock, img, log)."""
    prog = BIN_DIR / "pyvhost-blk"
    assert prog.exists(), f"{prog} missing: pip install the project into this venv"
    img, sock, log = tmp / "vda.img", tmp / "vda.sock", tmp / "activate.log"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    cmd = [ACTIVATE, "-l", str(sock), "--fdname=vda"]
    for k, v in (env or {}).items():
        cmd += ["-E", f"{k}={v}"]
    cmd += [str(prog), "--fd", "3", "--blk-file", str(img)]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                env=_clean_env())
    try:
        _wait_path(sock, proc)
        yield proc, sock, img, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@need_activate
def test_socket_activated_blk_serves_io(tmp):
    with activated_blk(tmp) as (proc, sock, img, log):
        # Before any connection only the activator runs: it starts the program on the first
        # connection (non-accept mode) and execs it, so the backend keeps the activator's pid.
        time.sleep(0.3)
        assert "systemd-socket-activate" in _cmdline(proc.pid)
        data = os.urandom(64 << 10)
        with Frontend(str(sock), timeout=30) as fe:
            assert "pyvhost-blk --fd 3" in _cmdline(proc.pid)
            assert fe.write(8, data) == vb.S_OK
            st, got = fe.read(8, len(data))
            assert st == vb.S_OK and got == data
            assert fe.flush() == vb.S_OK
        with open(img, "rb") as f:
            f.seek(8 * 512)
            assert f.read(len(data)) == data
        # the inherited socket keeps listening for the next frontend
        with Frontend(str(sock), timeout=30) as fe:
            assert fe.read(8, 4096) == (vb.S_OK, data[:4096])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text(errors="replace")
        # What is left: the socket file.  systemd-socket-activate bound it and then became the
        # backend (exec), so nobody unlinks it; the backend must not either (under systemd the
        # .socket unit owns the path and keeps it across service restarts).  The listening
        # socket died with the process: connecting is refused until something listens again.
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        with socket.socket(socket.AF_UNIX) as c, pytest.raises(ConnectionRefusedError):
            c.connect(str(sock))
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text


@need_activate
def test_socket_activated_blk_notifies_ready_and_stopping(tmp):
    """What Type=notify in pyvhost-blk@.service relies on: READY=1 from the main pid once it
    serves, STOPPING=1 on SIGTERM."""
    lst = NotifyListener(str(tmp / "notify"))
    try:
        with activated_blk(tmp, env={"NOTIFY_SOCKET": lst.address}) as (proc, sock, img, log):
            with Frontend(str(sock), timeout=30) as fe:
                assert fe.write(0, b"r" * 512) == vb.S_OK
                msgs = lst.wait_for("READY=1")
            assert all(pid == proc.pid for _, pid in msgs), msgs
            ready = next(lines for lines, _ in msgs if "READY=1" in lines)
            for lines, _ in msgs:
                assert all("=" in line for line in lines), lines
            proc.send_signal(signal.SIGTERM)
            msgs = lst.wait_for("STOPPING=1")
            assert all(pid == proc.pid for _, pid in msgs), msgs
            assert proc.wait(timeout=15) == 0, log.read_text(errors="replace")
            assert ready[0] == "READY=1"
    finally:
        lst.close()


# -- unit files: systemd-analyze -----------------------------------------------------------------

def _program_for(name: str) -> str:
    """The venv's copy of /usr/local/bin/NAME (systemd-analyze verify refuses a missing
    executable); pip installs every console script the units name."""
    p = BIN_DIR / name
    assert p.exists(), f"{p}: console script not installed (pip install -e .)"
    return str(p)


def _stage_units(dest: Path, extra: dict[str, str] | None = None) -> list[Path]:
    """Copies the shipped units to dest with ExecStart pointing into the venv, plus instance
    copies of the templates (verify also instantiates a template itself, as NAME@i)."""
    staged = []
    for unit in UNITS:
        text = (UNIT_DIR / unit).read_text()
        text = re.sub(r"/usr/local/bin/([A-Za-z0-9_.-]+)", lambda m: _program_for(m.group(1)),
                      text)
        text += (extra or {}).get(unit, "")
        names = [unit] + ([unit.replace("@.", "@vda.")] if "@." in unit else [])
        for name in names:
            (dest / name).write_text(text)
            staged.append(dest / name)
    return staged


def _verify(paths: list[Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="notice", SYSTEMD_LOG_COLOR="0",
               SYSTEMD_PAGER="")
    return subprocess.run([ANALYZE, "verify", "--man=no", *map(str, paths)],
                          capture_output=True, text=True, timeout=120, env=env)


def _problems(r: subprocess.CompletedProcess, dest: Path) -> list[str]:
    """stderr lines that are about our files: systemd prefixes every parse warning with
    `PATH:LINE:` and names the unit in load errors ("Unknown key", "Unknown section", "Failed to
    parse", "not executable", "service ... not loaded").  Lines about the host (a missing user,
    /run not writable, other units) are not our problem and are left out."""
    units = {p.name for p in dest.iterdir()} | {u.replace("@.", "@i.") for u in UNITS}
    return [line for line in r.stderr.splitlines()
            if str(dest) in line or "Unknown" in line or "lvalue" in line
            or any(line.startswith(u + ":") for u in units)]


@need_analyze
def test_units_verify_clean(tmp):
    staged = _stage_units(tmp)
    r = _verify(staged)
    assert _problems(r, tmp) == [], r.stderr
    assert r.returncode == 0, r.stderr


@need_analyze
def test_verify_catches_a_bad_directive(tmp):
    """The check above can fail: an unknown key, a bad value, a socket naming a missing
    service are each reported."""
    for unit, extra in [("pyvhost.service", "\n[Service]\nProtectEverything=yes\n"),
                        ("pyvhost-blk@.socket", "\n[Socket]\nSocketMode=0999\n"),
                        ("pyvhost-device@.socket", "\n[Socket]\nService=nope.service\n")]:
        d = tmp / unit.replace("@", "_")
        d.mkdir()
        r = _verify(_stage_units(d, {unit: extra}))
        assert _problems(r, d) or r.returncode != 0, (unit, r.stderr)


def _unit_settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in (UNIT_DIR / unit).read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            settings.setdefault(k.strip(), []).append(v.strip())
    return settings


def test_units_agree_with_each_other():
    svc, dev_sock = _unit_settings("pyvhost.service"), _unit_settings("pyvhost-device@.socket")
    blk, blk_sock = _unit_settings("pyvhost-blk@.service"), _unit_settings("pyvhost-blk@.socket")
    rundir = "/run/" + svc["RuntimeDirectory"][0]
    for sock in (dev_sock, blk_sock):
        assert sock["ListenStream"] == [rundir + "/%i.sock"]
        assert sock["FileDescriptorName"] == ["%i"]
        assert sock["SocketMode"] == ["0660"] and sock["SocketGroup"] == ["kvm"]
    assert dev_sock["Service"] == ["pyvhost.service"]
    assert svc["RuntimeDirectoryPreserve"] == ["yes"]     # else a stop deletes the sockets
    for s in (svc, blk):
        assert s["Type"] == ["notify"]
        assert s["StateDirectory"] == ["pyvhost"]
    assert blk["ExecStart"][0].split()[1:3] == ["--fd", "3"]
    assert "/var/lib/pyvhost/%i.img" in blk["ExecStart"][0]
    assert blk["CapabilityBoundingSet"] == [""]
    assert svc["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert "LimitMEMLOCK" not in svc and "LimitMEMLOCK" not in blk


@need_analyze
def test_security_exposure_is_reported(tmp):
    """`systemd-analyze security --offline=yes` (systemd 252 has it): logged, not asserted."""
    staged = _stage_units(tmp)
    for unit in ("pyvhost.service", "pyvhost-blk@vda.service"):
        r = subprocess.run([ANALYZE, "security", "--offline=yes", "--man=no",
                            "--no-pager", str(tmp / unit)],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, SYSTEMD_COLORS="0"))
        if "Unknown command" in r.stderr or "unrecognized option" in r.stderr:
            pytest.skip(f"this systemd-analyze has no offline security review: {r.stderr}")
        line = next((ln for ln in r.stdout.splitlines() if "Overall exposure level" in ln), None)
        assert line, r.stdout + r.stderr
        print(line.strip())
    assert staged


@need_analyze
def test_install_host_units_name_the_installed_programs_and_verify_clean(tmp):
    """`pyvhost install-host` writes the shipped units with ExecStart= naming this
    installation's programs instead of /usr/local/bin; systemd-analyze verify takes them."""
    r = subprocess.run([str(BIN_DIR / "pyvhost"), "install-host", "--prefix", str(tmp)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    units = tmp / "etc/systemd/system"
    staged = sorted(units.iterdir())
    assert sorted(p.name for p in staged) == sorted(UNITS)
    for unit in staged:
        assert "/usr/local/bin/pyvhost" not in unit.read_text(), unit
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                prog = line.split("=", 1)[1].split()[0]
                assert prog.startswith(str(BIN_DIR.resolve()) + "/"), line
                assert os.access(prog, os.X_OK), line
    for t in [u for u in staged if "@." in u.name]:        # instances, as systemd loads them
        inst = units / t.name.replace("@.", "@vda.")
        inst.write_text(t.read_text())
        staged.append(inst)
    v = _verify(staged)
    assert _problems(v, units) == [], v.stderr
    assert v.returncode == 0, v.stderr
