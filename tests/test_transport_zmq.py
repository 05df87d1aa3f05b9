"""ZeroMQ endpoint: real sockets on loopback, bounded waits, hostile input."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from secure_dfml.errors import SecureDFMLError, TransportError
from secure_dfml.transport import Message, WIRE_MAGIC, ZmqEndpoint, free_tcp_addresses
from secure_dfml.transport._zmq import HEADER_SIZE, decode_header, encode_header

KIND = "model"


@pytest.fixture
def pair() -> Iterator[tuple[ZmqEndpoint, ZmqEndpoint, list[tuple[str, Message]], str]]:
    addr_a, addr_b, addr_missing = free_tcp_addresses(3)
    taps: list[tuple[str, Message]] = []
    a = ZmqEndpoint(peer_id=0, bind=addr_a, peers={1: addr_b}, tap=lambda d, m: taps.append((d, m)))
    try:
        b = ZmqEndpoint(peer_id=1, bind=addr_b, peers={0: addr_a, 2: addr_missing}, max_message_bytes=4096)
        try:
            yield a, b, taps, addr_b
        finally:
            b.close()
    finally:
        a.close()


def msg(sender: int, recipient: int, round_index: int, data: bytes, kind: str = KIND) -> Message:
    return Message(sender=sender, recipient=recipient, round_index=round_index, kind=kind, data=data)


def test_exchange_both_ways_buffering_and_floor(pair) -> None:
    a, b, taps, _ = pair
    a.send(msg(0, 1, 1, b"later"))
    a.send(msg(0, 1, 0, b"hello b"))
    b.send(msg(1, 0, 0, b"hi a"))
    got_b = b.receive(round_index=0, kind=KIND, senders=[0], timeout=10)
    got_a = a.receive(round_index=0, kind=KIND, senders=[1], timeout=10)
    assert [m.data for m in got_b] == [b"hello b"] and [m.data for m in got_a] == [b"hi a"]
    assert got_b[0] == msg(0, 1, 0, b"hello b")
    assert a.bytes_sent == len(b"later") + len(b"hello b") and b.bytes_sent == len(b"hi a")
    # the round-1 message arrived with the round-0 one and waited in the buffer
    assert [m.data for m in b.receive(round_index=1, kind=KIND, senders=[0], timeout=10)] == [b"later"]
    # returned messages leave the buffer
    assert b.receive(round_index=0, kind=KIND, senders=[0], timeout=0) == []
    # tap saw A's sends and A's accepted frame
    assert [d for d, _ in taps] == ["sent", "sent", "received"]
    assert taps[2][1].data == b"hi a"

    a.send(msg(0, 1, 2, b"old, buffered"))
    a.send(msg(0, 1, 5, b"current", kind="grad"))
    assert [m.data for m in b.receive(round_index=5, kind="grad", senders=[0], timeout=10)] == [b"current"]
    b.drop_before(4)  # discards the buffered round-2 message
    a.send(msg(0, 1, 3, b"stale on arrival"))
    a.send(msg(0, 1, 4, b"fresh"))
    assert [m.data for m in b.receive(round_index=4, kind=KIND, senders=[0], timeout=10)] == [b"fresh"]
    assert b.receive(round_index=2, kind=KIND, senders=[0], timeout=0.2) == []
    assert b.receive(round_index=3, kind=KIND, senders=[0], timeout=0.2) == []
    assert b.stale == 1 and b.rejected == 0


def test_early_return_timeout_and_duplicates(pair) -> None:
    a, b, _, _ = pair
    a.send(msg(0, 1, 0, b"x"))
    start = time.monotonic()
    assert len(b.receive(round_index=0, kind=KIND, senders=[0], timeout=30)) == 1
    assert time.monotonic() - start < 15  # returned on arrival, well before the timeout
    # peer 2 never shows up: what is held comes back after the timeout, duplicates included
    a.send(msg(0, 1, 1, b"first"))
    a.send(msg(0, 1, 1, b"replayed"))
    got = b.receive(round_index=1, kind=KIND, senders=[0, 2], timeout=0.3)
    assert sorted(m.data for m in got) == [b"first", b"replayed"]


def test_send_only_as_self_and_to_known_peers(pair) -> None:
    a, b, taps, _ = pair
    with pytest.raises(TransportError, match="only as itself"):
        a.send(msg(1, 1, 0, b"spoof"))
    with pytest.raises(TransportError, match="7"):
        a.send(msg(0, 7, 0, b"nobody"))
    with pytest.raises(TransportError):
        a.send(msg(0, 1, 0, b"bad kind", kind="Bad Kind"))
    with pytest.raises(SecureDFMLError):
        b.send(msg(1, 0, 0, b"x" * 4097))  # over b's max_message_bytes
    assert a.bytes_sent == 0 and b.bytes_sent == 0 and taps == []
    assert b.receive(round_index=0, kind=KIND, senders=[0], timeout=0.2) == []
    assert a.receive(round_index=0, kind=KIND, senders=[1], timeout=0.2) == []


def _garbage(rng: random.Random, i: int) -> list[bytes]:
    good = encode_header(0, 1, 0, KIND)
    choice = i % 11
    if choice == 0:
        return [rng.randbytes(rng.randrange(0, 200))]
    if choice == 1:
        return [b"XXXX" + good[4:], b"data"]
    if choice == 2:
        return [good]
    if choice == 3:
        return [good, b"data", b"extra"]
    if choice == 4:
        return [encode_header(0, 9, 0, KIND), b"wrong recipient"]
    if choice == 5:
        return [encode_header(42, 1, 0, KIND), b"unknown sender"]
    if choice == 6:
        return [good, rng.randbytes(4097)]  # over max_message_bytes (still under MAXMSGSIZE)
    if choice == 7:
        return [good[:4] + b"\x02" + good[5:], b"version 2"]
    if choice == 8:
        return [struct.pack("!4sBIIQ32s", WIRE_MAGIC, 1, 0, 1, 0, b"MODEL"), b"bad kind"]
    if choice == 9:
        return [good + b"\0", b"header too long"]
    return [rng.randbytes(HEADER_SIZE), rng.randbytes(10)]


def _drain_until(ep: ZmqEndpoint, rejected: int, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while ep.rejected < rejected and time.monotonic() < deadline:
        ep.receive(round_index=0, kind="nothing", senders=[0], timeout=0.05)


def test_garbage_flood_is_rejected_and_endpoint_keeps_working(pair) -> None:
    a, b, _, addr_b = pair
    rng = random.Random(1234)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUSH)
    try:
        raw.setsockopt(zmq.LINGER, 1000)
        raw.setsockopt(zmq.SNDHWM, 0)
        raw.connect(addr_b)
        for i in range(1000):
            if i == 500:
                raw.send_multipart([encode_header(0, 1, 0, KIND), b"the real one"])
            raw.send_multipart(_garbage(rng, i))
        got = b.receive(round_index=0, kind=KIND, senders=[0], timeout=10)
        assert [m.data for m in got] == [b"the real one"]
        _drain_until(b, 1000)
        assert b.rejected == 1000
    finally:
        raw.close()
        ctx.term()
    a.send(msg(0, 1, 3, b"still works"))
    assert [m.data for m in b.receive(round_index=3, kind=KIND, senders=[0], timeout=10)] == [b"still works"]
    assert b.rejected == 1000


def test_frame_over_maxmsgsize_is_dropped_by_zmq(pair) -> None:
    a, b, _, addr_b = pair
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUSH)
    try:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(addr_b)
        raw.send_multipart([encode_header(0, 1, 0, KIND), b"y" * 100_000])
        assert b.receive(round_index=0, kind=KIND, senders=[0], timeout=0.3) == []
        assert b.rejected == 0  # libzmq dropped it before the endpoint saw it
    finally:
        raw.close()
        ctx.term()
    a.send(msg(0, 1, 0, b"ok"))
    assert [m.data for m in b.receive(round_index=0, kind=KIND, senders=[0], timeout=10)] == [b"ok"]


def test_buffer_bound_under_valid_flood() -> None:
    addr_a, addr_b = free_tcp_addresses(2)
    with ZmqEndpoint(peer_id=0, bind=addr_a, peers={1: addr_b}) as a, ZmqEndpoint(
        peer_id=1, bind=addr_b, peers={0: addr_a}, max_buffered_messages=10
    ) as b:
        for i in range(50):
            a.send(msg(0, 1, 5, i.to_bytes(2, "big")))
        _drain_until(b, 40)
        assert b.rejected == 40
        got = b.receive(round_index=5, kind=KIND, senders=[0], timeout=1)
        assert len(got) == 10  # all that was held: one sender, many messages
        # the buffer has room again
        a.send(msg(0, 1, 6, b"after"))
        assert [m.data for m in b.receive(round_index=6, kind=KIND, senders=[0], timeout=10)] == [b"after"]


def test_buffer_byte_bound() -> None:
    addr_a, addr_b = free_tcp_addresses(2)
    with ZmqEndpoint(peer_id=0, bind=addr_a, peers={1: addr_b}) as a, ZmqEndpoint(
        peer_id=1, bind=addr_b, peers={0: addr_a}, max_buffered_bytes=1000
    ) as b:
        for _ in range(5):
            a.send(msg(0, 1, 1, b"z" * 300))
        _drain_until(b, 2)
        assert b.rejected == 2
        assert len(b.receive(round_index=1, kind=KIND, senders=[0], timeout=1)) == 3


def test_restarted_receiver_gets_later_messages() -> None:
    addr_a, addr_b = free_tcp_addresses(2)
    a = ZmqEndpoint(peer_id=0, bind=addr_a, peers={1: addr_b})
    b: ZmqEndpoint | None = None
    try:
        b = ZmqEndpoint(peer_id=1, bind=addr_b, peers={0: addr_a})
        a.send(msg(0, 1, 0, b"before"))
        assert len(b.receive(round_index=0, kind=KIND, senders=[0], timeout=10)) == 1
        b.close()
        b = ZmqEndpoint(peer_id=1, bind=addr_b, peers={0: addr_a})
        got: list[Message] = []
        for _ in range(20):  # a send racing the reconnect may be lost; later ones arrive
            a.send(msg(0, 1, 1, b"after restart"))
            got = b.receive(round_index=1, kind=KIND, senders=[0], timeout=0.5)
            if got:
                break
        assert got and got[0].data == b"after restart"
    finally:
        if b is not None:
            b.close()
        a.close()
    a.close()  # idempotent


def test_constructor_checks() -> None:
    (addr,) = free_tcp_addresses(1)
    with pytest.raises(TransportError, match="OTHER"):
        ZmqEndpoint(peer_id=0, bind=addr, peers={0: addr})
    with ZmqEndpoint(peer_id=0, bind=addr, peers={}) as ep:
        with pytest.raises(TransportError, match="bind"):
            ZmqEndpoint(peer_id=1, bind=addr, peers={})  # address in use
        assert ep.peer_id == 0
        with pytest.raises(AttributeError):
            ep.peer_id = 3  # type: ignore[misc]
    with pytest.raises(TransportError, match="closed"):
        ep.receive(round_index=0, kind=KIND, senders=[], timeout=0)


kinds = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=32)
u32 = st.integers(0, 2**32 - 1)


@given(u32, u32, st.integers(0, 2**64 - 1), kinds)
def test_header_round_trip(sender: int, recipient: int, round_index: int, kind: str) -> None:
    header = encode_header(sender, recipient, round_index, kind)
    assert len(header) == HEADER_SIZE and header.startswith(WIRE_MAGIC)
    assert decode_header(header) == (sender, recipient, round_index, kind)


@given(
    u32,
    u32,
    st.integers(0, 2**64 - 1),
    kinds,
    st.lists(st.tuples(st.integers(0, HEADER_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=4),
    st.sampled_from(["none", "truncate", "extend"]),
)
def test_header_mutation_is_new_valid_header_or_rejected(
    sender: int, recipient: int, round_index: int, kind: str, edits: list[tuple[int, int]], resize: str
) -> None:
    original = encode_header(sender, recipient, round_index, kind)
    mutated = bytearray(original)
    for pos, value in edits:
        mutated[pos] = value
    if resize == "truncate":
        mutated = mutated[:-1]
    elif resize == "extend":
        mutated += b"\0"
    decoded = decode_header(bytes(mutated))
    if bytes(mutated) == original:
        assert decoded == (sender, recipient, round_index, kind)
    elif decoded is not None:
        assert decoded != (sender, recipient, round_index, kind)
        assert encode_header(*decoded) == bytes(mutated)  # canonical: one encoding per header


@given(st.binary(max_size=2 * HEADER_SIZE))
def test_decode_header_never_raises(blob: bytes) -> None:
    decoded = decode_header(blob)
    assert decoded is None or encode_header(*decoded) == blob
