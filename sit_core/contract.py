"""The stage contract: what a stage declares, so that one driver (sit_core/driver.py) can run it.

A stage is a module under sit_core/stages/ with a `STAGE = Stage(...)` declaring:

    name         its name, its directory in the run directory, and its module's name
    writes       {output name: path inside its directory} — files or directories
    reads        upstream outputs it reads, as Read("stage", "output"), never as path strings
    fingerprint  cfg -> the result-affecting config (no performance-only fields)
    work         (cfg, run: StageRun) -> manifest; does the work into run.dir, reporting
                 through run.progress / run.event and closing with run.finish
    sharding     optional: how the work splits over worker processes (plan, shard, merge)

From these come the stage order, `sit reset`'s dependents, the Prefect cache key and task
graph, `sit status` and the hub paths. Declarations import nothing heavy: a stage module
imports torch, transformers or lm-eval inside its work functions, so `sit status`, the cache
key and the Prefect server never load them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sit_core.store.shard_plan import Shard

if TYPE_CHECKING:
    from sit_core.config import SitConfig
    from sit_core.store.manifest import StageRun

__all__ = ["Phase", "Read", "Shard", "ShardFiles", "Sharding", "Stage"]


@dataclass(frozen=True)
class Read:
    """An upstream output a stage reads.

    `files` names the files inside a directory output that are inputs (a glob such as
    "adapter_*", or exact names); without it the output itself is the input. An `optional`
    read is an input when it exists and never a reason to refuse. `when` limits the read to
    configs that use it (the evaluate stage reads only the adapters of the variants asked for).
    """

    stage: str
    output: str
    files: tuple[str, ...] = ()
    optional: bool = False
    when: Callable[[SitConfig], bool] | None = None
    # False: read for display only (the report copies each training stage's curves), so not
    # an input: redrawing it does not invalidate the reader.
    hashed: bool = True


@dataclass(frozen=True)
class ShardFiles:
    """What one shard touches in the run directory: the files it reads (those absent are simply
    absent for the shard too) and the one log it appends its records to. A runner whose workers
    see no disk of the parent (sit_prefect/ray_runner.py) ships `reads` to a worker and streams
    the log's new lines back into the run directory."""

    reads: tuple[Path, ...]
    log: Path


@dataclass(frozen=True)
class Phase:
    """One round of sharded work. `pending(cfg, run_dir, n)` records and returns the shards to
    run next ([] when the phase is complete); `work(cfg, run_dir, shard, **params)` runs one
    shard in a worker process and returns a small JSON-able summary; `params(cfg, run)` are the
    phase's extra arguments for every shard; `record(run, summary)` files a summary in the
    manifest; `after(cfg, run)` runs once the phase is complete (a merge the next phase reads).
    `files(cfg, run_dir, shard)` -> ShardFiles: everything `work` reads and writes under run_dir.
    `waves`: whether `pending` may plan new shards after a wave (Magpie's rejections)."""

    name: str
    pending: Callable[..., list[Shard]]
    work: Callable[..., dict]
    files: Callable[..., ShardFiles]
    params: Callable[..., dict] | None = None
    record: Callable[..., None] | None = None
    after: Callable[..., None] | None = None
    waves: bool = False


@dataclass(frozen=True)
class Sharding:
    """How a stage runs over worker processes: its phases, its progress over the merged shard
    logs, and `finish(cfg, run)`, which merges them into exactly what one process writes."""

    phases: tuple[Phase, ...]
    progress: Callable[..., tuple[int, int]]
    finish: Callable[..., dict]


@dataclass(frozen=True)
class Stage:
    name: str
    writes: dict[str, str]
    fingerprint: Callable[[SitConfig], dict]
    work: Callable[[SitConfig, StageRun], dict]
    reads: tuple[Read, ...] = ()
    sharding: Sharding | None = None
    # Opening a stage, where a stage must do more than the driver's open (the preference stage
    # keeps its logs when only its pair-selection settings changed).
    open: Callable[..., StageRun] | None = None

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.stage for r in self.reads))


def record_shard_events(run, summary: dict) -> None:
    """A Phase.record for shards that return their events (stalls, throughput): the parent
    files them in the stage's manifest, since a shard worker must not write it."""
    for event in summary["events"]:
        event = dict(event)
        run.event(event.pop("event"), shard=summary["shard"], **event)
