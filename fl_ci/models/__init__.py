"""Backbones, growable classifier heads and the incremental network."""

from fl_ci.models.echo_net import echo_net
from fl_ci.models.heads import CosineHead, GrowableHead, LinearHead, build_head
from fl_ci.models.net import (
    HEAD_NAMES,
    MODEL_NAMES,
    IncrementalNet,
    NetOutput,
    build_model,
    count_parameters,
    model_for,
)
from fl_ci.models.resnet import BasicBlock, ResNetBackbone, resnet18, resnet32

__all__ = [
    "HEAD_NAMES",
    "MODEL_NAMES",
    "BasicBlock",
    "CosineHead",
    "GrowableHead",
    "IncrementalNet",
    "LinearHead",
    "NetOutput",
    "ResNetBackbone",
    "build_head",
    "build_model",
    "count_parameters",
    "echo_net",
    "model_for",
    "resnet18",
    "resnet32",
]
