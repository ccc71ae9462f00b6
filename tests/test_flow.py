"""The Prefect layer: a rerun on a brand-new PREFECT_HOME is all cache hits and loads no
model; damaged outputs invalidate the cache; the flow runs inside a running event loop
(a notebook cell)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import HANG_GUARD_S, run_flow_script

OVERRIDES = ["generation.num_samples=4", "filter.target_count=2", "filter.min_count=1", "preference.num_pairs=1",
             "generation.instruction_max_tokens=40", "generation.response_max_tokens=40", "generation.batch_size=4",
             "filter.length.min=3"]

RUN_FLOW = textwrap.dedent("""
    import json, sys
    from sit_prefect.flows import synthetic_instruction_tuner
    result = synthetic_instruction_tuner(run_dir=sys.argv[1], preset="demo", profile="cpu",
                                         overrides=sys.argv[2:], stages=["generate", "filter"])
    print("RESULT " + json.dumps(result))
""")

RUN_FLOW_IN_LOOP = textwrap.dedent("""
    import asyncio, json, sys
    from sit_prefect.flows import synthetic_instruction_tuner

    async def cell():
        # What a notebook cell does: call the flow while an event loop is already running.
        assert asyncio.get_running_loop().is_running()
        return synthetic_instruction_tuner(run_dir=sys.argv[1], preset="demo", profile="cpu",
                                           overrides=sys.argv[2:], stages=["generate", "filter"])

    print("RESULT " + json.dumps(asyncio.run(cell())))
""")


def run_flow(script: str, run_dir: Path, prefect_home: Path) -> dict:
    return run_flow_script(script, run_dir, prefect_home, OVERRIDES)


def manifest_times(run_dir: Path) -> dict:
    return {s: (run_dir / s / "manifest.json").stat().st_mtime_ns for s in ("generate", "filter")}


def test_rerun_on_a_fresh_prefect_home_is_all_cache_hits(tmp_path, smollm2_path):
    run_dir = tmp_path / "run"
    first = run_flow(RUN_FLOW_IN_LOOP, run_dir, tmp_path / "home-a")
    assert {s: r["status"] for s, r in first.items()} == {"generate": "done", "filter": "done"}
    assert not any(r["cached"] for r in first.values())
    touched = manifest_times(run_dir)

    # A new machine: empty PREFECT_HOME (no database, no local result store), same run dir.
    second = run_flow(RUN_FLOW, run_dir, tmp_path / "home-b")
    assert all(r["cached"] for r in second.values()), second
    assert second["filter"]["outputs"] == first["filter"]["outputs"]
    assert manifest_times(run_dir) == touched  # no stage ran, so no model was loaded

    # Damage an output: its cache entry is dropped and the stage is recomputed.
    kept = run_dir / "filter" / "kept.jsonl"
    kept.write_text(kept.read_text()[:10])
    third = run_flow(RUN_FLOW, run_dir, tmp_path / "home-b")
    assert third["generate"]["cached"] and not third["filter"]["cached"]
    assert third["filter"]["outputs"] == first["filter"]["outputs"]


def test_a_stage_error_in_a_flow_is_the_problem_and_fix_without_a_traceback(tmp_path):
    """`sit run` where the filter keeps too few records: the NotEnoughDataError from inside
    the task reaches the user as error/fix lines and the flow run's Failed message, with no
    Python traceback in front of them."""
    run_dir = tmp_path / "run"
    (run_dir / "generate").mkdir(parents=True)
    records = [{"id": i, "instruction": f"Name {n} facts about the history of tea in {c}.",
                "response": "Tea came from China and spread along trade routes to many countries over centuries."}
               for i, (n, c) in enumerate([("two", "Japan"), ("three", "India"), ("four", "Kenya")])]
    (run_dir / "generate" / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": ""}
    proc = subprocess.run([sys.executable, "-m", "sit_cli.main", "run", "--run-dir", str(run_dir), "--preset", "demo",
                           "--profile", "cpu", "--stages", "filter"], env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S, cwd=Path(__file__).parents[1])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    flat = " ".join(output.split())
    assert "error: only" in flat and "pass the quality filter" in flat and "fix: generate more samples" in flat
    # The flow run's final state carries the message, which is what the UI shows (Prefect's own
    # lines are in the run's log file, not on the terminal: sit_cli/console.py).
    log = next((run_dir / "logs").glob("sit-run-*.log")).read_text()
    assert re.search(r"Flow run .* Finished in state Failed\(['\"]only 0 of 3 records", log), log[-3000:]


RUN_FLOW_GRAPH = textwrap.dedent("""
    import json, sys, time
    from prefect import get_client
    from sit_prefect.flows import synthetic_instruction_tuner
    synthetic_instruction_tuner(run_dir=sys.argv[1], stages=["generate", "filter", "preference"])
    with get_client(sync_client=True) as client:  # what the UI's run graph draws its arrows from
        # Task runs reach the server as events, recorded shortly after the flow returns.
        deadline = time.monotonic() + 120
        while len(runs := client.read_task_runs()) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        names = {r.id: r.name for r in runs}
        graph = {r.name: sorted(names[i.id] for i in r.task_inputs.get("wait_for", [])) for r in runs}
    print("RESULT " + json.dumps(graph))
""")


def test_the_ui_run_graph_is_the_declared_graph(tmp_path):
    """Each stage's task run waits for the stages it reads from, and only those, so the UI draws
    generate -> filter -> preference. A finished run directory from an older release serves
    every stage without a model."""
    import shutil

    from sit_cli.server import background_server

    run_dir = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "previous_run", run_dir)
    with background_server(tmp_path / "home") as (_, env):  # the server `sit server` runs, as the UI reads it
        proc = subprocess.run([sys.executable, "-c", RUN_FLOW_GRAPH, str(run_dir)], env=env, capture_output=True,
                              text=True, timeout=HANG_GUARD_S, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    graph = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert graph == {"generate": [], "filter": ["generate"], "preference": ["filter"]}
