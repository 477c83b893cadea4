"""DeepInversion replay (Yin et al., CVPR 2020) as a data-free class-incremental
baseline.

Per task: invert the frozen teacher into images of every old class from random noise
(`fl_ci.synthesis.synthesize` with `synthesis.init = "random"` and no feature
matching, `synthesis.feature_weight = 0`; the other synthesis knobs shared with Class
Impression), cached in the site's store keyed by task and
teacher hash. Training mixes `baselines.synthetic_ratio` synthetic rows into each
batch with
    L = CE(z(x), y) on the real rows + kd_weight · KD_pad(z(x̂), z*(x̂)) on the synthetic,
where KD_pad is Hinton KD over ALL classes against the teacher's old-class softmax
padded with zeros for the new classes (the "KD new" term of ABD's DeepInversion
baseline), so that new-class logits are pushed down on old-class images.
Choices: per-image optimisation as in the DeepInversion paper, not ABD's generator
variant; no extra KD on the real rows.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor

from fl_ci.data.base import valid_range
from fl_ci.methods.base import Batch, SiteContext, SyntheticReplay, model_hash
from fl_ci.models import IncrementalNet, NetOutput
from fl_ci.synthesis import synthesize


def padded_kd(
    logits: Tensor, teacher_logits: Tensor, temperature: float, t_squared: bool = True
) -> Tensor:
    """T² · mean_b KL(q ‖ p): p = softmax(z/T) over all K classes (z [B, K]) and
    q = softmax(z*/T) over the K_old teacher classes (z* [B, K_old]), zero on the new
    ones. ABD writes it as soft cross-entropy; KL differs by q's entropy, a constant,
    so the two have the same gradient up to the T² factor, and a perfect match reads
    0. ABD's `loss_fn_kd` leaves T² out (`t_squared=False`, `baselines.kd_t2`): with
    it our gradient is T² times ABD's."""
    t = temperature
    k_old = teacher_logits.shape[1]
    log_p = F.log_softmax(logits.float() / t, dim=1)[:, :k_old]  # [B, K_old]
    log_q = F.log_softmax(teacher_logits.detach().float() / t, dim=1)  # [B, K_old]
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()
    return kl * t * t if t_squared else kl


class DeepInversion(SyntheticReplay):
    """Replay of teacher-inverted (random-init) images with KD, plus CE on new data."""

    name = "deepinversion"
    needs_teacher = True

    def begin_round(self, model: IncrementalNet, ctx: SiteContext) -> None:
        if ctx.teacher is None or ctx.num_old == 0:
            return
        key = f"deepinversion-task{ctx.task}-{model_hash(ctx.teacher)}"
        cached = ctx.store.get(key)
        if cached is None:
            # DeepInversion as published: from noise, and no real feature statistics
            # kept (synthesis.feature_weight is Class Impression's)
            scfg = dataclasses.replace(
                self.cfg.synthesis, init="random", feature_weight=0.0
            )
            data = ctx.data
            images, labels, _ = synthesize(
                ctx.teacher,
                list(range(ctx.num_old)),
                scfg,
                image_shape=(data.channels, data.size, data.size),
                bounds=valid_range(data.mean, data.std),
                device=ctx.device,
                seed=ctx.seed * 7919 + ctx.task * 31 + ctx.site,
                progress=ctx.progress,
            )
            cached = {"images": images.cpu(), "labels": labels.cpu()}
            ctx.store.put(key, cached)
        self.images, self.labels = cached["images"], cached["labels"]

    def extra_share(self, ctx: SiteContext) -> float:
        return self.cfg.baselines.synthetic_ratio if self.images is not None else 0.0

    def loss(
        self,
        model: IncrementalNet,
        batch: Batch,
        out: NetOutput,
        teacher_out: NetOutput | None,
        ctx: SiteContext,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        real = ~batch.extra
        ce = F.cross_entropy(out.logits[real].float(), batch.y[real])
        terms = {"ce": ce.detach()}
        bcfg = self.cfg.baselines
        if teacher_out is None or self.images is None or bcfg.kd_weight == 0:
            return ce, terms
        syn = batch.extra
        kd = padded_kd(
            out.logits[syn],
            teacher_out.logits[syn],
            bcfg.kd_temperature,
            t_squared=bcfg.kd_t2,
        )
        terms["kd"] = kd.detach()
        return ce + bcfg.kd_weight * kd, terms
