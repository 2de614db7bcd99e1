"""3D CNN age regressors, one registry.

Every model maps ``(batch, channels, X, Y, Z)`` to ``(batch,)`` (standardised age) and
names its stages ``block1`` … ``blockN``; stage *k* works at 1/2^(k−1) of the input
resolution, so ``attribute --layer block3`` means a 1/4-resolution GradCAM.

``sfcn``
    In the spirit of SFCN (Peng et al. 2021, *Med Image Anal* 68:101871): conv–BN–ReLU
    stages separated by max-pooling, a 1×1×1 conv, global average pooling, dropout and a
    linear head. Compact and fast on CPU.
``resnet3d``
    A small 3D ResNet (He et al. 2016): two basic residual blocks per stage, strided
    convolutions between stages, global average pooling.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bodyage.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and which layer GradCAM uses by default.

    ``default_layer`` is ``block1`` (full resolution) for both models: on the default
    synthetic study GradCAM ranked the planted regions best there (precision@8 0.625 by
    mean ``|mass|`` at block1 against 0.25–0.375 at block2–block4; docs/history.md, "Attribution").
    """

    name: str
    build: Callable[..., nn.Module]
    default_layer: str
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: a grid side after one downsampling between stages (max-pooling floors, a strided
    #: convolution with padding 1 rounds up)
    halve: Callable[[int], int] = field(default=lambda n: n // 2)


def _pooled_head(*modules: nn.Module) -> nn.Module:
    """An ``nn.Sequential`` whose global pooling and what follows run in float32 under autocast.

    Averaging a whole body's features and the linear output in bfloat16 would round the
    prediction to about 3 significant digits (a tenth of a year at the scale of age);
    from the pooling on the head is a sliver of the compute, so it stays in float32
    while the convolutions run in reduced precision. Same state-dict keys as a plain
    ``nn.Sequential``.
    """
    import torch
    from torch import nn

    start = next(i for i, m in enumerate(modules) if isinstance(m, nn.AdaptiveAvgPool3d))

    class PooledHead(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for module in list(self)[:start]:
                x = module(x)
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = x.float()
                for module in list(self)[start:]:
                    x = module(x)
            return x

    return PooledHead(*modules)


def _dixon_ff(x: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """Append a fat-fraction channel ``fat / (water + fat)`` (channels 0 and 1), faded out in air."""
    import torch

    water, fat = x[:, 0:1].clamp(min=0), x[:, 1:2].clamp(min=0)
    total = water + fat
    ff = fat / (total + eps)
    body = torch.sigmoid((total - 0.15) * 30.0)
    return torch.cat([x, ff * body], dim=1)


#: normalisation layers of ``sfcn`` (``--model-options '{"norm": "group"}'``)
NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm3d, or GroupNorm with up to 8 groups (statistics per scan: no running averages)."""
    from torch import nn

    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.BatchNorm3d(channels)


def _sfcn(
    in_channels: int,
    widths: Sequence[int] = (16, 32, 64, 64),
    dropout: float = 0.2,
    pool: str = "max",
    input_ff: bool = False,
    norm: str = "batch",
) -> nn.Module:
    from torch import nn

    if input_ff and in_channels < 2:
        raise InputError("input_ff needs water and fat as the first two channels")
    if norm not in NORMS:
        raise InputError(f"sfcn: unknown norm {norm!r}; choose one of {', '.join(NORMS)}")

    class SFCN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_ff = input_ff
            blocks: OrderedDict[str, nn.Module] = OrderedDict()
            prev = in_channels + (1 if input_ff else 0)
            for k, w in enumerate(widths, start=1):
                pooling: nn.Module = nn.MaxPool3d(2) if pool == "max" else nn.AvgPool3d(2)
                layers: list[nn.Module] = [] if k == 1 else [pooling]
                layers += [nn.Conv3d(prev, w, 3, padding=1, bias=False), _norm(norm, w), nn.ReLU(inplace=True)]
                blocks[f"block{k}"] = nn.Sequential(*layers)
                prev = w
            self.features = nn.Sequential(blocks)
            self.head = _pooled_head(
                nn.Conv3d(prev, prev, 1, bias=False),
                _norm(norm, prev),
                nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool3d(1),
                nn.Flatten(),
                nn.Dropout(dropout),
                nn.Linear(prev, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.input_ff:
                x = _dixon_ff(x)
            return self.head(self.features(x)).squeeze(1)

    return SFCN()


def _resnet3d(in_channels: int, widths: Sequence[int] = (16, 32, 64, 64), dropout: float = 0.2) -> nn.Module:
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm3d(cout)
            self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm3d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.skip: nn.Module = (
                nn.Identity()
                if stride == 1 and cin == cout
                else nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + self.skip(x))

    class ResNet3D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            blocks: OrderedDict[str, nn.Module] = OrderedDict()
            prev = in_channels
            for k, w in enumerate(widths, start=1):
                stride = 1 if k == 1 else 2
                blocks[f"block{k}"] = nn.Sequential(Basic(prev, w, stride), Basic(w, w, 1))
                prev = w
            self.features = nn.Sequential(blocks)
            self.head = _pooled_head(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(prev, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x)).squeeze(1)

    return ResNet3D()


#: the registry: the CLI's --model choices come from here
MODELS: dict[str, ModelSpec] = {
    "sfcn": ModelSpec(
        name="sfcn",
        build=_sfcn,
        default_layer="block1",
        defaults={"widths": [16, 32, 64, 64], "dropout": 0.2},
        description="SFCN-style conv-BN-pool stages, global average pooling (default)",
    ),
    "resnet3d": ModelSpec(
        name="resnet3d",
        build=_resnet3d,
        default_layer="block1",
        defaults={"widths": [16, 32, 64, 64], "dropout": 0.2},
        description="small 3D ResNet, two basic blocks per stage",
        halve=lambda n: (n + 1) // 2,
    ),
}


def get_model_spec(name: str) -> ModelSpec:
    """Return the registry entry of ``name``; raise :class:`InputError` naming the choices."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build a registered model with its defaults overridden by ``kwargs``."""
    spec = get_model_spec(name)
    params = {**spec.defaults, **kwargs}
    return spec.build(in_channels, **params)


def check_grid(name: str, grid: Sequence[int], **kwargs: Any) -> None:
    """Check that every stage of model ``name`` keeps at least one voxel of ``grid``.

    Raises
    ------
    InputError
        Naming ``--model-options`` and the grid, if the stages halve a side of the grid
        to nothing (``widths`` longer than the grid allows).
    """
    spec = get_model_spec(name)
    widths = list({**spec.defaults, **kwargs}.get("widths", []))
    sides = list(grid)
    for stage in range(2, len(widths) + 1):
        sides = [spec.halve(n) for n in sides]
        if min(sides) < 1:
            fits = stage - 1
            shown = "x".join(str(n) for n in grid)
            raise InputError(
                f"--model-options widths {widths} ({len(widths)} stages) is too deep for the grid {shown}: "
                f"at most {fits} stages fit it; give fewer widths or a finer --grid"
            )


def layer_names(model: nn.Module) -> list[str]:
    """Names of the model's stages (``block1`` …), the choices of ``--layer``."""
    features = getattr(model, "features", None)
    if features is None:
        return []
    return [name for name, _ in features.named_children()]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The stage ``name`` of ``model``; raise :class:`InputError` naming the choices."""
    names = layer_names(model)
    if name not in names:
        raise InputError(f"unknown layer {name!r}; this model has {', '.join(names)}")
    return getattr(model.features, name)
