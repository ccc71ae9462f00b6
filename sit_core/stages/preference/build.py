"""Preference pairs for DPO: the work of the "preference" stage.

Every response model answers every kept instruction `responses_per_model` times; a reward
model scores each answer; per instruction the best answer becomes `chosen` and the worst
`rejected`, if their scores differ by at least `min_margin`.

Crash safety: each response and each score is appended to an fsync'd log
(`responses.jsonl`, `scores.jsonl`) keyed by "<model name>:<instruction id>:<sample>", and
each response's seed comes from that key, so a killed run continues where it stopped and
writes the same pairs as an uninterrupted one. Models are loaded one at a time and released
before the next.

Responses come from the generation engine (sit_core/engine/engines.py): vLLM, or sit's
seeded loop, in stable mode (in process, one item per call) unless `generation_batch_size > 1`.
A batched or vLLM engine runs in a killable process under a stall watchdog, and the stage
falls back to stable mode for good if it ever stalls. Each record names its backend. The
pair-selection settings (`num_pairs`, `min_pairs`, `min_margin`) do not invalidate the logs:
changing them re-selects pairs without running a model again.

Sharded, the same sampling and scoring run over worker processes (shards.py), with the same
output.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from sit_core.config import SitConfig
from sit_core.errors import NotEnoughDataError, SitError
from sit_core.store.fileio import append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_text, jsonl_text, read_jsonl
from sit_core.store.manifest import StageRun, input_hashes, manifest_path, read_manifest
from sit_core.config import ResponseModel
from sit_core.engine.engines import Engine, EngineFailed, decode, engine_spec, open_engine
from sit_core.engine.models import load_tokenizer
from sit_core.engine.sampling import Sampling, chat_prompt, item_seed
from sit_core.contract import Read
from sit_core.stages import input_paths, path_of

NAME = "preference"
RESPONSES = "responses.jsonl"
SCORES = "scores.jsonl"
OUTPUT = "pairs.jsonl"
STATS = "stats.json"
HISTOGRAM = "score_histogram.png"
SELECTION_KEYS = ("num_pairs", "min_pairs", "min_margin")

log = logging.getLogger("sit.preference")


KEPT = Read("filter", "kept")


def fingerprint(cfg: SitConfig) -> dict:
    """Two parts: what the response and score logs depend on, and how pairs are picked from them."""
    pref = cfg.fingerprint("preference")
    selection = {k: pref.pop(k) for k in SELECTION_KEYS}
    responses = {"preference": pref, "seed": cfg.seed, "reward_model": cfg.models.reward_model,
                 "reward_type": cfg.models.reward_type, "trust_remote_code": cfg.models.trust_remote_code,
                 "response_models": [m.model_dump(mode="json") for m in cfg.models.response_models]}
    return {"responses": responses, "selection": selection}


# ---------------------------------------------------------------------------------------
# The stage


def run(cfg: SitConfig, stage: StageRun) -> dict:
    work = Work.load(cfg, stage.run_dir)
    total = 2 * work.size  # a unit per response sampled and per response scored

    def track(done: int) -> None:
        stage.progress(done, total)

    responses = {r["key"]: r for r in read_jsonl(stage.dir / RESPONSES, repair=True)}
    sample_responses(cfg, work.items, responses, stage.dir / RESPONSES, stalled(stage.manifest), stage.event,
                     track)

    ordered = work.ordered(responses)
    candidates = [r for r in ordered if r["response"]]
    scores = {r["key"]: r["score"] for r in read_jsonl(stage.dir / SCORES, repair=True)}
    sampled_and_empty = len(ordered) + (len(ordered) - len(candidates))  # an empty response counts as scored
    score_responses(cfg, candidates, work.instructions, scores, stage.dir / SCORES,
                    lambda n: track(sampled_and_empty + n))
    return finish(cfg, stage, work.kept, ordered, scores)


def begin(cfg: SitConfig, run_dir: Path, open_stage: Callable[[SitConfig, Path, str], StageRun]) -> StageRun:
    """Open (or resume) the stage with the driver's `open_stage`, over the same logs when only
    the selection settings changed."""
    previous_selection = _forget_other_selection(cfg, run_dir)
    stage = open_stage(cfg, run_dir, NAME)
    if previous_selection is not None:
        stage.event("reselect", previous=previous_selection, current=fingerprint(cfg)["selection"])
    return stage


def stalled(manifest: dict) -> bool:
    """Whether an engine stalled in this stage: a stall recorded before a restart still counts,
    and the stage stays in stable mode."""
    return any(e["event"] == "stall" for e in manifest["events"])


@dataclass(frozen=True)
class Item:
    """One response to write: model `model` answers instruction `id` for the `sample`-th time."""

    key: str
    model: str
    id: int | str
    sample: int
    instruction: str
    seed: int


@dataclass(frozen=True)
class Work:
    """The responses the stage makes, derived from kept.jsonl and the config alone, so every
    process that derives them (the stage, a shard worker) gets the same items in the same order.
    Every response model answers the same instructions in the same order, so one index range
    names the same instructions for all of them."""

    kept: list[dict]
    items: dict[str, list[Item]]  # per response model, in config order

    @classmethod
    def load(cls, cfg: SitConfig, run_dir: Path) -> Work:
        kept = _read_kept(path_of(run_dir, KEPT))
        return cls(kept, {spec.name: [response_item(cfg, spec.name, rec, k) for rec in kept
                                      for k in range(cfg.preference.responses_per_model)]
                          for spec in cfg.models.response_models})

    @property
    def per_model(self) -> int:
        return len(next(iter(self.items.values())))

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.items.values())

    @property
    def instructions(self) -> dict:
        return {rec["id"]: rec["instruction"] for rec in self.kept}

    def slice(self, start: int, end: int) -> dict[str, list[Item]]:
        """Items [start, end) of every model's list."""
        return {name: items[start:end] for name, items in self.items.items()}

    def ordered(self, responses: dict[str, dict]) -> list[dict]:
        """Every response, model by model in item order: the order an uninterrupted run logs them in."""
        return [responses[it.key] for items in self.items.values() for it in items]


