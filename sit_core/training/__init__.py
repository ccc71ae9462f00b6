"""Training stages: LoRA SFT (`sft`), prompt tuning (`prompt_tuning`) and DPO (`dpo`).

Each is a stage module (see sit_core/stages/__init__.py); `common` holds the driver they share.
"""
