"""Flower ClientApp: one hospital site.

It loads its own data (simulation: its partition from `partition-id` /
`num-partitions` in the node config), rebuilds the model from the received arrays and
the teacher from the copy the server sends once per task (kept in the site's store; a
site that lost it replies `needs-teacher` and is sent it again), runs the configured method for one round (Class Impression synthesizes its
impressions once per task and keeps them on the site's disk, so a restarted site
synthesizes again rather than failing) and returns arrays, example count, metrics
and, after a task's last round, its class means as (sum, count). Its metrics name the
classes its data held, so the server can refuse a class it never announced; a site
whose data is unusable (labels the server did not announce, no rows) replies with a
"problem" record instead of weights.

Test-only fault injection (docs/reliability.md): the run-config key `faults`, e.g.
`"1:crash@2, 0:empty@3/0"`, makes site 1 raise at server round 2 and site 0 see an
empty partition at round 3's first attempt. Kinds: `crash` (an uncaught exception:
Flower turns it into an error reply), `bad-labels` (half the site's labels become a
class the server has not announced), `empty` (no rows), `restart` (the site's store
is deleted first, as on a fresh machine).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import traceback
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fl_ci.config import ConfigError
from fl_ci.data.base import DataError
from fl_ci.experiment import Experiment, shared_class_means, site_round
from fl_ci.methods import SiteStore
from server.app import means_from_record, means_record, split_run_config

log = logging.getLogger("fl_ci.client")

app = ClientApp()

FAULT_KINDS = ("crash", "bad-labels", "empty", "restart")
_FAULT = re.compile(r"(\d+):([a-z-]+)@(\d+)(?:/(\d+))?")


class InjectedCrash(Exception):
    """Raised by the `crash` test fault; deliberately not caught by the site."""


@dataclasses.dataclass(frozen=True)
class Fault:
    site: int
    kind: str
    server_round: int  # 1-based, as the server counts
    attempt: int | None  # None: every attempt of that round


def parse_faults(spec: str) -> list[Fault]:
    """`SITE:KIND@ROUND[/ATTEMPT]`, comma-separated (the `faults` run-config key)."""
    faults = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        m = _FAULT.fullmatch(item)
        if m is None or m.group(2) not in FAULT_KINDS:
            raise ConfigError(
                f"run-config key 'faults': {item!r} is not SITE:KIND@ROUND[/ATTEMPT] "
                f"with KIND one of {', '.join(FAULT_KINDS)}"
            )
        attempt = None if m.group(4) is None else int(m.group(4))
        faults.append(Fault(int(m.group(1)), m.group(2), int(m.group(3)), attempt))
    return faults


def active_faults(spec: str, site: int, server_round: int, attempt: int) -> set[str]:
    """The fault kinds that apply to this site's reply now."""
    return {
        f.kind
        for f in parse_faults(spec)
        if f.site == site
        and f.server_round == server_round
        and f.attempt in (None, attempt)
    }


def inject_data_fault(exp: Experiment, kinds: set[str]) -> None:
    """Make `exp.site_data` return an empty or mislabelled partition (test faults)."""
    original = exp.site_data

    def faulty(task: int, site: int, classes: list[int] | None = None):
        data = original(task, site, classes)
        if "empty" in kinds:
            return data.subset(torch.zeros(0, dtype=torch.long))
        labels = data.labels.clone()
        labels[::2] = exp.seen(task)  # the next task's first class, or none at all
        return dataclasses.replace(data, labels=labels)

    exp.site_data = faulty  # type: ignore[method-assign]


