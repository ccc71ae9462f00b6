"""The report stage, from fixture files shaped like the upstream stages' outputs: the evaluate
stage's per-item results go through its own table writer, so the intervals and paired
comparisons the report reads are the ones a real run computes."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from sit_core.config import load_config
from sit_core.driver import run_stage
from sit_core.stages.evaluate import write_tables

TASKS = ["sit_ifeval_local", "sit_mc_local"]
VARIANTS = ["base", "sft", "dpo"]  # prompt_tuning is configured but never trained: a missing row


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj, encoding="utf-8")


def _upstream(run_dir: Path) -> None:
    """Training metrics and the data statistics, as the training, filter and preference stages write them."""
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
           {"instructions": 3, "responses": 3, "pairs": 2, "qualifying_pairs": 2, "min_margin": 0.05, "target_pairs": 2,
            "wins_per_model": {"smollm2-greedy": 2, "smollm2-t0.7": 0},
            "losses_per_model": {"smollm2-greedy": 0, "smollm2-t0.7": 2},
            "score_summary": {"smollm2-greedy": {"count": 2, "mean": 0.6, "min": 0.5, "max": 0.7},
                              "smollm2-t0.7": {"count": 1, "mean": 0.3, "min": 0.3, "max": 0.3}},
            "selected_margins": {"min": 0.2, "median": 0.25, "max": 0.3},
            "score_histogram": {"bin_edges": [0.0, 0.5, 1.0], "counts": {"smollm2-greedy": [0, 2]}}})
    _write(run_dir / "preference" / "responses.jsonl", "\n".join(json.dumps(r) for r in [
        {"id": 1, "model": "smollm2-greedy", "response": "Paris is the capital of France, and it is known for",
         "truncated": True},
        {"id": 2, "model": "smollm2-greedy", "response": "Water boils at 100 degrees Celsius at sea level",
         "truncated": True},
        {"id": 3, "model": "smollm2-t0.7", "response": "", "truncated": False}]) + "\n")
    _write(run_dir / "generate" / "generated.jsonl", json.dumps(
        {"id": 7, "instruction": "Tell me a secret.", "response": "As an AI, I cannot share secrets."}) + "\n")
    _write(run_dir / "filter" / "removed.jsonl", json.dumps({"id": 7, "rules": ["refusal"]}) + "\n")
    _write(run_dir / "filter" / "stats.json",
           {"input": 24, "survivors": 18, "kept": 16, "overlaps": {"length+repetition": 1},
            "tables": {"rule_statistics": [
                {"rule": "length", "flagged": 2, "removed (first failing rule)": 2},
                {"rule": "refusal", "flagged": 4, "removed (first failing rule)": 4}]}})


def _lm_eval(ifeval: list[float], mc: list[float]) -> dict:
    """A variant's lm-eval JSON as evaluate_task writes it: lm-eval's results and stderr, and the
    per-document metrics."""
    def mean(xs):
        return sum(xs) / len(xs)

    return {"results": {
        "sit_ifeval_local": {"prompt_level_strict_acc,none": mean(ifeval), "prompt_level_strict_acc_stderr,none": "N/A",
                             "sample_len": len(ifeval)},
        "sit_mc_local": {"acc,none": mean(mc), "acc_stderr,none": 0.25, "sample_len": len(mc)}},
        "sit_items": {"sit_ifeval_local": {"doc_ids": list(range(len(ifeval))),
                                           "metrics": {"prompt_level_strict_acc": ifeval}},
                      "sit_mc_local": {"doc_ids": list(range(len(mc))), "metrics": {"acc": mc}}}}


def _evaluation(run_dir: Path, cfg) -> None:
    """Per-item results of three variants: SFT's held-out loss is lower than every other
    variant's on all 8 instructions (a winner), the win rates are mixed (within noise), and the
    benchmarks have 4 and 8 examples."""
    stage = run_dir / "evaluate"
    base_loss = [2.0, 2.2, 1.8, 2.5, 2.1, 1.9, 2.3, 2.0]
    per_variant = {
        "base": (base_loss, [0.5, -0.2, 0.1, 0.3], [0.5] * 8, [40] * 8),
        "sft": ([x - 0.5 for x in base_loss], [0.6, 0.1, 0.2, 0.4], [0.8, 0.8, 0.8, 0.8, 0.5, 0.52, 0.49, 0.3],
                [60] * 8),
        "dpo": ([x - 0.1 + 0.01 * i for i, x in enumerate(base_loss)], [0.9, 0.3, 0.5, 0.6],
                [0.6, 0.3, 0.5, 0.7, 0.5, 0.5, 0.9, 0.2], [30, 50, 40, 70, 20, 45, 80, 35]),
    }
    judge = {}
    for variant, (loss, margins, scores, tokens) in per_variant.items():
        texts = [f"answer {i} of {variant}" for i in range(8)]
        texts[2] = "As an AI, I cannot answer that." if variant == "dpo" else texts[2]
        _write(stage / "held_out" / f"{variant}.json", {
            "loss": {"values": loss, "tokens": [50] * 8}, "preference": {"margins": margins},
            "answers": {"texts": texts, "tokens": tokens, "truncated": [t >= 64 for t in tokens],
                        "backend": "sit sampler (sit_core.engine.sampling)"}})
        judge[variant] = scores
    _write(stage / "held_out" / "judge.json", judge)
    _write(stage / "lm_eval" / "base.json", _lm_eval([0, 1, 0, 0, 1, 0, 0, 1], [1, 0, 1, 0]))
    _write(stage / "lm_eval" / "sft.json", _lm_eval([1, 1, 0, 0, 1, 0, 1, 1], [1, 1, 1, 0]))
    _write(stage / "lm_eval" / "dpo.json", _lm_eval([0, 1, 1, 0, 1, 0, 0, 1], [1, 1, 1, 1]))
    for variant, successes in (("base", [0, 0, 0, 0]), ("sft", [1, 0, 1, 0]), ("dpo", [0, 1, 0, 0])):
        _write(stage / "agent" / f"{variant}.json",
               {"variant": variant, "summary": {"success_rate": sum(successes) / 4, "valid_call_rate": 0.6,
                                                "mean_steps": 2.5, "answer_rate": 0.75, "num_tasks": 4},
                "tasks": [{"success": bool(s)} for s in successes]})
    write_tables(cfg, stage, VARIANTS, {"records": [{}] * 8, "pairs": [{}] * 4})


def _config():
    return load_config(None, preset="demo", profile="cpu", overrides=[f"evaluation.tasks={json.dumps(TASKS)}"])


def test_report_claims_a_winner_only_beyond_noise(run_dir: Path) -> None:
    cfg = _config()
    _upstream(run_dir)
    _evaluation(run_dir, cfg)
    manifest = run_stage(cfg, run_dir, "report")
    assert manifest["status"] == "done"
    stats = manifest["stats"]

    with open(run_dir / "report" / "comparison_summary.csv", encoding="utf-8") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["base", "sft", "prompt_tuning", "dpo"]  # configured order, none dropped
    assert rows["prompt_tuning"]["status"] == "missing" and rows["prompt_tuning"]["held_out_loss"] == ""
    assert float(rows["sft"]["held_out_loss"]) < float(rows["sft"]["held_out_loss_ci_high"])
    assert float(rows["sft"]["held_out_loss_ci_high"]) < float(rows["base"]["held_out_loss_ci_low"])
    assert float(rows["sft"]["sit_mc_local"]) == 0.75
    assert float(rows["sft"]["sit_mc_local_ci_low"]) == 0.75 - 1.959964 * 0.25  # lm-eval's stderr, kept
    assert float(rows["sft"]["sit_mc_local_ci_high"]) == 1.0  # a proportion's interval stays within [0, 1]
    assert int(rows["sft"]["trainable_params"]) == 12156928
    assert float(rows["base"]["trainable_params"]) == 0

    winners = stats["winners"]
    assert winners["held_out/loss"]["best"] == "sft" and winners["held_out/loss"]["significant"]
    assert winners["win_rate_vs_base/win_rate"]["best"] == "sft"
    assert not winners["win_rate_vs_base/win_rate"]["significant"]
    assert not winners["sit_mc_local/acc"]["significant"]  # dpo is ahead on 4 examples: too few to tell
    assert winners["agent/success_rate"]["best"] == "sft" and not winners["agent/success_rate"]["significant"]

    md = (run_dir / stats["report_md"]).read_text(encoding="utf-8")
    summary = md.split("## Summary", 1)[1].split("## 1.", 1)[0]
    numbered = [line for line in summary.splitlines() if re.match(r"\d\. ", line)]
    assert len(numbered) == 5
    assert "**sft** wins" in numbered[0] and "12,156,928 trainable parameters" in numbered[0]
    assert "within noise among sft, dpo" in numbered[2] and "smallest difference 8 items could resolve" in numbered[2]
    assert "one seed" in summary
    assert "`sit_mc_local`" in numbered[3] and "4 items are too few" in md
    assert [r["signal"] for r in stats["tables"]["summary"]] == [line[3:] for line in numbered]

    # no dict dumps; statistics as tables
    assert "values, mean" not in md and "bin edges" not in md and "entries" not in md
    assert "| length | 2 | 2 |" in md and "length and repetition: 1" in md
    assert "| smollm2-greedy | 2 | 0.600 | 0.500 | 0.700 | 2 | 0 |" in md
    assert stats["tables"]["filter_rules"][0] == {"rule": "length", "flagged": 2, "removed (first failing rule)": 2}
    # truncation, empty answers and refusals: counts and one example each
    assert "**Truncated preference responses**: 2 of 3" in md and "> Paris is the capital" in md
    assert "**Empty preference responses**: 1 of 3" in md
    assert "**Refusals in the generated records**: 1 of 24" in md and "> As an AI, I cannot share secrets." in md
    assert "**Held-out answers of dpo**: 2 truncated, 0 empty, 1 refusing of 8" in md
    # held-out table: win/tie/loss counts, length beside the win rate, the backend
    held = {r["variant"]: r for r in stats["tables"]["held_out"]}
    assert held["sft"]["wins / ties / losses"] == "4 / 3 / 1" and held["base"]["win rate vs base"] == "reference"
    assert held["sft"]["mean answer tokens"].startswith("60.0")
    # every chart is captioned, with labelled axes drawn by matplotlib
    for chart in stats["charts"]:
        assert (run_dir / "report" / chart).read_bytes()[:4] == b"\x89PNG"
        assert re.search(rf"!\[[^\]]*\]\({re.escape(chart)}\)\n\n\*Figure \d+: [A-Z]", md), chart
    assert {"held_out_loss.png", "win_rate.png", "scores_by_task.png", "training_curves.png"} <= set(stats["charts"])

    assert run_stage(cfg, run_dir, "report") == manifest  # done: returned as it is, nothing recomputed


def test_report_of_an_evaluation_from_before_intervals(run_dir: Path) -> None:
    """scores.csv as the evaluate stage wrote it before intervals and held-out signals: the report
    shows the scores and says it cannot test differences."""
    cfg = _config()
    _upstream(run_dir)
    _write(run_dir / "evaluate" / "scores.csv", "\n".join([
        "variant,task,metric,value,primary",
        "base,sit_ifeval_local,prompt_level_strict_acc,0.25,True",
        "base,sit_ifeval_local,inst_level_strict_acc,0.3,False",
        "base,sit_mc_local,acc,0.5,True",
        "sft,sit_ifeval_local,prompt_level_strict_acc,0.5,True",
        "sft,sit_mc_local,acc,0.5,True"]) + "\n")
    manifest = run_stage(cfg, run_dir, "report")
    md = (run_dir / manifest["stats"]["report_md"]).read_text(encoding="utf-8")
    assert manifest["stats"]["winners"]["sit_ifeval_local/prompt_level_strict_acc"]["best"] == "sft"
    assert "no per-item results to compare on" in md
    assert "held-out loss per response token: not measured in this run" in md
    assert "| sft | evaluated | 0.500 | 0.500 |" in md
