"""Data-parallel (DDP) training through `accelerate launch`.

With `training.num_processes` = N > 1, a training stage does not train in the calling process.
The caller (the pipeline process, which holds the run lock) checks the data, then runs

    python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1 \
        --main_process_port 0 --mixed_precision no --dynamo_backend no \
        -m sit_core.pipeline RUN_DIR STAGE CONFIG_JSON

and waits, relaying the manifest's progress to the caller's listeners (the Prefect UI, the
hub mirror's periodic sync). Each rank runs the ordinary stage driver (sit_core/driver.py),
which opens the stage through common.open_training_stage and trains in common.train_stage. Rank 0 is the only writer: the manifest, the clock, the final adapter and
metrics, and (the Trainer's own rule) the checkpoints; the other ranks read the same data and
train in lockstep. The effective batch (per-device batch x accumulation x processes) stays the
profile's, so the fingerprint and learning-rate schedule equal a single-process run's and a
half-trained stage resumes on another number of GPUs.

Out of memory: the rank that hits it leaves a marker and the launch fails; the caller records
the step-down in the manifest and launches again with half the per-device batch, as the
single-process driver does in place. On CPU the same launch starts gloo ranks: that is how the
tests exercise it. Mixed precision comes from the Trainer's bf16/fp16 arguments, so accelerate's
own flag stays "no".

Run by hand, without a caller holding the lock, rank 0 takes the run lock itself and the
config is the one recorded in run.json:

    accelerate launch --multi_gpu --num_processes 4 -m sit_core.pipeline runs/a sft
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sit_core.config import SitConfig
from sit_core.errors import SitError
from sit_core.store.fileio import atomic_write_json, read_json
from sit_core.store.manifest import StageRun, read_manifest
from sit_core.config.batches import check_processes, step_down

OOM_MARKER = "oom.json"
# Set by launch() for its ranks: the pid that holds the run lock on their behalf.
LOCK_HOLDER_ENV = "SIT_RUN_LOCK_HOLDER"
POLL_S = 2.0

log = logging.getLogger("sit.training")


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a distributed launch."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def start(cpu: bool):
    """Join the process group accelerate launched us into; None when not distributed."""
    if world()[1] == 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def rank0_first(state):
    """Rank 0 runs the block first (it opens the manifest, removes torn checkpoints); the others
    follow and find what it left."""
    return state.main_process_first() if state is not None else contextlib.nullcontext()


class FollowerStage(StageRun):
    """A non-zero rank's view of the stage: the manifest rank 0 wrote, never written back."""

    def save(self) -> None:
        pass


def follow_stage(run_dir: Path, stage: str) -> FollowerStage:
    manifest = read_manifest(run_dir, stage)
    if manifest is None:
        raise SitError(f"rank {world()[0]} found no manifest for stage '{stage}' after rank 0 opened it",
                       "rerun; if it repeats, check that every rank sees the same run directory")
    return FollowerStage(Path(run_dir), stage, manifest)


def report_oom(stage_dir: Path, batch: int, grad_accum: int) -> None:
    atomic_write_json(stage_dir / OOM_MARKER, {"rank": world()[0], "batch_size": batch,
                                               "gradient_accumulation_steps": grad_accum})


# ---------------------------------------------------------------------------------------
# The caller's side


def launch_command(run_dir: Path, stage: str, config_path: Path, processes: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "sit_core.pipeline", str(run_dir), stage, str(config_path)]


def launch(cfg: SitConfig, parent: StageRun) -> dict:
    """Train the stage on cfg.training.num_processes ranks; returns its finished manifest. The
    ranks write the manifest (rank 0 reopens it); this process only relays their progress."""
    run_dir, stage = parent.run_dir, parent.stage

    processes = cfg.training.num_processes
    check_processes(cfg, [stage])
    marker = Path(run_dir) / stage / OOM_MARKER
    fd, name = tempfile.mkstemp(prefix=f"sit-{stage}-", suffix=".json")
    os.close(fd)
    config_path = atomic_write_json(Path(name), cfg.model_dump(mode="json"))
    try:
        while True:
            marker.unlink(missing_ok=True)
            returncode = _wait(launch_command(run_dir, stage, config_path, processes), parent)
            if returncode == 0:
                break
            if not marker.exists():
                raise SitError(
                    f"distributed training of stage '{stage}' on {processes} processes failed (accelerate launch "
                    f"exited with {returncode}; the ranks' errors are in the launch's output: under `sit run`, the "
                    f"log file in {Path(run_dir) / 'logs'} that it named at start, else above)",
                    "fix that error and rerun the same command: training resumes from its last complete "
                    "checkpoint. To train in one process, set training.num_processes=1")
            oom = read_json(marker)
            marker.unlink()
            step_down(StageRun(Path(run_dir), stage, read_manifest(run_dir, stage)), oom["batch_size"],
                      oom["gradient_accumulation_steps"], processes)
    finally:
        config_path.unlink(missing_ok=True)
    manifest = read_manifest(run_dir, stage)
    if manifest is None or manifest.get("status") != "done":
        raise SitError(f"the ranks of stage '{stage}' exited cleanly but left no finished manifest",
                       "rerun the same command; training resumes from its last complete checkpoint")
    return manifest


def _wait(command: list[str], parent: StageRun) -> int:
    """Run the launcher; forward the manifest's progress while it runs. Stopping the caller
    (Ctrl-C, a cancelled flow run) stops the ranks too."""
    log.info("training: %s", shlex.join(command))
    env = {**os.environ, LOCK_HOLDER_ENV: str(os.getpid())}
    proc = subprocess.Popen(command, env=env)
    last = None
    try:
        while proc.poll() is None:
            time.sleep(POLL_S)
            manifest = read_manifest(parent.run_dir, parent.stage) or {}
            done = manifest.get("progress")
            if done and done != last:
                last = done
                parent.announce(done["done"], done["total"])
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return proc.returncode
