"""DP-SGD steps with Opacus: Poisson sampling, per-sample clipping, Gaussian noise.

One *phase* (a sender's local epochs, or an aggregator's mutual learning on
the joint module) wraps the module with an Opacus grad-sample strategy, runs
``steps`` Poisson-sampled steps and unwraps it again, leaving the module
exactly as it was apart from its parameter values: no hooks, no
``grad_sample`` / ``summed_grad`` / ``_forward_counter`` attributes, no
``_module.`` prefixes (the wrapper is never stored on the model), no ``.grad``.

Grad-sample strategies (registry :data:`GRAD_SAMPLE_MODES`):

* ``hooks``     -- Opacus ``GradSampleModule``: per-layer hand-written per-sample grads.
* ``functorch`` -- the same module with ``force_functorch=True`` (vmap per layer).
* ``ew``        -- PyTorch expanded weights via Opacus ``GradSampleModuleExpandedWeights``.
* ``ghost``     -- Opacus ghost / fast gradient clipping: per-sample *norms* only
  (never materialises per-sample grads of Linear layers), then a second
  backward pass on the clipping-weighted per-sample losses.
* ``bk``        -- book-keeping (Bu et al. 2023) on Opacus' samplers: ONE backward
  pass; Linear and Conv2d layers run through custom autograd functions that
  compute only input gradients and keep (activation, output-gradient) pairs;
  Linear norms by the ghost-norm formula, Conv2d per-sample gradients by one
  grouped ``convolution_backward``, other layers by Opacus' grad samplers;
  the clipped sum is formed once, then Opacus' optimizer adds the noise.

``auto`` picks the fastest mode that is correct (clipped per-sample gradient
sum equal to a per-sample loop) in ``benchmarks/bench_dp_overhead.py``: ``bk``
for every model of the zoo and for the joint mutual-learning module.

Randomness: the seeded (research-grade) mode draws Poisson masks and noise
from explicit ``torch.Generator`` objects.  ``secure`` mode draws both from the
operating system's CSPRNG (``os.urandom``) and sums Gaussians as Opacus'
``secure_mode`` does against floating-point attacks; Opacus' own secure mode
needs ``torchcsprng``, which has no build for current PyTorch, so the CSPRNG
source is provided here.

Opacus internals (private functions, overridden hooks, the per-parameter
``_forward_counter``) are reached only through
:mod:`secure_dfml.privacy._opacus_compat`, which checks them before the first
phase and names the Opacus version and the missing attribute if one is gone.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import (
    GradSampleModule,
    GradSampleModuleExpandedWeights,
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS, AbstractGradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from secure_dfml.config import DFMLConfig
from secure_dfml.privacy._errors import PrivacyValidationError
from secure_dfml.privacy._opacus_compat import (
    check_processed_flag,
    forward_counter,
    mark_as_processed,
    release_forward,
    require_opacus_internals,
)
from secure_dfml.protocol._train import make_optimizer

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: A module's input: one tensor, or several (a joint module whose models read
#: different inputs, e.g. raw samples and cached fixed features), indexed by sample.
Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def _as_tuple(x: Inputs) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _take(x: Inputs, idx: torch.Tensor | slice) -> tuple[torch.Tensor, ...]:
    return tuple(t[idx] for t in _as_tuple(x))

# ---------------------------------------------------------------------------
# Randomness


def _urandom_u64(n: int) -> np.ndarray:
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64)


def secure_uniform(n: int) -> torch.Tensor:
    """``n`` uniforms in [0, 1) with 53 random bits each, from the OS CSPRNG."""
    bits = _urandom_u64(n) >> np.uint64(11)
    return torch.from_numpy(bits.astype(np.float64) * (2.0**-53))


def secure_standard_normal(n: int) -> torch.Tensor:
    """``n`` standard normals (float64) by Box-Muller on OS-CSPRNG uniforms."""
    m = (n + 1) // 2
    bits = (_urandom_u64(2 * m) >> np.uint64(11)).astype(np.float64).reshape(2, m)
    u1 = (bits[0] + 1.0) * (2.0**-53)  # (0, 1]: log is finite
    u2 = bits[1] * (2.0**-53)
    r = np.sqrt(-2.0 * np.log(u1))
    theta = 2.0 * np.pi * u2
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
    return torch.from_numpy(z)


def secure_gaussian(std: float, reference: torch.Tensor) -> torch.Tensor:
    """Gaussian noise N(0, std^2) shaped like ``reference`` from the OS CSPRNG,
    built as Opacus' secure mode does: (sum of 4 draws at ``std``) / 2."""
    if std == 0:
        return torch.zeros_like(reference)
    n = reference.numel()
    z = secure_standard_normal(4 * n).view(4, n).sum(0) / 2.0
    return (z * std).to(dtype=reference.dtype, device=reference.device).view(reference.shape)


