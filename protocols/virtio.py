"""virtio.py: virtio 1.x feature bits, descriptor flags, split-ring layout (virtio spec 2.7) and
packed-ring layout (2.8).

Constants only; the ring engine itself lives in cython_ext/ring.pyx.
"""
from __future__ import annotations

# Reserved feature bits (virtio 1.2, section 6).
F_NOTIFY_ON_EMPTY = 1 << 24
F_ANY_LAYOUT = 1 << 27
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33
F_RING_PACKED = 1 << 34
F_IN_ORDER = 1 << 35
F_ORDER_PLATFORM = 1 << 36
F_SR_IOV = 1 << 37
F_NOTIFICATION_DATA = 1 << 38

# struct virtq_desc flags (2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# virtq_avail.flags / virtq_used.flags (2.7.7).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Split ring layout (2.7): sizes in bytes for a queue of `num` entries.
DESC_SIZE = 16            # le64 addr, le32 len, le16 flags, le16 next
USED_ELEM_SIZE = 8        # le32 id, le32 len
MAX_QUEUE_SIZE = 32768    # queue size is a power of 2 no larger than 32768 (2.7)
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    # flags, idx, ring[num], used_event
    return 2 + 2 + 2 * num + 2


def used_ring_size(num: int) -> int:
    # flags, idx, ring[num], avail_event
    return 2 + 2 + USED_ELEM_SIZE * num + 2


# Packed ring (2.8): descriptor flags beyond the split ones, and the event suppression
# structures (driver area: the driver's wishes for notifications; device area: ours for kicks).
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
EVENT_SUPPRESS_SIZE = 4   # le16 off_wrap (bit 15: wrap counter), le16 flags
EVENT_SUPPRESS_ALIGN = 4


def packed_ring_size(num: int) -> int:
    return DESC_SIZE * num


# virtio device status bits (2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128
