"""guest.py: the end-to-end guest harness: boot a real Linux guest under QEMU (TCG) against a vhost-user backend.

This module owns everything the e2e tests need to run a script inside a VM:

- locating the host's Debian guest kernel (``/boot/vmlinuz-*``) and its modules dir;
- building, once per process and without the ``cpio`` tool, a *base* initramfs in the newc cpio
  format: a static busybox with applet symlinks, the virtio modules (decompressed if the kernel
  ships them compressed, skipped if built in) and an ``/init`` that loads them, waits for
  ``/dev/vda`` when a block device is expected, runs ``/test.sh`` and powers off;
- ``run_guest(script, devices=[...])``: appends a second small newc archive holding ``/test.sh``
  (plus any ``extra_files={guest_path: host_path}``) to the base one, boots QEMU with shared
  (memfd) guest RAM, and returns the serial console text, the script's exit code and its
  ``KEY=VALUE`` lines (``GuestResult``); QEMU is always killed on timeout and on any error;
  ``on_start(proc, console_path)`` lets a caller watch the running guest (e.g. sample host CPU);
- ``binary_with_libs("/usr/bin/fio")``: the ``extra_files`` that let a dynamically linked host
  program run in the guest (the binary, every library ``ldd`` lists, the dynamic loader);
- context managers for the blk backends under test: ``qsd_blk`` (qemu-storage-daemon, the C
  reference) and ``pyvhost_blk`` (our ``python -m vhost.programs pyvhost-blk``); both wait for the socket and stop
  the process at the end, leaving nothing behind;
- networking: ``netns()`` (a throw-away ``pvh-<random>`` network namespace), ``host_tap``,
  ``wait_link``, ``netns_exec`` (a command prefix, e.g. ``run_guest(..., qemu_prefix=...)`` to
  run QEMU where its tap lives), all thin wrappers over ``vhost/testing/netns.py`` (which also works in
  a chroot where ``ip netns exec`` cannot remount /sys); QEMU argument builders
  ``tap_net_args`` (QEMU's own tap backend) and ``vhost_user_net_args`` (INTx: ``vectors=0``,
  see ARCHITECTURE.md); and
  ``NET_SCRIPT_HELPERS``, busybox shell functions for guest scripts (``net_up``, ``wait_ping``,
  ``ping_check``, ``if_stats``, timing). The net backend itself is in ``vhost/testing/netbackends.py``.

Must not: know about a particular test (tests/e2e/ and bench/guest.py use it); import tests,
devices, vhost.server, vhost.service or vhost.config.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import glob
import gzip
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from vhost.testing import netns as nsh
from vhost.testing.backends import (  # noqa: F401  (re-exported for the e2e tests)
    Backend, BackendError, blk_backend, pyvhost_blk, qsd_blk, short_tmpdir)

REPO_ROOT = Path(__file__).resolve().parents[2]

QEMU = "qemu-system-x86_64"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

#: virtio modules in load order (names as in modules.dep, '-' and '_' are equivalent).
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_rng",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
)

#: printed by /init after /test.sh: ``@@PYVHOST-GUEST-END rc=<n>@@``
END_MARKER_RE = re.compile(r"@@PYVHOST-GUEST-END rc=(\d+)@@")
KV_RE = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*?)\s*$")

BLK_WAIT_SECONDS = 20


class GuestError(RuntimeError):
    """The guest did not produce a result (QEMU failed to start, crashed, or the guest never
    reached the end marker). The message carries QEMU's stderr and the console tail."""


class GuestTimeout(GuestError):
    """The guest did not finish within the timeout; QEMU was killed."""


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# kernel, modules, busybox discovery


@dataclasses.dataclass(frozen=True)
class Kernel:
    version: str
    image: Path
    modules_dir: Path


