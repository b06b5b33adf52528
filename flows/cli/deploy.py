"""Commands that put the flows on a Prefect server: `opd serve`, `opd deploy`, `opd deploy-stages`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.app import (
    ConfigOpt,
    SetOpt,
    app,
    console,
    csv_list,
    fail,
    load,
)
from opd_tasks.errors import OpdError
from opd_tasks.stages import gpu_stages, stage_deployment_name


@app.command("serve")
def serve_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    cron: Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 2 * * *" (nightly at 02:00).')] = None,
    name: Annotated[str, typer.Option("--name", help="Deployment name; also the run it continues.")] = "nightly",
    iterations: Annotated[int, typer.Option("--iterations", "-n", min=1, help="Iterations per scheduled run.")] =
        1,
) -> None:
    """Serve the distill flow as a deployment (needs a Prefect server: `prefect server start`). Each run,
    scheduled or triggered with `prefect deployment run distill/NAME`, continues run NAME from its latest
    checkpoint on the next prompts. Blocks until interrupted."""
    try:
        cfg = load(config, [*(set_ or []), f"name={name}", f"iterations={iterations}"])
    except OpdError as e:
        fail(e)
    from flows.distill import distill

    console.print(f"serving deployment distill/{name} (cron {cron or 'none'}); storage root {cfg.resolved_root()}")
    distill.serve(name=name, cron=cron, parameters={"config": cfg.model_dump(mode="json"), "resume": True},
                  description=f"OPD run {name}: {iterations} iteration(s) per run, continuing from its latest "
                              "checkpoint")

@app.command("deploy")
def deploy_cmd(
    pool: Annotated[str, typer.Option("--pool", help="Work pool (create one: prefect work-pool create NAME "
                                                     "--type process).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    cron: Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 2 * * *".')] = None,
    name: Annotated[str, typer.Option("--name", help="Deployment name; also the run it continues.")] = "nightly",
    iterations: Annotated[int, typer.Option("--iterations", "-n", min=1, help="Iterations per run.")] = 1,
) -> None:
    """Register the distill flow as a deployment on a work pool (its workers run it from this checkout's
    source; a `process` pool runs it locally). Like `opd serve`, each run continues run NAME."""
    try:
        cfg = load(config, [*(set_ or []), f"name={name}", f"iterations={iterations}"])
    except OpdError as e:
        fail(e)
    if cfg.root is None:  # a worker's working directory is not ours: pin the storage root
        cfg = cfg.model_copy(update={"root": str(cfg.resolved_root().resolve())})
    from flows.distill import distill

    repo = Path(__file__).resolve().parents[2]
    dep_id = distill.from_source(source=str(repo), entrypoint="flows/distill.py:distill").deploy(
        name=name, work_pool_name=pool, cron=cron, build=False, push=False, print_next_steps=False,
        parameters={"config": cfg.model_dump(mode="json"), "resume": True},
        description=f"OPD run {name}: {iterations} iteration(s) per run, continuing from its latest checkpoint")
    console.print(f"deployment distill/{name} ({dep_id}) on work pool {pool!r}; storage root {cfg.root}. "
                  f"Start a worker: prefect worker start --pool {pool}", highlight=False)

@app.command("deploy-stages")
def deploy_stages_cmd(
    pool: Annotated[str, typer.Option("--pool", help="Work pool of the GPU workers (e.g. prefect work-pool create "
                                                     "gpu --type process; Kubernetes: --type kubernetes).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    stages: Annotated[str, typer.Option(help="Comma-separated GPU stages to deploy.")] = ",".join(gpu_stages()),
    work_queue: Annotated[str | None, typer.Option("--work-queue", help="Work queue in the pool (default: the "
                                                                        "pool's default queue).")] = None,
    concurrency_limit: Annotated[int | None, typer.Option(
        "--concurrency-limit", min=1, help="Most flow runs of each stage deployment at once (default: none; a "
                                           "pool limit caps all: prefect work-pool set-concurrency-limit POOL N).")]
        = None,
) -> None:
    """Register one deployment of the `opd-stage` flow per GPU stage on a work pool (from this checkout's source,
    no image build). Runs with `orchestration.stage_runner=deployment` start them with run_deployment; names
    come from `orchestration.stage_deployment` (default opd-stage/{stage})."""
    try:
        cfg = load(config, list(set_ or []))
        chosen = csv_list(stages, "--stages")
        bad = [s for s in chosen if s not in gpu_stages()]
        if bad:
            raise OpdError(f"--stages: not GPU stage(s) {bad}; GPU stages are {', '.join(gpu_stages())}")
        names = {s: stage_deployment_name(cfg.orchestration, s) for s in chosen}
    except OpdError as e:
        fail(e)
    from flows.stage import opd_stage

    repo = Path(__file__).resolve().parents[2]
    src = opd_stage.from_source(source=str(repo), entrypoint="flows/stage.py:opd_stage")
    tag = cfg.orchestration.concurrency_tag
    for stage, full in names.items():
        dep_id = src.deploy(
            name=full.split("/", 1)[1], work_pool_name=pool, work_queue_name=work_queue, build=False, push=False,
            print_next_steps=False, parameters={"stage": stage}, tags=[tag], concurrency_limit=concurrency_limit,
            description=f"OPD stage {stage}: one run per call from a distill flow with "
                        "orchestration.stage_runner=deployment (flows/stage.py)")
        console.print(f"deployment {full} ({dep_id}) on work pool {pool!r}", highlight=False)
    console.print(f"Start a worker: prefect worker start --pool {pool}. Run with --set "
                  "orchestration.stage_runner=deployment (and PREFECT_API_URL pointing at this server).",
                  highlight=False)
