"""Scale-out on one machine: a sharded stage's shards (Magpie generation, the preference
stage's responses and scores) as Prefect tasks on worker processes, one model (and one GPU)
per worker. The driver (sit_core/driver.py) plans the shards, files what they return and
merges them; this module only says where they run.

Task runner: Prefect's own ProcessPoolTaskRunner. Each shard needs its own process anyway: a
CUDA device is chosen with CUDA_VISIBLE_DEVICES before CUDA initializes, which is once per
process, and a model per worker does not fit in threads behind the GIL. The process pool
gives that with nothing extra to install or run, shards show up as task runs in the UI, and
the pool's `initializer` hook is where each worker claims its device. Past one machine see
deployments/README.md.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from pathlib import Path
from typing import Iterator

from prefect import task
from prefect.task_runners import ProcessPoolTaskRunner

from sit_core.config import SitConfig
from sit_core.contract import Phase, Shard
from sit_core.stages import declared

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


@task(task_run_name="{stage}-{phase}-{start}-{end}", retries=1, retry_delay_seconds=5)
def run_shard(stage: str, phase: str, config: dict, run_dir: str, start: int, end: int, params: dict) -> dict:
    # Prefect re-applies the parent's environment for every task it runs in a pool worker, so the
    # claimed device is set again by each task, before the first CUDA call of this process reads it.
    if _DEVICE is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = _DEVICE
    work = next(p for p in declared(stage).sharding.phases if p.name == phase).work
    return work(SitConfig.model_validate(config), Path(run_dir), (start, end), **params)


class ProcessPoolRunner:
    """The driver's ShardRunner over a ProcessPoolTaskRunner."""

    def __init__(self, stage: str, pool: ProcessPoolTaskRunner, size: int):
        self.stage, self.pool, self.size = stage, pool, size

    def run_wave(self, phase: Phase, cfg: SitConfig, run_dir: Path, wave: list[Shard],
                 params: dict) -> Iterator[dict]:
        config = cfg.model_dump(mode="json")
        futures = [self.pool.submit(run_shard, parameters={"stage": self.stage, "phase": phase.name, "config": config,
                                                           "run_dir": str(run_dir), "start": a, "end": b,
                                                           "params": params}) for a, b in wave]
        failure = None
        for future in futures:
            try:
                yield future.result()
            except Exception as e:  # noqa: BLE001 - re-raised once every shard is over
                failure = failure or e
        if failure:
            raise failure


@contextlib.contextmanager
def process_pool(stage: str, workers: int, devices: list[str] | None) -> Iterator[ProcessPoolRunner]:
    """A runner of `workers` processes, or one per device when devices are given."""
    n = len(devices) if devices else workers
    # A spawn-context queue can be handed to the spawned workers through the initializer.
    queue = multiprocessing.get_context("spawn").Queue()
    for device in devices or [None] * n:
        queue.put(device)
    threads = max(1, len(os.sched_getaffinity(0)) // n)
    with ProcessPoolTaskRunner(max_workers=n, initializer=claim_device, initargs=(queue, threads)) as pool:
        yield ProcessPoolRunner(stage, pool, n)
