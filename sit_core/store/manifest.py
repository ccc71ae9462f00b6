"""The stage contract.

Every stage owns `<run_dir>/<stage>/` and a `manifest.json` there. The manifest records the
stage's result-affecting config (its fingerprint), the content hashes of the inputs it read,
its progress, the sha256 and size of every output, statistics and notable events (a stall,
an OOM step-down). Caching, resume, `sit status`, the hub mirror and the Prefect UI all read
this one file. Paths in it are relative to the run directory, so a run directory can move
between machines (local disk, Google Drive, a hub pull) and stay valid.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sit_core.errors import ResumeMismatchError
from sit_core.store.fileio import atomic_write_json, read_json, sha256_file, sha256_json

MANIFEST = "manifest.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


def manifest_path(run_dir: Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / MANIFEST


def read_manifest(run_dir: Path, stage: str) -> dict | None:
    path = manifest_path(run_dir, stage)
    if not path.exists():
        return None
    try:
        return read_json(path)
    except ValueError:
        return None  # an unreadable manifest is treated as absent: the stage re-validates its files


def rel(run_dir: Path, path: Path) -> str:
    return Path(path).resolve().relative_to(Path(run_dir).resolve()).as_posix()


def file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "size": Path(path).stat().st_size}


def input_hashes(run_dir: Path, paths: Iterable[Path]) -> dict[str, str]:
    return {rel(run_dir, p): sha256_file(p) for p in paths}


def output_problems(run_dir: Path, manifest: dict) -> list[str]:
    """Outputs a done manifest lists that are missing or whose content changed."""
    problems = []
    for name, entry in manifest.get("outputs", {}).items():
        path = Path(run_dir) / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} does not match its recorded sha256 (truncated or modified)")
    return problems


def stage_is_done(run_dir: Path, stage: str, fingerprint_hash: str | None = None) -> bool:
    m = read_manifest(run_dir, stage)
    if not m or m.get("status") != "done":
        return False
    if fingerprint_hash is not None and m.get("config_hash") != fingerprint_hash:
        return False
    return not output_problems(run_dir, m)


@dataclass
class StageRun:
    """A stage in progress: the handle a stage function uses to record what it does."""

    run_dir: Path
    stage: str
    manifest: dict
    # Everyone else who hears of progress (sit run's bar, the Prefect UI, the hub sync
    # throttle), set by the driver: a stage reports once, through progress().
    listeners: list[Callable[[int, int], None]] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return stage_dir(self.run_dir, self.stage)

    def save(self) -> None:
        self.manifest["updated_at"] = _now()
        atomic_write_json(manifest_path(self.run_dir, self.stage), self.manifest)

    def progress(self, done: int, total: int) -> None:
        self.manifest["status"] = "partial" if done < total else self.manifest["status"]
        self.manifest["progress"] = {"done": int(done), "total": int(total)}
        self.save()
        self.announce(done, total)

    def announce(self, done: int, total: int) -> None:
        """Tell the listeners, without writing the manifest (whose writer is another process)."""
        for listener in self.listeners:
            listener(int(done), int(total))

    def event(self, kind: str, **details: Any) -> None:
        self.manifest.setdefault("events", []).append({"time": _now(), "event": kind, **details})
        self.save()

    def finish(self, outputs: Iterable[Path], stats: dict | None = None) -> dict:
        self.manifest["outputs"] = {rel(self.run_dir, p): file_entry(p) for p in sorted(outputs)}
        if stats is not None:
            self.manifest["stats"] = stats
        total = self.manifest.get("progress", {}).get("total")
        if total is not None:
            self.manifest["progress"] = {"done": total, "total": total}
        self.manifest["status"] = "done"
        self.manifest["finished_at"] = _now()
        self.save()
        return self.manifest


def begin_stage(run_dir: Path, stage: str, fingerprint: dict, inputs: dict[str, str]) -> StageRun:
    """Open a stage for (re)running. Continues a partial stage made with the same
    fingerprint and inputs; refuses to mix in work made with different ones."""
    run_dir = Path(run_dir)
    stage_dir(run_dir, stage).mkdir(parents=True, exist_ok=True)
    config_hash = sha256_json(fingerprint)
    old = read_manifest(run_dir, stage)
    if old is not None:
        if old.get("config_hash") != config_hash:
            changed = _diff_keys(old.get("fingerprint", {}), fingerprint)
            raise ResumeMismatchError(
                f"{run_dir / stage} holds work made with a different '{stage}' configuration"
                + (f" (changed: {', '.join(changed[:8])})" if changed else ""),
                f"use a new --run-dir for the new settings, or run `sit reset {run_dir} {stage}` to discard that stage "
                "(and everything after it) and recompute",
            )
        if old.get("inputs") != inputs:
            changed = sorted(set(old.get("inputs", {}).items()) ^ set(inputs.items()))
            raise ResumeMismatchError(
                f"the inputs of stage '{stage}' changed since it started ({', '.join(sorted({c[0] for c in changed}))})",
                f"run `sit reset {run_dir} {stage}` to recompute it from the new inputs, or restore the old inputs",
            )
        old.setdefault("events", []).append({"time": _now(), "event": "resumed", "from_status": old.get("status")})
        if old.get("status") == "done" and output_problems(run_dir, old):
            old["events"].append({"time": _now(), "event": "outputs_damaged",
                                  "problems": output_problems(run_dir, old)})
            old["status"] = "partial"
        run = StageRun(run_dir, stage, old)
        run.save()
        return run
    manifest = {
        "stage": stage,
        "status": "partial",
        "config_hash": config_hash,
        "fingerprint": fingerprint,
        "inputs": inputs,
        "outputs": {},
        "events": [],
        "started_at": _now(),
    }
    run = StageRun(run_dir, stage, manifest)
    run.save()
    return run


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if old != new else []


def stage_summary(run_dir: Path, stage: str) -> dict:
    """What `sit status` and the UI show: done / partial (n of N) / pending."""
    m = read_manifest(run_dir, stage)
    if m is None:
        return {"stage": stage, "status": "pending"}
    out = {"stage": stage, "status": m.get("status", "partial")}
    if out["status"] == "done" and output_problems(run_dir, m):
        out["status"] = "damaged"
    if "progress" in m:
        out.update(m["progress"])
    return out
