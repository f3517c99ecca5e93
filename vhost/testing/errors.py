"""errors.py: the exceptions of the frontend driver (vhost.testing).

Owns: the exception hierarchy every vhost.testing module raises (`FrontendError` and its
subclasses), so that a test can catch "the backend misbehaved" in one place.
Must not: import anything of the project; hold any logic.
"""
from __future__ import annotations


class FrontendError(Exception):
    """Base class for errors raised by the frontend driver."""


class VhostUserError(FrontendError):
    """The backend misbehaved on the socket: disconnect, failure ack, malformed reply."""


class RingError(FrontendError):
    """The backend misbehaved on a ring (unknown used id, used index jumped too far)."""


class QueueFull(FrontendError):
    """Not enough free descriptors for a chain."""


class GuestRAMFull(FrontendError, MemoryError):
    """The guest-RAM allocator has no block large enough."""
