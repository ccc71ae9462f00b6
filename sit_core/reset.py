"""Discarding a stage and the stages that depend on it, so the next run recomputes them
(`sit reset`). The dependents come from the stages' declared reads: resetting prompt_tuning
discards evaluate and report, and keeps dpo, which reads only sft and preference.

With a hub mirror (run.json's `hub_repo`) the same stages are deleted from the hub first, in
one commit: otherwise the next run's pull would restore them. If the hub cannot be reached,
nothing is deleted anywhere and the error says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sit_core.errors import SitError
from sit_core.stages import declared, dependents
from sit_core.store.rundir import RESULTS_DIR, RUN_RECORD, RunLock, load_run_record


def stages_from(stage: str) -> list[str]:
    """`stage` and every stage that depends on it, in pipeline order."""
    return [declared(stage).name, *dependents(stage)]


def reset_run(run_dir: Path, stage: str) -> list[str]:
    """Delete `stage` and its dependents (their directories and cached Prefect results), on
    the hub mirror too. Returns the stages that were present locally."""
    run_dir = Path(run_dir)
    doomed = stages_from(stage)
    if not run_dir.is_dir():
        raise SitError(f"there is no run directory {run_dir}", "check the path (`sit status DIR` lists a run's stages)")

    def discarded(rel: str) -> bool:
        parts = rel.split("/")
        if parts[0] == RESULTS_DIR:
            return len(parts) > 1 and parts[1].rsplit("-", 1)[0] in doomed
        return parts[0] in doomed

    with RunLock(run_dir):  # never under a live run
        hub_repo = (load_run_record(run_dir).get("config") or {}).get("hub_repo") \
            if (run_dir / RUN_RECORD).exists() else None
        if hub_repo:
            from sit_core.store.hub import HubMirror

            HubMirror(hub_repo, run_dir).delete(discarded, message=f"sit reset: {', '.join(doomed)}")
        present = [s for s in doomed if (run_dir / s).exists()]
        for stage in present:
            shutil.rmtree(run_dir / stage)
        results = run_dir / RESULTS_DIR
        for record in results.iterdir() if results.is_dir() else []:
            if discarded(f"{RESULTS_DIR}/{record.name}"):
                record.unlink()
    return present
