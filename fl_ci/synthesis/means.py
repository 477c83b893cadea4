"""Per-class mean images M_k in normalised input space, the Class Impression init.

A site shares (sum, count) per class rather than the mean itself, so a server combines
sites by adding sums and counts, which is exactly the count-weighted average of the
sites' means. Sums are float64 so adding many sites loses nothing; a class counts
cines (images), and each cine contributes the mean of all its frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fl_ci.data.base import ImageData


class MissingMeanError(ValueError):
    """A class mean was asked for that no site shared; the message names the class."""


@dataclass
class ClassMeans:
    """sums [K, C, H, W] float64 of normalised images; counts [K] int64 images."""

    sums: Tensor
    counts: Tensor

    def __post_init__(self) -> None:
        if self.sums.dim() != 4 or self.sums.dtype != torch.float64:
            raise ValueError(
                f"sums must be [K, C, H, W] float64, got {tuple(self.sums.shape)} "
                f"{self.sums.dtype}"
            )
        if self.counts.shape != self.sums.shape[:1] or self.counts.dtype != torch.int64:
            raise ValueError(
                f"counts must be [{self.sums.shape[0]}] int64, got "
                f"{tuple(self.counts.shape)} {self.counts.dtype}"
            )
        if (self.counts < 0).any():
            raise ValueError("counts must be non-negative")

    # ----- construction -------------------------------------------------------------
    @classmethod
    def from_data(
        cls,
        data: ImageData,
        classes: list[int] | None = None,
        batch_size: int = 512,
        *,
        num_classes: int | None = None,
    ) -> ClassMeans:
        """Sums over every frame of every cine of `classes` (default: all in `data`).

        K is `num_classes`, else one past the largest of `classes`.
        """
        labels = data.labels
        if classes is None:
            classes = sorted(set(labels.tolist()))
        top = max(classes, default=-1) + 1
        k = num_classes if num_classes is not None else top
        if top > k:
            raise ValueError(f"num_classes={k} is too small for class {top - 1}")
        c, h, w = data.frames.shape[2:]
        mean = torch.tensor(data.mean, dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(data.std, dtype=torch.float64).view(1, -1, 1, 1)
        sums = torch.zeros(k, c, h, w, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.int64)
        rows = torch.isin(labels, torch.tensor(classes, dtype=torch.long)).nonzero()
        rows = rows.squeeze(1)
        for start in range(0, rows.numel(), batch_size):
            idx = rows[start : start + batch_size]
            frames = data.frames[idx]  # [B, F, C, H, W] uint8
            # Normalisation is affine, so normalising each cine's mean frame equals the
            # mean of its normalised frames, without a float copy of every frame.
            raw = frames.sum(1, dtype=torch.int64).double()  # [B, C, H, W]
            per_cine = (raw / (frames.shape[1] * 255.0) - mean) / std
            sums.index_add_(0, labels[idx], per_cine)
            counts += torch.bincount(labels[idx], minlength=k)
        return cls(sums, counts)

    @classmethod
    def empty(cls, num_classes: int, image_shape: tuple[int, int, int]) -> ClassMeans:
        """No class known yet: the identity of `merge`."""
        return cls(
            torch.zeros(num_classes, *image_shape, dtype=torch.float64),
            torch.zeros(num_classes, dtype=torch.int64),
        )

    # ----- combination --------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.sums.shape[1:]
        return c, h, w

    def merge(self, other: ClassMeans) -> ClassMeans:
        """Count-weighted combination of two sites; K grows to the larger of the two."""
        if self.image_shape != other.image_shape:
            raise ValueError(
                f"cannot merge class means of image shape {self.image_shape} and "
                f"{other.image_shape}"
            )
        k = max(self.num_classes, other.num_classes)
        a, b = self._padded(k), other._padded(k)
        return ClassMeans(a.sums + b.sums, a.counts + b.counts)

    def __add__(self, other: ClassMeans) -> ClassMeans:
        return self.merge(other)

    def __radd__(self, other: object) -> ClassMeans:
        # Lets `sum(site_means)` start from the integer 0.
        if other == 0:
            return self
        return NotImplemented

    def _padded(self, k: int) -> ClassMeans:
        extra = k - self.num_classes
        if extra == 0:
            return self
        return ClassMeans(
            torch.cat([self.sums, self.sums.new_zeros(extra, *self.image_shape)]),
            torch.cat([self.counts, self.counts.new_zeros(extra)]),
        )

    # ----- queries ------------------------------------------------------------------
    def available(self, min_count: int = 1) -> list[int]:
        """Classes whose mean rests on at least `min_count` images."""
        return (self.counts >= max(min_count, 1)).nonzero().squeeze(1).tolist()

    def means(self, classes: list[int] | None = None) -> Tensor:
        """[len(classes), C, H, W] float32 mean images (default: all K classes).

        Raises MissingMeanError naming the first requested class with no images.
        """
        if classes is None:
            classes = list(range(self.num_classes))
        for c in classes:
            if not 0 <= c < self.num_classes or self.counts[c] == 0:
                raise MissingMeanError(
                    f"no class mean for class {c}: no site shared images of it"
                )
        idx = torch.tensor(classes, dtype=torch.long)
        return (self.sums[idx] / self.counts[idx].double()[:, None, None, None]).float()

    # ----- privacy ------------------------------------------------------------------
    def restricted(self, min_count: int) -> ClassMeans:
        """Drop classes with fewer than `min_count` images (the sharing floor)."""
        keep = self.counts >= min_count  # [K]
        return ClassMeans(
            torch.where(keep[:, None, None, None], self.sums, 0.0),
            torch.where(keep, self.counts, 0),
        )

    def with_noise(
        self, std: float, generator: torch.Generator | None = None
    ) -> ClassMeans:
        """Add N(0, std²) per pixel to every shared mean (normalised units).

        The noise blurs what one image contributes to a mean of n images. It is a
        Gaussian mechanism with a formal (ε, δ) guarantee only when std is calibrated
        to the mean's L2 sensitivity, Δ·sqrt(C·H·W) / n for a per-pixel range Δ.
        """
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        if std == 0:
            return ClassMeans(self.sums.clone(), self.counts.clone())
        noise = torch.randn(self.sums.shape, generator=generator, dtype=torch.float64)
        # Scaled by the count so the MEAN moves by std; absent classes stay absent.
        sums = self.sums + std * noise * self.counts.double()[:, None, None, None]
        return ClassMeans(sums, self.counts.clone())

    # ----- transport ----------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """{"sums": float64 [K, C, H, W], "counts": int64 [K]} for the wire."""
        return {"sums": self.sums.numpy().copy(), "counts": self.counts.numpy().copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ClassMeans:
        """Inverse of `to_arrays`; validates dtypes and shapes."""
        missing = {"sums", "counts"} - set(arrays)
        if missing:
            raise ValueError(f"class-mean arrays lack {sorted(missing)}")
        sums = np.asarray(arrays["sums"])
        counts = np.asarray(arrays["counts"])
        if sums.dtype != np.float64 or counts.dtype != np.int64:
            raise ValueError(
                f"class-mean arrays must be float64 sums and int64 counts, got "
                f"{sums.dtype} and {counts.dtype}"
            )
        return cls(torch.from_numpy(sums.copy()), torch.from_numpy(counts.copy()))