def _read_kept(path: Path) -> list[dict]:
    kept = read_jsonl(path)
    for i, rec in enumerate(kept):
        if "id" not in rec or not isinstance(rec.get("instruction"), str):
            raise SitError(f"{path} line {i + 1} lacks an 'id' or an 'instruction'",
                           "rerun the filter stage (`sit reset <run_dir> filter`) to rebuild it")
    if len({rec["id"] for rec in kept}) != len(kept):
        raise SitError(f"{path} repeats instruction ids", "rerun the filter stage to rebuild it")
    return kept


def response_item(cfg: SitConfig, model_name: str, rec: dict, sample: int) -> Item:
    return Item(key=f"{model_name}:{rec['id']}:{sample}", model=model_name, id=rec["id"], sample=sample,
                instruction=rec["instruction"],
                seed=item_seed(cfg.seed, NAME, rec["id"], f"{model_name}:{sample}"))


def _forget_other_selection(cfg: SitConfig, run_dir: Path) -> dict | None:
    """If only the selection settings changed since this stage's work was made, drop the old
    manifest so `open_stage` starts a fresh one over the same logs instead of refusing, and
    return the old selection settings. The logs depend only on the `responses` part of the
    fingerprint and on the inputs, both of which must match."""
    old = read_manifest(run_dir, NAME)
    if old is None:
        return None
    new = fingerprint(cfg)
    old_fp = old.get("fingerprint", {})
    if old_fp.get("responses") != new["responses"] or old_fp.get("selection") == new["selection"]:
        return None
    paths = input_paths(cfg, run_dir, NAME)
    if not all(p.exists() for p in paths) or old.get("inputs") != input_hashes(run_dir, paths):
        return None
    manifest_path(run_dir, NAME).unlink()
    return old_fp.get("selection")


