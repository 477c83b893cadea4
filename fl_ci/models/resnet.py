"""CIFAR-style ResNet backbones (He et al. 2016) returning the last feature map.

ResNet-32 follows the ABD / R-DFCIL CIFAR-100 protocol (3 stages of 5 BasicBlocks,
16/32/64 channels); ResNet-18 uses the CIFAR stem (3x3 conv, stride 1, no max-pool).
Downsampling shortcuts are option B (1x1 conv + BatchNorm), identity otherwise.

Every ReLU and the residual addition are out-of-place, so a forward hook on a
BatchNorm layer (DeepInversion-style statistics matching) sees its true input and
output, never a tensor modified afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016, Fig. 2)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            # Option B: projection shortcut when the shape changes.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))  # [B, C, h, w]
        out = self.bn2(self.conv2(out))  # [B, C, h, w]
        return self.relu2(out + self.shortcut(x))  # [B, C, h, w]


class ResNetBackbone(nn.Module):
    """Stem conv-BN-ReLU, then stages of BasicBlocks; returns the last feature map.

    `out_channels` is the channel count D' of the returned map and `pool_size` the
    side of the average-pooled grid the network flattens into its feature vector.
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        strides: Sequence[int],
        stem_channels: int | None = None,
        stem_stride: int = 1,
        pool_size: int = 1,
    ) -> None:
        super().__init__()
        if not len(widths) == len(blocks) == len(strides):
            raise ValueError("widths, blocks and strides must have the same length")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        stem_ch = widths[0] if stem_channels is None else stem_channels
        self.stem = nn.Sequential(
            _conv3x3(in_channels, stem_ch, stem_stride),
            nn.BatchNorm2d(stem_ch),
            nn.ReLU(),
        )
        stages = []
        ch = stem_ch
        for width, n_blocks, stride in zip(widths, blocks, strides, strict=True):
            layers = [BasicBlock(ch, width, stride)]
            layers += [BasicBlock(width, width) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*layers))
            ch = width
        self.stages = nn.Sequential(*stages)
        self.out_channels = ch
        self.pool_size = pool_size
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))  # [B, D', h, w] last feature map


def resnet32(in_channels: int = 3) -> ResNetBackbone:
    """CIFAR ResNet-32: 3x3 stem, 3 stages x 5 blocks (16/32/64), 64-d feature."""
    return ResNetBackbone(in_channels, (16, 32, 64), (5, 5, 5), (1, 2, 2))


def resnet18(in_channels: int = 3) -> ResNetBackbone:
    """CIFAR-stem ResNet-18: 3x3 stride-1 stem, no max-pool, 512-d feature."""
    return ResNetBackbone(in_channels, (64, 128, 256, 512), (2, 2, 2, 2), (1, 2, 2, 2))
