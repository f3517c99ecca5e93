"""netbackends.py: start and stop our vhost-user-net backend (`python -m vhost.programs pyvhost-net`, the
pyvhost-net program) as a subprocess for the integration and end-to-end tests.  Owns its
lifetime: wait for every socket, SIGTERM at the end and insist on a clean exit 0; the log is
kept next to the first socket for error messages.
Must not: hold test logic; import tests, devices, vhost.server, vhost.service or vhost.config.

    with pyvhost_net(sock, tap="pvhtap0", queues=2, netns="pvh-1234") as be: ...
    with pyvhost_net([sock_a, sock_b], switch="sw0") as be: ...
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from vhost.testing import netns as nsh
from vhost.testing.backends import BackendError, REPO_ROOT, stop_process, tail, wait_socket

__all__ = ["NetBackend", "BackendError", "pyvhost_net"]


@dataclasses.dataclass
class NetBackend:
    name: str
    proc: subprocess.Popen
    socks: list[Path]
    log_path: Path
    command: list[str]
    tap: str | None = None
    switch: str | None = None
    netns: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def sock(self) -> Path:
        """The first (often the only) socket."""
        return self.socks[0]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_text(), lines)

    def alive(self) -> bool:
        return self.proc.poll() is None


def _as_paths(socket_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(socket_paths, (str, os.PathLike)):
        return [Path(socket_paths)]
    paths = [Path(p) for p in socket_paths]
    if not paths:
        raise ValueError("at least one socket path is required")
    return paths


def _wait_sockets(proc: subprocess.Popen, socks: Sequence[Path], timeout: float) -> bool:
    """True once every socket exists; False if the process exited first."""
    deadline = time.monotonic() + timeout
    for s in socks:
        if not wait_socket(proc, s, max(0.05, deadline - time.monotonic())):
            return False
    return True


@contextlib.contextmanager
def pyvhost_net(socket_paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                tap: str | None = None, switch: str | None = None, queues: int = 1,
                netns: str | None = None, prefix: Sequence[str] = (),
                extra: Sequence[str] = (), timeout: float = 30.0,
                check_exit: bool = True) -> Iterator[NetBackend]:
    """Our net backend serving one ``--socket-path`` per entry of ``socket_paths`` (a path or a
    list of paths), on ``--tap TAP`` and/or ``--switch NAME``, with ``--queues N`` (passed when
    N != 1). ``netns`` runs it inside that network namespace (``vhost.testing.netns.prefix(NS)``:
    ``ip netns exec NS`` or ``nsenter --net=...``, put in front of ``prefix``). Waits for all
    sockets; at the end sends SIGTERM and raises BackendError unless it exits 0 within 10 s
    (``check_exit=False``: only a clean stop)."""
    socks = _as_paths(socket_paths)
    for s in socks:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(s)
    log_path = socks[0].parent / f"{socks[0].name}.pyvhost-net.log"
    cmd: list[str] = []
    if netns:
        cmd += nsh.prefix(netns)
    cmd += list(prefix)
    cmd += [sys.executable, "-m", "vhost.programs", "pyvhost-net"]
    for s in socks:
        cmd += ["--socket-path", str(s)]
    if tap:
        cmd += ["--tap", tap]
    if switch:
        cmd += ["--switch", switch]
    if queues != 1:
        cmd += ["--queues", str(queues)]
    cmd += list(extra)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env, cwd=str(REPO_ROOT), close_fds=True)
    backend = NetBackend("pyvhost-net", proc, socks, log_path, cmd, tap=tap, switch=switch,
                         netns=netns)
    try:
        try:
            ok = _wait_sockets(proc, socks, timeout)
        except BaseException:
            stop_process(proc)
            raise
        if not ok:
            raise BackendError(
                f"pyvhost net backend exited ({proc.returncode}) before creating "
                f"{', '.join(map(str, socks))}\ncommand: {' '.join(cmd)}\nlog tail:\n"
                f"{backend.log_tail()}")
        try:
            yield backend
        except BaseException:
            stop_process(proc)  # the body's exception is the interesting one
            raise
        rc, killed = stop_process(proc)
        if check_exit and (killed or rc != 0):
            raise BackendError(
                f"pyvhost-net did not exit cleanly on SIGTERM "
                f"({'killed after 10 s' if killed else f'exit code {rc}'}); log tail:\n"
                f"{backend.log_tail()}")
    finally:
        for s in socks:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s)
