"""The message protocol between the ServerApp and the ClientApps: every record name
and key, the codecs of class means and evaluation counts, and the run-config split.

Server and client import this module and never each other. A train message carries
`arrays` (the global model), `config` (the study's flat config plus the round's
position), optionally `teacher` (once per task) and `means` (the old classes' shared
class means). A train reply carries `arrays`, `metrics` and, after a task's last
round, `means`; or `problem` instead of weights. An evaluate message carries
`arrays` and `config` (with `splits`); its reply carries `counts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fl_ci.config import Config
from fl_ci.site import Counts
from fl_ci.synthesis import ClassMeans

# ----- records -------------------------------------------------------------------------
ARRAYS = "arrays"  # ArrayRecord: the model
CONFIG = "config"  # ConfigRecord: flat config + the round's position
TEACHER = "teacher"  # ArrayRecord: the task's teacher, once per task per node
MEANS = "means"  # ArrayRecord: class means as (sum, count)
METRICS = "metrics"  # MetricRecord: a reply's numbers
PROBLEM = "problem"  # ConfigRecord: why a site has nothing sound to give
NOTES = "site-notes"  # ConfigRecord: the bad items a site left out, by name
COUNTS = "counts"  # MetricRecord: per-class correct / total of an evaluation

# ----- keys in `config` ---------------------------------------------------------------
TASK, ROUND = "task", "round"
SERVER_ROUND, ATTEMPT = "server-round", "attempt"
TEACHER_ID = "teacher-id"  # content hash of the teacher the site must hold
SPLITS = "splits"  # evaluate: comma-separated held-out splits ("val,test")

# ----- keys in `metrics` --------------------------------------------------------------
SITE = "site"  # the site's number
NUM_EXAMPLES = "num-examples"  # FedAvg weight
NUM_CLASSES = "num-classes"  # classes of the returned model
CLASSES = "classes"  # classes the site's data held this task
SKIPPED_ITEMS = "skipped-items"  # bad manifest rows / cines left out
REHEARSAL = "rehearsal"  # 1: trained on synthetic replay alone
ROWS = "rows-"  # prefix: rows the site holds by split ("rows-train", ...)
NORM_MEAN, NORM_STD = "norm-mean", "norm-std"  # the input normalisation it used

# ----- keys in `problem` and `site-notes` ---------------------------------------------
REASON = "reason"
NEEDS_TEACHER = "needs-teacher"  # the site lost the task's teacher: send it again
SITS_OUT = "sits-out"  # planned: no data of this task's classes, by the schedule
SKIPPED = "skipped"  # list of the first bad items, each naming its file and row

# ----- node config (per SuperNode) ----------------------------------------------------
DATA_ROOT = "data-root"  # deployment: the site's own data folder
STORE_DIR = "store-dir"  # the site's disk for impressions and the teacher
SITE_ID = "site-id"  # deployment: the site's number in the schedule and reports
PARTITION_ID = "partition-id"  # simulation only: the virtual site's share

# run-config keys that are not Config knobs: where to write, what to print, and two
# test switches (documented in docs/reliability.md)
RUNTIME_KEYS = frozenset(
    {"out", "progress", "print-summary", "stop-after-round", "faults"}
)
ROUND_KEYS = (TASK, ROUND, SERVER_ROUND, ATTEMPT, TEACHER_ID, SPLITS)


def split_run_config(run_config: dict) -> tuple[Config, dict]:
    """Flower's flat run-config -> (typed Config, runtime keys such as `out`)."""
    runtime = {k: v for k, v in run_config.items() if k in RUNTIME_KEYS}
    cfg = Config.from_flat(
        {k: v for k, v in run_config.items() if k not in RUNTIME_KEYS}
    )
    return cfg, runtime


@dataclass(frozen=True)
class RoundInfo:
    """The position a message's config carries."""

    task: int
    round: int
    server_round: int
    attempt: int
    teacher_id: str
    splits: list[str]


def read_config(record: ConfigRecord) -> tuple[Config, dict, RoundInfo]:
    """A message's config record -> (Config, runtime keys, position)."""
    values = dict(record)
    position = {k: values.pop(k) for k in ROUND_KEYS if k in values}
    cfg, runtime = split_run_config(values)
    info = RoundInfo(
        task=int(position.get(TASK, 0)),
        round=int(position.get(ROUND, 0)),
        server_round=int(position.get(SERVER_ROUND, 0)),
        attempt=int(position.get(ATTEMPT, 0)),
        teacher_id=str(position.get(TEACHER_ID, "")),
        splits=[s for s in str(position.get(SPLITS, "")).split(",") if s],
    )
    return cfg, runtime, info


# ----- codecs -------------------------------------------------------------------------
def means_record(means: ClassMeans) -> ArrayRecord:
    """Class means as (sum, count) on the wire: sites' records add up."""
    return ArrayRecord(array_dict={k: Array(v) for k, v in means.to_arrays().items()})


def means_from_record(record: ArrayRecord) -> ClassMeans:
    return ClassMeans.from_arrays({k: a.numpy() for k, a in record.items()})


def counts_record(counts: dict[str, Counts]) -> MetricRecord:
    """{split: Counts} -> `<split>-correct` / `<split>-total` integer lists."""
    record: dict[str, list[int]] = {}
    for split, c in counts.items():
        record[f"{split}-correct"] = [int(v) for v in c.correct.tolist()]
        record[f"{split}-total"] = [int(v) for v in c.total.tolist()]
    return MetricRecord(record)


def counts_from_record(record: MetricRecord, splits: list[str]) -> dict[str, Counts]:
    import torch

    out = {}
    for split in splits:
        correct = np.asarray(record[f"{split}-correct"], dtype=np.int64)
        total = np.asarray(record[f"{split}-total"], dtype=np.int64)
        out[split] = Counts(torch.from_numpy(correct), torch.from_numpy(total))
    return out
