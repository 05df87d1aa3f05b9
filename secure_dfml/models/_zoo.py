"""Heterogeneous model zoo.  Every model is DP-compatible: GroupNorm, no BatchNorm,
no in-place activations, parameters initialised from an explicit generator."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secure_dfml.errors import ModelError
from secure_dfml.models._features import FixedFrontEnd, shared_buffer


def _flat(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_block(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU())


class SmallCNN(nn.Module):
    """Two conv layers (16, 32 channels) and a linear head."""

    def __init__(self, channels: int, num_classes: int, widths: tuple[int, ...] = (16, 32)) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        cin = channels
        for w in widths:
            blocks += [_conv_block(cin, w, min(8, w // 4)), nn.MaxPool2d(2, ceil_mode=True)]
            cin = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(cin * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(min(8, cout // 4), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(min(8, cout // 4), cout)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(min(8, cout // 4), cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNetGN(nn.Module):
    """A small ResNet (3 stages of basic blocks) with GroupNorm."""

    def __init__(self, channels: int, num_classes: int, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = _conv_block(channels, widths[0], min(8, widths[0] // 4))
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stages.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def morlet_bank(scales: int, orientations: int, size: int) -> torch.Tensor:
    """Zero-mean 2-D Morlet wavelets (as in the scattering transform: sigma 0.8 * 2^j,
    frequency 3*pi/4 / 2^j, slant 4/L), as ``(scales * orientations, 2, size, size)``
    real / imaginary kernels, L1-normalised.  Fixed, data-independent filters."""
    half = size // 2
    v, u = torch.meshgrid(
        torch.arange(-half, half + 1, dtype=torch.float64), torch.arange(-half, half + 1, dtype=torch.float64),
        indexing="ij",
    )
    slant = 4.0 / orientations
    out = []
    for j in range(scales):
        sigma, xi = 0.8 * 2**j, 0.75 * math.pi / 2**j
        for t in range(orientations):
            theta = math.pi * t / orientations
            ur = u * math.cos(theta) + v * math.sin(theta)
            vr = -u * math.sin(theta) + v * math.cos(theta)
            envelope = torch.exp(-(ur**2 + (vr / slant) ** 2) / (2 * sigma**2))
            # cut the far tail: it falls below float32's normal range, and subnormal weights make conv2d ~5x slower
            envelope = torch.where(envelope < 1e-6, torch.zeros_like(envelope), envelope)
            wave = torch.complex(torch.cos(xi * ur), torch.sin(xi * ur))
            psi = envelope * (wave - (envelope * wave).sum() / envelope.sum())
            psi = psi / psi.abs().sum()
            out.append(torch.stack([psi.real, psi.imag]))
    return torch.stack(out).to(torch.float32)


class Scattering(FixedFrontEnd):
    """First-order scattering features |x * psi_{j,theta}| and a low-pass of x,
    averaged over ``pool`` x ``pool`` cells and normalised per sample and channel.

    The wavelets are fixed (non-persistent buffers, no parameters): nothing here is
    trained, sent, or clipped.  Hand-crafted features like these let DP-SGD train
    few parameters on good features (Tramer & Boneh, ICLR 2021).  A fixed front
    end (:class:`~secure_dfml.models._features.FixedFrontEnd`): its features are
    computed once per sample and cached, and one filter bank per (channels,
    scales, orientations, size) is shared by every instance in the process."""

    def __init__(self, channels: int, *, scales: int = 2, orientations: int = 8, pool: int = 7) -> None:
        super().__init__()
        size = 2 * math.ceil(3 * 0.8 * 2 ** (scales - 1)) + 1  # +-3 sigma of the widest envelope
        self.bank_key = ("morlet", channels, scales, orientations, size)

        def make() -> torch.Tensor:
            bank = morlet_bank(scales, orientations, size)  # (S, 2, k, k)
            return bank.reshape(-1, 1, size, size).repeat(channels, 1, 1, 1)  # per input channel

        self.register_buffer("weight", shared_buffer(self.bank_key, make), persistent=False)
        self.channels, self.filters, self.pad = channels, scales * orientations, size // 2
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.out_shape = (channels * (1 + self.filters), pool, pool)
        self.norm = nn.GroupNorm(self.out_shape[0], self.out_shape[0], affine=False)  # one group per channel

    def cache_key(self) -> tuple[object, ...]:
        return ("scattering", *self.bank_key, self.out_shape, self.norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(x, self.weight, padding=self.pad, groups=self.channels)  # (B, C*S*2, H, W)
        z = z.unflatten(1, (self.channels * self.filters, 2))
        modulus = torch.sqrt((z**2).sum(2) + 1e-8)
        return self.norm(self.pool(torch.cat([x, modulus], 1)))


class ScatterNet(nn.Module):
    """Fixed scattering features, then a head: linear (default), a small CNN
    (``widths``: conv layers) or an MLP (``hidden``: hidden layer widths).
    ``fixed_front`` / ``forward_from_front`` let the features be cached."""

    def __init__(
        self, channels: int, num_classes: int, *, widths: tuple[int, ...] = (), hidden: tuple[int, ...] = ()
    ) -> None:
        super().__init__()
        self.scatter = Scattering(channels)
        cin = self.scatter.out_shape[0]
        blocks: list[nn.Module] = []
        for w in widths:
            blocks += [_conv_block(cin, w, min(8, w // 4)), nn.MaxPool2d(2, ceil_mode=True)]
            cin = w
        self.features = nn.Sequential(*blocks)
        with torch.no_grad():
            width = self.features(torch.zeros(1, *self.scatter.out_shape)).numel()
        self.head = MLP(width, hidden, num_classes)

    @property
    def fixed_front(self) -> Scattering:
        return self.scatter

    def forward_from_front(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_front(self.scatter(x))


Builder = Callable[[tuple[int, ...], int], nn.Module]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    kind: str  # "image" or "tabular"
    description: str
    build: Builder


MODEL_REGISTRY: dict[str, ArchSpec] = {}


def register(name: str, kind: str, description: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        MODEL_REGISTRY[name] = ArchSpec(name, kind, description, fn)
        return fn

    return deco


@register("mlp", "image", "2-hidden-layer MLP (200, 100) on flattened pixels")
def _mlp(shape: tuple[int, ...], k: int) -> nn.Module:
    return MLP(_flat(shape), (200, 100), k)


@register("cnn-small", "image", "2 conv layers (16, 32) + GroupNorm, linear head")
def _cnn_small(shape: tuple[int, ...], k: int) -> nn.Module:
    return SmallCNN(shape[0], k, (16, 32))


@register("mlp-small", "image", "1-hidden-layer MLP (64) on flattened pixels: few parameters, DP-friendly")
def _mlp_small(shape: tuple[int, ...], k: int) -> nn.Module:
    return MLP(_flat(shape), (64,), k)


@register("cnn-tiny", "image", "2 conv layers (8, 16) + GroupNorm, linear head: ~2k parameters, DP-friendly")
def _cnn_tiny(shape: tuple[int, ...], k: int) -> nn.Module:
    return SmallCNN(shape[0], k, (8, 16))


@register("scatter-linear", "image", "fixed scattering features (2 scales x 8 orientations) + linear head: DP-friendly")
def _scatter_linear(shape: tuple[int, ...], k: int) -> nn.Module:
    return ScatterNet(shape[0], k)


@register("scatter-cnn", "image", "fixed scattering features + one conv layer (16) + linear head: DP-friendly")
def _scatter_cnn(shape: tuple[int, ...], k: int) -> nn.Module:
    return ScatterNet(shape[0], k, widths=(16,))


@register("scatter-mlp", "image", "fixed scattering features + MLP with one hidden layer (16): DP-friendly")
def _scatter_mlp(shape: tuple[int, ...], k: int) -> nn.Module:
    return ScatterNet(shape[0], k, hidden=(16,))


@register("cnn-wide", "image", "3 conv layers (32, 64, 128) + GroupNorm, linear head")
def _cnn_wide(shape: tuple[int, ...], k: int) -> nn.Module:
    return SmallCNN(shape[0], k, (32, 64, 128))


@register("resnet-gn", "image", "ResNet with 3 GroupNorm basic blocks (16, 32, 64)")
def _resnet(shape: tuple[int, ...], k: int) -> nn.Module:
    return ResNetGN(shape[0], k, (16, 32, 64))


@register("tab-mlp-small", "tabular", "MLP with one hidden layer of 32")
def _tab_small(shape: tuple[int, ...], k: int) -> nn.Module:
    return MLP(_flat(shape), (32,), k)


@register("tab-mlp-wide", "tabular", "MLP with hidden layers (128, 64)")
def _tab_wide(shape: tuple[int, ...], k: int) -> nn.Module:
    return MLP(_flat(shape), (128, 64), k)


DEFAULT_MIX: dict[str, tuple[str, ...]] = {
    "image": ("cnn-small", "mlp", "resnet-gn", "cnn-wide"),
    "tabular": ("tab-mlp-small", "tab-mlp-wide"),
}

#: The data kinds architectures are built for (``ArrayDataset.kind``).
KINDS: tuple[str, ...] = ("image", "tabular")


def _architectures_by_kind() -> str:
    return "; ".join(f"{k}: {', '.join(n for n, s in MODEL_REGISTRY.items() if s.kind == k)}" for k in KINDS)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ModelError(
            f"kind = {kind!r} is not a data kind: expected one of {', '.join(repr(k) for k in KINDS)} "
            f"(the data set's ArrayDataset.kind). Architectures per kind: {_architectures_by_kind()}."
        )


def available_models(kind: str | None = None) -> list[str]:
    """Architecture names, all or those for one data kind (``"image"`` or ``"tabular"``)."""
    if kind is not None:
        _check_kind(kind)
    return [n for n, s in MODEL_REGISTRY.items() if kind is None or s.kind == kind]


def _reset_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every parameter from ``generator`` (PyTorch's default
    schemes, but never the global RNG)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.GroupNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, kind: str, generator: torch.Generator
) -> nn.Module:
    """Build architecture ``name`` for inputs of ``input_shape`` (C,H,W or F,)."""
    _check_kind(kind)
    spec = MODEL_REGISTRY.get(name)
    if spec is None:
        raise ModelError(f"unknown architecture {name!r}; available: {', '.join(MODEL_REGISTRY)}.")
    if spec.kind != kind:
        raise ModelError(
            f"architecture {name!r} is for {spec.kind} data but the data set is {kind}; "
            f"choose one of: {', '.join(available_models(kind))}."
        )
    model = spec.build(tuple(input_shape), num_classes)
    _reset_parameters(model, generator)
    return model


def resolve_architectures(
    num_peers: int, *, kind: str, mix: tuple[str, ...] = (), per_peer: tuple[str, ...] = ()
) -> list[str]:
    """Architecture per peer: an explicit list, or ``mix`` cycled over the peers."""
    _check_kind(kind)
    if per_peer:
        if len(per_peer) != num_peers:
            raise ModelError(
                f"models.per_peer lists {len(per_peer)} architectures but federation.peers = {num_peers}; "
                "give one per peer or use models.mix."
            )
        archs = list(per_peer)
    else:
        cycle = mix or DEFAULT_MIX[kind]
        archs = [cycle[i % len(cycle)] for i in range(num_peers)]
    for a in set(archs):
        spec = MODEL_REGISTRY.get(a)
        if spec is None:
            raise ModelError(f"unknown architecture {a!r}; available: {', '.join(MODEL_REGISTRY)}.")
        if spec.kind != kind:
            raise ModelError(
                f"architecture {a!r} is for {spec.kind} data but the data set is {kind}; "
                f"choose from: {', '.join(available_models(kind))}."
            )
    return archs


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
