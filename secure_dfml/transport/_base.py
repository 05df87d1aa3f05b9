"""Transport interface: how peers' bytes move.  Peers never share objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Message:
    """One transmitted message.  ``sender`` is transport metadata (untrusted):
    an authenticated channel must check it against the envelope it carries."""

    sender: int
    recipient: int
    round_index: int
    kind: str
    data: bytes


@runtime_checkable
class Transport(Protocol):
    """Moves opaque bytes between peers."""

    def send(self, message: Message) -> None: ...

    def receive(
        self, recipient: int, *, round_index: int, kind: str, expected: int, timeout: float
    ) -> list[Message]:
        """Messages for ``recipient`` of this round and kind that arrive within
        ``timeout`` seconds, returning early once ``expected`` have arrived."""
        ...

    @property
    def bytes_sent(self) -> int: ...

    def close(self) -> None: ...
