"""Model zoo: heterogeneous, DP-compatible architectures; fixed front ends and their feature cache."""

from secure_dfml.models._features import (
    FeatureCache,
    FixedFrontEnd,
    OnFeatures,
    RoutedJoint,
    compute_features,
    fixed_front,
)
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
    "FeatureCache",
    "FixedFrontEnd",
    "OnFeatures",
    "RoutedJoint",
    "available_models",
    "build_model",
    "compute_features",
    "count_parameters",
    "fixed_front",
    "resolve_architectures",
]
