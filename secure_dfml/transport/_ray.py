"""Ray transport endpoint: envelope bytes delivered between Ray actors.

Design
------
* Every peer lives in a Ray actor (:mod:`secure_dfml.orchestration.ray_backend`)
  whose mailbox method ``deliver(header, data)`` hands what arrived to the
  recipient's :class:`RayEndpoint`.  A peer sends by calling
  ``recipient_actor.deliver.remote(header, data)``: the two arguments are
  ``bytes`` and nothing else -- the fixed-size wire header of the ZeroMQ
  transport (:func:`~secure_dfml.transport._zmq.encode_header`: routing metadata,
  untrusted) and the sealed envelope.  No actor is ever handed another's
  state, model object or keys.
* The receive side is a :class:`Mailbox` with the ZeroMQ endpoint's bounds and
  buffering: at most ``max_buffered_messages`` messages and
  ``max_buffered_bytes`` data bytes are held (the surplus is dropped and
  counted), an envelope over ``max_message_bytes`` is refused, messages are
  buffered by ``(round_index, kind)`` so a later round's wait for the
  ``receive`` that asks for them, and ``drop_before`` raises a floor below which
  buffered messages are discarded and later arrivals dropped (stale).
* Every wait is bounded: ``receive`` waits on a condition against a deadline;
  ``send`` never blocks on the recipient -- ``.remote()`` returns at once -- but
  at most ``max_in_flight`` deliveries may be unfinished, and a send that finds
  the bound reached waits at most :data:`SEND_RETRY_SECONDS` for some to finish
  (``settle``, given by the actor host: ``ray.wait``), then fails.
  A delivery that failed (the recipient's actor died) is logged and counted:
  for the recipient it is a missing message, i.e. a timeout.
* This module never imports Ray: a handle is anything whose ``deliver.remote``
  takes ``(header, data)``, so the semantics are tested without a cluster.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from secure_dfml.errors import TransportError
from secure_dfml.transport._base import Message
from secure_dfml.transport._buffer import Admit, RoundBuffer
from secure_dfml.transport._zmq import _check_kind, _is_uint, decode_header, encode_header

logger = logging.getLogger(__name__)

SEND_RETRY_SECONDS = 5.0
_WARN_EVERY_S = 5.0
_U32 = (1 << 32) - 1

Tap = Callable[[str, Message], None]
#: ``settle(pending, timeout, at_least)``: wait at most ``timeout`` seconds until
#: ``at_least`` of the ``pending`` delivery handles have finished; returns the
#: handles still pending and a description of each finished one that failed.
Settle = Callable[[list[Any], float, int], tuple[list[Any], list[str]]]

__all__ = ["SEND_RETRY_SECONDS", "Mailbox", "RayEndpoint"]


class Mailbox:
    """One peer's receive buffer (thread-safe): what ``deliver`` accepted, by
    ``(round_index, kind)``, bounded by count and bytes, with a stale floor.

    ``senders`` are the peer ids this peer may hear from (the others); anything
    malformed, misaddressed, from an unknown sender, oversize or over the buffer
    bound is dropped and counted in :attr:`rejected`; a well-formed message of a
    round below the floor is dropped and counted in :attr:`stale`."""

    def __init__(
        self,
        *,
        peer_id: int,
        senders: Collection[int],
        max_message_bytes: int = 256 * 1024 * 1024,
        max_buffered_bytes: int = 1 << 30,
        max_buffered_messages: int = 4096,
        tap: Tap | None = None,
    ) -> None:
        if not _is_uint(peer_id, _U32) or not all(_is_uint(s, _U32) for s in senders):
            raise TransportError("peer ids must be integers in [0, 2**32)")
        if peer_id in senders:
            raise TransportError(f"senders must list the OTHER peers; it contains this peer's id {peer_id}")
        if min(max_message_bytes, max_buffered_bytes, max_buffered_messages) <= 0:
            raise TransportError("message size and buffer bounds must be positive")
        self.peer_id = peer_id
        self._senders = frozenset(senders)
        self._max_message = max_message_bytes
        self._tap = tap
        self._cond = threading.Condition()
        self._buffer = RoundBuffer(max_messages=max_buffered_messages, max_bytes=max_buffered_bytes)
        self._rejected = 0
        self._stale = 0
        self._last_warn = -math.inf
        self._closed = False

    @property
    def rejected(self) -> int:
        return self._rejected

    @property
    def stale(self) -> int:
        return self._stale

    @property
    def buffered(self) -> tuple[int, int]:
        """(messages, data bytes) held now."""
        with self._cond:
            return self._buffer.messages, self._buffer.bytes

    def _reject(self, reason: str) -> bool:
        self._rejected += 1
        now = time.monotonic()
        if now - self._last_warn >= _WARN_EVERY_S:
            self._last_warn = now
            logger.warning("peer %d rejected a delivery (%s); %d rejected so far", self.peer_id, reason, self._rejected)
        else:
            logger.debug("peer %d rejected a delivery (%s)", self.peer_id, reason)
        return False

    def accept(self, header: object, data: object) -> bool:
        """Take one delivery (``header``, ``data``: bytes); True when it was buffered.
        Never raises: whatever a delivery holds, at most a counter changes."""
        if not isinstance(header, bytes) or not isinstance(data, bytes):
            with self._cond:
                return self._reject(f"a delivery of {type(header).__name__}, {type(data).__name__}, not bytes")
        fields = decode_header(header)
        with self._cond:
            if self._closed:
                return False
            if fields is None:
                return self._reject("malformed header")
            sender, recipient, round_index, kind = fields
            if recipient != self.peer_id:
                return self._reject(f"recipient {recipient} is not this peer")
            if sender not in self._senders:
                return self._reject(f"unknown sender {sender}")
            if len(data) > self._max_message:
                return self._reject(f"{len(data)} data bytes over max_message_bytes")
            msg = Message(sender=sender, recipient=recipient, round_index=round_index, kind=kind, data=data)
            admitted = self._buffer.admit(msg)
            if admitted is Admit.STALE:
                self._stale += 1
                logger.debug("peer %d dropped stale %s of round %d from %d", self.peer_id, kind, round_index, sender)
                return False
            if admitted is Admit.FULL:
                return self._reject("receive buffer full")
            self._cond.notify_all()
        if self._tap is not None:
            self._tap("received", msg)
        return True

    def ready(self, *, round_index: int, kind: str, senders: Collection[int]) -> bool:
        """True when a message from every one of ``senders`` is waiting (no wait, no change)."""
        with self._cond:
            return set(senders) <= self._buffer.senders(round_index, kind)

    def take(self, *, round_index: int, kind: str, senders: Collection[int], timeout: float) -> list[Message]:
        """Messages of this round and kind from ``senders``, waiting at most
        ``timeout`` seconds (returning as soon as each sender's is there)."""
        _check_kind(kind)
        wanted = set(senders)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            if self._closed:
                raise TransportError("endpoint is closed")
            if round_index < self._buffer.floor:
                logger.debug("peer %d: round %d is below the floor %d", self.peer_id, round_index, self._buffer.floor)
                return []
            while not wanted <= self._buffer.senders(round_index, kind):
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return self._buffer.take(round_index, kind, wanted)

    def drop_before(self, round_index: int) -> None:
        with self._cond:
            self._buffer.drop_before(round_index)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._buffer.clear()
            self._cond.notify_all()


class RayEndpoint:
    """This peer's end of the actor mesh: sends as ``peer_id`` (by calling the
    recipient actor's ``deliver.remote(header, data)``), receives what its
    actor's mailbox method hands to :meth:`deliver`.

    ``peers`` maps every OTHER peer id to the handle of the actor hosting it
    (several peers may share one actor).  ``settle`` (see :data:`Settle`) lets
    the endpoint bound its unfinished deliveries; without it deliveries are
    not tracked (tests)."""

    def __init__(
        self,
        *,
        peer_id: int,
        peers: Mapping[int, Any],
        max_message_bytes: int = 256 * 1024 * 1024,
        max_buffered_bytes: int = 1 << 30,
        max_buffered_messages: int = 4096,
        max_in_flight: int = 1000,
        settle: Settle | None = None,
        tap: Tap | None = None,
    ) -> None:
        if max_in_flight <= 0:
            raise TransportError("max_in_flight must be positive")
        self._mailbox = Mailbox(
            peer_id=peer_id, senders=list(peers), max_message_bytes=max_message_bytes,
            max_buffered_bytes=max_buffered_bytes, max_buffered_messages=max_buffered_messages, tap=tap,
        )
        self._peer_id = peer_id
        self._peers = dict(peers)
        self._max_message = max_message_bytes
        self._max_in_flight = max_in_flight
        self._settle = settle
        self._tap = tap
        self._send_lock = threading.Lock()
        self._pending: list[Any] = []
        self._bytes_sent = 0
        self._failed = 0
        self._closed = False

    @property
    def peer_id(self) -> int:
        return self._peer_id

    @property
    def bytes_sent(self) -> int:
        """Data bytes handed to Ray for delivery."""
        return self._bytes_sent

    @property
    def rejected(self) -> int:
        return self._mailbox.rejected

    @property
    def stale(self) -> int:
        return self._mailbox.stale

    @property
    def failed_deliveries(self) -> int:
        """Deliveries Ray reported as failed (e.g. the recipient's actor died)."""
        return self._failed

    @property
    def mailbox(self) -> Mailbox:
        return self._mailbox

    # -- sending ---------------------------------------------------------------

    def _note_failures(self, errors: list[str]) -> None:
        for err in errors:
            self._failed += 1
            logger.warning("peer %d: a delivery failed (%s); for its recipient it is a missing message", self._peer_id, err)

    def _make_room(self) -> None:
        if self._settle is None:
            return
        self._pending, errors = self._settle(self._pending, 0.0, 0)
        self._note_failures(errors)
        if len(self._pending) < self._max_in_flight:
            return
        need = len(self._pending) - self._max_in_flight + 1
        self._pending, errors = self._settle(self._pending, SEND_RETRY_SECONDS, need)
        self._note_failures(errors)
        if len(self._pending) >= self._max_in_flight:
            raise TransportError(
                f"peer {self._peer_id}: {len(self._pending)} deliveries still unfinished after {SEND_RETRY_SECONDS:.0f} s"
            )

    def send(self, message: Message) -> None:
        if message.sender != self._peer_id:
            raise TransportError(f"endpoint {self._peer_id} sends only as itself, not as sender {message.sender!r}")
        if message.recipient not in self._peers:
            raise TransportError(f"unknown recipient {message.recipient!r} (not among this endpoint's peers)")
        if not isinstance(message.data, bytes):
            raise TransportError(f"only bytes travel between actors, not {type(message.data).__name__}")
        if len(message.data) > self._max_message:
            raise TransportError(f"message of {len(message.data)} bytes exceeds max_message_bytes={self._max_message}")
        header = encode_header(message.sender, message.recipient, message.round_index, message.kind)
        with self._send_lock:
            if self._closed:
                raise TransportError("endpoint is closed")
            self._make_room()
            ref = self._peers[message.recipient].deliver.remote(header, message.data)
            if self._settle is not None:
                self._pending.append(ref)
            self._bytes_sent += len(message.data)
        if self._tap is not None:
            self._tap("sent", message)

    # -- receiving -------------------------------------------------------------

    def deliver(self, header: object, data: object) -> bool:
        """What the hosting actor's mailbox method received for this peer."""
        return self._mailbox.accept(header, data)

    def ready(self, *, round_index: int, kind: str, senders: Collection[int]) -> bool:
        return self._mailbox.ready(round_index=round_index, kind=kind, senders=senders)

    def receive(self, *, round_index: int, kind: str, senders: Collection[int], timeout: float) -> list[Message]:
        return self._mailbox.take(round_index=round_index, kind=kind, senders=senders, timeout=timeout)

    def drop_before(self, round_index: int) -> None:
        self._mailbox.drop_before(round_index)

    # -- lifetime --------------------------------------------------------------

    def flush(self, timeout: float = SEND_RETRY_SECONDS) -> int:
        """Wait (bounded) for unfinished deliveries; returns how many are still pending."""
        with self._send_lock:
            if self._settle is not None and self._pending:
                self._pending, errors = self._settle(self._pending, timeout, len(self._pending))
                self._note_failures(errors)
            return len(self._pending)

    def close(self) -> None:
        with self._send_lock:
            self._closed = True
            self._pending.clear()
        self._mailbox.close()

    def __repr__(self) -> str:
        return f"RayEndpoint(peer_id={self._peer_id}, peers={sorted(self._peers)})"
