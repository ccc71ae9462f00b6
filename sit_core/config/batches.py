"""Batch arithmetic of the training stages, in one place.

A training method's effective batch (per-device batch x gradient accumulation x processes) is
part of its recipe and of its fingerprint; the per-device batch is only what fits on the
hardware. So whenever the per-device batch has to change, these keep the effective batch:
an OOM step-down, a split over DDP ranks, a run that moves to hardware of another profile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from sit_core.errors import SitError

if TYPE_CHECKING:
    from sit_core.config import SitConfig

# Each training method's (per-device batch, gradient accumulation) fields. Prompt tuning and DPO
# fall back to the shared accumulation when theirs is unset.
BATCH_FIELDS = {"sft": ("sft_batch_size", "gradient_accumulation_steps"),
                "prompt_tuning": ("prompt_tuning_batch_size", "prompt_tuning_gradient_accumulation_steps"),
                "dpo": ("dpo_batch_size", "dpo_gradient_accumulation_steps")}


def fit_batch(effective: int, max_per_device: int) -> tuple[int, int]:
    """(per-device batch, accumulation) making up `effective`: the largest per-device batch not
    above `max_per_device` that divides it. Used wherever the effective batch must hold while the
    per-device batch changes: an OOM step-down, a DDP split, a run moving to other hardware."""
    per_device = max(d for d in range(1, max(1, max_per_device) + 1) if effective % d == 0)
    return per_device, effective // per_device


def effective_batch(batch: int, grad_accum: int) -> int:
    return batch * grad_accum


def backoff(batch: int, grad_accum: int) -> tuple[int, int]:
    """Halve the per-device batch and raise gradient accumulation so the effective batch
    stays the same: the largest divisor of the effective batch at most half the batch
    (12x2 -> 6x4 -> 3x8 -> 1x24; 8x2 -> 4x4 -> 2x8 -> 1x16)."""
    return fit_batch(effective_batch(batch, grad_accum), batch // 2)


def step_down(run, batch: int, grad_accum: int, processes: int) -> tuple[int, int]:
    """The batch after an out-of-memory error at (batch, grad_accum) per process, recorded as an
    event of the stage's manifest `run` (a StageRun; a restart resumes at that batch); a SitError
    naming the fixes when batch 1 already failed."""
    if batch == 1:
        raise SitError(f"stage '{run.stage}' ran out of GPU memory even at per-device batch 1",
                       "set training.gradient_checkpointing=true, training.qlora=true, or a smaller "
                       "training.max_seq_length")
    new_batch, new_accum = backoff(batch, grad_accum)
    run.event("oom_backoff", from_batch_size=batch, to_batch_size=new_batch, from_gradient_accumulation_steps=grad_accum,
              to_gradient_accumulation_steps=new_accum, processes=processes)
    return new_batch, new_accum


def split_batch(batch: int, grad_accum: int, processes: int) -> tuple[int, int]:
    """Per-process (batch, accumulation) whose product times `processes` is the effective batch:
    the largest per-device batch not above `batch`."""
    effective = batch * grad_accum
    if effective % processes:
        divisors = [d for d in range(1, effective + 1) if effective % d == 0]
        raise SitError(
            f"the effective batch {effective} ({batch} per device x {grad_accum} accumulation) does not split "
            f"evenly over training.num_processes={processes}",
            f"set training.num_processes to one of {divisors} (the effective batch is part of the run's "
            "configuration; changing it would change the results)")
    return fit_batch(effective // processes, batch)


def names_a_batch(source: dict) -> bool:
    """Whether the user's own config or --set names a training batch or accumulation field."""
    named = set((source.get("config") or {}).get("training") or {})
    named |= {o.split("=", 1)[0].removeprefix("training.") for o in source.get("overrides") or []}
    return any(f in named for fields in BATCH_FIELDS.values() for f in fields)


def keep_effective_batches(cfg: SitConfig, recorded: dict) -> tuple[SitConfig, list[str]]:
    """A run keeps the effective batch (batch x accumulation) its training methods started with,
    on whatever hardware it continues: that batch is part of the training recipe (and of each
    training stage's fingerprint), while the hardware profile only says how much fits in one
    step. The new profile's per-device batch stays the upper bound; accumulation makes up the
    rest. Returns the config to use and one note per method changed."""
    try:
        started = type(cfg.training).model_validate(recorded.get("training") or {})
    except ValidationError:
        return cfg, []  # a record from another version of sit: the stages' own checks decide
    updates, notes = {}, []
    for method, (size_field, accumulation_field) in BATCH_FIELDS.items():
        (first_batch, first_accumulation), (batch, accumulation) = started.batch(method), cfg.training.batch(method)
        effective = first_batch * first_accumulation
        if batch * accumulation != effective:
            batch, accumulation = fit_batch(effective, batch)
            notes.append(f"{method}: batch {batch} x accumulation {accumulation}, keeping the effective batch "
                         f"{effective} this run started with (profile {cfg.profile} alone would give another)")
        # Every method's fields are set, so changing the shared accumulation moves no other method.
        updates[size_field], updates[accumulation_field] = batch, accumulation
    if not notes:
        return cfg, []
    return cfg.model_copy(update={"training": cfg.training.model_copy(update=updates)}), notes


def check_processes(cfg: SitConfig, stages: list[str]) -> None:
    """Settings no launch could run with, refused before anything starts (`sit run` checks them
    before Prefect starts, too): an effective batch the processes cannot share, or more
    processes than GPUs."""
    _check_devices(cfg.training.num_processes)
    for stage in stages:
        batch, accumulation = cfg.training.batch(stage)
        split_batch(batch, accumulation, cfg.training.num_processes)


def _check_devices(processes: int) -> None:
    """One rank per GPU: NCCL refuses two ranks on one device. Without CUDA the ranks are CPU
    processes on gloo, as many as asked."""
    import torch

    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise SitError(f"training.num_processes={processes}, but only {torch.cuda.device_count()} GPU(s) are visible",
                       f"set training.num_processes to at most {torch.cuda.device_count()} (or make more GPUs visible "
                       "with CUDA_VISIBLE_DEVICES)")
