"""The declared stage contract: the pipeline's shape comes from what each stage reads and
writes, and run directories made before the declarations existed keep working."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import HANG_GUARD_S
from sit_core.config import STAGE_ORDER, load_config
from sit_core.contract import Read, Stage
from sit_core.errors import SitError
from sit_core.stages import all_stages, declared, dependents, graph_edges, input_paths, missing_inputs, path_of

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS_RUN = Path(__file__).parent / "fixtures" / "previous_run"


def test_the_declarations_make_the_pipeline_graph():
    assert [s.name for s in all_stages()] == list(STAGE_ORDER)
    drawn = {s.name: set(graph_edges(s.name)) for s in all_stages()}
    assert drawn == {"generate": set(), "filter": {"generate"}, "preference": {"filter"}, "sft": {"filter"},
                     "prompt_tuning": {"filter"}, "dpo": {"sft", "preference"}, "evaluate": {"prompt_tuning", "dpo"},
                     "report": {"evaluate"}}
    assert dependents("prompt_tuning") == ["evaluate", "report"]  # dpo reads sft and preference only
    assert dependents("sft") == ["dpo", "evaluate", "report"]
    assert dependents("report") == []


def test_reads_resolve_to_the_files_every_run_directory_has(tmp_path):
    """The same paths as before the declarations: a run directory's files never move."""
    cfg = load_config(None, preset="demo", profile="cpu")
    assert path_of(tmp_path, Read("generate", "records")) == tmp_path / "generate" / "generated.jsonl"
    assert path_of(tmp_path, Read("filter", "kept")) == tmp_path / "filter" / "kept.jsonl"
    assert path_of(tmp_path, Read("preference", "pairs")) == tmp_path / "preference" / "pairs.jsonl"
    assert path_of(tmp_path, Read("sft", "adapter")) == tmp_path / "sft" / "final"
    assert input_paths(cfg, tmp_path, "dpo") == [tmp_path / "preference" / "pairs.jsonl",
                                                 tmp_path / "sft" / "final" / "adapter_config.json",
                                                 tmp_path / "sft" / "final" / "adapter_model.safetensors"]
    assert missing_inputs(cfg, tmp_path, "dpo") == {"preference": Path("preference/pairs.jsonl"),
                                                    "sft": Path("sft/final/adapter_config.json")}
    # Optional reads: the evaluate stage reads the adapters that exist, of the variants asked for.
    assert input_paths(cfg, tmp_path, "evaluate") == [] and missing_inputs(cfg, tmp_path, "evaluate") == {}
    for variant in ("sft", "dpo"):
        (tmp_path / variant / "final").mkdir(parents=True)
        (tmp_path / variant / "final" / "adapter_model.safetensors").write_bytes(b"x")
        (tmp_path / variant / "final" / "tokenizer.json").write_text("{}")
    only_sft = load_config(None, preset="demo", profile="cpu", overrides=['evaluation.variants=["base","sft"]'])
    assert input_paths(only_sft, tmp_path, "evaluate") == [tmp_path / "sft" / "final" / "adapter_model.safetensors"]


def test_a_declaration_reading_what_no_earlier_stage_writes_is_refused(monkeypatch):
    import sit_core.stages.filter as stage_module

    declared.cache_clear()
    broken = Stage(name="filter", reads=(Read("generate", "recordz"),), writes={}, fingerprint=dict, work=print)
    monkeypatch.setattr(stage_module, "STAGE", broken)
    try:
        with pytest.raises(SitError, match="reads generate.recordz, which no earlier stage writes"):
            declared("filter")
    finally:
        declared.cache_clear()


def test_reset_discards_the_dependents_only(tmp_path):
    from sit_cli.main import app

    run_dir = tmp_path / "run"
    for stage in STAGE_ORDER:
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / "manifest.json").write_text("{}")
    result = CliRunner().invoke(app, ["reset", str(run_dir), "prompt_tuning", "--yes"])
    assert result.exit_code == 0, result.output
    assert "reset: prompt_tuning, evaluate, report" in result.output
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(["generate", "filter", "preference", "sft", "dpo"])


