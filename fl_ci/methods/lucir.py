"""LUCIR (Hou et al., CVPR 2019): Learning a Unified Classifier Incrementally via
Rebalancing.

With a cosine head (logits η·cos, one learnable η) and exemplars as in iCaRL
(herding, fixed total budget, fl_ci/methods/icarl.py):
    L = CE(η·s(x), y)                                   all rows (new data + exemplars)
        + λ · (1 − cos(φ(x), φ*(x)))                    less-forget, all rows,
                                                        λ = λ_base · sqrt(n_old / n_new)
        + w_mr · mean max(0, m − s_y(x) + s_k(x))       margin ranking on exemplars,
                                                        k over the top-K new classes.
At the task's first round the new-class rows of the head are imprinted from the
teacher's normalised mean features (scaled to the mean norm of the old rows) and the
old rows are frozen, as LUCIR's code does (lr 0 for the old embeddings).
Defaults are the paper's CIFAR-100 ones: λ_base 5, m 0.5, K 2.
Simplification: no class-balanced fine-tuning stage (LUCIR's optional CBF).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_ci import losses
from fl_ci.config import Config, ConfigError
from fl_ci.data.base import ImageData, batches
from fl_ci.methods.base import Batch, SiteContext
from fl_ci.methods.icarl import ExemplarReplay
from fl_ci.models import IncrementalNet, NetOutput


@torch.no_grad()
def imprint_new_rows(
    model: IncrementalNet,
    teacher: IncrementalNet,
    data: ImageData,
    new_classes: list[int],
    device: torch.device,
    batch_size: int,
) -> None:
    """w_c = normalise(mean_x normalise(φ*(x))) · mean_j ‖w_j^old‖ for each new class
    c present in `data`; other new rows keep their initialisation."""
    head = model.head
    num_old = head.num_old
    old_norm = head.weight[:num_old].norm(dim=1).mean()
    was_training = teacher.training
    teacher.to(device).eval()
    feats, labels = [], []
    for x, y in batches(data, batch_size, train=False, device=device):
        feats.append(F.normalize(teacher.features(x).float(), dim=1).cpu())
        labels.append(y.cpu())
    teacher.train(was_training)
    feats_t, labels_t = torch.cat(feats), torch.cat(labels)  # [N, D], [N]
    rows = head.new_weight.detach().clone()  # [n_new, D]
    for i, c in enumerate(new_classes):
        mask = labels_t == c
        if mask.any():
            mean = F.normalize(feats_t[mask].mean(dim=0), dim=0)  # [D]
            rows[i] = (mean * old_norm).to(rows)
    head.new_weight.copy_(rows)


class LUCIR(ExemplarReplay):
    """Cosine head, less-forget feature distillation, margin ranking on exemplars."""

    name = "lucir"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        if cfg.head != "cosine":
            raise ConfigError(
                f"method 'lucir' needs config key 'head' = 'cosine', got {cfg.head!r}"
            )

    def prepare_model(self, model: IncrementalNet, ctx: SiteContext) -> None:
        if ctx.teacher is None:
            return
        if ctx.round == 0:
            imprint_new_rows(
                model,
                ctx.teacher,
                ctx.data,
                ctx.new_classes,
                ctx.device,
                self.cfg.eval_batch_size,
            )
        model.freeze_old_classes(True)

    def loss(
        self,
        model: IncrementalNet,
        batch: Batch,
        out: NetOutput,
        teacher_out: NetOutput | None,
        ctx: SiteContext,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(out.logits.float(), batch.y)
        terms = {"ce": ce.detach()}
        if teacher_out is None or ctx.num_old == 0:
            return ce, terms
        bcfg = self.cfg.baselines
        lam = losses.distill_weight(
            ctx.num_old, len(ctx.new_classes), base=bcfg.lucir_lambda
        )
        dist = losses.feature_distillation(out.features, teacher_out.features)
        anchors = batch.extra  # [B] exemplar rows: old classes
        margin = losses.margin_loss(
            out.scores[anchors].float(),
            batch.y[anchors],
            ctx.new_classes,
            bcfg.lucir_margin,
            bcfg.lucir_k,
        )
        terms.update(distill=dist.detach(), margin=margin.detach())
        return ce + lam * dist + bcfg.lucir_margin_weight * margin, terms
