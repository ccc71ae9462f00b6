"""Stage "preference": preference pairs for DPO from several response models and a reward
model (build.py), in one process or in shards (shards.py)."""

from __future__ import annotations

from sit_core.contract import Phase, Sharding, Stage, record_shard_events
from sit_core.stages.preference import build, shards


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
                  files=shards.response_shard_files, params=lambda cfg, run: {"stable": build.stalled(run.manifest)},
                  record=record_shard_events, after=shards.merge_responses),
            Phase("scores", pending=shards.pending_score_shards, work=shards.score_shard,
                  files=shards.score_shard_files, record=record_shard_events),
        ),
        progress=shards.progress,
        finish=shards.finish,
    ),
)
