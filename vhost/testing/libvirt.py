"""libvirt.py: libvirt driven the way an administrator does, for the libvirt end-to-end tests.

Owns: `Daemons` (virtlogd and libvirtd started by hand, as these machines run no systemd, and
stopped again if this process started them; a running libvirtd is used as it is), `virsh` (one
call of virsh on qemu:///system, bounded in time), `readme_domain` (the README's libvirt domain
XML made bootable here: the changes it makes are listed there and each must apply exactly once,
so the README cannot drift from what the tests start) and `Domain` (one domain: its console
file, markers on it, its state).
Must not: import tests, devices, vhost.server, vhost.service or vhost.config; hold test
assertions (a failure raises LibvirtError with what virsh said).
"""
from __future__ import annotations

import contextlib
import grp
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

URI = "qemu:///system"
VIRSH_TIMEOUT = 120.0          # s: the first domain start also probes QEMU (~60 s under TCG)
PIDFILES = {"libvirtd": Path("/run/libvirtd.pid"), "virtlogd": Path("/run/virtlogd.pid")}


class LibvirtError(RuntimeError):
    pass


def available() -> tuple[bool, str]:
    """(ok, reason): whether libvirtd, virtlogd and virsh are installed (Debian packages
    libvirt-daemon-system, libvirt-clients; .ci/install --test installs them)."""
    for prog in ("virsh", "libvirtd", "virtlogd"):
        if shutil.which(prog) is None and not os.path.exists(f"/usr/sbin/{prog}"):
            return False, f"{prog} is not installed (libvirt-daemon-system, libvirt-clients)"
    return True, ""


def virsh(*args: str, check: bool = True, timeout: float = VIRSH_TIMEOUT
          ) -> subprocess.CompletedProcess:
    r = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise LibvirtError(f"virsh {' '.join(args)}: exit {r.returncode}: "
                           f"{r.stderr.strip() or r.stdout.strip()}")
    return r


def _sbin(prog: str) -> str:
    return shutil.which(prog) or f"/usr/sbin/{prog}"


def _alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


# libvirtd's QEMU capability cache records whether KVM worked when it probed QEMU and drops the
# cache whenever /dev/kvm's usability for the QEMU user differs (qemu_capabilities.c
# virQEMUCapsIsValid: "KVM was enabled when probing ..., but it is not available now"). On a
# machine without udev, /dev/kvm is not the group kvm Debian's udev rules give it (here it is
# root:input 0660): libvirt-qemu cannot open it, every lookup re-probed QEMU, and each
# `virsh create` took ~70 s. So while the daemons run, /dev/kvm gets what udev would have
# given it (group kvm, 0660) and its own owner and mode back afterwards. A mount namespace
# hiding it instead does not work: libvirt moves /dev's submounts into each domain's /dev
# (EINVAL for a file), and in a chroot `unshare --propagation private` fails (/ is no mount).
KVM = "/dev/kvm"
# In a chroot (the fresh-machine CI check runs the tests in one) "/" is no mount point, and
# libvirt's per-domain mount namespace (qemu.conf `namespaces`, default ["mount"]) fails to
# start every domain ("Failed disable mount propagation out of the root filesystem: Invalid
# argument"). There, and only there, the libvirtd started here runs with `namespaces = []`
# appended to qemu.conf; the file is restored when the daemons stop.
QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def root_is_mount_point() -> bool:
    """Whether "/" is a mount point here (it is not in a chroot), as libvirt's namespace
    setup needs: a mount of /proc/self/mountinfo at "/"."""
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == "/" for line in f if len(line.split()) > 4)
    except OSError:
        return True


