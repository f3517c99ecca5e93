"""devices: one module per device type, and this registry of them.

A device module declares one `DeviceType` (vhost/devtype.py) named DEVICE: its option table,
capabilities, `build(spec)` -> Device and `describe`; its queues are served by a worker in
cython_ext/ on the shared queue-worker runtime.  The service layer (vhost/config.py, cli.py,
service.py, programs.py) iterates TYPES and never switches on a device type.

Must not: import the server, the service, the command line or tests; device modules import
their Cython extension only where they run it, so checking a configuration loads none.
"""
from . import blk, net, rng

TYPES = {m.DEVICE.name: m.DEVICE for m in (blk, net, rng)}


def get(name: str):
    """The DeviceType called `name` (KeyError if none)."""
    return TYPES[name]


def by_program(program: str):
    for t in TYPES.values():
        if t.program == program:
            return t
    raise KeyError(program)
