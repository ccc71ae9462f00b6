"""The registry of pipeline stages and the one way to open one.

A stage is a module with:

    STAGE: str                                       # its name and its directory in the run dir
    def input_paths(cfg, run_dir) -> list[Path]      # upstream files it reads
    def fingerprint(cfg) -> dict                     # result-affecting config (no perf fields)
    def run(cfg, run_dir, progress=None) -> dict     # does the work, returns its manifest

`run` must be idempotent: on a done stage it returns the manifest without loading a model,
and on a partial one it continues from its checkpoints. Modules are imported lazily so that
`sit status` and the Prefect server never import torch.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

from .config import STAGE_ORDER, SitConfig
from .manifest import StageRun, begin_stage, input_hashes, read_manifest, stage_is_done

Progress = Optional[Callable[[int, int], None]]

STAGE_MODULES = {
    "generate": "sit_core.magpie",
    "filter": "sit_core.quality_filter",
    "preference": "sit_core.preference",
    "sft": "sit_core.training.sft",
    "prompt_tuning": "sit_core.training.prompt_tuning",
    "dpo": "sit_core.training.dpo",
    "evaluate": "sit_core.evaluation.stage",
    "report": "sit_core.report",
}
assert tuple(STAGE_MODULES) == STAGE_ORDER


def stage_module(name: str) -> ModuleType:
    return importlib.import_module(STAGE_MODULES[name])


def code_version(name: str) -> str:
    """Hash of the stage's source: a code change invalidates its cache entries."""
    module = stage_module(name)
    path = Path(module.__file__)
    files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" or module.__name__.count(".") > 1 else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def missing_inputs(cfg: SitConfig, run_dir: Path, name: str) -> dict[str, Path]:
    """The inputs of stage `name` that are not there yet, by the stage that writes each:
    {upstream stage: run-dir-relative file}."""
    missing = (Path(p) for p in stage_module(name).input_paths(cfg, run_dir) if not Path(p).exists())
    return {p.relative_to(run_dir).parts[0]: p.relative_to(run_dir) for p in missing}


def open_stage(cfg: SitConfig, run_dir: Path, name: str) -> StageRun:
    module = stage_module(name)
    if missing := missing_inputs(cfg, run_dir, name):
        from .errors import SitError

        producer, path = next(iter(missing.items()))
        raise SitError(f"stage '{name}' reads {path} from stage '{producer}', which has not run in {run_dir}",
                       "run the earlier stages first (`sit run` runs them in order and skips finished ones)")
    paths = module.input_paths(cfg, run_dir)
    inputs = input_hashes(run_dir, paths)
    return begin_stage(run_dir, name, module.fingerprint(cfg), inputs)


def done_manifest(cfg: SitConfig, run_dir: Path, name: str) -> dict | None:
    """The manifest of a finished, intact stage with the current fingerprint, else None."""
    from .fileio import sha256_json

    module = stage_module(name)
    if stage_is_done(run_dir, name, sha256_json(module.fingerprint(cfg))):
        return read_manifest(run_dir, name)
    return None


def run_stage(cfg: SitConfig, run_dir: Path, name: str, progress: Progress = None) -> dict:
    return stage_module(name).run(cfg, Path(run_dir), progress)
