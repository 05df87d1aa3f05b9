"""Transports: the only way peers exchange bytes."""

from secure_dfml.transport._base import Endpoint, Message
from secure_dfml.transport._capture import CapturedMessage, CaptureTap, read_capture
from secure_dfml.transport._memory import InMemoryEndpoint, InMemoryTransport
from secure_dfml.transport._ray import Mailbox, RayEndpoint
from secure_dfml.transport._zmq import WIRE_MAGIC, ZmqEndpoint, free_tcp_addresses

__all__ = [
    "CaptureTap",
    "CapturedMessage",
    "Endpoint",
    "InMemoryEndpoint",
    "InMemoryTransport",
    "Mailbox",
    "Message",
    "RayEndpoint",
    "WIRE_MAGIC",
    "ZmqEndpoint",
    "free_tcp_addresses",
    "read_capture",
]
