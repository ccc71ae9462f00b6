"""Data-parallel training through `accelerate launch`: two gloo ranks on this CPU, on the
embedded SmolLM2 at tiny scale. Rank 0 alone writes the stage; the effective batch stays the
profile's; a half-trained single-process stage resumes on two ranks; an OOM on one rank
relaunches every rank at half the per-device batch; the documented raw command takes the
run lock itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sit_core.driver import run_stage
from sit_core.errors import SitError
from sit_core.store.fileio import read_json
from sit_core.store.rundir import RunLock, record_run
from sit_core.config import batches
from sit_core.training import common
from sit_core.training import distributed
from test_training import tiny_cfg, write_inputs
from conftest import HANG_GUARD_S

REPO = Path(__file__).parents[1]


def test_split_batch_keeps_the_effective_batch():
    assert batches.split_batch(12, 2, 4) == (6, 1)
    assert batches.split_batch(12, 2, 3) == (8, 1)
    assert batches.split_batch(4, 4, 2) == (4, 2)
    assert batches.split_batch(2, 1, 2) == (1, 1)
    with pytest.raises(SitError, match=r"does not split evenly.*num_processes=3") as e:
        batches.split_batch(2, 1, 3)
    assert "one of [1, 2]" in e.value.fix


def test_unsplittable_batch_fails_before_any_process_starts(run_dir, smollm2_path, monkeypatch):
    write_inputs(run_dir)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a launch was started"))
    with pytest.raises(SitError, match="does not split evenly"):
        run_stage(tiny_cfg("training.num_processes=3"), run_dir, "sft")


def test_more_processes_than_gpus_fails_before_any_process_starts(run_dir, smollm2_path, monkeypatch):
    import torch

    write_inputs(run_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a launch was started"))
    with pytest.raises(SitError, match=r"num_processes=2, but only 1 GPU\(s\) are visible") as e:
        run_stage(tiny_cfg("training.num_processes=2"), run_dir, "sft")
    assert "at most 1" in e.value.fix


class Interrupted(Exception):
    pass


def test_single_process_stage_resumes_on_two_ranks(run_dir, smollm2_path):
    from transformers import TrainerCallback

    write_inputs(run_dir)

    class StopAfterCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:  # checkpoint-2 is on disk
                raise Interrupted

    with pytest.raises(Interrupted):
        run_stage(tiny_cfg(), run_dir, "sft", callbacks=(StopAfterCheckpoint(),))
    assert common.checkpoint_is_complete(run_dir / "sft" / "checkpoints" / "checkpoint-2")

    manifest = run_stage(tiny_cfg("training.num_processes=2"), run_dir, "sft")

    starts = [e for e in manifest["events"] if e["event"] == "train_start"]
    # One start per session: rank 1 never wrote the manifest.
    assert len(starts) == 2
    assert starts[-1]["resume_from"] == "sft/checkpoints/checkpoint-2"
    assert (starts[-1]["batch_size"], starts[-1]["gradient_accumulation_steps"]) == (1, 1)
    metrics = read_json(run_dir / "sft" / "metrics.json")
    assert metrics["processes"] == 2 and metrics["total_steps"] == 4
    # Each rank saved its own RNG state: both trained under DDP.
    last = run_dir / "sft" / "checkpoints" / "checkpoint-4"
    assert (last / "rng_state_0.pth").exists() and (last / "rng_state_1.pth").exists()
    assert (run_dir / "sft" / "final" / "adapter_model.safetensors").exists()
    assert not (run_dir / "sft" / distributed.OOM_MARKER).exists()
    # The effective batch (2 = 1 per device x 1 x 2 ranks) is the single-process one, so the
    # stage is done for a single-process config too: nothing trains again.
    again = run_stage(tiny_cfg(), run_dir, "sft")
    assert again["finished_at"] == manifest["finished_at"]


# Injected into the ranks through PYTHONPATH: rank 1 runs out of memory at any per-device
# batch above 1, as a smaller GPU would.
OOM_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import torch
    import transformers.trainer as trainer

    original = trainer.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.args.per_device_train_batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return original(self, *args, **kwargs)

    trainer.Trainer.training_step = training_step
"""


def test_oom_on_one_rank_relaunches_all_at_half_batch(run_dir, smollm2_path, tmp_path, monkeypatch):
    write_inputs(run_dir)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(OOM_ON_RANK_1)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")])))

    # Effective batch 4: 2 per device x 1 accumulation x 2 ranks, until rank 1 runs out of memory.
    manifest = run_stage(tiny_cfg("training.num_processes=2", "training.prompt_tuning_batch_size=4"), run_dir, "prompt_tuning")

    backoffs = [e for e in manifest["events"] if e["event"] == "oom_backoff"]
    assert len(backoffs) == 1
    assert (backoffs[0]["from_batch_size"], backoffs[0]["to_batch_size"]) == (2, 1)
    assert backoffs[0]["to_gradient_accumulation_steps"] == 2 and backoffs[0]["processes"] == 2
    metrics = read_json(run_dir / "prompt_tuning" / "metrics.json")
    assert (metrics["batch_size"], metrics["gradient_accumulation_steps"], metrics["processes"]) == (1, 2, 2)
    assert metrics["total_steps"] == 4


def test_raw_accelerate_command_takes_the_run_lock(run_dir, smollm2_path):
    write_inputs(run_dir)
    cfg = tiny_cfg()
    # The config a run started with `sit run` leaves in run.json, where the raw command reads it.
    record_run(run_dir, cfg, {"config": cfg.model_dump(mode="json"), "preset": None, "overrides": [],
                              "config_path": None})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "sit_core.pipeline", str(run_dir), "sft"]

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sit_core.store.rundir import RunLock\n"
                               "with RunLock(sys.argv[1]): print('held', flush=True); time.sleep(600)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=HANG_GUARD_S)
        assert refused.returncode != 0
        assert f"in use by pid {holder.pid}" in refused.stderr
        assert not (run_dir / "sft" / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()

    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_json(run_dir / "sft" / "manifest.json")["status"] == "done"
    assert read_json(run_dir / "sft" / "metrics.json")["processes"] == 2
    assert not (run_dir / ".sit.lock").exists()
    with RunLock(run_dir):  # released: a later run takes it
        pass
