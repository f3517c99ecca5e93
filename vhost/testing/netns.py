"""netns.py: network namespaces for the tests -- the one place that creates them, runs commands
inside them and reads their interfaces.
Must not: hold test logic; import anything of the project.

    ok, why = available()                      # root, iproute2, `ip netns add` works
    with namespace(no_ipv6=True) as ns:        # "pvh-<random>", lo up; always deleted
        run(ns, "ip", "tuntap", "add", "dev", "pvhtap0", "mode", "tap")
        subprocess.Popen(cmd(ns, sys.executable, "-c", ...))   # or [*prefix(ns), ...]
        st = link_state(ns, "pvhtap0")         # st.exists, st.up, st.mtu, st.rx_packets ...

Entering a namespace.  ``ip netns exec NS`` (and ``ip -n NS``) also unshares the mount
namespace and remounts /sys for NS, starting with ``mount --make-rslave /``; in a chroot whose
``/`` is not a mount point (a fresh debootstrap chroot, as in our CI check) that fails with
``"mount --make-rslave /" failed: Invalid argument`` although ``ip netns add/del`` work.  So the
first time a command has to run inside a namespace, ``ip netns exec NS true`` is tried; if it
fails because of that remount, ``nsenter --net=/run/netns/NS`` (util-linux) is used instead,
for the rest of the process.  Set ``PYVHOST_NETNS_FORCE_NSENTER=1`` to use nsenter without
probing (to test the fallback on a machine where ``ip netns exec`` works).

Consequences, true with either method: never read ``/sys/class/net`` for a namespace (with
nsenter /sys still shows the host's interfaces) -- use ``link_state`` (``ip -j -s -d link
show`` run inside, i.e. netlink); never use ``ip -n NS`` -- run ``ip`` inside with ``run``.
Per-namespace sysctls (``/proc/sys/net``) follow the writing process's namespace, so
``sysctl -w`` run inside is fine.  Functions taking ``ns`` accept ``None`` for the current
namespace (no prefix).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

__all__ = ["FORCE_NSENTER_ENV", "RUN_DIR", "NetnsError", "LinkState", "available", "method",
           "namespace", "pids", "kill_all", "prefix", "cmd", "run", "link_json", "link_state",
           "wait_link", "link_text", "set_up", "add_addr", "add_tap", "disable_ipv6"]

IP = "ip"
NSENTER = "nsenter"
FORCE_NSENTER_ENV = "PYVHOST_NETNS_FORCE_NSENTER"
RUN_DIR = Path("/run/netns")      # where `ip netns add` bind-mounts the namespaces

_lock = threading.Lock()
_method: str | None = None        # "ip" or "nsenter" once probed
_method_why = ""
_available: tuple[bool, str] | None = None


class NetnsError(RuntimeError):
    """A namespace could not be created, entered or queried."""


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 15.0,
         input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), input=input, stdin=None if input is not None else
                       subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()}")
    return p


def _forced() -> bool:
    return os.environ.get(FORCE_NSENTER_ENV, "").strip().lower() not in ("", "0", "no", "false")


# ---------------------------------------------------------------------------------------------
# creating and deleting

def available() -> tuple[bool, str]:
    """(ok, reason): root, iproute2, and `ip netns add`/`del` work (probed once, with a
    throw-away namespace).  Says nothing about entering one: see ``method``."""
    global _available
    with _lock:
        if _available is None:
            _available = _probe_available()
        return _available


def _probe_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which(IP) is None:
        return False, "iproute2 (ip) not installed"
    name = f"pvh-{secrets.token_hex(4)}"
    try:
        _run([IP, "netns", "add", name], timeout=10)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot create a network namespace: {e}"
    with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
        _run([IP, "netns", "del", name], timeout=10)
    return True, ""


@contextlib.contextmanager
def namespace(name_prefix: str = "pvh-", *, lo_up: bool = True,
              no_ipv6: bool = False) -> Iterator[str]:
    """A fresh network namespace ``<name_prefix><random>`` (``lo`` up unless ``lo_up=False``;
    ``no_ipv6``: IPv6 disabled in it, so no autoconfiguration chatter -- RS, MLD, DAD -- on its
    interfaces).  At the end every process still inside is killed (SIGKILL, by pid: they were
    all started in it by the caller, it did not exist before) and the namespace deleted."""
    for _ in range(5):
        name = f"{name_prefix}{secrets.token_hex(4)}"
        if not (RUN_DIR / name).exists():
            break
    _run([IP, "netns", "add", name], timeout=10)
    try:
        if lo_up:
            set_up(name, "lo")
        if no_ipv6:
            disable_ipv6(name)
        yield name
    finally:
        try:
            kill_all(name)
        finally:
            _run([IP, "netns", "del", name], check=False, timeout=10)


def _ns_id(ns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(RUN_DIR / ns)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns`` (found via /proc, not `ip netns pids`)."""
    want = _ns_id(ns)
    if want is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:           # gone, a zombie, or a kernel thread we may not look at
            continue
        if (st.st_dev, st.st_ino) == want:
            found.append(int(entry))
    return found


