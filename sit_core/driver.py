"""The one driver every stage runs through: `run_stage(cfg, run_dir, name)`.

For any stage, sharded or not, it
  - returns the manifest of a finished, intact stage with the current fingerprint, loading
    no model (the cache that holds on any machine the run directory moves to);
  - checks the stage's declared inputs, then opens its manifest or resumes it, refusing work
    made with another fingerprint or other inputs;
  - fans progress out from the stage's one `run.progress(done, total)` to the caller's
    listener (sit run's bar, the Prefect UI) and to the hub mirror, synced every
    checkpoint_interval items and at the end;
  - runs the stage's work in this process, or its shards on a runner's workers;
  - turns a full disk into a SitError: every write is atomic or an fsynced append, so the
    same command resumes once there is space.

The Prefect task, `run_pipeline` and the ranks of a distributed launch all call it.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

from sit_core.config import SitConfig
from sit_core.contract import Phase, Shard, Sharding
from sit_core.errors import SitError
from sit_core.stages import declared, input_paths, missing_inputs
from sit_core.store.fileio import sha256_json
from sit_core.store.manifest import StageRun, begin_stage, input_hashes, read_manifest, stage_is_done

Progress = Optional[Callable[[int, int], None]]


class ShardRunner(Protocol):
    """Where shards run: worker processes on this machine, or a cluster. `size` is how many
    run at once; `run_wave` runs `phase.work(cfg, run_dir, shard, **params)` once per shard and
    yields their summaries in shard order, raising the first failure once every shard is over
    (so what the others did is filed)."""

    size: int

    def run_wave(self, phase: Phase, cfg: SitConfig, run_dir: Path, wave: list[Shard],
                 params: dict) -> Iterator[dict]:
        ...


def done_manifest(cfg: SitConfig, run_dir: Path, name: str) -> dict | None:
    """The manifest of a finished, intact stage with the current fingerprint, else None."""
    if stage_is_done(run_dir, name, sha256_json(declared(name).fingerprint(cfg))):
        return read_manifest(run_dir, name)
    return None


def open_stage(cfg: SitConfig, run_dir: Path, name: str) -> StageRun:
    """Open the stage's manifest, or resume it; its declared inputs must all be there."""
    if missing := missing_inputs(cfg, run_dir, name):
        producer, path = next(iter(missing.items()))
        raise SitError(f"stage '{name}' reads {path} from stage '{producer}', which has not run in {run_dir}",
                       "run the earlier stages first (`sit run` runs them in order and skips finished ones)")
    inputs = input_hashes(run_dir, input_paths(cfg, run_dir, name))
    return begin_stage(run_dir, name, declared(name).fingerprint(cfg), inputs)


def run_stage(cfg: SitConfig, run_dir: str | Path, name: str, progress: Progress = None,
              runner: ShardRunner | None = None, **options) -> dict:
    """Run (or resume, or return) one stage; see the module's docstring. `runner` runs a
    sharded stage's shards; `options` go to the stage's work (tests pass Trainer callbacks)."""
    run_dir = Path(run_dir)
    try:
        return _run(cfg, run_dir, name, progress, runner, options)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise SitError(f"stage '{name}': no space left on the device of {run_dir}",
                       "free some space there (or move the run directory), then rerun the same command: finished "
                       "work is kept and the stage resumes from its last checkpoint") from None


def _run(cfg: SitConfig, run_dir: Path, name: str, progress: Progress, runner: ShardRunner | None,
         options: dict) -> dict:
    if (manifest := done_manifest(cfg, run_dir, name)) is not None:
        return manifest
    stage = declared(name)
    run = stage.open(cfg, run_dir, open_stage) if stage.open else open_stage(cfg, run_dir, name)
    if progress is not None:
        run.listeners.append(progress)
    mirror = None
    if cfg.hub_repo:
        from sit_core.store.hub import HubMirror, SyncThrottle

        mirror = HubMirror(cfg.hub_repo, run_dir)
        run.listeners.append(SyncThrottle(mirror, name, cfg.checkpoint_interval))
    if runner is not None and stage.sharding is not None:
        manifest = _run_sharded(cfg, run, stage.sharding, runner)
    else:
        manifest = stage.work(cfg, run, **options)
    if mirror is not None:
        mirror.push([run_dir / name], message=f"sit: {name} {manifest.get('status')}")
    return manifest


def _run_sharded(cfg: SitConfig, run: StageRun, sharding: Sharding, runner: ShardRunner) -> dict:
    """Phase by phase, wave by wave: each finished shard is filed in the manifest and counted in
    its progress, which syncs the hub mirror, so a lost machine loses only unfinished shards."""
    for phase in sharding.phases:
        while wave := phase.pending(cfg, run.run_dir, runner.size):
            params = phase.params(cfg, run) if phase.params else {}
            for summary in runner.run_wave(phase, cfg, run.run_dir, wave, params):
                if phase.record:
                    phase.record(run, summary)
                run.progress(*sharding.progress(cfg, run.run_dir))
            if not phase.waves:
                break
        if phase.after:
            phase.after(cfg, run)
    return sharding.finish(cfg, run)
