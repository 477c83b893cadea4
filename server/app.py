"""Flower ServerApp: drives the one study loop (fl_ci/study.py) over Flower messages.

The study owns the task schedule, head growth, teacher, class means, evaluation,
recording and checkpoints; this app owns how a round's work reaches the sites and
comes back. Every round it sends the model, the shared class means and the run's
config to the sites, and the teacher to each site that does not hold it yet (once
per task, again only to a site that lost it), screens the replies
(server/checks.py), and lets a Flower strategy (FedAvg, FedMedian, FedTrimmedAvg,
Krum, optionally wrapped for central DP) aggregate the sound ones. A round with too
few sound replies is sent again once, then the run stops with the model as it was.
With `evaluation = "sites"` it sends evaluate messages and the sites return per-class
counts on their own held-out patients; the coordinator then loads no data at all.
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

from fl_ci.checkpoint import checkpoint_path
from fl_ci.config import Config
from fl_ci.methods.base import model_hash
from fl_ci.plan import StudyPlan
from fl_ci.privacy import central_dp_summary
from fl_ci.site import Counts
from fl_ci.study import RoundResult, Step, Study, average_new_rows
from fl_ci_flower import protocol as P
from server.checks import (
    Rejected,
    ScreenMemory,
    ScreenPolicy,
    bounded_weights,
    screen_replies,
    short_error,
    site_of,
    update_norm,
)
from server.strategies import build_strategy, is_dp

log = logging.getLogger("fl_ci.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, runtime = P.split_run_config(dict(context.run_config))
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


def wait_for_sites(
    grid: Grid, sites: int, timeout: float, every: float = 10.0
) -> list[int]:
    """Node ids once `sites` SuperNodes are connected, saying every `every` s how
    many are; an error after `timeout` s."""
    started = time.monotonic()
    said = started
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= sites:
            return nodes
        now = time.monotonic()
        if now - started > timeout:
            raise RuntimeError(
                f"only {len(nodes)} of {sites} sites connected within {timeout:.0f} s"
                f" (federation.timeout); {_MORE_NODES.format(sites=sites)}"
            )
        if now - said >= every:
            _say(
                f"waiting for sites: {len(nodes)} of {sites} connected after "
                f"{now - started:.0f} s; {_MORE_NODES.format(sites=sites)}"
            )
            said = now
        time.sleep(1.0)


_MORE_NODES = (
    "in Flower's simulation runtime start more with --federation-config "
    '"num-supernodes={sites}", or run with --run-config "sites=N" for the N there'
)


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

    Resumes after the last round checkpointed in `out`, if any. The server loads the
    study's data only when it evaluates itself (`evaluation` = "server" or "both").
    `stop_after_round` and `faults` are test switches (docs/reliability.md).
    """
    out = Path(out)
    central = None
    if cfg.evaluation in ("server", "both"):
        from fl_ci.experiment import Experiment

        central = Experiment.from_config(cfg)
    driver = FlowerDriver(grid, cfg, out, faults)
    study = Study(
        cfg,
        out,
        central=central,
        sites_eval=driver.evaluate if cfg.evaluation != "server" else None,
        progress=progress,
        stop_after_round=stop_after_round,
        say=_say,
    )
    wait_for_sites(grid, cfg.sites, cfg.federation.timeout)
    for step in study.rounds():
        study.finish_round(step, driver.run_round(step))
    privacy = None
    if is_dp(driver.strategy):  # site-level privacy spent, over every aggregated round
        aggregated = [
            r["sites_aggregated"] for r in study.recorder.rows if r["split"] == "val"
        ]
        privacy = central_dp_summary(
            cfg.federation.dp_noise_multiplier, cfg.sites, aggregated
        )
    extra = {**(privacy or {}), "sites_data": driver.site_rows}
    return study.finish(extra=extra, normalization=driver.normalization)


