"""devtype.py: what a device type declares, once: its name, its program, its
`--print-capabilities` JSON, one option table, how to build a Device from a spec and how to
describe it in one line.  From the option table the service layer generates the program's
argparse options (vhost/cli.py) and the `[[device]]` TOML keys (vhost/config.py); nothing else
declares an option.

Owns: `Option` (name, kind, default, range/validator, help), value conversion and the one-line
problem texts shared by the command line and the configuration file, the spec classes generated
from a table (frozen, compared by value: what a SIGHUP reload diffs), `DeviceType` (the
interface every module in devices/ fills in) and `DeviceEnv` (state one device type shares
between its devices in one process, e.g. net's switches).

Core layer: imports nothing of the server, the service or devices/; opens no file or socket.
The registry (which types exist) is devices/__init__.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

# sun_path is 108 bytes with the NUL
MAX_SOCKET_PATH = 107
# Queue sizes: virtio 1.2 §2.7 (split rings): a power of two, at most 32768.
MAX_QUEUE_SIZE = 32768


def parse_size(text: str) -> int:
    """'1G', '512M', '4096' -> bytes (binary units, as qemu-img).  ValueError: the problem."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except (ValueError, KeyError, OverflowError):       # OverflowError: "inf", "1e400"
        raise ValueError(f"bad size {text!r}") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


_KIND_NAMES = {"str": "a string", "int": "an integer", "bool": "true or false",
               "float": "a number", "size": "a number of bytes or a string like \"1G\""}


class OptionProblem(ValueError):
    """A bad option value.  `qualified`: the text already names what is wrong (a validator's
    own message, e.g. "bad MAC address 'zz'"); otherwise the caller prefixes the option's name
    as the user spelled it (`--queues` on the command line, `queues` in the file)."""

    def __init__(self, text: str, qualified: bool = False):
        super().__init__(text)
        self.qualified = qualified

    def line(self, display: str) -> str:
        return str(self) if self.qualified else f"{display} {self}"


@dataclass(frozen=True)
class Option:
    """One device option: `--NAME` on the program's command line, `NAME` in a [[device]] table,
    attribute `NAME_with_underscores` of the spec."""
    name: str
    kind: str = "str"                 # str | int | float | bool | size
    # None: unset (the device decides); a bool defaulting to None is tri-state: --NAME and
    # --no-NAME on the command line, true / false / absent in a file
    default: Any = None
    help: str = ""
    range: tuple | None = None        # inclusive (lo, hi)
    pow2: bool = False                # a power of two no larger than MAX_QUEUE_SIZE
    check: Callable[[Any], Any] | None = None   # raises ValueError(self-contained text)
    metavar: str | None = None
    where: str = "both"               # both | cli (command line only) | toml (file only)

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    def from_toml(self, value):
        """A TOML value -> the option's value (OptionProblem when it is the wrong type)."""
        k = self.kind
        if k == "size":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise OptionProblem(f"must be {_KIND_NAMES[k]}, not {value!r}")
            try:
                return parse_size(str(value))
            except ValueError as e:
                raise OptionProblem(str(e), qualified=True) from None
        py = {"str": str, "int": int, "float": float, "bool": bool}[k]
        ok = isinstance(value, py) and not (k in ("int", "float") and isinstance(value, bool))
        if k == "float" and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise OptionProblem(f"must be {_KIND_NAMES[k]}, not {value!r}")
        if k == "str" and "\0" in value:       # paths and names reach C APIs
            raise OptionProblem(f"must not contain a NUL character, not {value!r}")
        return value

    def from_text(self, text: str):
        """A command-line word -> the option's value."""
        k = self.kind
        try:
            if k == "int":
                return int(text, 0)
            if k == "float":
                return float(text)
            if k == "size":
                return parse_size(text)
        except ValueError as e:
            if k == "size":
                raise OptionProblem(str(e), qualified=True) from None
            raise OptionProblem(f"must be {_KIND_NAMES[k]}, not {text!r}") from None
        return text

    def validate(self, value) -> None:
        """Range, power of two and the validator; OptionProblem on the first problem."""
        if value is None or self.kind == "bool":
            return
        if self.range is not None:
            lo, hi = self.range
            if value < lo:
                raise OptionProblem(("must be positive" if lo == 1 and self.kind == "int"
                                     else f"must be at least {lo:g}") + f", not {value:g}")
            if value > hi:
                raise OptionProblem(f"must be at most {hi:g}, not {value:g}")
        if self.pow2 and (value & (value - 1) or not 1 <= value <= MAX_QUEUE_SIZE):
            raise OptionProblem(f"must be a power of two no larger than {MAX_QUEUE_SIZE}, "
                                f"not {value}")
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as e:
                raise OptionProblem(str(e), qualified=True) from None


# The keys every [[device]] has besides its type's options (vhost/config.py checks them).
BASE_KEYS = ("name", "type", "socket", "mode")
# `mode`: "server" (we listen on `socket`, QEMU connects: `-chardev socket,path=...`) or "client"
# (QEMU listens, `-chardev socket,server=on,...`, libvirt's mode='server'; we connect and re-dial
# whenever the connection drops, so a backend restart needs nothing from QEMU: OVS-DPDK's
# dpdkvhostuserclient).
MODES = ("server", "client")