def site_number(context: Context) -> int:
    """This site's number: `partition-id` from the node config (simulation or a
    hospital's `--node-config "partition-id=2"`)."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise DataError(
            "node config lacks 'partition-id': start the SuperNode with "
            '--node-config "partition-id=N num-partitions=M"'
        ) from None


def site_store(context: Context, out: str, site: int) -> SiteStore:
    """The site's own disk: `store-dir` from the node config, else beside the run."""
    root = context.node_config.get("store-dir") or (
        Path(out) / "sites" / f"site-{site}"
    )
    return SiteStore(root)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg_record = dict(msg.content["config"])
    task, rnd = int(cfg_record.pop("task")), int(cfg_record.pop("round"))
    server_round = int(cfg_record.pop("server-round", 0))
    attempt = int(cfg_record.pop("attempt", 0))
    teacher_id = str(cfg_record.pop("teacher-id", ""))
    cfg, runtime = split_run_config(cfg_record)
    site = site_number(context)
    store = site_store(context, str(runtime.get("out", "runs")), site)
    faults = active_faults(str(runtime.get("faults", "")), site, server_round, attempt)
    if "crash" in faults:
        raise InjectedCrash(f"site {site}: injected crash at round {server_round}")
    if "restart" in faults and store.root is not None:
        log.warning("site %d: store %s removed (restart fault)", site, store.root)
        shutil.rmtree(store.root, ignore_errors=True)
    teacher_state = None
    if teacher_id:
        # the teacher comes once per task: keep it before anything else can fail
        if "teacher" in msg.content.array_records:
            teacher_state = msg.content["teacher"].to_torch_state_dict()
            store.put(f"teacher-{teacher_id}", teacher_state)
            store.prune("teacher-", keep=f"teacher-{teacher_id}")
        else:
            teacher_state = store.get(f"teacher-{teacher_id}")
            if teacher_state is None:
                return problem_reply(
                    msg,
                    site,
                    f"site {site} lost the task's teacher",
                    needs_teacher=True,
                )
    try:
        exp = Experiment.from_config(cfg)
        if faults & {"empty", "bad-labels"}:
            inject_data_fault(exp, faults)
        model = exp.build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        held = site_classes(exp, task, site, model.num_classes)
        for problem in exp.splits.skipped[:20]:
            log.warning("site %d skipped: %s", site, problem)
        teacher = None
        if teacher_state is not None:
            teacher = exp.build_model()
            teacher.load_state_dict(teacher_state)
            teacher.eval()
        class_means = None
        if "means" in msg.content.array_records and task > 0:
            # the method takes the classes it needs (fine-tuning none at all)
            class_means = means_from_record(msg.content["means"])
        model, metrics = site_round(
            exp,
            model,
            teacher,
            task=task,
            round=rnd,
            site=site,
            class_means=class_means,
            store=store,
            progress=False,
        )
    except (DataError, ValueError, RuntimeError) as err:
        # the site reports what went wrong; the server leaves it out of this round
        log.error("site %d, task %d, round %d: %s", site, task, rnd, err)
        return problem_reply(msg, site, f"{type(err).__name__}: {err}")
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=model.state_dict()),
            "metrics": MetricRecord(
                {
                    "site": site,
                    "num-classes": model.num_classes,
                    "classes": held,
                    **{k: float(v) for k, v in metrics.items()},
                    "num-examples": int(metrics["num_examples"]),
                    # bad manifest rows / cines left out (data.skip_bad), named in the log
                    "skipped-items": len(exp.splits.skipped),
                }
            ),
        }
    )
    if rnd == cfg.rounds_per_task - 1:
        content["means"] = means_record(shared_class_means(exp, task, site, store))
    return Message(content=content, reply_to=msg)


def site_classes(exp: Experiment, task: int, site: int, announced: int) -> list[int]:
    """The classes the site's data holds this task; a DataError if any of them is
    not among the `announced` classes of the model the server sent."""
    held = sorted(int(c) for c in exp.site_data(task, site).labels.unique().tolist())
    unknown = [c for c in held if not 0 <= c < announced]
    if unknown:
        raise DataError(
            f"site {site}, task {task}: its data holds labels {unknown[:5]} outside "
            f"the {announced} classes the server announced (0..{announced - 1})"
        )
    return held


def problem_reply(
    msg: Message, site: int, reason: str, needs_teacher: bool = False
) -> Message:
    """A reply that tells the server this site has nothing sound to give this round
    (with `needs_teacher`: not without the task's teacher, which it lost)."""
    log.debug(traceback.format_exc())
    content = RecordDict(
        {
            "arrays": ArrayRecord(),
            "metrics": MetricRecord({"site": site, "num-examples": 0}),
            "problem": ConfigRecord(
                {"reason": reason[:500], "needs-teacher": needs_teacher}
            ),
        }
    )
    return Message(content=content, reply_to=msg)
