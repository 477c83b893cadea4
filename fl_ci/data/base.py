"""The one in-memory form every dataset takes: uint8 frames, labels, patients, devices.

CIFAR-100 images are cines of one frame, so a single batching path serves both: a
random frame per item when training, the middle frame when evaluating (the paper's
echo protocol). Normalisation and augmentation are tensor ops on whole batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class DataError(ValueError):
    """Data that cannot be used; the message names the file, row or key."""


@dataclass
class ImageData:
    """Labelled images or cines held in memory.

    frames:  [N, F, C, H, W] uint8 (F = 1 for still images)
    labels:  [N] int64 class index in the dataset's own numbering
    patients: [N] int64 patient id (-1 when unknown); splits never cross a patient
    devices: [N] int64 acquisition device / site id (-1 when unknown)
    """

    frames: torch.Tensor
    labels: torch.Tensor
    patients: torch.Tensor
    devices: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.frames.dim() != 5 or self.frames.dtype != torch.uint8:
            raise DataError(
                f"frames must be [N, F, C, H, W] uint8, got {tuple(self.frames.shape)} "
                f"{self.frames.dtype}"
            )
        n = self.frames.shape[0]
        for name in ("labels", "patients", "devices"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise DataError(f"{name} must have shape ({n},), got {tuple(t.shape)}")

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def channels(self) -> int:
        return self.frames.shape[2]

    @property
    def size(self) -> int:
        return self.frames.shape[-1]

    def subset(self, index: torch.Tensor) -> ImageData:
        """Rows `index` (bool mask or int positions)."""
        return ImageData(
            self.frames[index],
            self.labels[index],
            self.patients[index],
            self.devices[index],
            self.mean,
            self.std,
            self.class_names,
        )

    def of_classes(self, classes: list[int]) -> ImageData:
        return self.subset(torch.isin(self.labels, torch.tensor(classes)))

    def counts(self, num_classes: int) -> torch.Tensor:
        """[K] images per class."""
        return torch.bincount(self.labels, minlength=num_classes)


def patient_groups(patients: torch.Tensor) -> torch.Tensor:
    """[N] group index 0..G-1 of each row's patient; rows with an unknown patient (id
    < 0) are a group each."""
    keys = patients.clone()
    unknown = keys < 0
    keys[unknown] = -1 - torch.arange(int(unknown.sum()))  # fresh negative keys
    return torch.unique(keys, return_inverse=True)[1]


def pick_frames(frames: torch.Tensor, train: bool, generator=None) -> torch.Tensor:
    """[B, F, C, H, W] -> [B, C, H, W]: a random frame per item (train) or the middle."""
    b, f = frames.shape[:2]
    if f == 1:
        return frames[:, 0]
    if train:
        idx = torch.randint(0, f, (b,), generator=generator)
    else:
        idx = torch.full((b,), f // 2, dtype=torch.long)
    return frames[torch.arange(b), idx]


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float in normalised input space."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def valid_range(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """[C] lower and upper bound of each channel in normalised input space."""
    m, s = torch.tensor(mean), torch.tensor(std)
    return (0 - m) / s, (1 - m) / s


def augment(x: torch.Tensor, pad: int, flip: bool, generator=None) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, per item. [B,C,H,W]."""
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # [B, H]
        cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # [B, W]
        bi = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def batches(
    data: ImageData,
    batch_size: int,
    *,
    train: bool,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    pad: int = 0,
    flip: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float batches (x [B, C, H, W], y [B]); shuffled when training."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if train else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        x = pick_frames(data.frames[idx], train, generator).to(
            device, non_blocking=True
        )
        x = normalize(x, data.mean, data.std)
        if train and (pad or flip):
            x = augment(x, pad, flip, generator)
        yield x, data.labels[idx].to(device, non_blocking=True)
