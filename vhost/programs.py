"""programs.py: the installed backend programs, one per device type (pyvhost-blk, pyvhost-net,
pyvhost-rng), thin as Cloud Hypervisor's daemons: parse the command line generated from the
type's option table (vhost/cli.py), answer --print-capabilities, and run the resulting one-device
configuration on the same runtime as `pyvhost serve` (vhost/service.py).

`python -m vhost.programs PROGRAM [OPTIONS]` runs one without the console scripts (the tests do).
Owns nothing else and names no device type: each console script (pyproject.toml) points at
`main`, which finds its device type by the program name it was started by.
"""
from __future__ import annotations

import os
import sys

import devices

from . import cli, service


def device_main(type_name: str, argv=None) -> int:
    dtype = devices.get(type_name)
    args, conf = cli.parse_device(dtype, argv)
    if cli.prologue(args, dtype.capabilities):
        return 0
    return service.run_single(conf, dtype.program, args.loop)


def main(argv=None) -> int:
    """Every backend program's console script: the program is the name it was started by
    (pyvhost-blk, ...), or the first argument (`python -m vhost.programs pyvhost-blk ...`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    programs = sorted(t.program for t in devices.TYPES.values())
    invoked = os.path.basename(sys.argv[0])
    if invoked in programs:
        return device_main(devices.by_program(invoked).name, argv)
    if not argv or argv[0] not in programs:
        sys.stderr.write(f"usage: python -m vhost.programs {{{','.join(programs)}}} [OPTIONS]\n")
        return 2
    return device_main(devices.by_program(argv[0]).name, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
