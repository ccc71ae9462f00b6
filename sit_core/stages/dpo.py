"""Stage "dpo": DPO on top of the SFT LoRA adapter (the seed's "DPO on LoRA").

The policy is the base model with the SFT adapter loaded trainable. The reference is the
SFT model too, without loading the base twice: given a PEFT model and no ref_model, trl
adds a frozen copy of the adapter ("ref") to the same base and switches to it for the
reference forward. Settings: beta 0.1, lr 5e-5, 1 epoch, warmup 0.1.
"""

from __future__ import annotations

from pathlib import Path

from sit_core.config import SitConfig
from sit_core.contract import Read
from sit_core.stages import path_of
from sit_core.training.common import Method, fingerprint as _fingerprint, load_base_model, pair_split, training_stage

NAME = "dpo"
FIELDS = ["dpo_epochs", "dpo_learning_rate", "dpo_beta", "dpo_warmup_ratio", "lr_scheduler_type", "max_steps",
          "validation_size", "dpo_validation_size", "max_seq_length", "qlora"]
REF_ADAPTER = "ref"  # the name trl gives the frozen copy
PAIRS = Read("preference", "pairs")
# The adapter files are inputs: a retrained SFT adapter invalidates DPO work made on the old one.
SFT_ADAPTER = Read("sft", "adapter", files=("adapter_config.json", "adapter_model.safetensors"))


def fingerprint(cfg: SitConfig) -> dict:
    return _fingerprint(cfg, FIELDS, *cfg.training.batch(NAME))


def make_dpo_trainer(model, tokenizer, kwargs, train_ds, eval_ds, callbacks, *, beta: float, max_length: int):
    from trl import DPOConfig, DPOTrainer

    # A rebuilt trainer (after an OOM step-down) adds the reference copy again, from the
    # adapter as restored to its SFT weights: drop the previous copy first.
    if REF_ADAPTER in model.peft_config:
        model.delete_adapter(REF_ADAPTER)
    args = DPOConfig(**kwargs, beta=beta, max_length=max_length)
    return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, callbacks=callbacks)


def method(cfg: SitConfig, run_dir: Path) -> Method:
    train, val = pair_split(cfg, path_of(run_dir, PAIRS), NAME)
    t = cfg.training
    batch, grad_accum = t.batch(NAME)
    adapter = path_of(run_dir, SFT_ADAPTER)

    def build_model(cfg, hw, tokenizer):
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base_model(cfg, hw), str(adapter), is_trainable=True)

    return Method(
        stage=NAME, learning_rate=t.dpo_learning_rate, epochs=t.dpo_epochs, warmup_ratio=t.dpo_warmup_ratio,
        batch_size=batch, grad_accum=grad_accum, save_steps=t.dpo_save_steps,
        train_rows=train, eval_rows=val, build_model=build_model,
        make_trainer=lambda *a: make_dpo_trainer(*a, beta=t.dpo_beta, max_length=t.max_seq_length),
        describe={"dpo_config": {"beta": t.dpo_beta, "reference": "SFT adapter (frozen copy on the same base)",
                                 "sft_adapter": "sft/final"}},
    )


STAGE = training_stage(NAME, (PAIRS, SFT_ADAPTER), fingerprint, method)