class Daemons:
    """virtlogd + libvirtd (QEMU as libvirt's default user, Debian: libvirt-qemu:kvm)."""

    def __init__(self, timeout: float = 60.0):
        self.started: list[str] = []
        self._kvm_restore: tuple[int, int] | None = None
        self._kvm_as_udev_would()
        self._conf_restore: str | None = None
        for prog in ("virtlogd", "libvirtd"):       # libvirtd hands QEMU's logs to virtlogd
            if _alive(PIDFILES[prog]) is None:
                if prog == "libvirtd" and not root_is_mount_point() and QEMU_CONF.exists():
                    self._conf_restore = QEMU_CONF.read_text()
                    QEMU_CONF.write_text(self._conf_restore + "\n# pyvhost tests, in a chroot:"
                                         "\nnamespaces = []\n")
                subprocess.run([_sbin(prog), "-d"], check=True, timeout=30,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                self.started.append(prog)
        deadline = time.monotonic() + timeout
        while True:
            r = virsh("version", check=False, timeout=30)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.close()
                raise LibvirtError(f"libvirtd does not answer: {r.stderr.strip()}")
            time.sleep(0.2)
        self.version = r.stdout

    def close(self) -> None:
        for prog in reversed(self.started):
            pid = _alive(PIDFILES[prog])
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _alive(PIDFILES[prog]) == pid and time.monotonic() < deadline:
                time.sleep(0.1)
        self.started = []
        if self._conf_restore is not None:
            with contextlib.suppress(OSError):
                QEMU_CONF.write_text(self._conf_restore)
            self._conf_restore = None
        if self._kvm_restore is not None:
            gid, mode = self._kvm_restore
            with contextlib.suppress(OSError):
                os.chown(KVM, -1, gid)
                os.chmod(KVM, mode)
            self._kvm_restore = None

    def _kvm_as_udev_would(self) -> None:
        try:
            st = os.stat(KVM)
            kvm_gid = grp.getgrnam("kvm").gr_gid
        except (OSError, KeyError):
            return                          # no /dev/kvm (or no kvm group): nothing to match
        if st.st_gid == kvm_gid and st.st_mode & 0o060 == 0o060:
            return
        self._kvm_restore = (st.st_gid, stat.S_IMODE(st.st_mode))
        os.chown(KVM, -1, kvm_gid)
        os.chmod(KVM, 0o660)


def replace_once(text: str, old: str, new: str, what: str) -> str:
    n = text.count(old)
    if n != 1:
        raise LibvirtError(f"README domain XML: {what}: {old!r} appears {n} times, expected 1")
    return text.replace(old, new)


def readme_domain(xml: str, *, name: str, sock_dir: Path, kernel: Path, initrd: Path,
                  cmdline: str, console: Path, vcpus: int | None = None,
                  queues: bool = True) -> str:
    """The README's domain XML with exactly these changes:

    - ``type='kvm'`` -> ``type='qemu'`` (TCG: no KVM on these machines; the README says the
      same for any host without /dev/kvm);
    - the socket directory ``/run/pyvhost/`` -> ``sock_dir``, ``<name>`` -> ``name``;
    - ``vcpus``: the ``<vcpu>`` count; ``queues=False`` drops the disk's ``queues='N'`` (QEMU
      then asks for one queue per vCPU);
    - direct kernel boot of the test guest (``<kernel>``, ``<initrd>``, ``<cmdline>`` in
      ``<os>``), its serial console appended to the file ``console``, and the domain destroyed
      when the guest powers off.
    Everything else (memory backing, features, the disk, the interface, the TCG override)
    is the README's, verbatim."""
    x = replace_once(xml, "<domain type='kvm'", "<domain type='qemu'", "the domain type")
    x = x.replace("/run/pyvhost/", f"{sock_dir}/")
    x = re.sub(r"<name>[^<]*</name>", f"<name>{name}</name>", x, count=1)
    if vcpus is not None:
        x = re.sub(r"<vcpu>\d+</vcpu>", f"<vcpu>{vcpus}</vcpu>", x, count=1)
    if not queues:
        x, n = re.subn(r"(<driver name='qemu' type='raw') queues='\d+'", r"\1", x, count=1)
        if n != 1:
            raise LibvirtError("README domain XML: no disk driver with queues='N'")
    x = replace_once(x, "</os>", f"  <kernel>{kernel}</kernel>\n    <initrd>{initrd}</initrd>\n"
                     f"    <cmdline>{cmdline}</cmdline>\n  </os>\n"
                     "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n"
                     "  <on_crash>destroy</on_crash>", "the end of <os>")
    x = replace_once(x, "</devices>",
                     f"  <serial type='file'>\n      <source path='{console}' append='on'/>\n"
                     "      <target port='0'/>\n    </serial>\n  </devices>",
                     "the end of <devices>")
    return x


class Domain:
    """One libvirt domain started from an XML file (transient: `virsh create`; persistent:
    `define()` then `start()`)."""

    def __init__(self, name: str, xml_path: Path, console: Path):
        self.name = name
        self.xml_path = xml_path
        self.console = console
        self.defined = False

    def create(self) -> None:
        virsh("create", str(self.xml_path))

    def define(self) -> None:
        virsh("define", str(self.xml_path))
        self.defined = True

    def start(self) -> None:
        virsh("start", self.name)

    def state(self) -> str:
        r = virsh("domstate", self.name, check=False, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else "gone"

    def text(self) -> str:
        try:
            return self.console.read_bytes().decode(errors="replace").replace("\r\n", "\n")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """The first match of `pattern` on the console after offset `start`; raises
        LibvirtError (with the console's tail) when the domain ends or time runs out first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text(), start)
            if m:
                return m
            gone = self.state() in ("gone", "shut off")
            if gone:                            # one last look: it may have printed and ended
                m = rx.search(self.text(), start)
                if m:
                    return m
            if gone or time.monotonic() > deadline:
                raise LibvirtError(f"{self.name}: no {pattern!r} on the console "
                                   f"({'domain ended' if gone else f'{timeout} s'}); tail:\n"
                                   + "\n".join(self.text().splitlines()[-40:]))
            time.sleep(0.2)

    def wait_state(self, state: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state() != state:
            if time.monotonic() > deadline:
                raise LibvirtError(f"{self.name}: state {self.state()!r}, not {state!r}")
            time.sleep(0.2)

    def close(self) -> None:
        """Destroy it if it runs, undefine it if it was defined (never raises)."""
        try:
            if self.state() not in ("gone", "shut off"):
                virsh("destroy", self.name, check=False)
            if self.defined:
                virsh("undefine", self.name, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def qemu_log(self) -> str:
        try:
            return Path(f"/var/log/libvirt/qemu/{self.name}.log").read_text(errors="replace")
        except OSError:
            return ""