# ---------------------------------------------------------------------------------------
# Sampling


def sample_responses(cfg: SitConfig, items: dict[str, list[Item]], responses: dict[str, dict], log_path: Path,
                     stable: bool, event: Callable[..., None], progress: Callable[[int], None] | None = None) -> None:
    """Answer the items missing from `responses` into `log_path` (and `responses`).

    One engine per distinct model, reused across the response models that sample it at other
    settings (the demo's three are one model at three temperatures). `event(kind, **details)`
    records a stall and the throughput; `progress(n)` hears how many responses there are after
    each append. Neither touches a manifest here, so a shard worker, which must not write the
    stage's manifest, runs this same code."""
    p = cfg.preference
    total = sum(len(v) for v in items.values())
    bar = tqdm(total=total, initial=len(responses), desc="preference responses", unit="response")
    new_tokens, load_seconds, started = 0, 0.0, time.perf_counter()
    backends: set[str] = set()

    def record(records: list[dict]) -> None:
        nonlocal new_tokens
        append_jsonl(log_path, records)
        responses.update((r["key"], r) for r in records)
        new_tokens += sum(r["tokens"] for r in records)
        bar.update(len(records))
        if progress:
            progress(len(responses))

    for specs in _by_model(cfg.models.response_models):
        todo = [spec for spec in specs if any(it.key not in responses for it in items[spec.name])]
        engine = None
        try:
            for spec in todo:
                sampling = Sampling(spec.temperature, spec.top_p, p.max_new_tokens)
                while True:
                    size = 1 if stable else p.generation_batch_size
                    # Fixed slices of the model's item list (a shard's list starts on a slice
                    # boundary of the whole one). A slice that is partly logged (a kill tore its
                    # append) is sampled whole again and only its missing records kept, so every
                    # row sees the same batch mates as in an uninterrupted run.
                    slices = [items[spec.name][i:i + size] for i in range(0, len(items[spec.name]), size)]
                    batches = [b for b in slices if any(it.key not in responses for it in b)]
                    if not batches:
                        break
                    if engine is None:
                        loading = time.perf_counter()
                        engine = _open_response_engine(cfg, specs[0], items, log_path.parent, stable)
                        load_seconds += time.perf_counter() - loading
                        backends.add(engine.backend)
                        event("engine_started", backend=engine.backend, models=[s.name for s in todo],
                              seconds=round(time.perf_counter() - loading, 2))
                    try:
                        for batch in batches:
                            record([r for r in answer_items(engine, batch, sampling) if r["key"] not in responses])
                        break
                    except EngineFailed as e:
                        # The seeds' batched notebook deadlocked for good; stable mode never did.
                        # The items of the unfinished batch are simply still missing from the log.
                        log.warning("preference: %s; continuing in stable mode for the rest of the stage", e)
                        event("stall", model=spec.name, reason=str(e), backend=engine.backend,
                              stall_timeout_s=p.stall_timeout_s, fallback="stable")
                        stable, engine = True, None
        finally:
            if engine is not None:
                engine.close()
    bar.close()
    elapsed = time.perf_counter() - started
    if new_tokens:
        # Engine starts are a fixed cost per model; sampling throughput excludes them.
        event("generated", tokens=new_tokens, seconds=round(elapsed, 2), load_seconds=round(load_seconds, 2),
              tokens_per_sec=round(new_tokens / elapsed, 2),
              sampling_tokens_per_sec=round(new_tokens / max(elapsed - load_seconds, 1e-9), 2),
              batch_size=1 if stable else p.generation_batch_size, backends=sorted(backends))


def _by_model(specs: list[ResponseModel]) -> list[list[ResponseModel]]:
    """Response models grouped by the weights they load, in config order."""
    groups: dict[tuple, list[ResponseModel]] = {}
    for spec in specs:
        groups.setdefault((spec.model, spec.load_in_4bit), []).append(spec)
    return list(groups.values())


