"""Transports: the only way peers exchange bytes."""

from secure_dfml.transport._base import Message, Transport
from secure_dfml.transport._memory import InMemoryTransport

__all__ = ["InMemoryTransport", "Message", "Transport"]
