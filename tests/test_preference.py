"""Preference stage on the embedded SmolLM2: real sampling, real scoring, real kills and hangs.

Counts are tiny (3 instructions, 2 response models, 8 new tokens) so the file runs in a few
minutes on two shared CPU cores. One uninterrupted stable run (`baseline`) is the reference
the resume, watchdog and re-selection tests compare against.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sit_core.driver import run_stage
from sit_core.config import load_config
from sit_core.errors import NotEnoughDataError, SitError
from sit_core.store.fileio import read_json, read_jsonl
from sit_core.stages.preference.build import Candidate, pick_pair, select_pairs
from sit_core.engine.worker import HANG_ENV

from conftest import engine_processes

pytestmark = pytest.mark.usefixtures("one_thread_per_process")

REPO = Path(__file__).resolve().parents[1]
KEPT = [
    {"id": 0, "instruction": "Name three primary colors.", "response": "Red, yellow and blue."},
    {"id": 3, "instruction": "Write a haiku about the sea.", "response": "Waves fold into foam."},
    {"id": 7, "instruction": "Explain in one sentence what a CPU does.", "response": "It executes instructions."},
]
MODELS = [
    {"name": "greedy", "model": "embedded:smollm2-135m-instruct", "temperature": 0.0, "top_p": 1.0},
    {"name": "hot", "model": "embedded:smollm2-135m-instruct", "temperature": 1.0, "top_p": 0.95},
]
BASE_OVERRIDES = [
    f"models.response_models={json.dumps(MODELS)}",
    "preference.max_new_tokens=8",
    "preference.num_pairs=2",
    "preference.min_pairs=1",
    "preference.min_margin=0.0",
]


def make_cfg(*extra: str):
    return load_config(None, preset="demo", profile="cpu", overrides=[*BASE_OVERRIDES, *extra])


def make_run_dir(path: Path) -> Path:
    (path / "filter").mkdir(parents=True)
    (path / "filter" / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in KEPT))
    return path


def responses_by_key(run_dir: Path) -> dict[str, str]:
    return {r["key"]: r["response"] for r in read_jsonl(run_dir / "preference" / "responses.jsonl")}


@pytest.fixture(scope="module")
def baseline(one_thread_per_process, tmp_path_factory, smollm2_path):
    run_dir = make_run_dir(tmp_path_factory.mktemp("baseline") / "run")
    calls = []
    manifest = run_stage(make_cfg(), run_dir, "preference", progress=lambda d, t: calls.append((d, t)))
    return run_dir, manifest, calls


# ---------------------------------------------------------------------------------------
# Pair selection logic (no model)


def cand(model: str, score: float, text: str | None = None, sample: int = 0) -> Candidate:
    return Candidate(model, sample, text or f"{model}-{score}", score)


def test_pick_pair_highest_vs_lowest_and_margin():
    d = pick_pair([cand("a", 0.2), cand("b", 0.9), cand("c", 0.5)], min_margin=0.5)
    assert (d.chosen.model, d.rejected.model, d.reason) == ("b", "a", None)
    assert d.spread == pytest.approx(0.7)
    assert pick_pair([cand("a", 0.2), cand("b", 0.6)], min_margin=0.5).reason == "below_margin"


def test_pick_pair_ties_and_degenerate_groups_are_skipped():
    assert pick_pair([cand("a", 0.4), cand("b", 0.4)], min_margin=0.0).reason == "tie"
    assert pick_pair([cand("a", 0.4)], min_margin=0.0).reason == "too_few_responses"
    same = pick_pair([cand("a", 0.1, "same"), cand("b", 0.9, "same")], min_margin=0.0)
    assert same.reason == "identical_responses"
    # A tie at the top resolves to the earliest candidate, deterministically.
    d = pick_pair([cand("a", 0.9), cand("b", 0.9), cand("c", 0.1)], min_margin=0.0)
    assert d.chosen.model == "a"


def test_select_pairs_prefers_wide_margins_keeps_input_order_and_counts_skips():
    groups = [({"id": i, "instruction": f"q{i}"}, cands) for i, cands in enumerate([
        [cand("a", 0.0), cand("b", 0.3)],   # margin 0.3
        [cand("a", 0.5), cand("b", 0.5)],   # tie
        [cand("a", 0.9), cand("b", 0.0)],   # margin 0.9
        [cand("a", 0.1), cand("b", 0.15)],  # below margin
        [cand("a", 0.0), cand("b", 0.6)],   # margin 0.6
    ])]
    pairs, decisions = select_pairs(groups, num_pairs=2, min_margin=0.1)
    assert [p["id"] for p in pairs] == [2, 4]
    assert [d.reason for d in decisions] == [None, "tie", None, "below_margin", None]
    p = pairs[0]
    assert p["prompt"] == [{"role": "user", "content": "q2"}]
    assert p["chosen"] == [{"role": "assistant", "content": "a-0.9"}]
    assert p["rejected"] == [{"role": "assistant", "content": "b-0.0"}]
    assert (p["chosen_model"], p["rejected_model"], p["chosen_score"], p["rejected_score"]) == ("a", "b", 0.9, 0.0)


# ---------------------------------------------------------------------------------------
# The stage on the embedded model


def test_stable_run_writes_dpo_pairs_stats_and_histogram(baseline):
    run_dir, manifest, calls = baseline
    out = run_dir / "preference"
    pairs = read_jsonl(out / "pairs.jsonl")
    assert manifest["status"] == "done"
    assert 1 <= len(pairs) <= 2
    for p in pairs:
        assert set(p) == {"id", "prompt", "chosen", "rejected", "chosen_model", "rejected_model",
                          "chosen_score", "rejected_score"}
        assert p["prompt"][0]["role"] == "user" and p["chosen"][0]["role"] == "assistant"
        assert p["chosen_score"] > p["rejected_score"]
        assert p["chosen"][0]["content"] != p["rejected"][0]["content"]
    log = read_jsonl(out / "responses.jsonl")
    assert len(log) == 6 and all(r["tokens"] <= 8 for r in log)
    stats = read_json(out / "stats.json")
    assert stats["pairs"] == len(pairs) and stats["responses"] == 6
    assert sum(stats["wins_per_model"].values()) == len(pairs)
    assert set(stats["score_histogram"]["counts"]) == {"greedy", "hot"}
    assert (out / "score_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = manifest["stats"]["tables"]["preference_summary"]
    assert [r["model"] for r in rows] == ["greedy", "hot"]
    assert set(manifest["outputs"]) == {"preference/pairs.jsonl", "preference/stats.json",
                                        "preference/score_histogram.png"}
    assert calls[-1][0] == calls[-1][1] == 12  # 6 responses sampled + 6 scored
    # Done: a second call returns the manifest without touching a model.
    assert run_stage(make_cfg(), run_dir, "preference")["finished_at"] == manifest["finished_at"]


_CHILD = """
import json, sys
from sit_core.driver import run_stage
from sit_core.stages.preference import build as preference
from sit_core.config import load_config
cfg = load_config(None, preset="demo", profile="cpu", overrides=json.loads(sys.argv[1]))
run_stage(cfg, sys.argv[2], "preference")
"""


def test_sigkill_mid_stage_resumes_to_identical_output(baseline, tmp_path):
    base_dir = baseline[0]
    run_dir = make_run_dir(tmp_path / "run")
    log = run_dir / "preference" / "responses.jsonl"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(BASE_OVERRIDES), str(run_dir)], cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.poll() is None:
            if log.exists() and len(read_jsonl(log)) >= 2:  # mid-way through the first model
                break
            time.sleep(0.05)
        assert child.poll() is None, "the child finished or died before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    killed_at = len(read_jsonl(log))
    assert 2 <= killed_at < 6
    manifest = run_stage(make_cfg(), run_dir, "preference")
    assert any(e["event"] == "resumed" for e in manifest["events"])
    assert responses_by_key(run_dir) == responses_by_key(base_dir)
    assert (run_dir / "preference/pairs.jsonl").read_bytes() == (base_dir / "preference/pairs.jsonl").read_bytes()


def test_batched_worker_that_hangs_is_killed_and_stage_falls_back_to_stable(baseline, tmp_path, monkeypatch):
    base_dir, base_manifest, _ = baseline
    run_dir = make_run_dir(tmp_path / "run")
    monkeypatch.setenv(HANG_ENV, "2")  # the worker's second generate() never returns
    started = time.monotonic()
    manifest = run_stage(make_cfg("preference.generation_batch_size=2", "preference.stall_timeout_s=4"), run_dir, "preference")
    stalls = [e for e in manifest["events"] if e["event"] == "stall"]
    assert len(stalls) == 1 and stalls[0]["model"] == "greedy" and stalls[0]["fallback"] == "stable"
    assert "no progress" in stalls[0]["reason"]
    assert manifest["stats"]["stalls"] == 1
    assert engine_processes() == []  # the hung worker is gone
    # The first batch came from the worker, the rest from stable mode; nothing is missing.
    assert set(responses_by_key(run_dir)) == set(responses_by_key(base_dir))
    assert manifest["stats"]["pairs"] == base_manifest["stats"]["pairs"]
    assert time.monotonic() - started < 170


def test_changed_margin_reselects_from_logs_and_too_few_pairs_is_a_clear_error(baseline, tmp_path):
    base_dir = baseline[0]
    run_dir = tmp_path / "run"
    shutil.copytree(base_dir, run_dir)
    # Judge scores are probabilities, so no pair can reach a margin of 1.
    with pytest.raises(NotEnoughDataError) as err:
        run_stage(make_cfg("preference.min_margin=1.0"), run_dir, "preference")
    msg = str(err.value)
    assert "only 0 preference pairs, 1 needed" in msg and "of 3 instructions 0 reached min_margin=1" in msg
    assert "below_margin=" in msg
    # Back to the old margin: pairs come from the logged responses and scores, no model runs.
    started = time.monotonic()
    manifest = run_stage(make_cfg(), run_dir, "preference")
    assert time.monotonic() - started < 10
    assert any(e["event"] == "reselect" for e in manifest["events"])
    assert (run_dir / "preference/pairs.jsonl").read_bytes() == (base_dir / "preference/pairs.jsonl").read_bytes()


@pytest.mark.parametrize("batch", [1, 2], ids=["stable", "batched-worker"])
def test_response_model_that_fails_to_load_is_named_and_other_work_stays(baseline, tmp_path, batch):
    base_dir = baseline[0]
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    models = [MODELS[0], {"name": "broken", "model": str(broken)}]
    run_dir = make_run_dir(tmp_path / "run")
    # The greedy model's responses are already logged (same key, seed and settings).
    greedy = [r for r in read_jsonl(base_dir / "preference/responses.jsonl") if r["model"] == "greedy"]
    (run_dir / "preference").mkdir()
    (run_dir / "preference/responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in greedy))
    with pytest.raises(SitError) as err:
        run_stage(make_cfg(f"models.response_models={json.dumps(models)}",
                                f"preference.generation_batch_size={batch}"), run_dir, "preference")
    assert "response model 'broken'" in str(err.value) and str(broken) in str(err.value)
    assert [r["key"] for r in read_jsonl(run_dir / "preference/responses.jsonl")] == [r["key"] for r in greedy]
    assert engine_processes() == []


# ---------------------------------------------------------------------------------------
# Reward scorers


@pytest.fixture(scope="module")
def minilm_reward_model(tmp_path_factory) -> Path:
    """A real (untrained-head) sequence-classification reward model built from all-MiniLM."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sit_core.engine.models import resolve_model_path

    src = resolve_model_path("embedded:all-minilm-l6-v2")
    out = tmp_path_factory.mktemp("minilm-reward")
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def test_classifier_reward_model_through_the_stage(baseline, minilm_reward_model, tmp_path):
    base_dir = baseline[0]
    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / "preference").mkdir()
    shutil.copy(base_dir / "preference/responses.jsonl", run_dir / "preference/responses.jsonl")
    cfg = make_cfg("models.reward_type=classifier", f"models.reward_model={minilm_reward_model}",
                   "preference.reward_batch_size=4")
    manifest = run_stage(cfg, run_dir, "preference")
    scores = read_jsonl(run_dir / "preference/scores.jsonl")
    assert len(scores) == 6 and all(isinstance(s["score"], float) for s in scores)
    assert manifest["stats"]["pairs"] >= 1
    assert responses_by_key(run_dir) == responses_by_key(base_dir)  # scoring only; nothing resampled


