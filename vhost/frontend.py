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
* virtio-blk requests on top (`read`, `write`, `flush`, `discard`, `write_zeroes`, `get_id`,
  and the pipelined `submit_many`), with optional random scatter-gather splitting of data buffers.

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
uncontended lock acquire (a LOCK-prefixed instruction).  Ring indices are written and read with
native-format `struct` (one 16-bit memcpy, i.e. a single store), never byte by byte, so the
backend can't see a torn index.
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

# Native-format accessors (see module docstring: single loads/stores for ring indices).
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
        _U16.pack_into(self.ram.mm, self._avail_off + 4 + 2 * (slot % self.size), head & 0xFFFF)

    def set_avail_idx(self, idx: int) -> None:
        """Store avail->idx (and the shadow) verbatim; for hostile tests."""
        self.avail_idx = idx & 0xFFFF
        _U16.pack_into(self.ram.mm, self._avail_off + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        _U16.pack_into(self.ram.mm, self._avail_off, flags & 0xFFFF)

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
            _U16.pack_into(mm, self._avail_off + 2, self.avail_idx)
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
            _U16.pack_into(self.ram.mm, self._avail_off + 4 + 2 * self.size, self.last_used_idx)
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

class Frontend:
    """A vhost-user frontend over `socket_path`.  `connect()` (or `with Frontend(...) as f`)
    runs QEMU's setup sequence; `close()` stops the rings and releases everything.

    Options beyond the basics: `regions` (a custom [(gpa, size, mmap_offset), ...] layout of the
    shm object), `use_add_mem_reg` (None: ADD_MEM_REG when CONFIGURE_MEM_SLOTS is offered, as
    QEMU does; True: require it; False: always SET_MEM_TABLE), `protocol_features` (mask of
    protocol features we may negotiate), `device_features` (device-specific feature bits we
    accept), `seed` (random scatter-gather splitting of request buffers and a random choice of
    indirect vs direct chains; None = one descriptor per buffer, indirect whenever negotiated),
    `max_segments` (upper bound of pieces per data buffer), `timeout` (seconds, every wait).
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
        self.rng = random.Random(seed) if seed is not None else None
        self.max_segments = max(1, max_segments)
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
        self.config = None                      # virtio_blk.Config container (if CONFIG)
        self.mem_table_via: str | None = None   # "SET_MEM_TABLE" or "ADD_MEM_REG"
        self.vring_bases: list[int] | None = None
        self._started = False
        self._closed = False

    # -- context manager --

    def __enter__(self) -> "Frontend":
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

    def connect(self) -> "Frontend":
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
        if self.num_queues > self.max_queues:
            raise FrontendError(f"{self.num_queues} queues requested, backend supports "
                                f"{self.max_queues}"
                                + ("" if self.protocol_features & ProtocolFeature.MQ
                                   else " (protocol feature MQ not negotiated)"))
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            self.max_mem_slots = self.call_u64(FrontendReq.GET_MAX_MEM_SLOTS)

        self.setup(FrontendReq.SET_OWNER)

        if self.protocol_features & ProtocolFeature.CONFIG:
            self.config = self.get_config()

        wanted = (self.device_features_mask | virtio.F_VERSION_1 | virtio.F_ANY_LAYOUT
                  | (virtio.F_RING_EVENT_IDX if self.want_event_idx else 0)
                  | (virtio.F_RING_INDIRECT_DESC if self.want_indirect else 0)
                  | VHOST_USER_F_PROTOCOL_FEATURES)
        self.features = self.backend_features & wanted
        self.setup(FrontendReq.SET_FEATURES, u64(self.features))

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

    def get_config(self, size: int = vblk.CONFIG_SIZE, offset: int = 0):
        """GET_CONFIG, parsed as virtio_blk.Config when the full blk layout was asked for;
        otherwise the raw bytes."""
        payload = Config.build(dict(offset=offset, size=size, flags=0, payload=bytes(size)))
        reply = self.call(FrontendReq.GET_CONFIG, payload)
        if len(reply) < 12:
            raise VhostUserError(f"GET_CONFIG reply of {len(reply)} bytes")
        c = Config.parse(reply)
        if c.size == 0 or len(c.payload) != size:
            raise VhostUserError(f"GET_CONFIG failed: backend returned {c.size} bytes of config "
                                 f"(asked {size} at offset {offset})")
        if offset == 0 and size >= vblk.CONFIG_SIZE:
            return vblk.Config.parse(c.payload)
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

    def describe(self) -> str:
        return (f"Frontend({self.socket_path}): features {self.features:#x}, protocol features "
                f"{self.protocol_features:#x}, memory via {self.mem_table_via}, "
                + "; ".join(vq.describe() for vq in self.queues))
