"""vhost: the device-agnostic vhost-user backend framework (protocol state machine, guest memory,
device interface, asyncio server, frontend driver, CLI parsing).  Imports protocols/ only; knows
nothing of blk or net semantics.
"""
