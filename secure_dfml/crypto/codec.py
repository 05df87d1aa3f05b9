"""Safe tensor codec: model states travel as safetensors bytes, never pickle.

``decode_state`` is the only way received bytes become tensors.  It checks the
payload against the *declared* architecture (names, shapes, dtypes) and rejects
non-finite values, so a malicious or corrupted model cannot reach training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from secure_dfml.errors import CodecError


@dataclass(frozen=True)
class TensorSpec:
    """Declared shape and dtype of one named tensor."""

    shape: tuple[int, ...]
    dtype: str


Schema = Mapping[str, TensorSpec]


def schema_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The schema (names, shapes, dtypes) a state must match to be accepted."""
    return {k: TensorSpec(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a state dict (contiguous CPU copies) to safetensors bytes."""
    return _st_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def decode_state(data: bytes, schema: Schema) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes and validate them against ``schema``.

    Raises :class:`CodecError` naming the first problem: unparseable bytes,
    missing or unexpected tensor names, wrong shape or dtype, NaN/Inf values.
    """
    try:
        state = _st_load(bytes(data))
    except Exception as exc:  # safetensors raises several internal types
        raise CodecError(f"malformed tensor payload: {exc}") from None
    missing = sorted(set(schema) - set(state))
    extra = sorted(set(state) - set(schema))
    if missing or extra:
        raise CodecError(
            f"tensor names do not match the declared architecture: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, spec in schema.items():
        t = state[name]
        got = TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
        if got != spec:
            raise CodecError(
                f"tensor {name!r} is {got.dtype}{list(got.shape)}, declared {spec.dtype}{list(spec.shape)}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CodecError(f"tensor {name!r} contains NaN or Inf values")
    return state
