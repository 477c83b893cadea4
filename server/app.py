"""Flower ServerApp: the task schedule, a growing head, checked replies, aggregation.

`strategy.start()` cannot change the model between rounds, so this app owns the round
loop: at each task boundary it freezes the global model as the teacher and grows the
head by the task's classes; every round it sends model, shared class means and the
run's config to the sites, and the teacher to each site that does not hold it yet
(once per task, again only to a site that lost it), screens the replies (server/checks.py), and lets
a Flower strategy (FedAvg, FedMedian, FedTrimmedAvg, Krum, optionally wrapped for
central DP) aggregate the sound ones. A round with too few sound replies is sent
again once, then the run stops with the model as it was; after every completed round
the state is checkpointed in `out/checkpoint.pt`, and a run started again with the
same `out` resumes there (fl_ci/checkpoint.py). Evaluation, metrics and output files
are fl_ci's, the same as a single-machine run.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fl_ci.checkpoint import (
    atomic_torch_save,
    checkpoint_path,
    end_of_round,
    load_checkpoint,
    restore,
)
from fl_ci.config import Config
from fl_ci.experiment import Experiment, average_new_rows, evaluate, grow_for_task
from fl_ci.methods.base import model_hash
from fl_ci.privacy import central_dp_summary
from fl_ci.recorder import Recorder
from fl_ci.synthesis import ClassMeans
from server.checks import Rejected, screen_replies, site_of
from server.strategies import build_strategy, is_dp

log = logging.getLogger("fl_ci.server")

app = ServerApp()


# run-config keys that are not Config knobs: where to write, what to print, and two
# test switches (documented in docs/reliability.md)
RUNTIME_KEYS = frozenset(
    {"out", "progress", "print-summary", "stop-after-round", "faults"}
)


def split_run_config(run_config: dict) -> tuple[Config, dict]:
    """Flower's flat run-config -> (typed Config, runtime keys such as `out`)."""
    runtime = {k: v for k, v in run_config.items() if k in RUNTIME_KEYS}
    cfg = Config.from_flat(
        {k: v for k, v in run_config.items() if k not in RUNTIME_KEYS}
    )
    return cfg, runtime


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, runtime = split_run_config(dict(context.run_config))
    out = Path(
        str(runtime.get("out") or f"runs/flower-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    summary = run_server(
        grid,
        cfg,
        out,
        progress=bool(runtime.get("progress", True)),
        stop_after_round=int(runtime.get("stop-after-round", 0)),
        faults=str(runtime.get("faults", "")),
    )
    if runtime.get("print-summary", True):
        print(summary["table"], flush=True)
        print(f"\nresults in {out.resolve()}", flush=True)


def wait_for_sites(grid: Grid, sites: int, timeout: float) -> list[int]:
    """Node ids once `sites` SuperNodes are connected; error after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= sites:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of {sites} sites connected within {timeout:.0f} s"
            )
        time.sleep(1.0)


class RoundFailed(RuntimeError):
    """A round had too few sound replies even when sent again; the model is unchanged."""


def _say(text: str) -> None:
    """A problem the operator must see: stdout (shown by every Flower runtime, and
    kept by the SuperLink for `flwr log`) and the log."""
    log.info(text)
    print(text, flush=True)


def run_server(
    grid: Grid,
    cfg: Config,
    out: Path,
    progress: bool = True,
    stop_after_round: int = 0,
    faults: str = "",
) -> dict:
    """The whole study: every task, every round; writes `out` and returns the summary.

    Resumes after the last round checkpointed in `out`, if any. `stop_after_round`
    and `faults` are test switches (docs/reliability.md).
    """
    out = Path(out)
    exp = Experiment.from_config(cfg)
    recorder = Recorder(cfg, exp.tasks, exp.class_names)
    strategy = build_strategy(cfg)
    model = exp.build_model()
    teacher = None
    means: ClassMeans | None = None
    done = 0
    state = load_checkpoint(out, cfg)
    if state is not None:
        resumed = restore(state, exp, recorder)
        model, teacher, means = resumed.model, resumed.teacher, resumed.means
        done = resumed.server_round
        print(f"resuming {out} after round {done}", flush=True)
    wait_for_sites(grid, cfg.sites, cfg.federation.timeout)
    flat = cfg.to_flat()
    retries = cfg.federation.retries
    needed = max(cfg.federation.min_sites, 1)
    site_by_node: dict[int, int] = {}  # learnt from replies: names a failed node's site
    sent_teacher: TeacherCopies | None = None
    rounds = cfg.rounds_per_task
    for task, classes in enumerate(exp.tasks):
        first = task * rounds + 1
        if first + rounds - 1 <= done:
            continue  # the whole task was completed before a restart
        if task > 0 and first > done:
            teacher = copy.deepcopy(model).eval()
            model = grow_for_task(model, len(classes), seed=cfg.seed * 1000 + task)
        for rnd in range(rounds):
            server_round = first + rnd
            if server_round <= done:
                continue
            sent = ArrayRecord(torch_state_dict=model.state_dict())
            started_at, started = time.time(), time.perf_counter()
            base = {**flat, "task": task, "round": rnd, "out": str(out.resolve())}
            if faults:
                base["faults"] = faults
            extra: dict[str, ArrayRecord] = {}  # the same for every attempt
            if teacher is not None and (
                sent_teacher is None or sent_teacher.model is not teacher
            ):
                sent_teacher = TeacherCopies(teacher)
            if means is not None:
                extra["means"] = means_record(means)
            collected = RoundReplies()
            for attempt in range(retries + 1):
                config = ConfigRecord(
                    {**base, "server-round": server_round, "attempt": attempt}
                )
                collect(
                    grid,
                    RecordDict({"arrays": sent, "config": config, **extra}),
                    collected,
                    timeout=cfg.federation.timeout,
                    announced_classes=model.num_classes,
                    max_norm_ratio=cfg.federation.max_norm_ratio,
                    site_by_node=site_by_node,
                    teacher=sent_teacher,
                )
                for note in collected.left_out:
                    _say(f"round {server_round}: left out {note}")
                if len(collected.good) >= needed:
                    break
                if attempt < retries:
                    _say(
                        f"round {server_round}: only {_replies(len(collected.good))}, "
                        f"{needed} needed; sending the round to every site again "
                        f"(attempt {attempt + 2} of {retries + 1})"
                    )
            else:
                reasons = "; ".join(collected.left_out)
                raise RoundFailed(
                    f"round {server_round} (task {task}, round {rnd}): only "
                    f"{_replies(len(collected.good))} after {retries + 1} attempts, "
                    f"{needed} needed (federation.min_sites){': ' if reasons else ''}"
                    f"{reasons[:2000]}. The global model was left as it was after "
                    f"round {server_round - 1}"
                    + (
                        f", saved in {checkpoint_path(out)}: run again with the same "
                        "output folder to resume"
                        if server_round > 1
                        else ""
                    )
                )
            good, rejected = collected.good, collected.rejected
            for reply in good:
                skipped = int(reply.content["metrics"].get("skipped-items", 0))
                if skipped:
                    _say(
                        f"round {server_round}: site {site_of(reply)} left out "
                        f"{skipped} bad data item(s) (named in its log)"
                    )
            seconds = time.perf_counter() - started
            num_examples = int(sum(r.content["metrics"]["num-examples"] for r in good))
            new_state = aggregate(strategy, server_round, good, sent)
            if cfg.federation.rehearse:
                new_state = average_new_rows(
                    new_state,
                    [new_head_rows(r.content["arrays"]) for r in good],
                    [list(r.content["metrics"].get("classes", [])) for r in good],
                    [float(r.content["metrics"]["num-examples"]) for r in good],
                    num_old=exp.tasks[task][0],
                )
            model.load_state_dict(new_state)
            if rnd == rounds - 1:
                shared = [
                    means_from_record(r.content["means"])
                    for r in sorted(good, key=_site_key)
                    if "means" in r.content.array_records
                ]
                if shared:
                    task_means = sum(shared[1:], shared[0])
                    means = task_means if means is None else means + task_means
            val = evaluate(exp, model, task, split="val")
            recorder.add_row(
                task=task,
                round=rnd,
                server_round=server_round,
                split="val",
                accuracy=val["accuracy"],
                old_accuracy=val["old_accuracy"],
                new_accuracy=val["new_accuracy"],
                sites_replied=collected.replied,
                sites_aggregated=len(good),
                # sites without new data that trained on replay (federation.rehearse)
                sites_rehearsing=sum(
                    int(r.content["metrics"].get("rehearsal", 0)) for r in good
                ),
                sites_rejected=len(rejected),
                attempts=collected.attempts,
                left_out="; ".join(collected.notes)[:2000],
                started_at=started_at,
                round_seconds=seconds,
                bytes_sent=collected.bytes_sent,
                bytes_received=collected.bytes_received,
                num_examples=num_examples,
            )
            if progress:
                print(
                    f"task {task} round {rnd}: {len(good)}/{collected.sites} sites, val "
                    f"accuracy {val['accuracy']:.2f}%, {seconds:.1f} s, "
                    f"{collected.bytes_sent / 1e6:.1f} MB sent",
                    flush=True,
                )
            if rnd == rounds - 1:
                recorder.test_task(exp, model, task, progress)
                recorder.write(out)  # outputs so far, after every task
            end_of_round(
                out,
                cfg=cfg,
                server_round=server_round,
                model=model,
                teacher=teacher,
                means=means,
                recorder=recorder,
                stop_after_round=stop_after_round,
            )
    privacy = None
    if is_dp(strategy):  # site-level privacy spent, over every aggregated round
        aggregated = [
            r["sites_aggregated"] for r in recorder.rows if r["split"] == "val"
        ]
        privacy = central_dp_summary(
            cfg.federation.dp_noise_multiplier, cfg.sites, aggregated
        )
    summary = recorder.write(out, extra=privacy)
    atomic_torch_save(model.state_dict(), out / "model.pt")
    summary["table"] = recorder.table()
    return summary


@dataclass
class RoundReplies:
    """What a round's attempts brought back; `good` and `rejected` are the last's."""

    good: list[Message] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # the last attempt's
    notes: list[str] = field(default_factory=list)  # every attempt's, for the row
    replied: int = 0
    sites: int = 0
    attempts: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class TeacherCopies:
    """The frozen end-of-task model and the nodes known to hold it.

    A site keeps the teacher in its store for the whole task, so it travels once per
    task rather than every round (it is as large as the model). A node that answered
    a message carrying it holds it; a node that lost it (a restarted site) replies
    `needs-teacher` and is sent the round again with it."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.model = teacher
        self.id = model_hash(teacher)
        self.record = ArrayRecord(torch_state_dict=teacher.state_dict())
        self.holders: set[int] = set()

    def message(self, content: RecordDict, node: int, force: bool = False) -> Message:
        """`content` for `node`, with the teacher's id, and the teacher itself if the
        node may not hold it."""
        content = copy.copy(content)
        config = ConfigRecord(dict(content["config"]))
        config["teacher-id"] = self.id
        content["config"] = config
        if force or node not in self.holders:
            content["teacher"] = self.record
        return Message(content=content, dst_node_id=node, message_type="train")


def needs_teacher(reply: Message) -> bool:
    return (
        not reply.has_error()
        and "problem" in reply.content.config_records
        and bool(reply.content["problem"].get("needs-teacher", False))
    )


def collect(
    grid: Grid,
    content: RecordDict,
    into: RoundReplies,
    *,
    timeout: float,
    announced_classes: int,
    max_norm_ratio: float,
    site_by_node: dict[int, int],
    teacher: TeacherCopies | None = None,
) -> None:
    """Send `content` (and the teacher where needed) to every connected node (a
    restarted SuperNode may have a new id), screen the replies and record the
    attempt in `into`."""
    nodes = sorted(grid.get_node_ids())
    if teacher is None:
        messages = [
            Message(content=copy.copy(content), dst_node_id=node, message_type="train")
            for node in nodes
        ]
    else:
        messages = [teacher.message(content, node) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    if teacher is not None:
        lost = [r.metadata.src_node_id for r in replies if needs_teacher(r)]
        if lost:  # the same round again, now with the teacher, to those nodes only
            again = [teacher.message(content, node, force=True) for node in lost]
            messages += again
            replies = [r for r in replies if not needs_teacher(r)]
            replies += list(grid.send_and_receive(again, timeout=timeout))
        teacher.holders.update(
            r.metadata.src_node_id
            for r in replies
            if not r.has_error() and not needs_teacher(r)
        )
    learn_sites(replies, site_by_node)
    into.good, into.rejected = screen_replies(
        replies,
        content["arrays"],
        announced_classes=announced_classes,
        max_norm_ratio=max_norm_ratio,
        known_sites=site_by_node,
    )
    answered = {r.metadata.src_node_id for r in replies}
    into.left_out = [f"site {r.site}: {r.reason}" for r in into.rejected] + [
        f"site {site_by_node.get(n, f'node {n}')}: no reply within {timeout:.0f} s"
        for n in nodes
        if n not in answered
    ]
    into.attempts += 1
    into.notes += [f"{note} (attempt {into.attempts})" for note in into.left_out]
    into.replied, into.sites = len(replies), len(nodes)
    into.bytes_sent += sum(payload_bytes(m.content) for m in messages)
    into.bytes_received += sum(
        payload_bytes(r.content) for r in replies if not r.has_error()
    )


def _replies(n: int) -> str:
    return f"{n} sound {'reply' if n == 1 else 'replies'}"


def learn_sites(replies: list[Message], site_by_node: dict[int, int]) -> None:
    """Remember which site each node is, from the site numbers replies report."""
    for reply in replies:
        site = site_of(reply)
        if isinstance(site, int):
            site_by_node[reply.metadata.src_node_id] = site


def _site_key(reply: Message) -> tuple[int, int | str]:
    site = site_of(reply)
    return (0, site) if isinstance(site, int) else (1, str(site))


def aggregate(
    strategy: Strategy,
    server_round: int,
    replies: list[Message],
    sent: ArrayRecord,
) -> dict[str, torch.Tensor]:
    """The new global state dict from sound `replies`, ready to load into the model.

    Replies go to the strategy in site order, so the result does not depend on the
    order they arrived in (a resumed run then matches an uninterrupted one). The
    model is only replaced by the caller once this returned a finite state.
    """
    ordered = sorted(replies, key=_site_key)
    dtypes = {k: np.dtype(sent[k].dtype) for k in sent.keys()}
    if is_dp(strategy):
        floats = [k for k, d in dtypes.items() if d.kind == "f"]
        # what configure_train would have set: the clipping reference
        strategy.current_arrays = _atleast_1d(sent, floats)
        inputs = [_for_strategy(r, keys=floats, weight=1) for r in ordered]
        for message in inputs:
            message.content["arrays"] = _atleast_1d(message.content["arrays"], floats)
    else:
        inputs = [_for_strategy(r) for r in ordered]
    arrays, _ = strategy.aggregate_train(server_round, inputs)
    if arrays is None:
        raise RoundFailed(f"round {server_round}: the strategy returned no model")
    state = {}
    for key, dtype in dtypes.items():
        value = arrays[key].numpy() if key in arrays else sent[key].numpy()
        value = np.asarray(value).reshape(sent[key].shape)
        if dtype.kind == "f" and not np.isfinite(value).all():
            raise RoundFailed(
                f"round {server_round}: the aggregate of '{key}' holds NaN or Inf; "
                f"the global model was left as it was after round {server_round - 1}"
            )
        # integer buffers (BatchNorm's batch count) come back as floats from a median
        state[key] = torch.from_numpy(value.astype(dtype, copy=False))
    return state


def _atleast_1d(record: ArrayRecord, keys: list[str]) -> ArrayRecord:
    """`keys` of `record`, 0-d arrays as shape (1,): Flower 1.41's DP clipping scales
    arrays in place, and the difference of two 0-d arrays is a numpy scalar, which is
    rebound rather than scaled, so a scalar parameter (the cosine head's scale) would
    escape clipping."""
    return ArrayRecord({k: Array(np.atleast_1d(record[k].numpy())) for k in keys})


def new_head_rows(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The new-class head rows (`head.new_*`) of a reply, all `average_new_rows`
    reads, without converting the rest of the model."""
    return {
        k: torch.from_numpy(arrays[k].numpy())
        for k in arrays.keys()
        if k.startswith("head.new_")
    }


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message (configs and metrics are negligible)."""
    return sum(record.count_bytes() for record in content.array_records.values())


def means_record(means: ClassMeans) -> ArrayRecord:
    """Class means as (sum, count) on the wire: sites' records add up."""
    return ArrayRecord(array_dict={k: Array(v) for k, v in means.to_arrays().items()})


def means_from_record(record: ArrayRecord) -> ClassMeans:
    return ClassMeans.from_arrays({k: a.numpy() for k, a in record.items()})


def _for_strategy(
    reply: Message, keys: list[str] | None = None, weight: int | None = None
) -> Message:
    """The reply as Flower's strategies expect it: one ArrayRecord (a copy: median
    and trimmed mean pop arrays out of it; only `keys` if given), one MetricRecord
    (`num-examples` is the weight; `weight` replaces it, e.g. equal weights for DP)."""
    metrics = reply.content["metrics"]
    arrays = reply.content["arrays"]
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {k: arrays[k] for k in (keys if keys is not None else arrays.keys())}
            ),
            "metrics": MetricRecord(
                {"num-examples": metrics["num-examples"] if weight is None else weight}
            ),
        }
    )
    return Message(content=content, dst_node_id=0, message_type="train")
