"""Prefect tasks around sit_core stages: cache keys, retries, progress and artifacts.

Caching works across machines because both halves of it live in the run directory:
  - the key is the stage name, its fingerprint (config minus performance-only fields), the
    content hashes of its inputs (run-dir-relative paths) and the stage's code version;
    never RUN_ID, never absolute paths;
  - the result record is stored under `<run_dir>/prefect-results/<key>`.
So a new VM with an empty PREFECT_HOME, pointed at the same run directory (Drive, or a hub
pull), hits the cache and loads no model. Before a stage's task is called, a record whose
stage outputs were damaged or deleted since is dropped (`drop_stale_result`), and the task
runs again (the driver resumes the stage from its checkpoints).

A sharded stage's task runs its shards as tasks of their own on a process pool
(sit_prefect/sharded.py), or as Ray tasks on a Ray cluster (sit_prefect/ray_runner.py), through
the same driver.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.logging import get_run_logger

from sit_core.config import SitConfig
from sit_core.console_events import stage_progress
from sit_core.driver import run_stage
from sit_core.errors import SitError
from sit_core.stages import code_version, declared, input_paths
from sit_core.store.hub import HubUnavailableError, is_transient
from sit_core.store.manifest import input_hashes, output_problems, read_manifest
from sit_core.store.rundir import RESULTS_DIR


def results_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESULTS_DIR


def stage_cache_key(stage: str, cfg: SitConfig, run_dir: Path) -> str | None:
    paths = input_paths(cfg, run_dir, stage)
    if any(not Path(p).exists() for p in paths):
        return None  # upstream missing: the stage will explain; nothing to cache
    material = {"stage": stage, "fingerprint": declared(stage).fingerprint(cfg),
                "inputs": input_hashes(run_dir, paths), "code": code_version(stage)}
    return f"{stage}-" + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def drop_stale_result(stage: str, cfg: SitConfig, run_dir: Path) -> None:
    """Delete the stage's cached result if it describes outputs that are gone or damaged, so
    the task runs and the driver recomputes them."""
    key = stage_cache_key(stage, cfg, run_dir)
    record = results_dir(run_dir) / key if key else None
    if record is None or not record.exists():
        return
    manifest = read_manifest(run_dir, stage)
    if manifest is None or manifest.get("status") != "done" or output_problems(run_dir, manifest):
        record.unlink()


def _cache_key_fn(ctx: Any, params: dict[str, Any]) -> str | None:
    cfg = SitConfig.model_validate(params["config"])
    return stage_cache_key(params["stage"], cfg, Path(params["run_dir"]))


def _retry_transient(task, task_run, state) -> bool:
    """Retry network hiccups (hub sync, downloads); never a user-fixable or code error."""
    try:
        state.result()
    except HubUnavailableError:
        return True
    except SitError:
        return False
    except Exception as exc:  # noqa: BLE001 - classified by type and HTTP status
        return is_transient(exc)
    return False


def progress_reporter(stage: str, min_interval_s: float = 2.0) -> Callable[[int, int], None]:
    """A progress callback for sit_core: a Prefect progress artifact, throttled so a fast
    stage does not flood the API, and the same throttled updates as console events (the bar
    `sit run` draws; sit_core/console_events.py, never sent to Prefect's API)."""
    artifact_id = create_progress_artifact(progress=0.0, key=f"{stage.replace('_', '-')}-progress",
                                           description=f"{stage}: starting")
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < min_interval_s:
            return
        last[0] = now
        pct = 100.0 * done / total if total else 100.0
        stage_progress(stage, done, total)
        update_progress_artifact(artifact_id=artifact_id, progress=pct, description=f"{stage}: {done} of {total}")

    return report


def publish_artifacts(stage: str, manifest: dict, run_dir: Path) -> None:
    """A stage's stats may hold `tables: {name: rows}` (each becomes a table artifact) and
    `report_md`, a run-dir-relative markdown file (a markdown artifact)."""
    stats = manifest.get("stats") or {}
    for name, rows in stats.get("tables", {}).items():
        create_table_artifact(table=rows, key=f"{stage}-{name}".replace("_", "-"),
                              description=f"{stage}: {name.replace('_', ' ')}")
    metrics = run_dir / stage / "metrics.json"  # the training stages' efficiency metrics
    if metrics.exists():
        create_table_artifact(table=[json.loads(metrics.read_text())], key=f"{stage}-metrics".replace("_", "-"),
                              description=f"{stage}: efficiency metrics and losses (curves: {stage}/curves.png)")
    if stats.get("report_md"):
        create_markdown_artifact(markdown=(run_dir / stats["report_md"]).read_text(encoding="utf-8"),
                                 key=f"{stage}-markdown".replace("_", "-"), description=f"{stage}: report")


@task(
    task_run_name="{stage}",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_cache_key_fn),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=_retry_transient,
)
def run_stage_task(stage: str, config: dict, run_dir: str, workers: int | None = None,
                   devices: list[str] | None = None, ray: str | None = None) -> dict:
    """Run one stage through the driver; a sharded stage's shards on `workers` processes (one per
    entry of `devices`), or on the Ray cluster at `ray`. Returns a small summary (the cached
    result): status, outputs, stats."""
    cfg = SitConfig.model_validate(config)
    logger = get_run_logger()
    logger.info("stage %s: starting in %s", stage, run_dir)
    if ray and declared(stage).sharding is not None:
        from sit_prefect.ray_runner import RayRunner, connect

        runner = RayRunner(stage, connect(ray), cfg)
        manifest = run_stage(cfg, Path(run_dir), stage, progress_reporter(stage), runner)
    elif (workers or devices) and declared(stage).sharding is not None:
        from sit_prefect.sharded import process_pool

        with process_pool(stage, workers or 1, devices) as runner:
            manifest = run_stage(cfg, Path(run_dir), stage, progress_reporter(stage), runner)
    else:
        manifest = run_stage(cfg, Path(run_dir), stage, progress_reporter(stage))
    publish_artifacts(stage, manifest, Path(run_dir))
    logger.info("stage %s: %s", stage, manifest.get("status"))
    return {"stage": stage, "status": manifest.get("status"), "outputs": manifest.get("outputs", {}),
            "stats": {k: v for k, v in (manifest.get("stats") or {}).items() if k != "tables"}}


def stage_task_for(stage: str, run_dir: str | Path):
    """The stage task bound to this run directory's result store."""
    # A Path (not an unsaved block) is what Prefect accepts without a server-side block.
    return run_stage_task.with_options(name=stage, result_storage=results_dir(run_dir).resolve())
