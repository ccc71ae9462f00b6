"""lm-evaluation-harness for one model variant, one task at a time.

We call lm-eval's Python API (`simple_evaluate`, in harness.py) with its HF wrapper (`HFLM`)
for the log-likelihood tasks, and let it load adapters itself (`peft=`). Generation tasks are
decoded for every variant at once by sit's engine (generation_tasks.py), or, on the vLLM
backend, by lm-eval's own vLLM model in the engine process (the evaluate stage's `_on_vllm`).
Tasks are evaluated one by one so that the stage can save after each (variant, task) pair and
resume between them.

Our offline tasks live in `tasks/` beside this file in lm-eval's YAML format and are found
through `TaskManager(include_path=...)`; lm-eval's own tasks are indexed too only when one is asked
for (harness.task_manager).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from sit_core.errors import SitError
from sit_core.stages.evaluate import harness

LOCAL_TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = ("sit_ifeval_local", "sit_mc_local")

# The metric a task is ranked by. lm-eval reports several per task, and its JSON, once
# saved with sorted keys, no longer tells which its task config listed first. Tasks not
# named here use the first metric of PRIMARY_FALLBACK they report, else the first by name.
PRIMARY_METRICS = {"ifeval": "prompt_level_strict_acc", "sit_ifeval_local": "prompt_level_strict_acc",
                   "hellaswag": "acc_norm", "sit_mc_local": "acc", "mmlu": "acc", "truthfulqa_mc2": "acc"}
PRIMARY_FALLBACK = ("acc", "exact_match", "prompt_level_strict_acc", "f1", "acc_norm")


def task_manager(task: str | None = None):
    return harness.task_manager(str(LOCAL_TASKS_DIR), task)


def is_generative(task: str) -> bool:
    """Whether lm-eval scores the task on generated text (ifeval), not on log-likelihoods."""
    return harness.is_generative(task, str(LOCAL_TASKS_DIR))


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _offline_error(tasks: list[str], why: str) -> SitError:
    return SitError(
        f"benchmark(s) {', '.join(tasks)} download their data from the Hugging Face Hub, {why}",
        f"go online (unset HF_HUB_OFFLINE), or use the local task set shipped with sit, which runs offline: "
        f"evaluation.tasks={json.dumps(list(LOCAL_TASKS))}",
    )


def check_tasks(tasks: list[str]) -> None:
    """Fail before any model loads: unknown names (with close matches), and hub tasks offline."""
    for name in tasks:
        tm = task_manager(name)
        if name not in tm.all_tasks:
            close = difflib.get_close_matches(name, tm.all_tasks, n=5, cutoff=0.6)
            raise SitError(
                f"lm-eval does not know the task '{name}'"
                + (f"; close matches: {', '.join(close)}" if close else ""),
                "fix evaluation.tasks; `lm-eval ls tasks` lists every task, and the offline tasks shipped with sit are "
                + ", ".join(LOCAL_TASKS),
            )
    hub_tasks = [t for t in tasks if t not in LOCAL_TASKS]
    if hub_tasks and hub_offline():
        raise _offline_error(hub_tasks, "and the Hub is switched off here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)")


_NETWORK_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout",
                   "OfflineModeIsEnabled", "LocalEntryNotFoundError"}  # requests, httpx, huggingface_hub


def _is_network_failure(exc: BaseException) -> bool:
    """A download that failed for want of a network, anywhere in the exception chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)) or type(seen).__name__ in _NETWORK_ERRORS:
            return True
        text = str(seen)
        if "Couldn't reach" in text or "offline mode" in text.lower() or "Failed to resolve" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _device_and_dtype() -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        return "cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "cpu", "float32"  # CPU half precision is emulated and many times slower


