"""The Class Impressions paper's echocardiography network (Ayromlou et al., 2022).

A stride-2 3x3 stem and three stages of two residual blocks (16/32/64 channels, each
stage stride 2), then average pooling to a 64 x 2 x 2 map, a 256-d feature. The paper
uses a 7x7 average pool on 224-px input (14x14 map); pooling adaptively to 2x2 gives
the same result there and also works at other resolutions such as 64 px.
"""

from __future__ import annotations

from fl_ci.models.resnet import ResNetBackbone


def echo_net(in_channels: int = 1) -> ResNetBackbone:
    """Echo network backbone (grayscale input by default); features are 256-d."""
    return ResNetBackbone(
        in_channels,
        widths=(16, 32, 64),
        blocks=(2, 2, 2),
        strides=(2, 2, 2),
        stem_channels=16,
        stem_stride=2,
        pool_size=2,
    )