def _version_key(v: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", v)]


def find_kernel() -> Kernel:
    """The newest /boot/vmlinuz-<ver> that has a /lib/modules/<ver> dir (overridable with
    $PYVHOST_E2E_KERNEL, $PYVHOST_E2E_MODULES)."""
    env_k, env_m = os.environ.get("PYVHOST_E2E_KERNEL"), os.environ.get("PYVHOST_E2E_MODULES")
    if env_k and env_m:
        return Kernel(Path(env_m).name, Path(env_k), Path(env_m))
    found = []
    for image in glob.glob("/boot/vmlinuz-*"):
        ver = image[len("/boot/vmlinuz-"):]
        mdir = Path("/lib/modules") / ver
        if (mdir / "modules.dep").is_file() and os.access(image, os.R_OK):
            found.append((ver, Path(image), mdir))
    if not found:
        raise FileNotFoundError(
            "no readable /boot/vmlinuz-<ver> with /lib/modules/<ver>/modules.dep "
            "(install linux-image-amd64)"
        )
    ver, image, mdir = max(found, key=lambda t: _version_key(t[0]))
    return Kernel(ver, image, mdir)


def find_busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.is_file():
            with open(p, "rb") as f:
                data = f.read()
            # a dynamically linked ELF has a PT_INTERP naming the loader
            if b"/lib64/ld-linux" in data or b"/lib/ld-linux" in data:
                continue
            return p.resolve()
    raise FileNotFoundError("no static busybox found (install busybox-static)")


def _norm_mod(name: str) -> str:
    return name.replace("-", "_")


def _decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        try:
            from compression import zstd  # Python >= 3.14

            return zstd.decompress(data)
        except ImportError:
            pass
        try:
            import zstandard  # type: ignore

            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except ImportError:
            pass
        if shutil.which("zstd"):
            return subprocess.run(
                ["zstd", "-dc"], input=data, stdout=subprocess.PIPE, check=True
            ).stdout
        raise RuntimeError(f"{path}: zstd-compressed module and no zstd decompressor available")
    raise RuntimeError(f"{path}: unknown module compression")


def resolve_modules(kernel: Kernel, names: Sequence[str] = VIRTIO_MODULES) -> list[tuple[str, Path]]:
    """[(name, path)] in the given order for the modules that are not built in."""
    builtin: set[str] = set()
    bfile = kernel.modules_dir / "modules.builtin"
    if bfile.is_file():
        for line in bfile.read_text().splitlines():
            base = line.strip().rsplit("/", 1)[-1]
            if base:
                builtin.add(_norm_mod(re.sub(r"\.ko(\..*)?$", "", base)))
    by_name: dict[str, Path] = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        rel = line.split(":", 1)[0].strip()
        if not rel:
            continue
        base = _norm_mod(re.sub(r"\.ko(\..*)?$", "", rel.rsplit("/", 1)[-1]))
        by_name.setdefault(base, kernel.modules_dir / rel)
    out = []
    for n in names:
        key = _norm_mod(n)
        if key in builtin:
            continue
        path = by_name.get(key)
        if path is None or not path.exists():
            hits = [p for p in kernel.modules_dir.rglob("*.ko*")
                    if _norm_mod(re.sub(r"\.ko(\..*)?$", "", p.name)) == key]
            if not hits:
                raise FileNotFoundError(f"module {n} neither built in nor found in {kernel.modules_dir}")
            path = hits[0]
        out.append((key, path))
    return out


# --------------------------------------------------------------------------------------------
# newc cpio writer


class NewcWriter:
    """Minimal writer of the SVR4 "newc" cpio format (magic 070701), as the kernel's initramfs
    unpacker reads it. Archives can be concatenated; the kernel unpacks them in sequence."""

    def __init__(self, ino_base: int = 1) -> None:
        self._buf = io.BytesIO()
        self._ino = ino_base
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        assert not self._closed
        name_b = name.lstrip("/").encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0,
        )
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        w = self._buf.write
        w(hdr)
        w(name_b)
        w(b"\0" * (-(len(hdr) + len(name_b)) % 4))
        w(data)
        w(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        if not self._closed:
            self._entry("TRAILER!!!", 0, nlink=1)
            self._closed = True
            # pad the archive to a 512-byte multiple, as cpio(1) does
            pad = -self._buf.tell() % 512
            self._buf.write(b"\0" * pad)
        return self._buf.getvalue()


# --------------------------------------------------------------------------------------------
# initramfs

INIT_SCRIPT = r"""#!/bin/busybox sh
# pyvhost e2e guest init (generated by vhost/testing/guest.py)
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mount -t tmpfs tmpfs /tmp
export PATH=/bin HOME=/ TERM=dumb
exec </dev/console >/dev/console 2>&1

for m in $(cat /etc/pyvhost-modules); do
    insmod /lib/modules/$m.ko || echo "pyvhost-init: insmod $m failed"
done

wait_dev=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        pyvhost_wait=*) wait_dev="${arg#pyvhost_wait=}" ;;
    esac
done
if [ -n "$wait_dev" ]; then
    i=0
    while [ ! -b "/dev/$wait_dev" ] && [ $i -lt @WAIT_TICKS@ ]; do
        usleep 100000
        i=$((i + 1))
    done
    if [ -b "/dev/$wait_dev" ]; then
        echo "pyvhost-init: /dev/$wait_dev present after $i ticks"
    else
        echo "pyvhost-init: /dev/$wait_dev did NOT appear within @WAIT_SECONDS@ s"
    fi
fi

echo "@@PYVHOST-GUEST-START@@"
sh /test.sh
rc=$?
sync
echo "@@PYVHOST-GUEST-END rc=$rc@@"
poweroff -f
"""


def _busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], stdout=subprocess.PIPE, text=True, check=True)
    return [a for a in out.stdout.split() if a and "/" not in a]


