"""migrate.py: live migration of a TCG guest between two QEMUs on one host, for the e2e tests and
the benchmarks.

Owns: a minimal QMP client (`Qmp`: greeting, qmp_capabilities, execute, events dropped), and
`MigrationRun`: one guest script booted on a *source* QEMU while a *destination* QEMU with the
same kernel, initramfs and machine waits (`-incoming unix:...`), each with its own device
arguments (e.g. its own vhost-user backend socket); `migrate()` sends the source's RAM over a
Unix socket with a bandwidth cap (so that the migration takes several dirty-sync rounds while
the guest keeps writing), waits for `completed`, and quits the source; `wait()` lets the guest
finish on the destination and returns both consoles (the script's output is split between
them: everything printed after the switch-over is on the destination's).  With
`pause_destination` the destination stays paused after the switch-over (`-S`) and the source is
kept (paused, post-migrate) until `ram_diff()` has compared the two sides' guest RAM page by
page (`pmemsave`) and `resume_destination()` has let the guest go on: the pages that differ are
writes the migration lost, whoever made them (bench/migration_ramdiff.py).
Must not: know about a particular test; import tests, devices, vhost.server, vhost.service or
vhost.config.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

from vhost.testing import guest as g


def shadow_pages(shadow: str | os.PathLike) -> set[int]:
    """The guest-physical addresses of the 4 KiB pages a backend started with
    PYVHOST_LOG_SHADOW=`shadow` ever marked dirty (cython_ext/ring.pyx; empty if no file)."""
    try:
        bits = Path(shadow).read_bytes()
    except FileNotFoundError:
        return set()
    return {(i * 8 + k) << 12 for i, b in enumerate(bits) if b for k in range(8) if b >> k & 1}


def _size(mem: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(mem[:-1]) * units[mem[-1].upper()] if mem[-1].upper() in units else int(mem)


class QmpError(RuntimeError):
    pass


class Qmp:
    """A QMP connection (QEMU's `-qmp unix:PATH,server=on,wait=off`)."""

    def __init__(self, path: str | Path, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path} did not appear within {timeout} s")
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self._buf = b""
        self._read()                                   # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                continue
            if "error" in r:
                raise QmpError(f"{command}: {r['error'].get('desc', r['error'])}")
            return r.get("return")

    def close(self) -> None:
        self.sock.close()


class MigrationRun:
    """Source and destination QEMU for one guest script; see the module docstring.

    `source_devices` / `dest_devices` are the QEMU device arguments of each side (they must
    describe the same devices, with each side's own backend socket)."""

    def __init__(self, script: str, *, source_devices: Sequence[str],
                 dest_devices: Sequence[str], mem: str = "256M", cpus: int = 1,
                 extra_append: str = "", pause_destination: bool = False):
        base = g.base_initramfs()
        self.dir = g.short_tmpdir("mig")
        self.initrd = self.dir / "initrd.cpio"
        with open(self.initrd, "wb") as f:
            f.write(base.path.read_bytes())
            f.write(g.script_archive(script))
        append = "console=ttyS0 quiet panic=-1"
        if g._wants_blk(source_devices):        # /init waits for the disk (not for a NIC)
            append += " pyvhost_wait=vda"
        if extra_append:
            append += " " + extra_append
        self.mig_sock = self.dir / "mig.sock"
        self.consoles = {k: self.dir / f"{k}.console" for k in ("source", "dest")}
        self.qmp_paths = {k: self.dir / f"{k}.qmp" for k in ("source", "dest")}
        self.cmds = {}
        for side, devices in (("source", source_devices), ("dest", dest_devices)):
            self.consoles[side].touch()
            extra = ["-qmp", f"unix:{self.qmp_paths[side]},server=on,wait=off"]
            if side == "dest":
                extra += ["-incoming", f"unix:{self.mig_sock}"]
                if pause_destination:
                    extra.append("-S")
            self.cmds[side] = g.qemu_command(base.kernel.image, self.initrd,
                                             self.consoles[side], devices=list(devices) + extra,
                                             mem=mem, cpus=cpus, append=append)
        self.procs: dict[str, subprocess.Popen] = {}
        self.stats: dict = {}
        self.pause_destination = pause_destination
        self.mem_bytes = _size(mem)

    def console(self, side: str) -> str:
        return self.consoles[side].read_bytes().decode(errors="replace").replace("\r\n", "\n")

    def stderr(self, side: str) -> str:
        try:
            return (self.dir / f"{side}.stderr").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Destination first (it listens for the migration stream), then the source."""
        for side in ("dest", "source"):
            with open(self.dir / f"{side}.stderr", "wb") as err:
                self.procs[side] = subprocess.Popen(self.cmds[side], stdin=subprocess.DEVNULL,
                                                    stdout=err, stderr=err, close_fds=True)
            if side == "dest":
                deadline = time.monotonic() + 30
                while not self.mig_sock.exists():
                    if self.procs[side].poll() is not None or time.monotonic() > deadline:
                        raise g.GuestError("destination QEMU did not start listening:\n"
                                           + g.tail(self.stderr("dest"), 20))
                    time.sleep(0.05)

    def wait_console(self, side: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console(side):
            for s, p in self.procs.items():
                if p.poll() is not None:
                    raise g.GuestError(f"{s} QEMU exited ({p.returncode}) while waiting for "
                                       f"{text!r} on the {side}:\n{g.tail(self.stderr(s), 20)}"
                                       f"\nconsole:\n{g.tail(self.console(side))}")
            if time.monotonic() > deadline:
                raise g.GuestTimeout(f"{text!r} not on the {side} console within {timeout} s:"
                                     f"\n{g.tail(self.console(side))}")
            time.sleep(0.1)

    def start_migration(self, max_bandwidth: int = 32 << 20,
                        downtime_limit_ms: int | None = None) -> None:
        """Start migrating the running source (`migrate` over the Unix socket), at most
        `max_bandwidth` bytes/s; a tiny `downtime_limit_ms` keeps QEMU iterating (it switches
        over only when what is left fits the downtime) until `set_parameters` raises it."""
        self._qmp = Qmp(self.qmp_paths["source"])
        params = {"max-bandwidth": max_bandwidth}
        if downtime_limit_ms is not None:
            params["downtime-limit"] = downtime_limit_ms
        self._qmp.execute("migrate-set-parameters", **params)
        self._qmp.execute("migrate", uri=f"unix:{self.mig_sock}")

    def set_parameters(self, **params) -> None:
        """migrate-set-parameters on the running migration (QMP names: downtime-limit...)."""
        self._qmp.execute("migrate-set-parameters", **params)

    def wait_migration(self, timeout: float = 300) -> dict:
        """Wait for `completed`; returns query-migrate's final answer (ram.dirty-sync-count
        counts the rounds).  The source QEMU is quit after."""
        src = self._qmp
        try:
            deadline = time.monotonic() + timeout
            while True:
                info = src.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise g.GuestError(f"migration {status}: {info}\nsource stderr:\n"
                                       f"{g.tail(self.stderr('source'), 20)}\ndest stderr:\n"
                                       f"{g.tail(self.stderr('dest'), 20)}")
                if time.monotonic() > deadline:
                    src.execute("migrate_cancel")
                    raise g.GuestTimeout(f"migration not completed within {timeout} s: {info}")
                time.sleep(0.2)
            self.stats = info
            if self.pause_destination:
                return self.stats           # ram_diff() needs the source; it quits it
            src.execute("quit")
        finally:
            if not self.pause_destination:
                src.close()
        self.procs["source"].wait(timeout=30)
        return self.stats

    def ram_diff(self, keep: str | os.PathLike | None = None) -> list[int]:
        """(pause_destination) Once the destination has loaded the last round: both sides'
        guest RAM dumped and compared; returns the guest-physical addresses of the 4 KiB pages
        that differ.  Quits the source.  `keep`: a directory the two dumps (source.ram,
        dest.ram) are moved to instead of being deleted."""
        dst = Qmp(self.qmp_paths["dest"])
        try:
            deadline = time.monotonic() + 60
            while dst.execute("query-status")["status"] == "inmigrate":
                if time.monotonic() > deadline:
                    raise g.GuestTimeout("destination still loading after 60 s")
                time.sleep(0.1)
            dumps = {side: self.dir / f"{side}.ram" for side in ("source", "dest")}
            self._qmp.execute("pmemsave", val=0, size=self.mem_bytes,
                              filename=str(dumps["source"]))
            dst.execute("pmemsave", val=0, size=self.mem_bytes, filename=str(dumps["dest"]))
            self._qmp.execute("quit")
        finally:
            dst.close()
            self._qmp.close()
        self.procs["source"].wait(timeout=30)
        pages = []
        with open(dumps["source"], "rb") as a, open(dumps["dest"], "rb") as b:
            gpa = 0
            while True:
                x, y = a.read(1 << 20), b.read(1 << 20)
                if not x:
                    break
                if x != y:
                    pages += [gpa + k for k in range(0, len(x), 4096)
                              if x[k:k + 4096] != y[k:k + 4096]]
                gpa += len(x)
        for f in dumps.values():
            if keep is not None:
                shutil.move(str(f), os.path.join(keep, f.name))
            else:
                f.unlink()
        return pages

    def resume_destination(self) -> None:
        """(pause_destination) Let the migrated guest run."""
        dst = Qmp(self.qmp_paths["dest"])
        try:
            dst.execute("cont")
        finally:
            dst.close()

    def migrate(self, max_bandwidth: int = 32 << 20, timeout: float = 300) -> dict:
        """start_migration + wait_migration."""
        self.start_migration(max_bandwidth)
        return self.wait_migration(timeout)

    def wait(self, timeout: float = 300) -> tuple[str, str, int]:
        """Let the guest finish on the destination: (source console, destination console,
        the script's exit code)."""
        p = self.procs["dest"]
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise g.GuestTimeout(f"guest did not finish on the destination within {timeout} s:"
                                 f"\n{g.tail(self.console('dest'))}") from None
        dest = self.console("dest")
        m = g.END_MARKER_RE.search(dest)
        if not m:
            raise g.GuestError(f"destination QEMU exited ({p.returncode}) without the end "
                               f"marker:\n{g.tail(self.stderr('dest'), 20)}\n{g.tail(dest)}")
        return self.console("source"), dest, int(m.group(1))

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
