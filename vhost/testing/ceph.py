"""ceph.py: a throwaway single-node Ceph cluster for the tests and benchmarks that need RBD --
one monitor and one memstore OSD started from Debian's packages (ceph-mon, ceph-osd,
ceph-common), cephx keys made with ceph-authtool, an rbd pool ("pyvhost") ready for images.
Owns the cluster's lifetime and everything it writes: the ceph.conf, keyrings, monmap, daemon
data, logs, admin sockets all live in the workdir it is given (the admin sockets in a short
directory under /tmp if the workdir's path is too long for AF_UNIX); /etc/ceph, /var/lib/ceph
and /var/log/ceph are never read or written and CEPH_CONF is set nowhere.  The daemons run in
the foreground as child processes; every wait is bounded and a failure raises CephError with
the daemon's log tail.  Also: `have_ceph()`, `rbd`/`ceph` CLI wrappers, stopping and
restarting the OSD (an outage the client sees), no mgr (Pacific's `ceph pg ...` and
`ceph osd pool stats` need one: not used here).
Must not: hold test logic; import tests, devices, vhost.server, vhost.service or vhost.config
(stdlib and vhost.testing.backends only, so a standalone bench script can use it too)."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator, Mapping

from vhost.testing.backends import short_tmpdir, tail

BINARIES = ("ceph-mon", "ceph-osd", "monmaptool", "ceph-authtool", "ceph", "rbd")
# the OSD class rbd images need (Debian: /usr/lib/<triplet>/rados-classes, in ceph-osd)
CLS_RBD_GLOBS = ("/usr/lib/*/rados-classes/libcls_rbd.so*",
                 "/usr/lib*/rados-classes/libcls_rbd.so*")
MON_ID = "a"
OSD_ID = 0
POOL = "pyvhost"
PG_NUM = 8
# AF_UNIX limit (107) minus the longest socket name put in the run dir
# ("/ceph-client.admin.<pid>.<cctid>.asok")
_RUN_DIR_MAX = 107 - 48


class CephError(RuntimeError):
    """The cluster did not come up, a daemon died, or a ceph/rbd command failed."""


def have_ceph() -> tuple[bool, str]:
    """(True, "") if the binaries a CephCluster needs are installed; else (False, why)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not any(glob.glob(g) for g in CLS_RBD_GLOBS):
        missing.append("rados-classes/libcls_rbd.so")
    if missing:
        return False, ("Ceph not installed: missing " + ", ".join(missing) +
                       " (Debian packages ceph-mon, ceph-osd, ceph-common)")
    return True, ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    """The environment of every ceph process: nothing from the caller's CEPH_* settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CEPH_CONF", "CEPH_ARGS", "CEPH_KEYRING", "PYTHONHOME")}
    return env


class CephCluster:
    """``with CephCluster(workdir) as c:`` -- a running one-mon, one-OSD cluster with an
    initialised rbd pool ``c.pool``; clients use ``c.conf``, ``c.keyring`` and ``c.client_id``
    (or ``c.client_args``).  At the end the daemons are killed and their data removed (the
    logs, ceph.conf and client keyring stay for post-mortems; the workdir itself is the
    caller's).  ``extra_conf`` adds or overrides ceph.conf options by section, e.g.
    ``{"osd": {"osd client watch timeout": 10}}`` (a killed exclusive-lock owner is noticed
    after that many seconds, default 30).  ``timeout`` bounds each wait: the mon up, the OSD up,
    the PGs active."""

    def __init__(self, workdir: str | os.PathLike, *, pool: str = POOL,
                 timeout: float = 60.0, memstore_bytes: int = 1 << 30,
                 extra_conf: Mapping[str, Mapping[str, object]] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.conf = self.workdir / "ceph.conf"
        self.keyring = self.workdir / "client.admin.keyring"
        self.client_id = "admin"
        self.pool = pool
        self.timeout = timeout
        self.memstore_bytes = memstore_bytes
        self.extra_conf = dict(extra_conf or {})
        self.fsid = str(uuid.uuid4())
        self.osd_uuid = str(uuid.uuid4())
        self.log_dir = self.workdir / "log"
        self.mon_data = self.workdir / "mon"
        self.osd_data = self.workdir / "osd"
        self.run_dir = self.workdir / "run"
        self._own_run_dir = False
        self.mon_port = 0
        self.mon_host = ""
        self.mon: subprocess.Popen | None = None
        self.osd: subprocess.Popen | None = None
        self.start_seconds = 0.0
        self._pool_id_cache: int | None = None

    # -- the client side ---------------------------------------------------------------------

    @property
    def client_args(self) -> list[str]:
        """What a ceph CLI tool needs to reach this cluster as client.admin."""
        return ["--conf", str(self.conf), "--keyring", str(self.keyring),
                "--id", self.client_id]

    def run(self, tool: str, *args: str, timeout: float = 60.0,
            input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run a ceph CLI ``tool`` (ceph, rbd, rados) against this cluster; CephError (with
        its stderr) if it fails or takes longer than ``timeout``."""
        cmd = [tool, *self.client_args, *map(str, args)]
        try:
            cp = subprocess.run(cmd, input=input, stdin=None if input is not None
                                else subprocess.DEVNULL, capture_output=True,
                                timeout=timeout, env=_env())
        except subprocess.TimeoutExpired as e:
            raise CephError(f"{' '.join(cmd)}: no answer within {timeout} s; stderr:\n"
                            f"{tail((e.stderr or b'').decode(errors='replace'), 20)}") from None
        if check and cp.returncode != 0:
            raise CephError(f"{' '.join(cmd)}: exit {cp.returncode}; stderr:\n"
                            f"{tail(cp.stderr.decode(errors='replace'), 20)}")
        return cp

    def rbd(self, *args: str, timeout: float = 60.0, input: bytes | None = None) -> str:
        """``rbd ARGS`` as client.admin; its stdout."""
        return self.run("rbd", *args, timeout=timeout, input=input).stdout.decode(
            errors="replace")

    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        """``ceph ARGS`` as client.admin; its stdout (mon commands only: there is no mgr)."""
        return self.run("ceph", "--connect-timeout", str(max(1, int(timeout))), *args,
                        timeout=timeout).stdout.decode(errors="replace")

    def ceph_json(self, *args: str, timeout: float = 60.0):
        return json.loads(self.ceph(*args, "--format", "json", timeout=timeout))

    def create_image(self, name: str, size_bytes: int, *extra: str) -> str:
        """A new image of ``size_bytes`` in the pool (default features: layering,
        exclusive-lock, object-map, fast-diff, deep-flatten; ``extra`` are more `rbd create`
        options); returns its spec "pool/name"."""
        spec = f"{self.pool}/{name}"
        self.rbd("create", "--size", f"{size_bytes}B", *extra, spec)
        return spec

    def pyvhost_args(self, spec: str) -> list[str]:
        """pyvhost-blk's options serving the image ``spec`` of this cluster."""
        return ["--rbd", spec, "--ceph-conf", str(self.conf), "--ceph-id", self.client_id,
                "--keyring", str(self.keyring)]

    def qsd_blockdev(self, spec: str, node: str = "f0") -> str:
        """qemu-storage-daemon's --blockdev for the image ``spec`` (QEMU's rbd driver; the
        keyring comes from the conf's [client] section)."""
        pool, image = spec.split("/", 1)
        return (f"driver=rbd,node-name={node},pool={pool},image={image},conf={self.conf},"
                f"user={self.client_id},discard=unmap")

    # -- lifetime ----------------------------------------------------------------------------

    def __enter__(self) -> "CephCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        t0 = time.monotonic()
        try:
            for attempt in range(3):
                self._setup()
                try:
                    self._start_mon()
                    break
                except CephError:
                    # the free port was taken by someone else meanwhile: another port
                    if attempt == 2 or "Address already in use" not in self.log_tail(
                            f"mon.{MON_ID}", 10):
                        raise
                    self.close()
            self._create_osd()
            self.start_osd()
            self._create_pool()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - t0

    def close(self) -> None:
        """Kill the daemons (SIGKILL: nothing is kept) and remove their data."""
        for proc in (self.osd, self.mon):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        self.osd = self.mon = None
        for d in (self.mon_data, self.osd_data):
            shutil.rmtree(d, ignore_errors=True)
        for f in ("monmap", "mon.keyring"):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / f).unlink()
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:  # the daemons' admin sockets and pid files (SIGKILL leaves them)
            for f in self.run_dir.glob("*"):
                with contextlib.suppress(OSError):
                    f.unlink()

    # -- the OSD -----------------------------------------------------------------------------

    def stop_osd(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop the OSD and wait until the monitor has it down.  SIGTERM (the default) is a
        clean stop: memstore saves its objects to the OSD's data dir and loads them again on
        `start_osd`.  SIGKILL is a crash: memstore loses everything written since the OSD's
        last clean stop (the monitor is told with `ceph osd down`, as no peer would)."""
        proc, self.osd = self.osd, None
        if proc is None:
            raise CephError("stop_osd: the OSD is not running")
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        deadline = time.monotonic() + timeout
        while self._osd_up():
            if time.monotonic() > deadline:
                raise CephError(f"osd.{OSD_ID} still up in the osdmap {timeout} s after it "
                                "was stopped")
            if sig == signal.SIGKILL:
                self.ceph("osd", "down", str(OSD_ID), timeout=10)
            time.sleep(0.2)

    def start_osd(self, timeout: float | None = None) -> None:
        """Start the OSD and wait until it is up and every PG of the pool (if made yet) is
        active: within ``timeout`` (default the cluster's), or CephError with its log tail."""
        if self.osd is not None and self.osd.poll() is None:
            raise CephError("start_osd: the OSD is already running")
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.osd = self._spawn("ceph-osd", "-i", str(OSD_ID), name=f"osd.{OSD_ID}")
        self._wait(lambda: self._osd_up(), deadline, f"osd.{OSD_ID} up", self.osd)
        if self._pool_id() is not None:
            self._wait_pgs(deadline)

    # -- internals ---------------------------------------------------------------------------

    def _setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        if len(str(self.run_dir)) > _RUN_DIR_MAX:
            self.run_dir = short_tmpdir("ceph")
            self._own_run_dir = True
        else:
            self.run_dir.mkdir(exist_ok=True)
        for d in (self.mon_data, self.osd_data):
            shutil.rmtree(d, ignore_errors=True)
        self.osd_data.mkdir()
        self.mon_port = _free_port()
        self.mon_host = f"v2:127.0.0.1:{self.mon_port}"
        self._write_conf()
        mon_keyring = self.workdir / "mon.keyring"
        osd_keyring = self.osd_data / "keyring"
        for f in (mon_keyring, self.keyring):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        self._tool("ceph-authtool", "--create-keyring", mon_keyring, "--gen-key", "-n", "mon.",
                   "--cap", "mon", "allow *")
        self._tool("ceph-authtool", "--create-keyring", self.keyring, "--gen-key",
                   "-n", f"client.{self.client_id}", "--cap", "mon", "allow *",
                   "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
                   "--cap", "mds", "allow *")
        self._tool("ceph-authtool", "--create-keyring", osd_keyring, "--gen-key",
                   "-n", f"osd.{OSD_ID}", "--cap", "mon", "allow profile osd",
                   "--cap", "osd", "allow *", "--cap", "mgr", "allow profile osd")
        # the monitor's initial auth database: every key in its mkfs keyring
        for k in (self.keyring, osd_keyring):
            self._tool("ceph-authtool", mon_keyring, "--import-keyring", k)
        monmap = self.workdir / "monmap"
        self._tool("monmaptool", "--create", "--clobber", "--fsid", self.fsid,
                   "--enable-all-features", "--addv", MON_ID, f"[{self.mon_host}]", monmap)
        self._tool("ceph-mon", "--conf", self.conf, "--mkfs", "-i", MON_ID,
                   "--monmap", monmap, "--keyring", mon_keyring)

    def _write_conf(self) -> None:
        log, run = self.log_dir, self.run_dir
        sections: dict[str, dict[str, object]] = {
            "global": {
                "fsid": self.fsid,
                "mon host": f"[{self.mon_host}]",
                "public addr": "127.0.0.1",
                "cluster addr": "127.0.0.1",
                "ms bind ipv4": "true",
                "ms bind ipv6": "false",
                "ms bind msgr1": "false",
                "ms bind msgr2": "true",
                "auth cluster required": "cephx",
                "auth service required": "cephx",
                "auth client required": "cephx",
                "auth allow insecure global id reclaim": "false",
                "mon warn on insecure global id reclaim allowed": "false",
                "run dir": run,
                "admin socket": f"{run}/$cluster-$name.asok",
                "pid file": f"{run}/$name.pid",
                "log to stderr": "false",
                "err to stderr": "true",
                "log to syslog": "false",
                "crash dir": self.workdir / "crash",
                "osd pool default size": 1,
                "osd pool default min size": 1,
                "osd pool default pg num": PG_NUM,
                "osd pool default pgp num": PG_NUM,
                "osd pool default pg autoscale mode": "off",
                "osd crush chooseleaf type": 0,
                "mon allow pool size one": "true",
                "mon allow pool delete": "true",
                "mon warn on pool no redundancy": "false",
                "mon data avail warn": 2,
                "mon data avail crit": 1,
                "mon max pg per osd": 1000,
                "ms async op threads": 2,
            },
            "mon": {
                "mon data": self.mon_data,
                "log file": f"{log}/$name.log",
                # commit map changes (OSD boot, pool create, snaps) in 0.1 s, not 1 s: a
                # start in ~3 s instead of ~9 s
                "paxos propose interval": 0.1,
                "paxos min wait": 0.01,
            },
            "osd": {
                "osd data": self.osd_data,
                "keyring": self.osd_data / "keyring",
                "log file": f"{log}/$name.log",
                "osd objectstore": "memstore",
                "memstore device bytes": self.memstore_bytes,
                # a clean stop (SIGTERM) must unmount the store: memstore saves its objects then
                "osd fast shutdown": "false",
                "osd memory target": 939524096,
                "osd op num shards": 2,
                "osd op num threads per shard": 1,
                "osd crush update on start": "true",
            },
            "client": {
                "keyring": self.keyring,
                "log file": f"{log}/$name.log",
                "admin socket": f"{run}/$cluster-$name.$pid.$cctid.asok",
                # a stalled cluster fails a test's calls instead of blocking them for good
                # (Ceph's client defaults are no limit: a librbd call that never returns holds
                # a test thread in C, where pytest-timeout cannot interrupt it); far longer
                # than any OSD restart a test makes
                "rados osd op timeout": 120,
                "rados mon op timeout": 120,
                "client mount timeout": 60,
            },
        }
        for section, options in self.extra_conf.items():
            sections.setdefault(section, {}).update(options)
        lines = ["# a throwaway test cluster: vhost/testing/ceph.py"]
        for section, options in sections.items():
            lines += ["", f"[{section}]"] + [f"{k} = {v}" for k, v in options.items()]
        self.conf.write_text("\n".join(lines) + "\n")

    def _tool(self, *cmd, timeout: float = 30.0) -> str:
        cmd = [str(c) for c in cmd]
        try:
            cp = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL,
                                timeout=timeout, env=_env())
        except subprocess.TimeoutExpired:
            raise CephError(f"{' '.join(cmd)}: no answer within {timeout} s") from None
        if cp.returncode != 0:
            raise CephError(f"{' '.join(cmd)}: exit {cp.returncode}:\n"
                            f"{tail((cp.stdout + cp.stderr).decode(errors='replace'), 20)}")
        return cp.stdout.decode(errors="replace")

    def _spawn(self, binary: str, *args: str, name: str) -> subprocess.Popen:
        out = self.log_dir / f"{name}.out"
        with open(out, "ab") as f:
            return subprocess.Popen([binary, "--conf", str(self.conf), "-f", *args],
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                    env=_env(), close_fds=True)

    def log_tail(self, name: str, lines: int = 40) -> str:
        """The last lines of daemon ``name``'s ("mon.a", "osd.0") log and stdout/stderr."""
        parts = []
        for p in (self.log_dir / f"{name}.out", self.log_dir / f"{name}.log"):
            with contextlib.suppress(FileNotFoundError):
                text = p.read_text(errors="replace")
                if text.strip():
                    parts.append(f"--- {p}:\n{tail(text, lines)}")
        return "\n".join(parts) or f"(no log for {name})"

    def _wait(self, ready, deadline: float, what: str, proc: subprocess.Popen) -> None:
        name = "mon." + MON_ID if proc is self.mon else f"osd.{OSD_ID}"
        last, t0 = "", time.monotonic()
        while True:
            if proc.poll() is not None:
                raise CephError(f"{name} exited ({proc.returncode}) before {what}; log tail:\n"
                                f"{self.log_tail(name)}")
            try:
                if ready():
                    return
            except CephError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise CephError(f"no {what} after {time.monotonic() - t0:.1f} s"
                                f"{'; last error: ' + last if last else ''}; log tail:\n"
                                f"{self.log_tail(name)}")
            time.sleep(0.25)

    def _asok(self, name: str, *cmd: str, timeout: float = 10.0):
        """An admin-socket command to a daemon (local, no auth, no mgr); its JSON answer."""
        path = self.run_dir / f"ceph-{name}.asok"
        if not path.exists():
            raise CephError(f"no admin socket {path} yet")
        out = self._tool("ceph", "--conf", self.conf, "--admin-daemon", path, *cmd,
                         timeout=timeout)
        return json.loads(out)

    def _start_mon(self) -> None:
        deadline = time.monotonic() + self.timeout
        self.mon = self._spawn("ceph-mon", "-i", MON_ID, name=f"mon.{MON_ID}")
        self._wait(lambda: self._asok(f"mon.{MON_ID}", "mon_status")["state"] == "leader",
                   deadline, f"mon.{MON_ID} in quorum", self.mon)

    def _create_osd(self) -> None:
        out = self.ceph("osd", "new", self.osd_uuid, str(OSD_ID)).strip()
        if out != str(OSD_ID):
            raise CephError(f"ceph osd new gave {out!r}, not {OSD_ID}")
        self._tool("ceph-osd", "--conf", self.conf, "-i", OSD_ID, "--mkfs",
                   "--osd-uuid", self.osd_uuid, timeout=60)

    def _osd_up(self) -> bool:
        dump = self.ceph_json("osd", "dump", timeout=10)
        return any(o["osd"] == OSD_ID and o["up"] for o in dump["osds"])

    def _pool_id(self) -> int | None:
        if self._pool_id_cache is None:
            for p in self.ceph_json("osd", "pool", "ls", "detail", timeout=10):
                if p["pool_name"] == self.pool:
                    self._pool_id_cache = p["pool_id"]
        return self._pool_id_cache

    def _pg_states(self) -> list[list[str]] | None:
        """The state paths ("Started/Primary/Active/Clean", split at "/") of the pool's PGs
        as the OSD sees them (`ceph pg stat` needs a mgr); None until the OSD has them all."""
        pool_id = self._pool_id()
        hist = self._asok(f"osd.{OSD_ID}", "dump_pgstate_history")
        states = [p.get("currently", "").split("/") for p in hist.get("pgs", [])
                  if p.get("pg", "").startswith(f"{pool_id}.")]
        return states if len(states) >= PG_NUM else None

    def _pgs_active(self) -> bool:
        states = self._pg_states()
        return states is not None and all("Active" in s and s[-1] != "Activating"
                                          for s in states)

    def _pgs_clean(self) -> bool:
        states = self._pg_states()
        return states is not None and all(s[-1] == "Clean" for s in states)

    def _wait_pgs(self, deadline: float) -> None:
        """Until the pool's PGs are active (or CephError), then a few seconds more at most
        until they are clean too."""
        self._wait(self._pgs_active, deadline, f"pool {self.pool}'s PGs active", self.osd)
        clean_by = min(deadline, time.monotonic() + 10)
        while time.monotonic() < clean_by:
            with contextlib.suppress(CephError):
                if self._pgs_clean():
                    return
            time.sleep(0.25)

    def _create_pool(self) -> None:
        self.ceph("osd", "pool", "create", self.pool, str(PG_NUM), str(PG_NUM), "replicated")
        self._wait_pgs(time.monotonic() + self.timeout)
        self.rbd("pool", "init", self.pool, timeout=30)


@contextlib.contextmanager
def ceph_cluster(workdir: str | os.PathLike, **kw) -> Iterator[CephCluster]:
    """The same as ``with CephCluster(workdir, **kw) as c``."""
    with CephCluster(workdir, **kw) as c:
        yield c