@dataclasses.dataclass(frozen=True)
class BaseInitramfs:
    path: Path
    kernel: Kernel
    modules: tuple[tuple[str, str], ...]  # (name, source path) actually packed
    compression: tuple[str, ...]  # compression of the source .ko files seen (e.g. ("none",))


def build_base_initramfs(out: Path, kernel: Kernel | None = None) -> BaseInitramfs:
    kernel = kernel or find_kernel()
    busybox = find_busybox()
    w = NewcWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "root"):
        w.dir(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        if applet != "busybox":
            w.symlink(f"bin/{applet}", "busybox")
    mods = resolve_modules(kernel)
    comp = set()
    for name, path in mods:
        comp.add(path.name.split(".ko", 1)[1].lstrip(".") or "none")
        w.file(f"lib/modules/{name}.ko", _decompress_module(path), 0o644)
    w.file("etc/pyvhost-modules", "".join(f"{n}\n" for n, _ in mods).encode())
    init = INIT_SCRIPT.replace("@WAIT_TICKS@", str(BLK_WAIT_SECONDS * 10)).replace(
        "@WAIT_SECONDS@", str(BLK_WAIT_SECONDS))
    w.file("init", init.encode(), 0o755)
    out.write_bytes(w.finish())
    return BaseInitramfs(out, kernel, tuple((n, str(p)) for n, p in mods), tuple(sorted(comp)))


_WORKDIR: Path | None = None


def _workdir() -> Path:
    """A per-process scratch dir (removed at exit) for the cached base initramfs and per-boot
    files."""
    global _WORKDIR
    if _WORKDIR is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="pyvhost-e2e-"))
        atexit.register(shutil.rmtree, _WORKDIR, True)
    return _WORKDIR


@functools.lru_cache(maxsize=None)
def base_initramfs() -> BaseInitramfs:
    """The base initramfs, built on first use and cached for the rest of the process (= pytest
    session)."""
    return build_base_initramfs(_workdir() / "base-initramfs.cpio")


def _guest_path(path: str) -> str:
    """Normalised guest path without the leading slash; refuses empty paths and ``..``."""
    parts = [p for p in str(path).split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad guest path {path!r}")
    return "/".join(parts)


def script_archive(script: str,
                   extra_files: Mapping[str, str | os.PathLike] | None = None) -> bytes:
    """The per-test newc archive holding /test.sh, to be concatenated after the base one.

    ``extra_files`` maps guest paths to host files (symlinks on the host are followed: the
    guest gets the file's content under the guest path, with the host file's permission bits).
    Missing parent directories are created (0755); a guest path the base archive already has
    is replaced."""
    w = NewcWriter(ino_base=1_000_000)
    w.file("test.sh", script.encode(), 0o755)
    files = {_guest_path(g): Path(h) for g, h in (extra_files or {}).items()}
    dirs = sorted({"/".join(g.split("/")[:i]) for g in files for i in range(1, g.count("/") + 1)},
                  key=lambda d: (d.count("/"), d))
    for d in dirs:
        w.dir(d)
    for gpath in sorted(files):
        host = files[gpath]
        st = os.stat(host)  # follows symlinks
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"extra file {host} (for /{gpath}) is not a regular file")
        w.file(gpath, host.read_bytes(), stat.S_IMODE(st.st_mode))
    return w.finish()


