"""The Prefect layer: a rerun on a brand-new PREFECT_HOME is all cache hits and loads no
model; damaged outputs invalidate the cache; the flow runs inside a running event loop
(a notebook cell)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from conftest import run_flow_script

OVERRIDES = ["generation.num_samples=4", "filter.target_count=2", "filter.min_count=1", "preference.num_pairs=1",
             "generation.instruction_max_tokens=40", "generation.response_max_tokens=40", "generation.batch_size=4",
             "filter.length.min=3"]

RUN_FLOW = textwrap.dedent("""
    import json, sys
    from flows.pipeline import synthetic_instruction_tuner
    result = synthetic_instruction_tuner(run_dir=sys.argv[1], preset="demo", profile="cpu",
                                         overrides=sys.argv[2:], stages=["generate", "filter"])
    print("RESULT " + json.dumps(result))
""")

RUN_FLOW_IN_LOOP = textwrap.dedent("""
    import asyncio, json, sys
    from flows.pipeline import synthetic_instruction_tuner

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
