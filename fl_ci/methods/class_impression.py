"""Class Impression (Ayromlou et al., MICCAI 2022): data-free incremental learning.

Per task: synthesize impressions of every old class from the frozen teacher, started
from the class-mean images (fl_ci/synthesis), then train on real new-class data mixed
with impressions (`ci.synthetic_ratio` of each batch) with
    L = L_CNCE + α_dist L_dist + α_margin L_margin + α_contras L_contras   (eq. 7).
Choices where the paper is vague follow ../shared/docs/class-impression.md: imprinted
new-class rows, old rows frozen, α_dist = 5 sqrt(n_old / n_new) unless set, CE class
weights max_j n_j / n_c, centroids of unscaled cosine scores.
Ablations are switches: `ci.margin_weight = 0`, `ci.contrastive_weight = 0`,
`ci.distill_weight = 0`, `synthesis.init = "random"`, `head = "linear"`.
Levers against forgetting, off by default except feature matching (docs/results.md,
"Keeping the old views"): `ci.real_ce = "local"` (each row's cross-entropy within its
own side of the old/new split, ABD and R-DFCIL), `ci.head_align_weight` (a
class-balanced cross-entropy that trains only the head on the batch's detached
features), `ci.logit_distill_weight` (R-DFCIL's L1 on the old-class logits of
impressions),
`ci.distill_rows = "synthetic"` (eq. 7 on the impressions only),
`ci.augment_impressions` (the real rows' crop and flip on impressions too);
from the real feature statistics a site keeps at the end of each task
(fl_ci/prototypes.py): `ci.prototype_weight` (feature replay of the old classes on
the head, PASS), `synthesis.feature_weight` (impressions' mean features pulled to
the real ones, CwD; on at 10, the one lever that won on validation) and
`ci.calibration_steps` (the new head rows alone retrained on pseudo-features of every
class, SLCA).
Upstream's own forms, where ours differ, are switches too (docs/results.md, "Fidelity
to upstream"): `ci.margin_anchors = "old_rows"` (margin anchors = every old-label row,
not only the impressions), `ci.centroid_form = "zero_init"` (zero-started centroids
that decay when a class is absent, every class row in eq. 6); upstream's contrastive
weight is 1 (`ci.contrastive_weight`, ours 0.1).
The contrastive target (`ci.target`) defaults to the site's own task images, labels
unused; `unlabelled` takes the site's unlabelled exams of every view it performs
(`data.unlabelled_fraction`), `test` the paper's transductive use of test images.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from fl_ci import losses
from fl_ci.data.base import batches, valid_range
from fl_ci.methods.base import Batch, SiteContext, SyntheticReplay, model_hash
from fl_ci.models import IncrementalNet, NetOutput
from fl_ci.prototypes import FeatureStats, calibrate_head, sample_features
from fl_ci.synthesis import ClassMeans, synthesize

log = logging.getLogger("fl_ci")

FEATURE_STATS_KEY = "feature-stats"  # the site's kept FeatureStats, every task so far


def margin_anchors(batch: Batch, num_old: int, mode: str) -> torch.Tensor:
    """[B] bool rows the margin loss (eq. 5) takes as anchors: the synthetic rows
    (`synthetic`, the method doc), or every row with an old-class label (`old_rows`,
    upstream's `targets.lt(num_old_classes)`), which differs when a site also holds
    real images of an old class."""
    if mode == "synthetic":
        return batch.extra
    if mode == "old_rows":
        return batch.y < num_old
    raise ValueError(
        f"ci.margin_anchors must be 'synthetic' or 'old_rows', got {mode!r}"
    )


def keeps_feature_stats(cfg) -> bool:
    """Whether sites keep real feature statistics (feature replay or matching)."""
    return (
        cfg.ci.prototype_weight > 0
        or cfg.synthesis.feature_weight > 0
        or cfg.ci.calibration_steps > 0
    )


def kept_feature_stats(ctx: SiteContext) -> FeatureStats | None:
    """The feature statistics this site kept at earlier tasks, if any."""
    kept = ctx.store.get(FEATURE_STATS_KEY)
    return FeatureStats.from_tensors(kept) if kept else None


class ClassImpression(SyntheticReplay):
    name = "class_impression"
    data_free = True
    needs_teacher = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.source: losses.CentroidTracker | None = None
        self.target: losses.CentroidTracker | None = None
        self.class_weights: torch.Tensor | None = None
        self.unlabelled_iter = None
        # feature replay (`ci.prototype_weight`): old classes' feature mean/std
        self.prototypes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.prototype_generator: torch.Generator | None = None

    # ----- stage 1: impressions ----------------------------------------------------
    def begin_round(self, model: IncrementalNet, ctx: SiteContext) -> None:
        if ctx.teacher is None or ctx.num_old == 0:
            return
        key = f"impressions-task{ctx.task}-{model_hash(ctx.teacher)}"
        cached = ctx.store.get(key)
        if cached is None:
            cached = self._synthesize(ctx)
            ctx.store.put(key, cached)
        self.images, self.labels = cached["images"], cached["labels"]
        counts = torch.bincount(ctx.data.labels, minlength=ctx.num_classes)
        counts += torch.bincount(self.labels, minlength=ctx.num_classes)
        self.class_weights = losses.balance_weights(counts)
        if self.cfg.ci.prototype_weight > 0:
            self._load_prototypes(ctx)

    def _load_prototypes(self, ctx: SiteContext) -> None:
        """The old classes' feature statistics this site kept at earlier tasks."""
        stats = kept_feature_stats(ctx)
        have = [c for c in (stats.available() if stats else []) if c < ctx.num_old]
        missing = sorted(set(range(ctx.num_old)) - set(have))
        if missing:
            log.warning(
                "site %d, task %d: no feature statistics of classes %s; feature "
                "replay leaves them out",
                ctx.site,
                ctx.task,
                missing,
            )
        if not have:
            return
        mean, std = stats.mean_std(have)
        self.prototypes = (mean, std, torch.tensor(have, dtype=torch.long))
        self.prototype_generator = torch.Generator().manual_seed(
            ctx.seed * 7919 + ctx.task * 31 + ctx.round * 101 + ctx.site + 17
        )

    def _synthesize(self, ctx: SiteContext) -> dict[str, torch.Tensor]:
        """Impressions of every old class. A class no site shared a mean of (each
        held fewer than `synthesis.min_mean_count` images) starts from noise, as in
        the random-initialisation ablation, and the log names it."""
        scfg = self.cfg.synthesis
        data = ctx.data
        means = ctx.class_means if scfg.init == "mean" else None
        if scfg.init == "mean" and means is None:
            raise ValueError(
                f"task {ctx.task}: synthesis.init = 'mean' but no class means of the "
                f"{ctx.num_old} old classes were given"
            )
        old = list(range(ctx.num_old))
        groups = [(old, scfg, means)]
        if isinstance(means, ClassMeans):
            have = set(means.available())
            missing = [c for c in old if c not in have]
            if missing:
                log.warning(
                    "site %d, task %d: no site shared a mean of classes %s; their "
                    "impressions start from noise",
                    ctx.site,
                    ctx.task,
                    missing,
                )
                groups = [
                    ([c for c in old if c in have], scfg, means),
                    (missing, dataclasses.replace(scfg, init="random"), None),
                ]
        stats = kept_feature_stats(ctx) if scfg.feature_weight > 0 else None
        seed = ctx.seed * 7919 + ctx.task * 31 + ctx.site
        parts = []
        for i, (classes, group_cfg, group_means) in enumerate(groups):
            if not classes:
                continue
            feature_means = None
            if group_cfg.feature_weight > 0:
                have = set(stats.available()) if stats else set()
                if set(classes) <= have:
                    feature_means = stats.mean_std(classes)[0]
                else:
                    log.warning(
                        "site %d, task %d: no feature statistics of classes %s; "
                        "their impressions are not matched to real features",
                        ctx.site,
                        ctx.task,
                        sorted(set(classes) - have),
                    )
                    group_cfg = dataclasses.replace(group_cfg, feature_weight=0.0)
            parts.append(
                synthesize(
                    ctx.teacher,
                    classes,
                    group_cfg,
                    means=group_means,
                    image_shape=(data.channels, data.size, data.size),
                    bounds=valid_range(data.mean, data.std),
                    device=ctx.device,
                    seed=seed + i,
                    progress=ctx.progress,
                    feature_means=feature_means,
                )
            )
        images = torch.cat([p.images for p in parts])
        labels = torch.cat([p.labels for p in parts])
        return {"images": images.cpu(), "labels": labels.cpu()}

    # ----- stage 2: incremental update ---------------------------------------------
    def prepare_model(self, model: IncrementalNet, ctx: SiteContext) -> None:
        if ctx.teacher is None:
            return
        if ctx.round == 0 and self.cfg.ci.imprint and len(ctx.data):
            self._imprint(model, ctx)
        model.freeze_old_classes(self.cfg.ci.freeze_old)

    @torch.no_grad()
    def _imprint(self, model: IncrementalNet, ctx: SiteContext) -> None:
        """w_c = normalise(mean_x φ̄*(x)) · mean_j ‖w_j^old‖ for each new class c."""
        head = model.head
        old_norm = head.weight[: ctx.num_old].norm(dim=1).mean()
        feats, labels = [], []
        ctx.teacher.to(ctx.device).eval()
        for x, y in batches(ctx.data, 256, train=False, device=ctx.device):
            feats.append(F.normalize(ctx.teacher.features(x).float(), dim=1).cpu())
            labels.append(y.cpu())
        feats_t, labels_t = torch.cat(feats), torch.cat(labels)
        rows = head.new_weight.detach().clone()  # [n_new, D]
        for i, c in enumerate(ctx.new_classes):
            mask = labels_t == c
            if mask.any():
                rows[i] = F.normalize(feats_t[mask].mean(0), dim=0) * old_norm
        head.new_weight.copy_(rows.to(head.new_weight.device))

    def extra_share(self, ctx: SiteContext) -> float:
        return self.cfg.ci.synthetic_ratio if self.images is not None else 0.0

    def augments_extra(self) -> bool:
        return self.cfg.ci.augment_impressions

    def begin_epoch(self, ctx: SiteContext) -> None:
        # upstream resets the running centroids every epoch
        ci = self.cfg.ci
        self.source = losses.CentroidTracker(ctx.num_classes, ci.rho, ci.centroid_form)
        self.target = losses.CentroidTracker(ctx.num_classes, ci.rho, ci.centroid_form)
        self.unlabelled_iter = None

    def loss(
        self,
        model: IncrementalNet,
        batch: Batch,
        out: NetOutput,
        teacher_out: NetOutput | None,
        ctx: SiteContext,
    ):
        ci = self.cfg.ci
        weights = None
        if ci.class_weights and self.class_weights is not None:
            weights = self.class_weights.to(out.logits.device)
        if ci.real_ce == "local" and ctx.num_old > 0:
            ce = losses.local_cross_entropy(out.logits, batch.y, ctx.num_old, weights)
        else:
            ce = losses.cosine_cross_entropy(out.logits, batch.y, weights)
        terms = {"ce": ce.detach()}
        total = ce
        if teacher_out is None or ctx.num_old == 0:
            return total, terms
        if ci.head_align_weight > 0:
            # the head alone learns the old/new boundary on real and synthetic rows
            _, head_logits = model.head.forward_scores(out.features.detach())
            align = losses.cosine_cross_entropy(head_logits, batch.y, weights)
            total = total + ci.head_align_weight * align
            terms["head_align"] = align.detach()
        if ci.logit_distill_weight > 0 and batch.extra.any():
            hkd = losses.logit_distillation(
                out.logits[batch.extra], teacher_out.logits[batch.extra]
            )
            total = total + ci.logit_distill_weight * hkd
            terms["logit_distill"] = hkd.detach()
        alpha = ci.distill_weight
        if alpha < 0:
            alpha = losses.distill_weight(ctx.num_old, len(ctx.new_classes))
        rows = batch.extra if ci.distill_rows == "synthetic" else slice(None)
        if alpha > 0 and (ci.distill_rows == "all" or batch.extra.any()):
            dist = losses.feature_distillation(
                out.features[rows], teacher_out.features[rows]
            )
            total = total + alpha * dist
            terms["distill"] = dist.detach()
        if ci.margin_weight > 0:
            anchors = margin_anchors(batch, ctx.num_old, ci.margin_anchors)
            margin = losses.margin_loss(
                out.scores[anchors].float(),
                batch.y[anchors],
                ctx.new_classes,
                ci.margin,
                ci.top_k,
            )
            total = total + ci.margin_weight * margin
            terms["margin"] = margin.detach()
        if ci.prototype_weight > 0 and self.prototypes is not None:
            mean, std, classes = self.prototypes
            feats, labels = sample_features(
                mean, std, classes, len(batch.y), self.prototype_generator
            )  # [B, D] pseudo-features of old classes
            _, logits = model.head.forward_scores(feats.to(out.features.device))
            proto = F.cross_entropy(logits.float(), labels.to(logits.device))
            total = total + ci.prototype_weight * proto
            terms["prototype"] = proto.detach()
        if ci.contrastive_weight > 0:
            contras = self._contrastive(model, batch, out, ctx)
            total = total + ci.contrastive_weight * contras
            terms["contrastive"] = contras.detach()
        return total, terms

    def end_task(self, model: IncrementalNet, ctx: SiteContext) -> dict:
        """Keep the feature statistics of this task's real images (feature replay)."""
        if not keeps_feature_stats(self.cfg) or not len(ctx.data):
            return {}
        stats = FeatureStats.from_model(
            model, ctx.data, ctx.new_classes, ctx.num_classes, ctx.device
        )
        kept = kept_feature_stats(ctx)
        if kept is not None:
            stats = kept.merge(stats)
        metrics = {}
        ci = self.cfg.ci
        if ci.calibration_steps > 0 and ctx.teacher is not None:
            classes = [c for c in stats.available() if c < ctx.num_classes]
            mean, std = stats.mean_std(classes)
            generator = torch.Generator().manual_seed(
                ctx.seed * 7919 + ctx.task * 31 + ctx.site + 29
            )
            metrics["calibration_loss"] = calibrate_head(
                model.head,
                mean,
                std,
                torch.tensor(classes, dtype=torch.long),
                steps=ci.calibration_steps,
                lr=ci.calibration_lr,
                generator=generator,
            )
        ctx.store.put(FEATURE_STATS_KEY, stats.to_tensors())
        return metrics

    def _contrastive(self, model, batch: Batch, out: NetOutput, ctx: SiteContext):
        """Eq. (6): source = labelled batch by true label; target = unlabelled batch by
        the model's pseudo-label. With `ci.target = "task_data"` the target rows are
        the batch's own real images, so no extra forward pass is needed."""
        source = self.source.update(out.scores.float(), batch.y)
        if self.cfg.ci.target != "task_data" and ctx.unlabelled is not None:
            x = self._next_unlabelled(ctx)
            t_scores = model.forward_all(x).scores.float()
        else:
            t_scores = out.scores[~batch.extra].float()
        pseudo = t_scores.detach().argmax(1)
        target = self.target.update(t_scores, pseudo)
        present = self.source.seen & self.target.seen
        ci = self.cfg.ci
        # upstream normalises c / (‖c‖ + 1e-10), so a decayed centroid fades to zero
        eps = 1e-10 if ci.centroid_form == "zero_init" else None
        return losses.contrastive_loss(
            target, source, present, ci.tau, ci.contrastive_form, norm_eps=eps
        )

    def _next_unlabelled(self, ctx: SiteContext) -> torch.Tensor:
        if self.unlabelled_iter is None:
            self.unlabelled_iter = iter(
                batches(
                    ctx.unlabelled, self.cfg.batch_size, train=True, device=ctx.device
                )
            )
        try:
            x, _ = next(self.unlabelled_iter)
        except StopIteration:
            self.unlabelled_iter = None
            return self._next_unlabelled(ctx)
        return x
