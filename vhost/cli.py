"""cli.py: argument parsing only (pyvhost-blk, pyvhost-net, pyvhost serve|check), following
QEMU's vhost-user "Backend program conventions"
(docs/interop/vhost-user.rst): --socket-path or --fd (mutually exclusive), --print-capabilities,
no daemonizing.  Errors are one line on stderr and a non-zero exit.  Nothing here opens files
or sockets; devices/*.main wire the parsed options to the device and the server.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as libvirt logs stderr line by line
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def parse_size(text: str) -> int:
    """'1G', '512M', '4096' -> bytes (binary units, as qemu-img)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"bad size {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket")
    p.add_argument("--fd", type=int, metavar="FDNUM", help="inherited listening socket fd")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the backend's capabilities as JSON and exit")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default=None,
                   help="event loop (default: uvloop when installed; env PYVHOST_LOOP)")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics here (e.g. 127.0.0.1:9560)")


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


def _check_metrics(p, args) -> None:
    if args.metrics_address is not None:
        from .metrics import parse_address
        try:
            parse_address(args.metrics_address)
        except ValueError as e:
            p.error(str(e))


def _check_listen(p, args) -> None:
    if args.print_capabilities:
        return
    _socket_activation(args)
    _check_metrics(p, args)
    if (args.socket_path is None) == (args.fd is None):
        p.error("exactly one of --socket-path and --fd is required")
    if args.fd is not None and args.fd < 0:
        p.error("--fd must be a non-negative file descriptor")


def blk_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvhost-blk", description="vhost-user-blk backend")
    _common(p)
    p.add_argument("--blk-file", metavar="IMG", help="raw image file or block device")
    p.add_argument("--read-only", action="store_true", help="export read-only")
    p.add_argument("--num-queues", type=_positive, default=1, metavar="N")
    p.add_argument("--queue-size", type=_positive, default=1024, metavar="N",
                   help="largest virtqueue size accepted (power of two, default 1024)")
    p.add_argument("--size", type=parse_size, metavar="SIZE",
                   help="create a sparse image of this size if --blk-file is missing")
    p.add_argument("--serial", default=None, help="GET_ID serial (20 bytes max)")
    p.add_argument("--no-io-uring", action="store_true",
                   help="use the synchronous preadv/pwritev path (debugging)")
    p.add_argument("--buffered", action="store_true", help="do not use O_DIRECT")
    p.add_argument("--poll-us", type=float, default=0.0, metavar="US",
                   help="busy-poll the ring this long after work before sleeping (0: off)")
    p.add_argument("--null", action="store_true",
                   help="no backing store: a --size device whose I/O completes at once "
                        "(benchmarks, like QEMU's null-co)")
    return p


BLK_CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}


def parse_blk(argv=None) -> argparse.Namespace:
    p = blk_parser()
    args = p.parse_args(argv)
    if args.print_capabilities:
        return args
    _check_listen(p, args)
    if args.null:
        if args.blk_file or not args.size:
            p.error("--null takes --size and no --blk-file")
    elif not args.blk_file:
        p.error("--blk-file is required")
    q = args.queue_size
    if q & (q - 1) or q > 32768:
        p.error("--queue-size must be a power of two no larger than 32768")
    if args.num_queues > 256:
        p.error("--num-queues must be at most 256")
    if args.serial is not None and len(args.serial.encode()) > 20:
        p.error("--serial is at most 20 bytes")
    return args


def net_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvhost-net", description="vhost-user-net backend (tap or L2 switch)")
    p.add_argument("--socket-path", metavar="PATH", action="append",
                   help="listen on this Unix socket (repeat for several --switch ports)")
    p.add_argument("--fd", type=int, metavar="FDNUM", help="inherited listening socket fd")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the backend's capabilities as JSON and exit")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default=None)
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics here (e.g. 127.0.0.1:9560)")
    p.add_argument("--tap", metavar="NAME", help="tap device (created if missing); with "
                   "--switch: an uplink port of the switch")
    p.add_argument("--switch", metavar="NAME", help="join the sockets by an in-process "
                   "learning L2 switch")
    p.add_argument("--mac", metavar="MAC", help="MAC offered to the guest (config space)")
    p.add_argument("--queues", type=_positive, default=1, metavar="N", help="queue pairs")
    p.add_argument("--mtu", type=_positive, default=1500, metavar="N")
    p.add_argument("--queue-size", type=_positive, default=1024, metavar="N")
    p.add_argument("--mac-ageing", type=float, default=300.0, metavar="SECONDS",
                   help="forget learned MACs after this long (default 300, as Linux bridges)")
    return p


NET_CAPABILITIES = {"type": "net", "features": ["tap", "switch", "mq", "mtu"]}


def parse_net(argv=None) -> argparse.Namespace:
    p = net_parser()
    args = p.parse_args(argv)
    if args.print_capabilities:
        return args
    _socket_activation(args)
    _check_metrics(p, args)
    if (not args.socket_path) == (args.fd is None):
        p.error("exactly one of --socket-path and --fd is required")
    if not args.tap and not args.switch:
        p.error("one of --tap and --switch is required")
    if not args.switch and args.socket_path and len(args.socket_path) > 1:
        p.error("several --socket-path need --switch")
    if args.queues > 16:
        p.error("--queues must be at most 16")
    if not 68 <= args.mtu <= 65521:
        p.error("--mtu must be 68..65521")
    q = args.queue_size
    if q & (q - 1) or q > 32768:
        p.error("--queue-size must be a power of two no larger than 32768")
    if args.mac_ageing <= 0:
        p.error("--mac-ageing must be positive")
    return args


def serve_parser() -> argparse.ArgumentParser:
    """`pyvhost serve|check --config FILE` (vhost/service.py)."""
    p = _Parser(prog="pyvhost", description="vhost-user device backends as a service")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    s = sub.add_parser("serve", help="serve the devices of a configuration file")
    c = sub.add_parser("check", help="validate a configuration file and exit")
    for q in (s, c):
        q.add_argument("--config", required=True, metavar="FILE", help="TOML configuration")
    s.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"),
                   help="overrides [service] log-level")
    s.add_argument("--metrics-address", default=None, metavar="HOST:PORT",
                   help="overrides [service] metrics-address")
    s.add_argument("--loop", choices=("uvloop", "asyncio"), default=None)
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
