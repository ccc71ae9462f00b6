"""The report stage, from fixture files shaped like the upstream stages' outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sit_core.config import load_config
from sit_core.driver import run_stage

TASKS = ["sit_ifeval_local", "sit_mc_local"]


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj, encoding="utf-8")


def _fixture_run(run_dir: Path) -> None:
    scores = ["variant,task,metric,value,primary",
              "base,sit_ifeval_local,prompt_level_strict_acc,0.25,True",
              "base,sit_ifeval_local,inst_level_strict_acc,0.3,False",
              "base,sit_mc_local,acc,0.5,True",
              "sft,sit_ifeval_local,prompt_level_strict_acc,0.5,True",
              "sft,sit_mc_local,acc,0.5,True",
              "dpo,sit_ifeval_local,prompt_level_strict_acc,0.375,True",
              "dpo,sit_mc_local,acc,0.625,True"]
    _write(run_dir / "evaluate" / "scores.csv", "\n".join(scores) + "\n")
    for variant, success in (("base", 0.0), ("sft", 0.5), ("dpo", 0.25)):
        _write(run_dir / "evaluate" / "agent" / f"{variant}.json",
               {"variant": variant, "summary": {"success_rate": success, "valid_call_rate": 0.6, "mean_steps": 2.5,
                                                "answer_rate": 0.75, "num_tasks": 4}, "tasks": []})
    _write(run_dir / "sft" / "metrics.json",
           {"train_loss": 0.748, "eval_loss": 0.541, "total_steps": 114, "training_time_minutes": 8.2,
            "trainable_params": 12156928, "trainable_ratio_percent": 0.67, "peak_memory_gb": 5.31,
            "tokens_per_sec": 900.0, "inference_speed_tok_per_sec": 7.7})
    _write(run_dir / "sft" / "log_history.json",
           [{"step": 1, "loss": 1.2}, {"step": 2, "loss": 0.9}, {"step": 2, "eval_loss": 0.95}])
    _write(run_dir / "dpo" / "metrics.json",
           {"train_loss": 0.69, "eval_loss": 0.66, "total_steps": 6, "training_time_minutes": 3.5,
            "trainable_params": 12156928, "trainable_ratio_percent": 0.67, "peak_memory_gb": 7.9,
            "tokens_per_sec": 400.0, "inference_speed_tok_per_sec": 7.1})
    _write(run_dir / "preference" / "stats.json",
           {"pairs": 8, "mean_margin": 0.42, "wins_per_model": {"smollm2-greedy": 5, "smollm2-t0.7": 3},
            "chosen_scores": [0.9, 0.8, 0.7]})
    _write(run_dir / "filter" / "stats.json", {"input": 32, "kept": 16, "removed": {"length": 9, "refusal": 7}})


def test_report_from_fixture_metrics(run_dir: Path) -> None:
    cfg = load_config(None, preset="demo", profile="cpu", overrides=[f"evaluation.tasks={json.dumps(TASKS)}"])
    _fixture_run(run_dir)
    manifest = run_stage(cfg, run_dir, "report")

    assert manifest["status"] == "done"
    with open(run_dir / "report" / "comparison_summary.csv", encoding="utf-8") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["base", "sft", "prompt_tuning", "dpo"]  # configured order, none dropped
    assert rows["prompt_tuning"]["status"] == "missing"
    assert rows["prompt_tuning"]["sit_mc_local"] == ""
    assert rows["sft"]["status"] == "evaluated"
    assert float(rows["sft"]["sit_ifeval_local"]) == 0.5
    assert float(rows["dpo"]["sit_mc_local"]) == 0.625
    assert float(rows["sft"]["agent_success_rate"]) == 0.5
    assert int(rows["sft"]["trainable_params"]) == 12156928
    assert float(rows["sft"]["eval_loss"]) == 0.541
    assert float(rows["sft"]["inference_tok_per_sec"]) == 7.7
    assert float(rows["base"]["trainable_params"]) == 0

    stats = manifest["stats"]
    assert [r["variant"] for r in stats["tables"]["comparison"]] == ["base", "sft", "prompt_tuning", "dpo"]
    assert stats["missing"] == ["prompt_tuning"]
    assert stats["winners"]["sit_ifeval_local"]["variants"] == ["sft"]
    assert stats["winners"]["sit_mc_local"]["variants"] == ["dpo"]
    for chart in ("scores_by_task.png", "quality_vs_trainable_params.png", "quality_vs_training_time.png",
                  "training_curves.png"):
        assert chart in stats["charts"]
        assert (run_dir / "report" / chart).read_bytes()[:4] == b"\x89PNG"

    md = (run_dir / stats["report_md"]).read_text(encoding="utf-8")
    for heading in ("## 1. Introduction", "## 3. Method", "## 4. Experimental setup", "## 5. Results",
                    "## 6. Discussion", "## 7. Conclusion"):
        assert heading in md
    assert "`sit_ifeval_local`: **sft**" in md
    assert "wins per model: smollm2-greedy 5, smollm2-t0.7 3" in md
    assert "| prompt_tuning | missing |" in md
    assert "12,156,928" in md

    assert run_stage(cfg, run_dir, "report") == manifest  # done: returned as it is, nothing recomputed
