"""Flower ClientApp: one hospital site.

It loads its own data (simulation: its partition from `partition-id` /
`num-partitions` in the node config), rebuilds model and teacher from the received
arrays, runs the configured method for one round (Class Impression synthesizes its
impressions once per task and keeps them on the site's disk, so a restarted site
synthesizes again rather than failing) and returns arrays, example count, metrics
and, after a task's last round, its class means as (sum, count).
"""

from __future__ import annotations

import logging
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

from fl_ci.data.base import DataError
from fl_ci.experiment import Experiment, site_class_means, site_round
from fl_ci.methods import SiteStore
from server.app import means_from_record, means_record, split_run_config

log = logging.getLogger("fl_ci.client")

app = ClientApp()


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
    cfg, runtime = split_run_config(cfg_record)
    site = site_number(context)
    try:
        exp = Experiment.from_config(cfg)
        model = exp.build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        teacher = None
        if "teacher" in msg.content.array_records:
            teacher = exp.build_model()
            teacher.load_state_dict(msg.content["teacher"].to_torch_state_dict())
            teacher.eval()
        class_means = None
        if "means" in msg.content.array_records and task > 0:
            shared = means_from_record(msg.content["means"])
            class_means = shared.means(list(range(exp.tasks[task][0])))
        model, metrics = site_round(
            exp,
            model,
            teacher,
            task=task,
            round=rnd,
            site=site,
            class_means=class_means,
            store=site_store(context, str(runtime.get("out", "runs")), site),
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
                    **{k: float(v) for k, v in metrics.items()},
                    "num-examples": int(metrics["num_examples"]),
                }
            ),
        }
    )
    if rnd == cfg.rounds_per_task - 1:
        mine = site_class_means(exp, task, site).restricted(
            cfg.synthesis.min_mean_count
        )
        if cfg.synthesis.mean_noise_std > 0:
            g = torch.Generator().manual_seed(cfg.seed * 131 + task * 17 + site)
            mine = mine.with_noise(cfg.synthesis.mean_noise_std, g)
        content["means"] = means_record(mine)
    return Message(content=content, reply_to=msg)


def problem_reply(msg: Message, site: int, reason: str) -> Message:
    """A reply that tells the server this site has nothing sound to give this round."""
    log.debug(traceback.format_exc())
    content = RecordDict(
        {
            "arrays": ArrayRecord(),
            "metrics": MetricRecord({"site": site, "num-examples": 0}),
            "problem": ConfigRecord({"reason": reason[:500]}),
        }
    )
    return Message(content=content, reply_to=msg)
