"""Stage "preference": preference pairs for DPO from several response models and a reward
model (build.py), in one process or in shards (shards.py)."""

from __future__ import annotations

from sit_core.contract import Phase, Sharding, Stage
from sit_core.stages.preference import build, shards


def _record_events(run, summary: dict) -> None:
    """A shard's stalls and throughput, filed in the stage's manifest by the parent."""
    for event in summary["events"]:
        run.event(event.pop("event"), shard=summary["shard"], **event)


STAGE = Stage(
    name=build.NAME,
    reads=(build.KEPT,),
    writes={"pairs": build.OUTPUT, "stats": build.STATS, "histogram": build.HISTOGRAM,
            "responses": build.RESPONSES, "scores": build.SCORES},
    fingerprint=build.fingerprint,
    work=build.run,
    open=build.begin,
    sharding=Sharding(
        phases=(
            Phase("responses", pending=shards.pending_response_shards, work=shards.sample_shard,
                  params=lambda cfg, run: {"batched": build.batched(cfg, run.manifest)},
                  record=_record_events, after=shards.merge_responses),
            Phase("scores", pending=shards.pending_score_shards, work=shards.score_shard),
        ),
        progress=shards.progress,
        finish=shards.finish,
    ),
)
