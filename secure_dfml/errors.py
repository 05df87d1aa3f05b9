"""One exception hierarchy for the whole toolkit.

Every error raised on purpose by secure_dfml derives from :class:`SecureDFMLError`
and also from the matching built-in (``ValueError``, ``RuntimeError``, ...), so
callers can catch either.  Domain modules (crypto, privacy, audit) subclass the
domain roots defined here; they never define a second root.
"""

from __future__ import annotations


class SecureDFMLError(Exception):
    """Root of every error raised deliberately by secure_dfml."""


class ConfigError(SecureDFMLError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(SecureDFMLError, ValueError):
    """A data set is missing, unreadable, malformed or too small."""


class ModelError(SecureDFMLError, ValueError):
    """A model architecture is unknown or unsuitable."""


class ProtocolError(SecureDFMLError, RuntimeError):
    """The federation protocol reached an inconsistent state."""


class TransportError(SecureDFMLError, RuntimeError):
    """A message could not be delivered or received."""


class CodecError(SecureDFMLError, ValueError):
    """A tensor payload is malformed or does not match the declared architecture."""


class CryptoError(SecureDFMLError, ValueError):
    """A cryptographic check failed (root of envelope and key errors)."""


class PrivacyError(SecureDFMLError, ValueError):
    """A privacy setting or ledger operation is invalid."""


class AuditError(SecureDFMLError, ValueError):
    """An audit could not be run as requested."""


class RunDirectoryError(SecureDFMLError, ValueError):
    """A run directory is missing files or is inconsistent."""
