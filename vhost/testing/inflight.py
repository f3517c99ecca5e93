"""inflight.py: the frontend's side of inflight tracking (vhost-user "Inflight I/O tracking"): the
region QEMU gets with GET_INFLIGHT_FD and keeps across backend restarts, mapped here so that the
frontend driver can hand it back (SET_INFLIGHT_FD) and the tests can read what the backend
marked in it (protocols/vhost_user.py has the split layout).  A region can also be made here,
zeroed, for in-process ring tests.
Must not: touch a socket or a ring; import tests, devices, vhost.server, vhost.service or
vhost.config.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct

from protocols.vhost_user import (
    INFLIGHT_DESC_SIZE,
    INFLIGHT_HEADER_SIZE,
    INFLIGHT_PACKED_ENTRY_SIZE,
    INFLIGHT_PACKED_HEADER_SIZE,
    DescStateSplit,
    InflightQueueHeader,
    inflight_queue_size,
)


class InflightRegion:
    """`num_queues` split-ring regions of `queue_size` descriptors in an fd mapped here: the
    fd a backend answered GET_INFLIGHT_FD with (`fd`, `mmap_size`, `mmap_offset`; this object
    owns the fd from then on), or a new zeroed memfd (fd None)."""

    def __init__(self, queue_size: int, num_queues: int = 1, *, fd: int | None = None,
                 mmap_size: int | None = None, mmap_offset: int = 0):
        self.queue_size = queue_size
        self.num_queues = num_queues
        self.per_queue = inflight_queue_size(queue_size)
        need = self.per_queue * num_queues
        self.mmap_size = need if mmap_size is None else mmap_size
        self.mmap_offset = mmap_offset
        if self.mmap_size < need:
            raise ValueError(f"inflight region of {self.mmap_size} bytes, {need} needed")
        if fd is None:
            fd = os.memfd_create("test-inflight", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.mmap_size)
        self.fd = fd
        self.mm = mmap.mmap(fd, self.mmap_size, offset=mmap_offset)

    @property
    def address(self) -> int:
        """Where this process mapped it (what a worker in this process may take)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def queue(self, q: int = 0):
        """What a backend in-process takes as `inflight`: (address, size) of queue q's part."""
        return (self.address + q * self.per_queue, self.per_queue)

    def header(self, q: int = 0):
        return InflightQueueHeader.parse(self.mm[q * self.per_queue:][:INFLIGHT_HEADER_SIZE])

    def desc(self, head: int, q: int = 0):
        off = q * self.per_queue + INFLIGHT_HEADER_SIZE + INFLIGHT_DESC_SIZE * head
        return DescStateSplit.parse(self.mm[off:off + INFLIGHT_DESC_SIZE])

    def packed_layout(self, q: int = 0) -> bool:
        """The backend laid this queue out for a packed ring (features bit 0; see
        protocols/vhost_user.py: a layout of pyvhost's own)."""
        return bool(self.header(q).features & 1)

    def in_flight(self, q: int = 0) -> list[int]:
        """Heads (split) or buffer ids (packed) marked in flight, in submission order."""
        if self.packed_layout(q):
            base = q * self.per_queue + INFLIGHT_PACKED_HEADER_SIZE
            marked = []
            for bid in range(self.queue_size):
                off = base + INFLIGHT_PACKED_ENTRY_SIZE * bid
                if self.mm[off]:
                    marked.append((struct.unpack_from("<Q", self.mm, off + 8)[0], bid))
            return [b for _, b in sorted(marked)]
        marked = [(self.desc(h, q).counter, h) for h in range(self.queue_size)
                  if self.desc(h, q).inflight]
        return [h for _, h in sorted(marked)]

    def write(self, offset: int, data: bytes, q: int = 0) -> None:
        """Raw bytes at `offset` of queue q's part (hostile-region tests)."""
        base = q * self.per_queue + offset
        self.mm[base:base + len(data)] = data

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
