"""Every Opacus internal that :mod:`secure_dfml.privacy._dpsgd` relies on, in one place.

DP-SGD here goes below Opacus' public API in these places:

* ``opacus.optimizers.optimizer._check_processed_flag`` / ``_mark_as_processed``:
  the flag on a summed gradient that stops noise being added twice; our noise
  step keeps Opacus' protocol through :func:`check_processed_flag` and
  :func:`mark_as_processed`.
* ``DPOptimizer.add_noise`` (and ``DPOptimizerFastGradientClipping.add_noise`` /
  ``accumulate``): overridden by ``_dpsgd._NoiseMixin``; Opacus' ``pre_step``
  calls them by name.
* ``GradSampleModule.capture_backprops_hook``: overridden by the book-keeping
  module; Opacus' ``add_hooks`` registers it by name, passing ``loss_reduction``
  and ``batch_first`` as keywords.  The override also uses
  ``rearrange_grad_samples``, ``hooks_enabled`` and ``GRAD_SAMPLERS``.
* the per-parameter ``_forward_counter`` that Opacus'
  ``capture_activations_hook`` increments and the backward hook decrements
  (:func:`forward_counter`, :func:`release_forward`).

``pyproject.toml`` bounds Opacus to the versions these were checked against
(:data:`TESTED_OPACUS`).  :func:`require_opacus_internals` (run before the first
DP-SGD phase) checks that each internal still exists, and fails with an error
naming the installed Opacus version and the missing attribute instead of
training with a silently bypassed override.  The private functions are looked
up on their module at call time, so a missing one never breaks importing
secure_dfml (non-private runs keep working).
"""

from __future__ import annotations

import importlib.metadata
import inspect

import opacus
import opacus.optimizers.optimizer as _opacus_optimizer
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample import gsm_base as _gsm_base
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from secure_dfml.errors import PrivacyError

__all__ = [
    "TESTED_OPACUS",
    "OpacusCompatibilityError",
    "check_opacus_internals",
    "check_processed_flag",
    "forward_counter",
    "mark_as_processed",
    "opacus_version",
    "release_forward",
    "require_opacus_internals",
]

#: The Opacus versions whose internals this module was checked against (pyproject.toml).
TESTED_OPACUS = ">=1.5,<1.7"


class OpacusCompatibilityError(PrivacyError):
    """The installed Opacus lacks an internal that secure_dfml's DP-SGD relies on."""


def opacus_version() -> str:
    """The installed Opacus version (distribution metadata, else ``opacus.__version__``)."""
    try:
        return importlib.metadata.version("opacus")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - e.g. a source checkout on sys.path
        return str(getattr(opacus, "__version__", "unknown"))


# ---------------------------------------------------------------------------
# The internals, as used by _dpsgd


def check_processed_flag(obj: torch.Tensor | list[torch.Tensor]) -> None:
    """Opacus' check that a summed gradient has not been noised already (raises otherwise)."""
    _opacus_optimizer._check_processed_flag(obj)


def mark_as_processed(obj: torch.Tensor | list[torch.Tensor]) -> None:
    """Opacus' mark that a summed gradient has been noised."""
    _opacus_optimizer._mark_as_processed(obj)


def forward_counter(p: nn.Parameter) -> int:
    """How many forward passes of ``p``'s layer Opacus has recorded and not yet consumed."""
    return p._forward_counter  # type: ignore[attr-defined, no-any-return]


def release_forward(p: nn.Parameter) -> None:
    """Consume one recorded forward pass of ``p``'s layer (as Opacus' backward hook does)."""
    p._forward_counter -= 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# The check

_FUNCTIONS = ("_check_processed_flag", "_mark_as_processed")
_METHODS: tuple[tuple[type, str], ...] = (
    (DPOptimizer, "add_noise"),
    (DPOptimizer, "pre_step"),
    (DPOptimizerFastGradientClipping, "add_noise"),
    (DPOptimizerFastGradientClipping, "accumulate"),
    (GradSampleModule, "capture_activations_hook"),
    (GradSampleModule, "capture_backprops_hook"),
    (GradSampleModule, "rearrange_grad_samples"),
    (GradSampleModule, "GRAD_SAMPLERS"),
)
#: Keywords Opacus' add_hooks passes to capture_backprops_hook (our override takes them too).
_BACKPROPS_KEYWORDS = ("loss_reduction", "batch_first")


def _qualified(owner: type, name: str) -> str:
    return f"{owner.__module__}.{owner.__qualname__}.{name}"


def check_opacus_internals() -> list[str]:
    """Descriptions of the Opacus internals that are missing or changed (empty when all are there)."""
    problems: list[str] = []
    for name in _FUNCTIONS:
        if not callable(getattr(_opacus_optimizer, name, None)):
            problems.append(f"{_opacus_optimizer.__name__}.{name}")
    for owner, name in _METHODS:
        if not hasattr(owner, name):
            problems.append(_qualified(owner, name))
    hook = getattr(GradSampleModule, "capture_backprops_hook", None)
    if hook is not None:
        try:
            params = inspect.signature(hook).parameters
        except (TypeError, ValueError):  # pragma: no cover - not introspectable
            params = {}
        missing_kw = [k for k in _BACKPROPS_KEYWORDS if k not in params]
        if missing_kw:
            problems.append(
                f"{_qualified(GradSampleModule, 'capture_backprops_hook')} keyword(s) {', '.join(missing_kw)}"
            )
    monkeypatched = getattr(_gsm_base, "OPACUS_PARAM_MONKEYPATCH_ATTRS", None)
    if monkeypatched is None:
        problems.append(f"{_gsm_base.__name__}.OPACUS_PARAM_MONKEYPATCH_ATTRS")
    elif "_forward_counter" not in monkeypatched:
        problems.append("the per-parameter _forward_counter (not in OPACUS_PARAM_MONKEYPATCH_ATTRS)")
    return problems


_verified = False


def require_opacus_internals() -> None:
    """Raise :class:`OpacusCompatibilityError` naming the Opacus version and the
    missing internal(s) unless every internal DP-SGD relies on is present.
    Checked once per process once it has passed."""
    global _verified
    if _verified:
        return
    problems = check_opacus_internals()
    if problems:
        raise OpacusCompatibilityError(
            f"Opacus {opacus_version()} lacks {'; '.join(problems)}, which secure_dfml's DP-SGD relies on "
            f"(checked against opacus{TESTED_OPACUS}). Install a tested version: pip install 'opacus{TESTED_OPACUS}'."
        )
    _verified = True
