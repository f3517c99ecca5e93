"""vhost: the vhost-user framework, in layers (ARCHITECTURE.md; tests/unit/test_layers.py
enforces them): the core (protocol.py sans-I/O state machine, memory.py, device.py, devtype.py)
imports protocols/ only and knows no device type; the server (server.py) is handed a device;
the service layer (service.py, config.py, cli.py, programs.py, metrics.py, sdnotify.py,
logfmt.py) iterates the device registry (devices.TYPES) and never switches on a device type;
testing/ is a vhost-user frontend for tests and benchmarks.
"""
