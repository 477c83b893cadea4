"""IncrementalNet: backbone + global pooling + growable head, and the model factory."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from fl_ci.models.echo_net import echo_net
from fl_ci.models.heads import GrowableHead, build_head
from fl_ci.models.resnet import ResNetBackbone, resnet18, resnet32

MODEL_NAMES = ("resnet32", "resnet18", "echo_net")
HEAD_NAMES = ("cosine", "linear")


class NetOutput(NamedTuple):
    """Everything one forward pass exposes to the learning methods."""

    fmap: Tensor  # [B, D', h, w] last conv feature map (LwM attention distillation)
    features: Tensor  # [B, D] phi(x), the head's input
    scores: Tensor  # [B, K] cosine head: cosine similarities; linear head: logits
    logits: Tensor  # [B, K]


class IncrementalNet(nn.Module):
    """Backbone -> average pool -> flatten -> growable head (cosine or linear)."""

    def __init__(self, backbone: ResNetBackbone, head: GrowableHead) -> None:
        super().__init__()
        dim = backbone.out_channels * backbone.pool_size**2
        if head.in_features != dim:
            raise ValueError(f"head expects {head.in_features}-d features, got {dim}")
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(backbone.pool_size)
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def num_old_classes(self) -> int:
        """Classes merged into the head's old rows by earlier `grow` calls."""
        return self.head.num_old

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: Tensor) -> Tensor:
        """phi(x): pooled, flattened backbone features [B, D]."""
        return self.pool(self.backbone(x)).flatten(1)

    def forward_all(self, x: Tensor) -> NetOutput:
        fmap = self.backbone(x)  # [B, D', h, w]
        features = self.pool(fmap).flatten(1)  # [B, D]
        scores, logits = self.head.forward_scores(features)  # [B, K] each
        return NetOutput(fmap, features, scores, logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # [B, K] logits

    def grow(self, k: int, weights: Tensor | None = None) -> None:
        """Add k classes to the head (old rows kept exactly; see `GrowableHead.grow`).

        Parameters are replaced, so rebuild the optimiser afterwards.
        """
        self.head.grow(k, weights)

    def freeze_old_classes(self, flag: bool = True) -> None:
        """Freeze (or unfreeze) the head rows of classes from earlier tasks."""
        self.head.freeze_old(flag)


def _backbone(name: str, in_channels: int) -> ResNetBackbone:
    if name == "resnet32":
        return resnet32(in_channels)
    if name == "resnet18":
        return resnet18(in_channels)
    if name == "echo_net":
        return echo_net(in_channels)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    head: str = "cosine",
    head_scale: float = 1.0,
) -> IncrementalNet:
    """Build `resnet32`, `resnet18` or `echo_net` with a `cosine` or `linear` head
    (a cosine head's learnable scale starts at `head_scale`)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    backbone = _backbone(name, in_channels)
    dim = backbone.out_channels * backbone.pool_size**2
    return IncrementalNet(backbone, build_head(head, dim, num_classes, head_scale))


def model_for(dataset: str, name: str = "auto") -> str:
    """Resolve `auto` to the dataset's default model; pass explicit names through."""
    if name != "auto":
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
        return name
    if dataset == "cifar100":
        return "resnet32"
    if dataset in ("echo", "echo-synth"):
        return "echo_net"
    raise ValueError(f"no default model for dataset {dataset!r}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with requires_grad if asked)."""
    return sum(
        p.numel() for p in model.parameters() if p.requires_grad or not trainable_only
    )
