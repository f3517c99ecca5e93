"""frontend.py: a vhost-user *frontend* driver -- the role QEMU plays -- for tests and benchmarks.

Like DPDK's virtio_user, this drives a vhost-user backend over a real Unix socket without a VM:

* Owns the "guest RAM": one `posix_ipc.SharedMemory` object (created O_CREX and unlinked at once),
  mmap'd here and handed to the backend with SCM_RIGHTS, laid out as one region, as QEMU's PC
  layout of two regions with a GPA hole ([0, 640 KiB) and [768 KiB, ...)), or as any table the
  caller gives; a small first-fit allocator (`GuestRAM.alloc/free`) places rings and buffers in it.
* Owns the connection: QEMU's message sequence (features, protocol features, queue count, owner,
  config, memory table via SET_MEM_TABLE or ADD_MEM_REG, vring setup, enable), REPLY_ACK checks,
  and GET_VRING_BASE on close.
* Owns the *driver* side of split virtqueues (`VirtQueue`): descriptor table, avail and used rings
  in guest RAM; direct and indirect chains; publishing with the right store ordering; kicks that
  honour VIRTQ_USED_F_NO_NOTIFY / EVENT_IDX avail_event; reaping the used ring; waiting on the
  call eventfd.  Lower-level entry points (`write_desc`, `add_raw_descs`, `write_indirect_table`,
  `write_avail_entry`, `set_avail_idx`) let ring tests lay out hostile chains on purpose.
* virtio-blk requests on top (`Frontend`: `read`, `write`, `flush`, `discard`, `write_zeroes`,
  `get_id`, and the pipelined `submit_many`), with optional random scatter-gather splitting of
  data buffers.
* virtio-net on top (`NetFrontend`): rx buffers posted and refilled (mergeable or big chains),
  `send`/`send_many` with a virtio_net_hdr, `recv`/`recv_many` reassembling mergeable buffers
  by num_buffers; helpers to build test frames (`make_frame`, `tcp4_frame`, `tcp4_gso_hdr`).
  Both share the connection, memory and ring code in `VhostUserFrontend`.

What it must not do:
* It is not part of the backend: nothing in vhost/server.py, devices/ or cython_ext/ imports it,
  and it imports only protocols/.  It is the one module besides server.py that touches a socket,
  and it does so synchronously (no event loop, no threads).
* It trusts nothing the backend does: every wait is bounded by a timeout (TimeoutError with the
  ring state, never a hang), a disconnect or a malformed reply raises VhostUserError naming the
  message, and a used-ring entry that names an unknown head or jumps too far is reported.
* It never reads or writes outside its own shared-memory object, and it kills no processes; the
  test fixtures own the backend's lifetime.

Memory ordering: x86-64 (TSO) keeps stores in program order and loads in program order, so
descriptor writes are visible before the avail index that publishes them, and the used index is
read before the used entries.  The two store->load orderings virtio needs (publish avail idx, then
read avail_event / used flags; write used_event, then re-read used idx) get a full fence from an
uncontended lock acquire (a LOCK-prefixed instruction).  The fields the backend reads while we
write them (avail idx, avail flags, used_event) are stored through ctypes c_uint16 cells (one
16-bit store), *not* with `struct.pack_into`: CPython's pack_into first memsets its target to zero
and then writes the value, so a backend polling the ring (DPDK does) can read a transient avail
idx of 0 -- ~65000 phantom entries -- and run through stale descriptors until the index wraps.
Reads use `struct.unpack_from` (a single 16-bit load).  Ring entries and descriptors that are not
yet published may be written with pack_into.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from bisect import bisect_left
from collections import deque
from typing import Iterable, NamedTuple, Sequence

import posix_ipc

from protocols import virtio
from protocols import virtio_blk as vblk
from protocols import virtio_net as vnet
from protocols.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_MEM_TABLE_REGIONS,
    VERSION,
    VERSION_MASK,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Config,
    FrontendReq,
    Header,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    build_message,
    request_name,
    u64,
)

if sys.byteorder != "little":  # pragma: no cover - virtio 1.x rings are little-endian
    raise ImportError("vhost.frontend assumes a little-endian host (native ring accessors)")

KiB = 1024
MiB = 1024 * KiB
PAGE_SIZE = mmap.PAGESIZE

# QEMU's PC layout below 1 MiB: RAM [0, 640 KiB), VGA/ROM hole, RAM again from 768 KiB.  QEMU sends
# the second region with mmap_offset == its GPA (recorded in ../shared/traces).
PC_LOW_RAM_END = 640 * KiB
PC_HIGH_RAM_START = 768 * KiB

# Device-specific feature bits this driver accepts from a virtio-blk backend by default.
BLK_DRIVER_FEATURES = (
    vblk.F_SIZE_MAX | vblk.F_SEG_MAX | vblk.F_GEOMETRY | vblk.F_RO | vblk.F_BLK_SIZE
    | vblk.F_FLUSH | vblk.F_TOPOLOGY | vblk.F_CONFIG_WCE | vblk.F_MQ | vblk.F_DISCARD
    | vblk.F_WRITE_ZEROES
)

# Protocol features negotiated when offered (QEMU asks for more; these are what we implement).
WANTED_PROTOCOL_FEATURES = (
    ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
)

DEFAULT_TIMEOUT = 10.0
STATUS_POISON = 0xFF     # status byte before submission: detects a backend that never wrote it
READ_POISON = 0xA5       # read buffers are filled with this before submission
MAX_REPLY_PAYLOAD = 4096

# Native-format accessors.  Loads are single 16-bit loads; pack_into is only for fields the
# backend does not read concurrently (it zeroes its target before writing: module docstring).
_U16 = struct.Struct("H")
_USED_ELEM = struct.Struct("II")
_DESC = struct.Struct("QIHH")
assert _DESC.size == virtio.DESC_SIZE and _USED_ELEM.size == virtio.USED_ELEM_SIZE

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: acquiring an uncontended lock is a LOCK-prefixed RMW on x86."""
    _fence_lock.acquire()
    _fence_lock.release()


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio spec 2.7.10: notify if event_idx is in [old_idx, new_idx) (mod 2^16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class FrontendError(Exception):
    """Base class for errors raised by the frontend driver."""


class VhostUserError(FrontendError):
    """The backend misbehaved on the socket: disconnect, failure ack, malformed reply."""


class RingError(FrontendError):
    """The backend misbehaved on a ring (unknown used id, used index jumped too far)."""


class QueueFull(FrontendError):
    """Not enough free descriptors for a chain."""


class GuestRAMFull(FrontendError, MemoryError):
    """The guest-RAM allocator has no block large enough."""


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


# --------------------------------------------------------------------------------------------
# Split virtqueue, driver side
# --------------------------------------------------------------------------------------------

class VirtQueue:
    """The driver side of one split virtqueue whose rings live in `ram`.

    Descriptor ownership: `add_chain` / `add_raw_descs` take descriptors from the free list and
    remember the chain under its head; when the used ring returns that head, its descriptors
    (and an indirect table allocated by `add_chain`) are released.  Data buffers belong to the
    caller.
    """

    def __init__(self, ram: GuestRAM, index: int, size: int, *, event_idx: bool,
                 kick_fd: int, call_fd: int):
        if not 1 <= size <= virtio.MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {size} out of range 1..{virtio.MAX_QUEUE_SIZE}")
        self.ram = ram
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.desc_gpa = ram.alloc(virtio.desc_table_size(size), align=virtio.DESC_ALIGN)
        self.avail_gpa = ram.alloc(virtio.avail_ring_size(size), align=virtio.AVAIL_ALIGN)
        self.used_gpa = ram.alloc(virtio.used_ring_size(size), align=virtio.USED_ALIGN)
        self._desc_off = ram.offset(self.desc_gpa, virtio.desc_table_size(size))
        self._avail_off = ram.offset(self.avail_gpa, virtio.avail_ring_size(size))
        self._used_off = ram.offset(self.used_gpa, virtio.used_ring_size(size))
        ram.fill(self.desc_gpa, virtio.desc_table_size(size), 0)
        ram.fill(self.avail_gpa, virtio.avail_ring_size(size), 0)
        ram.fill(self.used_gpa, virtio.used_ring_size(size), 0)
        # single-store cells for the fields a polling backend may read at any time
        base = ram.base_va
        self._avail_flags_cell = ctypes.c_uint16.from_address(base + self._avail_off)
        self._avail_idx_cell = ctypes.c_uint16.from_address(base + self._avail_off + 2)
        self._used_event_cell = ctypes.c_uint16.from_address(
            base + self._avail_off + 4 + 2 * size)
        self._free: list[int] = list(range(size - 1, -1, -1))   # pop() hands out 0, 1, 2, ...
        self._chains: dict[int, tuple[list[int], int | None]] = {}
        self.avail_idx = 0          # shadow of avail->idx
        self.last_used_idx = 0      # next used entry to consume
        self._kick_old = 0          # avail idx at the previous kick decision
        self.kicks = 0
        self.kicks_suppressed = 0
        self.interrupts = 0
        self.max_in_flight = 0      # high-water mark of outstanding chains
        self.unknown_used: list[tuple[int, int]] = []

    # -- addresses the backend needs --

    def addresses(self) -> tuple[int, int, int]:
        """Frontend virtual addresses (desc, used, avail) for SET_VRING_ADDR."""
        return (self.ram.user_addr(self.desc_gpa), self.ram.user_addr(self.used_gpa),
                self.ram.user_addr(self.avail_gpa))

    # -- descriptors --

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Write descriptor table entry `i` verbatim (any values; for hostile tests)."""
        if not 0 <= i < self.size:
            raise IndexError(f"descriptor index {i} outside the table of {self.size}")
        _DESC.pack_into(self.ram.mm, self._desc_off + i * virtio.DESC_SIZE,
                        addr & 0xFFFFFFFFFFFFFFFF, length & 0xFFFFFFFF, flags & 0xFFFF,
                        next & 0xFFFF)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack_from(self.ram.mm, self._desc_off + i * virtio.DESC_SIZE)

    def reserve_descs(self, n: int) -> list[int]:
        """Take `n` free descriptor indices (not yet part of a recorded chain)."""
        if n > len(self._free):
            raise QueueFull(f"queue {self.index}: {n} descriptors needed, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def add_chain(self, segments: Sequence[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Lay out a chain of (gpa, len, device_writable) segments; returns its head index.
        With `indirect`, the segments go to an indirect table allocated in guest RAM and the
        ring holds one INDIRECT descriptor.  Not yet published: see `publish`."""
        if not segments:
            raise ValueError("a chain needs at least one segment")
        n = len(segments)
        if indirect:
            table = self.ram.alloc(n * virtio.DESC_SIZE, align=virtio.DESC_ALIGN)
            off = self.ram.offset(table, n * virtio.DESC_SIZE)
            mm = self.ram.mm
            for k, (addr, length, writable) in enumerate(segments):
                flags = (virtio.VIRTQ_DESC_F_WRITE if writable else 0) | \
                        (virtio.VIRTQ_DESC_F_NEXT if k < n - 1 else 0)
                _DESC.pack_into(mm, off + k * virtio.DESC_SIZE, addr, length, flags,
                                k + 1 if k < n - 1 else 0)
            try:
                (head,) = self.reserve_descs(1)
            except QueueFull:
                self.ram.free(table)
                raise
            self.write_desc(head, table, n * virtio.DESC_SIZE, virtio.VIRTQ_DESC_F_INDIRECT, 0)
            self._chains[head] = ([head], table)
            self.max_in_flight = max(self.max_in_flight, len(self._chains))
            return head
        idx = self.reserve_descs(n)
        for k, (addr, length, writable) in enumerate(segments):
            flags = (virtio.VIRTQ_DESC_F_WRITE if writable else 0) | \
                    (virtio.VIRTQ_DESC_F_NEXT if k < n - 1 else 0)
            self.write_desc(idx[k], addr, length, flags, idx[k + 1] if k < n - 1 else 0)
        self._chains[idx[0]] = (idx, None)
        self.max_in_flight = max(self.max_in_flight, len(self._chains))
        return idx[0]

    def add_raw_descs(self, entries: Sequence[tuple[int, int, int, int | None]],
                      indices: Sequence[int] | None = None) -> list[int]:
        """Write arbitrary (addr, len, flags, next) entries; returns the indices used, the first
        being the head to publish.  `next=None` means "the next entry's index" (0 for the
        last); any other value is written verbatim, so loops and out-of-range links are
        possible.  Without `indices`, free descriptors are taken; with them, the given slots are
        written (those that were free are taken off the free list).  The taken slots are
        recorded as a chain under indices[0] and released when the backend returns that head."""
        if indices is None:
            indices = self.reserve_descs(len(entries))
            taken = list(indices)
        else:
            indices = list(indices)
            if len(indices) != len(entries):
                raise ValueError("indices and entries differ in length")
            taken = []
            for i in indices:
                if i in self._free:
                    self._free.remove(i)
                    taken.append(i)
        for k, (addr, length, flags, nxt) in enumerate(entries):
            if nxt is None:
                nxt = indices[k + 1] if k + 1 < len(indices) else 0
            self.write_desc(indices[k], addr, length, flags, nxt)
        if taken and indices:
            self._chains[indices[0]] = (taken, None)
        return list(indices)

    def write_indirect_table(self, entries: Sequence[tuple[int, int, int, int | None]],
                             extra: int = 0) -> tuple[int, int]:
        """Allocate an indirect table in guest RAM holding (addr, len, flags, next) entries
        (`next=None` = following entry, 0 for the last); `extra` bytes of zeroes follow.
        Returns (gpa, nbytes of the entries); the caller frees it with `ram.free(gpa)`."""
        nbytes = len(entries) * virtio.DESC_SIZE
        gpa = self.ram.alloc(max(nbytes + extra, 1), align=virtio.DESC_ALIGN)
        self.ram.fill(gpa, nbytes + extra, 0)
        off = self.ram.offset(gpa, nbytes + extra)
        for k, (addr, length, flags, nxt) in enumerate(entries):
            if nxt is None:
                nxt = k + 1 if k + 1 < len(entries) else 0
            _DESC.pack_into(self.ram.mm, off + k * virtio.DESC_SIZE, addr & (2**64 - 1),
                            length & 0xFFFFFFFF, flags & 0xFFFF, nxt & 0xFFFF)
        return gpa, nbytes

    def _release(self, head: int) -> bool:
        chain = self._chains.pop(head, None)
        if chain is None:
            return False
        idx, table = chain
        self._free.extend(reversed(idx))
        if table is not None:
            self.ram.free(table)
        return True

    # -- avail ring --

    def write_avail_entry(self, slot: int, head: int) -> None:
        """Write avail->ring[slot % size] verbatim (no index update)."""
        off = self._avail_off + 4 + 2 * (slot % self.size)
        self._store(ctypes.c_uint16.from_address(self.ram.base_va + off), head)

    def _store(self, cell: ctypes.c_uint16, value: int) -> None:
        """One 16-bit store into guest RAM (see the module docstring: never pack_into here)."""
        if self.ram.mm is None:
            raise ValueError(f"queue {self.index}: guest RAM is closed")
        cell.value = value & 0xFFFF

    def set_avail_idx(self, idx: int) -> None:
        """Store avail->idx (and the shadow) verbatim; for hostile tests."""
        self.avail_idx = idx & 0xFFFF
        self._store(self._avail_idx_cell, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self._store(self._avail_flags_cell, flags)

    def publish(self, heads: Iterable[int]) -> int:
        """Put `heads` in the avail ring, then store the new avail->idx.  Returns the count."""
        mm, base, size = self.ram.mm, self._avail_off + 4, self.size
        n = 0
        idx = self.avail_idx
        for h in heads:
            _U16.pack_into(mm, base + 2 * ((idx + n) % size), h & 0xFFFF)
            n += 1
        if n:
            # Ring entries before the index: stores stay in program order on x86 (TSO).
            self.avail_idx = (idx + n) & 0xFFFF
            self._store(self._avail_idx_cell, self.avail_idx)
        return n

    # -- notifications --

    def used_flags(self) -> int:
        return _U16.unpack_from(self.ram.mm, self._used_off)[0]

    def avail_event(self) -> int:
        return _U16.unpack_from(self.ram.mm, self._used_off + 4 + 8 * self.size)[0]

    def notify_needed(self) -> bool:
        """Whether the backend asked to be kicked for what was published since the last kick
        decision (EVENT_IDX: avail_event in [old, new); otherwise: no USED_F_NO_NOTIFY)."""
        full_fence()          # our avail idx store must be visible before we read its answer
        new, old = self.avail_idx, self._kick_old
        self._kick_old = new
        if self.event_idx:
            return vring_need_event(self.avail_event(), new, old)
        return not (self.used_flags() & virtio.VIRTQ_USED_F_NO_NOTIFY)

    def kick(self, force: bool = False) -> bool:
        """Signal the kick eventfd if the backend wants it (or always with `force`).
        Returns whether it was signalled."""
        needed = self.notify_needed()
        if needed or force:
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1
            return True
        self.kicks_suppressed += 1
        return False

    # -- used ring --

    def used_idx(self) -> int:
        return _U16.unpack_from(self.ram.mm, self._used_off + 2)[0]

    def has_used(self) -> bool:
        return self.used_idx() != self.last_used_idx

    def reap(self) -> list[tuple[int, int]]:
        """Consume every new used entry; returns [(id, len), ...].  Chains are released; ids
        that are not the head of an outstanding chain are returned too and kept in
        `unknown_used` (a backend bug unless the test put them there)."""
        used_idx = self.used_idx()
        pending = (used_idx - self.last_used_idx) & 0xFFFF
        if pending == 0:
            return []
        if pending > self.size:
            raise RingError(f"queue {self.index}: used idx {used_idx} is {pending} entries ahead "
                            f"of the last seen {self.last_used_idx} (queue size {self.size})")
        out = []
        mm, base, size = self.ram.mm, self._used_off + 4, self.size
        last = self.last_used_idx
        for k in range(pending):
            uid, ulen = _USED_ELEM.unpack_from(mm, base + 8 * ((last + k) % size))
            if not self._release(uid):
                self.unknown_used.append((uid, ulen))
            out.append((uid, ulen))
        self.last_used_idx = used_idx
        return out

    def arm_interrupt(self) -> bool:
        """Ask for a call on the next used entry (EVENT_IDX: used_event = last_used_idx), then
        re-check the used ring.  Returns True if entries are already waiting (don't sleep)."""
        if self.event_idx:
            self._store(self._used_event_cell, self.last_used_idx)
        else:
            self.set_avail_flags(0)
        full_fence()          # used_event store before the used idx load
        return self.has_used()

    def drain_call(self) -> bool:
        """Clear the call eventfd; True if it had been signalled."""
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return False
        self.interrupts += 1
        return True

    def wait_used(self, n: int = 1, timeout: float | None = DEFAULT_TIMEOUT
                  ) -> list[tuple[int, int]]:
        """Wait until at least `n` used entries were consumed; returns all consumed (>= n).
        Raises TimeoutError (with the ring state) after `timeout` seconds."""
        got = self.reap()
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(got) < n:
            if self.arm_interrupt():
                got += self.reap()
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{self.describe()}: waited {timeout}s for {n} used "
                                   f"entries, got {len(got)}")
            poller = select.poll()          # poll, not select: fds may exceed FD_SETSIZE
            poller.register(self.call_fd, select.POLLIN)
            if poller.poll(None if remaining is None else remaining * 1000):
                self.drain_call()
            got += self.reap()
        return got

    def describe(self) -> str:
        return (f"queue {self.index} (size {self.size}): avail idx {self.avail_idx}, "
                f"used idx {self.used_idx()}, last used {self.last_used_idx}, "
                f"{self.in_flight} chains in flight, kicks {self.kicks} "
                f"(+{self.kicks_suppressed} suppressed), calls {self.interrupts}")


# --------------------------------------------------------------------------------------------
# virtio-blk requests
# --------------------------------------------------------------------------------------------

class BlkRequest(NamedTuple):
    """A virtio-blk request: header (type, sector), `out` bytes the device reads after the
    header, `in_len` bytes the device writes before the status byte."""
    type: int
    sector: int = 0
    out: bytes = b""
    in_len: int = 0


class BlkResult(NamedTuple):
    status: int          # the status byte (STATUS_POISON if the backend never wrote it)
    data: bytes          # the `in_len` bytes the device wrote (read data, id string)
    used_len: int        # the length the backend put in the used ring


def blk_read(sector: int, nbytes: int) -> BlkRequest:
    return BlkRequest(vblk.T_IN, sector, b"", nbytes)


def blk_write(sector: int, data: bytes) -> BlkRequest:
    return BlkRequest(vblk.T_OUT, sector, bytes(data), 0)


def blk_flush() -> BlkRequest:
    return BlkRequest(vblk.T_FLUSH, 0)


def blk_get_id() -> BlkRequest:
    return BlkRequest(vblk.T_GET_ID, 0, b"", vblk.ID_BYTES)


def blk_discard(sector: int, nsectors: int) -> BlkRequest:
    seg = vblk.DiscardWriteZeroes.build(dict(sector=sector, num_sectors=nsectors, flags=0))
    return BlkRequest(vblk.T_DISCARD, 0, seg, 0)


def blk_write_zeroes(sector: int, nsectors: int, unmap: bool = False) -> BlkRequest:
    flags = vblk.WRITE_ZEROES_FLAG_UNMAP if unmap else 0
    seg = vblk.DiscardWriteZeroes.build(dict(sector=sector, num_sectors=nsectors, flags=flags))
    return BlkRequest(vblk.T_WRITE_ZEROES, 0, seg, 0)


class _Inflight:
    __slots__ = ("i", "blocks", "in_pieces", "status_gpa", "head")

    def __init__(self, i, blocks, in_pieces, status_gpa, head):
        self.i = i
        self.blocks = blocks
        self.in_pieces = in_pieces
        self.status_gpa = status_gpa
        self.head = head


# --------------------------------------------------------------------------------------------
# The frontend
# --------------------------------------------------------------------------------------------

class VhostUserFrontend:
    """The device-independent part of a vhost-user frontend over `socket_path`: the connection,
    guest RAM, feature negotiation and split-ring setup.  `connect()` (or `with ... as f`) runs
    QEMU's setup sequence; `close()` stops the rings and releases everything.  Device drivers
    (`Frontend` for virtio-blk, `NetFrontend` for virtio-net) subclass it and fill in the hooks
    (`_check_queue_count`, `_read_device_config`, `_driver_features`, `_after_features`,
    `_after_start`).

    Options: `regions` (a custom [(gpa, size, mmap_offset), ...] layout of the shm object),
    `two_regions` (QEMU's PC layout with a hole), `use_add_mem_reg` (None: ADD_MEM_REG when
    CONFIGURE_MEM_SLOTS is offered, as QEMU does; True: require it; False: always
    SET_MEM_TABLE), `protocol_features` (mask of protocol features we may negotiate),
    `device_features` (device-specific feature bits we accept), `timeout` (seconds, every wait).
    """

    def __init__(self, socket_path: str | os.PathLike, *, mem_size: int = 64 * MiB,
                 num_queues: int = 1, queue_size: int = 128, two_regions: bool = False,
                 event_idx: bool = True, indirect: bool = True,
                 regions: Sequence[tuple[int, int, int]] | None = None,
                 use_add_mem_reg: bool | None = None,
                 protocol_features: int = WANTED_PROTOCOL_FEATURES,
                 device_features: int = 0,
                 timeout: float = DEFAULT_TIMEOUT):
        if two_regions and regions is not None:
            raise ValueError("give either two_regions or regions, not both")
        if num_queues < 1:
            raise ValueError("num_queues must be >= 1")
        self.socket_path = os.fspath(socket_path)
        self.mem_size = mem_size
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.layout = (list(regions) if regions is not None else
                       pc_two_region_layout(mem_size) if two_regions else
                       one_region_layout(mem_size))
        self.use_add_mem_reg = use_add_mem_reg
        self.protocol_features_mask = int(protocol_features)
        self.device_features_mask = device_features
        self.timeout = timeout

        self.sock: socket.socket | None = None
        self.mem: GuestRAM | None = None
        self.queues: list[VirtQueue] = []
        self._eventfds: list[int] = []
        self.backend_features = 0
        self.features = 0                       # what we sent in SET_FEATURES
        self.backend_protocol_features = 0
        self.protocol_features = 0              # negotiated
        self.max_queues = 1
        self.max_mem_slots: int | None = None
        self.config = None                      # the device's config space, parsed
        self.mem_table_via: str | None = None   # "SET_MEM_TABLE" or "ADD_MEM_REG"
        self.vring_bases: list[int] | None = None
        self._started = False
        self._closed = False

    # -- context manager --

    def __enter__(self):
        return self.connect()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:       # keep the original error visible
                pass

    # -- negotiated state --

    @property
    def has_event_idx(self) -> bool:
        return bool(self.features & virtio.F_RING_EVENT_IDX)

    @property
    def has_indirect(self) -> bool:
        return bool(self.features & virtio.F_RING_INDIRECT_DESC)

    def has_protocol_feature(self, f: int) -> bool:
        return bool(self.protocol_features & f)

    # -- socket level --

    def _connect_socket(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.settimeout(self.timeout)
                s.connect(self.socket_path)
                self.sock = s
                return
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise VhostUserError(f"cannot connect to {self.socket_path} within "
                                         f"{self.timeout}s: {e}") from e
                time.sleep(0.02)
            except BaseException:
                s.close()
                raise

    def send_message(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
                     flags: int = VERSION) -> None:
        """Send one message (header + payload, fds via SCM_RIGHTS) verbatim."""
        if self.sock is None:
            raise VhostUserError("not connected")
        msg = build_message(request, payload, flags)
        try:
            if fds:
                sent = socket.send_fds(self.sock, [msg], list(fds))
            else:
                sent = self.sock.send(msg)
        except OSError as e:
            raise VhostUserError(f"sending {request_name(request)}: {e}") from e
        if sent != len(msg):
            raise VhostUserError(f"sending {request_name(request)}: short write {sent}/{len(msg)}")

    def _recv_exact(self, n: int, what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except socket.timeout:
                raise TimeoutError(f"no reply to {what} within {self.timeout}s") from None
            except OSError as e:
                raise VhostUserError(f"receiving reply to {what}: {e}") from e
            if not chunk:
                raise VhostUserError(f"backend closed the connection while we waited for the "
                                     f"reply to {what}")
            buf += chunk
        return bytes(buf)

    def recv_reply(self, request: int) -> bytes:
        """Read one reply and check it answers `request`; returns its payload."""
        name = request_name(request)
        hdr = Header.parse(self._recv_exact(HEADER_SIZE, name))
        if hdr.size > MAX_REPLY_PAYLOAD:
            raise VhostUserError(f"reply to {name}: payload size {hdr.size} is implausible")
        payload = self._recv_exact(hdr.size, name) if hdr.size else b""
        if hdr.request != request:
            raise VhostUserError(f"reply to {name} carries request {request_name(hdr.request)}")
        if not hdr.flags & FLAG_REPLY or (hdr.flags & VERSION_MASK) != VERSION:
            raise VhostUserError(f"reply to {name}: bad flags {hdr.flags:#x}")
        return payload

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send a request that has a reply of its own (GET_*) and return the reply payload."""
        self.send_message(request, payload, fds)
        return self.recv_reply(request)

    def call_u64(self, request: int, payload: bytes = b"") -> int:
        reply = self.call(request, payload)
        if len(reply) != 8:
            raise VhostUserError(f"reply to {request_name(request)}: payload of {len(reply)} "
                                 f"bytes, expected a u64")
        return int.from_bytes(reply, "little")

    def setup(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send a request without a reply of its own; with REPLY_ACK negotiated, set NEED_REPLY
        and check the ack (non-zero = failure)."""
        if self.protocol_features & ProtocolFeature.REPLY_ACK:
            self.send_message(request, payload, fds, VERSION | FLAG_NEED_REPLY)
            reply = self.recv_reply(request)
            if len(reply) != 8:
                raise VhostUserError(f"ack of {request_name(request)}: payload of {len(reply)} "
                                     f"bytes, expected a u64")
            status = int.from_bytes(reply, "little")
            if status != 0:
                raise VhostUserError(f"{request_name(request)} failed: backend acked {status}")
        else:
            self.send_message(request, payload, fds)

    # -- setup sequence --

    def connect(self):
        """Connect and run QEMU's sequence up to enabled rings."""
        if self.sock is not None or self._closed:
            raise FrontendError("connect() called twice")
        try:
            self._connect()
        except BaseException:
            self._release()
            self._closed = True
            raise
        return self

    def _connect(self) -> None:
        self._connect_socket()
        self.mem = GuestRAM(self.mem_size, self.layout)

        self.backend_features = self.call_u64(FrontendReq.GET_FEATURES)
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.backend_protocol_features = self.call_u64(FrontendReq.GET_PROTOCOL_FEATURES)
            pf = self.backend_protocol_features & self.protocol_features_mask
            self.send_message(FrontendReq.SET_PROTOCOL_FEATURES, u64(pf))
            self.protocol_features = pf
        if self.protocol_features & ProtocolFeature.MQ:
            self.max_queues = self.call_u64(FrontendReq.GET_QUEUE_NUM)
        else:
            self.max_queues = 1
        self._check_queue_count()
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            self.max_mem_slots = self.call_u64(FrontendReq.GET_MAX_MEM_SLOTS)

        self.setup(FrontendReq.SET_OWNER)

        if self.protocol_features & ProtocolFeature.CONFIG:
            self._read_device_config()

        wanted = (self._driver_features() | virtio.F_VERSION_1 | virtio.F_ANY_LAYOUT
                  | (virtio.F_RING_EVENT_IDX if self.want_event_idx else 0)
                  | (virtio.F_RING_INDIRECT_DESC if self.want_indirect else 0)
                  | VHOST_USER_F_PROTOCOL_FEATURES)
        self.features = self.backend_features & wanted
        self.setup(FrontendReq.SET_FEATURES, u64(self.features))
        self._after_features()

        self._send_memory_table()

        for q in range(self.num_queues):
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._eventfds.append(kick)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._eventfds.append(call)
            self.queues.append(VirtQueue(self.mem, q, self.queue_size,
                                         event_idx=self.has_event_idx,
                                         kick_fd=kick, call_fd=call))
        for vq in self.queues:
            q = vq.index
            self.setup(FrontendReq.SET_VRING_NUM, VringState.build(dict(index=q, num=vq.size)))
            self.setup(FrontendReq.SET_VRING_BASE, VringState.build(dict(index=q, num=0)))
            desc, used, avail = vq.addresses()
            self.setup(FrontendReq.SET_VRING_ADDR, VringAddr.build(dict(
                index=q, flags=0, descriptor=desc, used=used, available=avail, log=0)))
            self.setup(FrontendReq.SET_VRING_KICK, u64(q), [vq.kick_fd])
            self.setup(FrontendReq.SET_VRING_CALL, u64(q), [vq.call_fd])
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            for vq in self.queues:
                self.setup(FrontendReq.SET_VRING_ENABLE,
                           VringState.build(dict(index=vq.index, num=1)))
        self._started = True
        self._after_start()

    # -- hooks for the device drivers --

    def _check_queue_count(self) -> None:
        """After GET_QUEUE_NUM: refuse more queues than the backend has."""
        if self.num_queues > self.max_queues:
            raise FrontendError(f"{self.num_queues} queues requested, backend supports "
                                f"{self.max_queues}"
                                + ("" if self.protocol_features & ProtocolFeature.MQ
                                   else " (protocol feature MQ not negotiated)"))

    def _read_device_config(self) -> None:
        """After SET_OWNER, when protocol feature CONFIG was negotiated: fill `self.config`."""

    def _driver_features(self) -> int:
        """Device-specific feature bits we accept (intersected with the backend's offer)."""
        return self.device_features_mask

    def _after_features(self) -> None:
        """After SET_FEATURES (self.features is final), before the memory table."""

    def _after_start(self) -> None:
        """After the rings are set up and enabled."""

    def _region_dict(self, r: Region) -> dict:
        return dict(guest_addr=r.gpa, size=r.size, user_addr=self.mem.region_user_addr(r),
                    mmap_offset=r.mmap_offset)

    def _send_memory_table(self) -> None:
        slots = bool(self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS)
        if self.use_add_mem_reg and not slots:
            raise FrontendError("ADD_MEM_REG requested but the backend does not offer "
                                "CONFIGURE_MEM_SLOTS")
        regions = self.mem.regions
        if slots and self.use_add_mem_reg is not False:
            if self.max_mem_slots is not None and len(regions) > self.max_mem_slots:
                raise FrontendError(f"{len(regions)} regions, backend has "
                                    f"{self.max_mem_slots} memory slots")
            for r in regions:
                self.setup(FrontendReq.ADD_MEM_REG, SingleMemoryRegion.build(
                    dict(padding=0, region=self._region_dict(r))), [self.mem.fd])
            self.mem_table_via = "ADD_MEM_REG"
        else:
            if len(regions) > MAX_MEM_TABLE_REGIONS:
                raise FrontendError(f"{len(regions)} regions do not fit in SET_MEM_TABLE "
                                    f"(at most {MAX_MEM_TABLE_REGIONS})")
            table = MemoryTable.build(dict(num_regions=len(regions), padding=0,
                                           regions=[self._region_dict(r) for r in regions]))
            self.setup(FrontendReq.SET_MEM_TABLE, table, [self.mem.fd] * len(regions))
            self.mem_table_via = "SET_MEM_TABLE"

    def get_config_raw(self, size: int, offset: int = 0) -> bytes:
        """GET_CONFIG of `size` bytes at `offset`; the raw config bytes."""
        payload = Config.build(dict(offset=offset, size=size, flags=0, payload=bytes(size)))
        reply = self.call(FrontendReq.GET_CONFIG, payload)
        if len(reply) < 12:
            raise VhostUserError(f"GET_CONFIG reply of {len(reply)} bytes")
        c = Config.parse(reply)
        if c.size == 0 or len(c.payload) != size:
            raise VhostUserError(f"GET_CONFIG failed: backend returned {c.size} bytes of config "
                                 f"(asked {size} at offset {offset})")
        return c.payload

    # -- teardown --

    def close(self) -> list[int] | None:
        """Disable the rings and GET_VRING_BASE each (QEMU's stop), then close the socket, the
        eventfds and guest RAM.  Returns the backend's last avail index per queue (None if the
        rings were never started).  Resources are released even if the backend fails."""
        if self._closed:
            return self.vring_bases
        self._closed = True
        try:
            if self._started and self.sock is not None:
                if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
                    for vq in self.queues:
                        self.setup(FrontendReq.SET_VRING_ENABLE,
                                   VringState.build(dict(index=vq.index, num=0)))
                bases = []
                for vq in self.queues:
                    reply = self.call(FrontendReq.GET_VRING_BASE,
                                      VringState.build(dict(index=vq.index, num=0)))
                    if len(reply) != VringState.sizeof():
                        raise VhostUserError(f"GET_VRING_BASE reply of {len(reply)} bytes")
                    st = VringState.parse(reply)
                    if st.index != vq.index:
                        raise VhostUserError(f"GET_VRING_BASE for queue {vq.index} answered for "
                                             f"queue {st.index}")
                    bases.append(st.num)
                self.vring_bases = bases
        finally:
            self._release()
        return self.vring_bases

    def _release(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []
        if self.mem is not None:
            self.mem.close()

    def describe(self) -> str:
        return (f"{type(self).__name__}({self.socket_path}): features {self.features:#x}, "
                f"protocol features {self.protocol_features:#x}, memory via "
                f"{self.mem_table_via}, " + "; ".join(vq.describe() for vq in self.queues))


class Frontend(VhostUserFrontend):
    """A vhost-user-blk frontend over `socket_path` (see VhostUserFrontend for the connection
    options).  Blk options: `device_features` (virtio-blk feature bits we accept), `seed`
    (random scatter-gather splitting of request buffers and a random choice of indirect vs
    direct chains; None = one descriptor per buffer, indirect whenever negotiated),
    `max_segments` (upper bound of pieces per data buffer).
    """

    def __init__(self, socket_path: str | os.PathLike, *, mem_size: int = 64 * MiB,
                 num_queues: int = 1, queue_size: int = 128, two_regions: bool = False,
                 event_idx: bool = True, indirect: bool = True,
                 regions: Sequence[tuple[int, int, int]] | None = None,
                 use_add_mem_reg: bool | None = None,
                 protocol_features: int = WANTED_PROTOCOL_FEATURES,
                 device_features: int = BLK_DRIVER_FEATURES,
                 seed: int | None = None, max_segments: int = 8,
                 timeout: float = DEFAULT_TIMEOUT):
        super().__init__(socket_path, mem_size=mem_size, num_queues=num_queues,
                         queue_size=queue_size, two_regions=two_regions, event_idx=event_idx,
                         indirect=indirect, regions=regions, use_add_mem_reg=use_add_mem_reg,
                         protocol_features=protocol_features, device_features=device_features,
                         timeout=timeout)
        self.rng = random.Random(seed) if seed is not None else None
        self.max_segments = max(1, max_segments)

    def _read_device_config(self) -> None:
        self.config = self.get_config()

    def get_config(self, size: int = vblk.CONFIG_SIZE, offset: int = 0):
        """GET_CONFIG, parsed as virtio_blk.Config when the full blk layout was asked for;
        otherwise the raw bytes."""
        raw = self.get_config_raw(size, offset)
        if offset == 0 and size >= vblk.CONFIG_SIZE:
            return vblk.Config.parse(raw)
        return raw

    # -- blk requests --

    def _split(self, n: int) -> list[int]:
        """Piece lengths for an n-byte data buffer."""
        limit = 0
        if self.config is not None and self.features & vblk.F_SIZE_MAX and self.config.size_max:
            limit = self.config.size_max
        pieces = [n]
        if self.rng is not None and n > 1:
            k = self.rng.randint(1, min(self.max_segments, n))
            if self.rng.random() < 0.5 and n % vblk.SECTOR_SIZE == 0 and n > vblk.SECTOR_SIZE:
                sectors = n // vblk.SECTOR_SIZE
                k = min(k, sectors)
                cuts = sorted(self.rng.sample(range(1, sectors), k - 1))
                cuts = [c * vblk.SECTOR_SIZE for c in cuts]
            else:
                cuts = sorted(self.rng.sample(range(1, n), k - 1))
            edges = [0, *cuts, n]
            pieces = [b - a for a, b in zip(edges, edges[1:])]
        if limit:
            pieces = [min(limit, p - s) for p in pieces for s in range(0, p, limit)]
        return pieces

    def _alloc_pieces(self, n: int, blocks: list[int]) -> list[tuple[int, int]]:
        out = []
        for ln in self._split(n):
            gpa = self.mem.alloc(ln, align=8 if self.rng is not None else 512)
            blocks.append(gpa)
            out.append((gpa, ln))
        return out

    def _prepare(self, vq: VirtQueue, req: BlkRequest, i: int) -> _Inflight:
        """Build one request's chain in guest RAM (not yet published).  Raises QueueFull or
        GuestRAMFull with nothing leaked."""
        mem = self.mem
        blocks: list[int] = []
        try:
            hs = mem.alloc(vblk.REQ_HEADER_SIZE + 1, align=16)
            blocks.append(hs)
            mem.write(hs, vblk.ReqHeader.build(dict(type=req.type, reserved=0,
                                                    sector=req.sector)))
            status_gpa = hs + vblk.REQ_HEADER_SIZE
            mem.fill(status_gpa, 1, STATUS_POISON)
            out_pieces = self._alloc_pieces(len(req.out), blocks) if req.out else []
            pos = 0
            for gpa, ln in out_pieces:
                mem.write(gpa, memoryview(req.out)[pos:pos + ln])
                pos += ln
            in_pieces = self._alloc_pieces(req.in_len, blocks) if req.in_len else []
            for gpa, ln in in_pieces:
                mem.fill(gpa, ln, READ_POISON)
            segs = [(hs, vblk.REQ_HEADER_SIZE, False)]
            segs += [(g, ln, False) for g, ln in out_pieces]
            segs += [(g, ln, True) for g, ln in in_pieces]
            segs.append((status_gpa, 1, True))
            if self.has_indirect:
                indirect = self.rng.random() < 0.5 if self.rng is not None else True
            else:
                indirect = False
            if self.config is not None and self.features & vblk.F_SEG_MAX and self.config.seg_max:
                if len(segs) - 2 > self.config.seg_max:
                    raise FrontendError(f"{len(segs) - 2} data segments exceed seg_max "
                                        f"{self.config.seg_max}")
            if not indirect and len(segs) > vq.size:
                indirect = self.has_indirect
            head = vq.add_chain(segs, indirect=indirect)
        except BaseException:
            for b in blocks:
                mem.free(b)
            raise
        return _Inflight(i, blocks, in_pieces, status_gpa, head)

    def _finish(self, ctx: _Inflight, used_len: int) -> BlkResult:
        mem = self.mem
        status = mem.read(ctx.status_gpa, 1)[0]
        data = b"".join(mem.read(g, ln) for g, ln in ctx.in_pieces) if ctx.in_pieces else b""
        for b in ctx.blocks:
            mem.free(b)
        return BlkResult(status, data, used_len)

    def submit_many(self, requests: Sequence[BlkRequest], queue: int | Sequence[int] = 0,
                    depth: int = 32, timeout: float | None = None) -> list[BlkResult]:
        """Run `requests` keeping up to `depth` in flight per queue; results in request order.
        `queue` may be a list of queues: requests are dealt round-robin and all those queues run
        concurrently.  `timeout` (default: the frontend's) bounds each wait for progress.
        Requests in flight together may complete in any order: don't overlap writes."""
        if not self._started:
            raise FrontendError("not connected")
        timeout = self.timeout if timeout is None else timeout
        qids = [queue] if isinstance(queue, int) else list(queue)
        if not qids:
            raise ValueError("no queue given")
        for q in qids:
            if not 0 <= q < len(self.queues):
                raise ValueError(f"queue {q} does not exist ({len(self.queues)} queues)")
        depth = max(1, depth)
        results: list[BlkResult | None] = [None] * len(requests)
        pending = {q: deque() for q in qids}
        for i in range(len(requests)):
            pending[qids[i % len(qids)]].append(i)
        inflight: dict[int, dict[int, _Inflight]] = {q: {} for q in qids}
        remaining = len(requests)
        poller = select.poll()
        for q in qids:
            poller.register(self.queues[q].call_fd, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        deadline = time.monotonic() + timeout

        while remaining:
            # submit as much as the depth, the descriptors and guest RAM allow
            for q in qids:
                vq, fl, pq = self.queues[q], inflight[q], pending[q]
                heads = []
                while pq and len(fl) < depth:
                    try:
                        ctx = self._prepare(vq, requests[pq[0]], pq[0])
                    except (QueueFull, GuestRAMFull):
                        if fl or heads:
                            break
                        raise
                    pq.popleft()
                    fl[ctx.head] = ctx
                    heads.append(ctx.head)
                if heads:
                    vq.publish(heads)
                    vq.kick()
            # reap what completed
            progressed = False
            for q in qids:
                vq, fl = self.queues[q], inflight[q]
                for uid, ulen in vq.reap():
                    ctx = fl.pop(uid, None)
                    if ctx is None:
                        raise RingError(f"queue {q}: backend returned head {uid} (len {ulen}), "
                                        f"which is not an outstanding request")
                    results[ctx.i] = self._finish(ctx, ulen)
                    remaining -= 1
                    progressed = True
            if progressed:
                deadline = time.monotonic() + timeout
                continue
            if not remaining:
                break
            # nothing new: arm interrupts, re-check, then sleep on the call eventfds
            if any(self.queues[q].arm_interrupt() for q in qids if inflight[q]):
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                busy = "; ".join(self.queues[q].describe() for q in qids if inflight[q])
                raise TimeoutError(f"no completion within {timeout}s, {remaining} requests "
                                   f"outstanding: {busy}")
            for fd, ev in poller.poll(left * 1000):
                if fd == self.sock.fileno():
                    if not ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
                        try:
                            if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                                poller.unregister(fd)   # unexpected data: leave it there
                                continue
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            pass
                    busy = "; ".join(self.queues[q].describe() for q in qids if inflight[q])
                    raise VhostUserError(f"backend disconnected with {remaining} requests "
                                         f"outstanding: {busy}")
            for q in qids:
                self.queues[q].drain_call()
        return results  # type: ignore[return-value]

    # single requests

    def read(self, sector: int, nbytes: int, queue: int = 0) -> tuple[int, bytes]:
        r = self.submit_many([blk_read(sector, nbytes)], queue)[0]
        return r.status, r.data

    def write(self, sector: int, data: bytes, queue: int = 0) -> int:
        return self.submit_many([blk_write(sector, data)], queue)[0].status

    def flush(self, queue: int = 0) -> int:
        return self.submit_many([blk_flush()], queue)[0].status

    def discard(self, sector: int, nsectors: int, queue: int = 0) -> int:
        return self.submit_many([blk_discard(sector, nsectors)], queue)[0].status

    def write_zeroes(self, sector: int, nsectors: int, unmap: bool = False,
                     queue: int = 0) -> int:
        return self.submit_many([blk_write_zeroes(sector, nsectors, unmap)], queue)[0].status

    def get_id(self, queue: int = 0) -> tuple[int, bytes]:
        r = self.submit_many([blk_get_id()], queue)[0]
        return r.status, r.data


# --------------------------------------------------------------------------------------------
# virtio-net
# --------------------------------------------------------------------------------------------

# Device-specific feature bits NetFrontend accepts by default (intersected with the offer).  No
# CTRL_VQ: QEMU keeps the control queue to itself, a vhost-user backend never sees it.
NET_DRIVER_FEATURES = (
    vnet.F_MAC | vnet.F_MTU | vnet.F_STATUS | vnet.F_MRG_RXBUF | vnet.F_MQ
    | vnet.F_CSUM | vnet.F_GUEST_CSUM | vnet.F_HOST_TSO4 | vnet.F_HOST_TSO6
    | vnet.F_GUEST_TSO4 | vnet.F_GUEST_TSO6
)
NET_HDR_FIELDS = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset",
                  "num_buffers")
_NET_HDR = struct.Struct("<BBHHHHH")
assert _NET_HDR.size == vnet.HDR_SIZE
RX_POISON = 0x5A           # rx buffers are filled with this when first posted
VLAN_HLEN = 4


def net_hdr(flags: int = 0, gso_type: int = vnet.GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
            csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    """The 12-byte virtio_net_hdr (with num_buffers)."""
    return _NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
                         num_buffers)


def parse_net_hdr(data: bytes) -> dict:
    """The fields of a 12-byte (or legacy 10-byte: num_buffers = 0) virtio_net_hdr."""
    if len(data) >= vnet.HDR_SIZE:
        return dict(zip(NET_HDR_FIELDS, _NET_HDR.unpack_from(data)))
    if len(data) >= vnet.LEGACY_HDR_SIZE:
        return dict(zip(NET_HDR_FIELDS, _NET_HDR.unpack(bytes(data[:10]) + b"\0\0")))
    raise ValueError(f"virtio_net_hdr needs 10 or 12 bytes, got {len(data)}")


def parse_mac(mac: str | bytes) -> bytes:
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        return bytes(mac)
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class RxPacket(NamedTuple):
    """A received packet with where it came from (`recv_packet`); `recv` returns (hdr, frame)."""
    hdr: dict            # virtio_net_hdr fields, num_buffers included
    frame: bytes         # the Ethernet frame (no virtio_net_hdr)
    pair: int            # queue pair it arrived on
    used_lens: tuple     # the used-ring length of each buffer it occupied


class _RxQueue:
    """Receive-side state of one rx virtqueue: the buffers we own, which are posted, and used
    entries not yet assembled into packets."""
    __slots__ = ("vq", "pair", "chains", "idle", "posted", "pending", "target")

    def __init__(self, vq: VirtQueue, pair: int):
        self.vq = vq
        self.pair = pair
        self.chains: list[list[tuple[int, int]]] = []   # chain id -> [(gpa, len), ...]
        self.idle: list[int] = []                       # chain ids not posted
        self.posted: dict[int, int] = {}                # head -> chain id
        self.pending: deque = deque()                   # (chain id, used len), used-ring order
        self.target = 0                                 # chains we keep posted


class NetFrontend(VhostUserFrontend):
    """A vhost-user-net frontend: what QEMU's virtio-net device plus a guest driver would do.

    Queues: rx of pair p is virtqueue 2p, tx is 2p+1; no control queue (QEMU keeps it).  On
    connect, every rx queue is filled with device-writable buffers: with MRG_RXBUF one
    `rx_buf_size` descriptor per buffer; without it, chains of `rx_buf_size` pieces big enough
    for the largest frame the negotiated offloads allow (65562 bytes with GUEST_TSO*, else
    header + MTU + Ethernet/VLAN header), indirect when negotiated.  Consumed buffers are
    reposted as packets are taken out (`recv`, `recv_many`, `poll_rx`).  `rx_buffers` (per rx
    queue; default: as many as the ring holds) may be 0 to model a guest that never posts.

    `send(frame, hdr=None, pair=0)` puts a 12-byte virtio_net_hdr (a dict of NetHdr fields,
    raw bytes, or None for all-zero) before the frame in one descriptor, or split at the
    `split` lengths given, or (with `seed`) at random places, header included, over up to
    `max_segments` descriptors, direct or indirect.  Completed tx chains are reaped on the way;
    a full ring or guest RAM waits (bounded by `timeout`) for completions.

    The MAC (`.mac`) is the `mac` argument, else the backend's config (protocol feature CONFIG
    and VIRTIO_NET_F_MAC), else a random locally administered one, the way QEMU makes one up.
    `.config` is the backend's virtio_net config when it serves GET_CONFIG, else synthesized
    (`.config_source` says which).
    """

    def __init__(self, socket_path: str | os.PathLike, *, queue_pairs: int = 1,
                 mem_size: int | None = None, queue_size: int = 256, mrg_rxbuf: bool = True,
                 rx_buf_size: int = 2048, rx_buffers: int | None = None,
                 event_idx: bool = True, indirect: bool = True,
                 features: int = NET_DRIVER_FEATURES, two_regions: bool = False,
                 regions: Sequence[tuple[int, int, int]] | None = None,
                 use_add_mem_reg: bool | None = None,
                 protocol_features: int = WANTED_PROTOCOL_FEATURES,
                 mac: str | bytes | None = None, seed: int | None = None,
                 max_segments: int = 4, timeout: float = DEFAULT_TIMEOUT):
        if queue_pairs < 1:
            raise ValueError("queue_pairs must be >= 1")
        if rx_buf_size < vnet.HDR_SIZE:
            raise ValueError(f"rx_buf_size {rx_buf_size} cannot hold a virtio_net_hdr")
        if rx_buffers is not None and not 0 <= rx_buffers <= queue_size:
            raise ValueError(f"rx_buffers {rx_buffers} outside 0..{queue_size}")
        features = int(features) & ~(vnet.F_CTRL_VQ)
        if not mrg_rxbuf:
            features &= ~vnet.F_MRG_RXBUF
        self.queue_pairs = queue_pairs
        self.rx_buf_size = rx_buf_size
        self.rx_buffers = rx_buffers
        if mem_size is None:
            mem_size = self._default_mem_size(queue_pairs, queue_size, rx_buf_size, rx_buffers)
        super().__init__(socket_path, mem_size=mem_size, num_queues=2 * queue_pairs,
                         queue_size=queue_size, two_regions=two_regions, event_idx=event_idx,
                         indirect=indirect, regions=regions, use_add_mem_reg=use_add_mem_reg,
                         protocol_features=protocol_features,
                         device_features=features | virtio.F_VERSION_1, timeout=timeout)
        self._mac_arg = parse_mac(mac) if mac is not None else None
        self.mac: bytes | None = None
        self.config_source: str | None = None   # "backend" or "synthesized"
        self.backend_config = None              # what GET_CONFIG returned, if it did
        self.rng = random.Random(seed) if seed is not None else None
        self.max_segments = max(1, max_segments)
        self.hdr_size = vnet.HDR_SIZE
        self.rx_chain_bytes = 0
        self._rx: list[_RxQueue] = []
        self._tx_inflight: list[dict[int, list[int]]] = []
        self._rx_rr = 0
        # counters
        self.sent = 0
        self.received = 0
        self.tx_completed = 0
        self.tx_raw_completed = 0
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.rx_buffers_used = 0
        self.sent_per_pair = [0] * queue_pairs
        self.received_per_pair = [0] * queue_pairs
        self.num_buffers_max = 0
        self.rx_num_buffers_not_1 = 0

    @staticmethod
    def _default_mem_size(pairs: int, qsize: int, buf: int, rx_buffers: int | None) -> int:
        # worst case for rx: no MRG_RXBUF with GSO, one 64 KiB chain per ring slot
        nbuf = qsize if rx_buffers is None else rx_buffers
        chain = -(-(vnet.MAX_GSO_FRAME + vnet.HDR_SIZE) // buf) * (buf + 16) + 64
        rx = nbuf * chain
        tx = 8 * MiB
        rings = 2 * (26 * qsize + 4096)
        total = pairs * (rx + tx + rings) + 8 * MiB
        return -(-total // (2 * MiB)) * 2 * MiB

    # -- negotiated state --

    @property
    def has_mrg_rxbuf(self) -> bool:
        return bool(self.features & vnet.F_MRG_RXBUF)

    def has_feature(self, f: int) -> bool:
        return bool(self.features & f)

    # -- connection hooks --

    def _check_queue_count(self) -> None:
        # For net, GET_QUEUE_NUM counts queue *pairs* (QEMU's vhost_net_get_max_queues, DPDK's
        # rte_vhost_driver_get_queue_num); without protocol MQ only one pair exists.
        if self.queue_pairs > self.max_queues:
            raise FrontendError(f"{self.queue_pairs} queue pairs requested, backend supports "
                                f"{self.max_queues}"
                                + ("" if self.protocol_features & ProtocolFeature.MQ
                                   else " (protocol feature MQ not negotiated)"))

    def _read_device_config(self) -> None:
        # QEMU's virtio-net does not ask a vhost-user backend for its config; we do when
        # offered, and fall back to a synthesized one when the backend cannot serve it.
        for size in (vnet.CONFIG_SIZE, 12, 10, 6):
            try:
                raw = self.get_config_raw(size)
            except VhostUserError:
                if self.sock is None:
                    raise
                continue
            self.backend_config = vnet.Config.parse(raw + bytes(vnet.CONFIG_SIZE - size))
            return

    def get_config(self, size: int = vnet.CONFIG_SIZE, offset: int = 0):
        """GET_CONFIG, parsed as virtio_net.Config for the full layout, else raw bytes."""
        raw = self.get_config_raw(size, offset)
        if offset == 0 and size >= vnet.CONFIG_SIZE:
            return vnet.Config.parse(raw)
        return raw

    def _after_features(self) -> None:
        f = self.features
        self.hdr_size = (vnet.HDR_SIZE if f & (virtio.F_VERSION_1 | vnet.F_MRG_RXBUF)
                         else vnet.LEGACY_HDR_SIZE)
        if self.queue_pairs > 1 and not f & vnet.F_MQ:
            raise FrontendError(f"{self.queue_pairs} queue pairs need VIRTIO_NET_F_MQ, which "
                                f"the backend does not offer (features "
                                f"{self.backend_features:#x})")
        bc = self.backend_config
        if bc is not None and f & vnet.F_MQ and bc.max_virtqueue_pairs \
                and self.queue_pairs > bc.max_virtqueue_pairs:
            raise FrontendError(f"{self.queue_pairs} queue pairs requested, config space says "
                                f"max_virtqueue_pairs {bc.max_virtqueue_pairs}")
        if self._mac_arg is not None:
            self.mac = self._mac_arg
        elif bc is not None and f & vnet.F_MAC and any(bc.mac):
            self.mac = bytes(bc.mac)
        else:
            rnd = random.Random() if self.rng is None else self.rng
            self.mac = bytes([0x52, 0x54, 0x00, rnd.randrange(256), rnd.randrange(256),
                              rnd.randrange(256)])
        if bc is not None:
            self.config = bc
            self.config_source = "backend"
        else:
            self.config = vnet.Config.parse(vnet.Config.build(dict(
                mac=self.mac, status=vnet.S_LINK_UP, max_virtqueue_pairs=self.queue_pairs,
                mtu=vnet.DEFAULT_MTU, speed=0xFFFFFFFF, duplex=0xFF)))
            self.config_source = "synthesized"
        mtu = vnet.DEFAULT_MTU
        if f & vnet.F_MTU and bc is not None and bc.mtu:
            mtu = max(mtu, bc.mtu)
        self.mtu = mtu
        if f & vnet.F_MRG_RXBUF:
            self.rx_chain_bytes = self.rx_buf_size
        else:
            if f & (vnet.F_GUEST_TSO4 | vnet.F_GUEST_TSO6 | vnet.F_GUEST_UFO):
                need = self.hdr_size + vnet.MAX_GSO_FRAME - VLAN_HLEN + 4  # 65562 with hdr
            else:
                need = self.hdr_size + mtu + vnet.ETH_HLEN + VLAN_HLEN
            need = max(need, self.hdr_size + 1514)
            self.rx_chain_bytes = -(-need // self.rx_buf_size) * self.rx_buf_size

    @property
    def rx_pieces(self) -> int:
        """Descriptors per rx chain."""
        return max(1, self.rx_chain_bytes // self.rx_buf_size)

    def _after_start(self) -> None:
        pieces = self.rx_pieces
        per_slot = 1 if (pieces == 1 or self.has_indirect) else pieces
        target = self.queue_size // per_slot if self.rx_buffers is None else self.rx_buffers
        if target * per_slot > self.queue_size:
            raise FrontendError(f"{target} rx chains of {per_slot} descriptors do not fit a "
                                f"queue of {self.queue_size}")
        for p in range(self.queue_pairs):
            rq = _RxQueue(self.queues[vnet.rx_queue(p)], p)
            rq.target = target
            for _ in range(target):
                chain = []
                left = self.rx_chain_bytes
                while left > 0:
                    ln = min(self.rx_buf_size, left)
                    gpa = self.mem.alloc(ln, align=64)
                    self.mem.fill(gpa, ln, RX_POISON)
                    chain.append((gpa, ln))
                    left -= ln
                rq.chains.append(chain)
                rq.idle.append(len(rq.chains) - 1)
            self._rx.append(rq)
            self._tx_inflight.append({})
        for rq in self._rx:
            self._post_rx(rq)

    def _post_rx(self, rq: _RxQueue) -> int:
        """Post every idle rx chain; kick if the backend asks.  Returns how many were posted."""
        heads = []
        vq = rq.vq
        while rq.idle:
            cid = rq.idle[-1]
            chain = rq.chains[cid]
            try:
                head = vq.add_chain([(g, ln, True) for g, ln in chain],
                                    indirect=len(chain) > 1 and self.has_indirect)
            except (QueueFull, GuestRAMFull):
                break
            rq.idle.pop()
            rq.posted[head] = cid
            heads.append(head)
        if heads:
            vq.publish(heads)
            vq.kick()
        return len(heads)

    def post_rx(self, n: int | None = None, pair: int | None = None) -> int:
        """Post `n` more rx buffers (allocating them) to `pair` (default: all), or repost the
        idle ones (`n=None`); raises the target kept posted.  Returns the number posted."""
        self._need_started()
        total = 0
        for rq in self._rx_queues(pair):
            if n:
                for _ in range(n):
                    chain = []
                    left = self.rx_chain_bytes
                    while left > 0:
                        ln = min(self.rx_buf_size, left)
                        chain.append((self.mem.alloc(ln, align=64), ln))
                        left -= ln
                    rq.chains.append(chain)
                    rq.idle.append(len(rq.chains) - 1)
                rq.target += n
            total += self._post_rx(rq)
        return total

    def _rx_queues(self, pair: int | None) -> list[_RxQueue]:
        if pair is None:
            return self._rx
        if not 0 <= pair < self.queue_pairs:
            raise ValueError(f"queue pair {pair} does not exist ({self.queue_pairs} pairs)")
        return [self._rx[pair]]

    def _need_started(self) -> None:
        if not self._started or self._closed:
            raise FrontendError("not connected")

    # -- waiting --

    def _wait_calls(self, qids: Sequence[int], deadline: float) -> bool:
        """Arm interrupts on `qids`; if nothing is waiting, sleep on their call eventfds until
        one fires or `deadline`.  Returns False once the deadline has passed.  A backend
        disconnect raises VhostUserError."""
        if any([self.queues[q].arm_interrupt() for q in qids]):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        poller = select.poll()
        for q in qids:
            poller.register(self.queues[q].call_fd, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        for fd, ev in poller.poll(max(1, int(left * 1000))):
            if fd == self.sock.fileno():
                if ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
                    raise VhostUserError(f"backend disconnected: {self.describe()}")
                try:
                    if not self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        raise VhostUserError(f"backend disconnected: {self.describe()}")
                except (BlockingIOError, InterruptedError):
                    pass
                # unexpected data on the socket: leave it; sleep a little instead of spinning
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
        for q in qids:
            self.queues[q].drain_call()
        return True

    # -- tx --

    def _build_hdr(self, hdr: dict | bytes | bytearray | None) -> bytes:
        if hdr is None:
            return bytes(self.hdr_size)
        if isinstance(hdr, (bytes, bytearray, memoryview)):
            return bytes(hdr)
        fields = {k: int(hdr.get(k, 0)) for k in NET_HDR_FIELDS}
        raw = _NET_HDR.pack(*(fields[k] for k in NET_HDR_FIELDS))
        return raw[:self.hdr_size]

    def _tx_split(self, n: int, split: Sequence[int] | None) -> list[int]:
        if split is not None:
            pieces = [int(x) for x in split]
            if sum(pieces) != n or any(p <= 0 for p in pieces):
                raise ValueError(f"split {pieces} does not cover {n} bytes in positive pieces")
            return pieces
        if self.rng is None or n < 2:
            return [n]
        k = self.rng.randint(1, min(self.max_segments, n))
        cuts = sorted(self.rng.sample(range(1, n), k - 1))
        edges = [0, *cuts, n]
        return [b - a for a, b in zip(edges, edges[1:])]

    def _reap_tx(self, pair: int) -> int:
        vq = self.queues[vnet.tx_queue(pair)]
        fl = self._tx_inflight[pair]
        n = 0
        for uid, _ulen in vq.reap():
            blocks = fl.pop(uid, None)
            if blocks is None:
                self.tx_raw_completed += 1      # a chain laid out with the low-level API
                continue
            for b in blocks:
                self.mem.free(b)
            n += 1
        self.tx_completed += n
        return n

    def _prepare_tx(self, pair: int, data: bytes, split: Sequence[int] | None,
                    indirect: bool | None) -> int:
        vq = self.queues[vnet.tx_queue(pair)]
        blocks: list[int] = []
        try:
            segs = []
            pos = 0
            mv = memoryview(data)
            for ln in self._tx_split(len(data), split):
                gpa = self.mem.alloc(ln, align=8 if self.rng is not None else 64)
                blocks.append(gpa)
                self.mem.write(gpa, mv[pos:pos + ln])
                segs.append((gpa, ln, False))
                pos += ln
            if indirect is None:
                if self.has_indirect and len(segs) > 1:
                    indirect = self.rng.random() < 0.5 if self.rng is not None else True
                else:
                    indirect = False
            if indirect and not self.has_indirect:
                raise FrontendError("indirect descriptors were not negotiated")
            if not indirect and len(segs) > vq.size:
                raise FrontendError(f"{len(segs)} descriptors do not fit a queue of {vq.size}")
            head = vq.add_chain(segs, indirect=indirect)
        except BaseException:
            for b in blocks:
                self.mem.free(b)
            raise
        self._tx_inflight[pair][head] = blocks
        return head

    def send_many(self, frames: Iterable[bytes | tuple], pair: int = 0,
                  hdr: dict | bytes | None = None, split: Sequence[int] | None = None,
                  indirect: bool | None = None, timeout: float | None = None) -> int:
        """Queue `frames` on tx of `pair`; an entry may be a frame (with the common `hdr`) or a
        (hdr, frame) tuple.  Waits for completions only when the ring or guest RAM is full
        (no progress within `timeout` raises TimeoutError).  Returns the number sent; they may
        still be in flight (see `wait_tx`)."""
        self._need_started()
        if not 0 <= pair < self.queue_pairs:
            raise ValueError(f"queue pair {pair} does not exist ({self.queue_pairs} pairs)")
        timeout = self.timeout if timeout is None else timeout
        txq = vnet.tx_queue(pair)
        vq = self.queues[txq]
        n = 0
        heads: list[int] = []
        it = iter(frames)
        item = next(it, None)
        deadline = time.monotonic() + timeout
        while item is not None:
            if isinstance(item, tuple):
                h, frame = item
            else:
                h, frame = hdr, item
            data = self._build_hdr(h) + bytes(frame)
            self._reap_tx(pair)
            try:
                head = self._prepare_tx(pair, data, split, indirect)
            except (QueueFull, GuestRAMFull):
                if heads:
                    vq.publish(heads)
                    vq.kick()
                    heads = []
                if not self._tx_inflight[pair] and not vq.in_flight:
                    raise
                if self._reap_tx(pair):
                    deadline = time.monotonic() + timeout
                    continue
                if not self._wait_calls([txq], deadline):
                    raise TimeoutError(f"tx of pair {pair} made no progress in {timeout}s: "
                                       f"{vq.describe()}") from None
                continue
            heads.append(head)
            n += 1
            self.sent += 1
            self.sent_per_pair[pair] += 1
            self.tx_bytes += len(data) - self.hdr_size
            if len(heads) >= 32:
                vq.publish(heads)
                vq.kick()
                heads = []
            item = next(it, None)
        if heads:
            vq.publish(heads)
            vq.kick()
        self._reap_tx(pair)
        return n

    def send(self, frame: bytes, hdr: dict | bytes | None = None, pair: int = 0,
             split: Sequence[int] | None = None, indirect: bool | None = None) -> None:
        """Send one frame with a virtio_net_hdr (dict of fields, raw bytes, None = zeros)."""
        self.send_many([(hdr, frame)], pair=pair, split=split, indirect=indirect)

    def send_raw_chain(self, entries: Sequence[tuple[int, int, int, int | None]],
                       pair: int = 0, indices: Sequence[int] | None = None) -> int:
        """Lay out arbitrary (addr, len, flags, next) descriptors on tx of `pair` (see
        VirtQueue.add_raw_descs), publish the first as a head and kick.  Returns the head."""
        self._need_started()
        vq = self.queues[vnet.tx_queue(pair)]
        idx = vq.add_raw_descs(entries, indices)
        vq.publish([idx[0]])
        vq.kick(force=True)
        return idx[0]

    def tx_in_flight(self, pair: int | None = None) -> int:
        pairs = range(self.queue_pairs) if pair is None else [pair]
        return sum(self.queues[vnet.tx_queue(p)].in_flight for p in pairs)

    def wait_tx(self, timeout: float | None = None, pair: int | None = None) -> None:
        """Wait until every tx chain (ours and raw ones) of `pair` (default all) came back."""
        self._need_started()
        timeout = self.timeout if timeout is None else timeout
        pairs = list(range(self.queue_pairs)) if pair is None else [pair]
        deadline = time.monotonic() + timeout
        while True:
            for p in pairs:
                self._reap_tx(p)
            busy = [p for p in pairs if self.queues[vnet.tx_queue(p)].in_flight]
            if not busy:
                return
            if not self._wait_calls([vnet.tx_queue(p) for p in busy], deadline):
                raise TimeoutError(f"tx not complete after {timeout}s: " + "; ".join(
                    self.queues[vnet.tx_queue(p)].describe() for p in busy))

    # -- rx --

    def _reap_rx(self, rq: _RxQueue) -> int:
        n = 0
        for uid, ulen in rq.vq.reap():
            cid = rq.posted.pop(uid, None)
            if cid is None:
                raise RingError(f"rx queue {rq.vq.index}: backend returned head {uid} (len "
                                f"{ulen}), which is not a posted buffer")
            cap = sum(ln for _, ln in rq.chains[cid])
            if ulen > cap:
                raise RingError(f"rx queue {rq.vq.index}: used len {ulen} for head {uid} "
                                f"exceeds its {cap}-byte buffer")
            rq.pending.append((cid, ulen))
            n += 1
        self.rx_buffers_used += n
        return n

    def _read_chain(self, cid_chain: list[tuple[int, int]], n: int) -> bytes:
        out = []
        for gpa, ln in cid_chain:
            if n <= 0:
                break
            k = min(ln, n)
            out.append(self.mem.read(gpa, k))
            n -= k
        return b"".join(out)

    def _assemble(self, rq: _RxQueue) -> RxPacket | None:
        """One packet from the front of `rq.pending`, or None if it is not complete yet."""
        if not rq.pending:
            return None
        cid, ulen = rq.pending[0]
        q = rq.vq.index
        if ulen < self.hdr_size:
            raise RingError(f"rx queue {q}: used len {ulen} is shorter than the "
                            f"{self.hdr_size}-byte virtio_net_hdr")
        first = self._read_chain(rq.chains[cid], ulen)
        hdr = parse_net_hdr(first[:self.hdr_size])
        if self.has_mrg_rxbuf:
            nb = hdr["num_buffers"]
            if nb < 1:
                raise RingError(f"rx queue {q}: num_buffers {nb} with MRG_RXBUF")
            if nb > len(rq.pending) + len(rq.posted):
                # the rest can never arrive: fewer buffers are out than the header announces
                raise RingError(f"rx queue {q}: num_buffers {nb} but only {len(rq.pending)} "
                                f"used + {len(rq.posted)} posted buffers")
            if len(rq.pending) < nb:
                return None
        else:
            nb = 1
            if self.hdr_size == vnet.HDR_SIZE and hdr["num_buffers"] != 1:
                # virtio 1.x 5.1.6.4: "num_buffers will always be 1" without MRG_RXBUF (DPDK
                # leaves it unwritten); counted, not fatal: drivers ignore it
                self.rx_num_buffers_not_1 += 1
        parts = [first[self.hdr_size:]]
        lens = [ulen]
        rq.pending.popleft()
        done = [cid]
        for _ in range(nb - 1):
            c2, l2 = rq.pending.popleft()
            if l2 == 0:
                raise RingError(f"rx queue {q}: continuation buffer of a {nb}-buffer packet "
                                f"has used len 0")
            parts.append(self._read_chain(rq.chains[c2], l2))
            lens.append(l2)
            done.append(c2)
        rq.idle.extend(done)
        frame = b"".join(parts)
        self.num_buffers_max = max(self.num_buffers_max, nb)
        self.received += 1
        self.received_per_pair[rq.pair] += 1
        self.rx_bytes += len(frame)
        return RxPacket(hdr, frame, rq.pair, tuple(lens))

    def poll_rx(self, pair: int | None = None) -> list[RxPacket]:
        """Every packet already received (no waiting); consumed buffers are reposted."""
        self._need_started()
        out = []
        for rq in self._rx_queues(pair):
            self._reap_rx(rq)
            while True:
                pkt = self._assemble(rq)
                if pkt is None:
                    break
                out.append(pkt)
            if rq.idle:
                self._post_rx(rq)
        return out

    def recv_packets(self, n: int, timeout: float | None = None,
                     pair: int | None = None) -> list[RxPacket]:
        """Up to `n` packets, waiting at most `timeout` seconds in all (default: the
        frontend's); fewer (maybe none) if the time runs out."""
        self._need_started()
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        rqs = self._rx_queues(pair)
        out: list[RxPacket] = []
        while len(out) < n:
            progressed = False
            for k in range(len(rqs)):
                rq = rqs[(self._rx_rr + k) % len(rqs)]
                self._reap_rx(rq)
                while len(out) < n:
                    pkt = self._assemble(rq)
                    if pkt is None:
                        break
                    out.append(pkt)
                    progressed = True
                if rq.idle:
                    self._post_rx(rq)
            self._rx_rr += 1
            if len(out) >= n or progressed:
                continue
            if not self._wait_calls([rq.vq.index for rq in rqs], deadline):
                break
        return out

    def recv_packet(self, timeout: float | None = None,
                    pair: int | None = None) -> RxPacket | None:
        got = self.recv_packets(1, timeout, pair)
        return got[0] if got else None

    def recv(self, timeout: float | None = None,
             pair: int | None = None) -> tuple[dict, bytes] | None:
        """One received packet as (virtio_net_hdr fields, frame), or None after `timeout`."""
        pkt = self.recv_packet(timeout, pair)
        return None if pkt is None else (pkt.hdr, pkt.frame)

    def recv_many(self, n: int, timeout: float | None = None,
                  pair: int | None = None) -> list[tuple[dict, bytes]]:
        """Up to `n` packets as (hdr, frame) pairs within `timeout` seconds in all."""
        return [(p.hdr, p.frame) for p in self.recv_packets(n, timeout, pair)]

    def drain(self, quiet: float = 0.2, limit: int = 100000,
              pair: int | None = None) -> list[RxPacket]:
        """Receive until nothing arrives for `quiet` seconds (at most `limit` packets)."""
        out: list[RxPacket] = []
        while len(out) < limit:
            got = self.recv_packets(limit - len(out), quiet, pair)
            if not got:
                break
            out += got
        return out

    def rx_posted(self, pair: int = 0) -> int:
        """Rx chains of `pair` currently posted (owned by the backend)."""
        return len(self._rx[pair].posted)

    def rx_capacity(self, pair: int = 0) -> int:
        """Rx chains of `pair` kept posted (what the ring can hold of them, or `rx_buffers`)."""
        return self._rx[pair].target

    def rx_frames_capacity(self, pair: int = 0, frame_len: int = 1514) -> int:
        """How many `frame_len`-byte frames fit in the rx buffers of `pair` at once."""
        per = 1
        if self.has_mrg_rxbuf:
            per = -(-(frame_len + self.hdr_size) // self.rx_buf_size)
        return self._rx[pair].target // per

    def stats(self) -> dict:
        return dict(sent=self.sent, tx_completed=self.tx_completed,
                    tx_raw_completed=self.tx_raw_completed, received=self.received,
                    tx_bytes=self.tx_bytes, rx_bytes=self.rx_bytes,
                    rx_buffers_used=self.rx_buffers_used, num_buffers_max=self.num_buffers_max,
                    rx_num_buffers_not_1=self.rx_num_buffers_not_1,
                    sent_per_pair=list(self.sent_per_pair),
                    received_per_pair=list(self.received_per_pair))

    def describe(self) -> str:
        return (super().describe() + f"; mac {format_mac(self.mac) if self.mac else '?'}; "
                + ", ".join(f"{k}={v}" for k, v in self.stats().items()))


# --------------------------------------------------------------------------------------------
# Frames for tests and benchmarks
# --------------------------------------------------------------------------------------------

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_TEST = 0x88B5        # IEEE 802 local experimental ethertype 1
BROADCAST = b"\xff" * 6


def inet_checksum(data: bytes, start: int = 0) -> int:
    """RFC 1071 ones' complement sum, complemented (0 is returned as 0)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ones_sum(data: bytes, start: int = 0) -> int:
    """Ones' complement sum (not complemented)."""
    return ~inet_checksum(data, start) & 0xFFFF


def make_frame(size: int, dst: bytes = BROADCAST, src: bytes = b"\x02\0\0\0\0\1",
               seq: int = 0, ethertype: int = ETH_P_TEST) -> bytes:
    """A `size`-byte Ethernet frame (>= 14 + 8) whose payload is `seq` and a pattern derived
    from it, so any corruption or reordering is visible."""
    if size < vnet.ETH_HLEN + 8:
        raise ValueError(f"frame size {size} too small")
    n = size - vnet.ETH_HLEN - 8
    pat = bytes((seq * 7 + i * 13 + (i >> 8)) & 0xFF for i in range(min(n, 509)))
    body = (pat * (n // 509 + 1))[:n] if n > 509 else pat
    return dst + src + struct.pack("!H", ethertype) + struct.pack("!II", seq & 0xFFFFFFFF,
                                                                  size) + body


def tcp4_frame(payload: bytes, *, src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str,
               sport: int = 40000, dport: int = 5001, seq: int = 1, ack: int = 0,
               flags: int = 0x18, ttl: int = 64, ip_id: int = 1,
               partial_csum: bool = False) -> bytes:
    """An Ethernet + IPv4 + TCP frame.  The IPv4 header checksum is always filled; the TCP
    checksum is complete, or with `partial_csum` only the pseudo-header sum (what a driver
    leaves for VIRTIO_NET_HDR_F_NEEDS_CSUM).  IP total length may exceed the MTU (GSO)."""
    src = socket.inet_aton(src_ip)
    dst = socket.inet_aton(dst_ip)
    tcp_len = 20 + len(payload)
    tot = 20 + tcp_len
    if tot > 0xFFFF:
        raise ValueError(f"IPv4 packet of {tot} bytes does not fit the total length field")
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, tot, ip_id & 0xFFFF, 0x4000, ttl, 6, 0, src,
                      dst)
    iph = iph[:10] + struct.pack("!H", inet_checksum(iph)) + iph[12:]
    tcph = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                       5 << 4, flags, 65535, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, tcp_len)
    if partial_csum:
        csum = ones_sum(pseudo)
    else:
        csum = inet_checksum(pseudo + tcph + payload)
    tcph = tcph[:16] + struct.pack("!H", csum) + tcph[18:]
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + iph + tcph + payload


def tcp4_gso_hdr(mss: int = 1448, ecn: bool = False) -> dict:
    """virtio_net_hdr fields for a tcp4_frame(partial_csum=True) to be segmented by `mss`."""
    return dict(flags=vnet.HDR_F_NEEDS_CSUM,
                gso_type=vnet.GSO_TCPV4 | (vnet.GSO_ECN if ecn else 0),
                hdr_len=vnet.ETH_HLEN + 20 + 20, gso_size=mss,
                csum_start=vnet.ETH_HLEN + 20, csum_offset=16)


def tcp4_csum_ok(frame: bytes) -> bool:
    """Whether the TCP checksum of an Ethernet/IPv4/TCP (no options) frame is complete."""
    ihl = (frame[vnet.ETH_HLEN] & 0xF) * 4
    tot = struct.unpack_from("!H", frame, vnet.ETH_HLEN + 2)[0]
    ip = frame[vnet.ETH_HLEN:vnet.ETH_HLEN + tot]
    seg = ip[ihl:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    return inet_checksum(pseudo + seg) == 0
