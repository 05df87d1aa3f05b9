"""ZeroMQ transport endpoint: one per peer process, real sockets between peers.

Design
------
* Each peer binds one PULL socket at its own address and lazily opens one PUSH
  socket per recipient.  Every queue is bounded: ``SNDHWM``/``RCVHWM`` are
  ``hwm``, ``MAXMSGSIZE`` makes libzmq itself drop (and disconnect) a peer that
  sends a frame larger than ``max_message_bytes`` plus the header, and the
  receive buffer holds at most ``max_buffered_messages`` messages and
  ``max_buffered_bytes`` data bytes.  Under a flood the surplus is dropped and
  counted, memory stays bounded.
* Accepted messages are buffered by ``(round_index, kind)``: a message for a
  later round or another kind waits for the ``receive`` call that asks for it.
  ``drop_before`` raises a floor; buffered messages below it are discarded and
  later arrivals below it are dropped on arrival (stale).
* Every wait is bounded: ``receive`` polls against a deadline, ``send`` uses
  ``NOBLOCK`` and gives up after :data:`SEND_RETRY_SECONDS`, ``close`` terms the
  context with a bounded linger.
* Trust: nothing from the network is deserialised beyond a fixed-size
  ``struct`` header (no pickle, no json).  The header is routing metadata only
  and is untrusted: the data frame is opaque bytes, normally an authenticated
  envelope that the caller's channel verifies (sender included).  Replays and
  duplicates are returned to the caller, whose channel decides.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Mapping
from types import TracebackType

import zmq

from secure_dfml.errors import TransportError
from secure_dfml.transport._base import Message
from secure_dfml.transport._buffer import Admit, RoundBuffer

logger = logging.getLogger(__name__)

WIRE_MAGIC = b"SDFM"
WIRE_VERSION = 1
_HEADER = struct.Struct("!4sBIIQ32s")
HEADER_SIZE = _HEADER.size
_KIND_RE = re.compile(rb"[a-z0-9_-]{1,32}")
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
SEND_RETRY_SECONDS = 5.0
LINGER_MS = 2000
_WARN_EVERY_S = 5.0
_DRAIN_BATCH = 10_000

__all__ = ["HEADER_SIZE", "WIRE_MAGIC", "ZmqEndpoint", "decode_header", "encode_header", "free_tcp_addresses"]


def _is_uint(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _check_kind(kind: object) -> bytes:
    raw = kind.encode("ascii", "replace") if isinstance(kind, str) else b""
    if not _KIND_RE.fullmatch(raw):
        raise TransportError(f"kind must be 1..32 characters of [a-z0-9_-], got {kind!r}")
    return raw


def encode_header(sender: int, recipient: int, round_index: int, kind: str) -> bytes:
    """The fixed-size wire header (frame 0) for one message."""
    if not (_is_uint(sender, _U32) and _is_uint(recipient, _U32)):
        raise TransportError(f"peer ids must be integers in [0, 2**32), got {sender!r} -> {recipient!r}")
    if not _is_uint(round_index, _U64):
        raise TransportError(f"round_index must be an integer in [0, 2**64), got {round_index!r}")
    return _HEADER.pack(WIRE_MAGIC, WIRE_VERSION, sender, recipient, round_index, _check_kind(kind))


def decode_header(b: bytes) -> tuple[int, int, int, str] | None:
    """``(sender, recipient, round_index, kind)``, or ``None`` for anything that
    is not exactly a header :func:`encode_header` produces (never raises)."""
    if not isinstance(b, bytes | bytearray | memoryview) or len(b) != HEADER_SIZE:
        return None
    magic, version, sender, recipient, round_index, padded = _HEADER.unpack(bytes(b))
    if magic != WIRE_MAGIC or version != WIRE_VERSION:
        return None
    kind = padded.rstrip(b"\0")  # interior NULs stay and fail the pattern
    if not _KIND_RE.fullmatch(kind):
        return None
    return sender, recipient, round_index, kind.decode("ascii")


def free_tcp_addresses(n: int, host: str = "127.0.0.1") -> list[str]:
    """``n`` distinct ``tcp://host:port`` addresses whose ports were free just now
    (IPv4 host; another process may still take a port before it is bound)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [f"tcp://{host}:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()


class ZmqEndpoint:
    """This peer's end of a ZeroMQ mesh: sends as ``peer_id``, receives for it."""

    def __init__(
        self,
        *,
        peer_id: int,
        bind: str,
        peers: Mapping[int, str],
        max_message_bytes: int = 256 * 1024 * 1024,
        max_buffered_bytes: int = 1 << 30,
        max_buffered_messages: int = 4096,
        hwm: int = 1000,
        tap: Callable[[str, Message], None] | None = None,
    ) -> None:
        if not _is_uint(peer_id, _U32) or not all(_is_uint(p, _U32) for p in peers):
            raise TransportError("peer ids must be integers in [0, 2**32)")
        if peer_id in peers:
            raise TransportError(f"peers must list the OTHER peers; it contains this peer's id {peer_id}")
        if min(max_message_bytes, max_buffered_bytes, max_buffered_messages, hwm) <= 0:
            raise TransportError("message size, buffer bounds and hwm must be positive")
        self._peer_id = peer_id
        self._peers = dict(peers)
        self._max_message = max_message_bytes
        self._hwm = hwm
        self._tap = tap
        self._send_lock = threading.RLock()
        self._recv_lock = threading.RLock()
        self._pushes: dict[int, zmq.Socket] = {}
        self._buffer = RoundBuffer(max_messages=max_buffered_messages, max_bytes=max_buffered_bytes)
        self._bytes_sent = 0
        self._rejected = 0
        self._stale = 0
        self._last_warn = -math.inf
        self._closed = False
        self._ctx = zmq.Context()
        try:
            self._pull = self._ctx.socket(zmq.PULL)
            self._pull.setsockopt(zmq.LINGER, 0)
            self._pull.setsockopt(zmq.RCVHWM, hwm)
            self._pull.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + HEADER_SIZE)
            self._pull.bind(bind)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise TransportError(f"peer {peer_id} cannot bind {bind!r}: {exc}") from exc
        self._bind = bind

    @property
    def peer_id(self) -> int:
        return self._peer_id

    @property
    def bytes_sent(self) -> int:
        """Data bytes (frame 1) successfully queued for sending."""
        return self._bytes_sent

    @property
    def rejected(self) -> int:
        """Incoming messages dropped as malformed, misaddressed, from an unknown
        sender, oversize, or over the buffer bound.  Frames libzmq drops itself
        (over ``MAXMSGSIZE``, over ``RCVHWM``) never reach this count."""
        return self._rejected

    @property
    def stale(self) -> int:
        """Well-formed messages dropped on arrival for a round below the floor."""
        return self._stale

    # -- sending ---------------------------------------------------------------

    def _push(self, recipient: int) -> zmq.Socket:
        sock = self._pushes.get(recipient)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, self._hwm)
            sock.setsockopt(zmq.LINGER, LINGER_MS)
            try:
                sock.connect(self._peers[recipient])
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise TransportError(f"cannot connect to peer {recipient} at {self._peers[recipient]!r}: {exc}") from exc
            self._pushes[recipient] = sock
        return sock

    def send(self, message: Message) -> None:
        if message.sender != self._peer_id:
            raise TransportError(
                f"endpoint {self._peer_id} sends only as itself, not as sender {message.sender!r}"
            )
        if message.recipient not in self._peers:
            raise TransportError(f"unknown recipient {message.recipient!r} (not among this endpoint's peers)")
        if len(message.data) > self._max_message:
            raise TransportError(f"message of {len(message.data)} bytes exceeds max_message_bytes={self._max_message}")
        header = encode_header(message.sender, message.recipient, message.round_index, message.kind)
        with self._send_lock:
            if self._closed:
                raise TransportError("endpoint is closed")
            sock = self._push(message.recipient)
            deadline = time.monotonic() + SEND_RETRY_SECONDS
            while True:
                try:
                    sock.send_multipart([header, message.data], flags=zmq.NOBLOCK)
                    break
                except zmq.Again:
                    if time.monotonic() >= deadline:
                        raise TransportError(
                            f"send queue to peer {message.recipient} still full after {SEND_RETRY_SECONDS:.0f} s"
                        ) from None
                    time.sleep(0.01)
                except zmq.ZMQError as exc:
                    raise TransportError(f"send to peer {message.recipient} failed: {exc}") from exc
            self._bytes_sent += len(message.data)
        if self._tap is not None:
            self._tap("sent", message)

    # -- receiving -------------------------------------------------------------

    def _reject(self, reason: str) -> None:
        self._rejected += 1
        now = time.monotonic()
        if now - self._last_warn >= _WARN_EVERY_S:
            self._last_warn = now
            logger.warning("peer %d rejected a frame (%s); %d rejected so far", self._peer_id, reason, self._rejected)
        else:
            logger.debug("peer %d rejected a frame (%s)", self._peer_id, reason)

    def _recv_one(self) -> bool:
        """Take one multipart message off the socket; False when none is waiting."""
        try:
            first = self._pull.recv(zmq.NOBLOCK)
        except zmq.Again:
            return False
        frames = [first]
        extra = 0
        while self._pull.get(zmq.RCVMORE):  # the parts of one message arrive together
            part = self._pull.recv(zmq.NOBLOCK)
            if len(frames) < 2:
                frames.append(part)
            else:
                extra += 1
        if len(frames) != 2 or extra:
            self._reject(f"{len(frames) + extra} frames, expected 2")
            return True
        self._accept(frames[0], frames[1])
        return True

    def _accept(self, header: bytes, data: bytes) -> None:
        fields = decode_header(header)
        if fields is None:
            self._reject("malformed header")
            return
        sender, recipient, round_index, kind = fields
        if recipient != self._peer_id:
            self._reject(f"recipient {recipient} is not this peer")
        elif sender not in self._peers:
            self._reject(f"unknown sender {sender}")
        elif len(data) > self._max_message:
            self._reject(f"{len(data)} data bytes over max_message_bytes")
        else:
            msg = Message(sender=sender, recipient=recipient, round_index=round_index, kind=kind, data=data)
            admitted = self._buffer.admit(msg)
            if admitted is Admit.STALE:
                self._stale += 1
                logger.debug("peer %d dropped stale %s of round %d from %d", self._peer_id, kind, round_index, sender)
            elif admitted is Admit.FULL:
                self._reject("receive buffer full")
            elif self._tap is not None:
                self._tap("received", msg)

    def _drain(self) -> None:
        for _ in range(_DRAIN_BATCH):  # bounded, so a flood cannot pin us past the deadline
            if not self._recv_one():
                return

    def receive(self, *, round_index: int, kind: str, senders: Collection[int], timeout: float) -> list[Message]:
        _check_kind(kind)
        wanted = set(senders)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._recv_lock:
            if self._closed:
                raise TransportError("endpoint is closed")
            if round_index < self._buffer.floor:
                logger.debug("peer %d: round %d is below the floor %d", self._peer_id, round_index, self._buffer.floor)
                return []
            while True:
                self._drain()
                if wanted <= self._buffer.senders(round_index, kind):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._pull.poll(max(1, math.ceil(left * 1000)), zmq.POLLIN)
            return self._buffer.take(round_index, kind, wanted)

    def drop_before(self, round_index: int) -> None:
        with self._recv_lock:
            self._buffer.drop_before(round_index)

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        with self._send_lock, self._recv_lock:
            if self._closed:
                return
            self._closed = True
            for sock in self._pushes.values():
                sock.close(linger=LINGER_MS)
            self._pushes.clear()
            self._pull.close(linger=0)
            self._ctx.term()  # bounded: every socket is closed with a bounded linger
            self._buffer.clear()

    def __enter__(self) -> ZmqEndpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ZmqEndpoint(peer_id={self._peer_id}, bind={self._bind!r}, peers={sorted(self._peers)})"
