"""Model checks before any DP training: every layer must be DP-SGD compatible."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from opacus.validators import ModuleValidator

from secure_dfml.privacy._errors import IncompatibleModelError

# How to fix what Opacus rejects, by layer family.
_FIXES: dict[type[nn.Module], str] = {
    _BatchNorm: "replace BatchNorm with GroupNorm (opacus.validators.ModuleValidator.fix does it); "
    "BatchNorm mixes samples of a batch and keeps data-dependent running statistics",
    _InstanceNorm: "use InstanceNorm with track_running_stats=False, or GroupNorm",
    nn.LSTM: "use opacus.layers.DPLSTM",
    nn.GRU: "use opacus.layers.DPGRU",
    nn.RNN: "use opacus.layers.DPRNN",
    nn.MultiheadAttention: "use opacus.layers.DPMultiheadAttention",
}


def _fix_for(module: nn.Module) -> str:
    for family, fix in _FIXES.items():
        if isinstance(module, family):
            return fix
    return "replace it with a layer Opacus supports (Linear, Conv, GroupNorm, LayerNorm, Embedding, ...)"


def validate_model(model: nn.Module, *, name: str) -> None:
    """Raise :class:`IncompatibleModelError` naming every offending submodule and
    the fix, if ``model`` cannot be trained with DP-SGD.

    Uses ``opacus.validators.ModuleValidator.validate`` per submodule (so the
    message can name it) and additionally rejects any normalisation layer that
    tracks running statistics even without trainable parameters (running
    statistics would release data-dependent values outside the mechanism)."""
    problems: list[str] = []
    was_training = model.training
    model.train()
    try:
        for sub_name, sub in model.named_modules():
            label = f"{name}.{sub_name}" if sub_name else name
            own = any(p.requires_grad for p in sub.parameters(recurse=False))
            if own and type(sub) in ModuleValidator.VALIDATORS:
                errors = ModuleValidator.VALIDATORS[type(sub)](sub)
                if errors:
                    problems.append(f"{label} ({type(sub).__name__}): {_fix_for(sub)}")
                    continue
            tracks = isinstance(sub, (_BatchNorm, _InstanceNorm)) and getattr(sub, "track_running_stats", False)
            if tracks:
                problems.append(f"{label} ({type(sub).__name__}): {_fix_for(sub)}")
                continue
            if own and any(True for _ in sub.buffers(recurse=False)):
                problems.append(
                    f"{label} ({type(sub).__name__}): trainable layer with buffers, which Opacus cannot train "
                    "privately; remove the buffers or use a stateless layer"
                )
        whole = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(was_training)
    if whole and not problems:
        problems.extend(f"{name}: {err}" for err in whole)
    if problems:
        raise IncompatibleModelError(
            "model cannot be trained with DP-SGD: " + "; ".join(problems) + "."
        )
