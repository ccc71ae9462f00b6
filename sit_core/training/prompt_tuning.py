"""Stage 5: prompt tuning, the low-parameter comparison point to LoRA.

20 virtual tokens with RANDOM init (PEFT PromptTuningConfig), trained on the same records
and the same train/validation split as SFT, with the same resume, backoff and metrics.
"""

from __future__ import annotations

from pathlib import Path

from ..config import SitConfig
from ..models import resolve_model_path
from .common import Method, fingerprint as _fingerprint, load_base_model, train_stage
from .sft import input_paths, instruction_split, make_sft_trainer  # noqa: F401 - input_paths is part of the stage API

STAGE = "prompt_tuning"
FIELDS = ["prompt_tuning_virtual_tokens", "prompt_tuning_init", "prompt_tuning_learning_rate", "prompt_tuning_epochs",
          "sft_warmup_ratio", "lr_scheduler_type", "max_steps", "validation_size", "max_seq_length", "qlora"]
# TEXT init starts the virtual tokens from the embedding of this text
INIT_TEXT = "Answer the following instruction helpfully and accurately:"


def fingerprint(cfg: SitConfig) -> dict:
    return _fingerprint(cfg, FIELDS, *cfg.training.batch(STAGE))


def method(cfg: SitConfig, run_dir: Path) -> Method:
    train, val = instruction_split(cfg, run_dir, STAGE)
    t = cfg.training
    batch, grad_accum = t.batch(STAGE)

    def build_model(cfg, hw, tokenizer):
        from peft import PromptTuningConfig, get_peft_model

        text_init = t.prompt_tuning_init == "TEXT"
        pt = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=t.prompt_tuning_virtual_tokens,
            prompt_tuning_init=t.prompt_tuning_init,
            prompt_tuning_init_text=INIT_TEXT if text_init else None,
            tokenizer_name_or_path=resolve_model_path(cfg.models.target) if text_init else None)
        return get_peft_model(load_base_model(cfg, hw), pt)

    return Method(
        stage=STAGE, learning_rate=t.prompt_tuning_learning_rate, epochs=t.prompt_tuning_epochs,
        warmup_ratio=t.sft_warmup_ratio, batch_size=batch, grad_accum=grad_accum, save_steps=t.sft_save_steps,
        train_rows=train, eval_rows=val, build_model=build_model,
        # the virtual tokens take room in the context, so the text gets that much less
        make_trainer=lambda *a: make_sft_trainer(*a, max_length=t.max_seq_length - t.prompt_tuning_virtual_tokens),
        describe={"prompt_tuning_config": {"num_virtual_tokens": t.prompt_tuning_virtual_tokens,
                                           "init": t.prompt_tuning_init}},
    )


def run(cfg: SitConfig, run_dir: Path, progress=None, *, callbacks: tuple = ()) -> dict:
    return train_stage(cfg, Path(run_dir), STAGE, method, progress, callbacks)