def kill_all(ns: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process inside ``ns`` (never this one); wait (bounded) until they are
    gone.  Returns the pids that were killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids(ns) if p != os.getpid()]
        if not left or time.monotonic() > deadline:
            return killed
        for p in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
                if p not in killed:
                    killed.append(p)
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# running commands inside

def method(ns: str | None = None) -> str:
    """How commands enter a namespace: "ip" (``ip netns exec``) or "nsenter"; probed once per
    process (with ``ns``, an existing namespace) and cached."""
    global _method, _method_why
    with _lock:
        if _method is not None:
            return _method
        if _forced():
            _method, _method_why = "nsenter", f"forced by {FORCE_NSENTER_ENV}"
            return _method
        if ns is None:
            raise NetnsError("method(): an existing namespace is needed to probe")
        p = _run([IP, "netns", "exec", ns, "true"], check=False)
        if p.returncode == 0:
            _method, _method_why = "ip", "ip netns exec works"
            return _method
        ip_err = (p.stderr or p.stdout).strip()
        if "mount" not in ip_err:   # e.g. '"mount --make-rslave /" failed: Invalid argument'
            raise NetnsError(f"ip netns exec {ns} true failed ({p.returncode}): {ip_err}")
        if shutil.which(NSENTER) is None:
            raise NetnsError(f"ip netns exec cannot remount /sys ({ip_err}) and nsenter "
                             f"(util-linux) is not installed")
        q = _run([NSENTER, f"--net={RUN_DIR / ns}", "true"], check=False)
        if q.returncode != 0:
            raise NetnsError(f"ip netns exec failed ({ip_err}) and so did nsenter "
                             f"({q.returncode}): {(q.stderr or q.stdout).strip()}")
        _method, _method_why = "nsenter", f"ip netns exec failed: {ip_err}"
        return _method


def method_reason() -> str:
    """Why ``method`` chose what it did ("" before the first probe)."""
    return _method_why


def prefix(ns: str | None) -> list[str]:
    """The command prefix running a program inside ``ns`` (``[]`` for None), e.g.
    ``['ip', 'netns', 'exec', ns]`` or ``['nsenter', '--net=/run/netns/' + ns]``; both exec
    the program (same pid: it can be signalled and waited for)."""
    if ns is None:
        return []
    if method(ns) == "ip":
        return [IP, "netns", "exec", ns]
    return [NSENTER, f"--net={RUN_DIR / ns}"]


def cmd(ns: str | None, *argv: str) -> list[str]:
    """``argv`` run inside ``ns``: ``[*prefix(ns), *argv]``."""
    return [*prefix(ns), *argv]


