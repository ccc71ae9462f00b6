"""Scale-out on one machine: Magpie generation sharded over worker processes, one model (and one
GPU) per worker, then the rest of the pipeline as usual.

Task runner: Prefect's own ProcessPoolTaskRunner (prefect 3.9). Each shard needs its own
process anyway: a CUDA device is chosen with CUDA_VISIBLE_DEVICES before CUDA initializes,
which is once per process, and a model per worker does not fit in threads behind the GIL.
The process pool gives that with nothing extra to install or run (no Dask scheduler, no Ray
cluster), shards still show up as task runs in the UI, and the pool's `initializer` hook is
where each worker claims its device. Past one machine see deployments/README.md.

    from flows.sharded import synthetic_instruction_tuner_sharded
    synthetic_instruction_tuner_sharded(run_dir="runs/a", preset="colab-a100", devices=["0", "1", "2", "3"])
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger
from prefect.task_runners import ProcessPoolTaskRunner

from flows.pipeline import _run_stages
from sit_core import magpie, shards
from sit_core.config import SitConfig
from sit_core.pipeline import prepare_run
from sit_core.stages import done_manifest, open_stage

# The device this worker process claimed at start-up (None: leave CUDA_VISIBLE_DEVICES alone).
_DEVICE: str | None = None


def claim_device(devices) -> None:
    """ProcessPoolTaskRunner initializer: each worker process takes one device for its lifetime."""
    global _DEVICE
    _DEVICE = devices.get()


@task(task_run_name="generate-shard-{start}-{end}", retries=1, retry_delay_seconds=5)
def generate_shard(config: dict, run_dir: str, start: int, end: int) -> dict:
    # Prefect re-applies the parent's environment for every task it runs in a pool worker, so the
    # claimed device is set here, before the first CUDA call of this process reads it.
    if _DEVICE is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = _DEVICE
    cfg = SitConfig.model_validate(config)
    return shards.generate_shard(cfg, Path(run_dir), (start, end))


def sharded_generate(cfg: SitConfig, run_dir: Path, workers: int, devices: list[str] | None) -> dict:
    """The generate stage's manifest, made by `workers` processes (one per device when devices are given)."""
    if (manifest := done_manifest(cfg, run_dir, magpie.STAGE)) is not None:
        return manifest
    logger = get_run_logger()
    stage = open_stage(cfg, run_dir, magpie.STAGE)
    n = len(devices) if devices else workers
    # A spawn-context queue can be handed to the spawned workers through the initializer.
    queue = multiprocessing.get_context("spawn").Queue()
    for device in devices or [None] * n:
        queue.put(device)
    config = cfg.model_dump(mode="json")
    with ProcessPoolTaskRunner(max_workers=n, initializer=claim_device, initargs=(queue,)) as runner:
        while wave := shards.pending_shards(cfg, run_dir, n):
            logger.info("generate: %d shard(s) %s on %d worker(s)", len(wave), wave, n)
            futures = [runner.submit(generate_shard, parameters={"config": config, "run_dir": str(run_dir),
                                                                  "start": a, "end": b}) for a, b in wave]
            for future in futures:
                future.result()  # raises if a shard failed after its retry; finished shards stay done
            stage.progress(*shards.progress(cfg, run_dir))
    return shards.finish(cfg, stage)


@flow(name="synthetic_instruction_tuner_sharded", log_prints=True)
def synthetic_instruction_tuner_sharded(
    run_dir: str = "runs/demo",
    config: dict | str | None = None,
    preset: str | None = None,
    profile: str | None = None,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    workers: int = 2,
    devices: list[str] | None = None,
) -> dict:
    """The pipeline with Magpie generation sharded over `workers` processes, or one process per
    entry of `devices` (CUDA device ids). The output equals an unsharded run's; the other stages
    run as in synthetic_instruction_tuner."""
    with prepare_run(run_dir, config, preset=preset, profile=profile, overrides=overrides, stages=stages) as run:
        results = {}
        if magpie.STAGE in run.stages:
            manifest = sharded_generate(run.cfg, run.run_dir, workers, devices)
            results[magpie.STAGE] = {"stage": magpie.STAGE, "status": manifest.get("status"),
                                     "outputs": manifest.get("outputs", {}), "stats": manifest.get("stats", {})}
        rest = [s for s in run.stages if s != magpie.STAGE]
        return {**results, **_run_stages(run.cfg, run.run_dir, rest)}