_LDD_LIB_RE = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_ABS_RE = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


@functools.lru_cache(maxsize=None)
def _ldd_deps(binary: str) -> tuple[tuple[str, str], ...]:
    out = subprocess.run(["ldd", binary], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=30)
    text = out.stdout + out.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return ()
    if out.returncode != 0:
        raise RuntimeError(f"ldd {binary} failed ({out.returncode}): {text.strip()}")
    deps: list[tuple[str, str]] = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            raise FileNotFoundError(f"{binary}: library missing on the host: {line.strip()}")
        m = _LDD_LIB_RE.match(line)
        if m:  # "libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)"
            deps.append((m.group(2), m.group(2)))
            continue
        m = _LDD_ABS_RE.match(line)  # the loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"
        if m:
            deps.append((m.group(1), m.group(1)))
        # anything else (linux-vdso.so.1, which has no file) is skipped
    return tuple(deps)


def binary_with_libs(binary: str | os.PathLike, guest_path: str | None = None
                     ) -> dict[str, Path]:
    """``extra_files`` entries that make a dynamically linked host program runnable in the
    guest: the binary itself (at ``guest_path``, default: its host path) and every shared
    library ``ldd`` lists plus the dynamic loader, each at the path ``ldd`` printed (which is
    where the loader looks for it: /lib/x86_64-linux-gnu, /usr/lib/x86_64-linux-gnu, a
    RUNPATH ...). A static binary yields just itself. Merge the dicts of several programs
    with ``|``. Raises FileNotFoundError when ldd cannot resolve a library."""
    binary = Path(binary)
    host = shutil.which(str(binary)) if not binary.is_absolute() else str(binary)
    if not host or not os.path.isfile(host):
        raise FileNotFoundError(f"{binary} not found")
    files = {guest_path or os.path.abspath(host): Path(host)}
    for gpath, hpath in _ldd_deps(os.path.realpath(host)):
        files.setdefault(gpath, Path(hpath))
    return files


def have_guest_tools() -> tuple[bool, str]:
    """(ok, reason) - whether QEMU, a kernel and a static busybox are present."""
    if not shutil.which(QEMU):
        return False, f"{QEMU} not installed"
    try:
        find_kernel()
        find_busybox()
    except FileNotFoundError as e:
        return False, str(e)
    return True, ""


# --------------------------------------------------------------------------------------------
# running a guest


@dataclasses.dataclass
class GuestResult:
    console: str  # full serial console text, \r\n normalised to \n
    exit_code: int  # exit status of /test.sh
    qemu_returncode: int
    duration: float  # wall seconds from QEMU start to exit
    command: list[str]
    qemu_stderr: str = ""

    @property
    def script_output(self) -> str:
        """Console text between the start and end markers (still interleaved with any kernel
        messages printed meanwhile)."""
        text = self.console
        start = text.find("@@PYVHOST-GUEST-START@@")
        if start >= 0:
            text = text[start + len("@@PYVHOST-GUEST-START@@"):]
        m = END_MARKER_RE.search(text)
        return text[: m.start()] if m else text

    def values(self) -> dict[str, str]:
        """``KEY=VALUE`` lines (KEY matching ``[A-Z][A-Z0-9_]*``) the script printed; the last
        occurrence of a key wins."""
        out: dict[str, str] = {}
        for line in self.script_output.splitlines():
            m = KV_RE.match(line.strip())
            if m:
                out[m.group(1)] = m.group(2)
        return out

    def value(self, key: str) -> str:
        vals = self.values()
        if key not in vals:
            raise KeyError(f"guest did not print {key}=...; console tail:\n{self.tail()}")
        return vals[key]

    def tail(self, lines: int = 60) -> str:
        return tail(self.console, lines)

    def check(self) -> "GuestResult":
        """Raise AssertionError with the console tail unless the script exited 0."""
        if self.exit_code != 0:
            raise AssertionError(
                f"guest script exited {self.exit_code}; console tail:\n{self.tail()}")
        return self


