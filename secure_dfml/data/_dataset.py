"""The in-memory data set type returned by every loader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from secure_dfml.errors import DataError

__all__ = ["ArrayDataset"]


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A data set held in memory as numpy arrays.

    ``x_*`` are float32 and already normalised with fixed, public constants
    (never with statistics of the training data), shaped ``(n, *input_shape)``;
    ``y_*`` are int64 labels in ``0..num_classes-1``.  ``x_test``/``y_test``
    is the global test set: it is treated as public and is never handed to a
    peer as private training data.

    The arrays are not copied; do not modify them in place.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    kind: Literal["image", "tabular"]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        where = f"data set {self.name!r}"
        if self.kind not in ("image", "tabular"):
            raise DataError(f"{where}: kind must be 'image' or 'tabular', got {self.kind!r}.")
        if self.num_classes < 2:
            raise DataError(f"{where}: needs at least 2 classes, found {self.num_classes}.")
        if len(self.class_names) != self.num_classes:
            raise DataError(
                f"{where}: {len(self.class_names)} class names for {self.num_classes} classes."
            )
        expected_ndim = 3 if self.kind == "image" else 1
        if len(self.input_shape) != expected_ndim:
            raise DataError(f"{where}: input_shape {self.input_shape} does not suit kind {self.kind!r}.")
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != np.float32:
                raise DataError(f"{where}: x_{split} must be float32, got {x.dtype}.")
            if y.dtype != np.int64 or y.ndim != 1:
                raise DataError(f"{where}: y_{split} must be a 1-D int64 array, got {y.dtype} {y.shape}.")
            if tuple(x.shape[1:]) != tuple(self.input_shape) or x.shape[0] != y.shape[0]:
                raise DataError(
                    f"{where}: x_{split} has shape {x.shape} and y_{split} {y.shape}; "
                    f"expected (n, {', '.join(map(str, self.input_shape))}) and (n,)."
                )
            if y.size == 0:
                raise DataError(f"{where}: the {split} split is empty.")
            if y.min() < 0 or y.max() >= self.num_classes:
                raise DataError(f"{where}: y_{split} has labels outside 0..{self.num_classes - 1}.")

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, kind={self.kind!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, train={len(self.y_train)}, test={len(self.y_test)})"
        )
