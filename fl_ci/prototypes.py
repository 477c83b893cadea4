"""Per-class feature statistics of real images, the prototypes of feature replay.

At the end of a task a site summarises its real images of the task's classes as
(sum, sum of squares, count) of the model's features phi(x), per class: statistics,
never images (PASS, Zhu et al. CVPR 2021; FeTrIL, Petit et al. WACV 2023; CwD's
"real old-class statistics", Wang et al. 2024). At later tasks the method draws
pseudo-features of each old class from N(mu_c, diag sigma_c^2) and trains the head
on them, so the new class's row learns where the real old images lie, which the
impressions, far from real images in feature space, do not show it
(docs/results.md, "Keeping the old views"). Sums add across sites and tasks, like
the class-mean images (fl_ci/synthesis/means.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_ci.data.base import ImageData, batches


@dataclass
class FeatureStats:
    """sums [K, D], squares [K, D] float64 of phi(x); counts [K] int64 images."""

    sums: Tensor
    squares: Tensor
    counts: Tensor

    def __post_init__(self) -> None:
        if self.sums.dim() != 2 or self.squares.shape != self.sums.shape:
            raise ValueError(
                f"sums and squares must both be [K, D], got {tuple(self.sums.shape)} "
                f"and {tuple(self.squares.shape)}"
            )
        if self.counts.shape != self.sums.shape[:1]:
            raise ValueError(
                f"counts must be [{self.sums.shape[0]}], got {tuple(self.counts.shape)}"
            )

    @classmethod
    @torch.no_grad()
    def from_model(
        cls,
        model: torch.nn.Module,
        data: ImageData,
        classes: list[int],
        num_classes: int,
        device: torch.device,
        batch_size: int = 256,
    ) -> FeatureStats:
        """Statistics of `model.features` over the un-augmented images of `classes`."""
        model.to(device).eval()
        dim = model.feature_dim
        sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        squares = torch.zeros(num_classes, dim, dtype=torch.float64)
        counts = torch.zeros(num_classes, dtype=torch.int64)
        keep = torch.tensor(classes, dtype=torch.long)
        for x, y in batches(data, batch_size, train=False, device=device):
            rows = torch.isin(y.cpu(), keep)
            if not rows.any():
                continue
            f = model.features(x[rows.to(x.device)]).double().cpu()  # [b, D]
            labels = y.cpu()[rows]
            sums.index_add_(0, labels, f)
            squares.index_add_(0, labels, f * f)
            counts += torch.bincount(labels, minlength=num_classes)
        return cls(sums, squares, counts)

    @classmethod
    def empty(cls, num_classes: int, dim: int) -> FeatureStats:
        zero = torch.zeros(num_classes, dim, dtype=torch.float64)
        return cls(zero, zero.clone(), torch.zeros(num_classes, dtype=torch.int64))

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Count-weighted combination; K grows to the larger of the two."""
        k = max(len(self.counts), len(other.counts))
        a, b = self._padded(k), other._padded(k)
        return FeatureStats(a.sums + b.sums, a.squares + b.squares, a.counts + b.counts)

    def _padded(self, k: int) -> FeatureStats:
        extra = k - len(self.counts)
        if extra == 0:
            return self
        dim = self.sums.shape[1]
        pad = self.sums.new_zeros(extra, dim)
        return FeatureStats(
            torch.cat([self.sums, pad]),
            torch.cat([self.squares, pad]),
            torch.cat([self.counts, self.counts.new_zeros(extra)]),
        )

    def available(self) -> list[int]:
        """Classes with at least one image."""
        return (self.counts > 0).nonzero().squeeze(1).tolist()

    def mean_std(self, classes: list[int]) -> tuple[Tensor, Tensor]:
        """([n, D] mean, [n, D] standard deviation) float32 of `classes`."""
        idx = torch.tensor(classes, dtype=torch.long)
        n = self.counts[idx].double().clamp_min(1)[:, None]
        mean = self.sums[idx] / n
        var = (self.squares[idx] / n - mean * mean).clamp_min(0)
        return mean.float(), var.sqrt().float()

    def to_tensors(self) -> dict[str, Tensor]:
        return {"sums": self.sums, "squares": self.squares, "counts": self.counts}

    @classmethod
    def from_tensors(cls, values: dict[str, Tensor]) -> FeatureStats:
        return cls(values["sums"], values["squares"], values["counts"])


def sample_features(
    mean: Tensor, std: Tensor, classes: Tensor, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """`n` pseudo-features drawn uniformly over the rows of `mean`/`std` [C, D]:
    x = mu_c + sigma_c * eps, eps ~ N(0, I); returns (x [n, D], labels [n])."""
    pick = torch.randint(0, len(classes), (n,), generator=generator)  # [n]
    eps = torch.randn(n, mean.shape[1], generator=generator)  # [n, D]
    return mean[pick] + std[pick] * eps, classes[pick]


def calibrate_head(
    head: torch.nn.Module,
    mean: Tensor,
    std: Tensor,
    classes: Tensor,
    *,
    steps: int,
    lr: float,
    generator: torch.Generator,
    batch_size: int = 256,
) -> float:
    """Train the head's new-class rows alone on pseudo-features of every class in
    `classes`, drawn evenly from N(mean_c, diag std_c^2) [C, D] (classifier
    alignment on Gaussian class statistics: SLCA, Zhang et al. ICCV 2023; FeTrIL).
    Old and new classes are treated alike, so no "real versus synthetic" cue is
    left to the head. The old rows and the scale stay as they are. Returns the last
    step's loss."""
    weight = head.new_weight
    opt = torch.optim.SGD([weight], lr=lr, momentum=0.9)
    loss = torch.zeros(())
    for _ in range(steps):
        x, y = sample_features(mean, std, classes, batch_size, generator)
        _, logits = head.forward_scores(x.to(weight.device))  # [B, K]
        loss = F.cross_entropy(logits.float(), y.to(weight.device))
        # only the new rows' gradient: nothing reaches the old rows or the scale
        (weight.grad,) = torch.autograd.grad(loss, weight)
        opt.step()
    weight.grad = None
    return float(loss.detach())
