"""Opening a run: config resolution, fail-fast checks, the run-dir lock and run.json.

Both entry points use it: the Prefect flows and `run_pipeline` (plain function calls, the
baseline the orchestration benchmark compares against). Each stage then runs through the
driver (sit_core/driver.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sit_core.config import BATCH_FIELDS, STAGE_ORDER, SitConfig, load_config, recorded_recipe
from sit_core.errors import ConfigError, SitError
from sit_core.driver import Progress, ShardRunner, run_stage
from sit_core.stages import check_upstream
from sit_core.store.fileio import read_json
from sit_core.engine.models import check_models
from sit_core.config.batches import check_processes, keep_effective_batches, names_a_batch
from sit_core.training.distributed import LOCK_HOLDER_ENV
from sit_core.store.rundir import (LOCK_NAME, RUN_RECORD, RunLock, check_run_record, check_unlocked, ensure_writable,
                                   load_run_record, record_run)

log = logging.getLogger("sit")


@dataclass
class OpenRun:
    cfg: SitConfig
    run_dir: Path
    stages: list[str]
    damaged: dict[str, list[str]] = field(default_factory=dict)
    pulled: list[str] = field(default_factory=list)


def resolve_config(run_dir: Path, config: dict | str | Path | None, preset: str | None, profile: str | None,
                   overrides: list[str] | None, hardware: dict | None = None) -> tuple[SitConfig, dict]:
    """The config for this run, and the source it was built from (recorded in run.json so a
    later `sit run --run-dir D` continues with the same settings, re-detecting the hardware).
    `hardware`: {"profile", "backend"} that `auto` means, when not this machine's."""
    record = load_run_record(run_dir) if (Path(run_dir) / RUN_RECORD).exists() else None
    continuing = config is None and preset is None and record is not None
    if continuing:
        source = record.get("source") or {}
        config, preset = source.get("config"), source.get("preset")
        overrides = list(source.get("overrides") or []) + list(overrides or [])
    source = {"config": config if isinstance(config, dict) else None, "preset": preset,
              "overrides": list(overrides or []), "config_path": str(config) if isinstance(config, (str, Path)) else None}
    if isinstance(config, (str, Path)):
        from sit_core.config import read_config_file

        source["config"] = read_config_file(config)
    if record is not None and began_before_engines(record, source):
        # The old behaviour, not the new default: sit's loop wrote its records so far.
        source["overrides"].append("generation.backend=transformers")
        log.info("this run began before sit had generation backends; it goes on with transformers "
                 "(--set generation.backend=vllm switches it)")
    overrides = source["overrides"]
    recipe = recorded_recipe(record.get("config") or {}, continuing) if record is not None else None
    hardware = hardware or {}
    cfg = load_config(source["config"] if source["config"] is not None else None, preset=preset, profile=profile,
                      overrides=overrides, recipe=recipe, auto_profile=hardware.get("profile"),
                      auto_backend=hardware.get("backend"))
    if record is not None and not names_a_batch(source):
        cfg, notes = keep_effective_batches(cfg, record.get("config") or {})
        for note in notes:
            log.info("%s", note)
    return cfg, source


def config_for_hardware(run_dir: Path, profile: str | None, hardware: dict) -> SitConfig:
    """The config of an open run (its run.json recorded) as it resolves on other machines, for
    work that runs there: a Ray cluster's workers report their GPU's profile and whether they
    have vLLM (`hardware`), and `auto` means theirs, so a CPU-only parent does not hand its cpu
    profile to GPU workers. A profile the user named (`profile`, or in the config) still wins."""
    return resolve_config(run_dir, None, None, profile, None, hardware)[0]


def began_before_engines(record: dict, source: dict) -> bool:
    """Whether run.json was written before generation.backend existed, and nobody chose one since."""
    recorded = ((record.get("config") or {}).get("generation") or {})
    chosen = ((source.get("config") or {}).get("generation") or {})
    named = any(o.split("=", 1)[0].strip() == "generation.backend" for o in source["overrides"])
    return "backend" not in recorded and "backend" not in chosen and not named


