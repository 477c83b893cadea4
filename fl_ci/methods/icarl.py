"""iCaRL (Rebuffi et al., CVPR 2017), the "iCaRL-CNN" variant, and its exemplar memory.

Each site keeps exemplars of the classes it has received, in its own store only, under
a fixed budget of `baselines.memory` rows in total: m = memory // (classes the site
holds) per class. At `end_task` the old classes' sets are cut to their first m rows
(herding order makes every prefix a good set) and m exemplars of each class of the
task's data are chosen by herding on the L2-normalised features of the trained local
model (middle frame of a cine, eval mode). While training a later task the exemplars
are replayed as extra rows of every batch, in proportion to their number (as if
appended to the new data), with the trainer's augmentation.
Loss: cross-entropy over all classes + Hinton KD of the teacher's old-class logits on
every row (LwF-MC, fl_ci/methods/lwf.py). iCaRL's own classifier is the nearest mean
of exemplars; here the server evaluates the global model, so predictions come from the
network's head: the "iCaRL-CNN" variant of the paper. Choice: softmax CE + KD instead
of iCaRL's sigmoid BCE, as for LwF-MC. In a federation the exemplar budget is per site
and herding uses the site's model after its last local round of the task.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_ci.config import Config
from fl_ci.data.base import (
    ImageData,
    augment,
    batches,
    normalize,
    pick_frames,
)
from fl_ci.data.registry import augmentation
from fl_ci.methods.base import Batch, Method, SiteContext
from fl_ci.methods.lwf import ce_with_kd
from fl_ci.models import IncrementalNet, NetOutput


def herding(features: Tensor, m: int) -> Tensor:
    """iCaRL's herding: m row indices [min(m, N)] of `features` [N, D], in the order
    chosen, each step taking the row that brings the mean of the chosen L2-normalised
    features closest to the mean of all of them."""
    feats = F.normalize(features.float(), dim=1)  # [N, D]
    target = feats.mean(dim=0)  # [D]
    chosen: list[int] = []
    running = torch.zeros_like(target)  # [D] sum of chosen features
    taken = torch.zeros(len(feats), dtype=torch.bool, device=feats.device)
    for k in range(1, min(m, len(feats)) + 1):
        dist = (target - (running + feats) / k).norm(dim=1)  # [N]
        dist[taken] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        taken[i] = True
        running += feats[i]
    return torch.tensor(chosen, dtype=torch.long)


@torch.no_grad()
def extract_features(
    model: IncrementalNet, data: ImageData, device: torch.device, batch_size: int
) -> Tensor:
    """phi(x) [N, D] of every row of `data` (middle frame, eval mode), on the CPU."""
    was_training = model.training
    model.eval()
    feats = [
        model.features(x).float().cpu()
        for x, _ in batches(data, batch_size, train=False, device=device)
    ]
    model.train(was_training)
    return torch.cat(feats) if feats else torch.zeros(0, model.feature_dim)


class ExemplarReplay(Method):
    """Herding-selected exemplars under a fixed budget, replayed as extra rows.

    The store holds `frames` [N, F, C, H, W] uint8, `labels` [N] and `rank` [N] (the
    position in its class's herding order); it outlives rounds and restarts.
    """

    name = "exemplar-replay"
    data_free = False
    needs_teacher = True

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.frames: Tensor | None = None  # [N, F, C, H, W] uint8 old-class exemplars
        self.labels: Tensor | None = None  # [N]
        self.share = 0.0
        self.mean: tuple[float, ...] = ()
        self.std: tuple[float, ...] = ()
        self.pad = 0
        self.flip = False

    @property
    def key(self) -> str:
        return f"{self.name}-exemplars"

    def begin_round(self, model: IncrementalNet, ctx: SiteContext) -> None:
        memory = ctx.store.get(self.key)
        if memory is None or ctx.num_old == 0:
            return
        old = memory["labels"] < ctx.num_old  # [N] rows of classes old at this task
        if not bool(old.any()):
            return
        self.frames, self.labels = memory["frames"][old], memory["labels"][old]
        self.share = len(self.labels) / (len(self.labels) + len(ctx.data))
        self.mean, self.std = ctx.data.mean, ctx.data.std
        # the trainer's augmentation of the real rows (fl_ci/trainer.py)
        self.pad, self.flip = augmentation(
            self.cfg.dataset, ctx.data.size, self.cfg.augment
        )

    def extra_share(self, ctx: SiteContext) -> float:
        return self.share

    def extra_batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self.labels), (n,), generator=generator)
        x = pick_frames(self.frames[idx], train=True, generator=generator)
        x = normalize(x, self.mean, self.std)  # [n, C, H, W]
        if self.pad or self.flip:
            x = augment(x, self.pad, self.flip, generator)
        return x, self.labels[idx]

    def end_task(self, model: IncrementalNet, ctx: SiteContext) -> dict[str, Any]:
        """Cut the old sets to m rows each and herd m exemplars of each fresh class."""
        budget = self.cfg.baselines.memory
        data = ctx.data
        memory = ctx.store.get(self.key) or {
            "frames": data.frames[:0],
            "labels": data.labels[:0],
            "rank": data.labels[:0],
        }
        fresh = data.labels.unique()  # classes of this task's data at this site
        held = torch.cat([memory["labels"].unique(), fresh]).unique()
        m = budget // max(len(held), 1)  # per-class quota
        keep = ~torch.isin(memory["labels"], fresh) & (memory["rank"] < m)
        frames, labels, rank = (memory[k][keep] for k in ("frames", "labels", "rank"))
        parts = [(frames, labels, rank)]
        for c in fresh.tolist():
            rows = data.subset(data.labels == c)
            feats = extract_features(model, rows, ctx.device, self.cfg.eval_batch_size)
            order = herding(feats, m)  # [<= m]
            n = len(order)
            parts.append((rows.frames[order], torch.full((n,), c), torch.arange(n)))
        new = {
            "frames": torch.cat([p[0] for p in parts]),
            "labels": torch.cat([p[1] for p in parts]).long(),
            "rank": torch.cat([p[2] for p in parts]).long(),
        }
        if len(new["labels"]) > budget:  # cannot happen: m · |held| <= budget
            raise RuntimeError(
                f"{self.name}: {len(new['labels'])} exemplars exceed the budget "
                f"baselines.memory = {budget}"
            )
        ctx.store.put(self.key, new)
        return {"exemplars": len(new["labels"]), "exemplars_per_class": m}


class ICaRL(ExemplarReplay):
    """iCaRL-CNN: herding exemplars replayed with CE + KD (LwF-MC on the union)."""

    name = "icarl"

    def loss(
        self,
        model: IncrementalNet,
        batch: Batch,
        out: NetOutput,
        teacher_out: NetOutput | None,
        ctx: SiteContext,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return ce_with_kd(self.cfg, batch, out, teacher_out)
