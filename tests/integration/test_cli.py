"""pyvhost-blk as libvirt and systemd run it (QEMU's backend program conventions): capabilities,
one-line errors with non-zero exits, --size, --fd (inherited listening socket), socket file rules,
SIGTERM."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocols import virtio_blk as vb
from vhost.testing.backends import REPO_ROOT, short_tmpdir
from vhost.testing.blk import Frontend

CMD = [sys.executable, "-m", "vhost.programs", "pyvhost-blk"]
SYSTEM_PYTHON = "/usr/bin/python3"


def run(args, **kw):
    return subprocess.run(CMD + args, capture_output=True, text=True, timeout=30,
                          cwd=REPO_ROOT, **kw)


@pytest.fixture
def tmp():
    d = short_tmpdir()
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def test_print_capabilities():
    r = run(["--print-capabilities"])
    assert r.returncode == 0
    assert json.loads(r.stdout) == {"type": "block", "features": ["read-only", "blk-file"]}


def test_console_script_installed():
    script = Path(sys.executable).parent / "pyvhost-blk"
    assert script.exists(), "pip install should install the pyvhost-blk console script"
    r = subprocess.run([str(script), "--print-capabilities"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout)["type"] == "block"


@pytest.mark.parametrize("args,needle", [
    (["--socket-path", "/tmp/x.sock", "--blk-file", "/nonexistent/disk.img"], "no such image"),
    (["--socket-path", "/tmp/x.sock"], "--blk-file, --rbd or --nbd is required"),
    (["--blk-file", "x.img"], "exactly one of --socket-path and --fd"),
    (["--socket-path", "/tmp/x.sock", "--fd", "3", "--blk-file", "x"], "exactly one of"),
    (["--socket-path", "/tmp/x.sock", "--blk-file", "x", "--num-queues", "0"], "must be positive"),
    (["--socket-path", "/tmp/x.sock", "--blk-file", "x", "--queue-size", "100"], "power of two"),
    (["--socket-path", "/tmp/x.sock", "--blk-file", "x", "--size", "lots"], "bad size"),
    (["--bogus"], "unrecognized arguments"),
    (["--socket-path", "/tmp/x.sock", "--blk-file", "x", "--socket-mode", "66x"],
     "--socket-mode must be an octal string"),
    (["--socket-path", "/tmp/x.sock", "--blk-file", "x", "--socket-mode", "0440"],
     "leaves the owner rw"),
    (["--socket-path", "/tmp/x.sock", "--blk-file", "x", "--socket-group", "no-such-grp-x"],
     "no such group"),
])
def test_bad_invocations_fail_with_one_line(args, needle):
    r = run(args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and lines[0].startswith("pyvhost-blk: error:")


def _wait_sock(proc, path, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            return
        time.sleep(0.02)
    raise TimeoutError(path)


def _term(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_size_creates_sparse_image_and_sigterm_exits_0(tmp):
    img, sock = tmp / "new.img", tmp / "s.sock"
    p = subprocess.Popen(CMD + ["--socket-path", str(sock), "--blk-file", str(img),
                                "--size", "1G"], cwd=REPO_ROOT, stderr=subprocess.PIPE)
    try:
        _wait_sock(p, sock)
        st = os.stat(img)
        assert st.st_size == 1 << 30 and st.st_blocks * 512 < (1 << 20)      # sparse
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        with Frontend(str(sock)) as fe:
            assert fe.get_config().capacity == (1 << 30) // 512
            assert fe.write(0, b"a" * 512) == vb.S_OK
    finally:
        rc = _term(p)
    assert rc == 0
    assert not sock.exists(), "socket file left behind"


def _other_group() -> str:
    import grp
    for name in ("kvm", "daemon", "nogroup"):
        try:
            return grp.getgrnam(name).gr_name
        except KeyError:
            pass
    return next(g.gr_name for g in grp.getgrall() if g.gr_gid != 0)


_CONNECT = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n")


def test_socket_group_and_mode_let_another_user_in(tmp):
    """--socket-group / --socket-mode, as libvirt's QEMU (libvirt-qemu:kvm) needs: the socket
    gets the group and mode, a process of another uid in that group connects; one outside
    the group gets EACCES, as with the default 0600 root:root socket."""
    import grp
    group = _other_group()
    gid = grp.getgrnam(group).gr_gid
    os.chmod(tmp, 0o755)                  # the other user must reach the socket
    img, sock = tmp / "d.img", tmp / "s.sock"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    p = subprocess.Popen(CMD + ["--socket-path", str(sock), "--blk-file", str(img),
                                "--socket-group", group, "--socket-mode", "0660"],
                         cwd=REPO_ROOT, stderr=subprocess.PIPE)
    try:
        _wait_sock(p, sock)
        st = os.stat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)

        def connect_as(groups):
            # Debian's own python3: the venv's interpreter may live where uid 65534 cannot
            # reach (/root/.pyenv)
            return subprocess.run([SYSTEM_PYTHON, "-c", _CONNECT, str(sock)], user=65534,
                                  group=65534, extra_groups=groups, timeout=30).returncode
        assert connect_as([gid]) == 0, "a member of the socket's group could not connect"
        assert connect_as([]) == 13, "a uid outside the group connected to a 0660 socket"
        with Frontend(str(sock)) as fe:           # the device still serves its frontend
            assert fe.write(0, b"c" * 512) == vb.S_OK
    finally:
        rc = _term(p)
    assert rc == 0


def test_inherited_listening_fd(tmp):
    img, path = tmp / "d.img", tmp / "l.sock"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(str(path))
    ls.listen(1)
    fd = ls.fileno()
    p = subprocess.Popen(CMD + ["--fd", str(fd), "--blk-file", str(img)], pass_fds=(fd,),
                         cwd=REPO_ROOT, stderr=subprocess.PIPE)
    ls.close()
    try:
        with Frontend(str(path), timeout=20) as fe:
            assert fe.write(8, b"b" * 4096) == vb.S_OK
            assert fe.read(8, 4096) == (vb.S_OK, b"b" * 4096)
    finally:
        rc = _term(p)
    assert rc == 0


def test_regular_file_at_socket_path_is_refused(tmp):
    img, path = tmp / "d.img", tmp / "notasocket"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    path.write_text("precious")
    r = run(["--socket-path", str(path), "--blk-file", str(img)])
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if l.startswith("pyvhost-blk: error:")]
    assert len(errors) == 1 and "not a socket" in errors[0], r.stderr
    assert r.stderr.strip().splitlines() == errors, "only the error line is printed"
    assert path.read_text() == "precious"


def test_stale_socket_replaced(tmp):
    img, path = tmp / "d.img", tmp / "stale.sock"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()                     # a socket file nobody listens on
    p = subprocess.Popen(CMD + ["--socket-path", str(path), "--blk-file", str(img)],
                         cwd=REPO_ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with Frontend(str(path), timeout=5) as fe:
                    assert fe.read(0, 512)[0] == vb.S_OK
                break
            except (OSError, Exception):
                if time.monotonic() > deadline or p.poll() is not None:
                    raise
                time.sleep(0.05)
    finally:
        assert _term(p) == 0


# -- pyvhost-net ------------------------------------------------------------------------------------

NET = [sys.executable, "-m", "vhost.programs", "pyvhost-net"]


def test_net_print_capabilities():
    r = subprocess.run(NET + ["--print-capabilities"], capture_output=True, text=True,
                       timeout=30, cwd=REPO_ROOT)
    assert r.returncode == 0 and json.loads(r.stdout)["type"] == "net"
    script = Path(sys.executable).parent / "pyvhost-net"
    assert script.exists(), "pip install should install the pyvhost-net console script"


@pytest.mark.parametrize("args,needle", [
    (["--socket-path", "/tmp/x.sock"], "one of --tap and --switch"),
    (["--tap", "t0"], "exactly one of --socket-path and --fd"),
    (["--socket-path", "/tmp/a", "--socket-path", "/tmp/b", "--tap", "t0"], "need --switch"),
    (["--socket-path", "/tmp/a", "--tap", "t0", "--queues", "17"], "at most 16"),
    (["--socket-path", "/tmp/a", "--tap", "t0", "--mtu", "20"], "--mtu"),
    (["--socket-path", "/tmp/a", "--switch", "s", "--mac", "zz:00"], "bad MAC"),
    (["--socket-path", "/tmp/a", "--tap", "a-name-longer-than-15"], "bad tap name"),
])
def test_net_bad_invocations_fail_with_one_line(args, needle):
    r = subprocess.run(NET + args, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and lines[0].startswith("pyvhost-net: error:")


def test_null_device(tmp):
    sock = tmp / "n.sock"
    p = subprocess.Popen(CMD + ["--socket-path", str(sock), "--null", "--size", "64M"],
                         cwd=REPO_ROOT, stderr=subprocess.PIPE)
    try:
        _wait_sock(p, sock)
        with Frontend(str(sock)) as fe:
            assert fe.get_config().capacity == (64 << 20) // 512
            assert fe.write(0, os.urandom(4096)) == vb.S_OK
            assert fe.read(0, 4096)[0] == vb.S_OK
            assert fe.read((64 << 20) // 512, 512)[0] == vb.S_IOERR     # still range-checked
            assert fe.flush() == vb.S_OK
    finally:
        assert _term(p) == 0
    r = run(["--socket-path", str(sock), "--null"])
    assert r.returncode != 0 and "--null takes --size" in r.stderr


# -- pyvhost install-host (the units and descriptors are checked in test_systemd.py and
#    test_descriptors.py) -------------------------------------------------------------------------

PYVHOST = str(Path(sys.executable).parent / "pyvhost")


def install_host(*args):
    return subprocess.run([PYVHOST, "install-host", *args], capture_output=True, text=True,
                          timeout=60)


def test_install_host_dry_run_writes_nothing_and_lists_the_same_files(tmp_path):
    dry = install_host("--prefix", str(tmp_path / "a"), "--dry-run")
    assert dry.returncode == 0 and not (tmp_path / "a").exists(), dry.stderr
    real = install_host("--prefix", str(tmp_path / "a"))
    assert real.returncode == 0, real.stderr
    wrote = [ln.split(" ", 1)[1] for ln in real.stdout.splitlines() if ln.startswith("wrote ")]
    assert [ln.split(" ", 2)[2] for ln in dry.stdout.splitlines()
            if ln.startswith("would write ")] == wrote
    assert sorted(wrote) == sorted(str(p) for p in (tmp_path / "a").rglob("*") if p.is_file())
    conf = tmp_path / "a/etc/pyvhost/pyvhost.toml"
    assert conf.read_text() == (REPO_ROOT / "vhost/data/pyvhost.toml").read_text()
    assert all(os.stat(p).st_mode & 0o777 == 0o644 for p in map(Path, wrote))


def test_install_host_keeps_an_existing_config_and_refreshes_units(tmp_path):
    conf = tmp_path / "etc/pyvhost/pyvhost.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text("# the administrator's\n")
    unit = tmp_path / "etc/systemd/system/pyvhost.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("stale\n")
    r = install_host("--prefix", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert conf.read_text() == "# the administrator's\n" and f"kept {conf}" in r.stdout
    assert "ExecStart=" in unit.read_text()


def test_install_host_programs_missing_from_bindir_fail_with_one_line(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    r = install_host("--prefix", str(tmp_path / "root"), "--bindir", str(empty))
    assert r.returncode == 1 and not (tmp_path / "root").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found in" in lines[0] and "pyvhost-blk" in lines[0], r.stderr
