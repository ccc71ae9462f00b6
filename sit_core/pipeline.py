"""Opening a run: config resolution, fail-fast checks, the run-dir lock and run.json.

Both entry points use it: the Prefect flows and `run_pipeline` (plain function calls, the
baseline the orchestration benchmark compares against).
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Iterator

from .config import STAGE_ORDER, SitConfig, check_models, load_config
from .errors import ConfigError
from .fileio import read_json
from .rundir import RUN_RECORD, RunLock, ensure_writable, record_run
from .stages import STAGE_MODULES, Progress, run_stage


def available_stages() -> list[str]:
    return [s for s in STAGE_ORDER if importlib.util.find_spec(STAGE_MODULES[s]) is not None]


def resolve_config(run_dir: Path, config: dict | str | Path | None, preset: str | None, profile: str | None,
                   overrides: list[str] | None) -> tuple[SitConfig, dict]:
    """The config for this run, and the source it was built from (recorded in run.json so a
    later `sit run --run-dir D` continues with the same settings, re-detecting the hardware)."""
    record = Path(run_dir) / RUN_RECORD
    if config is None and preset is None and record.exists():
        source = read_json(record).get("source") or {}
        config, preset = source.get("config"), source.get("preset")
        overrides = list(source.get("overrides") or []) + list(overrides or [])
    source = {"config": config if isinstance(config, dict) else None, "preset": preset,
              "overrides": list(overrides or []), "config_path": str(config) if isinstance(config, (str, Path)) else None}
    if isinstance(config, (str, Path)):
        from .config import read_config_file

        source["config"] = read_config_file(config)
    cfg = load_config(source["config"] if source["config"] is not None else None, preset=preset, profile=profile,
                      overrides=overrides)
    return cfg, source


@contextlib.contextmanager
def prepare_run(run_dir: str | Path, config: dict | str | Path | None = None, *, preset: str | None = None,
                profile: str | None = None, overrides: list[str] | None = None,
                stages: list[str] | None = None) -> Iterator[tuple[SitConfig, Path, list[str]]]:
    path = ensure_writable(Path(run_dir))
    cfg, source = resolve_config(path, config, preset, profile, overrides)
    wanted = stages or cfg.stages
    unknown = [s for s in wanted if s not in STAGE_ORDER]
    if unknown:
        raise ConfigError(f"unknown stage(s): {', '.join(unknown)}", f"stages are: {', '.join(STAGE_ORDER)}")
    todo = [s for s in STAGE_ORDER if s in wanted and s in available_stages()]
    check_models(cfg, todo)
    with RunLock(path):
        record_run(path, cfg, source)
        yield cfg, path, todo


def run_pipeline(run_dir: str | Path, config: dict | str | Path | None = None, *, preset: str | None = None,
                 profile: str | None = None, overrides: list[str] | None = None, stages: list[str] | None = None,
                 progress: Progress = None) -> dict:
    """Run the stages with plain function calls, no orchestration."""
    with prepare_run(run_dir, config, preset=preset, profile=profile, overrides=overrides,
                     stages=stages) as (cfg, path, todo):
        return {stage: run_stage(cfg, path, stage, progress) for stage in todo}
