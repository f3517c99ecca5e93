"""vhost_user.py: the vhost-user wire format (QEMU docs/interop/vhost-user.rst).

Owns the request enums with the spec's numbers, the protocol-feature bits, the message header and
every payload layout as `construct` schemas, plus `parse_payload` that checks a payload's size
against the message it belongs to.  Pure data: no sockets, no state, no file descriptors.
"""
from __future__ import annotations

import enum

from construct import Array, Bytes, Default, Int8ul, Int16ul, Int32ul, Int64ul, Struct, this

# Header flags (spec "Message Specification").
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# VHOST_USER_F_PROTOCOL_FEATURES: virtio feature bit 30, offered by a backend that speaks
# GET/SET_PROTOCOL_FEATURES (spec "Protocol features").
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

# VHOST_F_LOG_ALL: virtio feature bit 26 in vhost's use, "log all writes" (spec "Migration"):
# while negotiated the back-end marks every guest page it writes in the log bitmap of
# SET_LOG_BASE, one bit per VHOST_LOG_PAGE bytes (bit page % 8 of byte page / 8).
VHOST_F_LOG_ALL = 1 << 26
VHOST_LOG_PAGE = 0x1000

# Bit 8 of the u64 in SET_VRING_KICK/CALL/ERR: "no file descriptor, use polling" (spec).
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

# Spec: "VHOST_USER_MAX_CONFIG_SIZE" (QEMU hw/virtio/vhost-user.c) is 256 bytes.
MAX_CONFIG_SIZE = 256
# SET_MEM_TABLE carries at most 8 regions (VHOST_MEMORY_BASELINE_NREGIONS); fds ride along.
MAX_MEM_TABLE_REGIONS = 8
MAX_FDS = 8


