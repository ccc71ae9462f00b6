"""The run directory: its lock and its record of the resolved config.

One pipeline process at a time may work in a run directory. The lock file names its holder
(host, pid, process start time, command). A lock left by a dead process on this host, or
one whose heartbeat stopped long ago on another host (a disconnected Colab VM writing to
Drive), is taken over; a live holder makes the second run refuse with its name.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil

from sit_core.config import RUN_LEVEL_KEYS, SitConfig
from sit_core.errors import CorruptFileError, ResumeMismatchError, RunLockedError, SitError
from sit_core.store.fileio import atomic_write_json, read_json, sha256_json

LOCK_NAME = ".sit.lock"
RUN_RECORD = "run.json"
# Prefect result records ("<stage>-<cache key hash>", sit_prefect/stage_task.py). Not hidden: the hub
# mirror skips dot-folders, and a fresh VM needs these records for cache hits.
RESULTS_DIR = "prefect-results"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def ensure_writable(run_dir: Path) -> Path:
    run_dir = Path(run_dir).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise SitError(f"run directory {run_dir} is not writable: {e.strerror or e}",
                       "choose a directory you can write to with --run-dir (on Colab, mount Drive first)") from None
    return run_dir


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname():
        started = _process_start(int(holder.get("pid", -1)))
        return started is not None and abs(started - float(holder.get("pid_started", 0))) < 1.0
    return time.time() - float(holder.get("heartbeat", 0)) < STALE_AFTER_S


def _locked_error(path: Path, holder: dict) -> RunLockedError:
    return RunLockedError(
        f"run directory {path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} "
        f"(command: {holder.get('command', '?')})",
        "wait for that run to finish or stop it; a lock left by a dead process is taken over automatically",
    )


def check_unlocked(run_dir: Path) -> None:
    """Raise RunLockedError if another live process holds the run directory. A look, not a
    lock: `sit run` calls it to refuse at once, before starting Prefect; RunLock decides."""
    path = Path(run_dir) / LOCK_NAME
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return
    if holder and (holder.get("pid"), holder.get("host")) != (os.getpid(), socket.gethostname()) \
            and _holder_alive(holder):
        raise _locked_error(path, holder)


class RunLock:
    """Exclusive ownership of a run directory, released on exit (and by the OS on a crash:
    a dead holder is detected from its pid and start time)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
                "command": " ".join(sys.argv)[:300], "heartbeat": time.time()}

    def acquire(self) -> "RunLock":
        mine = self._record()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
                if holder.get("pid") == mine["pid"] and holder.get("host") == mine["host"]:
                    return self  # re-entrant within one process (a flow calling a sub-flow)
                if holder and _holder_alive(holder):
                    raise _locked_error(self.path, holder)
                # Stale: replace atomically, then confirm we won against a concurrent taker.
                self.took_over = holder
                atomic_write_json(self.path, mine)
                time.sleep(0.05)
                if read_json(self.path).get("pid") == mine["pid"]:
                    break
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            break
        else:
            raise RunLockedError(f"could not take the lock {self.path}", "retry; another process is racing for it")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                rec = read_json(self.path)
                if rec.get("pid") != os.getpid():
                    return
                rec["heartbeat"] = time.time()
                atomic_write_json(self.path, rec)
            except (OSError, ValueError):
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if read_json(self.path).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def record_run(run_dir: Path, cfg: SitConfig, source: dict | None = None) -> None:
    """Write run.json (the resolved config) once; refuse a different result-affecting config.

    Performance-only fields (batch sizes, profile) may change between sessions, which is
    what lets a run started on a T4 continue on an A100.
    """
    path = Path(run_dir) / RUN_RECORD
    fingerprint, new_hash = check_run_record(run_dir, cfg)
    atomic_write_json(path, {"fingerprint_hash": new_hash, "fingerprint": fingerprint,
                             "config": cfg.model_dump(mode="json"), "source": source or {}})



def check_run_record(run_dir: Path, cfg: SitConfig) -> tuple[dict, str]:
    """Refuse a config whose result-affecting part differs from run.json's. Returns the
    fingerprint and its hash (what record_run writes)."""
    path = Path(run_dir) / RUN_RECORD
    fingerprint = cfg.fingerprint()
    for key in RUN_LEVEL_KEYS:
        fingerprint.pop(key, None)
    new_hash = sha256_json(fingerprint)
    if path.exists():
        old = load_run_record(run_dir)
        if old.get("fingerprint_hash") != new_hash:
            from sit_core.store.manifest import _diff_keys

            changed = _diff_keys(old.get("fingerprint", {}), fingerprint)
            raise ResumeMismatchError(
                f"{run_dir} was started with a different configuration (changed: {', '.join(changed[:8]) or '?'})",
                "use a new --run-dir for new settings; to continue this run, pass the same config "
                "(the resolved one is in run.json; performance-only fields such as batch sizes may differ)",
            )
    return fingerprint, new_hash


def load_run_record(run_dir: Path) -> dict:
    """run.json, or a clear error when it was damaged (it is only ever written atomically,
    so damage means a hand edit or a bad copy)."""
    path = Path(run_dir) / RUN_RECORD
    try:
        record = read_json(path)
    except ValueError as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e})",
                               "restore run.json (from the hub mirror or a backup), or delete it to record the "
                               "config given now") from None
    if not isinstance(record, dict):
        raise CorruptFileError(f"{path} does not hold a JSON object", "restore run.json, or delete it")
    return record
