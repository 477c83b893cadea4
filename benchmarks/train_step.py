"""Training throughput of the real trainer: images per second per model and batch.

    python -m benchmarks.train_step [--device auto] [--steps N] [--out FILE]

Each row calls `fl_ci.trainer.train_round` (the loop every method runs in: SGD with
momentum and weight decay, the dataset's augmentation, bf16 autocast on CUDA when
`amp`) with the fine-tuning method on random uint8 data held in memory, so the batch
pipeline (`fl_ci.data.base.batches`: gather, copy to the device, normalise, augment)
is timed too. Models: ResNet-32 at 32 px, 3 channels (CIFAR-100 augmentation) and
echo_net at 64 px, 1 channel, 8 frames per cine (echo augmentation). A first
`train_round` of `warmup` steps is not timed; the timed one runs `steps` steps
(wall time around it, after a device sync). With --repeats R each row is measured R
times and the run of median speed kept. CPU/wall is the process's CPU time over wall
time: well under the thread count means other jobs took the cores; "per CPU-s"
divides by process CPU time instead (meaningful on CPU with one thread).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import torch

from benchmarks.common import (
    PeakMemory,
    add_common_args,
    default_out,
    fmt_float,
    fmt_int,
    fmt_mib,
    fmt_str,
    machine_info,
    markdown_table,
    resolve_device,
    setup_threads,
    sync,
    write_result,
)
from fl_ci.config import Config
from fl_ci.data.base import ImageData
from fl_ci.methods import SiteContext, build_method
from fl_ci.models import IncrementalNet, build_model
from fl_ci.trainer import train_round

NUM_CLASSES = 20
# model -> (dataset whose augmentation applies, channels, side, frames per item)
SHAPES = {
    "resnet32": ("cifar100", 3, 32, 1),
    "echo_net": ("echo-synth", 1, 64, 8),
}


def random_data(model: str, n: int, seed: int) -> ImageData:
    """n random uint8 items shaped like the model's dataset, balanced labels."""
    _, c, side, frames = SHAPES[model]
    g = torch.Generator().manual_seed(seed)
    return ImageData(
        frames=torch.randint(
            0, 256, (n, frames, c, side, side), generator=g, dtype=torch.uint8
        ),
        labels=torch.arange(n) % NUM_CLASSES,
        patients=torch.full((n,), -1),
        devices=torch.full((n,), -1),
        mean=(0.5,) * c,
        std=(0.25,) * c,
    )


def run_round(
    net: IncrementalNet, cfg: Config, data: ImageData, device: torch.device
) -> dict[str, Any]:
    ctx = SiteContext(
        cfg=cfg,
        task=0,
        round=0,
        site=0,
        new_classes=list(range(NUM_CLASSES)),
        num_old=0,
        data=data,
        teacher=None,
        class_means=None,
        unlabelled=None,
        device=device,
        progress=False,
    )
    return train_round(net, build_method(cfg), ctx)


def measure(
    model: str,
    batch: int,
    precision: str,
    device: torch.device,
    *,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    dataset = SHAPES[model][0]
    cfg = replace(
        Config(),
        method="finetune",
        dataset=dataset,
        model=model,
        batch_size=batch,
        local_epochs=1,
        rounds_per_task=1,
        amp=precision == "bf16",
        device=device.type,
    )
    torch.manual_seed(0)
    net = build_model(
        model,
        NUM_CLASSES,
        in_channels=SHAPES[model][1],
        head=cfg.head,
        head_scale=cfg.head_scale,
    )
    if warmup:
        run_round(net, cfg, random_data(model, warmup * batch, seed=1), device)
    data = random_data(model, steps * batch, seed=2)
    with PeakMemory(device) as mem:
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = run_round(net, cfg, data, device)
        sync(device)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
    images = metrics["train_images"]
    return {
        "model": model,
        "image": f"{SHAPES[model][1]}x{SHAPES[model][2]}px",
        "batch": batch,
        "precision": precision,
        "warmup_steps": warmup,
        "timed_steps": metrics["train_steps"],
        "timed_images": images,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "cpu_share": cpu_seconds / seconds,  # process CPU time / wall time
        "images_per_cpu_s": metrics["train_images"] / cpu_seconds,
        "trainer_seconds": metrics["train_seconds"],
        "ms_per_step": 1000 * seconds / max(metrics["train_steps"], 1),
        "images_per_s": images / seconds,
        "peak_memory_bytes": mem.bytes,
        "memory_method": mem.method,
        "train_loss": metrics.get("train_loss"),
    }


COLUMNS = [
    ("model", "model", fmt_str),
    ("image", "input", fmt_str),
    ("batch", "batch", fmt_int),
    ("precision", "precision", fmt_str),
    ("timed_steps", "steps", fmt_int),
    ("ms_per_step", "ms/step", fmt_float(1)),
    ("images_per_s", "images/s", fmt_int),
    ("cpu_share", "CPU/wall", fmt_float(2)),
    ("images_per_cpu_s", "per CPU-s", fmt_int),
    ("peak_memory_bytes", "peak MiB", fmt_mib),
]


def measure_repeated(repeats: int, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`measure` `repeats` times; the row of median speed, with all speeds."""
    runs = [measure(*args, **kwargs) for _ in range(max(repeats, 1))]
    runs.sort(key=lambda r: r["images_per_s"])
    row = runs[len(runs) // 2]
    row["repeats_images_per_s"] = [r["images_per_s"] for r in runs]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0]
    )
    add_common_args(parser)
    parser.add_argument("--models", default="resnet32,echo_net")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument(
        "--repeats", type=int, default=1, help="measure each row this many times"
    )
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    threads = setup_threads(args.threads)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    steps = args.steps if args.steps is not None else (30 if cuda else 8)
    # (batch, precision) per model: fp32 at 128 everywhere; bf16 autocast on CUDA
    plan = [(128, "fp32"), (128, "bf16"), (2048, "bf16")] if cuda else [(128, "fp32")]
    info = machine_info(device)
    print(f"device {device}, {threads} torch threads, {info['cpu_model']}", flush=True)
    rows = []
    for model in args.models.split(","):
        if model not in SHAPES:
            parser.error(f"unknown model {model!r}; known: {', '.join(SHAPES)}")
        for batch, precision in plan:
            row = measure_repeated(
                args.repeats,
                model,
                batch,
                precision,
                device,
                warmup=warmup,
                steps=steps,
            )
            print(
                f"{model} batch {batch} {precision}: {row['images_per_s']:,.0f} "
                "images/s",
                flush=True,
            )
            rows.append(row)
    table = markdown_table(rows, COLUMNS)
    print()
    print(table)
    out = write_result(
        {"benchmark": "train_step", "machine": info, "rows": rows, "table": table},
        args.out or default_out("train_step", device),
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
