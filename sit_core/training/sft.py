"""Stage 4: supervised fine-tuning with LoRA on the kept instruction/response records.

trl's SFTTrainer on the conversational format (the tokenizer's chat template renders each
record; the loss covers the whole sequence, as in the seed notebook). Settings follow seed
002: r 8, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down, 3 epochs, lr 2e-4, cosine, warmup
0.03; batch sizes, precision and checkpoint interval come from the hardware profile.
"""

from __future__ import annotations

from pathlib import Path

from ..config import SitConfig
from .common import Method, check_lora_targets, conversation, fingerprint as _fingerprint, lora_config, \
    load_base_model, read_records, split_records, train_stage

STAGE = "sft"
FIELDS = ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "sft_epochs", "sft_learning_rate",
          "sft_warmup_ratio", "lr_scheduler_type", "max_steps", "validation_size", "max_seq_length", "qlora"]


def kept_path(run_dir: Path) -> Path:
    return Path(run_dir) / "filter" / "kept.jsonl"


def input_paths(cfg: SitConfig, run_dir: Path) -> list[Path]:
    return [kept_path(run_dir)]


def fingerprint(cfg: SitConfig) -> dict:
    return _fingerprint(cfg, FIELDS, *cfg.training.batch(STAGE))


def instruction_split(cfg: SitConfig, run_dir: Path, stage: str) -> tuple[list[dict], list[dict]]:
    """kept.jsonl as chat conversations, split train/validation from the run seed. Shared
    with prompt tuning so both methods see the same split."""
    rows = read_records(kept_path(run_dir), {"instruction": str, "response": str}, "kept instruction")
    train, val = split_records(rows, cfg.training.validation_size, cfg.seed, stage)
    return ([conversation(r["instruction"], r["response"]) for r in train],
            [conversation(r["instruction"], r["response"]) for r in val])


def make_sft_trainer(model, tokenizer, kwargs, train_ds, eval_ds, callbacks, *, max_length: int):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**kwargs, max_length=max_length, packing=False)
    return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, callbacks=callbacks)


def method(cfg: SitConfig, run_dir: Path) -> Method:
    train, val = instruction_split(cfg, run_dir, STAGE)
    targets = check_lora_targets(cfg)
    t = cfg.training
    batch, grad_accum = t.batch(STAGE)

    def build_model(cfg, hw, tokenizer):
        from peft import get_peft_model

        return get_peft_model(load_base_model(cfg, hw), lora_config(cfg, targets))

    return Method(
        stage=STAGE, learning_rate=t.sft_learning_rate, epochs=t.sft_epochs, warmup_ratio=t.sft_warmup_ratio,
        batch_size=batch, grad_accum=grad_accum, save_steps=t.sft_save_steps,
        train_rows=train, eval_rows=val, build_model=build_model,
        make_trainer=lambda *a: make_sft_trainer(*a, max_length=t.max_seq_length),
        describe={"lora_config": {"r": t.lora_r, "alpha": t.lora_alpha, "dropout": t.lora_dropout,
                                  "target_modules": targets}},
    )


def run(cfg: SitConfig, run_dir: Path, progress=None, *, callbacks: tuple = ()) -> dict:
    return train_stage(cfg, Path(run_dir), STAGE, method, progress, callbacks)