def _open_response_engine(cfg: SitConfig, spec: ResponseModel, items: dict[str, list[Item]], log_dir: Path,
                          stable: bool) -> Engine:
    """The engine of one response model; any failure to start becomes a SitError naming it."""
    p = cfg.preference
    try:
        tokenizer = load_tokenizer(spec.model, trust_remote_code=cfg.models.trust_remote_code)
        longest = max(len(chat_prompt(tokenizer, None, it.instruction)) for its in items.values() for it in its)
        engine_settings = engine_spec(cfg, spec.model, stable=stable, isolated=p.generation_batch_size > 1,
                                      load_in_4bit=spec.load_in_4bit, batch_size=p.generation_batch_size,
                                      max_model_len=longest + p.max_new_tokens + 16,
                                      stall_timeout_s=p.stall_timeout_s, log_path=log_dir / "engine.log")
        return open_engine(engine_settings, spec.name, tokenizer)
    except SitError as e:
        raise SitError(f"response model '{spec.name}' ({spec.model}) could not be loaded: {e.problem}", e.fix) from None
    except EngineFailed as e:
        raise SitError(f"response model '{spec.name}' ({spec.model}) could not be loaded: {e}",
                       "see the engine's log named above; responses already written are kept") from None
    except Exception as e:  # noqa: BLE001 - a broken checkpoint can fail in many ways; name the model
        raise SitError(f"response model '{spec.name}' ({spec.model}) could not be loaded: {type(e).__name__}: {e}",
                       "fix or replace this entry of models.response_models; responses already written by the "
                       "other models are kept and reused when the stage runs again") from None


def answer_items(engine: Engine, items: list[Item], sampling: Sampling) -> list[dict]:
    """Answer each item through the model's chat template; one log record per item."""
    prompts = [chat_prompt(engine.tokenizer, None, it.instruction) for it in items]
    completions = engine.generate(prompts, [it.seed for it in items], sampling)
    return [{"key": it.key, "model": it.model, "id": it.id, "sample": it.sample, "response": decode(engine, c),
             "tokens": len(c.ids), "truncated": c.truncated, "backend": engine.backend}
            for it, c in zip(items, completions)]


# ---------------------------------------------------------------------------------------
# Scoring


def score_responses(cfg: SitConfig, candidates: list[dict], instructions: dict, scores: dict[str, float],
                    log_path: Path, progress: Callable[[int], None] | None = None) -> None:
    """Score the candidates missing from `scores` into `log_path` (and `scores`), in fixed
    slices of `candidates` like the batched sampler's (a shard's candidates start on a slice
    boundary of the whole list). `progress(n)` hears how many scores there are after each append."""
    size = cfg.preference.reward_batch_size
    batches = [candidates[i:i + size] for i in range(0, len(candidates), size)]
    pending = [b for b in batches if any(r["key"] not in scores for r in b)]
    if not pending:
        return
    from sit_core.engine.reward import load_scorer

    scorer = load_scorer(cfg)
    try:
        for batch in tqdm(pending, desc="preference scores", unit="batch"):
            values = scorer.score([(instructions[r["id"]], r["response"]) for r in batch])
            new = [{"key": r["key"], "score": v} for r, v in zip(batch, values) if r["key"] not in scores]
            append_jsonl(log_path, new)
            scores.update((s["key"], s["score"]) for s in new)
            if progress:
                progress(len(scores))
    finally:
        scorer.close()


# ---------------------------------------------------------------------------------------
# Pair selection


@dataclass(frozen=True)
class Candidate:
    model: str
    sample: int
    text: str
    score: float


@dataclass(frozen=True)
class Decision:
    """What one instruction yields: a pair, or the reason it yields none. `spread` is the best
    minus the worst score of its distinct responses (None with fewer than two)."""

    chosen: Candidate | None
    rejected: Candidate | None
    reason: str | None
    spread: float | None


