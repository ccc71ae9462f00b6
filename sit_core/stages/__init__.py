"""The pipeline's stages and the graph their declarations make.

Each stage is the module `sit_core.stages.<name>`, whose `STAGE` (sit_core/contract.py) says
what it reads, writes and does. `sit_core.config.STAGE_ORDER` registers them in pipeline
order. Everything about the pipeline's shape is derived here from the declarations: the
upstream and dependent stages, the paths of inputs, and the code version in cache keys.
Stage modules import their heavy libraries inside their work, so loading the declarations
(`sit status`, a cached rerun, the Prefect server) never imports torch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from pathlib import Path

from sit_core.config import STAGE_ORDER, SitConfig
from sit_core.contract import Read, Stage
from sit_core.errors import ConfigError, SitError

PACKAGE = __name__


@functools.cache
def declared(name: str) -> Stage:
    if name not in STAGE_ORDER:
        raise SitError(f"unknown stage '{name}'", f"stages are: {', '.join(STAGE_ORDER)}")
    stage = importlib.import_module(f"{PACKAGE}.{name}").STAGE
    earlier = STAGE_ORDER[:STAGE_ORDER.index(name)]
    for read in stage.reads:
        if read.stage not in earlier or read.output not in declared(read.stage).writes:
            raise SitError(f"stage '{name}' reads {read.stage}.{read.output}, which no earlier stage writes",
                           "declare the output in that stage's `writes`, or register the stages in pipeline order")
    return stage


def all_stages() -> list[Stage]:
    return [declared(name) for name in STAGE_ORDER]


def upstream(name: str) -> tuple[str, ...]:
    """The stages `name` reads from directly."""
    return declared(name).upstream


def dependents(name: str) -> list[str]:
    """Every stage that reads, directly or through others, what `name` writes, in pipeline order."""
    found = {name}
    for stage in all_stages():
        if any(u in found for u in stage.upstream):
            found.add(stage.name)
    return [s for s in STAGE_ORDER if s in found and s != name]


def graph_edges(name: str) -> tuple[str, ...]:
    """The upstream stages of `name` that no other of its upstream stages already leads to: the
    arrows of the pipeline's drawing (the report reads every stage's statistics, but one arrow
    from evaluate says as much)."""
    direct = upstream(name)
    reached = {d for u in direct for d in _ancestors(u)}
    return tuple(u for u in direct if u not in reached)


def _ancestors(name: str) -> set[str]:
    seen: set[str] = set()
    pending = list(upstream(name))
    while pending:
        stage = pending.pop()
        if stage not in seen:
            seen.add(stage)
            pending += upstream(stage)
    return seen


def path_of(run_dir: Path, read: Read) -> Path:
    """Where the output a read names lives in this run directory."""
    return Path(run_dir) / read.stage / declared(read.stage).writes[read.output]


def read_paths(cfg: SitConfig, run_dir: Path, read: Read) -> list[Path]:
    """The files one read names in this run directory (absent optional files left out)."""
    if read.when is not None and not read.when(cfg):
        return []
    base = path_of(run_dir, read)
    if not read.files:
        paths = [base]
    elif any(ch in pattern for pattern in read.files for ch in "*?["):
        paths = sorted(p for pattern in read.files for p in base.glob(pattern) if p.is_file())
    else:
        paths = [base / f for f in read.files]
    return [p for p in paths if p.exists()] if read.optional else paths


def input_paths(cfg: SitConfig, run_dir: Path, name: str) -> list[Path]:
    """The files whose content hashes the stage's manifest and cache key record."""
    return [p for read in declared(name).reads if read.hashed for p in read_paths(cfg, run_dir, read)]


def missing_inputs(cfg: SitConfig, run_dir: Path, name: str) -> dict[str, Path]:
    """The required inputs of stage `name` that are not there yet, by the stage that writes
    each: {upstream stage: run-dir-relative file}."""
    missing = {}
    for read in declared(name).reads:
        for path in read_paths(cfg, run_dir, read):
            if not read.optional and not path.exists():
                missing.setdefault(read.stage, path.relative_to(run_dir))
    return missing


def code_version(name: str) -> str:
    """Hash of the stage's own source (its module, or its package's modules): a change to it
    invalidates its cache entries."""
    path = Path(importlib.import_module(f"{PACKAGE}.{name}").__file__)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def check_upstream(cfg: SitConfig, run_dir: Path, todo: list[str]) -> None:
    """Each stage's inputs exist already or come from a stage that runs before it in this run."""
    for stage in todo:
        absent = {s: f for s, f in missing_inputs(cfg, run_dir, stage).items() if s not in todo[:todo.index(stage)]}
        if not absent:
            continue
        needed, pending = set(), list(absent)
        while pending:  # the producers' own missing inputs, back to the first stage
            producer = pending.pop()
            needed.add(producer)
            pending += [s for s in missing_inputs(cfg, run_dir, producer) if s not in needed]
        producer, path = next(iter(absent.items()))
        stages = [s for s in STAGE_ORDER if s in needed or s in todo]
        raise ConfigError(
            f"stage '{stage}' reads {path} from stage '{producer}', which has not run in {run_dir}",
            f"run the stages it needs first: sit run --run-dir {run_dir} --stages {','.join(stages)} "
            "(or leave out --stages: the pipeline runs every stage in order and skips finished ones)")
