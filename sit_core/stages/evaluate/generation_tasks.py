"""lm-eval's generation tasks (ifeval, sit_ifeval_local) for every variant at once, decoded in
the same batches of sit's engine.

lm-eval's HF model decodes one variant at a time, a few rows per step, and a step over 16 rows
costs little more than one over 4 (bench/README, session 8). So a task runs in three steps:

1. `requests`: lm-eval runs the task against a model that only records what it is asked: the
   contexts, rendered with the variant's own chat template, and the generation settings;
2. `decode`: one engine call answers every variant's requests, each row with its variant's
   adapter. Contexts are tokenized and left-truncated as lm-eval's HF model does, decoding stops
   at an end-of-sequence token, and the text is cut at the task's stop strings;
3. `replay`: lm-eval runs the task again against a model that answers with those texts, and
   scores them. The result JSON is lm-eval's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from sit_core.stages.evaluate import lm_eval_runner

# lm-eval's HF model's number of new tokens where a task states none.
DEFAULT_MAX_GEN_TOKS = 256


def _scripted_lm(tokenizer, answers: list[str] | None):
    """An lm-eval model that records the generation requests it gets (answering "") or, given
    `answers`, answers them in order; the requests must be the ones recorded."""
    from lm_eval.api.model import LM, TemplateLM
    from lm_eval.models.huggingface import HFLM

    class ScriptedLM(LM):
        chat_template = TemplateLM.chat_template
        apply_chat_template = HFLM.apply_chat_template
        tokenizer_name = HFLM.tokenizer_name

        def __init__(self):
            super().__init__()
            self.tokenizer, self.chat_template_args = tokenizer, {}
            self.requests: list[tuple[str, dict]] = []

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            self.requests += [r.args for r in requests]
            if answers is None:
                return [""] * len(requests)
            if len(self.requests) > len(answers):
                raise RuntimeError(f"lm-eval asked for {len(self.requests)} answers where {len(answers)} were decoded")
            return answers[len(self.requests) - len(requests):len(self.requests)]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("only generation tasks are decoded by the engine")

        loglikelihood_rolling = loglikelihood

    return ScriptedLM()


def requests(task: str, tokenizer, *, limit: int | None, seed: int) -> list[tuple[str, dict]]:
    """(context, generation settings) of every request lm-eval makes for `task` of a model with
    this tokenizer."""
    lm = _scripted_lm(tokenizer, None)
    lm_eval_runner.evaluate_task(lm, task, limit=limit, seed=seed)
    return lm.requests


def replay(task: str, tokenizer, answers: list[str], *, limit: int | None, seed: int) -> dict:
    """lm-eval's result JSON for `task`, scored on `answers` (decoded for `requests`)."""
    return lm_eval_runner.evaluate_task(_scripted_lm(tokenizer, answers), task, limit=limit, seed=seed)


def decode(engine, tokenizers: dict, adapters: dict[str, str | None], asked: dict[str, list[tuple[str, dict]]], *,
           max_length: int, seeds) -> dict[str, list[str]]:
    """Every variant's answers to its requests `asked` (variant -> requests), in engine calls that
    mix the variants, one call per distinct generation setting. `seeds(i)`: the i-th request's
    seed, the same for every variant, so a sampled task's answers differ by the model only."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

    from sit_core.engine.sampling import Sampling

    answers = {v: [""] * len(rows) for v, rows in asked.items()}
    groups: dict[str, list[tuple[str, int]]] = {}
    for variant, rows in asked.items():
        for i, (_, gen_kwargs) in enumerate(rows):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append((variant, i))
    for key, members in groups.items():
        kwargs = normalize_gen_kwargs(json.loads(key), DEFAULT_MAX_GEN_TOKS)
        max_new = kwargs["max_gen_toks"]
        sampling = Sampling(temperature=float(kwargs["temperature"]) if kwargs["do_sample"] else 0.0,
                            top_p=float(kwargs.get("top_p") or 1.0) if kwargs["do_sample"] else 1.0,
                            max_new_tokens=max_new)
        prompts = [_encode(tokenizers[v], asked[v][i][0], max_length - max_new) for v, i in members]
        completions = engine.generate(prompts, [seeds(i) for _, i in members], sampling,
                                      [adapters[v] for v, _ in members])
        for (variant, i), completion in zip(members, completions):
            tokenizer = tokenizers[variant]
            until = handle_stop_sequences(kwargs.get("until"), tokenizer.decode(tokenizer.eos_token_id))
            text = tokenizer.decode(completion.ids, skip_special_tokens=True)
            answers[variant][i] = postprocess_generated_text(text, until, None)
    return answers


def _encode(tokenizer, context: str, max_context: int) -> list[int]:
    """As lm-eval's HF model encodes a context: no second BOS before a templated one, the
    oldest tokens dropped past `max_context`."""
    bos = getattr(tokenizer, "bos_token", None)
    special = {"add_special_tokens": False} if bos and context.startswith(bos) else {}
    return tokenizer(context, **special)["input_ids"][-max_context:]


def max_length(model_path: str | Path, tokenizer, trust_remote_code: bool) -> int:
    """The context lm-eval's HF model would give this model."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return resolve_max_length(config, tokenizer)


def description(engine) -> str:
    import lm_eval

    return f"{engine.description}, all variants in the same batches (scored by lm-eval {lm_eval.__version__})"

