"""Losses of the incremental update (paper eqs. 4-7) and Hinton KD for the baselines.

Every function is pure except `CentroidTracker`, which holds the running centroids of
eq. (6) as tensors on the tracker itself. Teacher inputs are detached: no loss here ever
sends a gradient into the frozen model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_cross_entropy(
    logits: Tensor, labels: Tensor, class_weights: Tensor | None = None
) -> Tensor:
    """Eq. (4), L_CNCE: cross-entropy on the scaled cosine logits z = η·s(x).

    With `class_weights` [K] this is the weighted mean Σ_b w_{y_b} ℓ_b / Σ_b w_{y_b}
    (torch's convention, as upstream's weighted `CrossEntropyLoss`).
    """
    weight = None if class_weights is None else class_weights.float()
    return F.cross_entropy(logits.float(), labels, weight=weight)


def local_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    num_old: int,
    class_weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of each row within its own side of the old/new split (ABD,
    Smith et al. ICCV 2021; R-DFCIL, Gao et al. ECCV 2022): rows of a new class over
    the new classes' logits, rows of an old class over the old classes' logits. The
    mean over all rows (weighted by `class_weights` [K] as in eq. 4), so neither side
    learns that the other's rows are what tells it apart. One new class alone gives
    its rows a zero loss: the old/new boundary is left to the head (`head_align`).
    """
    logits = logits.float()
    old = labels < num_old  # [B]
    weight = (
        torch.ones(logits.shape[1], device=logits.device)
        if class_weights is None
        else class_weights.float()
    )
    total = logits.new_zeros(())
    for rows, lo, hi in ((old, 0, num_old), (~old, num_old, logits.shape[1])):
        if rows.any() and hi > lo:
            part = F.cross_entropy(
                logits[rows, lo:hi], labels[rows] - lo, reduction="none"
            )  # [b] per-row loss within its side
            total = total + (weight[labels[rows]] * part).sum()
    return total / weight[labels].sum().clamp_min(1e-12)


