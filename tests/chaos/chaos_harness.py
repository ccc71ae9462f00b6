"""Kill the whole pipeline at random moments and prove nothing was lost or duplicated.

Shared by the CI chaos test (tests/chaos/test_chaos.py) and the long mode (bench/chaos).

A "session" is one `sit run` process, started in its own process group so a SIGKILL takes
the temporary Prefect server down with it, as a dying Colab VM would. The kill schedule is
drawn from a seeded RNG: for each kill, a target stage, then a random delay after the target
stage has written to its manifest in this session (so the kill lands inside the stage's
work, not only in start-up). The same seed replays the same schedule; the timing of the
machine decides exactly which item each kill lands on.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sit_core.config import STAGE_ORDER  # noqa: E402
from sit_core.store.fileio import read_jsonl  # noqa: E402
from sit_core.store.manifest import output_problems, read_manifest, stage_summary  # noqa: E402
from sit_core.store.rundir import LOCK_NAME  # noqa: E402

# The demo pipeline, shrunk so one uninterrupted run takes about a minute and a half on an
# idle 2-core machine: every stage still does real work on the real embedded model.
OVERRIDES = [
    "generation.num_samples=6", "generation.instruction_max_tokens=40", "generation.response_max_tokens=40",
    "filter.target_count=4", "filter.min_count=2", "filter.length.min=3",
    "preference.num_pairs=2", "preference.min_pairs=1", "preference.min_margin=0", "preference.max_new_tokens=24",
    "training.max_steps=2", "training.validation_size=1", "training.max_seq_length=128",
    "evaluation.limit=1", "evaluation.agent.num_tasks=1", "evaluation.agent.max_steps=1",
    "generation.batch_size=8", "checkpoint_interval=2",
]

# Stages long enough to be killed inside; filter and report take well under a second and
# are only hit when a kill aimed elsewhere lands there.
KILLABLE = ("generate", "preference", "sft", "prompt_tuning", "dpo", "evaluate")

DATASETS = ("generate/generated.jsonl", "filter/kept.jsonl", "preference/pairs.jsonl")
ADAPTERS = ("sft/final/adapter_model.safetensors", "prompt_tuning/final/adapter_model.safetensors",
            "dpo/final/adapter_model.safetensors")
REPORT_TABLE = "report/comparison_summary.csv"
# Columns that measure the machine (time, memory, speed), not the result.
MACHINE_COLUMNS = {"peak_memory_gb", "training_time_minutes", "inference_tok_per_sec"}


def session_env(prefect_home: Path) -> dict:
    """A fresh local Prefect per run directory; one torch thread (two processes with two
    threads each on two cores spin against each other); no network."""
    return {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": "",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def sit_run_command(run_dir: Path, overrides: list[str] = OVERRIDES) -> list[str]:
    sets = [arg for o in overrides for arg in ("--set", o)]
    return [sys.executable, "-m", "sit_cli.main", "run", "--run-dir", str(run_dir), "--preset", "demo",
            "--profile", "cpu", *sets]


def start_session(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    log.write(f"\n===== session started {time.strftime('%H:%M:%S')}: {' '.join(cmd[1:])}\n".encode())
    log.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the child holds its own descriptor
    return proc


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the session's whole process group (the CLI and its temporary Prefect server)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def log_tail(log_path: Path, chars: int = 4000) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return text[-chars:]


def run_uninterrupted(run_dir: Path, prefect_home: Path, log_path: Path, timeout_s: float = 1800,
                      overrides: list[str] = OVERRIDES) -> float:
    """The reference run. Returns its wall time in seconds."""
    t0 = time.monotonic()
    proc = start_session(sit_run_command(run_dir, overrides), session_env(prefect_home), log_path)
    wait_for_success(proc, timeout_s, log_path, "reference run")
    return time.monotonic() - t0


def wait_for_success(proc: subprocess.Popen, timeout_s: float, log_path: Path, what: str) -> None:
    """Wait for a session to exit 0; kill it and fail with its log's tail otherwise."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        raise AssertionError(f"{what} exceeded {timeout_s}s\n{log_tail(log_path)}") from None
    assert rc == 0, f"{what} failed with exit code {rc}\n{log_tail(log_path)}"


