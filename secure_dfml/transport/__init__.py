"""Transports: the only way peers exchange bytes."""

from secure_dfml.transport._base import Endpoint, Message
from secure_dfml.transport._memory import InMemoryEndpoint, InMemoryTransport
from secure_dfml.transport._zmq import WIRE_MAGIC, ZmqEndpoint, free_tcp_addresses

__all__ = [
    "Endpoint",
    "InMemoryEndpoint",
    "InMemoryTransport",
    "Message",
    "WIRE_MAGIC",
    "ZmqEndpoint",
    "free_tcp_addresses",
]
