"""config.py: the `pyvhost serve` configuration file (TOML) -> validated, immutable specs.

Everything is checked before anything starts: unknown keys, wrong types, out-of-range values,
duplicate names, sockets and taps, a missing image (unless `size` asks to create it), a socket
directory that does not exist.  Every problem is a `ConfigError` whose one-line message names the
file, the device and the problem, e.g. `/etc/pyvhost/pyvhost.toml: device "vda": blk-file
/var/lib/pyvhost/vda.img does not exist (set size to create it)`.

Keys mirror the programs' command-line options (pyvhost-blk, pyvhost-net) so a working command
line translates one to one.  Owns parsing and validation only: opens no image, tap or socket.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields

from . import cli

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# systemd's FileDescriptorName= (LISTEN_FDNAMES) allows up to 255 characters without ':';
# device names are matched against it, so they stay in that alphabet (and are metric labels).
MAX_QUEUES_BLK = 256            # as pyvhost-blk --num-queues
MAX_PAIRS_NET = 16              # as pyvhost-net --queues (cython_ext/net.pyx MAX_PAIRS)
MAX_SWITCH_PORTS = 64           # cython_ext/net.pyx MAX_PORTS (uplink included)
MAX_SOCKET_PATH = 107           # sun_path is 108 bytes with the NUL


class ConfigError(Exception):
    """An invalid configuration; str() is the one line to print."""


@dataclass(frozen=True)
class ServiceSpec:
    metrics_address: str | None = None
    log_level: str = "info"
    # Group and mode given to every socket we bind (not to socket-activated ones: the .socket
    # unit sets those).  QEMU under libvirt runs as libvirt-qemu, a member of group kvm on Debian.
    socket_group: str | None = None
    socket_mode: int = 0o600
    # SIGTERM: how long to wait for in-flight I/O of each queue before exiting anyway
    stop_timeout: float = 10.0
    loop: str | None = None


@dataclass(frozen=True)
class BlockSpec:
    name: str
    socket: str
    blk_file: str | None = None
    read_only: bool = False
    num_queues: int = 1
    queue_size: int = 1024
    size: int | None = None
    serial: str | None = None
    buffered: bool = False
    no_io_uring: bool = False
    null: bool = False
    poll_us: float = 0.0
    type: str = "block"
    listen_fd: int | None = field(default=None, compare=False)   # CLI --fd only


@dataclass(frozen=True)
class NetSpec:
    name: str
    socket: str
    tap: str | None = None
    switch: str | None = None
    mac: str | None = None
    queues: int = 1
    mtu: int = 1500
    queue_size: int = 1024
    type: str = "net"
    listen_fd: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SwitchSpec:
    name: str
    tap: str | None = None          # uplink tap (created if missing)
    mac_ageing: float = 300.0
    mtu: int = 1500


@dataclass(frozen=True)
class Config:
    path: str | None                  # None: built from a command line, not a file
    service: ServiceSpec
    devices: tuple = ()
    switches: dict = field(default_factory=dict)    # name -> SwitchSpec (implicit ones too)

    def device(self, name: str):
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)


def _key(name: str) -> str:
    return name.replace("_", "-")


_SERVICE_KEYS = {"metrics-address", "log-level", "socket-group", "socket-mode", "stop-timeout",
                 "loop"}


class _Checker:
    def __init__(self, path: str, check_files: bool):
        self.path = path
        self.check_files = check_files

    def fail(self, where: str, problem: str):
        raise ConfigError(f"{self.path}: {where}{': ' if where else ''}{problem}")

    def take(self, table: dict, where: str, key: str, kind, default=None):
        if key not in table:
            return default
        value = table[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names = {str: "a string", int: "an integer", bool: "true or false",
                     float: "a number"}
            self.fail(where, f"{key} must be {names.get(kind, kind.__name__)}, "
                             f"not {value!r}")
        return value

    def unknown(self, table: dict, allowed: set, where: str):
        extra = sorted(set(table) - allowed)
        if extra:
            self.fail(where, f"unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")

    def range(self, where, key, value, lo, hi):
        if value is not None and not lo <= value <= hi:
            self.fail(where, f"{key} must be {lo}..{hi}, not {value}")

    def pow2(self, where, key, value):
        if value & (value - 1) or not 1 <= value <= 32768:
            self.fail(where, f"{key} must be a power of two no larger than 32768, not {value}")

    def socket_path(self, where, value):
        if not value:
            self.fail(where, "socket is required")
        if not os.path.isabs(value):
            self.fail(where, f"socket must be an absolute path, not {value!r}")
        if len(value.encode()) > MAX_SOCKET_PATH:
            self.fail(where, f"socket path is longer than {MAX_SOCKET_PATH} bytes")
        if self.check_files and not os.path.isdir(os.path.dirname(value)):
            self.fail(where, f"socket directory {os.path.dirname(value)} does not exist")


def _service(c: _Checker, table) -> ServiceSpec:
    if not isinstance(table, dict):
        c.fail("", "[service] must be a table")
    where = "[service]"
    c.unknown(table, _SERVICE_KEYS, where)
    addr = c.take(table, where, "metrics-address", str)
    if addr is not None:
        from .metrics import parse_address
        try:
            parse_address(addr)
        except ValueError as e:
            c.fail(where, str(e))
    level = c.take(table, where, "log-level", str, "info")
    if level not in ("debug", "info", "warning", "error"):
        c.fail(where, f"log-level must be debug, info, warning or error, not {level!r}")
    group = c.take(table, where, "socket-group", str)
    if group is not None and c.check_files:
        import grp
        try:
            grp.getgrnam(group)
        except KeyError:
            c.fail(where, f"socket-group {group!r}: no such group")
    mode_text = c.take(table, where, "socket-mode", str, "0600")
    try:
        mode = int(mode_text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        c.fail(where, f"socket-mode must be an octal string like \"0660\" that leaves the owner "
                      f"rw, not {mode_text!r}")
    stop_timeout = c.take(table, where, "stop-timeout", float, 10.0)
    if not 0 < stop_timeout <= 3600:
        c.fail(where, f"stop-timeout must be 0..3600 seconds, not {stop_timeout}")
    loop = c.take(table, where, "loop", str)
    if loop not in (None, "uvloop", "asyncio"):
        c.fail(where, f"loop must be uvloop or asyncio, not {loop!r}")
    return ServiceSpec(metrics_address=addr, log_level=level, socket_group=group,
                       socket_mode=mode, stop_timeout=stop_timeout, loop=loop)


_BLOCK_KEYS = {"name", "type", "socket", "blk-file", "read-only", "num-queues", "queue-size",
               "size", "serial", "buffered", "no-io-uring", "null", "poll-us"}
_NET_KEYS = {"name", "type", "socket", "tap", "switch", "mac", "queues", "mtu", "queue-size"}
_SWITCH_KEYS = {"name", "tap", "mac-ageing", "mtu"}


def _size(c, where, table):
    v = table.get("size")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        c.fail(where, f"size must be a number of bytes or a string like \"1G\", not {v!r}")
    try:
        return cli.parse_size(str(v))
    except Exception as e:          # argparse.ArgumentTypeError
        c.fail(where, str(e))


def _block(c: _Checker, t: dict, where: str) -> BlockSpec:
    c.unknown(t, _BLOCK_KEYS, where)
    s = BlockSpec(
        name=t["name"], socket=c.take(t, where, "socket", str),
        blk_file=c.take(t, where, "blk-file", str),
        read_only=c.take(t, where, "read-only", bool, False),
        num_queues=c.take(t, where, "num-queues", int, 1),
        queue_size=c.take(t, where, "queue-size", int, 1024),
        size=_size(c, where, t), serial=c.take(t, where, "serial", str),
        buffered=c.take(t, where, "buffered", bool, False),
        no_io_uring=c.take(t, where, "no-io-uring", bool, False),
        null=c.take(t, where, "null", bool, False),
        poll_us=c.take(t, where, "poll-us", float, 0.0))
    c.socket_path(where, s.socket)
    c.range(where, "num-queues", s.num_queues, 1, MAX_QUEUES_BLK)
    c.pow2(where, "queue-size", s.queue_size)
    c.range(where, "poll-us", s.poll_us, 0, 1e6)
    if s.serial is not None and len(s.serial.encode()) > 20:
        c.fail(where, "serial is at most 20 bytes")
    if s.null:
        if s.blk_file or not s.size:
            c.fail(where, "null takes size and no blk-file")
        return s
    if not s.blk_file:
        c.fail(where, "blk-file is required (or null = true with a size)")
    if not os.path.isabs(s.blk_file):
        c.fail(where, f"blk-file must be an absolute path, not {s.blk_file!r}")
    if c.check_files:
        if not os.path.exists(s.blk_file):
            if s.size is None:
                c.fail(where, f"blk-file {s.blk_file} does not exist (set size to create it)")
            if not os.path.isdir(os.path.dirname(s.blk_file)):
                c.fail(where, f"blk-file directory {os.path.dirname(s.blk_file)} does not exist")
        elif not os.access(s.blk_file, os.R_OK if s.read_only else os.R_OK | os.W_OK):
            c.fail(where, f"blk-file {s.blk_file} is not "
                          f"{'readable' if s.read_only else 'readable and writable'}")
    return s


def _tap_name(c, where, key, value):
    if value is not None and (not value or len(value.encode()) > 15 or "/" in value
                              or any(ch.isspace() for ch in value)):
        c.fail(where, f"{key} {value!r} is not a valid interface name (1..15 bytes)")


def _net(c: _Checker, t: dict, where: str) -> NetSpec:
    c.unknown(t, _NET_KEYS, where)
    s = NetSpec(name=t["name"], socket=c.take(t, where, "socket", str),
                tap=c.take(t, where, "tap", str), switch=c.take(t, where, "switch", str),
                mac=c.take(t, where, "mac", str), queues=c.take(t, where, "queues", int, 1),
                mtu=c.take(t, where, "mtu", int, 1500),
                queue_size=c.take(t, where, "queue-size", int, 1024))
    c.socket_path(where, s.socket)
    if (s.tap is None) == (s.switch is None):
        c.fail(where, "exactly one of tap and switch is required")
    _tap_name(c, where, "tap", s.tap)
    if s.switch is not None and not NAME_RE.match(s.switch):
        c.fail(where, f"switch name {s.switch!r} must match {NAME_RE.pattern}")
    c.range(where, "queues", s.queues, 1, MAX_PAIRS_NET)
    c.range(where, "mtu", s.mtu, 68, 65521)
    c.pow2(where, "queue-size", s.queue_size)
    if s.mac is not None:
        from devices.net import parse_mac
        try:
            parse_mac(s.mac)
        except ValueError as e:
            c.fail(where, str(e))
    return s


def _switch(c: _Checker, t: dict, where: str) -> SwitchSpec:
    c.unknown(t, _SWITCH_KEYS, where)
    s = SwitchSpec(name=t["name"], tap=c.take(t, where, "tap", str),
                   mac_ageing=c.take(t, where, "mac-ageing", float, 300.0),
                   mtu=c.take(t, where, "mtu", int, 1500))
    _tap_name(c, where, "tap", s.tap)
    if not s.mac_ageing > 0:
        c.fail(where, "mac-ageing must be positive")
    c.range(where, "mtu", s.mtu, 68, 65521)
    return s


def _named(c: _Checker, t, kind: str, index: int) -> str:
    if not isinstance(t, dict):
        c.fail("", f"[[{kind}]] entry {index + 1} must be a table")
    name = t.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        c.fail(f"{kind} {index + 1}", f"name must be a string matching {NAME_RE.pattern}, "
                                      f"not {name!r}")
    return name


def parse(data: dict, path: str = "<config>", check_files: bool = True) -> Config:
    """Validate an already-decoded TOML document."""
    c = _Checker(path, check_files)
    c.unknown(data, {"service", "device", "switch"}, "")
    service = _service(c, data.get("service", {}))
    raw_devices = data.get("device", [])
    raw_switches = data.get("switch", [])
    if not isinstance(raw_devices, list) or not isinstance(raw_switches, list):
        c.fail("", "devices and switches are arrays of tables: [[device]], [[switch]]")
    switches: dict[str, SwitchSpec] = {}
    for i, t in enumerate(raw_switches):
        name = _named(c, t, "switch", i)
        if name in switches:
            c.fail(f"switch \"{name}\"", "duplicate switch name")
        switches[name] = _switch(c, t, f"switch \"{name}\"")
    devices = []
    names, sockets, taps = set(), {}, {}
    for s in switches.values():
        if s.tap:
            taps[s.tap] = f"switch \"{s.name}\""
    for i, t in enumerate(raw_devices):
        name = _named(c, t, "device", i)
        where = f"device \"{name}\""
        if name in names:
            c.fail(where, "duplicate device name")
        names.add(name)
        kind = t.get("type")
        if kind == "block":
            spec = _block(c, t, where)
        elif kind == "net":
            spec = _net(c, t, where)
        else:
            c.fail(where, f"type must be \"block\" or \"net\", not {kind!r}")
        real = os.path.realpath(spec.socket) if check_files else spec.socket
        if real in sockets:
            c.fail(where, f"socket {spec.socket} is already used by device \"{sockets[real]}\"")
        sockets[real] = name
        if spec.type == "net":
            if spec.tap:
                if spec.tap in taps:
                    c.fail(where, f"tap {spec.tap} is already used by {taps[spec.tap]}")
                taps[spec.tap] = where
            elif spec.switch not in switches:
                switches[spec.switch] = SwitchSpec(name=spec.switch)      # defaults
        devices.append(spec)
    for sw in switches.values():
        ports = sum(1 for d in devices if d.type == "net" and d.switch == sw.name)
        if ports + (1 if sw.tap else 0) > MAX_SWITCH_PORTS:
            c.fail(f"switch \"{sw.name}\"", f"more than {MAX_SWITCH_PORTS} ports")
    for d in devices:
        if d.type == "block" and d.blk_file:
            for other in devices:
                if other is not d and other.type == "block" and other.blk_file == d.blk_file \
                        and not (d.read_only and other.read_only):
                    c.fail(f"device \"{d.name}\"", f"blk-file {d.blk_file} is also used by "
                                                   f"device \"{other.name}\" (only read-only "
                                                   f"devices may share an image)")
    return Config(path=path, service=service, devices=tuple(devices), switches=switches)


def load(path: str, check_files: bool = True) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, path, check_files)


def spec_fields(spec) -> dict:
    """The spec as config keys (for logs and diffs)."""
    return {_key(f.name): getattr(spec, f.name) for f in fields(spec) if f.compare}
