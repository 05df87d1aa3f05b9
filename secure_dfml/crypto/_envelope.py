"""Envelope format v1: authenticated header + crypto_box body + Ed25519 signature.

Byte layout (all integers big-endian; documented in SECURITY.md)::

    offset  size  field
    0       4     magic            b"SDFE"
    4       1     version          1
    5       1     flags            bit 0: padded, bit 1: content signature; others 0
    6       2     reserved         0
    8       16    federation tag   BLAKE2b-128(federation id, person "sdfml-fed-v1")
    24      8     round            u64
    32      4     sender           u32 peer id
    36      4     recipient        u32 peer id
    40      24    kind             ASCII [A-Za-z0-9._:/-]{1,24}, NUL-padded
    64      24    nonce            random; XSalsa20 nonce and replay identifier
    88      8     body length      u64, = total length - 96 - 64
    96      L     body             crypto_box(inner, nonce, sender sk, recipient pk)
                                   = Poly1305 tag (16) || XSalsa20 ciphertext
    96+L    64    signature        Ed25519 by the sender over
                                   "secure-dfml/envelope/v1\\0" || header(96) || binding

``binding`` is the body's 16-byte Poly1305 tag (default), or with the content
signature flag BLAKE2b-256(body, person "sdfml-body-v1").  ``inner`` is the
payload, or when padded ``payload || zeros || u64 payload length``, sized to
a bucket (see :func:`padded_length`).

This module only builds and checks bytes; the receiver-side policy (context,
replay cache, statistics) lives in :mod:`secure_dfml.crypto._channel`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.utils
from nacl.signing import SigningKey, VerifyKey

from secure_dfml.crypto._errors import (
    BadSignatureError,
    DecryptionError,
    MalformedEnvelopeError,
    MessageTooLargeError,
    UnsupportedVersionError,
)
from secure_dfml.errors import CryptoError

__all__ = [
    "EnvelopeHeader",
    "HEADER_BYTES",
    "MAGIC",
    "MIN_ENVELOPE_BYTES",
    "VERSION",
    "envelope_overhead",
    "federation_tag",
    "inspect_envelope",
    "padded_length",
]

MAGIC = b"SDFE"
VERSION = 1
FLAG_PADDED = 0x01
FLAG_CONTENT_SIGNATURE = 0x02
_KNOWN_FLAGS = FLAG_PADDED | FLAG_CONTENT_SIGNATURE

_HEADER = struct.Struct(">4sBBH16sQII24s24sQ")
HEADER_BYTES = _HEADER.size  # 96
MAC_BYTES = 16  # crypto_box_MACBYTES (Poly1305 tag)
NONCE_BYTES = nacl.bindings.crypto_box_NONCEBYTES  # 24
SIGNATURE_BYTES = 64
MIN_ENVELOPE_BYTES = HEADER_BYTES + MAC_BYTES + SIGNATURE_BYTES
_TRAILER = struct.Struct(">Q")
_SIG_DOMAIN = b"secure-dfml/envelope/v1\x00"
_FED_PERSON = b"sdfml-fed-v1"
_BODY_PERSON = b"sdfml-body-v1"
_KIND_RE = re.compile(rb"[A-Za-z0-9._:/-]{1,24}")
_U32 = 2**32
_U64 = 2**64

PAD_MINIMUM = 4096
PAD_ALIGN = 512

assert HEADER_BYTES == 96


@dataclass(frozen=True)
class EnvelopeHeader:
    """The parsed (not yet authenticated) header of an envelope."""

    version: int
    flags: int
    federation_tag: bytes
    round_index: int
    sender: int
    recipient: int
    kind: str
    nonce: bytes
    body_length: int
    raw: bytes

    @property
    def padded(self) -> bool:
        return bool(self.flags & FLAG_PADDED)

    @property
    def content_signature(self) -> bool:
        return bool(self.flags & FLAG_CONTENT_SIGNATURE)


def federation_tag(federation_id: str) -> bytes:
    """The 16-byte tag that stands for a federation id in every header."""
    if not isinstance(federation_id, str) or not federation_id:
        raise CryptoError("federation id must be a non-empty string")
    return nacl.bindings.crypto_generichash_blake2b_salt_personal(
        federation_id.encode("utf-8"), digest_size=16, person=_FED_PERSON.ljust(16, b"\x00")
    )


def encode_kind(kind: str) -> bytes:
    """Validate a message kind and return its 24-byte header field."""
    raw = kind.encode("ascii", "replace") if isinstance(kind, str) else b""
    if not _KIND_RE.fullmatch(raw):
        raise CryptoError(f"message kind {kind!r} is invalid: expected 1-24 characters from [A-Za-z0-9._:/-]")
    return raw.ljust(24, b"\x00")


def padded_length(inner_length: int, growth: float = 2.0, *, minimum: int = PAD_MINIMUM) -> int:
    """Size bucket for ``inner_length`` bytes (payload + 8-byte trailer).

    Buckets start at ``minimum`` (4 KiB) and grow geometrically by ``growth``,
    rounded up to 512 bytes: growth 2.0 gives powers of two (at most 2x
    bandwidth, each bucket hides all sizes within a factor of two); 1.25 caps
    the overhead at 25% but separates sizes more finely.
    """
    if growth < 1.05:
        raise CryptoError(f"padding growth {growth!r} must be >= 1.05")
    bucket = minimum
    while bucket < inner_length:
        nxt = -(-int(bucket * growth) // PAD_ALIGN) * PAD_ALIGN
        bucket = max(bucket + PAD_ALIGN, nxt)
    return bucket


def envelope_overhead() -> int:
    """Bytes an unpadded envelope adds to its payload (96 + 16 + 64 = 176)."""
    return HEADER_BYTES + MAC_BYTES + SIGNATURE_BYTES


def inner_length(payload_length: int, *, pad_growth: float | None, max_envelope_bytes: int) -> int:
    """Length of the encrypted plaintext for a payload (padding included)."""
    overhead = envelope_overhead()
    if payload_length + overhead > max_envelope_bytes:
        raise MessageTooLargeError(
            f"payload of {payload_length} bytes does not fit the maximum envelope size "
            f"({max_envelope_bytes} bytes, overhead {overhead})"
        )
    if pad_growth is None:
        return payload_length
    need = payload_length + _TRAILER.size
    cap = max_envelope_bytes - overhead
    if need > cap:
        raise MessageTooLargeError(
            f"padded payload of {payload_length} bytes does not fit the maximum envelope size ({max_envelope_bytes})"
        )
    return min(padded_length(need, pad_growth), cap)


def seal_envelope(
    payload: bytes,
    *,
    fed_tag: bytes,
    round_index: int,
    sender: int,
    recipient: int,
    kind: str,
    signing_key: SigningKey,
    shared_key: bytes,
    pad_growth: float | None = None,
    content_signature: bool = False,
    max_envelope_bytes: int,
    nonce: bytes | None = None,
) -> bytes:
    """Build one envelope.  ``shared_key`` is crypto_box_beforenm(recipient pk,
    sender sk).  ``nonce`` is for tests only; by default 24 random bytes."""
    if not (isinstance(round_index, int) and 0 <= round_index < _U64):
        raise CryptoError(f"round index {round_index!r} must be an integer in [0, 2^64)")
    for name, pid in (("sender", sender), ("recipient", recipient)):
        if not (isinstance(pid, int) and 0 <= pid < _U32):
            raise CryptoError(f"{name} {pid!r} must be a peer id in [0, 2^32)")
    kind_field = encode_kind(kind)
    n = len(payload)
    inner_len = inner_length(n, pad_growth=pad_growth, max_envelope_bytes=max_envelope_bytes)
    flags = 0
    if pad_growth is not None:
        flags |= FLAG_PADDED
        inner = b"".join((payload, bytes(inner_len - n - _TRAILER.size), _TRAILER.pack(n)))
    else:
        inner = payload
    if content_signature:
        flags |= FLAG_CONTENT_SIGNATURE
    if nonce is None:
        nonce = nacl.utils.random(NONCE_BYTES)
    body_len = inner_len + MAC_BYTES
    header = _HEADER.pack(
        MAGIC, VERSION, flags, 0, fed_tag, round_index, sender, recipient, kind_field, nonce, body_len
    )
    body = nacl.bindings.crypto_box_easy_afternm(inner, nonce, shared_key)
    signature = signing_key.sign(_signed_message(header, body, content_signature)).signature
    return b"".join((header, body, signature))


def _signed_message(header: bytes, body: bytes, content_signature: bool) -> bytes:
    if content_signature:
        binding = nacl.bindings.crypto_generichash_blake2b_salt_personal(
            body, digest_size=32, person=_BODY_PERSON.ljust(16, b"\x00")
        )
    else:
        binding = body[:MAC_BYTES]
    return _SIG_DOMAIN + header + binding


def parse_header(envelope: bytes, *, max_envelope_bytes: int) -> EnvelopeHeader:
    """Size and structure checks, then parse the header.  Nothing is trusted
    yet: the signature is checked later by :func:`verify_and_decrypt`."""
    total = len(envelope)
    if total > max_envelope_bytes:
        raise MessageTooLargeError(f"envelope of {total} bytes exceeds the maximum of {max_envelope_bytes}")
    if total < MIN_ENVELOPE_BYTES:
        raise MalformedEnvelopeError(f"envelope of {total} bytes is shorter than the minimum {MIN_ENVELOPE_BYTES}")
    raw = bytes(envelope[:HEADER_BYTES])
    magic, version, flags, reserved, fed, rnd, snd, rcp, kind_field, nonce, body_len = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise MalformedEnvelopeError("not a secure-dfml envelope (bad magic)")
    if version != VERSION:
        raise UnsupportedVersionError(f"envelope version {version} is not supported (this receiver reads {VERSION})")
    if flags & ~_KNOWN_FLAGS or reserved != 0:
        raise MalformedEnvelopeError(f"unknown flags 0x{flags:02x} / reserved 0x{reserved:04x}")
    if body_len != total - HEADER_BYTES - SIGNATURE_BYTES:
        raise MalformedEnvelopeError(
            f"body length field says {body_len} bytes but {total - HEADER_BYTES - SIGNATURE_BYTES} are present "
            "(truncated or extended envelope)"
        )
    if body_len < MAC_BYTES or (flags & FLAG_PADDED and body_len < MAC_BYTES + _TRAILER.size):
        raise MalformedEnvelopeError("body too short")
    kind_bytes = kind_field.rstrip(b"\x00")
    if not _KIND_RE.fullmatch(kind_bytes) or b"\x00" in kind_bytes:
        raise MalformedEnvelopeError("kind field is not canonical")
    return EnvelopeHeader(
        version=version,
        flags=flags,
        federation_tag=fed,
        round_index=rnd,
        sender=snd,
        recipient=rcp,
        kind=kind_bytes.decode("ascii"),
        nonce=nonce,
        body_length=body_len,
        raw=raw,
    )


def verify_and_decrypt(envelope: bytes, header: EnvelopeHeader, *, verify_key: VerifyKey, shared_key: bytes) -> bytes:
    """Verify the sender's signature, then decrypt and unpad the body."""
    body = envelope[HEADER_BYTES : HEADER_BYTES + header.body_length]
    if not isinstance(body, bytes):
        body = bytes(body)
    signature = bytes(envelope[HEADER_BYTES + header.body_length :])
    try:
        verify_key.verify(_signed_message(header.raw, body, header.content_signature), signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        raise BadSignatureError(
            f"signature does not verify under the key of peer {header.sender} (tampered or forged envelope)"
        ) from None
    try:
        inner = nacl.bindings.crypto_box_open_easy_afternm(body, header.nonce, shared_key)
    except nacl.exceptions.CryptoError:
        raise DecryptionError(
            f"crypto_box authenticator from peer {header.sender} does not verify (box key mismatch or tampering)"
        ) from None
    del body
    if not header.padded:
        return inner
    size = len(inner)
    (n,) = _TRAILER.unpack_from(inner, size - _TRAILER.size)
    end = size - _TRAILER.size
    if n > end or inner.count(0, n, end) != end - n:
        raise MalformedEnvelopeError("padding is not canonical")
    return inner[:n]


def inspect_envelope(envelope: bytes, *, max_envelope_bytes: int = 2**63) -> EnvelopeHeader:
    """Parse an envelope's header without authenticating it (for debugging and
    tooling; never act on the result)."""
    return parse_header(envelope, max_envelope_bytes=max_envelope_bytes)
