"""End-to-end guest harness: boot a real Linux guest under QEMU (TCG) against a vhost-user backend.

This module owns everything the e2e tests need to run a script inside a VM:

- locating the host's Debian guest kernel (``/boot/vmlinuz-*``) and its modules dir;
- building, once per process and without the ``cpio`` tool, a *base* initramfs in the newc cpio
  format: a static busybox with applet symlinks, the virtio modules (decompressed if the kernel
  ships them compressed, skipped if built in) and an ``/init`` that loads them, waits for
  ``/dev/vda`` when a block device is expected, runs ``/test.sh`` and powers off;
- ``run_guest(script, devices=[...])``: appends a second small newc archive holding ``/test.sh``
  to the base one, boots QEMU with shared (memfd) guest RAM, and returns the serial console text,
  the script's exit code and its ``KEY=VALUE`` lines (``GuestResult``); QEMU is always killed on
  timeout and on any error;
- context managers for the blk backends under test: ``qsd_blk`` (qemu-storage-daemon, the C
  reference) and ``pyvhost_blk`` (our ``python -m devices.blk``); both wait for the socket and stop
  the process at the end, leaving nothing behind.

Nothing here knows about a particular test; ``test_*.py`` files in this folder use it.
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
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]

from tests.backends import (  # noqa: E402  (re-exported for the e2e tests)
    Backend, BackendError, blk_backend, pyvhost_blk, qsd_blk, short_tmpdir)

QEMU = "qemu-system-x86_64"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

#: virtio modules in load order (names as in modules.dep, '-' and '_' are equivalent).
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
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


def _tail(text: str, lines: int = 60) -> str:
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
# pyvhost e2e guest init (generated by tests/e2e/guest.py)
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


def script_archive(script: str) -> bytes:
    """The per-test newc archive holding /test.sh, to be concatenated after the base one."""
    w = NewcWriter(ino_base=1_000_000)
    w.file("test.sh", script.encode(), 0o755)
    return w.finish()


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
        return _tail(self.console, lines)

    def check(self) -> "GuestResult":
        """Raise AssertionError with the console tail unless the script exited 0."""
        if self.exit_code != 0:
            raise AssertionError(
                f"guest script exited {self.exit_code}; console tail:\n{self.tail()}")
        return self


def _wants_blk(devices: Sequence[str]) -> bool:
    return any(("vhost-user-blk" in a or "virtio-blk" in a) for a in devices)


def qemu_command(kernel: Path, initrd: Path, console_path: Path, *, devices: Sequence[str],
                 mem: str, cpus: int, append: str) -> list[str]:
    return [
        QEMU, "-accel", "tcg", "-machine", "q35", "-smp", str(cpus),
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
              extra_append: str = "") -> GuestResult:
    """Boot the guest kernel with the base initramfs plus ``script`` as /test.sh.

    ``devices`` are extra QEMU arguments (chardevs, -device, -netdev ...). ``wait_blk`` makes
    /init wait up to 20 s for /dev/vda before running the script (default: when a
    vhost-user-blk / virtio-blk device is among ``devices``). Returns a GuestResult; raises
    GuestTimeout (QEMU killed) or GuestError (no end marker, e.g. QEMU refused the devices).
    """
    base = base_initramfs()
    run_dir = Path(tempfile.mkdtemp(prefix="boot-", dir=_workdir()))
    try:
        initrd = run_dir / "initrd.cpio"
        with open(initrd, "wb") as f:
            f.write(base.path.read_bytes())
            f.write(script_archive(script))
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
                           cpus=cpus, append=append)
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
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise GuestTimeout(
                    f"guest did not finish within {timeout} s (QEMU killed)\n"
                    f"QEMU stderr:\n{_tail(stderr_text(), 20)}\ncommand: {' '.join(cmd)}\n"
                    f"console tail:\n{_tail(console())}") from None
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
                f"QEMU stderr:\n{_tail(stderr_text(), 20)}\ncommand: {' '.join(cmd)}\n"
                f"console tail:\n{_tail(text)}")
        return GuestResult(text, int(m.group(1)), proc.returncode, duration, cmd, stderr_text())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def blk_device_args(sock: str | os.PathLike, num_queues: int = 1, idx: int = 0,
                    extra: str = "") -> list[str]:
    """QEMU args attaching a vhost-user-blk-pci device to the backend listening on ``sock``."""
    dev = f"vhost-user-blk-pci,chardev=blkc{idx},num-queues={num_queues}"
    if extra:
        dev += "," + extra
    return ["-chardev", f"socket,id=blkc{idx},path={sock}", "-device", dev]


