"""The parent flow and the per-stage flows. Composition only: the work is in sit_core."""

from __future__ import annotations

import functools
from pathlib import Path

from prefect import Flow
from prefect.logging import get_run_logger
from prefect.states import Failed

from sit_core.config import STAGE_ORDER, SitConfig
from sit_core.console_events import timed_stage
from sit_core.errors import SitError
from sit_core.pipeline import config_for_hardware, prepare_run
from sit_core.stages import declared, graph_edges
from sit_prefect.local_server import start_temporary_server
from sit_prefect.stage_task import drop_stale_result, stage_task_for


class SitFlow(Flow):
    """A Prefect flow that, called from Python with no PREFECT_API_URL (`sit run`, a Colab
    cell), first brings up Prefect's temporary server itself: a slow cold start is announced
    and given time, and one that fails is a SitError, where Prefect alone dies after 20 s with
    a bare timeout. A deployment's worker sets PREFECT_API_URL, so there it does nothing."""

    def __call__(self, *args, **kwargs):
        start_temporary_server()
        return super().__call__(*args, **kwargs)


def flow(**options):
    """prefect.flow for sit's flows, making a SitFlow."""
    return lambda fn: SitFlow(fn=fn, **options)


def fails_cleanly(fn):
    """A SitError (bad input, not enough data, a locked run directory) ends the flow run as
    Failed with the problem and its fix as the message, without a traceback: the user acts on
    the message, and the stack tells them nothing more. The caller of the flow still gets the
    SitError raised. Any other exception keeps Prefect's full traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SitError as err:
            return Failed(message=str(err), data=err)

    return wrapper


def _run_stages(cfg: SitConfig, run_dir: Path, stages: list[str], workers: int | None = None,
                devices: list[str] | None = None, ray: str | None = None,
                shard_cfg: SitConfig | None = None) -> dict:
    """Each stage's summary, with `cached: True` where Prefect served it from the run dir.
    With `ray`, the sharded stages run their shards there, under `shard_cfg` (the config as it
    resolves on the cluster's workers; it differs from `cfg` in performance fields only).

    Stages run one at a time, in order (a GPU holds one model at a time), but each task waits
    for the stages it reads from (`wait_for`), so the UI's run graph draws the pipeline's
    declared shape. Each stage's start and finish (wall time around the task call, cache hit
    or not) go to the console channel (sit_core/console_events.py) that `sit run` renders."""
    results, futures = {}, {}
    for stage in stages:
        drop_stale_result(stage, cfg, run_dir)
        on_cluster = ray is not None and declared(stage).sharding is not None
        with timed_stage(stage) as outcome:
            future = stage_task_for(stage, run_dir).submit(
                stage, (shard_cfg if on_cluster else cfg).model_dump(mode="json"), str(run_dir), workers, devices,
                ray if on_cluster else None, wait_for=[futures[s] for s in graph_edges(stage) if s in futures])
            future.wait()
            futures[stage] = future
            results[stage] = {**future.state.result(), "cached": future.state.name == "Cached"}
            outcome.update(status=results[stage].get("status"), cached=results[stage]["cached"])
    return results


def _pipeline(run_dir: str, config: dict | str | None, preset: str | None, profile: str | None,
              overrides: list[str] | None, stages: list[str] | None, workers: int | None,
              devices: list[str] | None, ray: str | None = None) -> dict:
    if ray and (workers or devices):
        raise SitError("ray, and workers or devices, name two places for the shards", "give one of them")
    # The cluster first: a wrong address or a node with other versions is one error before the
    # run directory is locked or any model loads.
    cluster = None
    if ray:
        from sit_prefect.ray_runner import connect

        cluster = connect(ray)
    with prepare_run(run_dir, config, preset=preset, profile=profile, overrides=overrides, stages=stages) as run:
        logger = get_run_logger()
        logger.info("run %s: profile %s, stages %s", run.run_dir, run.cfg.profile, ", ".join(run.stages))
        shard_cfg = None
        if cluster is not None:
            shard_cfg = config_for_hardware(run.run_dir, profile, cluster.hardware(profile))
            logger.info("Ray cluster %s: %d nodes, %d CPUs, %d GPUs; shards run with profile %s, backend %s",
                        cluster.address, len(cluster.nodes), cluster.cpus, cluster.gpus, shard_cfg.profile,
                        shard_cfg.generation.backend)
        if run.pulled:
            logger.info("pulled %d files from the hub mirror %s", len(run.pulled), run.cfg.hub_repo)
        for stage, problems in run.damaged.items():
            logger.warning("stage %s is damaged (%s); recomputing it from its last good checkpoint",
                           stage, "; ".join(problems))
        return _run_stages(run.cfg, run.run_dir, run.stages, workers, devices, ray, shard_cfg)


@flow(name="synthetic_instruction_tuner")
@fails_cleanly
def synthetic_instruction_tuner(
    run_dir: str = "runs/demo",
    config: dict | str | None = None,
    preset: str | None = None,
    profile: str | None = None,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    workers: int | None = None,
    devices: list[str] | None = None,
    ray: str | None = None,
) -> dict:
    """Run the pipeline's stages in order into `run_dir`, skipping what is already done.

    `config` is a path to a config.json/YAML or a dict in the same format; with neither
    config nor preset, the config recorded in run_dir is reused, else the demo preset.
    `workers` (or `devices`, CUDA device ids, one worker each) shards Magpie generation and
    the preference stage over worker processes; `ray` (a Ray cluster's HOST:PORT, or auto)
    runs those shards as Ray tasks on the cluster's nodes. The output equals an unsharded run's.
    """
    return _pipeline(run_dir, config, preset, profile, overrides, stages, workers, devices, ray)


# The flow that deployments made with earlier releases' `flows/sharded.py` entrypoint run: the
# same pipeline, sharded where its parameters name workers or devices.
synthetic_instruction_tuner_sharded = flow(name="synthetic_instruction_tuner_sharded")(synthetic_instruction_tuner.fn)


def _stage_flow(stage: str):
    @flow(name=f"sit-{stage.replace('_', '-')}")
    @fails_cleanly
    def single_stage(run_dir: str, config: dict | str | None = None, preset: str | None = None,
                     profile: str | None = None, overrides: list[str] | None = None) -> dict:
        with prepare_run(run_dir, config, preset=preset, profile=profile, overrides=overrides,
                         stages=[stage]) as run:
            return _run_stages(run.cfg, run.run_dir, run.stages)[stage]

    single_stage.__doc__ = f"Run only the '{stage}' stage (its inputs must exist in run_dir)."
    return single_stage


STAGE_FLOWS = {stage: _stage_flow(stage) for stage in STAGE_ORDER}
