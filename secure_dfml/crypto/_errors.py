"""Typed errors of the crypto package.

All of them derive from :class:`~secure_dfml.errors.CryptoError` (or, for
payload problems, :class:`~secure_dfml.errors.CodecError`), and therefore also
from :class:`ValueError` through the toolkit's root.  A receiver that rejects a
message raises one of the :class:`EnvelopeError` subclasses below and changes
no state.
"""

from __future__ import annotations

from secure_dfml.errors import CodecError, CryptoError

__all__ = [
    "BadSignatureError",
    "CiphertextError",
    "ContributionMismatchError",
    "DecryptionError",
    "EnvelopeError",
    "InsecureChannelError",
    "KeyFileError",
    "KeyHolderError",
    "KeyMismatchError",
    "MalformedEnvelopeError",
    "MessageTooLargeError",
    "MissingKeyError",
    "NotEnoughContributorsError",
    "PassphraseRequiredError",
    "ReplayError",
    "SecureAggregationError",
    "StaleMessageError",
    "UnknownPeerError",
    "UnknownSenderError",
    "UnsupportedVersionError",
    "WrongFederationError",
    "WrongKindError",
    "WrongPassphraseError",
    "WrongRecipientError",
    "WrongRoundError",
    "WrongSenderError",
]


# --------------------------------------------------------------------------
# Envelopes (receiver-side rejections)


class EnvelopeError(CryptoError):
    """An envelope was rejected.  The receiver's state is unchanged."""


class MalformedEnvelopeError(EnvelopeError):
    """The bytes are not a well-formed envelope (truncated, extended, bad
    magic, unknown flags, bad padding, ...)."""


class UnsupportedVersionError(MalformedEnvelopeError):
    """The envelope uses a format version this receiver does not implement."""


class MessageTooLargeError(EnvelopeError):
    """The envelope (or the payload to seal) exceeds the configured maximum."""


class WrongFederationError(EnvelopeError):
    """The envelope was sealed for another federation."""


class WrongRecipientError(EnvelopeError):
    """The envelope is addressed to another peer (or to no local identity)."""


class UnknownSenderError(EnvelopeError):
    """The header names a sender that is not in the peer directory."""


class WrongSenderError(EnvelopeError):
    """The header names a different sender than the one the caller expects."""


class WrongRoundError(EnvelopeError):
    """The envelope belongs to another round."""


class WrongKindError(EnvelopeError):
    """The envelope carries another kind of message than expected."""


class ReplayError(EnvelopeError):
    """The same (sender, round, kind, nonce) was already accepted."""


class StaleMessageError(ReplayError):
    """The round is older than the replay window, so a replay could no longer
    be detected; such messages are refused."""


class BadSignatureError(EnvelopeError):
    """The Ed25519 signature does not verify under the claimed sender's key
    (tampered header or body, or a sender forged with another key)."""


class DecryptionError(EnvelopeError):
    """The crypto_box authenticator did not verify (tampered ciphertext, or a
    box key that does not match the directory)."""


# --------------------------------------------------------------------------
# Keys


class KeyFileError(CryptoError):
    """A key file or the peer directory is missing, unreadable or inconsistent."""


class PassphraseRequiredError(KeyFileError):
    """The private key file is passphrase-sealed and no passphrase was given."""


class WrongPassphraseError(KeyFileError):
    """The passphrase does not open the sealed private key file."""


class KeyMismatchError(KeyFileError):
    """A private key does not match the public keys listed in the directory,
    or the directory belongs to another federation / has too few peers."""


class UnknownPeerError(CryptoError):
    """A peer id is not listed in the directory."""


class MissingKeyError(CryptoError):
    """No private key is available locally for the peer that must act."""


class InsecureChannelError(CryptoError):
    """A plaintext channel was requested without the explicit insecure flag."""


# --------------------------------------------------------------------------
# CKKS secure averaging


class SecureAggregationError(CryptoError):
    """Secure averaging cannot be run as requested."""


class NotEnoughContributorsError(SecureAggregationError):
    """Fewer than two contributors besides the aggregator: the average would
    reveal an individual model.  Callers fall back to individual exchange."""


class KeyHolderError(SecureAggregationError):
    """The key holder is the aggregator or one of the contributors."""


class CiphertextError(SecureAggregationError):
    """A ciphertext or public context received from a peer is malformed,
    oversized, or does not match this round's parameters."""

    def __init__(self, message: str, *, peer_id: int | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class ContributionMismatchError(CodecError):
    """Contributions to a secure average do not share one architecture, or
    contain non-finite values / invalid weights."""
