"""Sharded Magpie generation through Prefect's ProcessPoolTaskRunner with 2 workers on this CPU:
the merged stage files equal a single-process run's byte for byte, and a resume redoes only
the unfinished shard."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from conftest import run_flow_script

from sit_core import magpie, shards
from sit_core.config import load_config

pytestmark = pytest.mark.slow

OVERRIDES = ["generation.num_samples=6", "filter.target_count=2", "filter.min_count=1", "preference.num_pairs=1",
             "generation.instruction_max_tokens=40", "generation.response_max_tokens=24",
             "generation.batch_size=2", "checkpoint_interval=2"]
FILES = ("generated.jsonl", "attempts.jsonl", "stats.json")

RUN_SHARDED = textwrap.dedent("""
    import json, sys
    from flows.sharded import synthetic_instruction_tuner_sharded
    result = synthetic_instruction_tuner_sharded(run_dir=sys.argv[1], preset="demo", profile="cpu",
                                                 overrides=sys.argv[2:], stages=["generate"], workers=2)
    print("RESULT " + json.dumps(result))
""")


def run_sharded(run_dir: Path, prefect_home: Path) -> dict:
    return run_flow_script(RUN_SHARDED, run_dir, prefect_home, OVERRIDES)


def test_split_is_whole_batches_and_covers_the_range():
    assert shards.split(0, 6, 2, 2) == [(0, 2), (2, 6)]
    assert shards.split(8, 16, 2, 4) == [(8, 10), (10, 12), (12, 14), (14, 16)]
    assert shards.split(0, 4, 4, 3) == [(0, 4)]


def test_two_workers_equal_one_and_resume_redoes_only_unfinished_shards(tmp_path, smollm2_path):
    cfg = load_config(None, preset="demo", profile="cpu", overrides=OVERRIDES)
    reference = tmp_path / "one-worker"
    magpie.run(cfg, reference)

    sharded = tmp_path / "two-workers"
    result = run_sharded(sharded, tmp_path / "home")
    assert result["generate"]["status"] == "done"
    plan = json.loads((sharded / "generate" / "shards" / "plan.json").read_text())["shards"]
    assert len(plan) >= 2
    for name in FILES:
        assert (sharded / "generate" / name).read_bytes() == (reference / "generate" / name).read_bytes(), name

    # A run killed with the first shard finished and the last one part-way: no outputs, no
    # manifest, one batch (and a torn line) in the last shard's log.
    resumed = tmp_path / "resumed"
    shutil.copytree(sharded, resumed)
    for name in (*FILES, "manifest.json"):
        (resumed / "generate" / name).unlink()
    first, last = [shards.shard_log(resumed, tuple(s)) for s in (plan[0], plan[-1])]
    last.write_text("".join(last.read_text().splitlines(keepends=True)[:2]) + '{"index": 99, "sta')
    first_mtime = first.stat().st_mtime_ns

    run_sharded(resumed, tmp_path / "home")
    assert first.stat().st_mtime_ns == first_mtime  # the finished shard was not redone
    for name in FILES:
        assert (resumed / "generate" / name).read_bytes() == (reference / "generate" / name).read_bytes(), name