class FlowerDriver:
    """How a round reaches the sites and comes back, over Flower messages."""

    def __init__(self, grid: Grid, cfg: Config, out: Path, faults: str = "") -> None:
        self.grid, self.cfg, self.out, self.faults = grid, cfg, out, faults
        self.strategy = build_strategy(cfg)
        self.plan = StudyPlan.from_config(cfg)
        self.flat = cfg.to_flat()
        self.site_by_node: dict[int, int] = {}  # learnt from replies
        self.site_rows: dict[str, dict[str, int]] = {}  # rows each site reported
        self.sent_teacher: TeacherCopies | None = None
        fed = cfg.federation
        self.memory = ScreenMemory()  # the screen's references across rounds
        self.policy = ScreenPolicy(
            fed.max_norm_ratio, fed.max_update_ratio, fed.max_count_ratio
        )
        # the input (mean, std) the sites report; they must all agree
        self.normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def _config(self, step_task: int, **position) -> dict:
        base = {**self.flat, P.TASK: step_task, "out": str(self.out.resolve())}
        if self.faults:
            base["faults"] = self.faults
        return {**base, **position}

    def run_round(self, step: Step) -> RoundResult:
        """Send the round to every site (again, once, if too few sound replies came
        back), aggregate the sound replies; RoundFailed if there are too few."""
        cfg, server_round = self.cfg, step.server_round
        model, teacher = step.model, step.teacher
        sent = ArrayRecord(torch_state_dict=model.state_dict())
        started_at, started = time.time(), time.perf_counter()
        base = self._config(step.task, **{P.ROUND: step.round})
        extra: dict[str, ArrayRecord] = {}  # the same for every attempt
        if teacher is not None and (
            self.sent_teacher is None or self.sent_teacher.model is not teacher
        ):
            self.sent_teacher = TeacherCopies(teacher)
        if step.means is not None:
            extra[P.MEANS] = P.means_record(step.means)
        retries = cfg.federation.retries
        needed = max(cfg.federation.min_sites, 1)
        collected = RoundReplies()
        for attempt in range(retries + 1):
            config = ConfigRecord(
                {**base, P.SERVER_ROUND: server_round, P.ATTEMPT: attempt}
            )
            collect(
                self.grid,
                RecordDict({P.ARRAYS: sent, P.CONFIG: config, **extra}),
                collected,
                timeout=cfg.federation.timeout,
                announced_classes=model.num_classes,
                memory=self.memory,
                policy=self.policy,
                first_round=step.round == 0,
                site_by_node=self.site_by_node,
                teacher=self.sent_teacher if teacher is not None else None,
                why=self.plan.arrivals_at,
            )
            for note in collected.sat_out:
                _say(f"round {server_round}: {note}")
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
            reasons = "; ".join(collected.left_out + collected.sat_out)
            raise RoundFailed(
                f"round {server_round} (task {step.task}, round {step.round}): only "
                f"{_replies(len(collected.good))} after {retries + 1} attempts, "
                f"{needed} needed (federation.min_sites){': ' if reasons else ''}"
                f"{reasons[:2000]}. The global model was left as it was after "
                f"round {server_round - 1}"
                + (
                    f", saved in {checkpoint_path(self.out)}: run again with the same "
                    "output folder to resume"
                    if server_round > 1
                    else ""
                )
            )
        good = collected.good
        for reply in good:
            self._note_site_data(server_round, reply)
        seconds = time.perf_counter() - started
        weights = bounded_weights(
            good,
            task=step.task,
            memory=self.memory,
            max_share=cfg.federation.max_site_share,
        )
        for reply, weight in zip(good, weights, strict=True):
            claim = float(reply.content[P.METRICS][P.NUM_EXAMPLES])
            if weight < claim:
                _say(
                    f"round {server_round}: site {site_of(reply)} claims {claim:.0f} "
                    f"examples; its FedAvg weight is bounded at {weight:.0f}"
                )
        row = {
            "sites_replied": collected.replied,
            "sites_sat_out": len(collected.sat_out),
            "sat_out": "; ".join(collected.sat_out)[:2000],
            # sites that reported a problem or failed, and sites the screen rejected
            "sites_reported": sum(r.kind == "problem" for r in collected.rejected),
            "sites_rejected": sum(r.kind == "screen" for r in collected.rejected),
            "attempts": collected.attempts,
            "left_out": "; ".join(collected.notes)[:2000],
            "started_at": started_at,
            "round_seconds": seconds,
            "bytes_sent": collected.bytes_sent,
            "bytes_received": collected.bytes_received,
            # the screen's margin to its bound on the model's own norm, this round
            "update_ratio": self.memory.update_ratio,
        }
        note = (
            f"{len(good)}/{collected.sites} sites, {seconds:.1f} s, "
            f"{collected.bytes_sent / 1e6:.1f} MB sent"
        )
        return self._combine(step, sent, good, weights, row, note)

    def _combine(
        self,
        step: Step,
        sent: ArrayRecord,
        good: list[Message],
        weights: list[float],
        row: dict,
        note: str,
    ) -> RoundResult:
        """The round's result from the sound replies `good` (FedAvg weights
        `weights`), with a `redo` that leaves out the reply with the largest update."""
        metrics = [r.content[P.METRICS] for r in good]
        new_state = aggregate(
            self.strategy, step.server_round, good, sent, weights=weights
        )
        if self.cfg.federation.rehearse:
            new_state = average_new_rows(
                new_state,
                [new_head_rows(r.content[P.ARRAYS]) for r in good],
                [list(m.get(P.CLASSES, [])) for m in metrics],
                weights,
                num_old=step.model.num_old_classes,
            )
        means = None
        if step.last:
            shared = [
                P.means_from_record(r.content[P.MEANS])
                for r in sorted(good, key=_site_key)
                if P.MEANS in r.content.array_records
            ]
            means = sum(shared[1:], shared[0]) if shared else None
        row = {
            **row,
            "sites_aggregated": len(good),
            # sites without new data that trained on replay (federation.rehearse)
            "sites_rehearsing": sum(int(m.get(P.REHEARSAL, 0)) for m in metrics),
            "num_examples": int(sum(weights)),
        }

        def redo() -> RoundResult | None:
            if len(good) < 2:
                return None
            norms = [update_norm(r, sent) for r in good]
            worst = int(np.argmax(norms))
            _say(
                f"round {step.server_round}: aggregating again without site "
                f"{site_of(good[worst])} (largest update, norm {norms[worst]:.3g})"
            )
            keep = [i for i in range(len(good)) if i != worst]
            again = {
                **row,
                "left_out": (f"{row['left_out']}; " if row["left_out"] else "")
                + f"site {site_of(good[worst])}: left out by the aggregate check",
                "sites_rejected": row["sites_rejected"] + 1,
            }
            return self._combine(
                step,
                sent,
                [good[i] for i in keep],
                [weights[i] for i in keep],
                again,
                note,
            )

        return RoundResult(new_state, means, row, note, redo=redo)

    def _note_site_data(self, server_round: int, reply: Message) -> None:
        """Keep the rows a site reports; say which bad items it left out."""
        metrics = reply.content[P.METRICS]
        site = site_of(reply)
        self.site_rows[str(site)] = {
            k.removeprefix(P.ROWS): int(v)
            for k, v in metrics.items()
            if k.startswith(P.ROWS)
        }
        if P.NORM_MEAN in metrics:
            norm = (tuple(metrics[P.NORM_MEAN]), tuple(metrics[P.NORM_STD]))
            if self.normalization is None:
                self.normalization = norm
            elif not np.allclose(norm, self.normalization, rtol=1e-6, atol=1e-9):
                _say(
                    f"round {server_round}: site {site} normalises its input with "
                    f"mean/std {norm}, the other sites with {self.normalization}: "
                    "check that site's data.mean / data.std"
                )
        skipped = int(metrics.get(P.SKIPPED_ITEMS, 0))
        if skipped:
            named = []
            if P.NOTES in reply.content.config_records:
                named = list(reply.content[P.NOTES].get(P.SKIPPED, []))
            _say(
                f"round {server_round}: site {site} left out {skipped} bad data "
                f"item(s): "
                + "; ".join(str(n) for n in named[:5])
                + ("; ..." if skipped > 5 else "")
            )

    def evaluate(
        self, model: torch.nn.Module, task: int, splits: list[str]
    ) -> dict[int | str, dict[str, Counts]]:
        """The global model at every connected site: {site: {split: counts}}."""
        config = ConfigRecord(self._config(task, **{P.SPLITS: ",".join(splits)}))
        content = RecordDict(
            {
                P.ARRAYS: ArrayRecord(torch_state_dict=model.state_dict()),
                P.CONFIG: config,
            }
        )
        nodes = sorted(self.grid.get_node_ids())
        messages = [
            Message(content=copy.copy(content), dst_node_id=n, message_type="evaluate")
            for n in nodes
        ]
        replies = list(
            self.grid.send_and_receive(messages, timeout=self.cfg.federation.timeout)
        )
        out: dict[int | str, dict[str, Counts]] = {}
        for reply in replies:
            site = site_of(reply, self.site_by_node)
            if reply.has_error():
                _say(f"evaluation: site {site}: {short_error(reply.error.reason)}")
            elif P.PROBLEM in reply.content.config_records:
                reason = reply.content[P.PROBLEM].get(P.REASON, "unknown problem")
                _say(f"evaluation: site {site} reported: {reason}")
            else:
                out[site] = P.counts_from_record(reply.content[P.COUNTS], splits)
        missing = len(nodes) - len(out)
        if missing:
            _say(
                f"evaluation at task {task}: {missing} of {len(nodes)} site(s) gave no counts"
            )
        return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