def stage_in_progress(run_dir: Path) -> str | None:
    """The first stage, in pipeline order, that is not done (None once all are)."""
    return next((s for s in STAGE_ORDER if stage_summary(run_dir, s)["status"] != "done"), None)


def last_durable_write(run_dir: Path, stage: str) -> float:
    """mtime of the newest file the stage has written: the last moment its work was safe."""
    root = Path(run_dir) / stage
    mtimes = [p.stat().st_mtime for p in root.rglob("*") if p.is_file()] if root.exists() else []
    return max(mtimes, default=0.0)


@dataclasses.dataclass
class Kill:
    target: str  # the stage the schedule aimed at
    stage: str | None  # the stage actually in progress when the kill landed
    delay_s: float  # seconds after the target stage's first write in that session
    lost_s: float  # seconds between the stage's last durable write and the kill: work to redo
    session_s: float  # how long the killed session had run


@dataclasses.dataclass
class ChaosResult:
    seed: int
    kills: list[Kill]
    sessions: int
    wall_s: float
    refused_second_run: str | None = None  # stderr of a concurrent run that was refused


def plan_kills(rng: random.Random, n: int) -> list[tuple[str, float]]:
    """n (stage, delay) pairs in pipeline order. The first kills visit distinct stages so a
    short run (n=3) still spreads across the pipeline; beyond len(KILLABLE) stages repeat."""
    stages = rng.sample(KILLABLE, min(n, len(KILLABLE)))
    stages += [rng.choice(KILLABLE) for _ in range(n - len(stages))]
    stages.sort(key=STAGE_ORDER.index)
    return [(s, round(rng.uniform(0.0, 4.0), 2)) for s in stages]


def _wait_for_stage_write(proc: subprocess.Popen, run_dir: Path, stage: str, since: float,
                          timeout_s: float) -> bool:
    """Wait until `stage` has written its manifest in this session (it is working), or is
    already done, or the session ended. True when the stage is working in this session."""
    manifest = Path(run_dir) / stage / "manifest.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists():
            try:
                if manifest.stat().st_mtime >= since:
                    return stage_summary(run_dir, stage)["status"] != "done"
            except FileNotFoundError:
                pass  # replaced between the two calls; look again
        if STAGE_ORDER.index(stage) < STAGE_ORDER.index(stage_in_progress(run_dir) or STAGE_ORDER[-1]):
            return False  # the target finished before we looked: kill wherever we are now
        time.sleep(0.1)
    return False


