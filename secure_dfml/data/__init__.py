"""Data sets (bundled and user-provided) and their partition among peers.

>>> from secure_dfml.config import DataConfig
>>> import numpy as np
>>> ds = load_dataset(DataConfig(name="digits"))
>>> split = split_from_config(ds, DataConfig(auditor_pool=100), 5, np.random.default_rng(0))

See :func:`load_dataset` for where built-in data sets are looked for and how
data are normalised, and :func:`partition` for the partition schemes.
"""

from ._dataset import ArrayDataset
from ._datasets import available_datasets, load_dataset
from ._partition import FederatedSplit, PeerSplit, partition, split_from_config

__all__ = [
    "ArrayDataset",
    "FederatedSplit",
    "PeerSplit",
    "available_datasets",
    "load_dataset",
    "partition",
    "split_from_config",
]