def _wants_blk(devices: Sequence[str]) -> bool:
    return any(("vhost-user-blk" in a or "virtio-blk" in a) for a in devices)


def qemu_command(kernel: Path, initrd: Path, console_path: Path, *, devices: Sequence[str],
                 mem: str, cpus: int, append: str, prefix: Sequence[str] = ()) -> list[str]:
    return [
        *prefix, QEMU, "-accel", "tcg", "-machine", "q35", "-smp", str(cpus),
        "-m", mem,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-machine", "memory-backend=mem",
        "-nographic", "-no-reboot", "-monitor", "none", "-nodefaults", "-vga", "none",
        "-serial", f"file:{console_path}",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        *devices,
    ]


def run_guest(script: str, *, devices: Sequence[str] = (), mem: str = "256M",
              timeout: float = 180, cpus: int = 1, wait_blk: bool | None = None,
              extra_append: str = "", qemu_prefix: Sequence[str] = (),
              extra_files: Mapping[str, str | os.PathLike] | None = None,
              on_start: Callable[[subprocess.Popen, Path], object] | None = None
              ) -> GuestResult:
    """Boot the guest kernel with the base initramfs plus ``script`` as /test.sh.

    ``devices`` are extra QEMU arguments (chardevs, -device, -netdev ...). ``wait_blk`` makes
    /init wait up to 20 s for /dev/vda before running the script (default: when a
    vhost-user-blk / virtio-blk device is among ``devices``). ``qemu_prefix`` goes in front of
    the QEMU command (e.g. ``netns_exec(ns)`` to run QEMU inside a network namespace, where its
    tap lives). ``extra_files`` ({guest path: host path}, see ``binary_with_libs``) are added
    to the per-boot archive; they live in the guest's RAM, so size ``mem`` for them (the
    initrd and its unpacked copy coexist during boot: allow 2x their size plus ~100 MB).
    ``on_start(proc, console_path)`` is called once QEMU is running (``proc`` is its Popen,
    ``console_path`` the serial console file it appends to, deleted when this returns); if it
    raises, QEMU is killed. Returns a GuestResult; raises
    GuestTimeout (QEMU killed) or GuestError (no end marker, e.g. QEMU refused the devices).
    """
    base = base_initramfs()
    run_dir = Path(tempfile.mkdtemp(prefix="boot-", dir=_workdir()))
    try:
        initrd = run_dir / "initrd.cpio"
        with open(initrd, "wb") as f:
            f.write(base.path.read_bytes())
            f.write(script_archive(script, extra_files))
        console_path = run_dir / "console.log"
        console_path.touch()
        if wait_blk is None:
            wait_blk = _wants_blk(devices)
        append = "console=ttyS0 quiet panic=-1"
        if wait_blk:
            append += " pyvhost_wait=vda"
        if extra_append:
            append += " " + extra_append
        cmd = qemu_command(base.kernel.image, initrd, console_path, devices=devices, mem=mem,
                           cpus=cpus, append=append, prefix=qemu_prefix)
        stderr_path = run_dir / "qemu.stderr"

        def console() -> str:
            return console_path.read_bytes().decode(errors="replace").replace("\r\n", "\n")

        def stderr_text() -> str:
            try:
                return stderr_path.read_text(errors="replace")
            except FileNotFoundError:
                return ""

        t0 = time.monotonic()
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    close_fds=True)
        try:
            if on_start is not None:
                on_start(proc, console_path)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise GuestTimeout(
                    f"guest did not finish within {timeout} s (QEMU killed)\n"
                    f"QEMU stderr:\n{tail(stderr_text(), 20)}\ncommand: {' '.join(cmd)}\n"
                    f"console tail:\n{tail(console())}") from None
        finally:
            if proc.poll() is None:  # e.g. KeyboardInterrupt while waiting
                proc.kill()
                proc.wait()
        duration = time.monotonic() - t0
        text = console()
        m = END_MARKER_RE.search(text)
        if not m:
            raise GuestError(
                f"guest ended (QEMU exit {proc.returncode}) without the end marker\n"
                f"QEMU stderr:\n{tail(stderr_text(), 20)}\ncommand: {' '.join(cmd)}\n"
                f"console tail:\n{tail(text)}")
        return GuestResult(text, int(m.group(1)), proc.returncode, duration, cmd, stderr_text())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def blk_device_args(sock: str | os.PathLike, num_queues: int = 1, idx: int = 0,
                    extra: str = "", server: bool = False,
                    reconnect: int | None = None) -> list[str]:
    """QEMU args attaching a vhost-user-blk-pci device to the backend listening on ``sock``
    (``server``: QEMU listens there, for a backend in client mode, and takes it back whenever
    it reconnects; ``reconnect``: QEMU re-dials a backend that went away after that many
    seconds, libvirt's ``<reconnect enabled='yes' timeout='N'/>``)."""
    dev = f"vhost-user-blk-pci,chardev=blkc{idx},num-queues={num_queues}"
    if extra:
        dev += "," + extra
    chardev = f"socket,id=blkc{idx},path={sock}" + (",server=on,wait=off" if server else "")
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    return ["-chardev", chardev, "-device", dev]




