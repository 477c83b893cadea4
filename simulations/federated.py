"""A federated study in Flower's simulation runtime, from Python.

`flwr.simulation.run_simulation` takes no run-config, so the ServerApp is wrapped to
receive the scenario's flat config (plus the output folder); clients get everything
from the config record of each message. Each simulated site asks Ray for
`federation.cpus_per_site` CPUs and `federation.gpus_per_site` GPUs (fractions share
one GPU). The server checkpoints after every round in `out/checkpoint.pt`; calling
again with the same `out` resumes after the last completed round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fl_ci.config import Config, ConfigError


def run_federated(
    cfg: Config,
    out: str | Path,
    progress: bool = True,
    *,
    stop_after_round: int = 0,
    faults: str = "",
) -> dict[str, Any]:
    """Run `cfg` with `cfg.sites` simulated SuperNodes; returns the summary.

    Test switches (docs/reliability.md): `stop_after_round` stops the server once that
    round is checkpointed; `faults` injects site faults (`client.faults.parse_faults`).
    A server failure is raised here with its own type.
    """
    for key, value in (
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("FLWR_DISABLE_UPDATE_CHECK", "1"),
        ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
        ("RAY_DEDUP_LOGS", "0"),
    ):
        os.environ.setdefault(key, value)
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from client.faults import parse_faults
    from server.app import main as server_main

    parse_faults(faults)  # a malformed spec stops here, not in every site
    out = Path(out).resolve()
    run_config = {
        **cfg.to_flat(),
        "out": str(out),
        "progress": progress,
        "print-summary": False,  # the caller prints it
        "stop-after-round": int(stop_after_round),
        "faults": faults,
    }
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        context.run_config = dict(run_config)
        server_main(grid, context)

    fed = cfg.federation
    if fed.gpus_per_site > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"config key 'federation.gpus_per_site' = {fed.gpus_per_site} but no "
                "CUDA device is present: Ray would never schedule a site"
            )
    # an existing Ray cluster (RAY_ADDRESS) brings its own resources; else use ours
    init_args: dict[str, Any] = {"include_dashboard": False}
    if os.environ.get("RAY_ADDRESS"):
        init_args["address"] = os.environ["RAY_ADDRESS"]
    else:
        init_args["num_cpus"] = max(int(os.cpu_count() or 1), 1)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.sites,
        backend_config={
            "client_resources": {
                "num_cpus": fed.cpus_per_site,
                "num_gpus": fed.gpus_per_site,
            },
            "init_args": init_args,
        },
    )
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the server app wrote no {summary_path}; see the log above")
    summary = json.loads(summary_path.read_text())
    from fl_ci.recorder import SUMMARY_COLUMNS
    from fl_ci.results import format_table

    summary["table"] = format_table([summary], SUMMARY_COLUMNS)
    return summary