def run_with_kills(run_dir: Path, prefect_home: Path, log_path: Path, *, seed: int, kills: int,
                   on_first_session: Callable[[subprocess.Popen], str | None] | None = None,
                   after_kill: Callable[[Kill, subprocess.Popen], None] | None = None,
                   session_timeout_s: float = 1800, say: Callable[[str], None] = print,
                   overrides: list[str] = OVERRIDES) -> ChaosResult:
    """Run the pipeline into run_dir, SIGKILLing it `kills` times per the seeded schedule,
    restarting the same command each time, then letting it finish. `on_first_session` runs
    once while the first session is alive (its return value is kept as refused_second_run);
    `after_kill` runs after each kill, before the restart."""
    rng = random.Random(seed)
    schedule = plan_kills(rng, kills)
    say(f"chaos seed {seed}: kill schedule {schedule}")
    cmd, env = sit_run_command(run_dir, overrides), session_env(prefect_home)
    done_kills: list[Kill] = []
    refused = None
    t_start = time.monotonic()
    sessions = 0
    for target, delay in schedule:
        sessions += 1
        started = time.time()
        proc = start_session(cmd, env, log_path)
        if sessions == 1 and on_first_session is not None:
            refused = on_first_session(proc)
        working = _wait_for_stage_write(proc, run_dir, target, started, session_timeout_s)
        if proc.poll() is not None:
            raise AssertionError(f"session {sessions} ended by itself (exit {proc.returncode}) before the kill "
                                 f"aimed at {target}\n{log_tail(log_path)}")
        if working:
            time.sleep(delay)
        stage = stage_in_progress(run_dir)
        lost = time.time() - max(last_durable_write(run_dir, stage), started) if stage else 0.0
        kill_session(proc)
        done_kills.append(Kill(target, stage, delay if working else 0.0, round(lost, 2),
                               round(time.time() - started, 1)))
        if after_kill is not None:
            after_kill(done_kills[-1], proc)
        say(f"kill {len(done_kills)}/{kills}: aimed at {target} (+{delay}s), landed in {stage}; "
            f"{lost:.1f}s of work since its last durable write")
    sessions += 1
    wait_for_success(start_session(cmd, env, log_path), session_timeout_s, log_path, "final session")
    return ChaosResult(seed, done_kills, sessions, time.monotonic() - t_start, refused)


# ---------------------------------------------------------------------------------------
# Checks on a finished run directory. Each returns a list of problems (empty: all good), so
# the CI test can assert on them and the long mode can print them.


def _temp_file(p: Path) -> bool:
    """Temp files of atomic writes cut off by a kill: never read by anything (fileio.iter_files
    and the hub mirror skip them), so they are not outputs."""
    return p.name.startswith(".") and p.name.endswith(".tmp")


def unparseable_files(run_dir: Path) -> list[str]:
    """Every file in the run directory must parse as what its name says it is."""
    import safetensors
    from PIL import Image

    problems = []
    for path in sorted(p for p in Path(run_dir).rglob("*") if p.is_file() and not _temp_file(p)):
        rel = path.relative_to(run_dir).as_posix()
        suffix = path.suffix.lower()
        try:
            if suffix == ".json" or path.parent.name == "prefect-results":
                json.loads(path.read_text(encoding="utf-8"))
            elif suffix == ".jsonl":
                records = read_jsonl(path)  # raises on corruption mid-file
                lines = [x for x in path.read_bytes().split(b"\n") if x.strip()]
                if len(records) != len(lines):
                    problems.append(f"{rel}: torn last line")
            elif suffix == ".csv":
                rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
                if rows and any(len(r) != len(rows[0]) for r in rows):
                    problems.append(f"{rel}: ragged CSV rows")
            elif suffix == ".safetensors":
                with safetensors.safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif suffix == ".png":
                with Image.open(path) as img:
                    img.verify()
            elif suffix in (".pt", ".pth", ".bin"):
                import torch

                torch.load(path, map_location="cpu", weights_only=False)
            elif suffix == ".log":
                continue  # `sit run`'s console log: a kill may cut it anywhere, and nothing reads it
            elif suffix in (".md", ".txt", ".yaml", ".jinja") or not suffix:
                path.read_bytes().decode("utf-8")
            else:
                problems.append(f"{rel}: no parser for {suffix} files (teach unparseable_files about it)")
        except Exception as exc:  # noqa: BLE001 - any failure to parse is the finding
            problems.append(f"{rel}: {type(exc).__name__}: {str(exc)[:200]}")
    return problems


def manifest_problems(run_dir: Path) -> list[str]:
    problems = []
    for stage in STAGE_ORDER:
        m = read_manifest(run_dir, stage)
        if m is None:
            problems.append(f"{stage}: no manifest")
            continue
        if m.get("status") != "done":
            problems.append(f"{stage}: status {m.get('status')}")
        problems += [f"{stage}: {p}" for p in output_problems(run_dir, m)]
    if (Path(run_dir) / LOCK_NAME).exists():
        problems.append(f"{LOCK_NAME} left behind after the run finished")
    return problems


