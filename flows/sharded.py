"""Scale-out on one machine: Magpie generation and the preference stage sharded over worker
processes, one model (and one GPU) per worker; the other stages run as usual.

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

import contextlib
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterator

from prefect import task
from prefect.logging import get_run_logger
from prefect.task_runners import ProcessPoolTaskRunner

from flows.pipeline import _run_stages, fails_cleanly, flow
from sit_core import magpie, preference, preference_shards, shards
from sit_core.config import SitConfig
from sit_core.console_events import stage_progress, timed_stage
from sit_core.pipeline import prepare_run
from sit_core.stages import done_manifest, open_stage
from tasks.stage_tasks import publish_artifacts

# The device this worker process claimed at start-up (None: leave CUDA_VISIBLE_DEVICES alone).
_DEVICE: str | None = None


def claim_device(devices, threads: int) -> None:
    """ProcessPoolTaskRunner initializer: each worker process takes one device for its lifetime,
    and its share of the CPU cores. Left at torch's default, every worker runs one thread per
    core and they thrash: two workers on two cores generated ~10x slower than one process."""
    global _DEVICE
    _DEVICE = devices.get()
    import torch

    torch.set_num_threads(threads)


def _use_claimed_device() -> None:
    # Prefect re-applies the parent's environment for every task it runs in a pool worker, so the
    # claimed device is set again by each task, before the first CUDA call of this process reads it.
    if _DEVICE is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = _DEVICE


@contextlib.contextmanager
def _worker_pool(workers: int, devices: list[str] | None) -> Iterator[tuple[ProcessPoolTaskRunner, int]]:
    """The task runner and its size: one worker per device when devices are given, else `workers`."""
    n = len(devices) if devices else workers
    # A spawn-context queue can be handed to the spawned workers through the initializer.
    queue = multiprocessing.get_context("spawn").Queue()
    for device in devices or [None] * n:
        queue.put(device)
    threads = max(1, len(os.sched_getaffinity(0)) // n)
    with ProcessPoolTaskRunner(max_workers=n, initializer=claim_device, initargs=(queue, threads)) as runner:
        yield runner, n


def _run_wave(runner: ProcessPoolTaskRunner, shard_task, cfg: SitConfig, run_dir: Path, wave: list,
              on_result: Callable[[dict], None] | None = None, **parameters) -> None:
    """Run one task per shard of the wave, handing each summary to `on_result`. Raises the first
    failure (after its retry) once every shard is over, so what the others did is recorded;
    finished shards stay done."""
    config = cfg.model_dump(mode="json")
    futures = [runner.submit(shard_task, parameters={"config": config, "run_dir": str(run_dir), "start": a, "end": b,
                                                     **parameters}) for a, b in wave]
    failure = None
    for future in futures:
        try:
            summary = future.result()
        except Exception as e:  # noqa: BLE001 - re-raised below
            failure = failure or e
            continue
        if on_result:
            on_result(summary)
    if failure:
        raise failure


@task(task_run_name="generate-shard-{start}-{end}", retries=1, retry_delay_seconds=5)
def generate_shard(config: dict, run_dir: str, start: int, end: int) -> dict:
    _use_claimed_device()
    return shards.generate_shard(SitConfig.model_validate(config), Path(run_dir), (start, end))


@task(task_run_name="preference-responses-{start}-{end}", retries=1, retry_delay_seconds=5)
def preference_responses_shard(config: dict, run_dir: str, start: int, end: int, batched: bool) -> dict:
    _use_claimed_device()
    return preference_shards.sample_shard(SitConfig.model_validate(config), Path(run_dir), (start, end), batched)


@task(task_run_name="preference-scores-{start}-{end}", retries=1, retry_delay_seconds=5)
def preference_scores_shard(config: dict, run_dir: str, start: int, end: int) -> dict:
    _use_claimed_device()
    return preference_shards.score_shard(SitConfig.model_validate(config), Path(run_dir), (start, end))


def _record_progress(stage, done: int, total: int) -> None:
    """Progress after a wave, in the manifest and on `sit run`'s console (the shards' own
    progress stays in their worker processes)."""
    stage.progress(done, total)
    stage_progress(stage.stage, done, total)


def sharded_generate(cfg: SitConfig, run_dir: Path, workers: int, devices: list[str] | None) -> dict:
    """The generate stage's manifest, made by `workers` processes (one per device when devices are given)."""
    if (manifest := done_manifest(cfg, run_dir, magpie.STAGE)) is not None:
        return manifest
    logger = get_run_logger()
    stage = open_stage(cfg, run_dir, magpie.STAGE)
    with _worker_pool(workers, devices) as (runner, n):
        while wave := shards.pending_shards(cfg, run_dir, n):
            logger.info("generate: %d shard(s) %s on %d worker(s)", len(wave), wave, n)
            _run_wave(runner, generate_shard, cfg, run_dir, wave)
            _record_progress(stage, *shards.progress(cfg, run_dir))
    return shards.finish(cfg, stage)


