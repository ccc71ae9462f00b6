"""Evaluation of every model variant (base, LoRA SFT, prompt tuning, DPO).

- `lm_eval_runner`: lm-evaluation-harness benchmarks, including the offline task set in `tasks/`;
- `agent`: the built-in multi-step tool-use evaluation and the optional AgentBench run;
- `stage`: the "evaluate" pipeline stage that runs both and keeps results resumable.
"""
