"""Rebuild secure_dfml/resources/data/fashion-mnist-mini.npz from the official idx files.

Fashion-MNIST (MIT licence, Zalando Research): all 60,000 training images
and a stratified 2,000-image test subset, downsampled to 14x14 by 2x2 mean
pooling, stored as uint8.
Usage: python benchmarks/make_fashion_mnist_mini.py [FASHION_MNIST_DIR]
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np

SEED = 20261126
N_TRAIN, N_TEST = 60_000, 2_000  # all training images; a stratified test subset


def _read(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read()[offset:], np.uint8)


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/fashion-mnist")
    rng = np.random.default_rng(SEED)
    out = {}
    for split, prefix, n in (("train", "train", N_TRAIN), ("test", "t10k", N_TEST)):
        x = _read(src / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        y = _read(src / f"{prefix}-labels-idx1-ubyte.gz", 8)
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[: n // 10] for c in range(10)]))
        small = x[idx].astype(np.float32).reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
        out[f"x_{split}"] = np.rint(small).astype(np.uint8)
        out[f"y_{split}"] = y[idx].astype(np.uint8)
    dest = Path(__file__).resolve().parents[1] / "secure_dfml/resources/data/fashion-mnist-mini.npz"
    np.savez_compressed(dest, **out)
    print(f"wrote {dest} ({dest.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
