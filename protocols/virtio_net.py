"""virtio_net.py: virtio-net wire formats (virtio 1.2, section 5.1): feature bits, the
virtio_net_hdr that precedes every packet, GSO types, and the config space layout.  Pure data.
"""
from __future__ import annotations

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

# Feature bits (5.1.3).
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_CTRL_GUEST_OFFLOADS = 1 << 2
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_GUEST_UFO = 1 << 10
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_HOST_UFO = 1 << 14
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_CTRL_VQ = 1 << 17
F_CTRL_RX = 1 << 18
F_CTRL_VLAN = 1 << 19
F_GUEST_ANNOUNCE = 1 << 21
F_MQ = 1 << 22
F_CTRL_MAC_ADDR = 1 << 23
F_HASH_REPORT = 1 << 57
F_RSS = 1 << 60
F_RSC_EXT = 1 << 61
F_STANDBY = 1 << 62
F_SPEED_DUPLEX = 1 << 63

GUEST_OFFLOADS = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_GUEST_UFO
HOST_OFFLOADS = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_HOST_UFO

# virtio_net_hdr.flags
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
HDR_F_RSC_INFO = 4
# virtio_net_hdr.gso_type
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

# struct virtio_net_hdr with num_buffers: 12 bytes, the size used whenever VERSION_1 or
# MRG_RXBUF is negotiated (5.1.6); the legacy header without num_buffers is 10 bytes.
NetHdr = Struct(
    "flags" / Int8ul,
    "gso_type" / Int8ul,
    "hdr_len" / Int16ul,
    "gso_size" / Int16ul,
    "csum_start" / Int16ul,
    "csum_offset" / Int16ul,
    "num_buffers" / Int16ul,
)
HDR_SIZE = 12
LEGACY_HDR_SIZE = 10

# config status bits
S_LINK_UP = 1
S_ANNOUNCE = 2

# struct virtio_net_config (through mtu; speed/duplex follow).
Config = Struct(
    "mac" / Bytes(6),
    "status" / Int16ul,
    "max_virtqueue_pairs" / Int16ul,
    "mtu" / Int16ul,
    "speed" / Int32ul,
    "duplex" / Int8ul,
)
CONFIG_SIZE = 17

# Largest frame a guest may hand us with TSO/UFO (64 KiB of IP payload + Ethernet/VLAN header),
# and the classic frame limit without GSO.
MAX_GSO_FRAME = 65536 + 18
ETH_HLEN = 14
DEFAULT_MTU = 1500
MIN_MTU = 68
MAX_MTU = 65535 - ETH_HLEN


def rx_queue(pair: int) -> int:
    """Virtqueue index of pair `pair`'s receive queue (5.1.2: receiveq1, transmitq1, ...)."""
    return 2 * pair


def tx_queue(pair: int) -> int:
    return 2 * pair + 1