class FrontendReq(enum.IntEnum):
    """Front-end message types (spec "Front-end message types")."""
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendReq(enum.IntEnum):
    """Back-end message types, sent on the SET_BACKEND_REQ_FD channel (spec)."""
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits 0-19 (spec "Protocol features")."""
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# --- schemas ---------------------------------------------------------------------------------

Header = Struct("request" / Int32ul, "flags" / Int32ul, "size" / Int32ul)
HEADER_SIZE = 12

U64 = Struct("value" / Int64ul)

# "A vring state description": index + num (num is the size or the avail index).
VringState = Struct("index" / Int32ul, "num" / Int32ul)

# "A vring address description": addresses are front-end virtual addresses (user_addr space).
VRING_ADDR_F_LOG = 1 << 0
VringAddr = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "descriptor" / Int64ul,
    "used" / Int64ul,
    "available" / Int64ul,
    "log" / Int64ul,
)

MemoryRegion = Struct(
    "guest_addr" / Int64ul,
    "size" / Int64ul,
    "user_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)
MEMORY_REGION_SIZE = 32

# "Multiple Memory regions description": num_regions, padding, then regions.
MemoryTable = Struct(
    "num_regions" / Int32ul,
    "padding" / Int32ul,
    "regions" / Array(this.num_regions, MemoryRegion),
)

# "Single memory region description" (ADD_MEM_REG / REM_MEM_REG).
SingleMemoryRegion = Struct("padding" / Int64ul, "region" / MemoryRegion)

# "Log description".
Log = Struct("mmap_size" / Int64ul, "mmap_offset" / Int64ul)

# "Inflight description" (GET/SET_INFLIGHT_FD).
Inflight = Struct(
    "mmap_size" / Int64ul,
    "mmap_offset" / Int64ul,
    "num_queues" / Int16ul,
    "queue_size" / Int16ul,
    # C's struct VhostUserInflight is padded to its u64 alignment: QEMU and libvhost-user send
    # and expect 24 bytes, and QEMU refuses a GET_INFLIGHT_FD reply of any other size
    "padding" / Default(Bytes(4), bytes(4)),
)

# The inflight region's split-ring layout (spec "Inflight I/O tracking"): per queue a
# QueueRegionSplit -- u64 features, u16 version, u16 desc_num, u16 last_batch_head,
# u16 used_idx -- followed by desc_num DescStateSplit {u8 inflight, u8 padding[5], u16 next,
# u64 counter}.  The layout of the fd as a whole is the back-end's to choose (the front-end only
# keeps it and hands it back); queues follow each other, each rounded up to INFLIGHT_ALIGNMENT
# as libvhost-user does.
INFLIGHT_VERSION = 1
INFLIGHT_HEADER_SIZE = 16
INFLIGHT_DESC_SIZE = 16
INFLIGHT_ALIGNMENT = 64
InflightQueueHeader = Struct(
    "features" / Int64ul,
    "version" / Int16ul,
    "desc_num" / Int16ul,
    "last_batch_head" / Int16ul,
    "used_idx" / Int16ul,
)
DescStateSplit = Struct(
    "inflight" / Int8ul,
    "padding" / Bytes(5),
    "next" / Int16ul,
    "counter" / Int64ul,
)


# A packed ring's region is the back-end's own layout (cython_ext/ring.pyx: a 32-byte header,
# then per buffer id 80 bytes: state, counter and a copy of up to 4 descriptors, which a packed
# ring overwrites with used ones).  GET_INFLIGHT_FD comes before the features are set, so every
# queue gets room for either layout.
INFLIGHT_PACKED_HEADER_SIZE = 32
INFLIGHT_PACKED_ENTRY_SIZE = 80


def inflight_queue_size(queue_size: int) -> int:
    """Bytes one queue of `queue_size` descriptors takes in the inflight fd (either layout)."""
    raw = max(INFLIGHT_HEADER_SIZE + INFLIGHT_DESC_SIZE * queue_size,
              INFLIGHT_PACKED_HEADER_SIZE + INFLIGHT_PACKED_ENTRY_SIZE * queue_size)
    return (raw + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT

# "Device configuration space" (GET/SET_CONFIG): the payload is `size` bytes long.
CONFIG_HEADER_SIZE = 12
CONFIG_FLAG_WRITABLE = 0x0
CONFIG_FLAG_MIGRATION = 0x1
Config = Struct(
    "offset" / Int32ul,
    "size" / Int32ul,
    "flags" / Int32ul,
    "payload" / Bytes(this.size),
)

# "Device state transfer parameters" (SET_DEVICE_STATE_FD).
DeviceState = Struct("transfer_direction" / Int32ul, "migration_phase" / Int32ul)

# "IOTLB message": struct vhost_iotlb_msg is padded to 32 bytes by its u64 alignment.
Iotlb = Struct(
    "iova" / Int64ul,
    "size" / Int64ul,
    "user_addr" / Int64ul,
    "permission" / Int8ul,
    "type" / Int8ul,
    "padding" / Bytes(6),
)

# "VRING area description" (VRING_HOST_NOTIFIER_MSG).
VringArea = Struct("index" / Int64ul, "size" / Int64ul, "offset" / Int64ul)

# "UUID" (shared objects).
SharedObject = Struct("uuid" / Bytes(16))

EMPTY = None  # marker: the request carries no payload

# The payload each front-end request carries.  A callable entry checks a variable-size payload.
REQUEST_PAYLOAD = {
    FrontendReq.GET_FEATURES: EMPTY,
    FrontendReq.SET_FEATURES: U64,
    FrontendReq.SET_OWNER: EMPTY,
    FrontendReq.RESET_OWNER: EMPTY,
    FrontendReq.SET_MEM_TABLE: MemoryTable,
    FrontendReq.SET_LOG_BASE: Log,
    FrontendReq.SET_LOG_FD: EMPTY,
    FrontendReq.SET_VRING_NUM: VringState,
    FrontendReq.SET_VRING_ADDR: VringAddr,
    FrontendReq.SET_VRING_BASE: VringState,
    FrontendReq.GET_VRING_BASE: VringState,
    FrontendReq.SET_VRING_KICK: U64,
    FrontendReq.SET_VRING_CALL: U64,
    FrontendReq.SET_VRING_ERR: U64,
    FrontendReq.GET_PROTOCOL_FEATURES: EMPTY,
    FrontendReq.SET_PROTOCOL_FEATURES: U64,
    FrontendReq.GET_QUEUE_NUM: EMPTY,
    FrontendReq.SET_VRING_ENABLE: VringState,
    FrontendReq.SEND_RARP: U64,
    FrontendReq.NET_SET_MTU: U64,
    FrontendReq.SET_BACKEND_REQ_FD: EMPTY,
    FrontendReq.IOTLB_MSG: Iotlb,
    FrontendReq.SET_VRING_ENDIAN: VringState,
    FrontendReq.GET_CONFIG: Config,
    FrontendReq.SET_CONFIG: Config,
    FrontendReq.POSTCOPY_ADVISE: EMPTY,
    FrontendReq.POSTCOPY_LISTEN: EMPTY,
    FrontendReq.POSTCOPY_END: EMPTY,
    FrontendReq.GET_INFLIGHT_FD: Inflight,
    FrontendReq.SET_INFLIGHT_FD: Inflight,
    FrontendReq.GPU_SET_SOCKET: EMPTY,
    FrontendReq.RESET_DEVICE: EMPTY,
    FrontendReq.VRING_KICK: VringState,
    FrontendReq.GET_MAX_MEM_SLOTS: EMPTY,
    FrontendReq.ADD_MEM_REG: SingleMemoryRegion,
    FrontendReq.REM_MEM_REG: SingleMemoryRegion,
    FrontendReq.SET_STATUS: U64,
    FrontendReq.GET_STATUS: EMPTY,
    FrontendReq.GET_SHARED_OBJECT: SharedObject,
    FrontendReq.SET_DEVICE_STATE_FD: DeviceState,
    FrontendReq.CHECK_DEVICE_STATE: EMPTY,
}


class MessageError(ValueError):
    """A payload that does not fit the message it came with; the text names the message."""


def request_name(request: int) -> str:
    try:
        return FrontendReq(request).name
    except ValueError:
        return f"request {request}"


def parse_payload(request: int, payload: bytes):
    """Parse `payload` of front-end `request`; raise MessageError naming the message if the
    size is wrong.  Returns a construct Container, or None for payload-less requests.

    Some frontends (QEMU) send a u64 with "no payload" requests such as RESET_OWNER or
    SET_OWNER on older versions; those extra bytes are tolerated, nothing else is.
    """
    name = request_name(request)
    try:
        req = FrontendReq(request)
    except ValueError:
        raise MessageError(f"{name}: unknown request") from None
    if req not in REQUEST_PAYLOAD:
        raise MessageError(f"{name}: not supported")
    schema = REQUEST_PAYLOAD[req]
    if schema is EMPTY:
        if len(payload) not in (0, 8):
            raise MessageError(f"{name}: payload size {len(payload)}, expected 0")
        return None
    if schema is MemoryTable:
        if len(payload) < 8:
            raise MessageError(f"{name}: payload size {len(payload)}, expected at least 8")
        n = int.from_bytes(payload[:4], "little")
        if n > MAX_MEM_TABLE_REGIONS or len(payload) != 8 + n * MEMORY_REGION_SIZE:
            raise MessageError(f"{name}: payload size {len(payload)} does not hold {n} regions "
                               f"(at most {MAX_MEM_TABLE_REGIONS})")
        return MemoryTable.parse(payload)
    if schema is Config:
        if len(payload) < CONFIG_HEADER_SIZE:
            raise MessageError(f"{name}: payload size {len(payload)}, expected at least "
                               f"{CONFIG_HEADER_SIZE}")
        size = int.from_bytes(payload[4:8], "little")
        if size > MAX_CONFIG_SIZE or len(payload) != CONFIG_HEADER_SIZE + size:
            raise MessageError(f"{name}: payload size {len(payload)} does not match config "
                               f"size {size} (at most {MAX_CONFIG_SIZE})")
        return Config.parse(payload)
    expected = schema.sizeof()
    if len(payload) != expected:
        # QEMU's SET_VRING_BASE etc. are exact; SET_LOG_BASE was once a bare u64.
        raise MessageError(f"{name}: payload size {len(payload)}, expected {expected}")
    return schema.parse(payload)


def build_message(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """Header + payload as one wire message."""
    return Header.build(dict(request=int(request), flags=flags, size=len(payload))) + payload


def u64(value: int) -> bytes:
    return U64.build(dict(value=value))
