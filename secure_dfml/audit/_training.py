"""A small, explicit-randomness trainer and initialiser for reference models.

The engine passes its own training function to the audit; this one is the
default for stand-alone audits, tests and benchmarks: minibatch Adam/SGD on
cross-entropy, shuffling and initialisation driven only by generators derived
from the ``np.random.Generator`` it is given (no global seeding).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from secure_dfml.audit._reference import TrainFn
from secure_dfml.errors import AuditError

__all__ = ["make_trainer", "reinit_parameters", "torch_generator"]


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``rng``."""
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


@torch.no_grad()
def reinit_parameters(module: torch.nn.Module, rng: np.random.Generator) -> torch.nn.Module:
    """Re-initialise Linear / Conv layers like PyTorch's defaults, but from ``rng``."""
    gen = torch_generator(rng)
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=gen)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                torch.nn.init.uniform_(m.bias, -bound, bound, generator=gen)
    return module


def _tensor(a: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(dtype)
    return torch.as_tensor(np.asarray(a)).to(dtype)


def make_trainer(
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
) -> TrainFn:
    """A ``train_fn(model, x, y, rng) -> model`` doing plain (non-private) training."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise AuditError("epochs and batch_size must be >= 1 and lr > 0")
    if optimizer not in {"adam", "sgd"}:
        raise AuditError(f"optimizer must be 'adam' or 'sgd'; got {optimizer!r}")

    def train(model: torch.nn.Module, x: Any, y: Any, rng: np.random.Generator) -> torch.nn.Module:
        xt = _tensor(x, torch.float32)
        yt = _tensor(y, torch.long)
        gen = torch_generator(rng)
        opt: torch.optim.Optimizer
        if optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        n = xt.shape[0]
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
        model.eval()
        return model

    return train