def duplicate_records(run_dir: Path) -> list[str]:
    """No record appears twice: no repeated line in any JSONL log, and the datasets' keys
    (generation index, instruction, preference prompt) are unique."""
    problems = []
    for path in sorted(Path(run_dir).rglob("*.jsonl")):
        rel = path.relative_to(run_dir).as_posix()
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        if len(set(lines)) != len(lines):
            problems.append(f"{rel}: {len(lines) - len(set(lines))} repeated line(s)")
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # unparseable_files reports it
        for key in ("index", "instruction", "prompt"):
            values = [json.dumps(r[key], sort_keys=True) for r in records if key in r]
            if rel in DATASETS and values and len(set(values)) != len(values):
                problems.append(f"{rel}: duplicate '{key}' values")
    return problems


def _report_rows(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / REPORT_TABLE, encoding="utf-8", newline="") as f:
        return [{k: v for k, v in row.items() if k not in MACHINE_COLUMNS} for row in csv.DictReader(f)]


def differences(reference: Path, run_dir: Path, atol: float = 1e-5) -> list[str]:
    """Where the killed-and-resumed run differs from the uninterrupted one."""
    import torch
    from safetensors.torch import load_file

    problems = []
    for rel in DATASETS + ("evaluate/scores.csv",):
        if (Path(reference) / rel).read_bytes() != (Path(run_dir) / rel).read_bytes():
            problems.append(f"{rel} differs")
    for rel in ADAPTERS:
        ref, got = load_file(Path(reference) / rel), load_file(Path(run_dir) / rel)
        if ref.keys() != got.keys():
            problems.append(f"{rel}: tensor names differ")
            continue
        for key in ref:
            if not torch.allclose(ref[key].float(), got[key].float(), atol=atol, rtol=1e-4):
                diff = (ref[key].float() - got[key].float()).abs().max().item()
                problems.append(f"{rel}: {key} differs by up to {diff:.2e}")
    if _report_rows(reference) != _report_rows(run_dir):
        problems.append(f"{REPORT_TABLE} differs outside the timing/memory columns")
    return problems


def all_problems(reference: Path, run_dir: Path, timeout_s: float = 1800) -> list[str]:
    """Every check above, in a fresh process. Parsing the run directory imports torch, trl
    (through torch.load of training_args.bin), transformers and sympy; a crash or a hang guard
    firing halfway through such an import in the test process left sympy half-imported, and
    every later test that touched it failed. A subprocess takes that with it."""
    checker = subprocess.run([sys.executable, __file__, "problems", str(reference), str(run_dir)], cwd=REPO,
                             capture_output=True, text=True, timeout=timeout_s)  # a hang guard, minutes above need
    assert checker.returncode == 0, f"the run directory checker crashed\n{checker.stderr[-4000:]}"
    return json.loads(checker.stdout.splitlines()[-1])


def _problems_here(reference: Path, run_dir: Path) -> list[str]:
    return (differences(reference, run_dir) + duplicate_records(run_dir) + unparseable_files(run_dir)
            + manifest_problems(run_dir))


def resumed_stages(run_dir: Path) -> list[str]:
    """Stages whose manifest records a resume: proof the kills landed in real work."""
    return [s for s in STAGE_ORDER
            if any(e.get("event") == "resumed" for e in (read_manifest(run_dir, s) or {}).get("events", []))]


if __name__ == "__main__":
    # all_problems' worker: `chaos_harness.py problems REFERENCE RUN_DIR` prints them as JSON.
    if sys.argv[1:2] != ["problems"] or len(sys.argv) != 4:
        sys.exit("usage: chaos_harness.py problems REFERENCE RUN_DIR")
    print(json.dumps(_problems_here(Path(sys.argv[2]), Path(sys.argv[3]))))
