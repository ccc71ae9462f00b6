"""What the training stages (sit_core/stages/sft.py, prompt_tuning.py, dpo.py) share: the
Trainer loop with resume and OOM step-down (`common`) and data-parallel launch (`distributed`)."""