def run(ns: str | None, *argv: str, check: bool = True, timeout: float = 15.0,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` inside ``ns``, capturing text stdout/stderr; NetnsError when it fails and
    ``check``."""
    return _run(cmd(ns, *argv), check=check, timeout=timeout, input=input)


# ---------------------------------------------------------------------------------------------
# interfaces (netlink through `ip` run inside; never sysfs)

@dataclasses.dataclass(frozen=True)
class LinkState:
    """An interface as ``ip -j -s -d link show`` reports it.  ``rx_*`` and ``tx_*`` are the
    interface's counters (for a tap: rx = written into its fd by the backend, tx = read from
    it by the backend).  ``raw`` is the whole JSON object (None when it does not exist)."""
    name: str
    exists: bool = False
    flags: tuple[str, ...] = ()
    mtu: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    raw: dict | None = dataclasses.field(default=None, repr=False)

    @property
    def up(self) -> bool:
        """Administratively up (IFF_UP)."""
        return "UP" in self.flags

    @property
    def lower_up(self) -> bool:
        """Carrier (for a tap: some process holds its fd)."""
        return "LOWER_UP" in self.flags

    @property
    def running(self) -> bool:
        """Up and with carrier: ready to pass traffic."""
        return self.up and self.lower_up


def link_json(ns: str | None, ifname: str) -> dict | None:
    """The ``ip -j -s -d link show dev IFNAME`` object, run inside ``ns``; None if there is no
    such interface (NetnsError for any other failure)."""
    p = run(ns, IP, "-j", "-s", "-d", "link", "show", "dev", ifname, check=False, timeout=10)
    if p.returncode != 0:
        if "does not exist" in p.stderr:
            return None
        raise NetnsError(f"ip link show dev {ifname} in {ns} failed ({p.returncode}): "
                         f"{p.stderr.strip()}")
    return json.loads(p.stdout)[0]


def link_state(ns: str | None, ifname: str) -> LinkState:
    """``ifname`` in ``ns``: existence, flags, MTU and packet/byte/drop counters."""
    j = link_json(ns, ifname)
    if j is None:
        return LinkState(ifname)
    st = j.get("stats64") or j.get("stats") or {}
    rx, tx = st.get("rx", {}), st.get("tx", {})
    return LinkState(ifname, True, tuple(j.get("flags", ())), int(j.get("mtu", 0)),
                     int(rx.get("packets", 0)), int(rx.get("bytes", 0)),
                     int(rx.get("dropped", 0)), int(tx.get("packets", 0)),
                     int(tx.get("bytes", 0)), int(tx.get("dropped", 0)), j)


def wait_link(ns: str | None, ifname: str, *, running: bool = False, timeout: float = 10.0,
              interval: float = 0.05, check: Callable[[], object] | None = None
              ) -> LinkState | None:
    """Poll (bounded) until ``ifname`` exists in ``ns`` (and, with ``running``, is up with
    carrier); its LinkState, or None on timeout.  ``check()`` is called before every poll
    (e.g. to assert that the process creating the interface is still alive)."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        st = link_state(ns, ifname)
        if st.exists and (st.running or not running):
            return st
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def link_text(ns: str | None, ifname: str) -> str:
    """``ip -d -s link show dev IFNAME`` inside ``ns``, for diagnostics (never raises)."""
    try:
        p = run(ns, IP, "-d", "-s", "link", "show", "dev", ifname, check=False, timeout=10)
        return (p.stdout + p.stderr).strip()
    except Exception as e:  # noqa: BLE001
        return f"(ip link show failed: {e})"


def set_up(ns: str | None, ifname: str) -> None:
    run(ns, IP, "link", "set", "dev", ifname, "up")


def add_addr(ns: str | None, ifname: str, cidr: str) -> None:
    run(ns, IP, "addr", "add", cidr, "dev", ifname)


def add_tap(ns: str | None, ifname: str, multi_queue: bool = False) -> None:
    """A persistent tap ``ifname`` in ``ns`` (goes with the namespace)."""
    run(ns, IP, "tuntap", "add", "dev", ifname, "mode", "tap",
        *(["multi_queue"] if multi_queue else []))


def disable_ipv6(ns: str | None) -> None:
    """IPv6 off for every interface of ``ns`` (existing and future)."""
    run(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1")
