"""secure_dfml: Decentralized Federated Mutual Learning, hardened for privacy."""

from secure_dfml.config import RunConfig, config_from_dict, load_config
from secure_dfml.errors import SecureDFMLError

__all__ = ["RunConfig", "SecureDFMLError", "config_from_dict", "load_config"]
__version__ = "0.1.0"
