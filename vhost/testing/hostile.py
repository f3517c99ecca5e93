"""hostile.py: descriptor chains no well-behaved driver lays out, for tests of a backend's
defences.

Owns: builders that put a looped chain or a malformed INDIRECT descriptor into a `VirtQueue`
through its low-level API (`reserve_descs`, `write_desc`, `write_indirect_table`,
`track_chain`), recorded so that the queue takes the head back when the backend returns it.
The *catalogues* of hostile cases and what a backend must answer to each stay with the tests.
Must not: publish or kick (the caller decides when the backend sees a chain); decide what a
backend should do with the chain; import tests, devices, vhost.server, vhost.service or
vhost.config.
"""
from __future__ import annotations

from typing import Sequence

from protocols import virtio
from vhost.testing.virtqueue import VirtQueue

F_NEXT = virtio.VIRTQ_DESC_F_NEXT
F_WRITE = virtio.VIRTQ_DESC_F_WRITE
F_INDIRECT = virtio.VIRTQ_DESC_F_INDIRECT


def looped_chain(vq: VirtQueue, first: tuple[int, int, int], second: tuple[int, int, int]) -> int:
    """Two descriptors, (addr, len, flags) each, whose `next` fields point at each other (the
    flags should include NEXT for a real loop).  Returns the head (not published)."""
    idx = vq.reserve_descs(2)
    vq.write_desc(idx[0], *first, idx[1])
    vq.write_desc(idx[1], *second, idx[0])
    return vq.track_chain(idx)


def indirect_chain(vq: VirtQueue, entries: Sequence[tuple[int, int, int, int | None]], *,
                   extra: int = 0, extra_len: int = 0, flags_extra: int = 0) -> int:
    """One INDIRECT descriptor in the ring pointing at a table of (addr, len, flags, next)
    `entries` (`extra` zero bytes after them), with `extra_len` added to the length the ring
    descriptor claims (8: not a multiple of 16) and `flags_extra` or'ed into its flags (NEXT:
    forbidden with INDIRECT).  Returns the head (not published); the table stays allocated."""
    gpa, n = vq.write_indirect_table(entries, extra=extra)
    (head,) = vq.reserve_descs(1)
    vq.write_desc(head, gpa, n + extra_len, F_INDIRECT | flags_extra, 0)
    return vq.track_chain([head])


def nested_indirect_table(vq: VirtQueue,
                          inner: Sequence[tuple[int, int, int, int | None]]) -> tuple[int, int]:
    """An indirect table whose only entry is itself INDIRECT (pointing at a table of `inner`
    entries): returns (gpa, nbytes) of the outer table, to be put in the ring by the caller."""
    gpa, n = vq.write_indirect_table(inner)
    return vq.write_indirect_table([(gpa, n, F_INDIRECT, 0)])
