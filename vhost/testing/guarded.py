"""guarded.py: guest memory with guard pages around every region, for fuzzing the data plane.

Owns: `GuardedRegion`, one memfd mapped MAP_SHARED|MAP_FIXED into the middle of a larger
PROT_NONE reservation, so that the first byte the backend touches outside the region faults
(SIGSEGV: the fuzzer reports a crash) instead of silently reading or writing a neighbour; a region
whose size is not a page multiple is placed against the guard below or above it (`align_end`) and
its slack bytes in the shared page hold a canary (`slack_intact`), since those cannot fault;
`GuardedMemory`, the region table the Cython engine copies (vhost/memory.py's layout) and GPA
translation for the test side.  Everything is unmapped and closed by `close()`.
Must not: open sockets, start processes or threads, or import tests, devices, vhost.server,
vhost.service or vhost.config.
"""
from __future__ import annotations

import ctypes
import mmap
import os

from vhost.memory import LIBC as _libc, REGION_ENTRY

PAGE = mmap.PAGESIZE
# PROT_NONE bytes on each side of a region: an index times 16 (a descriptor) or 8 (a used
# element) past the end of a table still lands in the guard.
GUARD = 2 << 20
CANARY = 0xA5

_PROT_NONE, _PROT_RW = 0, 3
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANON, _MAP_NORESERVE = 0x1, 0x2, 0x10, 0x20, 0x4000
_FAILED = ctypes.c_void_p(-1).value


def _mmap(addr, length, prot, flags, fd):
    p = _libc.mmap(addr, length, prot, flags, fd, 0)
    if p is None or p == _FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return p


class GuardedRegion:
    """One guest memory region [gpa, gpa+size) at host address `host`, with PROT_NONE pages
    right below and above it (exactly at its start when align_end is False, exactly at its end
    when True; the other side then has slack bytes up to the page boundary, filled with
    CANARY)."""

    def __init__(self, gpa: int, size: int, *, uva: int | None = None, align_end: bool = False):
        if size <= 0:
            raise ValueError("region size must be positive")
        self.gpa, self.size, self.align_end = gpa, size, align_end
        self.uva = gpa if uva is None else uva
        self.map_len = -(-size // PAGE) * PAGE
        self.slack = self.map_len - size
        self.fd = os.memfd_create("guarded-guest", os.MFD_CLOEXEC)
        self._reserved = 0
        try:
            os.ftruncate(self.fd, self.map_len)
            self._reserve_len = self.map_len + 2 * GUARD
            self._reserved = _mmap(None, self._reserve_len, _PROT_NONE,
                                   _MAP_PRIVATE | _MAP_ANON | _MAP_NORESERVE, -1)
            self.base = _mmap(self._reserved + GUARD, self.map_len, _PROT_RW,
                              _MAP_SHARED | _MAP_FIXED, self.fd)
        except BaseException:
            self.close()
            raise
        self.host = self.base + (self.slack if align_end else 0)
        if self.slack:
            ctypes.memset(self.base + (0 if align_end else size), CANARY, self.slack)

    # -- access from the test side (offsets relative to the region start) --
    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} at {offset} outside region of {self.size}")
        ctypes.memmove(self.host + offset, data, len(data))

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"read of {n} at {offset} outside region of {self.size}")
        return ctypes.string_at(self.host + offset, n)

    def contains_host(self, addr: int, n: int) -> bool:
        return self.host <= addr and addr + n <= self.host + self.size

    def slack_intact(self) -> bool:
        if not self.slack:
            return True
        at = self.base + (0 if self.align_end else self.size)
        return ctypes.string_at(at, self.slack) == bytes([CANARY]) * self.slack

    def close(self) -> None:
        if self._reserved:
            _libc.munmap(self._reserved, self._reserve_len)
            self._reserved = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuardedMemory:
    """A set of GuardedRegions as the backend's region table sees them."""

    def __init__(self, regions=()):
        self.regions: list[GuardedRegion] = list(regions)

    def add(self, gpa: int, size: int, **kw) -> GuardedRegion:
        r = GuardedRegion(gpa, size, **kw)
        self.regions.append(r)
        return r

    def table_bytes(self) -> bytes:
        """vhost/memory.py's packed region table (gpa, size, uva, host)."""
        return b"".join(REGION_ENTRY.pack(r.gpa, r.size, r.uva, r.host) for r in self.regions)

    def gpa_to_host(self, gpa: int, n: int) -> int | None:
        for r in self.regions:
            if r.gpa <= gpa and gpa - r.gpa + n <= r.size:
                return r.host + (gpa - r.gpa)
        return None

    def region_of_host(self, addr: int, n: int) -> GuardedRegion | None:
        for r in self.regions:
            if r.contains_host(addr, n):
                return r
        return None

    def slack_intact(self) -> bool:
        return all(r.slack_intact() for r in self.regions)

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []
