"""Sharded Magpie generation and preference stage through Prefect's ProcessPoolTaskRunner with 2
workers on this CPU: the merged stage files equal a single-process run's byte for byte, and a
resume redoes only the unfinished shard."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from conftest import run_flow_script

from sit_core.config import load_config
from sit_core.driver import run_stage
from sit_core.stages.generate import shards
from sit_core.stages.preference import shards as preference_shards
from sit_core.store.fileio import read_json, read_jsonl, sha256_file
from sit_core.engine.worker import HANG_ENV

# One torch thread in every process: two workers with two threads each on two shared cores
# spin against each other (the Magpie test took 63 s on an idle machine, 650 s beside another
# test run), and the in-process references then compute with the same thread count as the workers.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_per_process")]

OVERRIDES = ["generation.num_samples=6", "filter.target_count=2", "filter.min_count=1", "preference.num_pairs=1",
             "generation.instruction_max_tokens=40", "generation.response_max_tokens=24",
             "generation.batch_size=2", "checkpoint_interval=2"]
FILES = ("generated.jsonl", "attempts.jsonl", "stats.json")

RUN_SHARDED = textwrap.dedent("""
    import json, sys
    from sit_prefect.flows import synthetic_instruction_tuner_sharded
    from prefect import get_client
    result = synthetic_instruction_tuner_sharded(run_dir=sys.argv[1], preset="demo", profile="cpu",
                                                 overrides=sys.argv[3:], stages=[sys.argv[2]], workers=2)
    with get_client(sync_client=True) as client:  # what the UI lists for the run
        result["artifacts"] = sorted({a.key for a in client.read_artifacts() if a.key})
    print("RESULT " + json.dumps(result))
