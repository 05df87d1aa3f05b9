"""secure_dfml: Decentralized Federated Mutual Learning, hardened for privacy."""

from secure_dfml._run import build_federation, interrupted_config, peer_train_sizes, run_federation
from secure_dfml.config import RunConfig, config_from_dict, default_config, load_config
from secure_dfml.errors import SecureDFMLError

__all__ = [
    "RunConfig",
    "SecureDFMLError",
    "build_federation",
    "config_from_dict",
    "default_config",
    "interrupted_config",
    "load_config",
    "peer_train_sizes",
    "run_federation",
]
__version__ = "0.1.0"