class Names:
    """How problems name options: `--queue-size` on a command line, `queue-size` in a file."""

    def __init__(self, cli: bool):
        self.cli = cli

    def __call__(self, name: str) -> str:
        if name == "socket" and self.cli:
            return "--socket-path"
        return f"--{name}" if self.cli else name


class DeviceEnv:
    """What one device type shares between its devices in one process (net: the switches and
    their uplinks).  The service creates one per type, hands it to every build, asks it which
    devices a configuration change affects, and closes it at exit.  This default shares
    nothing."""

    def __init__(self, tables: dict):
        self.tables = tables          # this type's extra tables: {table: {name: spec}}

    def affected(self, old_tables: dict, new_tables: dict, spec) -> bool:
        """True when `spec`'s device must restart because a table it uses changed."""
        return False

    def reconfigure(self, new_tables: dict) -> None:
        """Apply changed tables once every affected device has stopped."""
        self.tables = new_tables

    def ports(self) -> list:
        """Extra metrics sources that are not devices: [(name, socket label, queue_counters)]."""
        return []

    def describe(self) -> dict:
        """What the devices of this type share, as JSON-able data (the control API's
        switch-show for net): {name: {...}}."""
        return {}

    def close(self) -> None:
        """Service exit: release what the devices no longer use (log final counters)."""


class DeviceType:
    """One kind of device.  A module in devices/ makes one instance and registers it in
    devices/__init__.py; subclass hooks have defaults so a simple device fills in the table,
    `build` and `describe` only."""

    name: str = ""                    # the TOML `type` and the metric label
    program: str = ""                 # its single-device program, e.g. "pyvhost-blk"
    description: str = ""
    capabilities: dict = {}           # --print-capabilities (QEMU's vhost-user.json "type")
    options: tuple = ()               # Option, ...
    tables: dict = {}                 # extra top-level [[table]]s it owns: {name: (Option,...)}
    logger: str = "pyvhost"           # where its stats line is logged at exit
    # The command line may name several sockets (one device each), e.g. net's switch ports.
    multi_socket: bool = False

    # -- specs --------------------------------------------------------------------------------

    def spec_class(self):
        """The frozen spec dataclass of this type: name, socket, mode, one field per option,
        type, listen_fd (command line --fd only; not compared, so it never looks like a change)."""
        cls = self.__dict__.get("_spec_cls")
        if cls is None:
            fields = [("name", str), ("socket", "str | None", field(default=None)),
                      ("mode", str, field(default="server"))]
            fields += [(o.attr, object, field(default=o.default)) for o in self.options
                       if o.where != "cli"]
            fields += [("type", str, field(default=self.name)),
                       ("listen_fd", "int | None", field(default=None, compare=False))]
            cls = dataclasses.make_dataclass(f"{self.name.title()}Spec", fields, frozen=True)
            self._spec_cls = cls
        return cls

    def table_class(self, table: str):
        cache = self.__dict__.setdefault("_table_cls", {})
        if table not in cache:
            fields = [("name", str)] + [(o.attr, object, field(default=o.default))
                                        for o in self.tables[table]]
            cache[table] = dataclasses.make_dataclass(f"{table.title()}Spec", fields,
                                                      frozen=True)
        return cache[table]

    def cli_options(self) -> tuple:
        return tuple(o for o in self.options if o.where != "toml")

    def toml_options(self) -> tuple:
        return tuple(o for o in self.options if o.where != "cli")

    # -- checks (raise ValueError with one line; `names` spells the options) -------------------

    def check(self, spec, names: Names, check_files: bool) -> None:
        """Cross-option checks of one device, e.g. "blk-file is required"; with `check_files`
        also what the file system says (does the image exist?)."""

    def check_all(self, specs: list, tables: dict, names: Names) -> dict:
        """Checks across this type's devices (a tap used twice...); returns the tables
        completed with implicit entries (net: a switch named only by its ports).  Raises
        ValueError("device \"x\": problem") naming the device or table entry."""
        return tables

    # -- command line -------------------------------------------------------------------------

    def from_command_line(self, values: dict, sockets: list) -> tuple[list, dict]:
        """The program's parsed options -> ([spec kwargs, ...], tables).  Default: one device
        named after its socket or --fd."""
        return [dict(values, socket=sockets[0] if sockets else None)], {}

    def command_line_check(self, values: dict, sockets: list, names: Names) -> None:
        """Checks that only make sense on the program's command line (before specs exist)."""

    # -- running ------------------------------------------------------------------------------

    def environment(self, tables: dict) -> DeviceEnv:
        return DeviceEnv(tables)

    def build(self, spec, env: DeviceEnv):
        """Open what the device needs (image, tap, switch port) and return the Device."""
        raise NotImplementedError

    def describe(self, spec) -> str:
        """One line for the log: what this device serves."""
        return self.name

    def uses(self, spec) -> tuple:
        """Table entries the device depends on: ((table, name), ...)."""
        return ()