# --------------------------------------------------------------------------------------------
# networking: namespaces, taps, QEMU net devices, guest-side shell helpers

def netns_exec(ns: str) -> list[str]:
    """Command prefix running a program inside the network namespace ``ns``
    (``vhost.testing.netns.prefix``: ``ip netns exec NS`` or ``nsenter --net=/run/netns/NS``)."""
    return nsh.prefix(ns)


def have_netns() -> tuple[bool, str]:
    """(ok, reason) - whether this process may create network namespaces and taps (root with
    CAP_NET_ADMIN, iproute2, /dev/net/tun). Creates and deletes a probe namespace."""
    ok, why = nsh.available()
    if not ok:
        return False, why
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun missing"
    try:
        with netns() as ns:
            nsh.add_tap(ns, "pvhprobe")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot create a namespace with a tap: {e}"
    return True, ""


def netns(prefix: str = "pvh-") -> contextlib.AbstractContextManager[str]:
    """A fresh network namespace ``pvh-<random>`` with ``lo`` up; deleted at the end, after
    killing (by pid) any process still running inside it (all of them were started in it by
    the caller, as the namespace did not exist before). See ``vhost.testing.netns.namespace``."""
    return nsh.namespace(prefix)


def wait_link(ns: str | None, ifname: str, timeout: float = 10.0) -> bool:
    """Wait (bounded) until interface ``ifname`` exists (in namespace ``ns``)."""
    return nsh.wait_link(ns, ifname, timeout=timeout) is not None


def host_tap(ns: str, ifname: str, addr: str, create: bool = True,
             multi_queue: bool = False) -> None:
    """In namespace ``ns``: create tap ``ifname`` (persistent, unless ``create=False``: it must
    exist already, e.g. made by a backend), give it ``addr`` (CIDR) and bring it up."""
    if create:
        nsh.add_tap(ns, ifname, multi_queue=multi_queue)
    nsh.add_addr(ns, ifname, addr)
    nsh.set_up(ns, ifname)


def link_info(ns: str | None, ifname: str) -> str:
    """``ip -d -s link show`` of an interface, for diagnostics (never raises)."""
    return nsh.link_text(ns, ifname)


