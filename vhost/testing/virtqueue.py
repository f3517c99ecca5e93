"""virtqueue.py: the driver side of a split virtqueue (like rust-vmm's virtio-queue mock.rs).

Owns: `VirtQueue` -- descriptor table, avail and used rings in a `GuestRAM`; direct and indirect
chains; publishing with the right store ordering; kicks that honour VIRTQ_USED_F_NO_NOTIFY /
EVENT_IDX avail_event; reaping the used ring; waiting on the call eventfd.  Lower-level entry
points (`write_desc`, `add_raw_descs`, `write_indirect_table`, `track_chain`,
`write_avail_entry`, `set_avail_idx`) let ring tests lay out hostile chains on purpose
(vhost.testing.hostile builds the common ones).
Must not: touch the vhost-user socket (the eventfds are given to it); trust the backend (every
wait is bounded by a timeout, a used entry naming an unknown head or an index jumping too far
raises RingError); import tests, devices, vhost.server, vhost.service or vhost.config.

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
import os
import select
import struct
import sys
import threading
import time
from typing import Iterable, Sequence

from protocols import virtio
from vhost.testing.errors import QueueFull, RingError
from vhost.testing.ram import GuestRAM

if sys.byteorder != "little":  # pragma: no cover - virtio 1.x rings are little-endian
    raise ImportError("vhost.testing assumes a little-endian host (native ring accessors)")

DEFAULT_TIMEOUT = 10.0

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


class VirtQueue:
    """The driver side of one split virtqueue whose rings live in `ram`.

    Descriptor ownership: `add_chain` / `add_raw_descs` take descriptors from the free list and
    remember the chain under its head; when the used ring returns that head, its descriptors
    (and an indirect table allocated by `add_chain`) are released.  Data buffers belong to the
    caller.
    """

    packed = False

    def __init__(self, ram: GuestRAM, index: int, size: int, *, event_idx: bool,
                 kick_fd: int, call_fd: int):
        self._common(ram, index, size, event_idx, kick_fd, call_fd)
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

    def _common(self, ram: GuestRAM, index: int, size: int, event_idx: bool, kick_fd: int,
                call_fd: int) -> None:
        """What either ring layout's driver side starts with (PackedVirtQueue too)."""
        if not 1 <= size <= virtio.MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {size} out of range 1..{virtio.MAX_QUEUE_SIZE}")
        self.ram = ram
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.avail_idx = 0          # shadow of avail->idx (packed: chains made available)
        self.last_used_idx = 0      # next used entry to consume (packed: used ones consumed)
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

    def track_chain(self, indices: Sequence[int], table: int | None = None) -> int:
        """Record descriptors laid out by hand (`reserve_descs` + `write_desc`) as one chain
        under indices[0], released (with the indirect `table`, if given) when the backend
        returns that head; returns the head."""
        self._chains[indices[0]] = (list(indices), table)
        return indices[0]

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