def test_classifier_truncates_long_inputs(minilm_reward_model):
    from sit_core.engine.reward import ClassifierScorer

    scorer = ClassifierScorer(str(minilm_reward_model), max_length=64)
    long = "word " * 2000
    # Long answer (only the answer is cut), long question (both are cut), and a normal pair.
    scores = scorer.score([("Short question?", long), (long, "Short answer."), ("Hi?", "Hello.")])
    assert len(scores) == 3
    alone = scorer.score([("Hi?", "Hello.")])
    assert alone[0] == pytest.approx(scores[2], abs=1e-5)  # a row's score does not depend on its batch
    scorer.close()


def test_judge_scores_are_probabilities_and_long_inputs_truncate(smollm2_path):
    import torch

    from sit_core.engine.reward import JudgeScorer

    judge = JudgeScorer("embedded:smollm2-135m-instruct", "Is the response helpful?", max_length=48)
    scores = judge.score([("What is 2+2?", "4"), ("Tell me a story. " * 300, "Once upon a time " * 500)])
    assert all(0.0 < s < 1.0 for s in scores)
    # The score is P(Yes)/(P(Yes)+P(No)) of the next token after the prompt alone, unpadded.
    prompt = judge._prompt("What is 2+2?", "4")
    with torch.inference_mode():
        logp = torch.log_softmax(judge.lm.model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    yes, no = torch.logsumexp(logp[judge.yes_ids], 0), torch.logsumexp(logp[judge.no_ids], 0)
    assert scores[0] == pytest.approx(float(torch.sigmoid(yes - no)), abs=1e-5)
    judge.close()


def test_stall_before_a_restart_keeps_the_resumed_stage_in_stable_mode(baseline, tmp_path, monkeypatch):
    from sit_core.driver import open_stage

    base_dir = baseline[0]
    run_dir = make_run_dir(tmp_path / "run")
    cfg = make_cfg("preference.generation_batch_size=2", "preference.stall_timeout_s=2")
    open_stage(cfg, run_dir, "preference").event("stall", model="greedy", reason="before the restart",
                                                 stall_timeout_s=2, fallback="stable")
    greedy = [r for r in read_jsonl(base_dir / "preference/responses.jsonl") if r["model"] == "greedy"]
    (run_dir / "preference/responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in greedy))
    monkeypatch.setenv(HANG_ENV, "1")  # a worker, if one were started, would hang at once
    manifest = run_stage(cfg, run_dir, "preference")
    assert [e["reason"] for e in manifest["events"] if e["event"] == "stall"] == ["before the restart"]
    assert responses_by_key(run_dir) == responses_by_key(base_dir)
