"""Secure exchange: peer keys, signed + encrypted envelopes (NaCl), CKKS
secure group averaging (TenSEAL), and the safe tensor codec.

Typical use::

    from secure_dfml.crypto import build_channel, build_secure_averager

    channel, description = build_channel(cfg.crypto, federation_id="fed", num_peers=10)
    env = channel.seal(payload, sender=1, recipient=4, round_index=7, kind="model")
    payload = channel.open(env, sender=1, recipient=4, round_index=7, kind="model")

See SECURITY.md for the envelope format, guarantees and non-guarantees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from secure_dfml.crypto._channel import (
    PASSPHRASE_ENV,
    AnyChannel,
    ChannelStats,
    NaClChannel,
    PlainChannel,
    ReplayCache,
    build_channel,
    open_state,
    seal_state,
)

# TenSEAL itself is imported by _ckks only when CKKS is first used.
from secure_dfml.crypto._ckks import CKKSAverager, CKKSParams, CKKSRoles, SecureAverager, SecureSum
from secure_dfml.crypto._envelope import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    EnvelopeHeader,
    envelope_overhead,
    federation_tag,
    inspect_envelope,
    padded_length,
)
from secure_dfml.crypto._errors import (
    BadSignatureError,
    CiphertextError,
    ContributionMismatchError,
    DecryptionError,
    EnvelopeError,
    InsecureChannelError,
    KeyFileError,
    KeyHolderError,
    KeyMismatchError,
    MalformedEnvelopeError,
    MessageTooLargeError,
    MissingKeyError,
    NotEnoughContributorsError,
    PassphraseRequiredError,
    ReplayError,
    SecureAggregationError,
    StaleMessageError,
    UnknownPeerError,
    UnknownSenderError,
    UnsupportedVersionError,
    WrongFederationError,
    WrongKindError,
    WrongPassphraseError,
    WrongRecipientError,
    WrongRoundError,
    WrongSenderError,
)
from secure_dfml.crypto._keys import (
    DIRECTORY_FILE,
    KeyRing,
    PeerDirectory,
    PeerIdentity,
    PeerPublicKeys,
    fingerprint,
    generate_keys,
    load_directory,
    load_keys,
    private_key_path,
    write_key_file,
    write_keys,
)
from secure_dfml.crypto.codec import TensorSpec, decode_state, encode_state, schema_of

if TYPE_CHECKING:
    from secure_dfml.config import CryptoConfig


def build_secure_averager(cfg: CryptoConfig) -> CKKSAverager | None:
    """The averager for ``crypto.secure_aggregation``: a :class:`CKKSAverager`
    for ``"ckks"``, ``None`` for ``"none"`` (plain averaging by the aggregator)."""
    if cfg.secure_aggregation == "none":
        return None
    if cfg.secure_aggregation == "ckks":
        return CKKSAverager()
    raise SecureAggregationError(f"crypto.secure_aggregation = {cfg.secure_aggregation!r}: expected 'none' or 'ckks'")


def build_ckks_roles(cfg: CryptoConfig) -> CKKSRoles | None:
    """The CKKS roles a peer node runs for ``crypto.secure_aggregation = "ckks"``
    (``None`` for ``"none"``)."""
    if build_secure_averager(cfg) is None:
        return None
    return CKKSRoles()


__all__ = [
    "DIRECTORY_FILE",
    "HEADER_BYTES",
    "MAGIC",
    "PASSPHRASE_ENV",
    "VERSION",
    "AnyChannel",
    "BadSignatureError",
    "CKKSAverager",
    "CKKSParams",
    "CKKSRoles",
    "ChannelStats",
    "CiphertextError",
    "ContributionMismatchError",
    "DecryptionError",
    "EnvelopeError",
    "EnvelopeHeader",
    "InsecureChannelError",
    "KeyFileError",
    "KeyHolderError",
    "KeyMismatchError",
    "KeyRing",
    "MalformedEnvelopeError",
    "MessageTooLargeError",
    "MissingKeyError",
    "NaClChannel",
    "NotEnoughContributorsError",
    "PassphraseRequiredError",
    "PeerDirectory",
    "PeerIdentity",
    "PeerPublicKeys",
    "PlainChannel",
    "ReplayCache",
    "ReplayError",
    "SecureAggregationError",
    "SecureAverager",
    "SecureSum",
    "StaleMessageError",
    "TensorSpec",
    "UnknownPeerError",
    "UnknownSenderError",
    "UnsupportedVersionError",
    "WrongFederationError",
    "WrongKindError",
    "WrongPassphraseError",
    "WrongRecipientError",
    "WrongRoundError",
    "WrongSenderError",
    "build_channel",
    "build_ckks_roles",
    "build_secure_averager",
    "decode_state",
    "encode_state",
    "envelope_overhead",
    "federation_tag",
    "fingerprint",
    "generate_keys",
    "inspect_envelope",
    "load_directory",
    "load_keys",
    "open_state",
    "padded_length",
    "private_key_path",
    "schema_of",
    "seal_state",
    "write_key_file",
    "write_keys",
]