def pick_pair(candidates: list[Candidate], min_margin: float) -> Decision:
    """Chosen is the highest score, rejected the lowest; equal scores resolve to the earliest
    candidate (model order, then sample). Identical texts count once: DPO learns nothing
    from a pair whose two sides are the same."""
    if len(candidates) < 2:
        return Decision(None, None, "too_few_responses", None)
    distinct: dict[str, Candidate] = {}
    for c in candidates:
        distinct.setdefault(c.text, c)
    if len(distinct) < 2:
        return Decision(None, None, "identical_responses", None)
    chosen = max(distinct.values(), key=lambda c: c.score)
    rejected = min(distinct.values(), key=lambda c: c.score)
    spread = chosen.score - rejected.score
    if chosen.score == rejected.score:
        return Decision(None, None, "tie", spread)
    if spread < min_margin:
        return Decision(None, None, "below_margin", spread)
    return Decision(chosen, rejected, None, spread)


def select_pairs(groups: list[tuple[dict, list[Candidate]]], num_pairs: int,
                 min_margin: float) -> tuple[list[dict], list[Decision]]:
    """Pairs in TRL's conversational DPO format. When more instructions qualify than
    `num_pairs`, the widest margins win (ties by input order); output keeps input order."""
    decisions = [pick_pair(cands, min_margin) for _, cands in groups]
    qualifying = [i for i, d in enumerate(decisions) if d.reason is None]
    best = sorted(sorted(qualifying, key=lambda i: -decisions[i].spread)[:num_pairs])
    pairs = []
    for i in best:
        rec, d = groups[i][0], decisions[i]
        pairs.append({
            "id": rec["id"],
            "prompt": [{"role": "user", "content": rec["instruction"]}],
            "chosen": [{"role": "assistant", "content": d.chosen.text}],
            "rejected": [{"role": "assistant", "content": d.rejected.text}],
            "chosen_model": d.chosen.model, "rejected_model": d.rejected.model,
            "chosen_score": d.chosen.score, "rejected_score": d.rejected.score,
        })
    return pairs, decisions


def finish(cfg: SitConfig, stage: StageRun, kept: list[dict], ordered: list[dict], scores: dict[str, float]) -> dict:
    """Select the pairs from every response (`ordered`) and its score, write the outputs and close the stage."""
    p = cfg.preference
    by_id: dict = {rec["id"]: [] for rec in kept}
    for r in ordered:
        if r["response"]:
            by_id[r["id"]].append(Candidate(r["model"], r["sample"], r["response"], scores[r["key"]]))
    groups = [(rec, by_id[rec["id"]]) for rec in kept]
    pairs, decisions = select_pairs(groups, p.num_pairs, p.min_margin)

    stats = _statistics(cfg, ordered, groups, pairs, decisions)
    stats_path = atomic_write_json(stage.dir / STATS, stats)
    plot_path = _plot(stage.dir / HISTOGRAM, stats, p.min_margin)
    need = p.min_pairs or p.num_pairs
    if len(pairs) < need:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(stats["skipped"].items())) or "none"
        raise NotEnoughDataError(
            f"only {len(pairs)} preference pairs, {need} needed: of {len(kept)} instructions "
            f"{stats['qualifying_pairs']} reached min_margin={p.min_margin:g} (skipped: {skipped}; "
            f"{stats['empty_responses']} empty responses)",
            "lower preference.min_margin or preference.min_pairs (the responses and scores so far are reused, no "
            "model runs again), or add response models or raise preference.responses_per_model for more variety; "
            f"see {stats_path}",
        )
    out = stage.dir / OUTPUT
    atomic_write_text(out, jsonl_text(pairs))
    stage.progress(2 * len(ordered), 2 * len(ordered))
    stalls = sum(1 for e in stage.manifest.get("events", []) if e["event"] == "stall")
    summary = {k: stats[k] for k in ("instructions", "responses", "empty_responses", "qualifying_pairs", "pairs",
                                     "skipped", "wins_per_model")}
    summary["stalls"] = stalls
    summary["tables"] = {"preference_summary": _summary_rows(cfg, stats)}
    return stage.finish([out, stats_path, plot_path], summary)


