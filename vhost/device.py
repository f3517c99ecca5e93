"""device.py: the interface every device in devices/ implements, and the QueueHandle the
protocol hands a device when a virtqueue starts.

Modelled on rust-vmm's VhostUserBackend and libvhost-user's VuDevIface: small, with defaults.
Owns no I/O and no protocol state; the protocol (vhost/protocol.py) decides *when* queues start
and stop, the device decides *how* (its Cython worker threads).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

from protocols.vhost_user import ProtocolFeature
from protocols import virtio

from .memory import GuestMemory


@dataclass
class QueueHandle:
    """What a queue worker needs, all validated by the protocol before start_queue."""
    index: int
    size: int                 # queue size (power of two)
    desc: int                 # host address of the descriptor table
    avail: int                # host address of the avail ring
    used: int                 # host address of the used ring
    last_avail_idx: int       # where to resume (SET_VRING_BASE / previous GET_VRING_BASE)
    kick_fd: int              # eventfd the frontend kicks; -1 = polling (NOFD)
    call_fd: int              # eventfd we signal; -1 = no interrupts
    err_fd: int = -1
    features: int = 0         # negotiated virtio features
    memory: GuestMemory = field(default_factory=GuestMemory)
    signal_call: bool = False  # write call_fd once on start (lost-interrupt recovery)

    @property
    def event_idx(self) -> bool:
        return bool(self.features & virtio.F_RING_EVENT_IDX)

    @property
    def indirect(self) -> bool:
        return bool(self.features & virtio.F_RING_INDIRECT_DESC)


class Device(abc.ABC):
    """A virtio device served over vhost-user."""

    num_queues: int = 1
    max_queue_size: int = 1024
    device_type: str = "unknown"

    @abc.abstractmethod
    def features(self) -> int:
        """Virtio feature bits offered (VHOST_USER_F_PROTOCOL_FEATURES is added by the protocol)."""

    def protocol_features(self) -> ProtocolFeature:
        return (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.RESET_DEVICE
                | ProtocolFeature.STATUS)

    def ack_features(self, features: int) -> None:
        """The frontend's SET_FEATURES (may be repeated; never disables rings)."""

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def set_config(self, offset: int, data: bytes) -> None:
        raise ValueError("config space is read-only")

    @abc.abstractmethod
    def start_queue(self, index: int, queue: QueueHandle) -> None:
        """Start serving queue `index` (spawn its worker)."""

    @abc.abstractmethod
    def stop_queue(self, index: int) -> int:
        """Stop the worker for `index`, completing in-flight requests first; return the next
        avail index to process (the value GET_VRING_BASE reports)."""

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (net devices with protocol feature NET_MTU)."""
        raise ValueError("this device has no MTU")

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: announce `mac` on the device's network (net devices, protocol feature RARP)."""
        raise ValueError("this device cannot send RARP")

    def queue_stats(self, index: int) -> dict:
        return {}

    def reset(self) -> None:
        """Device reset (RESET_DEVICE / RESET_OWNER / disconnect); queues are already stopped."""
