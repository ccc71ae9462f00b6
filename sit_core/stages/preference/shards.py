"""Sharded preference stage: responses, then scores, split into contiguous index ranges (shards),
each run by a worker process with its own model, and merged into exactly what preference.run()
writes.

Why that is exact:
- Responses. Every response model answers the same instructions in the same order
  (preference.Work), so one range [start, end) of item indices names a shard's items for all
  models; a shard loads each response model in turn, as the stage does. Each response is seeded
  from its key, and ranges are cut on `generation_batch_size` boundaries, so in batched mode a
  shard samples the very batches (batch mates, padding) that one process samples.
- Scores, once every response is in. The candidates (the non-empty responses, in the stage's
  order) are cut on `reward_batch_size` boundaries, so a shard scores the very slices one process
  scores: a score depends on its batch's padding at float-rounding level, and the output should
  not. Scoring is sharded rather than done in the parent because the parent claims no device
  (every device belongs to a worker) and a real reward model or judge over thousands of responses
  is minutes of GPU work; the extra cost is one reward-model load per worker.
The merged responses.jsonl and scores.jsonl list every record in the order an uninterrupted
run logs them, so they, and the pairs selected from them by preference.finish(), equal an
unsharded run's byte for byte.

Layout, under <run_dir>/preference/shards/:
    responses/plan.json                   the batch size and the shard ranges (item indices)
    responses/<start>-<end>.jsonl         one shard's responses, fsync'd as each batch is done
    scores/plan.json, scores/<start>-<end>.jsonl     the same over candidate indices

Each plan is recorded before its shards start; a shard is finished when every key it covers is
logged, so a resumed run finishes only the unfinished shards, each from its own log. Records in
the stage's own logs (an unsharded run that stopped part-way) count as done.

Only the parent writes the manifest: a worker returns a summary carrying its events (a stall,
its throughput) for the parent to record. A stall keeps the shards started after it in stable
mode, as it keeps the rest of an unsharded stage. Nothing here imports Prefect.
"""

from __future__ import annotations

from pathlib import Path

from sit_core.config import SitConfig
from sit_core.contract import Shard, ShardFiles
from sit_core.stages.preference import build as preference
from sit_core.store import shard_plan as shards
from sit_core.store.fileio import atomic_write_text, jsonl_text, read_jsonl
from sit_core.stages import path_of
from sit_core.store.manifest import StageRun, stage_dir

RESPONSES_DIR = "responses"
SCORES_DIR = "scores"


def shards_dir(run_dir: Path) -> Path:
    return Path(run_dir) / preference.NAME / shards.SHARDS_DIR


def response_plan(cfg: SitConfig, run_dir: Path) -> shards.Plan:
    return shards.Plan(Path(run_dir), preference.NAME, shards_dir(run_dir) / RESPONSES_DIR,
                       cfg.preference.generation_batch_size, "preference.generation_batch_size")


def score_plan(cfg: SitConfig, run_dir: Path) -> shards.Plan:
    return shards.Plan(Path(run_dir), preference.NAME, shards_dir(run_dir) / SCORES_DIR,
                       cfg.preference.reward_batch_size, "preference.reward_batch_size")


def _stage_log(run_dir: Path, name: str) -> dict[str, dict]:
    # Never repaired here: workers read it side by side, and only a merge rewrites it.
    return {r["key"]: r for r in read_jsonl(stage_dir(run_dir, preference.NAME) / name)}


def _logged(run_dir: Path, name: str, plan: shards.Plan) -> dict[str, dict]:
    """Records by key from the stage's own log and every shard log of the plan. Read without
    repair: a worker may be appending to its log, and its torn tail is its own to cut."""
    records = _stage_log(run_dir, name)
    for shard in plan.read():
        records.update((r["key"], r) for r in read_jsonl(plan.log(shard)))
    return records


def _recorded(plan: shards.Plan, size: int, n_shards: int) -> list[Shard]:
    """The plan's shards, cut over [0, size) and recorded first if there is no plan yet."""
    recorded = plan.read()
    if not recorded:
        recorded = shards.split(0, size, plan.batch_size, n_shards)
        plan.write(recorded)
    return recorded


def _candidates(cfg: SitConfig, run_dir: Path) -> tuple[preference.Work, list[dict]]:
    """The work and its non-empty responses in the stage's order, from the merged responses.jsonl."""
    work = preference.Work.load(cfg, run_dir)
    ordered = work.ordered(_stage_log(run_dir, preference.RESPONSES))
    return work, [r for r in ordered if r["response"]]


# ---------------------------------------------------------------------------------------
# Responses


def pending_response_shards(cfg: SitConfig, run_dir: Path, n_shards: int) -> list[Shard]:
    """The unfinished shards of the responses plan (recorded on the first call)."""
    work = preference.Work.load(cfg, run_dir)
    plan = response_plan(cfg, run_dir)
    recorded = _recorded(plan, work.per_model, n_shards)
    responses = _logged(run_dir, preference.RESPONSES, plan)
    return [s for s in recorded
            if any(it.key not in responses for items in work.slice(*s).values() for it in items)]


