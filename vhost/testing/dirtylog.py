"""dirtylog.py: the frontend's side of dirty logging (vhost-user "Migration"): a log bitmap in a
memfd, as QEMU allocates it (one bit per 4 KiB guest page, `log_size` bytes), that the frontend
driver hands over with SET_LOG_BASE and the tests read back, plus the page arithmetic the
assertions use.
Must not: touch a socket or a ring; import tests, devices, vhost.server, vhost.service or
vhost.config.
"""
from __future__ import annotations

import mmap
import os

from protocols.vhost_user import VHOST_LOG_PAGE


def pages(gpa: int, length: int) -> set[int]:
    """The 4 KiB guest pages [gpa, gpa+length) touches."""
    if length <= 0:
        return set()
    return set(range(gpa // VHOST_LOG_PAGE, (gpa + length - 1) // VHOST_LOG_PAGE + 1))


def log_size_for(mem_size: int) -> int:
    """Bytes of bitmap covering guest addresses [0, mem_size), as QEMU sizes it."""
    return -(-mem_size // (VHOST_LOG_PAGE * 8))


class DirtyLog:
    """A memfd of `size` bytes (rounded up to a page for the mapping) mapped here."""

    def __init__(self, size: int):
        self.size = size
        self.map_len = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        self.fd = os.memfd_create("pyvhost-dirty-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.map_len)
        self.mm = mmap.mmap(self.fd, self.map_len)

    @property
    def address(self) -> int:
        """Where this process mapped it (what a backend worker in this process may take)."""
        import ctypes
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def dirty(self) -> set[int]:
        """The pages whose bits are set (the bytes past `size` count too: none may be)."""
        out = set()
        data = self.mm[:self.map_len]
        for i, b in enumerate(data):
            if b:
                out.update(8 * i + k for k in range(8) if b >> k & 1)
        return out

    def tail_clean(self) -> bool:
        """Nothing was written past the `size` bytes the log was declared with."""
        return not any(self.mm[self.size:self.map_len])

    def clear(self) -> None:
        self.mm[:] = bytes(self.map_len)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)
