"""Helpers shared by the benchmarks: threads, device facts, peak memory, output.

Benchmarks are measurements, not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--device, --threads and --out, the same in every benchmark."""
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: CUDA when present, else CPU",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: the CPUs this process may use)",
    )
    parser.add_argument(
        "--out", help="JSON file to write (default benchmarks/results/NAME-...json)"
    )


def setup_threads(threads: int) -> int:
    """Set torch's intra-op threads (0: CPUs in this process's affinity mask).

    OMP_NUM_THREADS is only read when torch starts, so set it in the shell as well to
    size OpenMP's pool (docs/performance.md does).
    """
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return torch.get_num_threads()


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present; cuda without a GPU is an error (fl_ci's own rule)."""
    from fl_ci.trainer import resolve_device as resolve

    try:
        return resolve(name)
    except RuntimeError:
        raise SystemExit("--device cuda but torch sees no CUDA device") from None


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key = key.strip()
                if sep and key in ("model name", "cpu family", "model", "stepping"):
                    info.setdefault(key, value.strip())
                if not line.strip() and info:
                    break
    except OSError:
        pass
    return info


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (CPU, cores, threads, GPU, load)."""
    cpu = _cpuinfo()
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_model": cpu.get("model name") or platform.processor() or "unknown",
        "cpu_family_model_stepping": "/".join(
            cpu.get(k, "?") for k in ("cpu family", "model", "stepping")
        ),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so memory kept
    from an earlier measurement is not reused unseen by the next one."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the code inside `with`, in bytes (None when unknowable).

    CUDA: torch.cuda.max_memory_allocated after resetting the peak. CPU: the peak
    resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set
    at entry (after freed heap is returned to the OS), so it counts the whole process
    (allocator caches, threads' buffers) but not memory still held from before;
    where the peak cannot be reset, the growth of ru_maxrss, which is 0 whenever an
    earlier peak was higher (reported as a lower bound).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self.method = "n/a"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        _release_free_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.base = _status_kib("VmRSS")
            self.method = "cpu_vmhwm_minus_vmrss"
        except OSError:
            self.base = None
        if self.base is None:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "cpu_ru_maxrss_growth_lower_bound"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "cpu_vmhwm_minus_vmrss":
            peak = _status_kib("VmHWM")
            self.bytes = None if peak is None else max(peak - self.base, 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.bytes = max(peak - self.base, 0) * 1024


def default_out(name: str, device: torch.device) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RESULTS / f"{name}-{device.type}-{stamp}.json"


def write_result(payload: dict[str, Any], out: str | Path) -> Path:
    """Write the benchmark's JSON (atomically); returns the path."""
    from fl_ci.results import write_json

    payload = {**payload, "load_average_at_end": list(os.getloadavg())}
    return write_json(payload, Path(out))


Column = tuple[str, str, Callable[[Any], str]]


def fmt_int(v: Any) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def fmt_float(digits: int) -> Callable[[Any], str]:
    return lambda v: "n/a" if v is None else f"{v:,.{digits}f}"


def fmt_mib(v: Any) -> str:
    return "n/a" if v is None else f"{v / 2**20:,.0f}"


def fmt_str(v: Any) -> str:
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as a Markdown table; columns are (key, header, formatter)."""
    lines = [
        "| " + " | ".join(h for _, h, _ in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(f(row.get(k)) for k, _, f in columns) + " |")
    return "\n".join(lines)
