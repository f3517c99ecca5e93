"""backends.py: start and stop the vhost-user-blk backends under test as subprocesses --
pyvhost-blk (`python -m vhost.programs pyvhost-blk`) and the reference qemu-storage-daemon -- for the
integration and end-to-end tests.  Owns their lifetime: wait for the socket, SIGTERM at the end,
and (for pyvhost) insist on a clean exit 0; `short_tmpdir` for AF_UNIX socket paths, and the
process helpers the other launchers share (`wait_socket`, `stop_process`, `tail`).
Must not: hold test logic; import tests, devices, vhost.server, vhost.service or vhost.config
(backends run as programs, `python -m vhost.programs pyvhost-blk`)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
QSD = "qemu-storage-daemon"


class BackendError(RuntimeError):
    """A backend process failed to start or to stop cleanly."""


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def short_tmpdir(prefix: str = "pvh") -> Path:
    """A short directory for AF_UNIX socket paths (limit 107 bytes; pytest's tmp_path can be
    longer). The caller removes it (or it goes with the per-process workdir)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclasses.dataclass
class Backend:
    name: str
    proc: subprocess.Popen
    sock: Path
    log_path: Path
    command: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. fallbacks taken
    # the process was meant to die by SIGKILL (kill9, or a PYVHOST_FAILPOINT it was given):
    # its exit is not checked at the end
    expect_kill: bool = False

    def kill9(self, timeout: float = 10.0) -> int:
        """kill -9 the backend now and reap it; returns its exit status."""
        self.expect_kill = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def wait_log(proc: subprocess.Popen, log_path: Path, text: str, timeout: float) -> bool:
    """True once ``text`` is in the log at ``log_path``; False if the process exited first.
    Raises BackendError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if text in log_path.read_text(errors="replace"):
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise BackendError(f"{text!r} not logged within {timeout} s")


def wait_socket(proc: subprocess.Popen, sock: Path, timeout: float,
                 extra_ready: Path | None = None) -> bool:
    """True once ``sock`` exists as a socket (and ``extra_ready`` exists, if given); False if the
    process exited first. Raises BackendError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            ok = stat.S_ISSOCK(os.stat(sock).st_mode)
        except FileNotFoundError:
            ok = False
        if ok and (extra_ready is None or extra_ready.exists()):
            return True
        time.sleep(0.02)
    raise BackendError(f"socket {sock} did not appear within {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> tuple[int, bool]:
    """SIGTERM, wait, SIGKILL if needed. Returns (returncode, needed_kill)."""
    if proc.poll() is not None:
        return proc.returncode, False
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(), True


def _start(cmd: list[str], sock: Path, log_path: Path, *, env: dict | None = None,
           cwd: str | None = None, timeout: float, ready_file: Path | None = None,
           ready_text: str | None = None) -> tuple[subprocess.Popen, bool]:
    """Start `cmd` (output to log_path) and wait until it is ready: its socket exists, or
    (ready_text, a client-mode backend that creates no socket) that line is logged."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env, cwd=cwd, close_fds=True)
    try:
        ok = (wait_log(proc, log_path, ready_text, timeout) if ready_text else
              wait_socket(proc, sock, timeout, ready_file))
    except BaseException:
        stop_process(proc)
        raise
    return proc, ok


@contextlib.contextmanager
def _managed(backend: Backend, check_exit: bool, unlink: bool = True) -> Iterator[Backend]:
    """Stop the backend at the end (SIGTERM; with check_exit it must exit 0) and remove its
    socket file (unless `unlink` is False: a client-mode backend's socket is the frontend's)."""
    try:
        yield backend
    except BaseException:
        stop_process(backend.proc)  # the body's exception is the interesting one
        raise
    else:
        rc, killed = stop_process(backend.proc)
        if backend.expect_kill and rc == -signal.SIGKILL:
            pass
        elif check_exit and (killed or rc != 0):
            raise BackendError(
                f"{backend.name} did not exit cleanly on SIGTERM "
                f"({'killed after 10 s' if killed else f'exit code {rc}'}); log tail:\n"
                f"{tail(backend.log_text(), 40)}")
    finally:
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(backend.sock)


@contextlib.contextmanager
def qsd_blk(img: str | os.PathLike | None, sock: str | os.PathLike, read_only: bool = False,
            num_queues: int = 1, timeout: float = 30.0,
            blockdev: str | None = None) -> Iterator[Backend]:
    """qemu-storage-daemon exporting ``img`` as vhost-user-blk on ``sock``.

    Tries ``cache.direct=on,aio=io_uring`` first, then ``aio=threads``, then
    ``cache.direct=off,aio=threads`` if the file system refuses; the option actually used and
    any fallback are recorded in ``backend.notes``.  ``blockdev`` instead of ``img``: that
    --blockdev (its node-name f0), e.g. ``driver=rbd,pool=P,image=I,conf=C,node-name=f0``,
    tried once.  SIGTERM at the end (exit code not checked beyond a clean stop)."""
    sock = Path(sock)
    if not shutil.which(QSD):
        raise BackendError(f"{QSD} not installed")
    log_path = sock.parent / f"{sock.name}.qsd.log"
    pidfile = sock.parent / f"{sock.name}.qsd.pid"
    notes: list[str] = []
    attempts = [("on", "io_uring"), ("on", "threads"), ("off", "threads")]
    if blockdev is not None:
        attempts = [(None, None)]
    for direct, aio in attempts:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        cmd = [
            QSD,
            "--blockdev",
            blockdev if blockdev is not None else
            f"driver=file,node-name=f0,filename={img},cache.direct={direct},aio={aio},"
            "discard=unmap",
            "--export",
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
            f"addr.path={sock},writable={'off' if read_only else 'on'},num-queues={num_queues}",
            "--pidfile", str(pidfile),
        ]
        # the pid file is written once the exports are set up: a readiness signal
        proc, ok = _start(cmd, sock, log_path, timeout=timeout, ready_file=pidfile)
        if ok:
            notes.append(blockdev or f"cache.direct={direct},aio={aio}")
            backend = Backend("qemu-storage-daemon", proc, sock, log_path, cmd, notes)
            break
        notes.append(f"{blockdev or f'cache.direct={direct},aio={aio}'} refused "
                     f"(exit {proc.returncode}): "
                     f"{tail(log_path.read_text(errors='replace'), 3)}")
    else:
        raise BackendError("qemu-storage-daemon failed to start:\n" + "\n".join(notes))
    if len(notes) > 1:
        print(f"qsd_blk: fell back: {'; '.join(notes)}", file=sys.stderr)
    try:
        with _managed(backend, check_exit=False) as b:
            yield b
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)


@contextlib.contextmanager
def pyvhost_blk(img: str | os.PathLike | None, sock: str | os.PathLike, read_only: bool = False,
                num_queues: int = 1, extra: Sequence[str] = (), timeout: float = 30.0,
                client: bool = False, failpoint: str | None = None) -> Iterator[Backend]:
    """Our backend, ``python -m vhost.programs pyvhost-blk``, serving ``img`` on ``sock``. Waits for the
    socket (client: for the backend to start dialing ``sock``, where the frontend listens);
    at the end sends SIGTERM and raises BackendError unless it exits 0 within 10 s (or died
    by SIGKILL, when `kill9()` or `failpoint` -- PYVHOST_FAILPOINT, cython_ext/ring.pyx --
    was meant to kill it).  ``img`` None: the store is in ``extra`` (``--rbd POOL/IMAGE ...``)."""
    sock = Path(sock)
    if not client:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
    log_path = sock.parent / f"{sock.name}.pyvhost.log"
    cmd = [sys.executable, "-m", "vhost.programs", "pyvhost-blk", "--socket-path", str(sock),
           "--num-queues", str(num_queues)]
    if img is not None:
        cmd += ["--blk-file", str(img)]
    if read_only:
        cmd.append("--read-only")
    if client:
        cmd.append("--client")
    cmd += list(extra)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("PYVHOST_FAILPOINT", None)
    if failpoint:
        env["PYVHOST_FAILPOINT"] = failpoint
    proc, ok = _start(cmd, sock, log_path, env=env, cwd=str(REPO_ROOT), timeout=timeout,
                      ready_text="connecting to" if client else None)
    if not ok:
        raise BackendError(
            f"pyvhost blk backend exited ({proc.returncode}) before creating {sock}; log tail:\n"
            f"{tail(log_path.read_text(errors='replace'), 40)}")
    with _managed(Backend("pyvhost-blk", proc, sock, log_path, cmd,
                          expect_kill=bool(failpoint)), check_exit=True,
                  unlink=not client) as b:
        yield b


@contextlib.contextmanager
def blk_backend(kind: str, img: str | os.PathLike, sock: str | os.PathLike,
                read_only: bool = False, num_queues: int = 1) -> Iterator[Backend]:
    """``kind`` is "qsd" or "pyvhost"."""
    if kind == "qsd":
        cm = qsd_blk(img, sock, read_only=read_only, num_queues=num_queues)
    elif kind == "pyvhost":
        cm = pyvhost_blk(img, sock, read_only=read_only, num_queues=num_queues)
    else:
        raise ValueError(kind)
    with cm as b:
        yield b
