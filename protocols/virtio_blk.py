"""virtio_blk.py: virtio-blk wire formats (virtio 1.2, section 5.2): feature bits, request header,
request types, status codes, config space layout.  Pure data.
"""
from __future__ import annotations

from construct import Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

SECTOR_SIZE = 512   # virtio-blk sectors are always 512 bytes (5.2.6)
ID_BYTES = 20       # VIRTIO_BLK_ID_BYTES

# Feature bits (5.2.3).
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_GEOMETRY = 1 << 4
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_CONFIG_WCE = 1 << 11
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14
F_LIFETIME = 1 << 15
F_SECURE_ERASE = 1 << 16

# Request types (5.2.6).
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14

# Status codes.
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

# struct virtio_blk_outhdr (16 bytes, device-readable, first in the chain).
ReqHeader = Struct("type" / Int32ul, "reserved" / Int32ul, "sector" / Int64ul)
REQ_HEADER_SIZE = 16

# struct virtio_blk_discard_write_zeroes (16 bytes per segment).
WRITE_ZEROES_FLAG_UNMAP = 1
DiscardWriteZeroes = Struct("sector" / Int64ul, "num_sectors" / Int32ul, "flags" / Int32ul)
DISCARD_SEGMENT_SIZE = 16

# struct virtio_blk_config (5.2.4), little-endian, 60 bytes through write_zeroes_may_unmap.
Config = Struct(
    "capacity" / Int64ul,          # 0: in 512-byte sectors
    "size_max" / Int32ul,          # 8
    "seg_max" / Int32ul,           # 12
    "cylinders" / Int16ul,         # 16  geometry
    "heads" / Int8ul,              # 18
    "sectors" / Int8ul,            # 19
    "blk_size" / Int32ul,          # 20
    "physical_block_exp" / Int8ul,  # 24  topology
    "alignment_offset" / Int8ul,   # 25
    "min_io_size" / Int16ul,       # 26
    "opt_io_size" / Int32ul,       # 28
    "writeback" / Int8ul,          # 32
    Padding(1),                    # 33 unused0
    "num_queues" / Int16ul,        # 34
    "max_discard_sectors" / Int32ul,       # 36
    "max_discard_seg" / Int32ul,           # 40
    "discard_sector_alignment" / Int32ul,  # 44
    "max_write_zeroes_sectors" / Int32ul,  # 48
    "max_write_zeroes_seg" / Int32ul,      # 52
    "write_zeroes_may_unmap" / Int8ul,     # 56
    Padding(3),                            # 57 unused1
)
CONFIG_SIZE = 60
WRITEBACK_OFFSET = 32
