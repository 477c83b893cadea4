"""A bundle's model as ONNX, for inference without PyTorch (ONNX Runtime and others).

The graph takes `image`: float32 [batch, C, S, S], already normalised as the bundle
says ((uint8 / 255 - mean) / std), and gives `logits` and `probabilities` [batch, K]
in the bundle's class order. The batch axis is dynamic. The bundle's description
(class names, normalisation, input size and frames, weights hash) is copied into the
ONNX metadata, so the file is self-describing. Needs the `onnx` extra
(`pip install 'fl-ci[onnx]'`: onnx, onnxscript for torch's exporter, onnxruntime).
"""

from __future__ import annotations

import importlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fl_ci.bundle import Bundle, load_bundle
from fl_ci.results import atomic_write

# torch's exporter writes opset 18 or later; 20 runs on ONNX Runtime 1.17 and later
DEFAULT_OPSET = 20
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")


class ExportError(ValueError):
    """The export cannot be done (a missing package, an unwritable path)."""


@dataclass(frozen=True)
class Agreement:
    """How closely ONNX Runtime reproduces torch on a batch."""

    inputs: int
    max_abs_probability: float
    max_abs_logit: float
    argmax_equal: bool


class _WithProbabilities(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


def export_onnx(
    bundle: Bundle | str | Path, path: str | Path, *, opset: int = DEFAULT_OPSET
) -> Path:
    """Write the bundle's model to `path` as ONNX (atomically); returns the path."""
    _need("onnx", "onnxscript")
    import onnx

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    net = _WithProbabilities(bundle.model.cpu()).eval()
    size, channels = bundle.image_size, bundle.in_channels
    # batch 2, not 1: torch.export specialises a dimension seen as 1
    example = torch.zeros(2, channels, size, size)
    batch = torch.export.Dim("batch")
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},),
            )
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    info = bundle.info
    meta = {
        "fl_ci_version": str(info.get("fl_ci_version", "")),
        "class_names": json.dumps(bundle.class_names),
        "mean": json.dumps(list(bundle.mean)),
        "std": json.dumps(list(bundle.std)),
        "image_size": str(size),
        "in_channels": str(channels),
        "frames": str(bundle.frames),
        "input": "float32 [batch, C, S, S] = (uint8 pixels / 255 - mean) / std",
        "architecture": str(info.get("architecture", "")),
        "method": str(info.get("method", "")),
        "dataset": str(info.get("dataset", "")),
        "weights_sha256": str(info.get("weights", {}).get("sha256", "")),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    try:
        return atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    except OSError as err:
        raise ExportError(f"cannot write {path}: {err}") from None


def compare_onnx(bundle: Bundle, path: str | Path, x: Tensor) -> Agreement:
    """Run normalised inputs `x` [B, C, S, S] through torch and ONNX Runtime (CPU)."""
    _need("onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits_ort, probs_ort = session.run(
        list(OUTPUT_NAMES), {INPUT_NAME: x.float().numpy()}
    )
    model = bundle.model.cpu().eval()
    with torch.inference_mode():
        logits = model(x.float())
        probs = torch.softmax(logits, dim=1)
    return Agreement(
        inputs=len(x),
        max_abs_probability=float(np.abs(probs_ort - probs.numpy()).max()),
        max_abs_logit=float(np.abs(logits_ort - logits.numpy()).max()),
        argmax_equal=bool((probs_ort.argmax(1) == probs.numpy().argmax(1)).all()),
    )


def random_inputs(bundle: Bundle, n: int = 8, seed: int = 0) -> Tensor:
    """`n` images of uniform random pixels, normalised as the bundle says."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, bundle.in_channels, bundle.image_size, bundle.image_size)
    pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return bundle.normalize(pixels)


def _need(*modules: str) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}: pip install 'fl-ci[onnx]'"
        )
