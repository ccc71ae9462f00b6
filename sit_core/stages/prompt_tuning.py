"""Stage "prompt_tuning": prompt tuning, the low-parameter comparison point to LoRA.

20 virtual tokens with RANDOM init (PEFT PromptTuningConfig), trained on the same records
and the same train/validation split as SFT, with the same resume, backoff and metrics.
"""

from __future__ import annotations

from pathlib import Path

from sit_core.config import SitConfig
from sit_core.engine.models import resolve_model_path
from sit_core.contract import Read
from sit_core.stages import path_of
from sit_core.training.common import Method, fingerprint as _fingerprint, instruction_split, load_base_model, \
    make_sft_trainer, training_stage

NAME = "prompt_tuning"
KEPT = Read("filter", "kept")
FIELDS = ["prompt_tuning_virtual_tokens", "prompt_tuning_init", "prompt_tuning_learning_rate", "prompt_tuning_epochs",
          "sft_warmup_ratio", "lr_scheduler_type", "max_steps", "validation_size", "max_seq_length", "qlora", "completion_only_loss"]
# TEXT init starts the virtual tokens from the embedding of this text
INIT_TEXT = "Answer the following instruction helpfully and accurately:"


def fingerprint(cfg: SitConfig) -> dict:
    return _fingerprint(cfg, FIELDS, *cfg.training.batch(NAME))


def method(cfg: SitConfig, run_dir: Path) -> Method:
    train, val = instruction_split(cfg, path_of(run_dir, KEPT), NAME)
    t = cfg.training
    batch, grad_accum = t.batch(NAME)

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
        stage=NAME, learning_rate=t.prompt_tuning_learning_rate, epochs=t.prompt_tuning_epochs,
        warmup_ratio=t.sft_warmup_ratio, batch_size=batch, grad_accum=grad_accum, save_steps=t.sft_save_steps,
        train_rows=train, eval_rows=val, build_model=build_model,
        # the virtual tokens take room in the context, so the text gets that much less
        make_trainer=lambda *a: make_sft_trainer(*a, max_length=t.max_seq_length - t.prompt_tuning_virtual_tokens,
                                                  completion_only_loss=t.completion_only_loss),
        describe={"prompt_tuning_config": {"num_virtual_tokens": t.prompt_tuning_virtual_tokens,
                                           "init": t.prompt_tuning_init}},
    )


STAGE = training_stage(NAME, (KEPT,), fingerprint, method)
