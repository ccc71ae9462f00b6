"""Held-out signals that every variant, base included, can move, on data no training stage
learned from:

- `loss`: per held-out instruction, the mean negative log-likelihood of its kept response's
  tokens (the SFT validation split; the loss SFT minimizes, read on records it never saw);
- `preference`: per held-out preference pair (DPO's validation split), the log-probability
  margin log p(chosen) - log p(rejected) of the responses;
- `answers`: each variant answers the held-out instructions with the same sampling settings
  (the pipeline's response temperature and top-p, evaluation.answer_max_tokens new tokens),
  every variant in the same batches; the pipeline's reward scorer then scores every answer, and
  each variant's scores are compared with base's on the same instruction (the win rate).

Each variant's signals are saved in `held_out/<variant>.json` one signal at a time, and the
reward scores in `held_out/judge.json` one variant at a time, so a resumed stage recomputes
nothing that finished.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from sit_core.config import SitConfig
from sit_core.contract import Read
from sit_core.stages import path_of
from sit_core.store.fileio import atomic_write_json, read_json

KEPT = Read("filter", "kept", optional=True)
PAIRS = Read("preference", "pairs", optional=True)
SIGNALS = ("loss", "preference", "answers")
JUDGE = "held_out/judge.json"


def held_out_data(cfg: SitConfig, run_dir: Path) -> dict | None:
    """The held-out instructions (SFT's validation split) and pairs (DPO's, when the preference
    stage ran), split exactly as the training stages split them; None without kept records,
    and no pairs where there are too few to split (no training stage could have run on them)."""
    from sit_core.errors import SitError
    from sit_core.training.common import kept_split, pair_split

    def held(split, path: Path, stage: str) -> list[dict] | None:
        try:
            return split(cfg, path, stage)[1] if path.exists() else None
        except SitError:
            return None

    records = held(kept_split, path_of(run_dir, KEPT), "sft")
    return {"records": records, "pairs": held(pair_split, path_of(run_dir, PAIRS), "dpo") or []} if records else None


def sampling(cfg: SitConfig):
    """One setting for every variant's answers: the pipeline's own response settings."""
    from sit_core.engine.sampling import Sampling

    g = cfg.generation
    return Sampling(temperature=g.response_temperature, top_p=g.response_top_p,
                    max_new_tokens=cfg.evaluation.answer_max_tokens or cfg.preference.max_new_tokens)


def pending(path: Path) -> list[str]:
    done = read_json(path) if path.exists() else {}
    return [s for s in SIGNALS if s not in done]


def score(cfg: SitConfig, model, tokenizer, path: Path, data: dict, on_signal: Callable[[str], None]) -> None:
    """The log-likelihood signals (loss, preference) still missing from one variant's file,
    saved as each finishes; `model` is the variant loaded on its own."""
    max_length = cfg.training.max_seq_length
    for signal in [s for s in pending(path) if s != "answers"]:
        if signal == "loss":
            scored = [response_logprob(model, tokenizer, [user(r["instruction"])], [assistant(r["response"])],
                                       max_length) for r in data["records"]]
            _save_signal(path, "loss", {"values": [-lp / max(1, n) for lp, n in scored], "tokens": [n for _, n in scored]})
        else:
            _save_signal(path, "preference", {"margins": [
                response_logprob(model, tokenizer, p["prompt"], p["chosen"], max_length)[0]
                - response_logprob(model, tokenizer, p["prompt"], p["rejected"], max_length)[0]
                for p in data["pairs"]]})
        on_signal(signal)


def answer(cfg: SitConfig, engine, adapters: dict[str, str | None], tokenizers: dict, data: dict, stage_dir: Path,
           on_variant: Callable[[str], None]) -> None:
    """Every variant's answers to the held-out instructions, in one engine call whose rows mix
    the variants (`adapters`: variant -> adapter directory, None for base), saved in each
    variant's file. Each variant's prompts go through its own tokenizer's chat template."""
    from sit_core.engine.sampling import chat_prompt

    instructions = [r["instruction"] for r in data["records"]]
    seeds = [_seed(cfg, i) for i in range(len(instructions))]
    settings = sampling(cfg)
    prompts = [chat_prompt(tokenizers[v], None, text) for v in adapters for text in instructions]
    completions = engine.generate(prompts, seeds * len(adapters), settings,
                                  [a for a in adapters.values() for _ in instructions])
    for n, variant in enumerate(adapters):
        ids = [c.ids for c in completions[n * len(instructions):(n + 1) * len(instructions)]]
        _save_signal(stage_dir / "held_out" / f"{variant}.json", "answers", {
            "texts": [tokenizers[variant].decode(x, skip_special_tokens=True).strip() for x in ids],
            "tokens": [len(x) for x in ids], "truncated": [len(x) >= settings.max_new_tokens for x in ids],
            "backend": engine.description})
        on_variant(variant)


# The log-likelihood signals and the answers of one variant may finish on two threads at once
# (the evaluate stage decodes beside its scoring): each save rereads the file under this lock.
_FILE_LOCK = threading.Lock()


def _save_signal(path: Path, signal: str, value: dict) -> None:
    with _FILE_LOCK:
        out = read_json(path) if path.exists() else {}
        out[signal] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, out)


def _seed(cfg: SitConfig, index: int) -> int:
    from sit_core.engine.sampling import item_seed

    # The same seed per instruction for every variant: their answers differ by the model only.
    return item_seed(cfg.seed, "evaluate", index, "answer")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def response_logprob(model, tokenizer, prompt: list[dict], response: list[dict], max_length: int) -> tuple[float, int]:
    """(sum of log p over the response's tokens, their number) given the chat prompt: the
    tokens trl's completion-only loss trains on, the end-of-turn included."""
    import torch

    from sit_core.stages.evaluate.lm_eval_runner import num_virtual_tokens

    start = len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)["input_ids"][:max_length]
    if len(ids) <= start:
        return 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    logits = logits[num_virtual_tokens(model):]  # a soft prompt's positions come first
    logp = torch.log_softmax(logits[start - 1:len(ids) - 1], dim=-1)
    target = torch.tensor(ids[start:], device=logp.device)
    return float(logp.gather(1, target[:, None]).sum()), len(ids) - start


def judge(cfg: SitConfig, stage_dir: Path, variants: list[str], data: dict, on_variant: Callable[[str], None]) -> None:
    """The reward scorer's score of every variant's answers, saved one variant at a time; the
    scorer loads only if a variant is still unscored."""
    path = stage_dir / JUDGE
    scores = read_json(path) if path.exists() else {}
    todo = [v for v in variants if v not in scores]
    if not todo or not data["records"]:
        return
    from sit_core.engine.reward import load_scorer

    scorer = load_scorer(cfg)
    try:
        instructions = [r["instruction"] for r in data["records"]]
        size = cfg.preference.reward_batch_size
        for variant in todo:
            texts = read_json(stage_dir / "held_out" / f"{variant}.json")["answers"]["texts"]
            pairs = list(zip(instructions, texts))
            scores[variant] = [s for i in range(0, len(pairs), size) for s in scorer.score(pairs[i:i + size])]
            atomic_write_json(path, scores)
            on_variant(variant)
    finally:
        scorer.close()
