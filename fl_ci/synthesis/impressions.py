"""Class Impression synthesis: DeepInversion-style images of the old classes.

With the teacher f* frozen in eval mode, optimise images X for balanced old-class
labels y (paper, stage 1):

    min_X  CE(f*(J(X)), y) + a_bn Σ_l r_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂)
           + a_tv TV(J(X)) + a_l2 · mean_b ‖J(X)_b‖₂

starting from X_b = M_{y_b} + init_noise · N(0, I) (class-mean init) or N(0, I).

Normalisation choice: TV and the L2 prior are computed PER IMAGE and averaged over the
batch, so a weight means the same at any batch size (upstream takes TV's Frobenius norms
over the whole batch, which grows as sqrt(B): our TV ≈ upstream TV / sqrt(B), so
upstream's a_tv is about 6x weaker here at its batch of 40). `synthesis.tv_form =
"batch"` is upstream's form. Both still grow as sqrt(C·H·W) with resolution, as
upstream; calibrate a_tv and a_l2 per dataset so each term is a fraction of CE
(`SynthesisReport` gives the raw terms).

Learning rate: linear warm-up to `lr`, then cosine decay from `lr_peak · lr` to 0.
Upstream Class Impression writes the decay as lr · 0.2 · (1 + cos) (lr_peak = 0.4, a
drop right after the warm-up; our default, since it kept more old views on validation:
docs/results.md, "Keeping the old views"); NVlabs DeepInversion writes lr · 0.5 · (1 +
cos) (lr_peak = 1, our default before).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from fl_ci.config import SynthesisConfig
from fl_ci.synthesis.bn_stats import BNStatsRecorder
from fl_ci.synthesis.means import ClassMeans, MissingMeanError

TERMS = ("total", "ce", "bn", "tv", "l2", "feature")  # order of the per-step losses
_REPORT_EVERY = 50  # steps between host synchronisations (bar, NaN check)


class SynthesisError(RuntimeError):
    """The synthesis objective became non-finite; the message says where."""


@dataclass(frozen=True)
class SynthesisReport:
    """Raw (unweighted) loss terms, averaged over chunks weighted by chunk size.

    initial: the terms at the first iterate; final: at the kept lowest-loss iterate.
    Keys are TERMS; "total" is the weighted objective. NaN when iterations == 0.
    """

    initial: dict[str, float]
    final: dict[str, float]
    iterations: int
    chunks: int
    seconds: float
    compiled: bool  # torch.compile ran the whole synthesis (no eager fallback)


class Impressions(NamedTuple):
    """`images, labels, report = synthesize(...)`."""

    images: Tensor  # [N, C, H, W] float32, CPU, within the valid range
    labels: Tensor  # [N] int64, CPU, balanced; classes interleaved (c0, c1, .., c0, ..)
    report: SynthesisReport


def total_variation(x: Tensor, form: str = "per_image") -> Tensor:
    """TV prior over the horizontal, vertical and both diagonal pixel differences Δ_d
    (plain, unsquared norms) of a batch x [B, C, H, W].

    per_image: mean_b Σ_d ‖Δ_d x_b‖_F, each image x_b [C, H, W] on its own.
    batch (upstream): Σ_d ‖Δ_d x‖_F, one Frobenius norm over the whole batch.
    """
    if form not in ("per_image", "batch"):
        raise ValueError(f"tv_form must be 'per_image' or 'batch', got {form!r}")
    diffs = (
        x[..., :, :-1] - x[..., :, 1:],  # [B, C, H, W-1] horizontal
        x[..., :-1, :] - x[..., 1:, :],  # [B, C, H-1, W] vertical
        x[..., :-1, :-1] - x[..., 1:, 1:],  # [B, C, H-1, W-1] diagonal
        x[..., 1:, :-1] - x[..., :-1, 1:],  # [B, C, H-1, W-1] anti-diagonal
    )
    if form == "batch":
        return sum(torch.linalg.vector_norm(d) for d in diffs)
    norms = torch.stack([torch.linalg.vector_norm(d.flatten(1), dim=1) for d in diffs])
    return norms.sum(0).mean()  # [4, B] -> scalar


def feature_mean_gap(features: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Mean over the classes in the batch of ‖m_c − μ_c‖² / ‖μ_c‖², where m_c is the
    mean of the class's features [B, D] and μ_c = targets[c] [K, D] the mean feature
    of its real images: the first of CwD's statistics terms (Wang et al. 2024)."""
    onehot = F.one_hot(labels, targets.shape[0]).float()  # [B, K]
    counts = onehot.sum(0)  # [K]
    means = onehot.t() @ features / counts.clamp_min(1)[:, None]  # [K, D]
    gap = (means - targets).pow(2).sum(1) / targets.pow(2).sum(1).clamp_min(1e-12)
    present = counts > 0
    return (gap * present).sum() / present.sum()


