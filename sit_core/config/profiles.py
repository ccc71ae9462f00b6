"""Hardware profiles: batch sizes, precision and checkpoint intervals per machine.

Numbers for t4 and a100 are the seeds' (000, 001). h100 is ours: an 80 GB H100 holds twice
the A100-40GB micro-batch for a 3B LoRA run, so we double the per-device batch and halve
gradient accumulation. The effective batch (24 for SFT, 16 for DPO) and therefore every
learning-rate setting stays identical to the A100 reference, while fewer accumulation steps
cut optimizer/launch overhead. bf16 + tf32 as on A100; checkpoints are as frequent in wall
time as on A100 because steps are fewer per unit of data.
"""

from __future__ import annotations

PROFILE_NAMES = ("cpu", "t4", "a100", "h100")

_PROFILES: dict[str, dict] = {
    # CPU: fp32 always. trl defaults to bf16, which this kind of CPU emulates: a LoRA SFT step
    # took 75-106 s in bf16 against 5 s in fp32.
    "cpu": {
        "checkpoint_interval": 10,
        # vLLM's CPU build reads gpu_memory_utilization as the share of RAM it reserves.
        "generation": {"batch_size": 8, "gpu_memory_utilization": 0.3},
        "preference": {"generation_batch_size": 1, "reward_batch_size": 8},
        "training": {"sft_batch_size": 4, "dpo_batch_size": 2, "prompt_tuning_batch_size": 4,
                     "gradient_accumulation_steps": 1, "dpo_gradient_accumulation_steps": 1,
                     "precision": "fp32", "tf32": False, "optim": "adamw_torch",
                     "sft_save_steps": 5, "dpo_save_steps": 5, "logging_steps": 1},
        "evaluation": {"batch_size": 4},
    },
    "t4": {
        "checkpoint_interval": 20,
        "generation": {"batch_size": 1},
        "training": {"sft_batch_size": 4, "gradient_accumulation_steps": 4, "dpo_batch_size": 2,
                     "dpo_gradient_accumulation_steps": 8, "prompt_tuning_batch_size": 4,
                     "precision": "fp16", "tf32": False, "optim": "paged_adamw_32bit",
                     "sft_save_steps": 500, "dpo_save_steps": 200, "logging_steps": 50},
        "evaluation": {"batch_size": 4},
    },
    "a100": {
        "checkpoint_interval": 100,
        "generation": {"batch_size": 1},
        "training": {"sft_batch_size": 12, "gradient_accumulation_steps": 2, "dpo_batch_size": 8,
                     "dpo_gradient_accumulation_steps": 2, "prompt_tuning_batch_size": 4,
                     "precision": "bf16", "tf32": True, "optim": "paged_adamw_32bit",
                     "sft_save_steps": 200, "dpo_save_steps": 100, "logging_steps": 10},
        "evaluation": {"batch_size": 16},
    },
    "h100": {
        "checkpoint_interval": 100,
        "generation": {"batch_size": 1},
        "training": {"sft_batch_size": 24, "gradient_accumulation_steps": 1, "dpo_batch_size": 16,
                     "dpo_gradient_accumulation_steps": 1, "prompt_tuning_batch_size": 8,
                     "precision": "bf16", "tf32": True, "optim": "adamw_torch_fused",
                     "sft_save_steps": 100, "dpo_save_steps": 50, "logging_steps": 10},
        "evaluation": {"batch_size": 32},
    },
}


# With vLLM a generation call is a set of requests for its continuous batching to schedule,
# not a padded batch: enough of them to keep the GPU busy, and checkpointed as they finish.
# (transformers keeps the profile's own batch sizes: 1, the stable mode, on the GPU profiles.)
_VLLM_CALL = {"cpu": 32, "t4": 64, "a100": 256, "h100": 512}


def profile_overrides(name: str, backend: str = "transformers") -> dict:
    import copy

    out = copy.deepcopy(_PROFILES[name])
    if backend == "vllm":
        out["generation"]["batch_size"] = _VLLM_CALL[name]
        out.setdefault("preference", {})["generation_batch_size"] = _VLLM_CALL[name]
    return out


def classify_gpu(name: str, total_memory_gb: float) -> str:
    """Pick a profile from a CUDA device's name, falling back to its memory size."""
    upper = name.upper()
    if "H100" in upper or "H200" in upper or "B200" in upper:
        return "h100"
    if "A100" in upper or "A6000" in upper or "L40" in upper:
        return "a100"
    if "T4" in upper:
        return "t4"
    if total_memory_gb >= 70:
        return "h100"
    if total_memory_gb >= 35:
        return "a100"
    return "t4"


def detect_profile() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    props = torch.cuda.get_device_properties(0)
    return classify_gpu(props.name, props.total_memory / 2**30)