@dataclass
class Randomness:
    """Where a phase draws Poisson masks and noise from."""

    sampling: torch.Generator | None
    noise: torch.Generator | None
    secure: bool

    def __post_init__(self) -> None:
        if self.secure and (self.sampling is not None or self.noise is not None):
            raise PrivacyValidationError("secure mode draws from the OS CSPRNG and refuses seeded generators.")
        if not self.secure and (self.sampling is None or self.noise is None):
            raise PrivacyValidationError("seeded (research-grade) mode needs explicit sampling and noise generators.")

    def poisson_indices(self, n: int, q: float) -> torch.Tensor:
        """Indices of a Poisson sample: each of ``n`` records independently with probability ``q``."""
        u = secure_uniform(n) if self.secure else torch.rand(n, generator=self.sampling, dtype=torch.float64)
        return torch.nonzero(u < q, as_tuple=False).flatten()

    def gaussian(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        if self.secure:
            return secure_gaussian(std, reference)
        return torch.normal(0.0, std, size=reference.shape, generator=self.noise, dtype=reference.dtype)


class _NoiseMixin:
    """Opacus' noise step, without avoidable copies.

    Same mechanism as ``DPOptimizer.add_noise``: ``p.grad = summed_clipped_grad
    + N(0, (noise_multiplier * max_grad_norm)^2)``, but the noise is drawn into a
    per-parameter buffer and added in place (Opacus allocates a zero tensor, a
    noise tensor and a sum per parameter and step, and the fast-gradient-clipping
    optimizer deep-copies every gradient first).  In secure mode the noise comes
    from the OS CSPRNG with Opacus' secure-mode construction
    (:func:`secure_gaussian`)."""

    params: list[nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float
    generator: torch.Generator | None
    secure_noise: bool = False

    def accumulate(self) -> None:  # used by the fast-gradient-clipping optimizer
        for p in self.params:
            if p.summed_grad is not None:  # type: ignore[attr-defined]
                p.summed_grad.add_(p.grad)  # type: ignore[attr-defined]
            else:
                p.summed_grad = p.grad  # type: ignore[attr-defined]

    def add_noise(self) -> None:  # overrides Opacus' DPOptimizer.add_noise (see _opacus_compat)
        std = self.noise_multiplier * self.max_grad_norm
        buffers: dict[int, torch.Tensor] = self.__dict__.setdefault("_noise_buffers", {})
        for p in self.params:
            summed = p.summed_grad  # type: ignore[attr-defined]
            check_processed_flag(summed)
            if std > 0:
                if self.secure_noise:
                    summed.add_(secure_gaussian(std, summed))
                else:
                    buf = buffers.get(id(p))
                    if buf is None or buf.shape != summed.shape or buf.dtype != summed.dtype:
                        buf = buffers[id(p)] = torch.empty_like(summed)
                    summed.add_(buf.normal_(0.0, std, generator=self.generator))
            p.grad = summed.view_as(p)
            mark_as_processed(summed)


class _DPOptimizer(_NoiseMixin, DPOptimizer):
    pass


class _DPOptimizerFastGradientClipping(_NoiseMixin, DPOptimizerFastGradientClipping):
    pass


_OPTIMIZERS: dict[type[DPOptimizer], type[DPOptimizer]] = {
    DPOptimizer: _DPOptimizer,
    DPOptimizerFastGradientClipping: _DPOptimizerFastGradientClipping,
}

# ---------------------------------------------------------------------------
# Grad-sample strategies


ClipGroups = Sequence[Sequence[nn.Parameter]]


def _clip_partition(
    module: nn.Module, max_grad_norm: float, clip_groups: ClipGroups | None
) -> tuple[list[float], dict[int, int]]:
    """Per-group clipping bounds and each trainable parameter's group.

    Without groups every parameter is in one group bounded by C (ordinary joint
    clipping).  With m groups each is bounded by C / sqrt(m), so the clipped
    per-sample gradient still has norm <= sqrt(m * C^2 / m) = C: the same L2
    sensitivity, hence the same Gaussian mechanism and the same accounting."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if clip_groups is None:
        return [max_grad_norm], {id(p): 0 for p in trainable}
    group_of: dict[int, int] = {}
    for g, params in enumerate(clip_groups):
        for p in params:
            if id(p) in group_of:
                raise PrivacyValidationError("clip groups overlap: a parameter is in two groups.")
            group_of[id(p)] = g
    missing = [p for p in trainable if id(p) not in group_of]
    if missing or not clip_groups:
        raise PrivacyValidationError(
            f"clip groups must cover every trainable parameter ({len(missing)} of {len(trainable)} are in none)."
        )
    for sub in module.modules():
        groups = {group_of[id(p)] for p in sub.parameters(recurse=False) if p.requires_grad}
        if len(groups) > 1:
            raise PrivacyValidationError(f"clip groups split the parameters of one layer ({type(sub).__name__}).")
    bound = max_grad_norm / math.sqrt(len(clip_groups))
    return [bound] * len(clip_groups), group_of


class _Strategy:
    """Wraps a module for one phase; computes what the DP optimizer needs."""

    name = "abstract"
    optimizer_class: type[DPOptimizer] = DPOptimizer

    supports_clip_groups = False

    def __init__(
        self, module: nn.Module, *, max_grad_norm: float, clip_groups: ClipGroups | None = None
    ) -> None:
        if clip_groups is not None and not self.supports_clip_groups:
            raise PrivacyValidationError(
                f"per-model clipping (privacy.clipping = 'per-model') needs grad_sample_mode 'bk' or 'auto', "
                f"not {self.name!r}; set privacy.clipping = 'joint' to use {self.name!r}."
            )
        self.module = module
        self.max_grad_norm = max_grad_norm
        self.clip_groups = clip_groups
        self.wrapped: AbstractGradSampleModule = self._wrap(module)

    def _wrap(self, module: nn.Module) -> AbstractGradSampleModule:
        raise NotImplementedError

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        return self.wrapped(*x)

    def backward(self, loss: torch.Tensor, out: torch.Tensor, batch_dim: int) -> None:
        loss.backward()

    def empty_batch(self, params: Sequence[nn.Parameter]) -> None:
        """An empty Poisson sample: the clipped sum is zero (noise is still added)."""
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.wrapped._close()


class _Hooks(_Strategy):
    name = "hooks"

    def _wrap(self, module: nn.Module) -> AbstractGradSampleModule:
        return GradSampleModule(module, batch_first=True, loss_reduction="mean", strict=True)


class _Functorch(_Strategy):
    name = "functorch"

    def _wrap(self, module: nn.Module) -> AbstractGradSampleModule:
        return GradSampleModule(module, batch_first=True, loss_reduction="mean", strict=True, force_functorch=True)


class _ExpandedWeights(_Strategy):
    name = "ew"

    def _wrap(self, module: nn.Module) -> AbstractGradSampleModule:
        return GradSampleModuleExpandedWeights(module, batch_first=True, loss_reduction="mean")


class _Ghost(_Strategy):
    """Ghost clipping.  The DFML losses are means of per-sample terms, so with
    ``g = d loss / d logits`` the surrogate ``B * <g_b, z_b>`` (g detached) has
    exactly the per-sample gradient of sample ``b``'s loss term; Opacus' two-pass
    ghost backward runs on those per-sample surrogates."""

    name = "ghost"
    optimizer_class = DPOptimizerFastGradientClipping

    def _wrap(self, module: nn.Module) -> AbstractGradSampleModule:
        return GradSampleModuleFastGradientClipping(
            module,
            batch_first=True,
            loss_reduction="mean",
            strict=True,
            max_grad_norm=self.max_grad_norm,
            use_ghost_clipping=True,
        )

    def backward(self, loss: torch.Tensor, out: torch.Tensor, batch_dim: int) -> None:
        (g,) = torch.autograd.grad(loss, out)
        b = out.shape[batch_dim]
        dims = [d for d in range(out.dim()) if d != batch_dim]
        per_sample = (g.detach() * out).sum(dim=dims) * b
        DPTensorFastGradientClipping(self.wrapped, self._optimizer, per_sample, "mean").backward()  # type: ignore[arg-type]

    def empty_batch(self, params: Sequence[nn.Parameter]) -> None:
        for p in params:
            p.grad = torch.zeros_like(p)

    _optimizer: DPOptimizer


class _BKLinear(torch.autograd.Function):
    """``F.linear`` whose backward computes only the input gradient and hands the
    layer's activations and (per-sample scaled) output gradients to book-keeping:
    the weight gradient is formed once, already clipped, in
    :meth:`_BookKeepingModule.clip` -- autograd never computes the unclipped one."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, store: list
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.store = store
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors
        # loss = mean over the batch: sample b's own gradient is B * grad_out[b]
        ctx.store.append((x.detach(), grad_out.detach() * x.shape[0]))
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _bk_linear_forward(module: nn.Linear, store: list) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and module.training):
            return F.linear(x, module.weight, module.bias)
        return _BKLinear.apply(x, module.weight, module.bias, store)

    forward._secure_dfml_bk = True  # type: ignore[attr-defined]
    return forward


class _BKConv2d(torch.autograd.Function):
    """``F.conv2d`` whose backward computes only the input gradient; the layer's
    input and per-sample scaled output gradient go to book-keeping, which forms
    per-sample weight gradients with Opacus' conv grad sampler (autograd's
    unclipped weight gradient is never computed)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module: nn.Conv2d, store: list
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.module = module
        ctx.store = store
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        x, weight = ctx.saved_tensors
        m: nn.Conv2d = ctx.module
        ctx.store.append((x.detach(), grad_out.detach() * x.shape[0]))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_backward(m, grad_out, x, weight, groups=m.groups, want_input=True)
        return grad_x, None, None, None, None


def _conv_backward(
    m: nn.Conv2d, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *, groups: int, want_input: bool
) -> torch.Tensor:
    """One ``convolution_backward`` with ``m``'s stride / padding / dilation: the
    input gradient (``want_input``) or the weight gradient, never the bias."""
    grads = torch.ops.aten.convolution_backward(
        grad_out,
        x,
        weight,
        None,
        list(m.stride),
        list(m.padding),  # type: ignore[arg-type]
        list(m.dilation),
        False,
        [0, 0],
        groups,
        [want_input, not want_input, False],
    )
    return grads[0] if want_input else grads[1]


def _bk_conv_forward(module: nn.Conv2d, store: list) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and module.training):
            return module._conv_forward(x, module.weight, module.bias)
        return _BKConv2d.apply(x, module.weight, module.bias, module, store)

    forward._secure_dfml_bk = True  # type: ignore[attr-defined]
    return forward


def conv2d_per_sample_grads(m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d layer from its input ``x`` and per-sample
    output gradients ``g``: the batch is folded into the channel groups of one
    grouped convolution, whose weight gradient (``convolution_backward``) is
    exactly the stack of per-sample weight gradients.  Same result as Opacus'
    unfold-based sampler, 2-3x faster on CPU for layers with several input
    channels; Opacus' sampler is used for single-channel inputs."""
    out: dict[nn.Parameter, torch.Tensor] = {}
    b = x.shape[0]
    if m.weight.requires_grad:
        if m.in_channels < 4:
            out[m.weight] = compute_conv_grad_sample(m, [x], g)[m.weight]
        else:
            w_shape = (b * m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            gw = _conv_backward(
                m,
                g.reshape(1, b * m.out_channels, *g.shape[2:]),
                x.reshape(1, b * m.in_channels, *x.shape[2:]),
                m.weight.new_empty(w_shape),  # only its shape is read for the weight gradient
                groups=b * m.groups,
                want_input=False,
            )
            out[m.weight] = gw.view(b, *m.weight.shape)
    if m.bias is not None and m.bias.requires_grad:
        out[m.bias] = g.sum(dim=(2, 3))
    return out


def _bk_patchable(m: nn.Module) -> bool:
    if not any(p.requires_grad for p in m.parameters(recurse=False)):
        return False
    if type(m) is nn.Linear:
        return True
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)


class _BookKeepingModule(GradSampleModule):
    """One-backward hybrid clipping ("book-keeping", Bu et al. 2023), built on
    Opacus' per-layer grad samplers:

    * ``nn.Linear`` layers run through :class:`_BKLinear` for the phase: no
      per-sample gradients are materialised and autograd skips their weight
      gradient; their per-sample gradient norms come from Opacus' ghost-norm
      formula (``||g_b|| * ||a_b||``; ``compute_linear_norm_sample`` for sequences);
    * every other trainable layer (conv, GroupNorm, ...) gets per-sample
      gradients from Opacus' grad-sampler hooks.

    After the backward pass, :meth:`clip` forms ``c_b = min(1, C / ||grad_b||)``
    from the joint norms and writes the clipped sum into ``p.grad``:
    ``(c * g)^T a`` for Linear weights (one matmul, like an ordinary weight
    gradient) and ``sum_b c_b grad_b`` for the others.  Opacus'
    ``DPOptimizerFastGradientClipping`` then adds the noise and steps."""

    def __init__(self, m: nn.Module, *, max_grad_norm: float, clip_groups: ClipGroups | None = None) -> None:
        self.max_grad_norm = max_grad_norm
        self._bounds, self._group_of = _clip_partition(m, max_grad_norm, clip_groups)
        super().__init__(m, batch_first=True, loss_reduction="mean", strict=True)
        self._linears: list[tuple[nn.Module, list]] = []
        for sub in m.modules():
            if _bk_patchable(sub):
                store: list = []
                patch = _bk_linear_forward if type(sub) is nn.Linear else _bk_conv_forward
                sub.forward = patch(sub, store)  # type: ignore[method-assign, arg-type]
                self._linears.append((sub, store))

    def iterate_submodules(self, module: nn.Module) -> Iterable[nn.Module]:
        for sub in super().iterate_submodules(module):
            if not _bk_patchable(sub):
                yield sub

    def capture_backprops_hook(  # overrides Opacus' hook, registered by name (see _opacus_compat)
        self,
        module: nn.Module,
        _forward_input: torch.Tensor,
        forward_output: torch.Tensor,
        loss_reduction: str,
        batch_first: bool,
    ) -> None:
        if not self.hooks_enabled:
            return
        backprops = forward_output[0].detach()
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction=loss_reduction, batch_first=batch_first
        )
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if any(forward_counter(p) != 1 for p in params):
            raise NotImplementedError(
                "grad_sample_mode 'bk' does not support a layer used twice in one forward pass "
                "(parameter tying); use 'hooks'."
            )
        sampler = self.GRAD_SAMPLERS.get(type(module), ft_compute_per_sample_gradient)
        if sampler is ft_compute_per_sample_gradient and not hasattr(module, "ft_compute_sample_grad"):
            prepare_layer(module, batch_first=True)
        for p, gs in sampler(module, activations, backprops).items():
            if p.requires_grad:
                p.grad_sample = gs  # type: ignore[attr-defined]
        for p in params:
            release_forward(p)
        if len(module.activations) == 0 and hasattr(module, "max_batch_len"):  # type: ignore[attr-defined]
            del module.max_batch_len

    def clip(self) -> None:
        norm_sq: list[torch.Tensor | None] = [None] * len(self._bounds)

        def add(p: nn.Parameter, sq: torch.Tensor) -> None:
            g = self._group_of[id(p)]
            prev = norm_sq[g]
            norm_sq[g] = sq if prev is None else prev + sq

        linear_data: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
        conv_samples: list[tuple[nn.Parameter, torch.Tensor]] = []
        for m, store in self._linears:
            if len(store) > 1:
                store.clear()
                raise NotImplementedError(
                    "grad_sample_mode 'bk' does not support a layer used twice in one forward pass "
                    "(parameter tying); use 'hooks'."
                )
            if not store:
                continue
            a, g = store.pop()
            if type(m) is nn.Conv2d:
                for p, gs in conv2d_per_sample_grads(m, a, g).items():  # type: ignore[arg-type]
                    if p.requires_grad:
                        conv_samples.append((p, gs))
                        add(p, gs.reshape(len(gs), -1).pow(2).sum(1))
                continue
            linear_data.append((m, a, g))  # type: ignore[arg-type]
            if g.dim() == 2:
                g2 = g.pow(2).sum(1)
                if m.weight.requires_grad:
                    add(m.weight, g2 * a.pow(2).sum(1))
                if m.bias is not None and m.bias.requires_grad:
                    add(m.bias, g2)
            else:
                for p, ns in compute_linear_norm_sample(m, [a], g).items():
                    add(p, ns.pow(2))
        others = [p for p in self._module.parameters() if p.requires_grad and p.__dict__.get("grad_sample") is not None]
        for p in others:
            add(p, p.grad_sample.reshape(len(p.grad_sample), -1).pow(2).sum(1))  # type: ignore[attr-defined]
        params = [p for p in self._module.parameters() if p.requires_grad]
        # per group b: c_b = min(1, C_group / ||grad_b restricted to the group||)
        coefs = [
            None if sq is None else (bound / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            for sq, bound in zip(norm_sq, self._bounds, strict=True)
        ]

        def coef_of(p: nn.Parameter) -> torch.Tensor:
            c = coefs[self._group_of[id(p)]]
            assert c is not None  # the parameter contributed a norm above
            return c

        for m, a, g in linear_data:
            if not (m.weight.requires_grad or (m.bias is not None and m.bias.requires_grad)):
                continue
            c = coef_of(m.weight if m.weight.requires_grad else m.bias)
            cg = g * c.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
            if m.weight.requires_grad:
                m.weight.grad = cg.reshape(-1, cg.shape[-1]).t().mm(a.reshape(-1, a.shape[-1])).to(m.weight.dtype)
            if m.bias is not None and m.bias.requires_grad:
                m.bias.grad = cg.reshape(-1, cg.shape[-1]).sum(0).to(m.bias.dtype)
        for p in others:
            gs = p.grad_sample  # type: ignore[attr-defined]
            p.grad = torch.einsum("n,n...->...", coef_of(p).to(gs.dtype), gs).to(p.dtype)
            p.grad_sample = None  # type: ignore[attr-defined]
        for p, gs in conv_samples:
            p.grad = torch.einsum("n,n...->...", coef_of(p).to(gs.dtype), gs).to(p.dtype)
        for p in params:  # parameters unused in this forward pass get a zero gradient (noise is still added)
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def remove_hooks(self) -> None:
        try:
            super().remove_hooks()
        finally:
            for m, store in getattr(self, "_linears", []):
                store.clear()
                if getattr(m.__dict__.get("forward"), "_secure_dfml_bk", False):
                    del m.forward


class _BookKeeping(_Strategy):
    name = "bk"
    optimizer_class = DPOptimizerFastGradientClipping
    supports_clip_groups = True

    def _wrap(self, module: nn.Module) -> AbstractGradSampleModule:
        return _BookKeepingModule(module, max_grad_norm=self.max_grad_norm, clip_groups=self.clip_groups)

    def backward(self, loss: torch.Tensor, out: torch.Tensor, batch_dim: int) -> None:
        loss.backward()
        self.wrapped.clip()  # type: ignore[attr-defined]

    def empty_batch(self, params: Sequence[nn.Parameter]) -> None:
        for p in params:
            p.grad = torch.zeros_like(p)


GRAD_SAMPLE_MODES: dict[str, type[_Strategy]] = {
    "hooks": _Hooks,
    "functorch": _Functorch,
    "ew": _ExpandedWeights,
    "ghost": _Ghost,
    "bk": _BookKeeping,
}


def auto_grad_sample_mode(module: nn.Module) -> str:
    """The fastest correct mode measured by ``benchmarks/bench_dp_overhead.py``
    on CPU for every workload of the zoo (CNN, MLP, ResNet-GN and joint
    mutual-learning groups of 2-4 of them): book-keeping (``bk``)."""
    return "bk"


def resolve_grad_sample_mode(mode: str, module: nn.Module) -> str:
    if mode == "auto":
        return auto_grad_sample_mode(module)
    if mode not in GRAD_SAMPLE_MODES:
        raise PrivacyValidationError(
            f"privacy.grad_sample_mode = {mode!r} is invalid: expected 'auto' or one of "
            f"{', '.join(repr(m) for m in GRAD_SAMPLE_MODES)}."
        )
    return mode


# ---------------------------------------------------------------------------
# Leaving modules clean

_MODULE_ATTRS = (
    "activations",
    "max_batch_len",
    "ft_compute_sample_grad",
    "autograd_grad_sample_hooks",
    "_bk_linear",
)
_PARAM_ATTRS = (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad", "_processed")


def scrub_module(module: nn.Module, full_backward_flags: dict[int, object] | None = None) -> None:
    """Remove every attribute Opacus may have attached to ``module``, its
    submodules and its parameters, and drop the (noisy) ``.grad``."""
    for m in module.modules():
        for attr in _MODULE_ATTRS:
            if attr in m.__dict__:
                delattr(m, attr)
        if getattr(m.__dict__.get("forward"), "_secure_dfml_bk", False):
            del m.forward
        if full_backward_flags is not None and id(m) in full_backward_flags:
            m._is_full_backward_hook = full_backward_flags[id(m)]  # type: ignore[assignment]
    for p in module.parameters():
        for attr in _PARAM_ATTRS:
            if attr in p.__dict__:
                delattr(p, attr)
        p.grad = None


def opacus_leftovers(module: nn.Module) -> list[str]:
    """Names of Opacus artefacts still attached to ``module`` (empty when clean)."""
    found: list[str] = []
    for name, m in module.named_modules():
        found += [f"{name or '<root>'}.{a}" for a in (*_MODULE_ATTRS, "forward") if a in m.__dict__]
        if m._forward_hooks or m._backward_hooks or m._forward_pre_hooks or m._backward_pre_hooks:
            found.append(f"{name or '<root>'}: hooks")
    for name, p in module.named_parameters():
        found += [f"{name}.{a}" for a in _PARAM_ATTRS if a in p.__dict__]
    return found


# ---------------------------------------------------------------------------
# One DP-SGD phase


class DPSGDSession:
    """A module wrapped for DP-SGD for the duration of one phase.

    ``step(xb, yb)`` is one DP-SGD step on an already-sampled batch: per-sample
    gradients (or norms) by the grad-sample strategy, clipping to
    ``max_grad_norm``, Gaussian noise of std ``noise_multiplier * max_grad_norm``
    on the clipped sum, division by ``expected_batch_size``, then the wrapped
    optimizer's update.  ``close()`` (or leaving the ``with`` block) unwraps the
    module and removes every Opacus artefact from it, also after an error."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: LossFn,
        batch_dim: int,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        mode: str,
        noise_generator: torch.Generator | None = None,
        secure: bool = False,
        clip_groups: ClipGroups | None = None,
    ) -> None:
        require_opacus_internals()  # the Opacus internals below are still there (clear error otherwise)
        self.module = module
        self.mode = resolve_grad_sample_mode(mode, module)
        self.loss_fn = loss_fn
        self.batch_dim = batch_dim
        module.train()
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._flags = {id(m): m._is_full_backward_hook for m in module.modules()}
        self._strategy: _Strategy | None = None
        try:
            self._strategy = GRAD_SAMPLE_MODES[self.mode](
                module, max_grad_norm=max_grad_norm, clip_groups=clip_groups
            )
            if secure and noise_generator is not None:
                raise PrivacyValidationError("secure mode draws noise from the OS CSPRNG and refuses a seeded generator.")
            self.optimizer = _OPTIMIZERS[self._strategy.optimizer_class](
                optimizer,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size,
                loss_reduction="mean",
                generator=noise_generator,
                secure_mode=secure,
            )
            self.optimizer.secure_noise = secure  # type: ignore[attr-defined]
            if isinstance(self._strategy, _Ghost):
                self._strategy._optimizer = self.optimizer
        except BaseException:
            self.close()
            raise

    def _gradients(self, xb: Inputs, yb: torch.Tensor) -> None:
        assert self._strategy is not None, "session is closed"
        self.optimizer.zero_grad(set_to_none=True)
        if yb.shape[0] == 0:
            self._strategy.empty_batch(self.params)
        else:
            out = self._strategy.forward(*_as_tuple(xb))
            with warnings.catch_warnings():
                # Opacus' hooks fire on inputs that need no gradient (the first layer's
                # data); the warning is expected and would flood every step.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                self._strategy.backward(self.loss_fn(out, yb), out, self.batch_dim)

    def step(self, xb: Inputs, yb: torch.Tensor) -> None:
        self._gradients(xb, yb)
        self.optimizer.step()

    def noisy_gradient(self, xb: Inputs, yb: torch.Tensor) -> list[torch.Tensor]:
        """The privatised gradient of one step, without updating the module."""
        self._gradients(xb, yb)
        self.optimizer.pre_step()
        return [p.grad.detach().clone() for p in self.params]  # type: ignore[union-attr]

    def close(self) -> None:
        strategy, self._strategy = self._strategy, None
        try:
            if strategy is not None:
                strategy.close()
        finally:
            scrub_module(self.module, self._flags)
            if strategy is not None and "_optimizer" in strategy.__dict__:
                del strategy._optimizer  # type: ignore[attr-defined]

    def __enter__(self) -> DPSGDSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class PhaseResult:
    steps: int
    compute_seconds: float
    mode: str
    mean_batch: float


def run_dp_sgd(
    module: nn.Module,
    *,
    x: Inputs,
    y: torch.Tensor,
    loss_fn: LossFn,
    batch_dim: int,
    sample_rate: float,
    steps: int,
    noise_multiplier: float,
    max_grad_norm: float,
    optim_cfg: DFMLConfig,
    mode: str,
    randomness: Randomness,
    clip_groups: ClipGroups | None = None,
    lr: float | None = None,
) -> PhaseResult:
    """Run ``steps`` DP-SGD steps of ``module`` on (x, y) with Poisson sampling at
    ``sample_rate`` (expected batch ``sample_rate * n``).  ``x`` is one tensor or
    a tuple (``module`` then takes one positional input per element, each
    indexed by the same sampled records).  The module is unwrapped and scrubbed
    afterwards, also on error; the wrapper and optimizer live for this call only."""
    n = int(y.shape[0])
    compute = 0.0
    batch_total = 0
    params = [p for p in module.parameters() if p.requires_grad]
    with DPSGDSession(
        module,
        make_optimizer(params, optim_cfg, lr=lr),
        loss_fn=loss_fn,
        batch_dim=batch_dim,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=sample_rate * n,
        mode=mode,
        noise_generator=randomness.noise,
        secure=randomness.secure,
        clip_groups=clip_groups,
    ) as session:
        for _ in range(steps):
            idx = randomness.poisson_indices(n, sample_rate)
            t0 = time.perf_counter()
            session.step(_take(x, idx), y[idx])
            compute += time.perf_counter() - t0
            batch_total += int(idx.numel())
    return PhaseResult(steps=steps, compute_seconds=compute, mode=session.mode, mean_batch=batch_total / max(steps, 1))


def clipped_sum_gradient(
    module: nn.Module,
    *,
    x: Inputs,
    y: torch.Tensor,
    loss_fn: LossFn,
    batch_dim: int,
    max_grad_norm: float,
    mode: str,
    clip_groups: ClipGroups | None = None,
) -> list[torch.Tensor]:
    """Sum over the batch of per-sample gradients clipped to ``max_grad_norm``
    (per group when ``clip_groups``), as computed by grad-sample ``mode`` (no
    noise, no update).  For checking the modes against a per-sample loop."""
    params = [p for p in module.parameters() if p.requires_grad]
    with DPSGDSession(
        module,
        torch.optim.SGD(params, lr=0.0),
        loss_fn=loss_fn,
        batch_dim=batch_dim,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=1,
        mode=mode,
        clip_groups=clip_groups,
    ) as session:
        return session.noisy_gradient(x, y)


def reference_clipped_sum(
    module: nn.Module,
    *,
    x: Inputs,
    y: torch.Tensor,
    loss_fn: LossFn,
    batch_dim: int,
    max_grad_norm: float,
    clip_groups: ClipGroups | None = None,
) -> list[torch.Tensor]:
    """Loop reference: each sample's gradient computed alone, clipped (per
    group when ``clip_groups``), summed.  (The DFML losses are batch means, so
    one sample's term is the loss of a batch of one.)"""
    params = [p for p in module.parameters() if p.requires_grad]
    bounds, group_of = _clip_partition(module, max_grad_norm, clip_groups)
    total = [torch.zeros_like(p) for p in params]
    for i in range(int(y.shape[0])):
        out = module(*_take(x, slice(i, i + 1)))
        grads = torch.autograd.grad(loss_fn(out, y[i : i + 1]), params)
        sq = [0.0] * len(bounds)
        for p, g in zip(params, grads, strict=True):
            sq[group_of[id(p)]] += float((g.double() ** 2).sum())
        factors = [min(1.0, b / (math.sqrt(v) + 1e-6)) for b, v in zip(bounds, sq, strict=True)]
        for t, p, g in zip(total, params, grads, strict=True):
            t.add_(g * factors[group_of[id(p)]])
    return total