def sharded_preference(cfg: SitConfig, run_dir: Path, workers: int, devices: list[str] | None) -> dict:
    """The preference stage's manifest: responses sampled, then scored, by `workers` processes
    (one per device when devices are given)."""
    if (manifest := done_manifest(cfg, run_dir, preference.STAGE)) is not None:
        return manifest
    logger = get_run_logger()
    stage = preference.begin(cfg, run_dir)
    with _worker_pool(workers, devices) as (runner, n):
        wave = preference_shards.pending_response_shards(cfg, run_dir, n)
        if wave:
            logger.info("preference responses: %d shard(s) %s on %d worker(s)", len(wave), wave, n)

            def record_events(summary: dict) -> None:
                for event in summary["events"]:
                    stage.event(event.pop("event"), shard=summary["shard"], **event)

            _run_wave(runner, preference_responses_shard, cfg, run_dir, wave, record_events,
                      batched=preference.batched(cfg, stage.manifest))
            _record_progress(stage, *preference_shards.progress(cfg, run_dir))
        preference_shards.merge_responses(cfg, stage)
        if wave := preference_shards.pending_score_shards(cfg, run_dir, n):
            logger.info("preference scores: %d shard(s) %s on %d worker(s)", len(wave), wave, n)
            _run_wave(runner, preference_scores_shard, cfg, run_dir, wave)
            _record_progress(stage, *preference_shards.progress(cfg, run_dir))
    return preference_shards.finish(cfg, stage)


SHARDED_STAGES = {magpie.STAGE: sharded_generate, preference.STAGE: sharded_preference}


@flow(name="synthetic_instruction_tuner_sharded")
@fails_cleanly
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
    """The pipeline with Magpie generation and the preference stage sharded over `workers`
    processes, or one process per entry of `devices` (CUDA device ids). The output equals an
    unsharded run's; the other stages run as in synthetic_instruction_tuner."""
    with prepare_run(run_dir, config, preset=preset, profile=profile, overrides=overrides, stages=stages) as run:
        results = {}
        for stage in run.stages:
            if stage not in SHARDED_STAGES:
                results.update(_run_stages(run.cfg, run.run_dir, [stage]))
                continue
            # The same start/finish events as _run_stages; "cached" here is a stage the run
            # directory already holds done (these stages are not Prefect tasks with a cache).
            with timed_stage(stage) as outcome:
                cached = done_manifest(run.cfg, run.run_dir, stage) is not None
                manifest = SHARDED_STAGES[stage](run.cfg, run.run_dir, workers, devices)
                publish_artifacts(stage, manifest, run.run_dir)  # the stage's tables, on the flow run
                results[stage] = {"stage": stage, "status": manifest.get("status"), "cached": cached,
                                  "outputs": manifest.get("outputs", {}), "stats": manifest.get("stats", {})}
                outcome.update(status=manifest.get("status"), cached=cached)
        return results