def response_shard_files(cfg: SitConfig, run_dir: Path, shard: Shard) -> ShardFiles:
    """The kept instructions (preference.Work), the responses an unsharded run logged, its own log."""
    return ShardFiles((path_of(run_dir, preference.KEPT), stage_dir(run_dir, preference.NAME) / preference.RESPONSES),
                      response_plan(cfg, run_dir).log(shard))


def sample_shard(cfg: SitConfig, run_dir: Path, shard: Shard, stable: bool) -> dict:
    """Sample (or finish) one shard of responses into its own log; run in a worker process.
    Returns a small summary with the events for the parent to record."""
    items = preference.Work.load(cfg, run_dir).slice(*shard)
    log_path = response_plan(cfg, run_dir).log(shard)
    own = {it.key for v in items.values() for it in v}
    responses = {k: r for k, r in _stage_log(run_dir, preference.RESPONSES).items() if k in own}
    responses.update((r["key"], r) for r in read_jsonl(log_path, repair=True))
    events: list[dict] = []
    preference.sample_responses(cfg, items, responses, log_path, stable,
                                lambda kind, **details: events.append({"event": kind, **details}))
    return {"shard": list(shard), "responses": len(responses), "events": events}


def merge_responses(cfg: SitConfig, stage: StageRun) -> None:
    """Every response into the stage's responses.jsonl, in an uninterrupted run's order; the
    scoring shards read their candidates from it."""
    work = preference.Work.load(cfg, stage.run_dir)
    responses = _logged(stage.run_dir, preference.RESPONSES, response_plan(cfg, stage.run_dir))
    atomic_write_text(stage.dir / preference.RESPONSES, jsonl_text(work.ordered(responses)))


# ---------------------------------------------------------------------------------------
# Scores


def pending_score_shards(cfg: SitConfig, run_dir: Path, n_shards: int) -> list[Shard]:
    """The unfinished shards of the scores plan (recorded on the first call, after merge_responses)."""
    _, candidates = _candidates(cfg, run_dir)
    plan = score_plan(cfg, run_dir)
    recorded = _recorded(plan, len(candidates), n_shards)
    scores = _logged(run_dir, preference.SCORES, plan)
    return [s for s in recorded if any(c["key"] not in scores for c in candidates[s[0]:s[1]])]


def score_shard_files(cfg: SitConfig, run_dir: Path, shard: Shard) -> ShardFiles:
    """The kept instructions, the merged responses (the candidates), the scores an unsharded run
    logged, its own log."""
    stage = stage_dir(run_dir, preference.NAME)
    return ShardFiles((path_of(run_dir, preference.KEPT), stage / preference.RESPONSES, stage / preference.SCORES),
                      score_plan(cfg, run_dir).log(shard))


def score_shard(cfg: SitConfig, run_dir: Path, shard: Shard) -> dict:
    """Score (or finish) one shard of candidates into its own log; run in a worker process."""
    work, candidates = _candidates(cfg, run_dir)
    candidates = candidates[shard[0]:shard[1]]
    log_path = score_plan(cfg, run_dir).log(shard)
    own = {c["key"] for c in candidates}
    scores = {k: r["score"] for k, r in _stage_log(run_dir, preference.SCORES).items() if k in own}
    scores.update((r["key"], r["score"]) for r in read_jsonl(log_path, repair=True))
    preference.score_responses(cfg, candidates, work.instructions, scores, log_path)
    return {"shard": list(shard), "scores": len(scores), "events": []}


# ---------------------------------------------------------------------------------------
# The parent's view


def progress(cfg: SitConfig, run_dir: Path) -> tuple[int, int]:
    """(done, total) as preference.run() counts it: a unit per response sampled and per response
    scored, an empty response counting as scored."""
    work = preference.Work.load(cfg, run_dir)
    responses = _logged(run_dir, preference.RESPONSES, response_plan(cfg, run_dir))
    scores = _logged(run_dir, preference.SCORES, score_plan(cfg, run_dir))
    empty = sum(1 for r in responses.values() if not r["response"])
    return len(responses) + empty + len(scores), 2 * work.size


def finish(cfg: SitConfig, stage: StageRun) -> dict:
    """Merge the score shards into the stage's scores.jsonl, in an uninterrupted run's order, and
    finish the stage exactly as preference.run() does."""
    work, candidates = _candidates(cfg, stage.run_dir)
    plan = score_plan(cfg, stage.run_dir)
    scores = _logged(stage.run_dir, preference.SCORES, plan)
    atomic_write_text(stage.dir / preference.SCORES, jsonl_text(scores[c["key"]] for c in candidates))
    stage.event("merged_shards", response_shards=len(response_plan(cfg, stage.run_dir).read()),
                score_shards=len(plan.read()), responses=work.size, scores=len(candidates))
    ordered = work.ordered(_stage_log(stage.run_dir, preference.RESPONSES))
    return preference.finish(cfg, stage, work.kept, ordered, {k: r["score"] for k, r in scores.items()})
