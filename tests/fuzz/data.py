"""data.py: how the targets read their input, and how seeds are written in the same layout.

`Input` reads fixed-size little-endian fields from the front of the input through
atheris.FuzzedDataProvider (only its front-consuming calls: ConsumeUInt, ConsumeBytes,
ConsumeBool), so that `Writer` can lay out a seed that decodes to exactly the intended values.
A field read past the end of the input is 0 (or shorter bytes), so every input decodes.
"""
from __future__ import annotations

import struct


class Input:
    def __init__(self, data: bytes):
        import atheris
        self._fdp = atheris.FuzzedDataProvider(data)

    def u8(self) -> int:
        return self._fdp.ConsumeUInt(1)

    def u16(self) -> int:
        return self._fdp.ConsumeUInt(2)

    def u32(self) -> int:
        return self._fdp.ConsumeUInt(4)

    def u64(self) -> int:
        return self._fdp.ConsumeUInt(8)

    def flag(self) -> bool:
        return self._fdp.ConsumeBool()

    def bytes(self, n: int) -> bytes:
        return self._fdp.ConsumeBytes(n)

    def pick(self, seq):
        return seq[self.u8() % len(seq)]

    def remaining(self) -> int:
        return self._fdp.remaining_bytes()


class Writer:
    """The inverse of Input: append fields, get the seed bytes."""

    def __init__(self):
        self._out = bytearray()

    def u8(self, v: int) -> "Writer":
        self._out += struct.pack("<B", v & 0xFF)
        return self

    def u16(self, v: int) -> "Writer":
        self._out += struct.pack("<H", v & 0xFFFF)
        return self

    def u32(self, v: int) -> "Writer":
        self._out += struct.pack("<I", v & 0xFFFFFFFF)
        return self

    def u64(self, v: int) -> "Writer":
        self._out += struct.pack("<Q", v & (1 << 64) - 1)
        return self

    def flag(self, v: bool) -> "Writer":
        return self.u8(1 if v else 0)

    def bytes(self, b: bytes) -> "Writer":
        self._out += b
        return self

    def getvalue(self) -> bytes:
        return bytes(self._out)
