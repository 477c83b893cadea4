"""BatchNorm statistics matching, the a_bn term of the Class Impression objective.

Forward hooks record, for every BatchNorm2d (shortcut ones included), the per-channel
batch mean and biased variance of the layer's INPUT; the loss compares them with the
layer's running statistics:  Σ_l r_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂),  r_1 for the first
BatchNorm in module registration order (the stem), 1 elsewhere.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import Tensor, nn


def bn_matching_loss(
    batch_stats: list[tuple[Tensor, Tensor]],
    running_stats: list[tuple[Tensor, Tensor]],
    first_bn_weight: float = 10.0,
) -> Tensor:
    """Σ_l r_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂), plain (unsquared) L2 norms.

    Both lists hold (mean [C_l], var [C_l]) per layer in the same order.
    """
    if not batch_stats or len(batch_stats) != len(running_stats):
        raise ValueError(
            f"need one batch statistic per BatchNorm layer, got {len(batch_stats)} "
            f"for {len(running_stats)} layers"
        )
    total = batch_stats[0][0].new_zeros(())
    for i, ((mean, var), (run_mean, run_var)) in enumerate(
        zip(batch_stats, running_stats, strict=True)
    ):
        r = first_bn_weight if i == 0 else 1.0
        total = total + r * (
            torch.linalg.vector_norm(mean - run_mean)
            + torch.linalg.vector_norm(var - run_var)
        )
    return total


class BNStatsRecorder:
    """Context manager: hooks every BatchNorm2d of `model` while inside `with`.

        with BNStatsRecorder(teacher) as bn:
            teacher(x)
            loss = bn.loss(first_bn_weight=10.0)

    Raises ValueError on entry if the model has no BatchNorm2d with running stats.
    A layer called twice in one forward keeps the statistics of its last call.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers: list[nn.BatchNorm2d] = [
            m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
        ]
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm2d layer: BN-statistics "
                "matching (Class Impression / DeepInversion) needs one"
            )
        for i, layer in enumerate(self.layers):
            if layer.running_mean is None or layer.running_var is None:
                raise ValueError(
                    f"BatchNorm2d layer {i} does not track running statistics"
                )
        self.stats: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BNStatsRecorder:
        self.stats = [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def record(
            module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor
        ) -> None:
            # float32 even under bf16 autocast: small variances lose their digits.
            x = inputs[0].float()
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)  # [C] each
            self.stats[index] = (mean, var)

        return record

    def running_stats(self) -> list[tuple[Tensor, Tensor]]:
        """(running mean [C_l], running var [C_l]) of every hooked layer, float32."""
        return [
            (layer.running_mean.float(), layer.running_var.float())  # type: ignore[union-attr]
            for layer in self.layers
        ]

    def batch_stats(self) -> list[tuple[Tensor, Tensor]]:
        """(mean [C_l], biased var [C_l]) of each layer's input in the last forward."""
        missing = [i for i, s in enumerate(self.stats) if s is None]
        if missing:
            raise RuntimeError(
                f"BatchNorm layers {missing} recorded no statistics: run the model "
                "inside the `with` block before asking for the loss"
            )
        return [s for s in self.stats if s is not None]

    def loss(self, first_bn_weight: float = 10.0) -> Tensor:
        """BN-matching loss of the last forward pass (see `bn_matching_loss`)."""
        return bn_matching_loss(
            self.batch_stats(), self.running_stats(), first_bn_weight
        )
