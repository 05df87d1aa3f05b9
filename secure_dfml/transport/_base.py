"""Transport interface: how peers' bytes move.  Peers never share objects."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Message:
    """One transmitted message.  ``sender``, ``round_index`` and ``kind`` are
    transport metadata (untrusted): an authenticated channel must check them
    against the envelope ``data`` carries."""

    sender: int
    recipient: int
    round_index: int
    kind: str
    data: bytes


@runtime_checkable
class Endpoint(Protocol):
    """One peer's connection to the others, bound to its id: it sends only as
    ``peer_id`` and receives only what is addressed to ``peer_id``.

    Implementations: :class:`~secure_dfml.transport.InMemoryEndpoint`
    (simulation, threads), :class:`~secure_dfml.transport.ZmqEndpoint`
    (processes over TCP) and :class:`~secure_dfml.transport.RayEndpoint`
    (Ray actors).  Every wait is bounded by ``timeout``; messages of a
    later round are kept for later calls, those of rounds before the floor set
    by :meth:`drop_before` are dropped."""

    peer_id: int

    @property
    def bytes_sent(self) -> int: ...

    def send(self, message: Message) -> None: ...

    def receive(self, *, round_index: int, kind: str, senders: Collection[int], timeout: float) -> list[Message]:
        """Messages of this round and kind from ``senders`` that arrive within
        ``timeout`` seconds, returning early once one from each has arrived."""
        ...

    def drop_before(self, round_index: int) -> None: ...

    def close(self) -> None: ...