def load_lm(model_path: str, adapter: Path | None, batch_size: int, trust_remote_code: bool = False):
    """An HFLM for the base model, or for the base model with a PEFT adapter on top."""
    from lm_eval.models.huggingface import HFLM

    class SitHFLM(HFLM):
        """HFLM that also scores prompt-tuned models correctly.

        A prompt-tuning PeftModel prepends its virtual tokens inside forward(), so the
        logits it returns are `num_virtual_tokens` positions longer than the input.
        lm-eval picks continuation logits by input position, so we drop the virtual
        positions to line them up again. LoRA models return logits as they are."""

        def _model_call(self, inps, attn_mask=None, labels=None):
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            virtual = num_virtual_tokens(self.model)
            return logits[:, virtual:, :] if virtual and logits.shape[1] == inps.shape[1] + virtual else logits

    from sit_core.engine.models import LOADING, pack_for_cpu

    device, dtype = _device_and_dtype()
    with LOADING:
        lm = SitHFLM(pretrained=model_path, peft=str(adapter) if adapter else None,
                     tokenizer=tokenizer_dir(model_path, adapter), device=device, dtype=dtype,
                     batch_size=batch_size, trust_remote_code=trust_remote_code)
    if device == "cpu":
        if adapter and not num_virtual_tokens(lm.model):
            # In fp32 a merged LoRA computes the same function up to rounding, without the
            # adapter's extra products in every layer: ifeval of the demo's SFT variant took
            # 19.7 s unmerged and 14.7 s for base. (A merge into bf16 weights would round the
            # update away: GPUs keep the adapter.)
            lm._model = lm.model.merge_and_unload()
        pack_for_cpu(lm.model)
    return lm


def tokenizer_dir(model_path: str, adapter: str | Path | None) -> str:
    """Training saves its tokenizer beside the adapter; it may carry a chat template the base
    model lacks (a non-instruct target), and the adapter was trained with that template."""
    return str(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model_path


def description(lm) -> str:
    """What scored, for the report: the HF model in this process."""
    import lm_eval
    import transformers

    return f"transformers {transformers.__version__} (lm-eval {lm_eval.__version__}) in this process"


# lm-eval's vLLM engine is sized for this context (its KV cache holds one full sequence); lm-eval
# truncates longer prompts to it. The seeds' benchmarks (mmlu 5-shot, ifeval with its 1,280
# answer tokens, hellaswag, truthfulqa) stay well below.
MAX_VLLM_CONTEXT = 4096


def vllm_context(model_path: str, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return min(getattr(config, "max_position_embeddings", None) or MAX_VLLM_CONTEXT, MAX_VLLM_CONTEXT)


def num_virtual_tokens(model) -> int:
    """How many soft-prompt positions a prompt-tuned PeftModel prepends (0 for any other model)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return int(config.num_virtual_tokens)
    return 0


def evaluate_task(lm, task: str, *, limit: int | None, seed: int) -> dict:
    """lm-eval's result JSON for one task (harness.evaluate_task), a missing network named."""
    try:
        return harness.evaluate_task(lm, task, limit=limit, seed=seed, include_path=str(LOCAL_TASKS_DIR))
    except Exception as e:  # noqa: BLE001 - only a missing network is translated; the rest re-raises
        if (error := network_error(task, e)) is not None:
            raise error from None
        raise


def network_error(task: str, exc: BaseException) -> SitError | None:
    """The SitError for a hub task that failed for want of a network, else None."""
    if task not in LOCAL_TASKS and _is_network_failure(exc):
        return _offline_error([task], "and the Hub cannot be reached from here")
    return None


def metric_rows(variant: str, result: dict) -> list[dict]:
    """Tidy rows (variant, task, metric, value, stderr, n, primary) from one lm-eval result JSON.

    lm-eval keys metrics as "name,filter" ("acc,none") and their standard errors as
    "name_stderr,filter" ("N/A" where it has none); aliases are left out."""
    rows = []
    for task, metrics in result.get("results", {}).items():
        names = [k for k in metrics if "," in k and "_stderr" not in k and isinstance(metrics[k], (int, float))]
        if not names:
            continue
        names.sort()
        base = {k.split(",")[0]: k for k in names}
        wanted = [PRIMARY_METRICS.get(task), *PRIMARY_FALLBACK]
        primary = next((base[w] for w in wanted if w in base), names[0])
        for key in names:
            name, filt = key.split(",", 1)
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append({"variant": variant, "task": task, "metric": name, "value": float(metrics[key]),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": metrics.get("sample_len"), "primary": key == primary})
    return rows
