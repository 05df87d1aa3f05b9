"""The receive buffer every network endpoint shares: messages by (round, kind),
bounded by count and data bytes, with a stale floor.

Not thread-safe by itself: each endpoint calls it under its own lock (the
ZeroMQ endpoint's receive lock, the Ray mailbox's condition)."""

from __future__ import annotations

from collections.abc import Collection
from enum import Enum

from secure_dfml.transport._base import Message

__all__ = ["Admit", "RoundBuffer"]


class Admit(Enum):
    """What :meth:`RoundBuffer.admit` did with a message."""

    BUFFERED = "buffered"
    STALE = "stale"  # of a round below the floor: dropped
    FULL = "full"  # over the count or byte bound: dropped


class RoundBuffer:
    def __init__(self, *, max_messages: int, max_bytes: int) -> None:
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._buffer: dict[tuple[int, str], list[Message]] = {}
        self.messages = 0
        self.bytes = 0
        self.floor = 0

    def admit(self, msg: Message) -> Admit:
        if msg.round_index < self.floor:
            return Admit.STALE
        if self.messages >= self._max_messages or self.bytes + len(msg.data) > self._max_bytes:
            return Admit.FULL
        self._buffer.setdefault((msg.round_index, msg.kind), []).append(msg)
        self.messages += 1
        self.bytes += len(msg.data)
        return Admit.BUFFERED

    def senders(self, round_index: int, kind: str) -> set[int]:
        """Who has a message of this round and kind waiting."""
        return {m.sender for m in self._buffer.get((round_index, kind), ())}

    def take(self, round_index: int, kind: str, senders: Collection[int]) -> list[Message]:
        """Remove and return the waiting messages of this round and kind from ``senders``."""
        wanted = set(senders)
        key = (round_index, kind)
        bucket = self._buffer.get(key, [])
        got = [m for m in bucket if m.sender in wanted]
        keep = [m for m in bucket if m.sender not in wanted]
        if keep:
            self._buffer[key] = keep
        else:
            self._buffer.pop(key, None)
        self._forget(got)
        return got

    def drop_before(self, round_index: int) -> None:
        """Raise the floor to ``round_index`` and drop everything below it."""
        self.floor = max(self.floor, round_index)
        for key in [k for k in self._buffer if k[0] < self.floor]:
            self._forget(self._buffer.pop(key))

    def clear(self) -> None:
        self._buffer.clear()
        self.messages = self.bytes = 0

    def _forget(self, gone: list[Message]) -> None:
        self.messages -= len(gone)
        self.bytes -= sum(len(m.data) for m in gone)
