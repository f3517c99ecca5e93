"""packed.py: the driver side of a packed virtqueue (virtio 1.2 §2.8), the counterpart of
vhost.testing.virtqueue's split `VirtQueue` with the same interface, so that the frontend
drivers run either layout (`packed=True`).

Owns: `PackedVirtQueue` -- the descriptor ring and the two event suppression structures in a
`GuestRAM`; buffer ids (a free list, one per outstanding chain); direct and indirect chains
laid out from the avail position with the AVAIL/USED bits of the wrap counter at each slot,
the head's flags stored last (one 16-bit store) to make a chain available; reaping used
descriptors in ring order, each advancing by the number of slots its buffer took; kicks that
honour the device's event suppression flags; interrupts armed through the driver's.  Raw entry
points (`write_slot`, `make_available`) let tests lay out hostile chains.
Must not: touch the vhost-user socket; trust the backend (a used id that is not outstanding is
kept in `unknown_used` and raises nothing here; every wait is bounded); import tests, devices,
vhost.server, vhost.service or vhost.config.  Memory ordering as in virtqueue.py (x86 TSO,
fences from an uncontended lock, single 16-bit stores for flags the backend polls).
"""
from __future__ import annotations

import ctypes
import struct
from typing import Iterable, Sequence

from protocols import virtio
from vhost.testing.errors import QueueFull
from vhost.testing.ram import GuestRAM
from vhost.testing.virtqueue import VirtQueue, full_fence

_PDESC = struct.Struct("QIHH")        # addr, len, id, flags
_U16 = struct.Struct("H")
AVAIL, USED = virtio.VIRTQ_DESC_F_AVAIL, virtio.VIRTQ_DESC_F_USED


def avail_bits(wrap: bool) -> int:
    """The AVAIL/USED bits a driver sets on a descriptor it makes available in lap `wrap`."""
    return AVAIL if wrap else USED