@dataclass
class RoundReplies:
    """What a round's attempts brought back; `good` and `rejected` are the last's."""

    good: list[Message] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # the last attempt's
    sat_out: list[str] = field(default_factory=list)  # planned: no data for the task
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


def _problem_flag(reply: Message, key: str) -> bool:
    return (
        not reply.has_error()
        and P.PROBLEM in reply.content.config_records
        and bool(reply.content[P.PROBLEM].get(key, False))
    )


def needs_teacher(reply: Message) -> bool:
    """The site lost the task's teacher and asks for it again."""
    return _problem_flag(reply, P.NEEDS_TEACHER)


def sits_out(reply: Message) -> bool:
    """The site has no data of this task's classes, by the schedule: planned."""
    return _problem_flag(reply, P.SITS_OUT)


def collect(
    grid: Grid,
    content: RecordDict,
    into: RoundReplies,
    *,
    timeout: float,
    announced_classes: int,
    site_by_node: dict[int, int],
    memory: ScreenMemory | None = None,
    policy: ScreenPolicy | None = None,
    first_round: bool = True,
    teacher: TeacherCopies | None = None,
    why=None,
) -> None:
    """Send `content` (and the teacher where needed) to every connected node (a
    restarted SuperNode may have a new id), screen the replies and record the
    attempt in `into`; `why(site, task)` explains a planned sit-out."""
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
    task = int(content[P.CONFIG][P.TASK])
    into.sat_out = []
    for reply in (r for r in replies if sits_out(r)):
        site = site_of(reply)
        reason = why(site, task) if why and isinstance(site, int) else ""
        into.sat_out.append(
            f"site {site} has no data for task {task}"
            + (f" ({reason})" if reason else "")
            + ": sits this task out"
        )
    into.good, into.rejected = screen_replies(
        [r for r in replies if not sits_out(r)],
        content[P.ARRAYS],
        announced_classes=announced_classes,
        known_sites=site_by_node,
        memory=memory,
        policy=policy,
        task=task,
        first_round=first_round,
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
    weights: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The new global state dict from sound `replies`, ready to load into the model;
    `weights` (bounded example counts, in the order of `replies`) replace the claimed
    ones for FedAvg.

    Replies go to the strategy in site order, so the result does not depend on the
    order they arrived in (a resumed run then matches an uninterrupted one). The
    model is only replaced by the caller once this returned a finite state.
    """
    order = sorted(range(len(replies)), key=lambda i: _site_key(replies[i]))
    ordered = [replies[i] for i in order]
    ordered_weights = [weights[i] if weights is not None else None for i in order]
    dtypes = {k: np.dtype(sent[k].dtype) for k in sent.keys()}
    if is_dp(strategy):
        floats = [k for k, d in dtypes.items() if d.kind == "f"]
        # what configure_train would have set: the clipping reference
        strategy.current_arrays = _atleast_1d(sent, floats)
        inputs = [_for_strategy(r, keys=floats, weight=1) for r in ordered]
        for message in inputs:
            message.content[P.ARRAYS] = _atleast_1d(message.content[P.ARRAYS], floats)
    else:
        inputs = [
            _for_strategy(r, weight=w)
            for r, w in zip(ordered, ordered_weights, strict=True)
        ]
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
        if key.endswith("running_var"):
            # DP noise can push BatchNorm's running variance below 0, which makes
            # every output NaN; a variance is never negative, so project it back
            value = np.maximum(value, 0)
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


def _for_strategy(
    reply: Message, keys: list[str] | None = None, weight: float | None = None
) -> Message:
    """The reply as Flower's strategies expect it: one ArrayRecord (a copy: median
    and trimmed mean pop arrays out of it; only `keys` if given), one MetricRecord
    (`num-examples` is the weight; `weight` replaces it, e.g. equal weights for DP)."""
    metrics = reply.content[P.METRICS]
    arrays = reply.content[P.ARRAYS]
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord(
                {k: arrays[k] for k in (keys if keys is not None else arrays.keys())}
            ),
            P.METRICS: MetricRecord(
                {P.NUM_EXAMPLES: metrics[P.NUM_EXAMPLES] if weight is None else weight}
            ),
        }
    )
    return Message(content=content, dst_node_id=0, message_type="train")