def check_run(run_dir: str | Path, config: dict | str | Path | None = None, *, preset: str | None = None,
              profile: str | None = None, overrides: list[str] | None = None,
              stages: list[str] | None = None) -> tuple[Path, SitConfig, dict, list[str]]:
    """Every check that needs no lock and loads no model: a writable run directory, the
    config and its stages, the models, no live holder of the run directory, and a config
    that matches run.json. `sit run` calls it before starting Prefect, so a mistake is one
    clear error, not a failed flow run. Returns (run_dir, cfg, source, stages to run)."""
    run_dir = Path(run_dir)
    cfg, source = resolve_config(run_dir, config, preset, profile, overrides)
    wanted = stages or cfg.stages
    unknown = [s for s in wanted if s not in STAGE_ORDER]
    if unknown:
        raise ConfigError(f"unknown stage(s): {', '.join(unknown)}", f"stages are: {', '.join(STAGE_ORDER)}")
    todo = [s for s in STAGE_ORDER if s in wanted]
    # Settings no run could use first, then what this run directory lacks, then its lock.
    if cfg.training.num_processes > 1:
        check_processes(cfg, [s for s in todo if s in BATCH_FIELDS])  # the training stages
    check_models(cfg, todo)
    check_upstream(cfg, run_dir, todo)
    ensure_writable(run_dir)
    check_unlocked(run_dir)
    check_run_record(run_dir, cfg)
    return run_dir, cfg, source, todo


@contextlib.contextmanager
def prepare_run(run_dir: str | Path, config: dict | str | Path | None = None, *, preset: str | None = None,
                profile: str | None = None, overrides: list[str] | None = None,
                stages: list[str] | None = None) -> Iterator[OpenRun]:
    """Resolve and check the config, lock the run directory, pull the hub mirror (if any),
    find damaged stages, and record run.json. Nothing here loads a model."""
    from sit_core.secrets import install_log_redaction
    from sit_core.store.hub import HubMirror, verify_run_dir

    install_log_redaction()
    path, cfg, source, todo = check_run(run_dir, config, preset=preset, profile=profile, overrides=overrides,
                                        stages=stages)
    with RunLock(path):
        opened = OpenRun(cfg, path, todo)
        mirror = HubMirror(cfg.hub_repo, path) if cfg.hub_repo else None
        if mirror is not None:
            opened.pulled = mirror.pull().downloaded
        opened.damaged = verify_run_dir(path)
        for stage, problems in opened.damaged.items():
            log.warning("stage %s is damaged (%s); it will be recomputed from its last good checkpoint",
                        stage, "; ".join(problems))
        record_run(path, cfg, source)
        if mirror is not None:
            mirror.push([path / RUN_RECORD])
        yield opened


def run_pipeline(run_dir: str | Path, config: dict | str | Path | None = None, *, preset: str | None = None,
                 profile: str | None = None, overrides: list[str] | None = None, stages: list[str] | None = None,
                 progress: Progress = None, runner: ShardRunner | None = None) -> dict:
    """Run the stages with plain function calls, no orchestration."""
    with prepare_run(run_dir, config, preset=preset, profile=profile, overrides=overrides,
                     stages=stages) as run:
        return {stage: run_stage(run.cfg, run.run_dir, stage, progress, runner) for stage in run.stages}


# ---------------------------------------------------------------------------------------
# One stage in this process: `python -m sit_core.pipeline RUN_DIR STAGE [CONFIG_JSON]`, which
# every rank of a distributed launch runs (sit_core/training/distributed.py)


def _lock_held_for_us(run_dir: Path) -> bool:
    holder = os.environ.get(LOCK_HOLDER_ENV)
    try:
        return holder is not None and str(read_json(Path(run_dir) / LOCK_NAME).get("pid")) == holder
    except (OSError, ValueError):
        return False


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        raise SystemExit("usage: python -m sit_core.pipeline RUN_DIR STAGE [CONFIG_JSON]\n"
                         "   or: accelerate launch --multi_gpu --num_processes N -m sit_core.pipeline RUN_DIR STAGE")
    run_dir, stage = Path(argv[0]), argv[1]
    if len(argv) == 3:
        cfg = SitConfig.model_validate(read_json(Path(argv[2])))
    else:
        cfg = resolve_config(run_dir, None, None, None, None)[0]
    # Rank 0 of a launch that sit started works under its caller's lock; started by hand, it takes the lock.
    if int(os.environ.get("RANK", "0")) == 0 and not _lock_held_for_us(run_dir):
        with RunLock(run_dir):
            run_stage(cfg, run_dir, stage)
    else:
        run_stage(cfg, run_dir, stage)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SitError as e:
        print(f"error: {e.problem}\nfix: {e.fix}", file=sys.stderr)
        sys.exit(2)
