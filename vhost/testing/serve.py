"""serve.py: a `pyvhost serve` process as systemd runs it, for the service tests.

Owns: `Serve` (the program started with `python -m vhost.service serve --config FILE`, in a
network namespace or behind an argv prefix if asked, its log and its sd_notify listener),
`NotifyListener` (the service manager's end of sd_notify: a datagram socket at NOTIFY_SOCKET,
read on demand or drained by a thread),
`LAUNCH` (a tiny launcher that passes test-held sockets as LISTEN_FDS, the way socket
activation does), `blk_dev` (one [[device]] block entry of a config file), and the metrics
helpers (`metrics_url` from the log, `scrape` from inside a namespace or not, `metric` to pick
one sample).
Must not: import tests, devices, vhost.server, vhost.service or vhost.config (the service runs
as a program: its config format is written here as text); hold test assertions.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from vhost import logfmt
from vhost.testing import netns as nsh
from vhost.testing.backends import REPO_ROOT

SERVE = [sys.executable, "-m", "vhost.service", "serve"]
TIMEOUT = 30.0


class NotifyListener:
    """The service manager's end of sd_notify: a datagram socket at NOTIFY_SOCKET."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o777)      # as systemd's /run/systemd/notify: any service user
        self.messages: list[dict] = []
        self._drain_stop: threading.Event | None = None
        self._drainer: threading.Thread | None = None

    @staticmethod
    def _parse(data: bytes) -> dict:
        return dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)

    def start_draining(self) -> None:
        """Read every notification from now on in a thread, as a service manager does, and
        keep them in `messages` (wait_for must not be used meanwhile).  Needed by a test that
        makes the service notify often (a STATUS= per frontend connect/disconnect): a listener
        nobody reads fills up after net.unix.max_dgram_qlen (10) datagrams, and the service's
        next sd_notify then waits for its send timeout on its event loop."""
        if self._drainer is not None:
            return
        self._drain_stop = threading.Event()
        self.sock.settimeout(0.1)

        def drain():
            while not self._drain_stop.is_set():
                try:
                    data = self.sock.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    return
                self.messages.append(self._parse(data))

        self._drainer = threading.Thread(target=drain, name="notify-drain", daemon=True)
        self._drainer.start()

    def wait_for(self, key: str, value: str | None = None, timeout: float = TIMEOUT) -> dict:
        """The first message (received from now on, or already queued) with `key` set."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.messages):
                if key in m and (value is None or m[key] == value):
                    del self.messages[:i + 1]
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key}= notification; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.messages.append(self._parse(data))

    def close(self):
        if self._drainer is not None:
            self._drain_stop.set()
            self._drainer.join(5)
            self._drainer = None
        self.sock.close()


class Serve:
    """A `pyvhost serve` process with its notify listener and log."""

    def __init__(self, tmp: Path, config: Path, ns: str | None = None, argv_prefix=(),
                 pass_fds=(), env=None, loop: str | None = None, python: str = sys.executable,
                 cwd=REPO_ROOT):
        self.log_path = tmp / "serve.log"
        self.notify = NotifyListener(tmp / "notify.sock")
        e = dict(os.environ, NOTIFY_SOCKET=self.notify.path, PYTHONPATH=str(REPO_ROOT))
        e.update(env or {})
        argv = [*argv_prefix, python, *SERVE[1:], "--config", str(config)]
        if loop is not None:
            argv += ["--loop", loop]
        if ns is not None:
            argv = nsh.cmd(ns, *argv)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self.log, stderr=self.log,
                                     env=e, pass_fds=pass_fds)

    def ready(self) -> dict:
        try:
            return self.notify.wait_for("READY", "1")
        except TimeoutError:
            raise AssertionError(f"not READY:\n{self.log_text()}") from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, msg=None) -> list[dict]:
        out = [logfmt.parse_line(ln) for ln in self.log_text().splitlines()]
        return [f for f in out if msg is None or f.get("msg", "").startswith(msg)]

    def signal(self, signum):
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._terminated = True
        self.proc.send_signal(signum)

    def stop(self, timeout: float = TIMEOUT) -> int:
        # One SIGTERM, as systemd sends: a second one that arrives after the service removed
        # its handlers on the way out would kill it (exit status -15) instead of letting it end
        if self.proc.poll() is None and not getattr(self, "_terminated", False):
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
            self.notify.close()


def blk_dev(tmp, name, **extra) -> str:
    lines = [f'name = "{name}"', 'type = "block"', f'socket = "{tmp}/{name}.sock"',
             f'blk-file = "{tmp}/{name}.img"', 'size = "16M"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "[[device]]\n" + "\n".join(lines) + "\n"


def scrape(url: str, ns: str | None = None) -> str:
    if ns is None:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()
    r = nsh.run(ns, sys.executable, "-c",
                f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10)"
                f".read().decode())")
    return r.stdout


def metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == str(v) for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name}{labels} not in:\n{text}")


def metrics_url(serve: Serve) -> str:
    for f in serve.events("metrics on "):
        return f["msg"].split(" ", 2)[2]
    raise AssertionError(f"no metrics line:\n{serve.log_text()}")


LAUNCH = ("import os, sys\n"
          "fds = [int(x) for x in sys.argv[1].split(',')]\n"
          "for k, fd in enumerate(fds):\n"
          "    os.dup2(fd, 3 + k)\n"
          "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),\n"
          "                  LISTEN_FDNAMES=sys.argv[2])\n"
          "os.execv(sys.argv[3], sys.argv[3:])\n")
