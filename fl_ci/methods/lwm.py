"""LwM: Learning without Memorizing (Dhar et al., CVPR 2019).

LwF-MC (fl_ci/methods/lwf.py) plus attention distillation:
    L = CE + kd_weight · KD + lwm_weight · L_AD,
    L_AD = mean_b ‖ Q*_b / ‖Q*_b‖₂ − Q_b / ‖Q_b‖₂ ‖₁,
where Q is the vectorised Grad-CAM map (Selvaraju et al. 2017) of the teacher's
top-scoring base class c_b = argmax z*(x_b), computed on the last feature map `fmap`:
Q = ReLU(Σ_k α_k A_k), α_k = mean over positions of ∂z_c / ∂A_k. The teacher's and
the student's maps are both for c_b; the student's map is built with create_graph so
that L_AD backpropagates through the map's weights α as well as through A.
Choices: Grad-CAM of the logit z (for a cosine head, η·cos), as LwM takes the class
score before softmax; the paper's β = γ = 1 are the defaults of kd_weight and
lwm_weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_ci.methods.base import Batch, SiteContext
from fl_ci.methods.lwf import LwF, ce_with_kd
from fl_ci.models import IncrementalNet, NetOutput


def grad_cam(
    fmap: Tensor, logits: Tensor, classes: Tensor, create_graph: bool = False
) -> Tensor:
    """Grad-CAM maps [B, h, w] of `classes` [B] from `fmap` [B, D', h, w].

    `logits` [B, K] must be computed from `fmap` row by row (pooling and head only,
    no batch coupling), so the gradient of their sum is each row's own gradient.
    """
    picked = logits.gather(1, classes[:, None]).sum()
    (grads,) = torch.autograd.grad(picked, fmap, create_graph=create_graph)
    alpha = grads.mean(dim=(2, 3), keepdim=True)  # [B, D', 1, 1] channel weights
    return F.relu((alpha * fmap).sum(dim=1))  # [B, h, w]


def attention_distillation(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """L_AD: mean over the batch of the L1 distance of L2-normalised maps [B, h, w]."""
    s = F.normalize(student_map.flatten(1).float(), dim=1)  # [B, h*w]
    t = F.normalize(teacher_map.detach().flatten(1).float(), dim=1)  # [B, h*w]
    return (s - t).abs().sum(dim=1).mean()


def teacher_grad_cam(
    teacher: IncrementalNet, fmap: Tensor, classes: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The teacher's Grad-CAM [B, h, w] of its top class (or `classes`) and the
    classes [B], from its detached feature map: only pooling and head are re-run."""
    with torch.enable_grad():
        leaf = fmap.detach().requires_grad_(True)  # [B, D', h, w]
        logits = teacher.head(teacher.pool(leaf).flatten(1))  # [B, K_old]
        if classes is None:
            classes = logits.detach().argmax(dim=1)  # [B] top base class
        cam = grad_cam(leaf, logits, classes)
    return cam.detach(), classes


class LwM(LwF):
    """LwF-MC + Grad-CAM attention distillation on the teacher's top base class."""

    name = "lwm"
    needs_teacher = True

    def loss(
        self,
        model: IncrementalNet,
        batch: Batch,
        out: NetOutput,
        teacher_out: NetOutput | None,
        ctx: SiteContext,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, terms = ce_with_kd(self.cfg, batch, out, teacher_out)
        gamma = self.cfg.baselines.lwm_weight
        if teacher_out is None or ctx.teacher is None or gamma == 0:
            return total, terms
        teacher_map, classes = teacher_grad_cam(ctx.teacher, teacher_out.fmap)
        student_map = grad_cam(out.fmap, out.logits, classes, create_graph=True)
        ad = attention_distillation(student_map, teacher_map)
        terms["attention"] = ad.detach()
        return total + gamma * ad, terms
