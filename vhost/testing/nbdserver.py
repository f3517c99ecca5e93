"""nbdserver.py: NBD servers for the NBD backing-store tests and benchmarks: qemu-nbd exporting an
image file, nbdkit's memory plugin, each on a Unix socket, as subprocesses that a test can kill
and start again on the same socket (the same data, for qemu-nbd).
Must not: hold test logic; import tests, devices, vhost.server, vhost.service or vhost.config.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from vhost.testing.backends import BackendError, stop_process, tail, wait_socket


def have_nbd_servers() -> tuple[bool, str]:
    missing = [b for b in ("qemu-nbd", "nbdkit") if shutil.which(b) is None]
    if missing:
        return False, f"{', '.join(missing)} not installed (Debian qemu-utils, nbdkit)"
    return True, ""


class NbdServer:
    """One NBD server process exporting `export` on the Unix socket `sock`."""

    def __init__(self, kind: str, sock: str | os.PathLike, *, export: str = "disk",
                 image: str | os.PathLike | None = None, size: str = "64M",
                 nbdkit_args: tuple[str, ...] = ()):
        self.kind, self.sock, self.export = kind, Path(sock), export
        self.image, self.size = image, size
        self.nbdkit_args = tuple(nbdkit_args)   # e.g. ("--filter=nozero", ..., "zeromode=none")
        self.log = self.sock.parent / f"{self.sock.name}.{kind}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    def command(self) -> list[str]:
        if self.kind == "qemu-nbd":
            # -t: keep serving after a client leaves; --cache=none: an acknowledged write is in
            # the file, so it survives a kill of qemu-nbd
            return ["qemu-nbd", "-f", "raw", "-x", self.export, "-k", str(self.sock), "-t",
                    "--cache=none", "--aio=threads", "--discard=unmap", str(self.image)]
        filters = [a for a in self.nbdkit_args if a.startswith("--filter")]
        params = [a for a in self.nbdkit_args if not a.startswith("--filter")]
        return ["nbdkit", "-f", "-U", str(self.sock), "-e", self.export, *filters, "memory",
                self.size, *params]

    def start(self, timeout: float = 20.0) -> "NbdServer":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, close_fds=True)
        if not wait_socket(self.proc, self.sock, timeout):
            raise BackendError(f"{self.kind} exited ({self.proc.returncode}):\n"
                               f"{tail(self.log.read_text(errors='replace'), 20)}")
        return self

    def kill(self) -> None:
        """SIGKILL (a crash or a host going away), and the socket file gone with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
