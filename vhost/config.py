"""config.py: the `pyvhost serve` configuration file (TOML) -> validated, immutable specs.

Everything is checked before anything starts: unknown keys, wrong types, out-of-range values,
duplicate names, sockets and taps, a missing image (unless `size` asks to create it), a socket
directory that does not exist.  Every problem is a `ConfigError` whose one-line message names the
file, the device and the problem, e.g. `/etc/pyvhost/pyvhost.toml: device "vda": blk-file
/var/lib/pyvhost/vda.img does not exist (set size to create it)`.

The [[device]] keys of each `type` are generated from that device type's option table
(vhost/devtype.py, devices.TYPES), the same table its program's command line comes from, so a
working command line translates one to one; tables a type owns (net's [[switch]]) likewise.
Cross-option and cross-device checks are the type's hooks.  Owns parsing and validation only:
opens no image, tap or socket, and loads no Cython extension.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields

import devices
from .devtype import BASE_KEYS, MAX_SOCKET_PATH, MODES, Names, Option, OptionProblem

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# systemd's FileDescriptorName= (LISTEN_FDNAMES) allows up to 255 characters without ':';
# device names are matched against it, so they stay in that alphabet (and are metric labels).


# Characters that would break the one line (or a terminal) when a value the file gave (a path, a
# tap name) is quoted in a problem text: written as escapes instead.
_NOT_ONE_LINE = {c: ascii(chr(c))[1:-1] for c in [*range(0x20), 0x7F, 0x85, 0x2028, 0x2029]}


class ConfigError(Exception):
    """An invalid configuration; str() is the one line to print (control characters quoted
    from the file are escaped)."""

    def __init__(self, text: str):
        super().__init__(str(text).translate(_NOT_ONE_LINE))


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
    # Per frontend connection (README "Security model"): guest memory mapped at once (0: twice
    # this host's RAM) and fds one message may carry.
    max_guest_memory: int = 0
    max_message_fds: int = 32
    # The control API (vhost/control.py): its socket, and whether devices added through it are
    # written to DROPIN_DIR beside the config file (read back at every start and reload)
    control_socket: str | None = None
    control_persist: bool = False


@dataclass(frozen=True)
class Config:
    path: str | None                  # None: built from a command line, not a file
    service: ServiceSpec
    devices: tuple = ()
    # the device types' own top-level tables, implicit entries included:
    # {table: {name: spec}}, e.g. {"switch": {"sw0": SwitchSpec(...)}} (net)
    tables: dict = field(default_factory=dict)

    def device(self, name: str):
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def tables_of(self, dtype) -> dict:
        """The tables `dtype` owns, as its DeviceEnv sees them."""
        return {t: self.tables.get(t, {}) for t in dtype.tables}


def _key(name: str) -> str:
    return name.replace("_", "-")


_GUEST_MEMORY = Option("max-guest-memory", "size")
def socket_access(group: str | None, mode_text: str | None,
                  check_group: bool = True) -> tuple[str | None, int]:
    """`socket-group` / `socket-mode` (the service's keys, and the single-device programs'
    --socket-group / --socket-mode) checked: (group, mode).  The mode is an octal string that
    leaves the owner rw (a socket its own service cannot use is a typo); not given, it is 0660
    with a group (the group is there to be let in, as virtiofsd's --socket-group does) and
    0600 without."""
    if mode_text is None:
        mode_text = "0660" if group is not None else "0600"
    if group is not None and check_group:
        import grp
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ValueError(f"socket-group {group!r}: no such group") from None
    try:
        mode = int(mode_text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        raise ValueError(f"socket-mode must be an octal string like \"0660\" that leaves the "
                         f"owner rw, not {mode_text!r}")
    return group, mode


_SERVICE_KEYS = {"metrics-address", "log-level", "socket-group", "socket-mode", "stop-timeout",
                 "loop", "max-guest-memory", "max-message-fds", "control-socket",
                 "control-persist"}
# Drop-ins beside the config file: pyvhost.d/*.toml, each holding [[device]] tables only (what
# `device-add` with control-persist writes), read in name order after the file's own devices.
DROPIN_DIR = "pyvhost.d"


class _Checker:
    def __init__(self, path: str | None, check_files: bool):
        self.path = path
        self.check_files = check_files

    def fail(self, where: str, problem: str):
        prefix = f"{self.path}: " if self.path else ""       # None: a command line
        raise ConfigError(f"{prefix}{where}{': ' if where else ''}{problem}")

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
        if isinstance(value, str) and "\0" in value:     # paths and names reach C APIs
            self.fail(where, f"{key} must not contain a NUL character, not {value!r}")
        return value

    def unknown(self, table: dict, allowed: set, where: str):
        extra = sorted(set(table) - allowed)
        if extra:
            self.fail(where, f"unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")

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
    mode_text = c.take(table, where, "socket-mode", str)
    try:
        group, mode = socket_access(group, mode_text, c.check_files)
    except ValueError as e:
        c.fail(where, str(e))
    control = c.take(table, where, "control-socket", str)
    if control is not None:
        c.socket_path(where + " control-socket", control)
    persist = c.take(table, where, "control-persist", bool, False)
    if persist and control is None:
        c.fail(where, "control-persist needs control-socket")
    stop_timeout = c.take(table, where, "stop-timeout", float, 10.0)
    if not 0 < stop_timeout <= 3600:
        c.fail(where, f"stop-timeout must be 0..3600 seconds, not {stop_timeout}")
    loop = c.take(table, where, "loop", str)
    if loop not in (None, "uvloop", "asyncio"):
        c.fail(where, f"loop must be uvloop or asyncio, not {loop!r}")
    mem_value = table.get("max-guest-memory")
    max_memory = 0
    if mem_value is not None:
        try:        # the same conversion as a device's size options
            max_memory = _GUEST_MEMORY.from_toml(mem_value)
        except OptionProblem as e:
            c.fail(where, f"max-guest-memory: {e}")
        if max_memory < 1 << 20:
            c.fail(where, f"max-guest-memory must be at least 1M, not {mem_value}")
    max_fds = c.take(table, where, "max-message-fds", int, 32)
    if not 8 <= max_fds <= 1024:
        # 8: SET_MEM_TABLE's 8 regions must fit
        c.fail(where, f"max-message-fds must be 8..1024, not {max_fds}")
    return ServiceSpec(metrics_address=addr, log_level=level, socket_group=group,
                       socket_mode=mode, stop_timeout=stop_timeout, loop=loop,
                       max_guest_memory=max_memory, max_message_fds=max_fds,
                       control_socket=control, control_persist=persist)


def _options(c: _Checker, options, t: dict, where: str) -> dict:
    """The values of one table's options, converted and validated (defaults omitted)."""
    out = {}
    for o in options:
        if o.name in t:
            try:
                value = o.from_toml(t[o.name])
                o.validate(value)
            except OptionProblem as e:
                c.fail(where, e.line(o.name))
            out[o.attr] = value
    return out


def _device(c: _Checker, dtype, t: dict, where: str):
    options = dtype.toml_options()
    c.unknown(t, set(BASE_KEYS) | {o.name for o in options}, where)
    mode = c.take(t, where, "mode", str, "server")
    if mode not in MODES:
        c.fail(where, f"mode must be \"server\" or \"client\", not {mode!r}")
    spec = dtype.spec_class()(name=t["name"], socket=c.take(t, where, "socket", str),
                              mode=mode, **_options(c, options, t, where))
    c.socket_path(where, spec.socket)
    try:
        dtype.check(spec, Names(cli=False), c.check_files)
    except ValueError as e:
        c.fail(where, str(e))
    return spec


def _table_entry(c: _Checker, dtype, table: str, t: dict, where: str):
    options = dtype.tables[table]
    c.unknown(t, {"name"} | {o.name for o in options}, where)
    return dtype.table_class(table)(name=t["name"], **_options(c, options, t, where))


def _named(c: _Checker, t, kind: str, index: int) -> str:
    if not isinstance(t, dict):
        c.fail("", f"[[{kind}]] entry {index + 1} must be a table")
    name = t.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        c.fail(f"{kind} {index + 1}", f"name must be a string matching {NAME_RE.pattern}, "
                                      f"not {name!r}")
    return name


def _owners() -> dict:
    """table name -> the device type that owns it"""
    return {table: dtype for dtype in devices.TYPES.values() for table in dtype.tables}


def parse(data: dict, path: str = "<config>", check_files: bool = True) -> Config:
    """Validate an already-decoded TOML document."""
    c = _Checker(path, check_files)
    owners = _owners()
    c.unknown(data, {"service", "device"} | set(owners), "")
    service = _service(c, data.get("service", {}))
    raw_devices = data.get("device", [])
    if not isinstance(raw_devices, list) or not all(isinstance(data.get(t, []), list)
                                                     for t in owners):
        c.fail("", "devices and " + ", ".join(f"[[{t}]]" for t in owners)
               + " are arrays of tables: [[device]]" + "".join(f", [[{t}]]" for t in owners))
    tables: dict[str, dict] = {}
    for table, dtype in owners.items():
        entries = tables[table] = {}
        for i, t in enumerate(data.get(table, [])):
            name = _named(c, t, table, i)
            where = f"{table} \"{name}\""
            if name in entries:
                c.fail(where, f"duplicate {table} name")
            entries[name] = _table_entry(c, dtype, table, t, where)
    specs = []
    names, sockets = set(), {}
    kinds = " or ".join(f'"{n}"' for n in devices.TYPES)
    for i, t in enumerate(raw_devices):
        name = _named(c, t, "device", i)
        where = f"device \"{name}\""
        if name in names:
            c.fail(where, "duplicate device name")
        names.add(name)
        kind = t.get("type")
        if not isinstance(kind, str) or kind not in devices.TYPES:
            c.fail(where, f"type must be {kinds}, not {kind!r}")
        spec = _device(c, devices.TYPES[kind], t, where)
        real = os.path.realpath(spec.socket) if check_files else spec.socket
        if real in sockets:
            c.fail(where, f"socket {spec.socket} is already used by device \"{sockets[real]}\"")
        sockets[real] = name
        specs.append(spec)
    return finish(path, service, specs, tables, Names(cli=False))


def finish(path: str | None, service: ServiceSpec, specs: list, tables: dict,
           names: Names) -> Config:
    """Checks across devices of one type (each type's check_all), which also completes its
    tables with implicit entries; the Config.  `path` None: a program's command line."""
    c = _Checker(path, False)
    for dtype in devices.TYPES.values():
        own = {t: tables.get(t, {}) for t in dtype.tables}
        try:
            own = dtype.check_all([s for s in specs if s.type == dtype.name], own, names)
        except ValueError as e:
            c.fail("", str(e))
        tables.update(own)
    return Config(path=c.path, service=service, devices=tuple(specs), tables=tables)


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:         # tomllib decodes the bytes before parsing them
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 (byte {e.start}: "
                          f"{e.reason})") from None


def dropin_dir(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), DROPIN_DIR)


