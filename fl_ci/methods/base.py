"""The one interface every incremental-learning method plugs into.

The trainer (fl_ci/trainer.py) owns the loop: optimiser, epochs, device, mixed
precision. A method only overrides hooks:

| hook              | default                      | overridden by                       |
|-------------------|------------------------------|-------------------------------------|
| `train_classes`   | the rows of this task        | joint (every class seen so far)     |
| `begin_round`     | nothing                      | synthesis (impressions), exemplars  |
| `prepare_model`   | nothing                      | head imprinting, freezing old rows  |
| `extra_batch`     | none                         | impressions, exemplars              |
| `augments_extra`  | False                        | CI (`ci.augment_impressions`)       |
| `replay_size`     | 0                            | SyntheticReplay: CI, DeepInversion  |
| `loss`            | cross-entropy                | every method adds its terms         |
| `end_task`        | nothing                      | exemplar herding                    |

A method object lives for one round at one site (a Flower client process may be new
for every message); what must outlive a round goes through `SiteContext.store`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fl_ci.config import Config
from fl_ci.data.base import ImageData
from fl_ci.models import IncrementalNet, NetOutput
from fl_ci.results import atomic_torch_save


class SiteStore:
    """A site's own storage between rounds: a folder, or memory when none is given.

    Values are dicts of tensors, written atomically so a crash leaves the old value.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else None
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.root is None:
            return self._memory.get(key)
        path = self.root / f"{key}.pt"
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: recompute rather than fail
            return None

    def put(self, key: str, value: dict[str, torch.Tensor]) -> None:
        if self.root is None:
            self._memory[key] = value
            return
        atomic_torch_save(value, self.root / f"{key}.pt")

    def prune(self, prefix: str, keep: str) -> None:
        """Forget every value whose key starts with `prefix`, except `keep`."""
        for key in [k for k in self._memory if k.startswith(prefix) and k != keep]:
            del self._memory[key]
        if self.root is not None:
            for path in self.root.glob(f"{prefix}*.pt"):
                if path.stem != keep:
                    path.unlink(missing_ok=True)


def model_hash(model: torch.nn.Module) -> str:
    """Short content hash of a state dict: keys cached impressions to their teacher."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        buf = io.BytesIO()
        torch.save(value.detach().cpu().contiguous(), buf)
        h.update(buf.getvalue())
    return h.hexdigest()[:16]


@dataclass
class SiteContext:
    """Everything a method may use at one site for one round of one task."""

    cfg: Config
    task: int
    round: int  # round within the task, from 0
    site: int  # the site's number (0 in a centralized run)
    new_classes: list[int]  # model labels new in this task
    num_old: int  # classes known before this task (labels 0..num_old-1)
    data: ImageData  # this site's real training data (classes from train_classes)
    teacher: IncrementalNet | None  # frozen end-of-previous-task model
    # global class means of the old classes (a ClassMeans, or a [num_old, C, H, W]
    # tensor of complete means)
    class_means: Any
    unlabelled: ImageData | None  # the site's unlabelled data (contrastive target)
    device: torch.device
    store: SiteStore = field(default_factory=SiteStore)
    seed: int = 0
    progress: bool = True
    log: list[str] = field(default_factory=list)  # problems to report to the server

    @property
    def num_classes(self) -> int:
        return self.num_old + len(self.new_classes)


@dataclass
class Batch:
    """One training batch: real rows first, then any extra (synthetic/exemplar) rows."""

    x: torch.Tensor  # [B, C, H, W] normalised
    y: torch.Tensor  # [B] model labels
    extra: torch.Tensor  # [B] bool, True for rows from `extra_batch`


class Method:
    """Base method: plain cross-entropy on the task's data (fine-tuning)."""

    name: ClassVar[str] = "base"
    data_free: ClassVar[bool] = True  # keeps no real data of old classes
    needs_teacher: ClassVar[bool] = False  # trainer computes teacher outputs per batch

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def train_classes(self, ctx: SiteContext) -> list[int] | None:
        """Classes of real data to train on, from every task so far (joint); None:
        only the rows the site receives at this task."""
        return None

    def begin_round(self, model: IncrementalNet, ctx: SiteContext) -> None:
        """Called at the start of every round (cache what must not be recomputed)."""

    def prepare_model(self, model: IncrementalNet, ctx: SiteContext) -> None:
        """Adjust the received model before local training (e.g. freeze rows)."""

    def begin_epoch(self, ctx: SiteContext) -> None:
        """Called before every local epoch (e.g. to reset running centroids)."""

    def extra_share(self, ctx: SiteContext) -> float:
        """Share of each batch taken from `extra_batch` (0: real data only)."""
        return 0.0

    def extra_batch(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, ...]:
        """`n` extra rows (x [n, C, H, W], y [n]); only called if extra_share > 0."""
        raise NotImplementedError

    def augments_extra(self) -> bool:
        """Whether the trainer gives `extra_batch` rows the real rows' augmentation."""
        return False

    def replay_size(self) -> int:
        """Distinct synthetic rows `extra_batch` draws from (0: none, or unbounded). A
        site without new data rehearses on them alone (`federation.rehearse`)."""
        return 0

    def loss(
        self,
        model: IncrementalNet,
        batch: Batch,
        out: NetOutput,
        teacher_out: NetOutput | None,
        ctx: SiteContext,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its named terms (detached scalars for logging)."""
        ce = F.cross_entropy(out.logits.float(), batch.y)
        return ce, {"ce": ce.detach()}

    def end_task(self, model: IncrementalNet, ctx: SiteContext) -> dict[str, Any]:
        """After the site's last round of a task; returns metrics to report."""
        return {}


class SyntheticReplay(Method):
    """A method that replays a fixed set of synthetic old-class images, `images`
    [N, C, H, W] with `labels` [N], made in `begin_round` (Class Impression,
    DeepInversion). A site without new data can rehearse on them."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.images: torch.Tensor | None = None  # [N, C, H, W] synthetic images
        self.labels: torch.Tensor | None = None  # [N] old-class labels

    def replay_size(self) -> int:
        return len(self.labels) if self.labels is not None else 0

    def extra_batch(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.labels), (n,), generator=generator)
        return self.images[idx], self.labels[idx]
