"""programs.py: the installed backend programs, one per device type (pyvhost-blk, pyvhost-net,
pyvhost-rng), thin as Cloud Hypervisor's daemons: parse the command line generated from the
type's option table (vhost/cli.py), answer --print-capabilities, and run the resulting one-device
configuration on the same runtime as `pyvhost serve` (vhost/service.py).

`python -m vhost.programs PROGRAM [OPTIONS]` runs one without the console scripts (the tests do).
Owns nothing else; knows no device type by name beyond the console-script shims below.
"""
from __future__ import annotations

import sys

import devices

from . import cli, service


def device_main(type_name: str, argv=None) -> int:
    dtype = devices.get(type_name)
    args, conf = cli.parse_device(dtype, argv)
    if cli.prologue(args, dtype.capabilities):
        return 0
    return service.run_single(conf, dtype.program, args.loop)


def blk_main(argv=None) -> int:
    return device_main("block", argv)


def net_main(argv=None) -> int:
    return device_main("net", argv)


def rng_main(argv=None) -> int:
    return device_main("rng", argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    programs = sorted(t.program for t in devices.TYPES.values())
    if not argv or argv[0] not in programs:
        sys.stderr.write(f"usage: python -m vhost.programs {{{','.join(programs)}}} [OPTIONS]\n")
        return 2
    return device_main(devices.by_program(argv[0]).name, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
