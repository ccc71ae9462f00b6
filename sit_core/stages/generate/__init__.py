"""Stage "generate": Magpie instruction/response pairs from an instruct model given only the
pre-query part of its chat template (magpie.py), in one process or in shards (shards.py)."""

from __future__ import annotations

from sit_core.contract import Phase, Sharding, Stage, record_shard_events
from sit_core.stages.generate import magpie, shards

STAGE = Stage(
    name=magpie.NAME,
    writes={"records": magpie.OUTPUT, "attempts": magpie.ATTEMPTS, "stats": magpie.STATS},
    fingerprint=magpie.fingerprint,
    work=magpie.run,
    sharding=Sharding(
        phases=(Phase("attempts", pending=shards.pending_shards, work=shards.generate_shard,
                      files=shards.shard_files, waves=True, record=record_shard_events),),
        progress=shards.progress,
        finish=shards.finish,
    ),
)
