"""One lm-eval task on a loaded lm-eval model, as JSON: the part of the evaluation that runs
under either interpreter.

In sit's own environment it scores the HF model (`lm_eval_runner.load_lm`); in the vLLM
environment the engine process (sit_core/engine/worker.py) loads this file by path and scores
lm-eval's own vLLM model with it. So this module imports only the standard library at module
level and nothing of sit's: the vLLM environment has lm-eval but not sit's dependencies.
"""

from __future__ import annotations

import functools
import json

STDERR_BOOTSTRAP = 1000
ITEMS = "sit_items"  # our key in a variant's lm-eval JSON: per-document metric values
SCORED_BY = "sit_scored_by"  # and {task: the backend that scored it}


@functools.lru_cache(maxsize=4)
def _index(include_path: str, with_lm_evals: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=with_lm_evals)


def task_manager(include_path: str, task: str | None = None):
    """A task index that knows `task`: ours alone when it is one of ours, else lm-eval's plus
    ours. lm-eval's own index scans ~15k YAML files, 6.7 s on the 2-core EPYC of bench/README,
    where ours takes milliseconds; each is built once per process."""
    ours = _index(include_path, False)
    return ours if task is not None and task in ours.all_tasks else _index(include_path, True)


def evaluate_task(lm, task: str, *, limit: int | None, seed: int, include_path: str) -> dict:
    """lm-eval's result JSON for one task, made JSON-safe (per-sample logs are left out)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    tm = task_manager(include_path, task)
    # Instruction-following prompts go through the model's chat template when it has one,
    # as a user would prompt it; log-likelihood benchmarks are scored on raw text as usual.
    chat = is_generative(task, include_path) and bool(getattr(lm.tokenizer, "chat_template", None))
    # bootstrap_iters > 0 keeps lm-eval's standard errors (closed-form for means).
    out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=tm, log_samples=True,
                          apply_chat_template=chat, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=STDERR_BOOTSTRAP)
    samples = out.pop("samples", {})
    out[ITEMS] = {name: per_item(rows) for name, rows in samples.items()}
    return json.loads(json.dumps(out, default=handle_non_serializable))


def is_generative(task: str, include_path: str) -> bool:
    entry = task_manager(include_path, task).task_index.get(task)
    return entry is not None and (entry.cfg or {}).get("output_type") == "generate_until"


def per_item(samples: list[dict]) -> dict:
    """Each scalar metric per document, in doc_id order: what paired comparisons between
    variants need; and a generation task's answers, to read what each variant wrote (the rest
    of the per-sample log, prompts and log-likelihoods, is left out)."""
    rows = sorted(samples, key=lambda s: s["doc_id"])
    names = [m for m in (rows[0].get("metrics") or []) if isinstance(rows[0].get(m), (int, float))] if rows else []
    out = {"doc_ids": [s["doc_id"] for s in rows], "metrics": {m: [float(s[m]) for s in rows] for m in names}}
    answers = [s.get("filtered_resps") for s in rows]
    if rows and all(isinstance(a, list) and a and isinstance(a[0], str) for a in answers):
        out["answers"] = [a[0] for a in answers]
    return out
