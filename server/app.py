"""Flower ServerApp: the task schedule, a growing head, checked replies, aggregation.

`strategy.start()` cannot change the model between rounds, so this app owns the round
loop: at each task boundary it freezes the global model as the teacher and grows the
head by the task's classes; every round it sends model, teacher, shared class means
and the run's config to the sites, screens the replies (server/checks.py), and lets
a Flower strategy (FedAvg, FedMedian, FedTrimmedAvg, Krum) aggregate the sound ones.
Evaluation, metrics and output files are fl_ci's, the same as a single-machine run.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

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

from fl_ci.config import Config
from fl_ci.experiment import Experiment, evaluate, grow_for_task
from fl_ci.recorder import Recorder
from fl_ci.synthesis import ClassMeans
from server.checks import screen_replies
from server.strategies import build_strategy

log = logging.getLogger("fl_ci.server")

app = ServerApp()


def split_run_config(run_config: dict) -> tuple[Config, dict]:
    """Flower's flat run-config -> (typed Config, runtime keys such as `out`)."""
    runtime_keys = {"out", "progress", "print-summary"}
    runtime = {k: v for k, v in run_config.items() if k in runtime_keys}
    cfg = Config.from_flat(
        {k: v for k, v in run_config.items() if k not in runtime_keys}
    )
    return cfg, runtime


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, runtime = split_run_config(dict(context.run_config))
    out = Path(
        str(runtime.get("out") or f"runs/flower-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    summary = run_server(grid, cfg, out, progress=bool(runtime.get("progress", True)))
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


def run_server(grid: Grid, cfg: Config, out: Path, progress: bool = True) -> dict:
    """The whole study: every task, every round; writes `out` and returns the summary."""
    exp = Experiment.from_config(cfg)
    recorder = Recorder(cfg, exp.tasks, exp.class_names)
    strategy = build_strategy(cfg)
    model = exp.build_model()
    teacher = None
    means: ClassMeans | None = None
    nodes = wait_for_sites(grid, cfg.sites, cfg.federation.timeout)
    flat = cfg.to_flat()
    for task, classes in enumerate(exp.tasks):
        if task > 0:
            teacher = copy.deepcopy(model).eval()
            model = grow_for_task(model, len(classes), seed=cfg.seed * 1000 + task)
        for rnd in range(cfg.rounds_per_task):
            server_round = task * cfg.rounds_per_task + rnd + 1
            sent = ArrayRecord(torch_state_dict=model.state_dict())
            content = RecordDict(
                {
                    "arrays": sent,
                    "config": ConfigRecord(
                        {**flat, "task": task, "round": rnd, "out": str(out.resolve())}
                    ),
                }
            )
            if teacher is not None:
                content["teacher"] = ArrayRecord(torch_state_dict=teacher.state_dict())
            if means is not None:
                content["means"] = means_record(means)
            messages = [
                Message(
                    content=copy.copy(content), dst_node_id=node, message_type="train"
                )
                for node in nodes
            ]
            started = time.perf_counter()
            replies = list(
                grid.send_and_receive(messages, timeout=cfg.federation.timeout)
            )
            seconds = time.perf_counter() - started
            good, rejected = screen_replies(
                replies,
                sent,
                announced_classes=model.num_classes,
                max_norm_ratio=cfg.federation.max_norm_ratio,
            )
            missing = len(nodes) - len(replies)
            for r in rejected:
                log.warning(
                    "round %d: left out site %s: %s", server_round, r.site, r.reason
                )
                print(
                    f"round {server_round}: left out site {r.site}: {r.reason}",
                    flush=True,
                )
            if missing:
                print(f"round {server_round}: {missing} site(s) did not reply in time")
            if len(good) < max(cfg.federation.min_sites, 1):
                raise RuntimeError(
                    f"round {server_round} (task {task}, round {rnd}): only {len(good)} "
                    f"sound replies, {cfg.federation.min_sites} needed; the global model "
                    "was left as it was after the previous round"
                )
            arrays, _ = strategy.aggregate_train(
                server_round, [_for_strategy(r) for r in good]
            )
            if arrays is None:
                raise RuntimeError(
                    f"round {server_round}: the strategy returned no model"
                )
            state = arrays.to_torch_state_dict()
            model.load_state_dict(
                {k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}
            )
            if rnd == cfg.rounds_per_task - 1:
                shared = [
                    means_from_record(r.content["means"])
                    for r in good
                    if "means" in r.content.array_records
                ]
                if shared:
                    task_means = sum(shared[1:], shared[0])
                    means = task_means if means is None else means + task_means
            val = evaluate(exp, model, task, split="val")
            sent_bytes = sum(payload_bytes(m.content) for m in messages)
            recv_bytes = sum(
                payload_bytes(r.content) for r in replies if not r.has_error()
            )
            recorder.add_row(
                task=task,
                round=rnd,
                server_round=server_round,
                split="val",
                accuracy=val["accuracy"],
                old_accuracy=val["old_accuracy"],
                new_accuracy=val["new_accuracy"],
                sites_replied=len(replies),
                sites_aggregated=len(good),
                sites_rejected=len(rejected),
                round_seconds=seconds,
                bytes_sent=sent_bytes,
                bytes_received=recv_bytes,
                num_examples=int(
                    sum(r.content["metrics"]["num-examples"] for r in good)
                ),
            )
            if progress:
                print(
                    f"task {task} round {rnd}: {len(good)}/{len(nodes)} sites, val "
                    f"accuracy {val['accuracy']:.2f}%, {seconds:.1f} s, "
                    f"{sent_bytes / 1e6:.1f} MB sent",
                    flush=True,
                )
        result = evaluate(exp, model, task, split="test")
        recorder.add_task(task, result)
        recorder.write(out)
        if progress:
            print(
                f"task {task}: {exp.seen(task)} classes seen, test accuracy "
                f"{result['accuracy']:.2f}% (old {result['old_accuracy']:.2f}%, "
                f"new {result['new_accuracy']:.2f}%)",
                flush=True,
            )
    summary = recorder.write(out)
    torch.save(model.state_dict(), out / "model.pt")
    summary["table"] = recorder.table()
    return summary


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message (configs and metrics are negligible)."""
    return sum(record.count_bytes() for record in content.array_records.values())


def means_record(means: ClassMeans) -> ArrayRecord:
    """Class means as (sum, count) on the wire: sites' records add up."""
    return ArrayRecord(array_dict={k: Array(v) for k, v in means.to_arrays().items()})


def means_from_record(record: ArrayRecord) -> ClassMeans:
    return ClassMeans.from_arrays({k: a.numpy() for k, a in record.items()})


def _for_strategy(reply: Message) -> Message:
    """The reply as Flower's strategies expect it: one ArrayRecord, one MetricRecord."""
    metrics = reply.content["metrics"]
    content = RecordDict(
        {
            "arrays": reply.content["arrays"],
            "metrics": MetricRecord({"num-examples": metrics["num-examples"]}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type="train")
