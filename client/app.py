"""Flower ClientApp: one hospital site. Records in, `fl_ci.site` calls, records out.

Where its data comes from is the node's business, named in its node config:
- deployment: `data-root` is the hospital's own folder (an echo manifest with its
  cines, or a CIFAR-style folder); every row of it is read and split by patient, and
  `site-id` (optional) is its number in the study's schedule and reports;
- simulation: `partition-id` picks a virtual site's share of the one simulated study.
The site builds its data once per process (`fl_ci.site.open_site_data`).

A train message brings the global model, the study config, the teacher (once per
task; kept in the site's store, and a site that lost it replies `needs-teacher`) and
the old classes' shared class means; the site runs one round of the configured
method and returns weights, metrics and, after a task's last round, its class means.
A site whose data is unusable replies with a `problem` record instead of weights:
a site with no data of the task's classes (by the schedule) says it sits out. An
evaluate message brings the global model; the site returns per-class correct and
total counts on its own held-out patients.
"""

from __future__ import annotations

import logging
import shutil
import traceback
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.faults import ATTACKS, FaultySite, InjectedCrash, active_faults, attack
from fl_ci.config import Config, ConfigError
from fl_ci.data.base import DataError
from fl_ci.methods import SiteStore
from fl_ci.site import (
    NoTaskData,
    SiteData,
    evaluate_site,
    open_site_data,
    shared_class_means,
    site_round,
)
from fl_ci_flower import protocol as P

log = logging.getLogger("fl_ci.client")

app = ClientApp()


def site_number(context: Context) -> int:
    """This site's number: `site-id` (deployment, optional: else the node id) or
    `partition-id` (simulation)."""
    config = context.node_config
    for key in (P.SITE_ID, P.PARTITION_ID):
        if key in config:
            try:
                return int(config[key])
            except (TypeError, ValueError):
                raise DataError(
                    f"node config key '{key}' must be an integer, got {config[key]!r}"
                ) from None
    return int(context.node_id)


def site_data(cfg: Config, context: Context) -> SiteData:
    """The site's data as its node config names it; a DataError naming the key or
    the folder otherwise."""
    config = context.node_config
    root = str(config.get(P.DATA_ROOT, "") or "")
    if root:
        if not Path(root).is_dir():
            raise DataError(
                f"node config key '{P.DATA_ROOT}' = {root!r}: no such folder at this "
                "site"
            )
        return open_site_data(cfg, root=root, partition=site_number(context))
    if P.PARTITION_ID in config:
        return open_site_data(cfg, root=None, partition=site_number(context))
    raise DataError(
        f"node config names no data: start the SuperNode with --node-config "
        f"\"{P.DATA_ROOT}='/path/to/this/site/data'\" (a manifest folder), or "
        f"'{P.PARTITION_ID}' in a simulation"
    )


