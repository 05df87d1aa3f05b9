"""DFML losses: re-weighted softmax (WSM) supervision and mutual-learning KL."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def wsm_loss(logits: torch.Tensor, targets: torch.Tensor, class_prior: torch.Tensor | None) -> torch.Tensor:
    """Re-weighted softmax cross-entropy (Legate et al. 2023), mean over the batch.

    ``log p_c = log beta_c + z_c - logsumexp_k(log beta_k + z_k)``.  Classes with
    ``beta_c = 0`` (absent from the aggregator's data) drop out of the
    normaliser, so their logits receive no gradient.  ``class_prior=None``
    (or a uniform prior) is plain cross-entropy.
    """
    if class_prior is None:
        return F.cross_entropy(logits, targets)
    log_beta = torch.log(class_prior.to(logits.dtype).clamp_min(0))
    adjusted = logits + log_beta  # -inf for absent classes
    log_norm = torch.logsumexp(adjusted, dim=1)
    picked = adjusted.gather(1, targets.unsqueeze(1)).squeeze(1)
    return (log_norm - picked).mean()


def kl_to_peers(logits: Sequence[torch.Tensor], index: int, temperature: float) -> torch.Tensor:
    """Mean over j != index of KL(softmax(z_j/T).detach() || softmax(z_i/T)), batch-mean."""
    others = [j for j in range(len(logits)) if j != index]
    if not others:
        return logits[index].new_zeros(())
    log_p_i = F.log_softmax(logits[index] / temperature, dim=1)
    total = logits[index].new_zeros(())
    for j in others:
        log_p_j = F.log_softmax(logits[j].detach() / temperature, dim=1)
        total = total + F.kl_div(log_p_i, log_p_j, reduction="batchmean", log_target=True)
    return total / len(others)


def mutual_learning_loss(
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    class_prior: torch.Tensor | None,
) -> torch.Tensor:
    """Sum over models i of L_i = (1-alpha) WSM(z_i) + alpha T^2 mean_{j!=i} KL(p_j || p_i).

    Other models' outputs are detached inside each L_i, so the gradient of the
    sum with respect to model i's parameters is exactly the gradient of L_i.
    """
    total = logits[0].new_zeros(())
    for i, z in enumerate(logits):
        sup = wsm_loss(z, targets, class_prior)
        kl = kl_to_peers(logits, i, temperature) if alpha > 0 else z.new_zeros(())
        total = total + (1 - alpha) * sup + alpha * temperature**2 * kl
    return total


class JointModel(nn.Module):
    """All models of a mutual-learning group as one module returning stacked logits.

    DP-SGD treats this as a single module, so the *joint* per-sample gradient
    is clipped and noised once per step.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=0)
