"""Envelopes: round trips, and every rejection the receiver must make
(typed error, no state change)."""

from __future__ import annotations

import struct

import nacl.bindings
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from secure_dfml.crypto import (
    HEADER_BYTES,
    BadSignatureError,
    DecryptionError,
    EnvelopeError,
    KeyRing,
    MalformedEnvelopeError,
    MessageTooLargeError,
    MissingKeyError,
    NaClChannel,
    PeerDirectory,
    ReplayError,
    StaleMessageError,
    UnknownPeerError,
    UnknownSenderError,
    UnsupportedVersionError,
    WrongFederationError,
    WrongKindError,
    WrongRecipientError,
    WrongRoundError,
    WrongSenderError,
    envelope_overhead,
    federation_tag,
    generate_keys,
    inspect_envelope,
    padded_length,
)
from secure_dfml.crypto._envelope import _HEADER, _TRAILER, _signed_message, seal_envelope
from secure_dfml.errors import CryptoError, SecureDFMLError

FED = "fed-test"
N = 4
KINDS = st.from_regex(r"[A-Za-z0-9._:/-]{1,24}", fullmatch=True)
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def keyring() -> KeyRing:
    return generate_keys(N, FED)


@pytest.fixture()
def channel(keyring: KeyRing) -> NaClChannel:
    return NaClChannel(keyring=keyring)


def ctx(sender: int = 0, recipient: int = 1, round_index: int = 3, kind: str = "model") -> dict:
    return {"sender": sender, "recipient": recipient, "round_index": round_index, "kind": kind}


def assert_rejected_without_change(channel: NaClChannel, env: bytes, error: type[Exception], **context) -> None:
    before = channel.replay_state()
    stats = channel.stats()
    with pytest.raises(error):
        channel.open(env, **context)
    assert channel.replay_state() == before
    assert channel.stats().opened == stats.opened


# ---------------------------------------------------------------------------
# Round trips


@SETTINGS
@given(
    payload=st.binary(max_size=3000),
    sender=st.integers(0, N - 1),
    recipient=st.integers(0, N - 1),
    round_index=st.integers(0, 2**64 - 1),
    kind=KINDS,
    pad=st.booleans(),
    content_signature=st.booleans(),
)
def test_seal_open_round_trip(keyring, payload, sender, recipient, round_index, kind, pad, content_signature):
    ch = NaClChannel(keyring=keyring, pad_messages=pad, content_signature=content_signature)
    env = ch.seal(payload, sender=sender, recipient=recipient, round_index=round_index, kind=kind)
    assert len(env) == ch.envelope_size(len(payload))
    if not pad:
        assert len(env) == len(payload) + envelope_overhead()
    head = inspect_envelope(env)
    assert (head.sender, head.recipient, head.round_index, head.kind) == (sender, recipient, round_index, kind)
    assert len(payload) < 16 or payload not in env[HEADER_BYTES:-64]  # encrypted, not in clear
    out = ch.open(env, sender=sender, recipient=recipient, round_index=round_index, kind=kind)
    assert out == payload


def test_accepts_bytes_like(channel):
    env = channel.seal(bytearray(b"abc"), **ctx())
    assert channel.open(memoryview(env), **ctx()) == b"abc"


def test_nonces_are_fresh(channel):
    a = channel.seal(b"same", **ctx())
    b = channel.seal(b"same", **ctx())
    assert a != b and inspect_envelope(a).nonce != inspect_envelope(b).nonce
    assert channel.open(a, **ctx()) == channel.open(b, **ctx()) == b"same"


# ---------------------------------------------------------------------------
# Tampering: any flipped bit, any truncation or extension


