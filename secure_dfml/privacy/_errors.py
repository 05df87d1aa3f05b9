"""Privacy errors: all derive from :class:`secure_dfml.errors.PrivacyError`."""

from __future__ import annotations

from secure_dfml.errors import PrivacyError


class PrivacyValidationError(PrivacyError):
    """A privacy setting is invalid for this federation (checked before any training)."""


class IncompatibleModelError(PrivacyError):
    """A model contains a layer that DP-SGD cannot handle (e.g. BatchNorm)."""


class BudgetExceededError(PrivacyError):
    """Recording a mechanism would push a peer past its (epsilon, delta) budget."""


class LedgerError(PrivacyError):
    """A ledger file is missing, unreadable, inconsistent or was tampered with."""


__all__ = [
    "BudgetExceededError",
    "IncompatibleModelError",
    "LedgerError",
    "PrivacyError",
    "PrivacyValidationError",
]
