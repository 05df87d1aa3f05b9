"""Model zoo: heterogeneous, DP-compatible architectures."""

from secure_dfml.models._zoo import (
    DEFAULT_MIX,
    KINDS,
    MODEL_REGISTRY,
    ArchSpec,
    available_models,
    build_model,
    count_parameters,
    resolve_architectures,
)

__all__ = [
    "DEFAULT_MIX",
    "KINDS",
    "MODEL_REGISTRY",
    "ArchSpec",
    "available_models",
    "build_model",
    "count_parameters",
    "resolve_architectures",
]