# ---------------------------------------------------------------------------------------
# Statistics and the histogram


def _statistics(cfg: SitConfig, ordered: list[dict], groups, pairs: list[dict], decisions: list[Decision]) -> dict:
    import numpy as np

    names = [m.name for m in cfg.models.response_models]
    per_model = {n: [c.score for _, cands in groups for c in cands if c.model == n] for n in names}
    all_scores = [s for v in per_model.values() for s in v]
    edges = np.histogram_bin_edges(all_scores, bins=20) if all_scores else np.array([])
    spreads = [d.spread for d in decisions if d.spread is not None]
    margin_edges = np.histogram_bin_edges(spreads, bins=20) if spreads else np.array([])
    margins = [pr["chosen_score"] - pr["rejected_score"] for pr in pairs]
    wins = Counter(pr["chosen_model"] for pr in pairs)
    losses = Counter(pr["rejected_model"] for pr in pairs)
    return {
        "instructions": len(groups),
        "responses": len(ordered),
        "empty_responses": sum(1 for r in ordered if not r["response"]),
        "truncated_responses": sum(1 for r in ordered if r["truncated"]),
        "qualifying_pairs": sum(1 for d in decisions if d.reason is None),
        "pairs": len(pairs),
        "target_pairs": cfg.preference.num_pairs,
        "min_margin": cfg.preference.min_margin,
        "skipped": dict(sorted(Counter(d.reason for d in decisions if d.reason is not None).items())),
        "wins_per_model": {n: wins.get(n, 0) for n in names},
        "losses_per_model": {n: losses.get(n, 0) for n in names},
        "score_summary": {n: ({"count": len(v), "mean": float(np.mean(v)), "min": float(np.min(v)),
                               "max": float(np.max(v))} if v else {"count": 0}) for n, v in per_model.items()},
        "score_histogram": {"bin_edges": edges.tolist(),
                            "counts": {n: np.histogram(v, bins=edges)[0].tolist() if len(edges) else []
                                       for n, v in per_model.items()}},
        # Spread of every instruction with two distinct responses: where min_margin cuts.
        "margin_histogram": {"bin_edges": margin_edges.tolist(),
                             "counts": np.histogram(spreads, bins=margin_edges)[0].tolist() if spreads else []},
        "selected_margins": ({"min": min(margins), "median": float(np.median(margins)), "max": max(margins)}
                             if margins else {}),
    }


def _summary_rows(cfg: SitConfig, stats: dict) -> list[dict]:
    rows = []
    for n in (m.name for m in cfg.models.response_models):
        s = stats["score_summary"][n]
        rows.append({"model": n, "responses": s["count"], "mean_score": round(s["mean"], 4) if s["count"] else None,
                     "chosen": stats["wins_per_model"][n], "rejected": stats["losses_per_model"][n]})
    return rows


def _plot(path: Path, stats: dict, min_margin: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display in Colab workers, CI or the Prefect worker
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    hist = stats["score_histogram"]
    for name, counts in hist["counts"].items():
        if counts:
            left.stairs(counts, hist["bin_edges"], label=name)
    left.set(title="Reward scores per response model", xlabel="score", ylabel="responses")
    left.legend(fontsize="small")
    margins = stats["margin_histogram"]
    if margins["counts"]:
        right.stairs(margins["counts"], margins["bin_edges"], fill=True, alpha=0.6)
    right.axvline(min_margin, color="red", linestyle="--", label=f"min_margin={min_margin:g}")
    right.set(title="Best minus worst score per instruction", xlabel="margin", ylabel="instructions")
    right.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