@SETTINGS
@given(data=st.data(), payload=st.binary(max_size=600), mode=st.sampled_from(["plain", "pad", "content"]))
def test_any_single_bit_flip_is_rejected(keyring, data, payload, mode):
    ch = NaClChannel(keyring=keyring, pad_messages=mode == "pad", content_signature=mode == "content")
    env = ch.seal(payload, **ctx())
    bit = data.draw(st.integers(0, 8 * len(env) - 1))
    bad = bytearray(env)
    bad[bit // 8] ^= 1 << (bit % 8)
    assert_rejected_without_change(ch, bytes(bad), EnvelopeError, **ctx())
    assert ch.open(env, **ctx()) == payload  # the genuine envelope is still accepted afterwards


@SETTINGS
@given(data=st.data(), payload=st.binary(max_size=300))
def test_any_byte_substitution_is_rejected(channel, data, payload):
    env = channel.seal(payload, **ctx())
    pos = data.draw(st.integers(0, len(env) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != env[pos]))
    bad = env[:pos] + bytes([value]) + env[pos + 1 :]
    assert_rejected_without_change(channel, bad, EnvelopeError, **ctx())


@SETTINGS
@given(data=st.data(), payload=st.binary(max_size=300))
def test_truncation_is_rejected(channel, data, payload):
    env = channel.seal(payload, **ctx())
    cut = data.draw(st.integers(0, len(env) - 1))
    assert_rejected_without_change(channel, env[:cut], MalformedEnvelopeError, **ctx())


@SETTINGS
@given(payload=st.binary(max_size=300), extra=st.binary(min_size=1, max_size=100), front=st.booleans())
def test_extension_is_rejected(channel, payload, extra, front):
    env = channel.seal(payload, **ctx())
    bad = extra + env if front else env + extra
    assert_rejected_without_change(channel, bad, EnvelopeError, **ctx())


def test_unsupported_version(channel):
    env = bytearray(channel.seal(b"x", **ctx()))
    env[4] = 2
    assert_rejected_without_change(channel, bytes(env), UnsupportedVersionError, **ctx())


def test_garbage_and_non_bytes(channel):
    for junk in (b"", b"SDFE", bytes(500)):
        with pytest.raises(MalformedEnvelopeError):
            channel.open(junk, **ctx())
    with pytest.raises(MalformedEnvelopeError):
        channel.open(12345, **ctx())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Context: recipient, sender, federation, round, kind


def test_wrong_recipient(channel):
    env = channel.seal(b"m", **ctx(recipient=1))
    assert_rejected_without_change(channel, env, WrongRecipientError, **ctx(recipient=2))


def test_wrong_sender_expected(channel):
    env = channel.seal(b"m", **ctx(sender=0))
    assert_rejected_without_change(channel, env, WrongSenderError, **ctx(sender=2))


def test_unknown_sender(keyring, channel):
    outsider = NaClChannel(keyring=generate_keys(N + 3, FED))  # same federation id, peer 6 unknown to us
    env = outsider.seal(b"m", **ctx(sender=N + 2, recipient=1))
    assert_rejected_without_change(channel, env, UnknownSenderError, **ctx(sender=N + 2, recipient=1))


def test_forged_sender_signed_with_another_key(keyring, channel):
    # peer 2 claims to be peer 0; it can only sign with its own key and box with its own box key
    attacker = keyring.identity(2)
    env = seal_envelope(
        b"poisoned",
        fed_tag=federation_tag(FED),
        round_index=3,
        sender=0,
        recipient=1,
        kind="model",
        signing_key=attacker.signing_key,
        shared_key=nacl.bindings.crypto_box_beforenm(
            bytes(keyring.directory.lookup(1).box_public_key), bytes(attacker.box_key)
        ),
        max_envelope_bytes=1 << 20,
    )
    assert_rejected_without_change(channel, env, BadSignatureError, **ctx())


def test_right_signature_wrong_box_key(keyring, channel):
    # signed by the real sender but boxed under another pair's key: the box check catches it
    env = seal_envelope(
        b"m",
        fed_tag=federation_tag(FED),
        round_index=3,
        sender=0,
        recipient=1,
        kind="model",
        signing_key=keyring.identity(0).signing_key,
        shared_key=nacl.bindings.crypto_box_beforenm(
            bytes(keyring.directory.lookup(1).box_public_key), bytes(keyring.identity(2).box_key)
        ),
        max_envelope_bytes=1 << 20,
    )
    assert_rejected_without_change(channel, env, DecryptionError, **ctx())


def test_wrong_federation(keyring, channel):
    other_dir = PeerDirectory(federation_id="another-fed", peers=keyring.directory.peers)
    other = NaClChannel(keyring=KeyRing(directory=other_dir, identities=keyring.identities))
    env = other.seal(b"m", **ctx())
    assert_rejected_without_change(channel, env, WrongFederationError, **ctx())


@SETTINGS
@given(sealed=st.integers(0, 1000), expected=st.integers(0, 1000))
def test_wrong_round(channel, sealed, expected):
    assume(sealed != expected)
    env = channel.seal(b"m", **ctx(round_index=sealed))
    assert_rejected_without_change(channel, env, WrongRoundError, **ctx(round_index=expected))


@SETTINGS
@given(sealed=KINDS, expected=KINDS)
def test_wrong_kind(channel, sealed, expected):
    assume(sealed != expected)
    env = channel.seal(b"m", **ctx(kind=sealed))
    assert_rejected_without_change(channel, env, WrongKindError, **ctx(kind=expected))


def test_sender_or_recipient_without_keys(keyring):
    # a deployment peer holds only its own identity
    local = KeyRing(directory=keyring.directory, identities={1: keyring.identity(1)})
    ch = NaClChannel(keyring=local)
    with pytest.raises(MissingKeyError):
        ch.seal(b"m", **ctx(sender=0))
    env = NaClChannel(keyring=keyring).seal(b"m", **ctx(sender=1, recipient=0))
    with pytest.raises(MissingKeyError):
        ch.open(env, **ctx(sender=1, recipient=0))
    with pytest.raises(UnknownPeerError):
        ch.seal(b"m", **ctx(sender=1, recipient=99))


# ---------------------------------------------------------------------------
# Replay


def test_replay_is_rejected_and_cache_only_grows_on_success(channel):
    env = channel.seal(b"m", **ctx())
    empty = channel.replay_state()
    assert channel.open(env, **ctx()) == b"m"
    after_one = channel.replay_state()
    assert after_one != empty
    assert_rejected_without_change(channel, env, ReplayError, **ctx())
    assert channel.replay_state() == after_one


def test_replay_is_per_recipient(channel):
    a = channel.seal(b"m", **ctx(recipient=1))
    b = channel.seal(b"m", **ctx(recipient=2))
    channel.open(a, **ctx(recipient=1))
    assert channel.open(b, **ctx(recipient=2)) == b"m"


def test_stale_rounds_are_refused(keyring):
    ch = NaClChannel(keyring=keyring, replay_window=4)
    old = ch.seal(b"old", **ctx(round_index=2))
    ch.open(ch.seal(b"new", **ctx(round_index=20)), **ctx(round_index=20))
    assert_rejected_without_change(ch, old, StaleMessageError, **ctx(round_index=2))
    # within the window still fine
    recent = ch.seal(b"r", **ctx(round_index=17))
    assert ch.open(recent, **ctx(round_index=17)) == b"r"


def test_old_rounds_are_pruned(keyring):
    ch = NaClChannel(keyring=keyring, replay_window=2)
    for r in range(10):
        ch.open(ch.seal(b"m", **ctx(round_index=r)), **ctx(round_index=r))
    ((_rcp, latest, rounds),) = ch.replay_state()
    assert latest == 9 and [r for r, _ in rounds] == [7, 8, 9]


# ---------------------------------------------------------------------------
# Sizes and padding


def test_oversize_is_refused_before_parsing(keyring):
    small = NaClChannel(keyring=keyring, max_message_bytes=4096)
    big = NaClChannel(keyring=keyring)
    env = big.seal(b"x" * 5000, **ctx())
    assert_rejected_without_change(small, env, MessageTooLargeError, **ctx())
    with pytest.raises(MessageTooLargeError):
        small.seal(b"x" * 5000, **ctx())


def test_oversize_header_claim_is_malformed(channel):
    env = bytearray(channel.seal(b"x" * 10, **ctx()))
    struct.pack_into(">Q", env, 88, 2**63)
    assert_rejected_without_change(channel, bytes(env), MalformedEnvelopeError, **ctx())


def test_padding_hides_sizes_within_a_bucket(keyring):
    ch = NaClChannel(keyring=keyring, pad_messages=True)
    sizes = {len(ch.seal(b"x" * n, **ctx())) for n in (4200, 5000, 7000, 8184)}
    assert len(sizes) == 1
    assert len(ch.seal(b"x" * 8185, **ctx())) > sizes.pop()


@given(n=st.integers(0, 1 << 30), growth=st.sampled_from([2.0, 1.25]))
def test_padded_length_buckets(n, growth):
    b = padded_length(n, growth)
    assert b >= n and b % 512 == 0 and b >= 4096
    assert padded_length(b, growth) == b  # a bucket maps to itself
    if n > 4096:
        assert b <= n * growth + 512
    if growth == 2.0:
        assert b & (b - 1) == 0  # powers of two


def _padded_envelope(keyring, inner: bytes) -> bytes:
    """Hand-built padded envelope (valid signature and box) with arbitrary inner bytes."""
    nonce = bytes(24)
    header = _HEADER.pack(
        b"SDFE", 1, 0x01, 0, federation_tag(FED), 3, 0, 1, b"model".ljust(24, b"\0"), nonce, len(inner) + 16
    )
    shared = nacl.bindings.crypto_box_beforenm(
        bytes(keyring.directory.lookup(1).box_public_key), bytes(keyring.identity(0).box_key)
    )
    body = nacl.bindings.crypto_box_easy_afternm(inner, nonce, shared)
    sig = keyring.identity(0).signing_key.sign(_signed_message(header, body, False)).signature
    return header + body + sig


def test_non_canonical_padding_is_rejected(keyring, channel):
    good = b"hello" + bytes(4096 - 5 - 8) + _TRAILER.pack(5)
    assert channel.open(_padded_envelope(keyring, good), **ctx()) == b"hello"
    ch = NaClChannel(keyring=keyring)
    for inner in (
        b"hello" + b"\x01" + bytes(4096 - 6 - 8) + _TRAILER.pack(5),  # non-zero padding
        b"hello" + bytes(4096 - 5 - 8) + _TRAILER.pack(5000),  # length beyond the body
    ):
        assert_rejected_without_change(ch, _padded_envelope(keyring, inner), MalformedEnvelopeError, **ctx())


def test_invalid_arguments_are_typed(channel):
    with pytest.raises(CryptoError):
        channel.seal(b"m", **ctx(kind="has space"))
    with pytest.raises(CryptoError):
        channel.seal(b"m", **ctx(kind="k" * 25))
    with pytest.raises(CryptoError):
        channel.seal(b"m", **ctx(round_index=-1))
    with pytest.raises(CryptoError):
        channel.seal("text", **ctx())  # type: ignore[arg-type]


def test_error_hierarchy():
    assert issubclass(EnvelopeError, CryptoError)
    assert issubclass(ReplayError, EnvelopeError) and issubclass(StaleMessageError, ReplayError)
    for err in (BadSignatureError, WrongRoundError, MalformedEnvelopeError):
        assert issubclass(err, SecureDFMLError) and issubclass(err, ValueError)


def test_stats_count_bytes_and_time(channel):
    env = channel.seal(b"x" * 1000, **ctx())
    channel.open(env, **ctx())
    with pytest.raises(ReplayError):
        channel.open(env, **ctx())
    s = channel.stats()
    assert (s.sealed, s.opened, s.rejected) == (1, 1, 1)
    assert s.payload_bytes_sealed == 1000 and s.wire_bytes_sealed == len(env) == s.wire_bytes_opened
    assert s.seal_seconds > 0 and s.open_seconds > 0
    assert (s - s).sealed == 0
    channel.reset_stats()
    assert channel.stats().sealed == 0


def test_header_layout_is_96_bytes(channel):
    env = channel.seal(b"", **ctx())
    assert HEADER_BYTES == 96 and env[:4] == b"SDFE" and env[4] == 1
    assert len(env) == 96 + 16 + 64