def logit_distillation(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """R-DFCIL's hard KD: mean |z_k(x) − z*_k(x)| over rows and the teacher's classes
    k, with the student's logits [B, K] sliced to the teacher's [B, K_old]."""
    k_old = teacher_logits.shape[1]
    return F.l1_loss(logits[:, :k_old].float(), teacher_logits.detach().float())


def balance_weights(counts: Tensor) -> Tensor:
    """Upstream's class weights for eq. (4): w_c = max_j n_j / n_c, 0 where n_c = 0."""
    counts = counts.double()
    # Absent classes get 0 rather than inf: no sample of theirs can be in a batch.
    weights = torch.where(counts > 0, counts.max() / counts.clamp_min(1), 0.0)
    return weights.float()


def margin_loss(
    scores: Tensor,
    labels: Tensor,
    new_classes: Sequence[int] | Tensor,
    margin: float,
    top_k: int = 1,
) -> Tensor:
    """Eq. (5): mean max(0, m − s_y(x) + s_k(x)) over each anchor's top-k new classes k.

    `scores` [B, K] are the unscaled cosine scores of the synthetic old-class anchors
    only. `top_k` is capped at the number of new classes. An empty batch gives a zero
    that still has a grad_fn, so callers can add it unconditionally.
    """
    new = torch.as_tensor(new_classes, dtype=torch.long, device=scores.device)
    if scores.shape[0] == 0 or new.numel() == 0:
        return scores.sum() * 0.0
    true = scores.gather(1, labels[:, None])  # [B, 1] score of the true old class
    hard = scores[:, new].topk(min(top_k, new.numel()), dim=1).values  # [B, k]
    return (margin - true + hard).clamp_min(0).mean()


CENTROID_FORMS = ("seen", "zero_init")


class CentroidTracker:
    """Running per-class centroids for eq. (6): c ← (1−ρ)·sg(c) + ρ·batch_mean.

    ρ weighs the NEW batch (upstream ρ ∈ {0.9, 0.99, 0.999}). `update` returns
    centroids whose rows for the classes in the batch carry the gradient of this
    batch's mean.
    form "seen" (ours): a class seen for the first time since `reset()` starts at its
    batch mean; a class absent from a batch keeps its old (detached) centroid; only
    classes seen in both domains enter the loss (`seen`).
    form "zero_init" (upstream): every centroid starts at zero and every class is
    updated by every batch, an absent class with batch mean 0 (so it decays by 1−ρ);
    never-seen classes stay zero rows, and `seen` is all True so every row enters
    the loss (a zero row normalises to zero: similarity 0, e^0 = 1 terms).
    """

    def __init__(self, num_classes: int, rho: float, form: str = "seen") -> None:
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho must lie in (0, 1], got {rho}")
        if form not in CENTROID_FORMS:
            raise ValueError(
                f"centroid form must be 'seen' or 'zero_init', got {form!r}"
            )
        self.num_classes = num_classes
        self.rho = rho
        self.form = form
        self.centroids: Tensor | None = None  # [K, D] detached running centroids
        self.seen: Tensor | None = None  # [K] bool, class seen since the last reset

    def reset(self) -> None:
        """Forget all centroids (upstream resets at the start of every epoch)."""
        self.centroids = None
        self.seen = None

    def update(self, vectors: Tensor, labels: Tensor) -> Tensor:
        """Fold in a batch of vectors [B, D] grouped by `labels` [B]; returns [K, D]."""
        k, d = self.num_classes, vectors.shape[1]
        vectors = vectors.float()
        if self.centroids is None or self.seen is None:
            self.centroids = vectors.new_zeros(k, d)
            self.seen = torch.zeros(k, dtype=torch.bool, device=vectors.device)
        sums = vectors.new_zeros(k, d).index_add(0, labels, vectors)  # [K, D]
        counts = torch.bincount(labels, minlength=k).to(vectors.dtype)  # [K]
        present = counts > 0
        batch_mean = sums / counts.clamp_min(1)[:, None]  # [K, D]
        old = self.centroids.detach()
        if self.form == "zero_init":
            new = (1 - self.rho) * old + self.rho * batch_mean  # [K, D], absent: 0 mean
            self.centroids = new.detach()
            self.seen = torch.ones_like(self.seen)
            return new
        blended = torch.where(
            self.seen[:, None], (1 - self.rho) * old + self.rho * batch_mean, batch_mean
        )
        new = torch.where(present[:, None], blended, old)  # [K, D]
        self.centroids = new.detach()
        self.seen = self.seen | present
        return new


def contrastive_loss(
    target_centroids: Tensor,
    source_centroids: Tensor,
    present: Tensor,
    tau: float = 1.0,
    form: str = "pooled",
    norm_eps: float | None = None,
) -> Tensor:
    """Eq. (6), intra-domain contrastive loss of target and source centroids [K, D].

    Only classes with `present` [K] (bool; seen in both domains) take part.
    pooled (upstream): −log(Σ_k e^{⟨ĉT_k, ĉS_k⟩/τ} / Σ_{j,k} e^{⟨ĉT_j, ĉS_k⟩/τ}).
    per_class (paper's InfoNCE):
        mean_k −log(e^{⟨ĉT_k, ĉS_k⟩/τ} / Σ_j e^{⟨ĉT_k, ĉS_j⟩/τ}).
    ĉ = c / max(‖c‖, 1e-12) (F.normalize), or with `norm_eps` upstream's
    c / (‖c‖ + norm_eps) (upstream 1e-10), under which a decayed centroid shrinks
    towards a zero row instead of keeping unit length.
    """
    if form not in ("pooled", "per_class"):
        raise ValueError(
            f"contrastive form must be 'pooled' or 'per_class', got {form!r}"
        )
    idx = present.nonzero().squeeze(1)
    if idx.numel() == 0:
        return (target_centroids.sum() + source_centroids.sum()) * 0.0
    t = _unit_rows(target_centroids[idx].float(), norm_eps)  # [P, D] ĉ^T
    s = _unit_rows(source_centroids[idx].float(), norm_eps)  # [P, D] ĉ^S
    sim = t @ s.T / tau  # [P, P] sim[j, k] = ⟨ĉT_j, ĉS_k⟩ / τ
    if form == "pooled":
        return sim.flatten().logsumexp(0) - sim.diagonal().logsumexp(0)
    return F.cross_entropy(sim, torch.arange(idx.numel(), device=sim.device))


def _unit_rows(x: Tensor, eps: float | None) -> Tensor:
    if eps is None:
        return F.normalize(x, dim=1)
    return x / (x.norm(dim=1, keepdim=True) + eps)


def feature_distillation(features: Tensor, teacher_features: Tensor) -> Tensor:
    """Eq. (7)'s L_dist: mean over the batch of 1 − cos(φ(x), φ*(x))."""
    cos = F.cosine_similarity(
        features.float(), teacher_features.detach().float(), dim=1
    )
    return (1 - cos).mean()


def distill_weight(n_old: int, n_new: int, base: float = 5.0) -> float:
    """Upstream's α_dist schedule for eq. (7): base · sqrt(n_old / n_new)."""
    if n_old < 0 or n_new <= 0:
        raise ValueError(f"need n_old >= 0 and n_new > 0, got {n_old} and {n_new}")
    return base * math.sqrt(n_old / n_new)


def kd_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    t_squared: bool = True,
) -> Tensor:
    """Hinton KD as in LwF: T² · mean_b KL(softmax(z*/T) ‖ softmax(z/T)).

    Both [B, K_old]: slice the student's logits to the teacher's classes first. KL
    differs from LwF's soft cross-entropy only by the teacher's entropy, a constant, so
    its gradient is that of the soft cross-entropy, and a perfect match reads 0.
    `t_squared=False` drops Hinton's T² factor, as ABD's `loss_fn_kd` does (its
    `* T**2` is commented out): with T² our gradient is T² times ABD's.
    """
    if logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; slice the student to the teacher's classes"
        )
    t = temperature
    log_p = F.log_softmax(logits.float() / t, dim=1)
    log_q = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    return kl * t * t if t_squared else kl
