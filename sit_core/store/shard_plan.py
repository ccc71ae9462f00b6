"""Shard bookkeeping shared by the sharded stages: a recorded plan of index ranges and one
log per shard, in one directory of the stage.

    plan.json                  the batch size and every shard range planned so far
    <start>-<end>.jsonl        one shard's log (fsync'd every checkpoint_interval)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sit_core.errors import SitError
from sit_core.store.fileio import atomic_write_json, read_json

SHARDS_DIR = "shards"
PLAN = "plan.json"

Shard = tuple[int, int]  # [start, end) item indices


def log_path(directory: Path, shard: Shard) -> Path:
    return Path(directory) / f"{shard[0]:07d}-{shard[1]:07d}.jsonl"


@dataclass(frozen=True)
class Plan:
    """One kind of sharded work: its plan.json and one log per shard, all in `directory`.

    The plan records the batch size (the config value `setting`) next to the shard ranges:
    shards are cut on its batch boundaries, and batches are part of what makes a record
    reproducible, so shards made with another batch size cannot be merged into this run."""

    run_dir: Path
    stage: str
    directory: Path
    batch_size: int
    setting: str

    def log(self, shard: Shard) -> Path:
        return log_path(self.directory, shard)

    def read(self) -> list[Shard]:
        path = self.directory / PLAN
        if not path.exists():
            return []
        plan = read_json(path)
        if plan["batch_size"] != self.batch_size:
            raise SitError(f"{self.directory} holds shards made with {self.setting}={plan['batch_size']}, "
                           f"not {self.batch_size}",
                           f"set {self.setting}={plan['batch_size']} again to resume, or run "
                           f"`sit reset {self.run_dir} {self.stage}` to start the stage over")
        return [tuple(s) for s in plan["shards"]]

    def write(self, shards: list[Shard]) -> None:
        atomic_write_json(self.directory / PLAN, {"batch_size": self.batch_size, "shards": [list(s) for s in shards]})


def split(start: int, end: int, batch: int, n_shards: int) -> list[Shard]:
    """[start, end) cut into at most n_shards contiguous ranges of whole batches (counted from
    start), sizes within one batch; only the last range may end mid-batch, at `end`."""
    n_batches = math.ceil((end - start) / batch)
    n = max(1, min(n_shards, n_batches))
    bounds = [min(end, start + batch * (n_batches * i // n)) for i in range(n + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
