"""Channels: how payload bytes are wrapped for the wire.

* :class:`NaClChannel` (``name="nacl"``, the default): every payload travels in
  a signed, encrypted envelope (see :mod:`secure_dfml.crypto._envelope`);
  ``open`` validates in a safe order and rejects with a typed error and no
  state change.
* :class:`PlainChannel` (``name="none"``): identity, for research only; it can
  only be built with an explicit insecure flag and logs a loud warning.

:func:`build_channel` turns a :class:`~secure_dfml.config.CryptoConfig` into a
channel and a one-line human description for run metadata.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import nacl.bindings
import torch

from secure_dfml.config import CryptoConfig
from secure_dfml.crypto._envelope import (
    EnvelopeHeader,
    encode_kind,
    envelope_overhead,
    federation_tag,
    inner_length,
    parse_header,
    seal_envelope,
    verify_and_decrypt,
)
from secure_dfml.crypto._errors import (
    InsecureChannelError,
    KeyMismatchError,
    MalformedEnvelopeError,
    MessageTooLargeError,
    MissingKeyError,
    ReplayError,
    StaleMessageError,
    UnknownPeerError,
    UnknownSenderError,
    WrongFederationError,
    WrongKindError,
    WrongRecipientError,
    WrongRoundError,
    WrongSenderError,
)
from secure_dfml.crypto._keys import KeyRing, generate_keys, load_keys
from secure_dfml.crypto.codec import Schema, decode_state, encode_state
from secure_dfml.errors import CryptoError, SecureDFMLError

__all__ = [
    "ChannelStats",
    "NaClChannel",
    "PASSPHRASE_ENV",
    "PlainChannel",
    "ReplayCache",
    "build_channel",
    "open_state",
    "seal_state",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

PASSPHRASE_ENV = "SECURE_DFML_KEY_PASSPHRASE"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ChannelStats:
    """Cumulative counters of a channel (take differences per round)."""

    sealed: int = 0
    opened: int = 0
    rejected: int = 0
    payload_bytes_sealed: int = 0
    wire_bytes_sealed: int = 0
    payload_bytes_opened: int = 0
    wire_bytes_opened: int = 0
    seal_seconds: float = 0.0
    open_seconds: float = 0.0

    @property
    def crypto_seconds(self) -> float:
        return self.seal_seconds + self.open_seconds

    def __sub__(self, other: ChannelStats) -> ChannelStats:
        return ChannelStats(
            **{f: getattr(self, f) - getattr(other, f) for f in self.__dataclass_fields__}  # type: ignore[arg-type]
        )


class _StatsMixin:
    def _init_stats(self) -> None:
        self._stats = ChannelStats()
        self._stats_lock = threading.Lock()

    def _add_stats(self, **delta: float) -> None:
        with self._stats_lock:
            s = self._stats
            self._stats = replace(s, **{k: getattr(s, k) + v for k, v in delta.items()})

    def stats(self) -> ChannelStats:
        """A snapshot of the cumulative counters."""
        with self._stats_lock:
            return self._stats

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = ChannelStats()


# --------------------------------------------------------------------------
# Replay protection


class ReplayCache:
    """Accepted (sender, round, kind, nonce) per recipient.

    Only rounds within ``window`` of the newest accepted round are remembered;
    older rounds are refused outright (:class:`StaleMessageError`) because a
    replay there could no longer be recognised.  ``check`` never changes
    anything; ``commit`` is called only after every other check passed.
    """

    def __init__(self, *, window: int = 16) -> None:
        if window < 1:
            raise CryptoError(f"replay window {window!r} must be >= 1 round")
        self.window = window
        self._lock = threading.Lock()
        self._seen: dict[int, dict[int, set[tuple[int, str, bytes]]]] = {}
        self._latest: dict[int, int] = {}

    def check(self, *, recipient: int, sender: int, round_index: int, kind: str, nonce: bytes) -> None:
        with self._lock:
            self._check_locked(recipient, sender, round_index, kind, nonce)

    def _check_locked(self, recipient: int, sender: int, round_index: int, kind: str, nonce: bytes) -> None:
        latest = self._latest.get(recipient)
        if latest is not None and round_index < latest - self.window:
            raise StaleMessageError(
                f"round {round_index} is older than the replay window (newest accepted round {latest}, "
                f"window {self.window})"
            )
        if (sender, kind, nonce) in self._seen.get(recipient, {}).get(round_index, ()):
            raise ReplayError(
                f"replayed envelope: sender {sender}, round {round_index}, kind {kind!r} was already accepted"
            )

    def commit(self, *, recipient: int, sender: int, round_index: int, kind: str, nonce: bytes) -> None:
        with self._lock:
            self._check_locked(recipient, sender, round_index, kind, nonce)  # a concurrent twin may have won
            rounds = self._seen.setdefault(recipient, {})
            rounds.setdefault(round_index, set()).add((sender, kind, nonce))
            latest = max(self._latest.get(recipient, round_index), round_index)
            self._latest[recipient] = latest
            for old in [r for r in rounds if r < latest - self.window]:
                del rounds[old]

    def export_state(self) -> dict[str, object]:
        """The window as plain JSON data (for a peer's checkpoint)."""
        with self._lock:
            return {
                "window": self.window,
                "latest": {str(r): t for r, t in sorted(self._latest.items())},
                "seen": sorted(
                    [rcp, rnd, snd, kind, nonce.hex()]
                    for rcp, rounds in self._seen.items()
                    for rnd, entries in rounds.items()
                    for snd, kind, nonce in entries
                ),
            }

    def restore_state(self, state: Mapping[str, object]) -> None:
        """Replace the window with one from :meth:`export_state` (a peer resuming
        from its checkpoint still refuses envelopes it had accepted)."""
        try:
            latest = {int(r): int(t) for r, t in dict(state["latest"]).items()}  # type: ignore[call-overload]
            seen: dict[int, dict[int, set[tuple[int, str, bytes]]]] = {}
            for rcp, rnd, snd, kind, nonce in state["seen"]:  # type: ignore[union-attr]
                seen.setdefault(int(rcp), {}).setdefault(int(rnd), set()).add((int(snd), str(kind), bytes.fromhex(nonce)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CryptoError(f"replay-cache state is malformed ({exc}); it must come from export_state()") from None
        with self._lock:
            self._latest = latest
            self._seen = seen

    def snapshot(self) -> tuple[tuple[int, int | None, tuple[tuple[int, tuple[tuple[int, str, bytes], ...]], ...]], ...]:
        """An immutable copy of the whole state (for tests and audits)."""
        with self._lock:
            return tuple(
                (
                    rcp,
                    self._latest.get(rcp),
                    tuple((r, tuple(sorted(s))) for r, s in sorted(self._seen.get(rcp, {}).items())),
                )
                for rcp in sorted(set(self._seen) | set(self._latest))
            )


# --------------------------------------------------------------------------
# NaCl channel


class NaClChannel(_StatsMixin):
    """Signed, encrypted envelopes between the peers of one federation.

    One object serves every local identity of ``keyring`` (all peers in a
    simulation, one in a deployment): ``seal`` needs the sender's private keys,
    ``open`` the recipient's.

    Args:
        keyring: directory + local private identities.
        max_message_bytes: largest envelope sealed or accepted (checked first).
        pad_messages: pad payloads to size buckets (see ``padding_growth``).
        padding_growth: bucket growth factor, 2.0 (powers of two) by default.
        content_signature: sign a BLAKE2b hash of the ciphertext instead of
            its Poly1305 tag (see SECURITY.md: third-party verifiable content,
            at the cost of one more pass over the data on each side).
        replay_window: rounds of replay history kept per recipient.
    """

    name = "nacl"
    secure = True

    def __init__(
        self,
        *,
        keyring: KeyRing,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        pad_messages: bool = False,
        padding_growth: float = 2.0,
        content_signature: bool = False,
        replay_window: int = 16,
    ) -> None:
        if max_message_bytes < envelope_overhead() + 1024:
            raise CryptoError(
                f"crypto.max_message_bytes (max_message_bytes) = {max_message_bytes} is too small: the minimum is "
                f"{envelope_overhead() + 1024} bytes (the {envelope_overhead()}-byte envelope overhead plus 1024); "
                f"set it to at least that, or leave it unset for the default of {DEFAULT_MAX_MESSAGE_BYTES}."
            )
        self.keyring = keyring
        self.directory = keyring.directory
        self.federation_id = keyring.federation_id
        self.max_message_bytes = int(max_message_bytes)
        self.pad_messages = bool(pad_messages)
        self.padding_growth = float(padding_growth)
        self.content_signature = bool(content_signature)
        if self.pad_messages:
            inner_length(0, pad_growth=self.padding_growth, max_envelope_bytes=self.max_message_bytes)
        self._fed_tag = federation_tag(self.federation_id)
        self._replay = ReplayCache(window=replay_window)
        self._shared: dict[tuple[int, int], bytes] = {}
        self._shared_lock = threading.Lock()
        self._init_stats()

    def __repr__(self) -> str:
        return (
            f"NaClChannel(federation={self.federation_id!r}, peers={len(self.directory)}, "
            f"local={len(self.keyring.identities)}, pad={self.pad_messages})"
        )

    def for_peer(self, peer_id: int) -> NaClChannel:
        """A channel holding only ``peer_id``'s private keys (same directory and
        settings, its own replay cache): it can seal only as ``peer_id`` and
        open only what is addressed to it.  Every peer node gets one."""
        own = KeyRing(directory=self.directory, identities={peer_id: self.keyring.identity(peer_id)})
        return NaClChannel(
            keyring=own,
            max_message_bytes=self.max_message_bytes,
            pad_messages=self.pad_messages,
            padding_growth=self.padding_growth,
            content_signature=self.content_signature,
            replay_window=self._replay.window,
        )

    @property
    def replay(self) -> ReplayCache:
        return self._replay

    # -- keys ---------------------------------------------------------------

    def _shared_key(self, local: int, remote: int) -> bytes:
        key = (local, remote)
        shared = self._shared.get(key)
        if shared is None:
            ident = self.keyring.identity(local)
            pub = self.directory.lookup(remote)
            shared = nacl.bindings.crypto_box_beforenm(bytes(pub.box_public_key), bytes(ident.box_key))
            with self._shared_lock:
                self._shared[key] = shared
        return shared

    # -- sizes ----------------------------------------------------------------

    def envelope_size(self, payload_length: int) -> int:
        """Bytes on the wire for a payload of ``payload_length`` bytes."""
        growth = self.padding_growth if self.pad_messages else None
        return envelope_overhead() + inner_length(
            payload_length, pad_growth=growth, max_envelope_bytes=self.max_message_bytes
        )

    # -- Channel protocol -----------------------------------------------------

    def seal(self, payload: bytes, *, sender: int, recipient: int, round_index: int, kind: str) -> bytes:
        t0 = time.perf_counter()
        if not isinstance(payload, bytes):
            try:
                payload = bytes(memoryview(payload))
            except TypeError:
                raise CryptoError(f"payload must be bytes-like, got {type(payload).__name__}") from None
        ident = self.keyring.identity(sender)
        if recipient not in self.directory:
            raise UnknownPeerError(f"recipient {recipient} is not in the directory of {self.federation_id!r}")
        envelope = seal_envelope(
            payload,
            fed_tag=self._fed_tag,
            round_index=round_index,
            sender=sender,
            recipient=recipient,
            kind=kind,
            signing_key=ident.signing_key,
            shared_key=self._shared_key(sender, recipient),
            pad_growth=self.padding_growth if self.pad_messages else None,
            content_signature=self.content_signature,
            max_envelope_bytes=self.max_message_bytes,
        )
        self._add_stats(
            sealed=1,
            payload_bytes_sealed=len(payload),
            wire_bytes_sealed=len(envelope),
            seal_seconds=time.perf_counter() - t0,
        )
        return envelope

    def open(self, envelope: bytes, *, sender: int, recipient: int, round_index: int, kind: str) -> bytes:
        return self.open_with(
            envelope, None, sender=sender, recipient=recipient, round_index=round_index, kind=kind
        )

    def open_with(
        self,
        envelope: bytes,
        accept: Callable[[bytes], T] | None,
        *,
        sender: int,
        recipient: int,
        round_index: int,
        kind: str,
    ) -> T:
        """Like :meth:`open`, but runs ``accept(payload)`` (e.g. the codec's
        schema check) *before* the envelope is recorded as accepted: if it
        raises, the replay cache is unchanged too.  Returns its result."""
        t0 = time.perf_counter()
        try:
            payload, commit = self._open(
                envelope, sender=sender, recipient=recipient, round_index=round_index, kind=kind
            )
            t1 = time.perf_counter()
            result = accept(payload) if accept is not None else payload
            t2 = time.perf_counter()
            commit()
        except SecureDFMLError:
            self._add_stats(rejected=1, open_seconds=time.perf_counter() - t0)
            raise
        self._add_stats(
            opened=1,
            payload_bytes_opened=len(payload),
            wire_bytes_opened=len(envelope),
            open_seconds=time.perf_counter() - t0 - (t2 - t1),
        )
        return result  # type: ignore[return-value]

    def _open(
        self, envelope: bytes, *, sender: int, recipient: int, round_index: int, kind: str
    ) -> tuple[bytes, Callable[[], None]]:
        # 0. the caller's expectations must themselves be valid
        encode_kind(kind)
        if recipient not in self.keyring.identities:
            raise MissingKeyError(f"no private key for recipient {recipient} is loaded")
        # 1. size limits, before anything is parsed
        try:
            size = len(envelope)
        except TypeError:
            raise MalformedEnvelopeError(f"envelope must be bytes-like, got {type(envelope).__name__}") from None
        if size > self.max_message_bytes:
            raise MessageTooLargeError(f"envelope of {size} bytes exceeds the maximum of {self.max_message_bytes}")
        if not isinstance(envelope, bytes):
            try:
                envelope = bytes(memoryview(envelope))
            except TypeError:
                raise MalformedEnvelopeError(f"envelope must be bytes-like, got {type(envelope).__name__}") from None
        # 2. structure (lengths, magic, version, flags)
        header = parse_header(envelope, max_envelope_bytes=self.max_message_bytes)
        # 3. context, from the (still unauthenticated) header: cheap refusals
        self._check_context(header, sender=sender, recipient=recipient, round_index=round_index, kind=kind)
        # 4. replay lookup (no change)
        self._replay.check(
            recipient=recipient, sender=sender, round_index=round_index, kind=kind, nonce=header.nonce
        )
        # 5. signature, then 6. decryption (and unpadding)
        payload = verify_and_decrypt(
            envelope,
            header,
            verify_key=self.directory.peers[sender].verify_key,
            shared_key=self._shared_key(recipient, sender),
        )
        # 7. every check passed: only then is the nonce remembered (by the caller)
        nonce = header.nonce

        def commit() -> None:
            self._replay.commit(recipient=recipient, sender=sender, round_index=round_index, kind=kind, nonce=nonce)

        return payload, commit

    def _check_context(self, header: EnvelopeHeader, *, sender: int, recipient: int, round_index: int, kind: str) -> None:
        if header.federation_tag != self._fed_tag:
            raise WrongFederationError(f"envelope was sealed for another federation than {self.federation_id!r}")
        if header.recipient != recipient:
            raise WrongRecipientError(f"envelope is addressed to peer {header.recipient}, not to peer {recipient}")
        if header.sender not in self.directory:
            raise UnknownSenderError(f"sender {header.sender} is not in the peer directory")
        if header.sender != sender:
            raise WrongSenderError(f"envelope claims sender {header.sender}, expected sender {sender}")
        if header.round_index != round_index:
            raise WrongRoundError(f"envelope belongs to round {header.round_index}, expected round {round_index}")
        if header.kind != kind:
            raise WrongKindError(f"envelope carries kind {header.kind!r}, expected {kind!r}")

    # -- introspection ----------------------------------------------------------

    def replay_state(self) -> object:
        """Immutable snapshot of the replay cache (equal before and after any
        rejected envelope)."""
        return self._replay.snapshot()


# --------------------------------------------------------------------------
# Plaintext channel


class PlainChannel(_StatsMixin):
    """Identity channel: NO confidentiality, NO authentication.  Research only."""

    name = "none"
    secure = False

    def __init__(self, *, allow_insecure: bool = False, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if allow_insecure is not True:
            raise InsecureChannelError(
                'the plaintext channel sends models unencrypted and unauthenticated; it needs '
                "crypto.allow_insecure = true (allow_insecure=True)"
            )
        self.max_message_bytes = int(max_message_bytes)
        self._init_stats()
        logger.warning(
            "INSECURE CHANNEL: crypto.channel = \"none\" -- models travel in clear, without authentication, "
            "encryption or replay protection. Never use this outside research simulations."
        )

    def envelope_size(self, payload_length: int) -> int:
        return payload_length

    def for_peer(self, peer_id: int) -> PlainChannel:
        """The same (insecure) channel for one peer node; there is nothing to bind."""
        return PlainChannel(allow_insecure=True, max_message_bytes=self.max_message_bytes)

    def seal(self, payload: bytes, *, sender: int, recipient: int, round_index: int, kind: str) -> bytes:
        data = bytes(payload)
        if len(data) > self.max_message_bytes:
            raise MessageTooLargeError(f"payload of {len(data)} bytes exceeds the maximum of {self.max_message_bytes}")
        self._add_stats(sealed=1, payload_bytes_sealed=len(data), wire_bytes_sealed=len(data))
        return data

    def open(self, envelope: bytes, *, sender: int, recipient: int, round_index: int, kind: str) -> bytes:
        data = bytes(envelope)
        if len(data) > self.max_message_bytes:
            self._add_stats(rejected=1)
            raise MessageTooLargeError(f"message of {len(data)} bytes exceeds the maximum of {self.max_message_bytes}")
        self._add_stats(opened=1, payload_bytes_opened=len(data), wire_bytes_opened=len(data))
        return data

    def open_with(
        self,
        envelope: bytes,
        accept: Callable[[bytes], T] | None,
        *,
        sender: int,
        recipient: int,
        round_index: int,
        kind: str,
    ) -> T:
        payload = self.open(envelope, sender=sender, recipient=recipient, round_index=round_index, kind=kind)
        return accept(payload) if accept is not None else payload  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Factory and state helpers


AnyChannel = NaClChannel | PlainChannel


def build_channel(
    cfg: CryptoConfig,
    *,
    federation_id: str,
    num_peers: int,
    passphrase: str | bytes | None = None,
) -> tuple[AnyChannel, str]:
    """The channel a run uses, and a one-line description for its metadata.

    ``cfg.channel == "nacl"``: keys from ``cfg.keys_dir`` when set (the
    directory must belong to ``federation_id`` and hold private keys for peers
    ``0..num_peers-1``; a sealed key folder needs ``passphrase`` or the
    ``SECURE_DFML_KEY_PASSPHRASE`` environment variable), otherwise ephemeral
    keys generated for this simulation and never written anywhere.
    """
    if cfg.channel == "none":
        if not cfg.allow_insecure:
            raise InsecureChannelError('crypto.channel = "none" needs crypto.allow_insecure = true')
        ch = PlainChannel(allow_insecure=True, max_message_bytes=cfg.max_message_bytes)
        return ch, (
            'INSECURE plaintext channel (crypto.channel = "none"): models travel unencrypted and '
            "unauthenticated -- research only, not deployment grade"
        )
    if cfg.channel != "nacl":
        raise CryptoError(f"crypto.channel = {cfg.channel!r}: expected 'nacl' or 'none'")
    if num_peers < 1:
        raise CryptoError(f"num_peers = {num_peers!r}: expected >= 1")
    wanted = range(num_peers)
    if cfg.keys_dir:
        if passphrase is None:
            passphrase = os.environ.get(PASSPHRASE_ENV) or None
        keyring = load_keys(cfg.keys_dir, passphrase=passphrase, peers=wanted, allow_exposed_keys=cfg.allow_exposed_keys)
        if keyring.federation_id != federation_id:
            raise KeyMismatchError(
                f"keys in {cfg.keys_dir} belong to federation {keyring.federation_id!r}, "
                f"but the run is federation {federation_id!r}"
            )
        source = f"keys from {Path(cfg.keys_dir)} ({num_peers} local identities)"
    else:
        keyring = generate_keys(num_peers, federation_id)
        source = "ephemeral keys generated for this simulation (not persisted)"
    ch = NaClChannel(
        keyring=keyring, max_message_bytes=cfg.max_message_bytes, pad_messages=cfg.pad_messages
    )
    pad = ", payloads padded to power-of-two size buckets" if cfg.pad_messages else ""
    return ch, f"NaCl envelopes (X25519 crypto_box + Ed25519 signatures), {source}{pad}"


def seal_state(
    channel: NaClChannel | PlainChannel,
    state: Mapping[str, torch.Tensor],
    *,
    sender: int,
    recipient: int,
    round_index: int,
    kind: str,
) -> bytes:
    """Encode a state dict (safetensors) and seal it."""
    return channel.seal(encode_state(state), sender=sender, recipient=recipient, round_index=round_index, kind=kind)


def open_state(
    channel: NaClChannel | PlainChannel,
    envelope: bytes,
    schema: Schema,
    *,
    sender: int,
    recipient: int,
    round_index: int,
    kind: str,
) -> dict[str, torch.Tensor]:
    """Open an envelope and decode its payload against the declared ``schema``
    (names, shapes, dtypes, finite values).  Raises an
    :class:`~secure_dfml.crypto.EnvelopeError` or a
    :class:`~secure_dfml.errors.CodecError`."""
    def decode(payload: bytes) -> dict[str, torch.Tensor]:
        return decode_state(payload, schema)

    if isinstance(channel, NaClChannel):
        return channel.open_with(
            envelope, decode, sender=sender, recipient=recipient, round_index=round_index, kind=kind
        )
    return decode(channel.open(envelope, sender=sender, recipient=recipient, round_index=round_index, kind=kind))
