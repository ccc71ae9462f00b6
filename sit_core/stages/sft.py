"""Stage "sft": supervised fine-tuning with LoRA on the kept instruction/response records.

trl's SFTTrainer on the conversational format (the tokenizer's chat template renders each
record). The loss covers the response only (trl's completion-only loss on prompt/completion
rows), the usual instruction-tuning recipe; training.completion_only_loss=false trains on the
whole sequence, as the seed notebook did and as run directories from before the switch do. Settings follow seed
002: r 8, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down, 3 epochs, lr 2e-4, cosine, warmup
0.03; batch sizes, precision and checkpoint interval come from the hardware profile.
"""

from __future__ import annotations

from pathlib import Path

from sit_core.config import SitConfig
from sit_core.contract import Read
from sit_core.stages import path_of
from sit_core.training.common import Method, check_lora_targets, fingerprint as _fingerprint, instruction_split, \
    load_base_model, lora_config, make_sft_trainer, training_stage

NAME = "sft"
KEPT = Read("filter", "kept")
FIELDS = ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "sft_epochs", "sft_learning_rate",
          "sft_warmup_ratio", "lr_scheduler_type", "max_steps", "validation_size", "max_seq_length", "qlora", "completion_only_loss"]


def fingerprint(cfg: SitConfig) -> dict:
    return _fingerprint(cfg, FIELDS, *cfg.training.batch(NAME))


def method(cfg: SitConfig, run_dir: Path) -> Method:
    train, val = instruction_split(cfg, path_of(run_dir, KEPT), NAME)
    targets = check_lora_targets(cfg)
    t = cfg.training
    batch, grad_accum = t.batch(NAME)

    def build_model(cfg, hw, tokenizer):
        from peft import get_peft_model

        return get_peft_model(load_base_model(cfg, hw), lora_config(cfg, targets))

    return Method(
        stage=NAME, learning_rate=t.sft_learning_rate, epochs=t.sft_epochs, warmup_ratio=t.sft_warmup_ratio,
        batch_size=batch, grad_accum=grad_accum, save_steps=t.sft_save_steps,
        train_rows=train, eval_rows=val, build_model=build_model,
        make_trainer=lambda *a: make_sft_trainer(*a, max_length=t.max_seq_length,
                                                  completion_only_loss=t.completion_only_loss),
        describe={"lora_config": {"r": t.lora_r, "alpha": t.lora_alpha, "dropout": t.lora_dropout,
                                  "target_modules": targets}},
    )


STAGE = training_stage(NAME, (KEPT,), fingerprint, method)