def _sit_run(run_dir: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    cmd = [sys.executable, "-m", "sit_cli.main", "run", "--run-dir", str(run_dir), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def _run_log(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("sit-run-*.log")))


def test_a_run_directory_from_the_previous_code_is_served_as_it_is(tmp_path, smollm2_path):
    """Its stages are done: today's code returns them without loading a model, and keeps every
    file of them as the previous code wrote it (run.json, the run's record, is rewritten by every run)."""
    run_dir = tmp_path / "old"
    shutil.copytree(PREVIOUS_RUN, run_dir)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = _sit_run(run_dir, tmp_path, "--stages", "generate,filter,preference")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for stage in ("generate", "filter", "preference"):
        assert json.loads((run_dir / stage / "manifest.json").read_text())["status"] == "done"
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    stage_files = [rel for rel in before if rel.parts[0] in ("generate", "filter", "preference")]
    assert stage_files and {rel: after[rel] for rel in stage_files} == {rel: before[rel] for rel in stage_files}
    assert "Loading weights" not in _run_log(run_dir)


def test_a_stage_the_previous_code_left_partial_resumes_to_the_same_records(tmp_path, smollm2_path):
    """The previous code's generate stage, killed after its third checkpoint (24 attempts logged):
    today's loop continues the log and writes what the previous code's uninterrupted run wrote."""
    run_dir = tmp_path / "old"
    shutil.copytree(PREVIOUS_RUN, run_dir)
    for stage in ("filter", "preference"):
        shutil.rmtree(run_dir / stage)
    stage_dir = run_dir / "generate"
    attempts = stage_dir / "attempts.jsonl"
    logged = attempts.read_text().splitlines(keepends=True)[:24]
    attempts.write_text("".join(logged))
    expected = (stage_dir / "generated.jsonl").read_bytes()
    (stage_dir / "generated.jsonl").unlink()
    (stage_dir / "stats.json").unlink()
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    accepted = sum(json.loads(line)["status"] == "ok" for line in logged)
    manifest.update(status="partial", outputs={}, progress={"done": accepted, "total": 24}, events=[])
    manifest.pop("finished_at")
    (stage_dir / "manifest.json").write_text(json.dumps(manifest))

    # The previous demo generated one sample at a time; the record a batch holds is the same up
    # to float rounding, so the comparison byte for byte runs at that batch size.
    proc = _sit_run(run_dir, tmp_path, "--stages", "generate", "--set", "generation.batch_size=1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (stage_dir / "generated.jsonl").read_bytes() == expected
    events = [e["event"] for e in json.loads((stage_dir / "manifest.json").read_text())["events"]]
    assert "resumed" in events


def test_a_field_the_previous_run_json_lacks_means_the_old_behaviour(tmp_path):
    """The previous code trained SFT and prompt tuning on whole conversations and recorded no
    training.completion_only_loss: continued, its run keeps that, with the fingerprints it
    recorded, and keeps the demo sizes it started with although the demo preset grew since."""
    from sit_core.pipeline import resolve_config
    from sit_core.stages import sft
    from sit_core.store.rundir import check_run_record

    run_dir = tmp_path / "old"
    shutil.copytree(PREVIOUS_RUN, run_dir)
    recorded = json.loads((run_dir / "run.json").read_text())
    assert "completion_only_loss" not in recorded["config"]["training"]
    cfg, _ = resolve_config(run_dir, None, None, "cpu", None)
    assert cfg.training.completion_only_loss is False and cfg.training.dpo_validation_size is None
    assert cfg.filter.target_count == recorded["config"]["filter"]["target_count"] == 12
    assert cfg.training.validation_size == recorded["config"]["training"]["validation_size"]
    check_run_record(run_dir, cfg)  # no mismatch
    assert "completion_only_loss" not in sft.fingerprint(cfg)["training"]

    # A new run trains on the responses only, and the switch is part of the stage's fingerprint.
    new = load_config(None, preset="demo", profile="cpu")
    assert new.training.completion_only_loss is True and new.filter.target_count == 16
    assert sft.fingerprint(new)["training"]["completion_only_loss"] is True
    full = load_config(None, preset="demo", profile="cpu", overrides=["training.completion_only_loss=false"])
    assert sft.fingerprint(full) != sft.fingerprint(new)
    # Asked for on the old run directory, the new behaviour is a change of recipe: refused.
    changed, _ = resolve_config(run_dir, None, None, "cpu", ["training.completion_only_loss=true"])
    with pytest.raises(SitError, match="completion_only_loss"):
        check_run_record(run_dir, changed)
