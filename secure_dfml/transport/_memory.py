"""In-memory transport: the default, used by simulations and tests.

:class:`InMemoryTransport` is a hub of mailboxes, one per peer.  Peers never
touch it directly: each gets an :class:`InMemoryEndpoint` bound to its own id
(``hub.endpoint(peer_id)``) that can only send *as* that peer and only read that
peer's mailbox -- the same interface as the ZeroMQ endpoint, so the same peer
code runs on both.  Only bytes move: a :class:`~secure_dfml.transport.Message`
is a frozen record of ints, a kind and the (sealed) data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection

from secure_dfml.errors import TransportError
from secure_dfml.transport._base import Message

logger = logging.getLogger(__name__)

Tap = Callable[[str, Message], None]


class InMemoryTransport:
    """Thread-safe in-process mailboxes, one per recipient.

    Messages for a later round wait in the mailbox; messages for a round older
    than the recipient's floor (:meth:`InMemoryEndpoint.drop_before`) are
    dropped.  ``tap`` sees every delivered message (for traffic capture).
    """

    def __init__(self, *, tap: Tap | None = None) -> None:
        self._boxes: dict[int, list[Message]] = defaultdict(list)
        self._floor: dict[int, int] = {}
        self._cond = threading.Condition()
        self._tap = tap
        self._bytes: dict[int, int] = defaultdict(int)
        self._endpoints: dict[int, InMemoryEndpoint] = {}

    @property
    def bytes_sent(self) -> int:
        with self._cond:
            return sum(self._bytes.values())

    def endpoint(self, peer_id: int) -> InMemoryEndpoint:
        """The endpoint bound to ``peer_id`` (one per peer)."""
        with self._cond:
            ep = self._endpoints.get(peer_id)
            if ep is None:
                ep = self._endpoints[peer_id] = InMemoryEndpoint(self, peer_id)
            return ep

    # -- used by endpoints --------------------------------------------------------

    def _deliver(self, message: Message) -> None:
        with self._cond:
            self._bytes[message.sender] += len(message.data)
            if message.round_index < self._floor.get(message.recipient, -1):
                logger.debug("stale %s message for peer %d dropped", message.kind, message.recipient)
                return
            self._boxes[message.recipient].append(message)
            self._cond.notify_all()
        if self._tap is not None:
            self._tap("sent", message)

    def _matching(self, recipient: int, round_index: int, kind: str, senders: Collection[int]) -> list[Message]:
        return [
            m for m in self._boxes[recipient]
            if m.round_index == round_index and m.kind == kind and m.sender in senders
        ]

    def _ready(self, recipient: int, round_index: int, kind: str, senders: Collection[int]) -> bool:
        with self._cond:
            got = {m.sender for m in self._matching(recipient, round_index, kind, senders)}
            return got >= set(senders)

    def _receive(
        self, recipient: int, round_index: int, kind: str, senders: Collection[int], timeout: float
    ) -> list[Message]:
        deadline = time.monotonic() + max(0.0, timeout)
        wanted = set(senders)
        with self._cond:
            while {m.sender for m in self._matching(recipient, round_index, kind, wanted)} < wanted:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            got = self._matching(recipient, round_index, kind, wanted)
            taken = {id(m) for m in got}
            self._boxes[recipient] = [m for m in self._boxes[recipient] if id(m) not in taken]
            return got

    def _drop_before(self, recipient: int, round_index: int) -> None:
        with self._cond:
            self._floor[recipient] = max(self._floor.get(recipient, -1), round_index)
            self._boxes[recipient] = [m for m in self._boxes[recipient] if m.round_index >= round_index]

    def close(self) -> None:
        with self._cond:
            self._boxes.clear()


class InMemoryEndpoint:
    """One peer's view of an :class:`InMemoryTransport`: it sends only as
    ``peer_id`` and reads only ``peer_id``'s mailbox."""

    def __init__(self, hub: InMemoryTransport, peer_id: int) -> None:
        self._hub = hub
        self.peer_id = peer_id
        self.rejected = 0

    @property
    def bytes_sent(self) -> int:
        with self._hub._cond:
            return self._hub._bytes[self.peer_id]

    def send(self, message: Message) -> None:
        if message.sender != self.peer_id:
            raise TransportError(
                f"endpoint of peer {self.peer_id} cannot send as peer {message.sender}: an endpoint sends only as itself"
            )
        self._hub._deliver(message)

    def ready(self, *, round_index: int, kind: str, senders: Collection[int]) -> bool:
        """True when a message from every one of ``senders`` is waiting (no wait, no change)."""
        return self._hub._ready(self.peer_id, round_index, kind, senders)

    def receive(self, *, round_index: int, kind: str, senders: Collection[int], timeout: float) -> list[Message]:
        """Messages of this round and kind from ``senders``, waiting at most
        ``timeout`` seconds (returning as soon as each sender's has arrived)."""
        return self._hub._receive(self.peer_id, round_index, kind, senders, timeout)

    def drop_before(self, round_index: int) -> None:
        self._hub._drop_before(self.peer_id, round_index)

    def close(self) -> None:
        pass