""")


def run_sharded(run_dir: Path, prefect_home: Path, stage: str = "generate", overrides=OVERRIDES) -> dict:
    return run_flow_script(RUN_SHARDED, run_dir, prefect_home, [stage, *overrides])


def test_split_is_whole_batches_and_covers_the_range():
    assert shards.split(0, 6, 2, 2) == [(0, 2), (2, 6)]
    assert shards.split(8, 16, 2, 4) == [(8, 10), (10, 12), (12, 14), (14, 16)]
    assert shards.split(0, 4, 4, 3) == [(0, 4)]


def test_two_workers_equal_one_and_resume_redoes_only_unfinished_shards(tmp_path, smollm2_path):
    cfg = load_config(None, preset="demo", profile="cpu", overrides=OVERRIDES)
    reference = tmp_path / "one-worker"
    run_stage(cfg, reference, "generate")

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


# ---------------------------------------------------------------------------------------
# The preference stage: 5 instructions, 2 response models, 8 new tokens, batched sampling.

PREF_KEPT = [{"id": i, "instruction": q} for i, q in enumerate([
    "Name three primary colors.", "Write a haiku about the sea.", "Explain in one sentence what a CPU does.",
    "Give a synonym for happy.", "What is the capital of France?"])]
PREF_MODELS = [
    {"name": "greedy", "model": "embedded:smollm2-135m-instruct", "temperature": 0.0, "top_p": 1.0},
    {"name": "hot", "model": "embedded:smollm2-135m-instruct", "temperature": 1.0, "top_p": 0.95},
]
# Batches of 2 over 5 items per model make the response shards [0, 2) and [2, 5): a shard
# boundary must fall on a batch boundary, and the last batch is a short one. Scoring slices of 3
# make the score shards cut inside what one model answered.
PREF_OVERRIDES = [f"models.response_models={json.dumps(PREF_MODELS)}", "preference.max_new_tokens=8",
                  "preference.num_pairs=2", "preference.min_pairs=1", "preference.min_margin=0.0",
                  "preference.generation_batch_size=2", "preference.reward_batch_size=3"]
PREF_FILES = ("responses.jsonl", "scores.jsonl", "pairs.jsonl", "stats.json")


def pref_run_dir(path: Path) -> Path:
    (path / "filter").mkdir(parents=True)
    (path / "filter" / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREF_KEPT))
    return path


@pytest.fixture(scope="module")
def pref_one_process(one_thread_per_process, tmp_path_factory, smollm2_path) -> Path:
    run_dir = pref_run_dir(tmp_path_factory.mktemp("pref") / "one-process")
    run_stage(load_config(None, preset="demo", profile="cpu", overrides=PREF_OVERRIDES), run_dir, "preference")
    return run_dir


@pytest.fixture(scope="module")
def pref_sharded(one_thread_per_process, tmp_path_factory, smollm2_path) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("pref")
    run_dir = pref_run_dir(base / "two-workers")
    return run_dir, run_sharded(run_dir, base / "home", "preference", PREF_OVERRIDES)


def shard_events(run_dir: Path, kind: str) -> list[list[int]]:
    return sorted(e["shard"] for e in read_json(run_dir / "preference" / "manifest.json")["events"]
                  if e["event"] == kind)


def test_two_workers_sample_and_score_the_preference_stage_as_one_process_does(pref_one_process, pref_sharded):
    run_dir, result = pref_sharded
    assert result["preference"]["status"] == "done"
    shards_dir = preference_shards.shards_dir(run_dir)
    assert read_json(shards_dir / "responses" / "plan.json") == {"batch_size": 2, "shards": [[0, 2], [2, 5]]}
    candidates = sum(1 for r in read_jsonl(pref_one_process / "preference" / "responses.jsonl") if r["response"])
    score_plan = read_json(shards_dir / "scores" / "plan.json")
    assert score_plan["shards"] == [list(s) for s in shards.split(0, candidates, 3, 2)]
    assert len(score_plan["shards"]) == 2
    for name in PREF_FILES:
        assert (run_dir / "preference" / name).read_bytes() == (pref_one_process / "preference" / name).read_bytes(), name
    # Each worker's throughput reached the manifest through the parent.
    assert shard_events(run_dir, "generated") == [[0, 2], [2, 5]]
    manifest = read_json(run_dir / "preference" / "manifest.json")
    assert manifest["progress"] == {"done": 20, "total": 20}
    assert "preference-preference-summary" in result["artifacts"]  # the stage's table, as unsharded


def test_preference_resume_redoes_only_the_unfinished_shard(pref_one_process, pref_sharded, tmp_path):
    cfg = load_config(None, preset="demo", profile="cpu", overrides=PREF_OVERRIDES)
    resumed = tmp_path / "resumed"
    shutil.copytree(pref_sharded[0], resumed)
    # A run killed while sampling: the first response shard finished, the last one part-way
    # through its second model with a torn append; nothing merged or scored, no manifest.
    stage = resumed / "preference"
    for name in (*PREF_FILES, "score_histogram.png", "manifest.json"):
        (stage / name).unlink()
    shutil.rmtree(preference_shards.shards_dir(resumed) / "scores")
    plan = preference_shards.response_plan(cfg, resumed)
    first, last = plan.log((0, 2)), plan.log((2, 5))
    last.write_text("".join(last.read_text().splitlines(keepends=True)[:4]) + '{"key": "hot:3:0", "resp')
    first_before = (first.stat().st_mtime_ns, sha256_file(first))
    assert preference_shards.pending_response_shards(cfg, resumed, 2) == [(2, 5)]

    run_sharded(resumed, tmp_path / "home", "preference", PREF_OVERRIDES)
    assert (first.stat().st_mtime_ns, sha256_file(first)) == first_before  # the finished shard was not redone
    assert shard_events(resumed, "generated") == [[2, 5]]
    assert len(read_jsonl(last)) == 6
    for name in PREF_FILES:
        assert (stage / name).read_bytes() == (pref_one_process / "preference" / name).read_bytes(), name


def test_a_stall_in_a_shard_is_recorded_by_the_parent_and_that_shard_falls_back(pref_one_process, tmp_path,
                                                                                 monkeypatch):
    # One engine per shard serves both models (the same weights at two settings). Its third
    # call hangs: the shard [0, 2) makes two (a batch per model), the shard [2, 5) four, the
    # third of which is the second model's first batch.
    monkeypatch.setenv(HANG_ENV, "3")
    run_dir = pref_run_dir(tmp_path / "run")
    result = run_sharded(run_dir, tmp_path / "home", "preference", [*PREF_OVERRIDES, "preference.stall_timeout_s=4"])
    assert result["preference"]["stats"]["stalls"] == 1
    stalls = [e for e in read_json(run_dir / "preference" / "manifest.json")["events"] if e["event"] == "stall"]
    assert [(e["shard"], e["model"], e["fallback"]) for e in stalls] == [([2, 5], "hot", "stable")]
    keys = [r["key"] for r in read_jsonl(run_dir / "preference" / "responses.jsonl")]
    assert keys == [r["key"] for r in read_jsonl(pref_one_process / "preference" / "responses.jsonl")]


@pytest.mark.parametrize("flags, runner", [
    (["--devices", "0,1"], {"workers": None, "devices": ["0", "1"]}),
    (["--workers", "2"], {"workers": 2, "devices": None}),
    ([], {"workers": None, "devices": None}),
])
def test_sit_run_gives_the_flow_its_workers_or_devices(tmp_path, monkeypatch, flags, runner):
    """Sharding is a choice of runner, not another flow: `sit run` hands the one parent flow
    the workers or devices its stages shard over."""
    import sit_prefect.flows
    from typer.testing import CliRunner

    from sit_cli.main import app

    calls = []
    monkeypatch.setattr(sit_prefect.flows, "synthetic_instruction_tuner", lambda **kw: calls.append(kw))
    result = CliRunner().invoke(app, ["run", "--run-dir", str(tmp_path / "run"), "--preset", "demo", "--profile", "cpu",
                                      "--stages", "generate", *flags])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    assert calls[0]["stages"] == ["generate"] and calls[0]["preset"] == "demo"
    assert {k: calls[0][k] for k in runner} == runner
