"""ram.py: the "guest RAM" of the frontend driver and its region layouts.

Owns: one `posix_ipc.SharedMemory` object (created O_CREX and unlinked at once), mmap'd here
and handed to the backend with SCM_RIGHTS by vhost.testing.connection; laid out as one region
(`one_region_layout`), as QEMU's PC layout of two regions with a GPA hole ([0, 640 KiB) and
[768 KiB, ...), `pc_two_region_layout`), or as any table the caller gives; GPA <-> offset
translation and a small first-fit allocator (`GuestRAM.alloc/free`) for rings and buffers.
Must not: touch a socket or a ring; read or write outside its own shared-memory object;
import tests, devices, vhost.server, vhost.service or vhost.config.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from bisect import bisect_left
from typing import NamedTuple, Sequence

import posix_ipc

from vhost.testing.errors import GuestRAMFull

KiB = 1024
MiB = 1024 * KiB
PAGE_SIZE = mmap.PAGESIZE

# QEMU's PC layout below 1 MiB: RAM [0, 640 KiB), VGA/ROM hole, RAM again from 768 KiB.  QEMU sends
# the second region with mmap_offset == its GPA (recorded in tests/data/traces).
PC_LOW_RAM_END = 640 * KiB
PC_HIGH_RAM_START = 768 * KiB


class Region(NamedTuple):
    """One guest memory region: GPA range [gpa, gpa+size) backed by shm [mmap_offset, +size)."""
    gpa: int
    size: int
    mmap_offset: int


def one_region_layout(mem_size: int) -> list[Region]:
    return [Region(0, mem_size, 0)]


def pc_two_region_layout(mem_size: int) -> list[Region]:
    """QEMU's PC: [0, 640 KiB) and [768 KiB, mem_size), both at mmap_offset == GPA."""
    if mem_size <= PC_HIGH_RAM_START + PAGE_SIZE:
        raise ValueError(f"mem_size {mem_size} too small for the two-region PC layout")
    return [Region(0, PC_LOW_RAM_END, 0),
            Region(PC_HIGH_RAM_START, mem_size - PC_HIGH_RAM_START, PC_HIGH_RAM_START)]


# --------------------------------------------------------------------------------------------
# Guest RAM
# --------------------------------------------------------------------------------------------

class GuestRAM:
    """Shared memory the backend maps, plus a first-fit allocator over its regions' GPA ranges.

    `fd` is the shm fd handed to the backend; `base_va` is where this process mapped the object
    (region user_addr = base_va + mmap_offset, like QEMU's own virtual addresses).
    """

    def __init__(self, size: int, regions: Sequence[Region] | Sequence[tuple] | None = None):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest RAM size {size} must be a positive multiple of {PAGE_SIZE}")
        regions = [Region(*r) for r in (regions or one_region_layout(size))]
        if not regions:
            raise ValueError("at least one memory region is needed")
        for r in regions:
            if r.size <= 0 or r.gpa < 0 or r.mmap_offset < 0 or r.mmap_offset + r.size > size:
                raise ValueError(f"region {r} does not fit in {size} bytes of shared memory")
        by_gpa = sorted(regions)
        for a, b in zip(by_gpa, by_gpa[1:]):
            if a.gpa + a.size > b.gpa:
                raise ValueError(f"regions {a} and {b} overlap in guest-physical space")
        self.size = size
        self.regions: list[Region] = list(regions)
        self._by_gpa = by_gpa
        self._starts = [r.gpa for r in by_gpa]
        self.fd = -1
        self.mm: mmap.mmap | None = None
        shm = posix_ipc.SharedMemory(None, posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            shm.unlink()                 # nothing else may open it by name; the fd is the handle
            self.mm = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            shm.close_fd()
            raise
        self.fd = shm.fd
        buf = (ctypes.c_char * size).from_buffer(self.mm)
        self.base_va = ctypes.addressof(buf)
        del buf                          # drop the buffer export so mmap.close() works later
        # Allocator state: sorted free intervals [start, end) in GPA, never spanning two regions.
        self._free: list[tuple[int, int]] = [(r.gpa, r.gpa + r.size) for r in by_gpa]
        self._allocated: dict[int, int] = {}

    # -- address translation --

    def region_of(self, gpa: int, n: int = 1) -> Region:
        """The region holding all of [gpa, gpa+n); ValueError if none does."""
        i = bisect_left(self._starts, gpa + 1) - 1
        if i >= 0:
            r = self._by_gpa[i]
            if gpa >= r.gpa and gpa + max(n, 1) <= r.gpa + r.size:
                return r
        raise ValueError(f"GPA range [{gpa:#x}, {gpa + n:#x}) is not inside one guest memory region")

    def offset(self, gpa: int, n: int = 1) -> int:
        """Offset into the shm object of guest-physical `gpa` (range must sit in one region)."""
        r = self.region_of(gpa, n)
        return r.mmap_offset + (gpa - r.gpa)

    def user_addr(self, gpa: int) -> int:
        """Frontend virtual address of `gpa` (what SET_VRING_ADDR carries)."""
        return self.base_va + self.offset(gpa)

    def region_user_addr(self, r: Region) -> int:
        return self.base_va + r.mmap_offset

    # -- access --

    def read(self, gpa: int, n: int) -> bytes:
        off = self.offset(gpa, n)
        return self.mm[off:off + n]

    def write(self, gpa: int, data) -> None:
        n = len(data)
        if n == 0:
            return
        off = self.offset(gpa, n)
        self.mm[off:off + n] = data

    def fill(self, gpa: int, n: int, byte: int) -> None:
        if n == 0:
            return
        off = self.offset(gpa, n)
        self.mm[off:off + n] = bytes([byte]) * n

    # -- allocator --

    def alloc(self, n: int, align: int = 16) -> int:
        """First-fit allocation of `n` bytes aligned to `align` (a power of two); returns a GPA.
        A block never straddles two regions."""
        if n <= 0:
            raise ValueError(f"allocation size {n} must be positive")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} must be a power of two")
        for i, (s, e) in enumerate(self._free):
            a = (s + align - 1) & ~(align - 1)
            if a + n <= e:
                pieces = []
                if a > s:
                    pieces.append((s, a))
                if a + n < e:
                    pieces.append((a + n, e))
                self._free[i:i + 1] = pieces
                self._allocated[a] = n
                return a
        raise GuestRAMFull(f"guest RAM exhausted: no block of {n} bytes (align {align}); "
                           f"{self.free_bytes} bytes free in {len(self._free)} fragments")

    def free(self, gpa: int) -> None:
        try:
            n = self._allocated.pop(gpa)
        except KeyError:
            raise ValueError(f"free of {gpa:#x}, which is not an allocated block") from None
        s, e = gpa, gpa + n
        i = bisect_left(self._free, (s, e))
        # merge with the following / preceding free block unless a region boundary lies between
        if i < len(self._free) and self._free[i][0] == e and not self._is_region_start(e):
            e = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == s and not self._is_region_start(s):
            s = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (s, e))

    def _is_region_start(self, gpa: int) -> bool:
        i = bisect_left(self._starts, gpa)
        return i < len(self._starts) and self._starts[i] == gpa

    @property
    def free_bytes(self) -> int:
        return sum(e - s for s, e in self._free)

    @property
    def allocated_blocks(self) -> int:
        return len(self._allocated)

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
