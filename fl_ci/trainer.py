"""The one local training loop every method runs inside.

It owns the optimiser (SGD), the epochs and their learning-rate schedule, the device
and bf16 autocast on CUDA; methods supply hooks and loss terms (fl_ci/methods/base.py).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from fl_ci.data.base import augment, batches
from fl_ci.data.registry import augmentation
from fl_ci.methods.base import Batch, Method, SiteContext
from fl_ci.models import IncrementalNet


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where."""


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda` without a GPU is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "config key 'device' is 'cuda' but no CUDA device is present"
        )
    return torch.device(name)


def lr_at(cfg, epoch: int, total_epochs: int) -> float:
    """Cosine decay over a task's epochs (all rounds together), or constant."""
    if cfg.lr_schedule == "constant" or total_epochs <= 1:
        return cfg.lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / total_epochs))


def train_round(
    model: IncrementalNet, method: Method, ctx: SiteContext
) -> dict[str, Any]:
    """Run the task's local epochs (`cfg.epochs_at`) of `method`; returns metrics.

    The epoch counter continues across the task's rounds so the learning-rate schedule
    spans the whole task, as in a centralized run.
    """
    cfg = ctx.cfg
    device = ctx.device
    model.to(device).train()
    if ctx.teacher is not None:
        ctx.teacher.to(device).eval()
    decayed, free = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # weight decay would pull the cosine head's scale towards 0
            (free if name.endswith("eta") else decayed).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decayed}, {"params": free, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    generator = torch.Generator().manual_seed(
        cfg.seed * 1_000_003 + ctx.task * 1009 + ctx.round * 101 + ctx.site * 7
    )
    share = method.extra_share(ctx)
    real_bs = max(1, round(cfg.batch_size * (1 - share)))
    extra_bs = cfg.batch_size - real_bs if share > 0 else 0
    n_real = len(ctx.data)
    replay = method.replay_size() if share > 0 else 0
    rehearsal = n_real == 0 and replay > 0  # no new data here: replay alone
    if rehearsal:
        extra_bs = cfg.batch_size
    pad, flip = augmentation(cfg.dataset, ctx.data.size, cfg.augment)
    amp = device.type == "cuda" and cfg.amp
    epochs = cfg.epochs_at(ctx.task)
    total_epochs = cfg.rounds_at(ctx.task) * epochs
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    seen = 0
    start = time.perf_counter()
    if rehearsal:  # one pass over the replay set per epoch
        steps_per_epoch = math.ceil(replay / cfg.batch_size)
    else:
        steps_per_epoch = math.ceil(n_real / real_bs) if n_real else 0
    bar = tqdm(
        total=epochs * steps_per_epoch,
        desc=f"task {ctx.task} round {ctx.round}",
        disable=not ctx.progress,
        leave=False,
    )
    for e in range(epochs):
        epoch = ctx.round * epochs + e
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch, total_epochs)
        method.begin_epoch(ctx)
        real = (
            _no_rows(ctx.data, steps_per_epoch, device)
            if rehearsal
            else batches(
                ctx.data,
                real_bs,
                train=True,
                device=device,
                generator=generator,
                pad=pad,
                flip=flip,
            )
        )
        for x, y in real:
            extra = torch.zeros(len(y), dtype=torch.bool, device=device)
            if extra_bs:
                ex, ey = method.extra_batch(extra_bs, generator)
                if method.augments_extra() and (pad or flip):
                    ex = augment(ex.to(device), pad, flip, generator)
                x = torch.cat([x, ex.to(device)])
                y = torch.cat([y, ey.to(device)])
                ones = torch.ones(len(ey), dtype=torch.bool, device=device)
                extra = torch.cat([extra, ones])
            batch = Batch(x, y, extra)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = model.forward_all(x)
                teacher_out = None
                if method.needs_teacher and ctx.teacher is not None:
                    with torch.no_grad():
                        teacher_out = ctx.teacher.forward_all(x)
                loss, terms = method.loss(model, batch, out, teacher_out, ctx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.float()
            sums["loss"] = sums.get("loss", 0) + loss.detach().float()
            steps += 1
            seen += len(y)
            if steps % 20 == 0 or steps == 1:
                # one host sync every 20 steps, not every step
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(
                        f"{method.name}: non-finite loss at task {ctx.task}, "
                        f"round {ctx.round}, epoch {epoch}, step {steps}"
                    )
                bar.set_postfix(loss=f"{value:.3f}")
            bar.update(1)
    bar.close()
    metrics: dict[str, Any] = {
        f"train_{k}": float(v) / max(steps, 1) for k, v in sums.items()
    }
    if steps and not math.isfinite(metrics["train_loss"]):
        raise TrainingError(
            f"{method.name}: non-finite loss at task {ctx.task}, round {ctx.round}"
        )
    metrics.update(
        train_steps=steps,
        train_images=seen,
        train_seconds=time.perf_counter() - start,
        # FedAvg's weight: images per epoch x real share, which is the real count
        # for a site with new data and comparable for one that rehearses
        num_examples=round(replay * (1 - share)) if rehearsal else n_real,
        rehearsal=int(rehearsal),
    )
    return metrics


def _no_rows(data, steps: int, device: torch.device):
    """`steps` empty real batches (a rehearsing site's batches are all replay)."""
    x = torch.zeros(0, data.channels, data.size, data.size, device=device)
    y = torch.zeros(0, dtype=torch.long, device=device)
    for _ in range(steps):
        yield x, y
