"""cli.py: the command lines of the backend programs (pyvhost-blk, pyvhost-net, pyvhost-rng,
...: one per device type, generated from its option table) and of `pyvhost serve|check`,
following QEMU's vhost-user "Backend program conventions" (docs/interop/vhost-user.rst):
--socket-path or --fd (mutually exclusive), --print-capabilities, no daemonizing.  Errors are one
line on stderr and a non-zero exit.

Owns argument parsing and turning a program's options into a one-device (or, for a net switch,
several-device) Config, checked by the same device-type hooks as a configuration file.  Nothing
here opens files or sockets; vhost/programs.py runs the result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import config as cfg
from .devtype import DeviceType, Names, OptionProblem

EXIT_USAGE = 2
LOG_LEVELS = ("debug", "info", "warning", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as libvirt logs stderr line by line
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _converter(option):
    def convert(text: str):
        try:
            value = option.from_text(text)
            option.validate(value)
        except OptionProblem as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    convert.__name__ = option.kind      # argparse names the type in its messages
    return convert


def device_parser(dtype: DeviceType) -> argparse.ArgumentParser:
    """The program's parser: the framework's options, then the device type's table."""
    p = _Parser(prog=dtype.program, description=dtype.description)
    if dtype.multi_socket:
        p.add_argument("--socket-path", metavar="PATH", action="append",
                       help="listen on this Unix socket (repeat for several --switch ports)")
    else:
        p.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket")
    p.add_argument("--fd", type=int, metavar="FDNUM", help="inherited listening socket fd")
    p.add_argument("--client", action="store_true",
                   help="connect to --socket-path, where QEMU listens (-chardev socket,"
                        "server=on), and re-dial whenever the connection drops")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the backend's capabilities as JSON and exit")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default=None,
                   help="event loop (default: uvloop when installed; env PYVHOST_LOOP)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics here (e.g. 127.0.0.1:9560)")
    # the service's socket-group / socket-mode keys: libvirt's QEMU runs as libvirt-qemu:kvm
    # and cannot connect to a root:root 0600 socket (virtiofsd has --socket-group for this)
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group of the listening socket(s) (e.g. kvm for libvirt's QEMU)")
    p.add_argument("--socket-mode", metavar="MODE",
                   help="octal mode of the listening socket(s) (default 0600; 0660 with "
                        "--socket-group)")
    for o in dtype.cli_options():
        if o.kind == "bool" and o.default is None:      # tri-state: --NAME / --no-NAME
            p.add_argument(f"--{o.name}", action=argparse.BooleanOptionalAction,
                           default=None, help=o.help)
        elif o.kind == "bool":
            p.add_argument(f"--{o.name}", action="store_true", default=bool(o.default),
                           help=o.help)
        else:
            p.add_argument(f"--{o.name}", type=_converter(o), default=o.default,
                           metavar=o.metavar, help=o.help)
    return p


def _socket_activation(args) -> None:
    """Under systemd socket activation (LISTEN_FDS): with neither --socket-path nor --fd, serve
    the one inherited socket, as `--fd 3` would.  Either way the LISTEN_* variables are consumed
    (unset, fds made close-on-exec), as sd_listen_fds(3) does."""
    if "LISTEN_FDS" not in os.environ:
        return
    from .sdnotify import listen_fds
    try:
        fds = listen_fds()
    except ValueError:
        return
    if not args.socket_path and args.fd is None and len(fds) == 1:
        args.fd = fds[0][0]


def _check_metrics(p, address) -> None:
    if address is not None:
        from .metrics import parse_address
        try:
            parse_address(address)
        except ValueError as e:
            p.error(str(e))


def parse_device(dtype: DeviceType, argv=None) -> tuple[argparse.Namespace, cfg.Config | None]:
    """Parse a program's command line: (args, its Config), or (args, None) for
    --print-capabilities.  Every problem exits with one line."""
    p = device_parser(dtype)
    args = p.parse_args(argv)
    if args.print_capabilities:
        return args, None
    _socket_activation(args)
    _check_metrics(p, args.metrics_address)
    sockets = ([] if args.socket_path is None else
               list(args.socket_path) if dtype.multi_socket else [args.socket_path])
    if (not sockets) == (args.fd is None):
        p.error("exactly one of --socket-path and --fd is required")
    if args.fd is not None and args.fd < 0:
        p.error("--fd must be a non-negative file descriptor")
    if args.client and args.fd is not None:
        p.error("--client connects to --socket-path; it does not take --fd")
    try:
        group, mode = cfg.socket_access(args.socket_group, args.socket_mode)
    except ValueError as e:
        p.error(str(e).replace("socket-", "--socket-", 1))
    values = {o.attr: getattr(args, o.attr) for o in dtype.cli_options()}
    names = Names(cli=True)
    try:
        dtype.command_line_check(values, sockets, names)
        kwargs, tables = dtype.from_command_line(values, sockets)
        cls = dtype.spec_class()
        keep = {f for f in cls.__dataclass_fields__}
        specs = []
        for kw in kwargs:
            kw = dict(kw, mode="client" if args.client else "server")
            spec = cls(**{k: v for k, v in kw.items() if k in keep}, listen_fd=args.fd)
            dtype.check(spec, names, False)
            specs.append(spec)
    except ValueError as e:
        p.error(str(e))
    service = cfg.ServiceSpec(metrics_address=args.metrics_address, log_level=args.log_level,
                              loop=args.loop, socket_group=group, socket_mode=mode)
    try:
        conf = cfg.finish(None, service, specs, tables, names)
    except cfg.ConfigError as e:
        p.error(str(e))
    return args, conf


def serve_parser() -> argparse.ArgumentParser:
    """`pyvhost serve|check --config FILE`, `pyvhost install-host` (vhost/service.py)."""
    p = _Parser(prog="pyvhost", description="vhost-user device backends as a service")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    s = sub.add_parser("serve", help="serve the devices of a configuration file")
    c = sub.add_parser("check", help="validate a configuration file and exit")
    for q in (s, c):
        q.add_argument("--config", required=True, metavar="FILE", help="TOML configuration")
    s.add_argument("--log-level", default=None, choices=LOG_LEVELS,
                   help="overrides [service] log-level")
    s.add_argument("--metrics-address", default=None, metavar="HOST:PORT",
                   help="overrides [service] metrics-address")
    s.add_argument("--loop", choices=("uvloop", "asyncio"), default=None)
    s.add_argument("--control-socket", default=None, metavar="PATH",
                   help="serve the control API (JSON-RPC 2.0, pyvhostctl) here; overrides "
                        "[service] control-socket")
    i = sub.add_parser("install-host", help="write the systemd units, QEMU's vhost-user "
                       "descriptors and an example config naming this installation's programs")
    i.add_argument("--prefix", default="/", metavar="DIR",
                   help="root of the tree written (default /: /etc/systemd/system, "
                        "/etc/qemu/vhost-user, /etc/pyvhost)")
    i.add_argument("--bindir", default=None, metavar="DIR",
                   help="where the programs are (default: this installation's scripts)")
    i.add_argument("--dry-run", action="store_true", help="list the files, write nothing")
    return p


def print_capabilities(caps: dict) -> None:
    print(json.dumps(caps))


def prologue(args: argparse.Namespace, caps: dict) -> bool:
    """What every backend program does first: answer --print-capabilities (True: exit 0 now),
    else send logging to stderr at --log-level, one logfmt line per event (vhost/logfmt.py)."""
    if args.print_capabilities:
        print_capabilities(caps)
        return True
    from . import logfmt
    logfmt.setup(args.log_level)
    return False