def load(path: str, check_files: bool = True) -> Config:
    """The file and its drop-ins (DROPIN_DIR/*.toml: [[device]] tables only)."""
    data = _read_toml(path)
    d = dropin_dir(path)
    if os.path.isdir(d):
        extra = []
        for name in sorted(os.listdir(d)):
            if not name.endswith(".toml"):
                continue
            more = _read_toml(os.path.join(d, name))
            if set(more) - {"device"} or not isinstance(more.get("device", []), list):
                raise ConfigError(f"{os.path.join(d, name)}: a drop-in holds [[device]] tables "
                                  f"only")
            extra += more.get("device", [])
        if extra:
            if not isinstance(data.get("device", []), list):
                raise ConfigError(f"{path}: devices are an array of tables: [[device]]")
            data = dict(data, device=list(data.get("device", [])) + extra)
    return parse(data, path, check_files)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} {v!r} as a TOML value")


def json_string(v: str) -> str:
    """A TOML basic string (JSON's escapes are a subset TOML accepts)."""
    import json
    return json.dumps(v, ensure_ascii=False)


def device_toml(table: dict) -> str:
    """One [[device]] table as TOML text (flat values: strings, numbers, booleans, arrays)."""
    lines = ["[[device]]"]
    for k, v in table.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", k):
            raise ValueError(f"bad key {k!r}")
        lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def spec_fields(spec) -> dict:
    """The spec as config keys (for logs and diffs)."""
    return {_key(f.name): getattr(spec, f.name) for f in fields(spec) if f.compare}
