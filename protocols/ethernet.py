"""ethernet.py: the few Ethernet frames pyvhost builds itself.  Pure data: no sockets, no state.

Owns the RARP announcement a backend sends for a guest after live migration (vhost-user
SEND_RARP), byte for byte as QEMU's own `announce_self_create` (net/announce.c) builds it, so
that switches on the path learn the guest's MAC at its new place.
"""
from __future__ import annotations

import struct

ETH_P_RARP = 0x8035
ARP_HTYPE_ETH = 1
ARP_PTYPE_IP = 0x0800
ARP_OP_REQUEST_REV = 3          # RFC 903 "reverse request"
ETH_ZLEN = 60                   # minimum frame without the FCS
BROADCAST = b"\xff" * 6


def rarp_announce(mac: bytes) -> bytes:
    """Broadcast RARP reverse request from `mac` for `mac` (60 bytes, zero padded)."""
    if len(mac) != 6:
        raise ValueError(f"a MAC is 6 bytes, not {len(mac)}")
    frame = (BROADCAST + mac + struct.pack("!HHHBBH", ETH_P_RARP, ARP_HTYPE_ETH, ARP_PTYPE_IP,
                                           6, 4, ARP_OP_REQUEST_REV)
             + mac + bytes(4) + mac + bytes(4))
    return frame.ljust(ETH_ZLEN, b"\0")