def mac_address(idx: int) -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 range, distinct per ``idx``
    (every QEMU would otherwise default to 52:54:00:12:34:56)."""
    return "52:54:00:c0:%02x:%02x" % ((idx >> 8) & 0xFF, idx & 0xFF)


def tap_net_args(tap: str, idx: int = 0, mac: str | None = None, extra: str = "") -> list[str]:
    """QEMU args for a virtio-net-pci device on QEMU's own tap backend (no vhost); QEMU must
    run in the namespace holding ``tap`` (``run_guest(..., qemu_prefix=netns_exec(ns))``)."""
    dev = f"virtio-net-pci,netdev=n{idx},mac={mac or mac_address(idx)}"
    if extra:
        dev += "," + extra
    return ["-netdev", f"tap,id=n{idx},ifname={tap},script=no,downscript=no",
            "-device", dev]


def vhost_user_net_args(sock: str | os.PathLike, idx: int = 0, queues: int = 1,
                        mac: str | None = None, extra: str = "") -> list[str]:
    """QEMU args attaching a virtio-net-pci device to the vhost-user-net backend on ``sock``.

    ``vectors=0`` (INTx): QEMU 7.2 under TCG segfaults in vhost_net_start /
    msix_set_vector_notifiers when a vhost-user net device uses MSI-X (see ARCHITECTURE.md).
    ``queues > 1`` adds ``queues=N`` to the netdev and ``mq=on`` to the device."""
    netdev = f"vhost-user,id=n{idx},chardev=netc{idx}"
    dev = f"virtio-net-pci,netdev=n{idx},vectors=0,mac={mac or mac_address(idx)}"
    if queues > 1:
        netdev += f",queues={queues}"
        dev += ",mq=on"
    if extra:
        dev += "," + extra
    return ["-chardev", f"socket,id=netc{idx},path={sock}", "-netdev", netdev, "-device", dev]


#: busybox-ash helpers for guest network scripts. Define ``ADDR`` (CIDR) before use, or call
#: ``net_up ADDR``. All loops are bounded.
NET_SCRIPT_HELPERS = r"""
now_ns() {  # monotonic ns from /proc/timer_list (busybox date has no %N), else /proc/uptime
    t=$(awk '/^now at/ {print $3; exit}' /proc/timer_list 2>/dev/null)
    if [ -z "$t" ]; then t=$(awk '{printf "%.0f", $1 * 1e9}' /proc/uptime); fi
    echo "$t"
}
mibps() {  # MiB t0_ns t1_ns
    awk -v m="$1" -v a="$2" -v b="$3" 'BEGIN { s = (b - a) / 1e9; if (s <= 0) s = 1e-9; printf "%.2f", m / s }'
}
secs() {  # t0_ns t1_ns
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'
}
sha_of() { sha256sum | cut -d' ' -f1; }
net_up() {  # CIDR [ifname]: wait (<= 10 s) for the interface, bring lo and it up, add CIDR
    ifc=${2:-eth0}
    i=0
    while [ ! -e /sys/class/net/$ifc ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
    [ -e /sys/class/net/$ifc ] || { echo "net_up: $ifc did not appear"; ls /sys/class/net; return 1; }
    ip link set lo up
    ip link set $ifc up || return 1
    ip addr add $1 dev $ifc || return 1
    i=0
    while [ "$(cat /sys/class/net/$ifc/carrier 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
    echo "NET_IF=$ifc"
    echo "NET_MAC=$(cat /sys/class/net/$ifc/address)"
    echo "NET_CARRIER=$(cat /sys/class/net/$ifc/carrier 2>/dev/null)"
    echo "NET_RXQ=$(ls /sys/class/net/$ifc/queues | grep -c '^rx-')"
    echo "NET_TXQ=$(ls /sys/class/net/$ifc/queues | grep -c '^tx-')"
    echo "NET_QUEUES=$(ls /sys/class/net/$ifc/queues | tr '\n' ' ')"
}
wait_ping() {  # HOST TRIES: one ping a try (<= 1 s each) until one answers
    n=0
    while [ $n -lt $2 ]; do
        n=$((n + 1))
        if ping -c 1 -W 1 $1 >/dev/null 2>&1; then echo "WAIT_PING_TRIES=$n"; return 0; fi
    done
    echo "WAIT_PING_TRIES=$n"
    return 1
}
ping_check() {  # PREFIX HOST COUNT: COUNT pings 20/s, prints PREFIX_TX/_RX/_LOSS/_RC and rtt
    ping -q -c $3 -i 0.05 -W 5 $2 > /tmp/ping.out 2>&1
    echo "${1}_RC=$?"
    awk -v p="$1" '/packets transmitted/ { print p "_TX=" $1; print p "_RX=" $4;
            for (i = 1; i <= NF; i++) if ($i ~ /%$/) { sub(/%/, "", $i); print p "_LOSS=" $i } }
        /^round-trip/ { print p "_RTT_MS=" $4 }' /tmp/ping.out
}
if_stats() {  # PREFIX [ifname]
    for k in rx_packets tx_packets rx_bytes tx_bytes rx_errors tx_errors rx_dropped tx_dropped; do
        echo "${1}_$(echo $k | tr a-z A-Z)=$(cat /sys/class/net/${2:-eth0}/statistics/$k)"
    done
}
"""