class PackedVirtQueue(VirtQueue):
    """One packed virtqueue driven from the driver side; see the module docstring."""

    packed = True

    def __init__(self, ram: GuestRAM, index: int, size: int, *, event_idx: bool,
                 kick_fd: int, call_fd: int):
        self._common(ram, index, size, event_idx, kick_fd, call_fd)
        ring_bytes = virtio.packed_ring_size(size)
        self.desc_gpa = ram.alloc(ring_bytes, align=virtio.DESC_ALIGN)
        # "avail" = driver event suppression, "used" = device event suppression (the names
        # SET_VRING_ADDR gives them)
        self.avail_gpa = ram.alloc(virtio.EVENT_SUPPRESS_SIZE, align=virtio.EVENT_SUPPRESS_ALIGN)
        self.used_gpa = ram.alloc(virtio.EVENT_SUPPRESS_SIZE, align=virtio.EVENT_SUPPRESS_ALIGN)
        self._desc_off = ram.offset(self.desc_gpa, ring_bytes)
        self._drv_off = ram.offset(self.avail_gpa, 4)
        self._dev_off = ram.offset(self.used_gpa, 4)
        ram.fill(self.desc_gpa, ring_bytes, 0)
        ram.fill(self.avail_gpa, 4, 0)
        ram.fill(self.used_gpa, 4, 0)
        base = ram.base_va
        self._drv_off_wrap_cell = ctypes.c_uint16.from_address(base + self._drv_off)
        self._drv_flags_cell = ctypes.c_uint16.from_address(base + self._drv_off + 2)
        self._free_ids: list[int] = list(range(size - 1, -1, -1))
        self._chains: dict[int, tuple[int, int | None]] = {}   # id -> (slots, table gpa)
        self._pending: dict[int, tuple[int, int]] = {}          # id -> (head slot, flags)
        self.slots_free = size
        self.next_avail = 0          # position of the next descriptor we make available
        self.avail_wrap = True
        self.next_used = 0           # position of the next used descriptor we read
        self.used_wrap = True

    # -- addresses --

    def addresses(self) -> tuple[int, int, int]:
        """(descriptor ring, device area, driver area) virtual addresses for SET_VRING_ADDR
        (its descriptor, used and available fields)."""
        return (self.ram.user_addr(self.desc_gpa), self.ram.user_addr(self.used_gpa),
                self.ram.user_addr(self.avail_gpa))

    @property
    def num_free(self) -> int:
        return self.slots_free

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    # -- descriptors --

    def write_slot(self, pos: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        """Write ring slot `pos` verbatim (its flags too: for hostile tests)."""
        _PDESC.pack_into(self.ram.mm, self._desc_off + 16 * (pos % self.size),
                         addr & (2**64 - 1), length & 0xFFFFFFFF, buf_id & 0xFFFF,
                         flags & 0xFFFF)

    def read_slot(self, pos: int) -> tuple[int, int, int, int]:
        return _PDESC.unpack_from(self.ram.mm, self._desc_off + 16 * (pos % self.size))

    def _store_flags(self, pos: int, flags: int) -> None:
        if self.ram.mm is None:
            raise ValueError(f"queue {self.index}: guest RAM is closed")
        ctypes.c_uint16.from_address(self.ram.base_va + self._desc_off + 16 * pos + 14).value = \
            flags & 0xFFFF

    def _advance(self) -> tuple[int, bool]:
        pos, wrap = self.next_avail, self.avail_wrap
        self.next_avail += 1
        if self.next_avail == self.size:
            self.next_avail = 0
            self.avail_wrap = not self.avail_wrap
        return pos, wrap

    def make_available(self, entries: Sequence[tuple[int, int, int]], buf_id: int | None = None,
                       table: int | None = None) -> int:
        """Lay out raw (addr, len, flags) descriptors from the avail position (the AVAIL/USED
        bits added, every other flag verbatim: NEXT is the caller's) with one buffer id;
        returns the id (a free one unless given).  Made available at `publish`."""
        if len(entries) > self.slots_free:
            raise QueueFull(f"queue {self.index}: {len(entries)} slots needed, "
                            f"{self.slots_free} free")
        if buf_id is None:
            if not self._free_ids:
                raise QueueFull(f"queue {self.index}: no free buffer id")
            buf_id = self._free_ids.pop()
        elif buf_id in self._free_ids:
            self._free_ids.remove(buf_id)
        head = None
        for k, (addr, length, flags) in enumerate(entries):
            pos, wrap = self._advance()
            f = (flags & ~(AVAIL | USED)) | avail_bits(wrap)
            if k == 0:
                head = (pos, f)
                self.write_slot(pos, addr, length, buf_id, f & ~(AVAIL | USED) | (
                    USED if wrap else AVAIL))          # not yet available: inverted bits
            else:
                self.write_slot(pos, addr, length, buf_id, f)
        self.slots_free -= len(entries)
        self._chains[buf_id] = (len(entries), table)
        self._pending[buf_id] = head
        self.max_in_flight = max(self.max_in_flight, len(self._chains))
        return buf_id

    def add_chain(self, segments: Sequence[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Lay out a chain of (gpa, len, device_writable) segments; returns its buffer id."""
        if not segments:
            raise ValueError("a chain needs at least one segment")
        n = len(segments)
        W, N = virtio.VIRTQ_DESC_F_WRITE, virtio.VIRTQ_DESC_F_NEXT
        if indirect:
            table = self.ram.alloc(n * 16, align=virtio.DESC_ALIGN)
            off = self.ram.offset(table, n * 16)
            for k, (addr, length, writable) in enumerate(segments):
                _PDESC.pack_into(self.ram.mm, off + 16 * k, addr, length, 0, W if writable else 0)
            try:
                return self.make_available([(table, n * 16, virtio.VIRTQ_DESC_F_INDIRECT)],
                                           table=table)
            except QueueFull:
                self.ram.free(table)
                raise
        return self.make_available([(addr, length, (W if writable else 0) | (N if k < n - 1
                                                                               else 0))
                                    for k, (addr, length, writable) in enumerate(segments)])

    def publish(self, heads: Iterable[int]) -> int:
        """Make the chains of `heads` (buffer ids, in the order they were laid out) available:
        each head's flags stored last, in one 16-bit store."""
        n = 0
        for h in heads:
            pos, flags = self._pending.pop(h)
            self._store_flags(pos, flags)
            n += 1
        self.avail_idx = (self.avail_idx + n) & 0xFFFF
        return n

    # -- notifications --

    def device_flags(self) -> int:
        return _U16.unpack_from(self.ram.mm, self._dev_off + 2)[0]

    def notify_needed(self) -> bool:
        """Whether the device wants a kick (device event suppression flags not DISABLE)."""
        full_fence()
        self._kick_old = self.avail_idx
        return self.device_flags() != virtio.RING_EVENT_FLAGS_DISABLE

    # -- used descriptors --

    def _used_at(self, pos: int, wrap: bool) -> bool:
        flags = _U16.unpack_from(self.ram.mm, self._desc_off + 16 * pos + 14)[0]
        a, u = bool(flags & AVAIL), bool(flags & USED)
        return a == u == wrap

    def used_idx(self) -> int:
        """Used descriptors consumed plus those waiting (free-running, like split's index)."""
        n, pos, wrap, idx = 0, self.next_used, self.used_wrap, self.last_used_idx
        while n < self.size and self._used_at(pos, wrap):
            _, _, bid, _ = self.read_slot(pos)
            slots = self._chains.get(bid, (1, None))[0]
            pos += slots
            if pos >= self.size:
                pos -= self.size
                wrap = not wrap
            n += 1
        return (idx + n) & 0xFFFF

    def has_used(self) -> bool:
        return self._used_at(self.next_used, self.used_wrap)

    def reap(self) -> list[tuple[int, int]]:
        out = []
        for _ in range(self.size):
            if not self._used_at(self.next_used, self.used_wrap):
                break
            _, length, bid, _ = self.read_slot(self.next_used)
            chain = self._chains.pop(bid, None)
            if chain is None:
                self.unknown_used.append((bid, length))
                slots = 1
            else:
                slots, table = chain
                self.slots_free += slots
                self._free_ids.append(bid)
                if table is not None:
                    self.ram.free(table)
            self.next_used += slots
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap = not self.used_wrap
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            out.append((bid, length))
        return out

    def arm_interrupt(self) -> bool:
        """Ask for a call on the next used descriptor (EVENT_IDX: DESC mode at next_used;
        otherwise ENABLE), then re-check.  True if used descriptors are already waiting."""
        if self.event_idx:
            self._drv_off_wrap_cell.value = self.next_used | (0x8000 if self.used_wrap else 0)
            self._drv_flags_cell.value = virtio.RING_EVENT_FLAGS_DESC
        else:
            self._drv_flags_cell.value = virtio.RING_EVENT_FLAGS_ENABLE
        full_fence()
        return self.has_used()

    def set_interrupts(self, flags: int, off_wrap: int = 0) -> None:
        """Store the driver event suppression structure verbatim."""
        self._drv_off_wrap_cell.value = off_wrap & 0xFFFF
        self._drv_flags_cell.value = flags & 0xFFFF

    def base(self) -> int:
        """SET_VRING_BASE's value for this ring's current position (QEMU's packed encoding)."""
        a = self.next_avail | (0x8000 if self.avail_wrap else 0)
        u = self.next_used | (0x8000 if self.used_wrap else 0)
        return a | u << 16

    def describe(self) -> str:
        return (f"packed queue {self.index} (size {self.size}): avail at {self.next_avail} "
                f"(wrap {int(self.avail_wrap)}), used at {self.next_used} (wrap "
                f"{int(self.used_wrap)}), {self.in_flight} chains in flight, kicks {self.kicks} "
                f"(+{self.kicks_suppressed} suppressed), calls {self.interrupts}")

    # the split ring's raw entry points have no meaning here
    def write_desc(self, *a, **kw):
        raise NotImplementedError("packed ring: use write_slot / make_available")

    add_raw_descs = write_indirect_table = write_avail_entry = set_avail_idx = write_desc