def image_l2(x: Tensor) -> Tensor:
    """L2 prior: mean_b ‖x_b‖₂ over whole images (unsquared)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).mean()


def lr_at(step: int, cfg: SynthesisConfig) -> float:
    """Learning rate of `step` (from 0): linear warm-up to cfg.lr, then cosine from
    cfg.lr_peak · cfg.lr to 0 (upstream Class Impression: lr_peak = 0.4).

    The warm-up is at most a fifth of the iterations (upstream: 100 of 2000-5000), so a
    short CPU-sized run still reaches its learning rate and decays."""
    warmup = min(cfg.warmup, cfg.iterations // 5)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(cfg.iterations - warmup, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))
    return cfg.lr * cfg.lr_peak * cosine


def synthesize(
    teacher: nn.Module,
    classes: list[int],
    cfg: SynthesisConfig,
    *,
    means: Tensor | ClassMeans | None = None,
    image_shape: tuple[int, int, int],
    bounds: tuple[Tensor, Tensor],
    device: torch.device | str | None = None,
    seed: int,
    progress: bool = True,
    feature_means: Tensor | None = None,
) -> Impressions:
    """Class impressions for `classes`: cfg.per_class images each, optimised against
    the frozen teacher (module docstring). Returns (images, labels, report).

    means: class-mean images [len(classes), C, H, W] in `classes` order, or a
    ClassMeans indexed by class id; needed for cfg.init == "mean". bounds: per-channel
    (low [C], high [C]) of the normalised input space (`data.base.valid_range`);
    every iterate is clamped to them. device: default the teacher's; the teacher is
    moved there for the call if needed. feature_means: [len(classes), D] mean
    teacher features of each class's real images (fl_ci/prototypes.py); with
    cfg.feature_weight > 0 each class's impressions are pulled towards it. Teacher parameters, buffers, train/eval modes
    and requires_grad flags are left as they were.
    """
    if not classes or cfg.per_class <= 0:
        raise ValueError(
            f"synthesize needs classes and per_class > 0, got {classes} and "
            f"{cfg.per_class}"
        )
    if cfg.init not in ("mean", "random"):
        raise ValueError(f"synthesis.init must be 'mean' or 'random', got {cfg.init!r}")
    # Built first: a model without BatchNorm2d is refused before anything changes.
    recorder = BNStatsRecorder(teacher)
    c, h, w = image_shape
    low, high = (
        torch.as_tensor(b, dtype=torch.float32).cpu().flatten() for b in bounds
    )
    if low.numel() != c or high.numel() != c:
        raise ValueError(
            f"bounds must have {c} values per side, got {tuple(low.shape)}"
        )
    mean_images = (
        _class_means(means, classes, image_shape) if cfg.init == "mean" else None
    )

    generator = torch.Generator().manual_seed(seed)
    k = len(classes)
    # Round-robin labels make every contiguous chunk balanced to within one image.
    labels = torch.tensor(classes, dtype=torch.long).repeat(cfg.per_class)  # [N]
    slots = torch.arange(k).repeat(cfg.per_class)  # [N] row of each image's class mean
    init = torch.randn((labels.numel(), c, h, w), generator=generator)  # [N, C, H, W]
    if mean_images is not None:
        init = mean_images[slots] + cfg.init_noise * init
    init = init.clamp(low.view(1, c, 1, 1), high.view(1, c, 1, 1))

    target = torch.device(device) if device is not None else _device_of(teacher)
    targets = None
    if cfg.feature_weight > 0:
        if feature_means is None or feature_means.shape[0] != k:
            raise ValueError(
                f"synthesis.feature_weight > 0 needs the real feature means of the "
                f"{k} classes {classes}"
            )
        # [max class + 1, D] rows at the class ids, so a label indexes its target
        targets = torch.zeros(max(classes) + 1, feature_means.shape[1])
        targets[torch.tensor(classes)] = feature_means.float().cpu()
        targets = targets.to(target)
    start = time.perf_counter()
    with _frozen(teacher, target), recorder:
        run = _Runner(teacher, recorder, cfg, target, targets)
        images, initial, final = run.all_chunks(
            init, labels, low, high, generator, progress
        )
    report = SynthesisReport(
        initial=initial,
        final=final,
        iterations=cfg.iterations,
        chunks=run.chunks,
        seconds=time.perf_counter() - start,
        compiled=run.compiled is not None,
    )
    return Impressions(images, labels, report)


class _Runner:
    """The optimisation loop; holds the (possibly compiled) objective."""

    def __init__(
        self,
        teacher: nn.Module,
        recorder: BNStatsRecorder,
        cfg: SynthesisConfig,
        device: torch.device,
        targets: Tensor | None = None,
    ) -> None:
        self.teacher, self.recorder, self.cfg, self.device = (
            teacher,
            recorder,
            cfg,
            device,
        )
        self.targets = targets  # [K, D] real feature means by class id, or None
        self.cuda = device.type == "cuda"
        self.chunks = 0
        self.compiled: Callable[[Tensor, Tensor], Tensor] | None = None
        if cfg.compile and self.cuda:
            self.compiled = torch.compile(self._objective)

    def _objective(self, x: Tensor, y: Tensor) -> Tensor:
        """[6] loss terms in TERMS order for jittered images x [B, C, H, W]."""
        cfg = self.cfg
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            if self.targets is None:
                logits = self.teacher(x)  # [B, K]
            else:
                out = self.teacher.forward_all(x)
                logits = out.logits  # [B, K]
        ce = F.cross_entropy(logits.float(), y)
        bn = self.recorder.loss(cfg.first_bn_weight)
        tv, l2 = total_variation(x, cfg.tv_form), image_l2(x)
        total = ce + cfg.bn_weight * bn + cfg.tv_weight * tv + cfg.l2_weight * l2
        feature = torch.zeros((), device=x.device)
        if self.targets is not None:
            feature = feature_mean_gap(out.features.float(), y, self.targets)
            total = total + cfg.feature_weight * feature
        return torch.stack([total, ce, bn, tv, l2, feature])

    def _loss_and_grad(self, make_input: Callable[[], Tensor], y: Tensor) -> Tensor:
        if self.compiled is not None:
            try:
                terms = self.compiled(make_input(), y)
                terms[0].backward()
                return terms.detach()
            except Exception as err:  # compile failures surface at the first call
                warnings.warn(
                    f"torch.compile of the synthesis step failed "
                    f"({type(err).__name__}: {err}); continuing eagerly",
                    stacklevel=4,
                )
                self.compiled = None
        terms = self._objective(make_input(), y)
        terms[0].backward()
        return terms.detach()

    def all_chunks(
        self,
        init: Tensor,
        labels: Tensor,
        low: Tensor,
        high: Tensor,
        generator: torch.Generator,
        progress: bool,
    ) -> tuple[Tensor, dict[str, float], dict[str, float]]:
        cfg, n = self.cfg, labels.numel()
        size = n if cfg.batch_size == 0 else cfg.batch_size
        starts = range(0, n, size)
        self.chunks = len(starts)
        bounds = (
            low.to(self.device).view(1, -1, 1, 1),
            high.to(self.device).view(1, -1, 1, 1),
        )
        first_sum = torch.zeros(len(TERMS), device=self.device)
        best_sum = torch.zeros(len(TERMS), device=self.device)
        out = []
        with tqdm(
            total=self.chunks * cfg.iterations, desc="impressions", disable=not progress
        ) as bar:
            for i, s in enumerate(starts):
                x0, y = init[s : s + size], labels[s : s + size]
                best_x, first, best = self._chunk(x0, y, bounds, generator, bar, i)
                first_sum += first * y.numel()
                best_sum += best * y.numel()
                out.append(best_x.cpu().contiguous())
        if cfg.iterations == 0:
            nan = dict.fromkeys(TERMS, math.nan)
            return torch.cat(out), nan, dict(nan)
        first_avg, best_avg = (first_sum / n).tolist(), (best_sum / n).tolist()
        return (
            torch.cat(out),
            dict(zip(TERMS, first_avg, strict=True)),
            dict(zip(TERMS, best_avg, strict=True)),
        )

    def _chunk(
        self,
        x0: Tensor,
        y: Tensor,
        bounds: tuple[Tensor, Tensor],
        generator: torch.Generator,
        bar: tqdm,
        index: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Optimise one chunk: (best images, first terms [5], best terms [5])."""
        cfg, device = self.cfg, self.device
        fmt = torch.channels_last if self.cuda else torch.contiguous_format
        x = x0.to(device).contiguous(memory_format=fmt).requires_grad_(True)
        y = y.to(device)
        optimiser = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
        best_x = x.detach().clone()
        best = torch.full((len(TERMS),), math.inf, device=device)
        first = torch.full((len(TERMS),), math.nan, device=device)
        bad = torch.zeros((), dtype=torch.bool, device=device)
        shift = cfg.jitter or max(1, x0.shape[-2] // 16)
        reported = 0
        for step in range(cfg.iterations):
            for group in optimiser.param_groups:
                group["lr"] = lr_at(step, cfg)
            # One roll and one flip for the whole batch per step (as DeepInversion),
            # drawn on the CPU generator so runs repeat on any device.
            dy, dx = torch.randint(
                -shift, shift + 1, (2,), generator=generator
            ).tolist()
            flip = cfg.flip and bool(torch.rand((), generator=generator) < 0.5)

            def make_input(dy: int = dy, dx: int = dx, flip: bool = flip) -> Tensor:
                xj = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
                xj = xj.flip(3) if flip else xj
                return xj.contiguous(memory_format=fmt)

            optimiser.zero_grad(set_to_none=True)
            terms = self._loss_and_grad(make_input, y)  # [5], loss at the current X
            with torch.no_grad():
                # Track the best iterate on device: no host sync per step.
                improved = terms[0] < best[0]
                best_x.copy_(torch.where(improved, x, best_x))
                best.copy_(torch.where(improved, terms, best))
                bad |= ~torch.isfinite(terms[0])
                if step == 0:
                    first.copy_(terms)
            optimiser.step()
            with torch.no_grad():
                x.clamp_(bounds[0], bounds[1])
            if (step + 1) % _REPORT_EVERY == 0 or step + 1 == cfg.iterations:
                if bad.item():
                    last = dict(zip(TERMS, terms.tolist(), strict=True))
                    raise SynthesisError(
                        f"synthesis loss became non-finite by step {step + 1} of chunk "
                        f"{index} (last terms {last}); try a lower synthesis.lr or "
                        "smaller loss weights"
                    )
                bar.update(step + 1 - reported)
                bar.set_postfix(loss=f"{terms[0].item():.4g}")
                reported = step + 1
        return best_x.detach(), first, best


def _class_means(
    means: Tensor | ClassMeans | None,
    classes: list[int],
    image_shape: tuple[int, int, int],
) -> Tensor:
    """[len(classes), C, H, W] float32 CPU means; MissingMeanError names a class."""
    if means is None:
        raise MissingMeanError(
            f"synthesis.init='mean' needs class means; none given for classes {classes}"
        )
    if isinstance(means, ClassMeans):
        m = means.means(classes)
    else:
        m = means.detach().float().cpu()
        if m.shape[0] != len(classes):
            raise ValueError(
                f"means has {m.shape[0]} rows for {len(classes)} classes {classes}"
            )
        finite = torch.isfinite(m.flatten(1)).all(1)  # [K]
        if not finite.all():
            missing = classes[int((~finite).nonzero()[0])]
            raise MissingMeanError(
                f"no class mean for class {missing}: it is not finite"
            )
    if tuple(m.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"class means have image shape {tuple(m.shape[1:])}, expected {image_shape}"
        )
    return m


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


class _frozen:
    """Teacher in eval mode, no parameter grads, on `device`; all restored on exit."""

    def __init__(self, teacher: nn.Module, device: torch.device) -> None:
        self.teacher, self.device = teacher, device

    def __enter__(self) -> None:
        teacher = self.teacher
        self.modes = [(m, m.training) for m in teacher.modules()]
        self.grads = [(p, p.requires_grad) for p in teacher.parameters()]
        self.home = _device_of(teacher)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self.home != self.device:
            teacher.to(self.device)

    def __exit__(self, *exc: object) -> None:
        if self.home != self.device:
            self.teacher.to(self.home)
        for p, flag in self.grads:
            p.requires_grad_(flag)
        for m, mode in self.modes:
            m.training = mode
