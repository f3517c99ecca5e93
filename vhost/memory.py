"""memory.py: guest memory as the backend sees it.

Owns mapping the frontend's region fds (and its dirty-log bitmap and inflight region,
`SharedRegion`) (mmap of `size + mmap_offset` from file offset 0, then
`base + mmap_offset`, as libvhost-user does), translating guest-physical (descriptor) and
frontend-virtual (ring) addresses to host pointers, and the packed region table the Cython engine
copies.  A GuestMemory is an immutable snapshot: SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG build a
new one.  Unmapping is explicit (`MappedRegion.unmap`) and is done by the protocol only after the
queue workers that used the old snapshot have stopped.  No sockets, no event loop, no threads.
"""
from __future__ import annotations

import ctypes
import os
import stat as _stat
import struct
from dataclasses import dataclass

# libc with mmap/munmap prototypes (vhost/testing/guarded.py maps its guarded regions with it)
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
LIBC.munmap.restype = ctypes.c_int
LIBC.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED = 1
MAP_FAILED = ctypes.c_void_p(-1).value
U64_MAX = (1 << 64) - 1

# One region-table entry for the Cython engine: gpa, size, uva, host (all u64, native endian),
# the layout of `mem_region_t` in cython_ext/ring.pxd.
REGION_ENTRY = struct.Struct("=QQQQ")


class MemoryError_(ValueError):
    """A region table or address that cannot be accepted."""


GuestMemoryError = MemoryError_


def map_shared(fd: int, length: int, offset: int, what: str) -> int:
    """mmap `length` bytes of `fd` from `offset`, shared read-write; returns the address.
    Only a regular file (memfd, shm, hugetlbfs, an image of guest RAM) is accepted -- a device
    (/dev/zero, /dev/mem...) or anything else is refused -- and it must be long enough, or
    touching the tail of the mapping would SIGBUS the whole process."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise GuestMemoryError(f"bad {what} fd: {e}") from None
    if not _stat.S_ISREG(st.st_mode):
        raise GuestMemoryError(f"{what} fd is not a regular file (memfd, shm or hugetlbfs)")
    if st.st_size < offset + length:
        raise GuestMemoryError(f"{what} fd is {st.st_size} bytes, {offset + length} needed")
    base = LIBC.mmap(None, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)
    if base is None or base == MAP_FAILED:
        err = ctypes.get_errno()
        raise GuestMemoryError(f"mmap of {what} failed: {os.strerror(err)}")
    return base


@dataclass(eq=False)
class MappedRegion:
    """One frontend memory region mapped into this process."""
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    map_base: int       # what mmap returned
    map_len: int        # size + mmap_offset

    @property
    def host_addr(self) -> int:
        return self.map_base + self.mmap_offset

    @classmethod
    def map(cls, fd: int, guest_addr: int, size: int, user_addr: int,
            mmap_offset: int) -> "MappedRegion":
        """Map `fd`; the caller still owns (and closes) the fd."""
        if size == 0:
            raise GuestMemoryError("region of size 0")
        if guest_addr + size - 1 > U64_MAX or user_addr + size - 1 > U64_MAX:
            raise GuestMemoryError("region wraps around the 64-bit address space")
        map_len = size + mmap_offset
        if map_len > U64_MAX or map_len >= 1 << 47:
            raise GuestMemoryError(f"region too large ({map_len:#x} bytes)")
        base = map_shared(fd, map_len, 0, "region")
        return cls(guest_addr, size, user_addr, mmap_offset, base, map_len)

    def unmap(self) -> None:
        if self.map_base:
            LIBC.munmap(self.map_base, self.map_len)
            self.map_base = 0

    def overlaps(self, other: "MappedRegion") -> bool:
        return (self.guest_addr < other.guest_addr + other.size
                and other.guest_addr < self.guest_addr + self.size)


@dataclass(eq=False)
class SharedRegion:
    """A frontend-shared mapping that is not guest RAM, mapped read-write: the dirty-log bitmap
    (SET_LOG_BASE) or the inflight region (GET/SET_INFLIGHT_FD)."""
    size: int
    map_base: int

    @property
    def host_addr(self) -> int:
        return self.map_base

    @classmethod
    def map(cls, fd: int, size: int, offset: int, what: str = "log") -> "SharedRegion":
        """Map `size` bytes of `fd` from `offset` (as libvhost-user); the caller closes fd."""
        if size == 0:
            raise GuestMemoryError(f"{what} of size 0")
        if size >= 1 << 47 or offset >= 1 << 63:
            raise GuestMemoryError(f"{what} too large ({size:#x} bytes at {offset:#x})")
        if offset % mmap_page():
            raise GuestMemoryError(f"{what} offset {offset:#x} is not page-aligned")
        return cls(size, map_shared(fd, size, offset, what))

    def unmap(self) -> None:
        if self.map_base:
            LIBC.munmap(self.map_base, self.size)
            self.map_base = 0


LogRegion = SharedRegion


def mmap_page() -> int:
    return os.sysconf("SC_PAGE_SIZE")


class GuestMemory:
    """An immutable snapshot of the region table."""

    def __init__(self, regions=()):
        regions = tuple(sorted(regions, key=lambda r: r.guest_addr))
        for a, b in zip(regions, regions[1:]):
            if a.overlaps(b):
                raise GuestMemoryError(
                    f"regions overlap at guest address {b.guest_addr:#x}")
        self.regions = regions

    def __len__(self) -> int:
        return len(self.regions)

    def with_region(self, region: MappedRegion) -> "GuestMemory":
        return GuestMemory(self.regions + (region,))

    def without_region(self, guest_addr: int, size: int, user_addr: int):
        """Return (new snapshot, removed region).  Matches as libvhost-user does: by guest
        address and size (user_addr is informative; QEMU sends the same one it added)."""
        for r in self.regions:
            if r.guest_addr == guest_addr and r.size == size:
                return GuestMemory(x for x in self.regions if x is not r), r
        raise GuestMemoryError(f"no region at guest address {guest_addr:#x} size {size:#x}")

    # -- translation (Python side: ring setup and tests; the data path uses the C copy) --------

    def gpa_to_host(self, gpa: int, length: int) -> int:
        for r in self.regions:
            if r.guest_addr <= gpa and gpa - r.guest_addr + length <= r.size:
                return r.host_addr + (gpa - r.guest_addr)
        raise GuestMemoryError(f"guest address {gpa:#x}+{length:#x} is not in one region")

    def uva_to_host(self, uva: int, length: int) -> int:
        for r in self.regions:
            if r.user_addr <= uva and uva - r.user_addr + length <= r.size:
                return r.host_addr + (uva - r.user_addr)
        raise GuestMemoryError(f"frontend address {uva:#x}+{length:#x} is not in one region")

    def read(self, gpa: int, length: int) -> bytes:
        return ctypes.string_at(self.gpa_to_host(gpa, length), length)

    def write(self, gpa: int, data: bytes) -> None:
        ctypes.memmove(self.gpa_to_host(gpa, len(data)), data, len(data))

    def table_bytes(self) -> bytes:
        """The region table packed for the Cython engine (REGION_ENTRY per region)."""
        return b"".join(REGION_ENTRY.pack(r.guest_addr, r.size, r.user_addr, r.host_addr)
                        for r in self.regions)

    def unmap_all(self) -> None:
        for r in self.regions:
            r.unmap()
