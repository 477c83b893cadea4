"""Class Impression synthesis speed: image-iterations per second and peak memory.

    python -m benchmarks.synthesis [--device auto] [--batches 40,200] [--out FILE]

Every row runs the real `fl_ci.synthesis.synthesize` on a ResNet-32 teacher (100-class
cosine head, random weights: speed does not depend on them) at 32 px, all images in
one chunk. The reference row is the upstream shape run through the same function in
the same process: one class, 40 images, fp32, eager. An image-iteration is one image
through one optimisation step (forward, backward, Adam, clamp).

Timing: `_Runner._loss_and_grad` is wrapped to synchronise and read the clock at the
start of iteration `warmup` and of iteration `warmup + iters`, so exactly `iters`
whole iterations are timed and compilation (in the warm-up) is not. With --repeats R
each row is measured R times and the run of median speed is kept (all R speeds are
in the JSON). CPU/wall is the process's CPU time over wall time in the timed window:
well under the thread count means other jobs took the cores; "per CPU-s" divides by
process CPU time instead of wall time (meaningful on CPU with one thread).

Precision: `synthesize` has no precision option; on CUDA it always runs bf16 autocast
with channels-last images. The fp32 rows on CUDA (the reference among them) are
obtained by clearing the runner's CUDA flag after construction, which turns off
autocast and channels-last together (torch.compile, decided before, is unaffected).
On CPU everything is fp32, contiguous and eager (synthesize compiles on CUDA only).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

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
from fl_ci.config import SynthesisConfig
from fl_ci.data.base import valid_range
from fl_ci.data.cifar100 import CIFAR100_MEAN, CIFAR100_STD
from fl_ci.models import build_model
from fl_ci.synthesis import impressions, synthesize

GPU_BATCHES = (40, 400, 2000, 8000)
CPU_BATCHES = (40, 200)
NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)


class StepClock:
    """Clock readings (after a device sync) at the start of two iterations."""

    def __init__(self, device: torch.device, first: int, last: int) -> None:
        self.device, self.first, self.last = device, first, last
        self.calls = 0
        self.marks: list[tuple[float, float]] = []  # (wall, process CPU) seconds

    @contextmanager
    def installed(self) -> Iterator[StepClock]:
        original = impressions._Runner._loss_and_grad
        clock = self

        def timed(runner: Any, make_input: Any, y: torch.Tensor) -> torch.Tensor:
            if clock.calls in (clock.first, clock.last):
                sync(clock.device)
                clock.marks.append((time.perf_counter(), time.process_time()))
            clock.calls += 1
            return original(runner, make_input, y)

        impressions._Runner._loss_and_grad = timed  # type: ignore[method-assign]
        try:
            yield self
        finally:
            impressions._Runner._loss_and_grad = original  # type: ignore[method-assign]

    def seconds(self) -> tuple[float, float]:
        """(wall, process CPU) seconds between the two readings."""
        if len(self.marks) != 2:
            raise RuntimeError(f"expected 2 clock readings, got {len(self.marks)}")
        (w0, c0), (w1, c1) = self.marks
        return w1 - w0, c1 - c0


@contextmanager
def plain_fp32(enabled: bool) -> Iterator[None]:
    """On CUDA: run synthesize without bf16 autocast and channels-last (see module
    docstring); a no-op when not enabled or on CPU."""
    if not enabled:
        yield
        return
    original = impressions._Runner.__init__

    def init(runner: Any, *args: Any, **kwargs: Any) -> None:
        original(runner, *args, **kwargs)
        runner.cuda = False

    impressions._Runner.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        impressions._Runner.__init__ = original  # type: ignore[method-assign]


def measure(
    teacher: torch.nn.Module,
    device: torch.device,
    *,
    label: str,
    classes: int,
    per_class: int,
    precision: str,
    compile: bool,
    warmup: int,
    iters: int,
) -> dict[str, Any]:
    """One synthesize call; returns a result row."""
    cfg = replace(
        SynthesisConfig(),
        iterations=warmup + iters + 1,
        per_class=per_class,
        batch_size=0,
        compile=compile,
    )
    ids = list(range(classes))
    means = 0.5 * torch.randn((classes, *IMAGE_SHAPE), generator=torch.Generator())
    bounds = valid_range(CIFAR100_MEAN, CIFAR100_STD)
    fp32_override = device.type == "cuda" and precision == "fp32"
    compiling = compile and device.type == "cuda"
    if compiling:
        # A fresh start per row: dynamo's per-function recompile limit would
        # otherwise turn later rows silently eager.
        torch._dynamo.reset()
        counters.clear()
    clock = StepClock(device, warmup, warmup + iters)
    with clock.installed(), plain_fp32(fp32_override), PeakMemory(device) as mem:
        _, _, report = synthesize(
            teacher,
            ids,
            cfg,
            means=means,
            # the default matches the impressions' features to kept real means:
            # any target costs the same
            feature_means=torch.randn(classes, teacher.feature_dim)
            if cfg.feature_weight > 0
            else None,
            image_shape=IMAGE_SHAPE,
            bounds=bounds,
            device=device,
            seed=0,
            progress=False,
        )
    batch = classes * per_class
    seconds, cpu_seconds = clock.seconds()
    cuda = device.type == "cuda"
    return {
        "label": label,
        "batch": batch,
        "classes": classes,
        "per_class": per_class,
        "precision": precision,
        "layout": "channels_last" if cuda and precision == "bf16" else "contiguous",
        "compile_requested": compile and cuda,
        "compiled": report.compiled,
        # dynamo's own count: graphs compiled and graph breaks during the row
        "dynamo_graphs": counters["stats"]["unique_graphs"] if compiling else None,
        "dynamo_graph_breaks": sum(counters["graph_break"].values())
        if compiling
        else None,
        "warmup_iterations": warmup,
        "timed_iterations": iters,
        "timed_seconds": seconds,
        "timed_cpu_seconds": cpu_seconds,
        "cpu_share": cpu_seconds / seconds,  # process CPU time / wall time
        "image_iterations_per_cpu_s": batch * iters / cpu_seconds,
        "ms_per_iteration": 1000 * seconds / iters,
        "image_iterations_per_s": batch * iters / seconds,
        "call_seconds": report.seconds,
        "peak_memory_bytes": mem.bytes,
        "memory_method": mem.method,
        "final_total_loss": report.final["total"],
    }


COLUMNS = [
    ("label", "run", fmt_str),
    ("batch", "images", fmt_int),
    ("precision", "precision", fmt_str),
    ("layout", "layout", fmt_str),
    ("compiled", "compiled", fmt_str),
    ("dynamo_graph_breaks", "graph breaks", fmt_int),
    ("timed_iterations", "iters", fmt_int),
    ("ms_per_iteration", "ms/iter", fmt_float(1)),
    ("image_iterations_per_s", "image-iter/s", fmt_int),
    ("vs_reference", "x reference", fmt_float(2)),
    ("cpu_share", "CPU/wall", fmt_float(2)),
    ("image_iterations_per_cpu_s", "per CPU-s", fmt_int),
    ("peak_memory_bytes", "peak MiB", fmt_mib),
]


def measure_repeated(repeats: int, **kwargs: Any) -> dict[str, Any]:
    """`measure` `repeats` times; the row of median speed, with all speeds."""
    runs = [measure(**kwargs) for _ in range(max(repeats, 1))]
    runs.sort(key=lambda r: r["image_iterations_per_s"])
    row = runs[len(runs) // 2]
    row["repeats_image_iterations_per_s"] = [r["image_iterations_per_s"] for r in runs]
    return row


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.synthesis", description=__doc__.split("\n")[0]
    )
    add_common_args(parser)
    parser.add_argument("--batches", help="images per synthesis batch, comma-separated")
    parser.add_argument(
        "--classes",
        type=int,
        default=20,
        help="classes in our rows (batch / classes images each; must divide every "
        "batch)",
    )
    parser.add_argument("--precisions", default="fp32,bf16", help="CUDA only")
    parser.add_argument(
        "--compile", default="off,on", help="CUDA only: off, on or off,on"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations")
    parser.add_argument(
        "--repeats", type=int, default=1, help="measure each row this many times"
    )
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    threads = setup_threads(args.threads)
    cuda = device.type == "cuda"
    batches = (
        parse_ints(args.batches)
        if args.batches
        else (list(GPU_BATCHES) if cuda else list(CPU_BATCHES))
    )
    precisions = args.precisions.split(",") if cuda else ["fp32"]
    compiles = [c == "on" for c in args.compile.split(",")] if cuda else [False]
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    iters = args.iters if args.iters is not None else (50 if cuda else 10)
    for b in batches:
        if b % args.classes:
            parser.error(f"--classes {args.classes} does not divide batch {b}")

    torch.manual_seed(0)
    teacher = build_model(
        "resnet32", NUM_CLASSES, in_channels=3, head="cosine", head_scale=10.0
    ).to(device)
    info = machine_info(device)
    print(f"device {device}, {threads} torch threads, {info['cpu_model']}", flush=True)

    # One untimed call first: thread pools, allocator and cuDNN warm up here, not
    # in the reference row's time or memory.
    measure(
        teacher,
        device,
        label="priming",
        classes=1,
        per_class=40,
        precision="fp32",
        compile=False,
        warmup=0,
        iters=2,
    )
    reference = measure_repeated(
        args.repeats,
        teacher=teacher,
        device=device,
        label="reference (1 class x 40, fp32, eager)",
        classes=1,
        per_class=40,
        precision="fp32",
        compile=False,
        warmup=warmup,
        iters=iters,
    )
    print(f"reference: {reference['image_iterations_per_s']:,.0f} image-iter/s")
    rows = [reference]
    for batch in batches:
        for precision in precisions:
            for comp in compiles:
                label = f"ours {args.classes} classes x {batch // args.classes}"
                row = measure_repeated(
                    args.repeats,
                    teacher=teacher,
                    device=device,
                    label=label,
                    classes=args.classes,
                    per_class=batch // args.classes,
                    precision=precision,
                    compile=comp,
                    warmup=warmup,
                    iters=iters,
                )
                print(
                    f"{batch} images {precision} compile={comp}: "
                    f"{row['image_iterations_per_s']:,.0f} image-iter/s",
                    flush=True,
                )
                rows.append(row)
    ref_speed = reference["image_iterations_per_s"]
    for row in rows:
        row["vs_reference"] = row["image_iterations_per_s"] / ref_speed
    best = max(rows[1:], key=lambda r: r["image_iterations_per_s"], default=reference)
    table = markdown_table(rows, COLUMNS)
    print()
    print(table)
    print(
        f"\nbest: {best['image_iterations_per_s']:,.0f} image-iter/s "
        f"({best['vs_reference']:.2f}x the reference loop)"
    )
    out = write_result(
        {
            "benchmark": "synthesis",
            "machine": info,
            "model": "resnet32",
            "image_shape": list(IMAGE_SHAPE),
            "rows": rows,
            "best": {
                "label": best["label"],
                "batch": best["batch"],
                "precision": best["precision"],
                "compiled": best["compiled"],
                "image_iterations_per_s": best["image_iterations_per_s"],
                "vs_reference": best["vs_reference"],
            },
            "table": table,
        },
        args.out or default_out("synthesis", device),
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
