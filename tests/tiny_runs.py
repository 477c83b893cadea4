"""The tiny single-machine run that the bundle, predict and report tests read: the
echo-paper scenario shrunk to seconds on a CPU (4 patients, 1 epoch, 5 synthesis
steps), run once per session by the `tiny_echo_paper_run` fixture (conftest.py).
Imported as `tiny_runs` (pytest puts `tests/` on `sys.path`)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_ECHO_PAPER = [
    "echo-paper",
    "--set",
    "data.patients=4",
    "--set",
    "local_epochs=1",
    "--set",
    "base_epochs=1",
    "--set",
    "synthesis.iterations=5",
    "--set",
    "synthesis.per_class=4",
    "--set",
    "data.image_size=32",
    "--set",
    "data.frames=2",
    "--quiet",
]


def run_tiny_echo_paper(out: Path) -> Path:
    """`python -m simulations` of the tiny echo-paper run into `out`, as a user runs
    it (a fresh process, one OpenMP thread); returns `out`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "simulations", *TINY_ECHO_PAPER, "--out", str(out)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out
