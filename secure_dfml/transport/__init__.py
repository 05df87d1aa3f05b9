"""Transports: the only way peers exchange bytes."""

from secure_dfml.transport._base import Message, Transport
from secure_dfml.transport._memory import InMemoryTransport
from secure_dfml.transport._zmq import WIRE_MAGIC, ZmqEndpoint, free_tcp_addresses

__all__ = ["InMemoryTransport", "Message", "Transport", "WIRE_MAGIC", "ZmqEndpoint", "free_tcp_addresses"]