def site_store(context: Context, out: str, site: int) -> SiteStore:
    """The site's own disk: `store-dir` from the node config, else beside the run."""
    root = context.node_config.get(P.STORE_DIR) or (
        Path(out) / "sites" / f"site-{site}"
    )
    return SiteStore(root)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, runtime, at = P.read_config(msg.content[P.CONFIG])
    try:
        site = site_number(context)
    except DataError as err:
        return problem_reply(msg, -1, str(err))
    store = site_store(context, str(runtime.get("out", "runs")), site)
    faults = active_faults(
        str(runtime.get("faults", "")), site, at.server_round, at.attempt
    )
    if "crash" in faults:
        raise InjectedCrash(f"site {site}: injected crash at round {at.server_round}")
    if "restart" in faults and store.root is not None:
        log.warning("site %d: store %s removed (restart fault)", site, store.root)
        shutil.rmtree(store.root, ignore_errors=True)
    teacher_state = None
    if at.teacher_id:
        # the teacher comes once per task: keep it before anything else can fail
        key = f"teacher-{at.teacher_id}"
        if P.TEACHER in msg.content.array_records:
            teacher_state = msg.content[P.TEACHER].to_torch_state_dict()
            store.put(key, teacher_state)
            store.prune("teacher-", keep=key)
        else:
            teacher_state = store.get(key)
            if teacher_state is None:
                return problem_reply(
                    msg,
                    site,
                    f"site {site} lost the task's teacher",
                    needs_teacher=True,
                )
    try:
        data = site_data(cfg, context)
        if faults & {"empty", "bad-labels"}:
            data = FaultySite(data, faults)
        model = received_model(data, msg.content[P.ARRAYS].to_torch_state_dict())
        held = site_classes(data, at.task, model.num_classes)
        for problem in data.skipped[:20]:
            log.warning("site %d skipped: %s", site, problem)
        teacher = None
        if teacher_state is not None:
            teacher = received_model(data, teacher_state).eval()
        class_means = None
        if P.MEANS in msg.content.array_records and at.task > 0:
            # the method takes the classes it needs (fine-tuning none at all)
            class_means = P.means_from_record(msg.content[P.MEANS])
        model, metrics = site_round(
            data,
            model,
            teacher,
            task=at.task,
            round=at.round,
            class_means=class_means,
            store=store,
            progress=False,
        )
    except NoTaskData as err:
        log.info("site %d, task %d: %s; sits this task out", site, at.task, err)
        return problem_reply(msg, site, str(err), sits_out=True)
    except (DataError, ConfigError, ValueError, RuntimeError) as err:
        # the site reports what went wrong; the server leaves it out of this round
        log.error("site %d, task %d, round %d: %s", site, at.task, at.round, err)
        return problem_reply(msg, site, f"{type(err).__name__}: {err}")
    state, claimed = model.state_dict(), None
    if faults & set(ATTACKS):  # test-only: this site's reply is an attack
        state, claimed = attack(
            faults, msg.content[P.ARRAYS].to_torch_state_dict(), state
        )
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord(torch_state_dict=state),
            P.METRICS: MetricRecord(
                {
                    P.SITE: site,
                    P.NUM_CLASSES: model.num_classes,
                    P.CLASSES: held,
                    **{k: float(v) for k, v in metrics.items()},
                    P.NUM_EXAMPLES: claimed or int(metrics["num_examples"]),
                    P.SKIPPED_ITEMS: len(data.skipped),
                    **{P.ROWS + k: int(v) for k, v in data.row_counts().items()},
                    P.NORM_MEAN: [float(v) for v in data.normalization[0]],
                    P.NORM_STD: [float(v) for v in data.normalization[1]],
                }
            ),
        }
    )
    if data.skipped:
        content[P.NOTES] = ConfigRecord(
            {P.SKIPPED: [s[:300] for s in data.skipped[:10]]}
        )
    if at.round == cfg.rounds_at(at.task) - 1:
        content[P.MEANS] = P.means_record(shared_class_means(data, at.task, store))
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on this site's own held-out patients: per-class counts."""
    cfg, _, at = P.read_config(msg.content[P.CONFIG])
    site = -1  # until the node config has given the site's number
    try:
        site = site_number(context)
        data = site_data(cfg, context)
        model = received_model(data, msg.content[P.ARRAYS].to_torch_state_dict())
        counts = evaluate_site(data, model, at.task, at.splits)
    except (DataError, ConfigError, ValueError, RuntimeError) as err:
        log.error("evaluation at task %d: %s", at.task, err)
        return problem_reply(msg, site, f"{type(err).__name__}: {err}")
    content = RecordDict(
        {
            P.COUNTS: P.counts_record(counts),
            P.METRICS: MetricRecord({P.SITE: site}),
        }
    )
    return Message(content=content, reply_to=msg)


def received_model(data: SiteData, state: dict):
    """The study's model with received weights (the head adopts their row counts)."""
    model = data.plan.build_model()
    model.load_state_dict(state)
    return model


def site_classes(data: SiteData, task: int, announced: int) -> list[int]:
    """The classes the site's data holds this task; a DataError if any of them is
    not among the `announced` classes of the model the server sent."""
    held = sorted(int(c) for c in data.train(task).labels.unique().tolist())
    unknown = [c for c in held if not 0 <= c < announced]
    if unknown:
        raise DataError(
            f"site {data.number}, task {task}: its data holds labels {unknown[:5]} "
            f"outside the {announced} classes the server announced (0..{announced - 1})"
        )
    return held


def problem_reply(
    msg: Message,
    site: int,
    reason: str,
    needs_teacher: bool = False,
    sits_out: bool = False,
) -> Message:
    """A reply that tells the server this site has nothing sound to give this round
    (with `needs_teacher`: not without the task's teacher, which it lost; with
    `sits_out`: by the schedule, it has no data for this task)."""
    log.debug(traceback.format_exc())
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord(),
            P.METRICS: MetricRecord({P.SITE: site, P.NUM_EXAMPLES: 0}),
            P.PROBLEM: ConfigRecord(
                {
                    P.REASON: reason[:500],
                    P.NEEDS_TEACHER: needs_teacher,
                    P.SITS_OUT: sits_out,
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)
