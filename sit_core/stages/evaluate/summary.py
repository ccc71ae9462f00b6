"""From the per-item results to the stage's tables: every score with its uncertainty
(`scores.csv`), every pair of variants compared on the same items (`comparisons.csv`), and the
held-out details the report shows (`held_out/summary.json`, with the backend that scored each
variant's benchmarks).

A signal is (task, metric). Each has per-item values per variant where the stage has them:
lm-eval's per-document metrics, the agent's per-task successes, and the held-out signals.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from sit_core.config import SitConfig
from sit_core.stages.evaluate import held_out, stats
from sit_core.stages.evaluate.harness import ITEMS, SCORED_BY
from sit_core.stages.evaluate.lm_eval_runner import metric_rows
from sit_core.store.fileio import read_json

HELD_OUT = "held_out"
WIN_RATE = "win_rate_vs_base"
# Signals where lower is better; "" where no direction is better (answer length).
LOWER_IS_BETTER = {("held_out", "loss"), ("held_out", "perplexity")}
UNRANKED = {("answers", "mean_tokens"), ("answers", "truncated_fraction"), (WIN_RATE, "lc_win_rate")}
COMPARISON_COLUMNS = ["task", "metric", "variant_a", "variant_b", "n", "diff", "ci_low", "ci_high", "a_better_items",
                      "b_better_items", "p_value", "significant", "resolution"]


def better(task: str, metric: str) -> str:
    if (task, metric) in UNRANKED:
        return ""
    return "lower" if (task, metric) in LOWER_IS_BETTER else "higher"


def _row(variant: str, task: str, metric: str, interval: dict, primary: bool) -> dict:
    return {"variant": variant, "task": task, "metric": metric, **interval, "primary": primary,
            "better": better(task, metric)}


def summarize(cfg: SitConfig, stage_dir: Path, variants: list[str]) -> tuple[list[dict], list[dict], dict]:
    """(score rows, comparison rows, held-out details)."""
    rows: list[dict] = []
    items: dict[tuple[str, str], dict[str, list[float]]] = {}
    scored_by: dict[str, list[str]] = {}
    seed = cfg.seed
    for variant in variants:
        path = stage_dir / "lm_eval" / f"{variant}.json"
        result = read_json(path) if path.exists() else {}
        per_doc = result.get(ITEMS, {})
        if backends := sorted(set(result.get(SCORED_BY, {}).values())):
            scored_by[variant] = backends
        for r in metric_rows(variant, result):
            values = per_doc.get(r["task"], {}).get("metrics", {}).get(r["metric"])
            interval = stats.mean_interval(values, seed, r["stderr"]) if values else \
                {"value": r["value"], "stderr": r["stderr"], "ci_low": None, "ci_high": None, "n": r["n"]}
            if values and r["stderr"] is None and r["n"] is None:
                interval["n"] = len(values)
            interval["value"] = r["value"]  # lm-eval's own aggregate, whatever its aggregation
            rows.append(_row(variant, r["task"], r["metric"], interval, r["primary"]))
            if values and r["primary"]:
                items.setdefault((r["task"], r["metric"]), {})[variant] = values
        agent_path = stage_dir / "agent" / f"{variant}.json"
        if agent_path.exists():
            successes = [float(t["success"]) for t in read_json(agent_path).get("tasks", [])]
            if successes:
                rows.append(_row(variant, "agent", "success_rate", stats.mean_interval(successes, seed), True))
                items.setdefault(("agent", "success_rate"), {})[variant] = successes
    details = {**_held_out(cfg, stage_dir, variants, rows, items), "scored_by": scored_by}
    comparisons = []
    for (task, metric), per_variant in items.items():
        if (task, metric) in UNRANKED:
            continue
        for a, b in itertools.combinations([v for v in variants if v in per_variant], 2):
            if len(per_variant[a]) == len(per_variant[b]):
                comparisons.append({"task": task, "metric": metric, "variant_a": a, "variant_b": b,
                                    **stats.paired(per_variant[a], per_variant[b], seed)})
    return rows, comparisons, details


def _held_out(cfg: SitConfig, stage_dir: Path, variants: list[str], rows: list[dict], items: dict) -> dict:
    seed = cfg.seed
    signals = {v: read_json(p) for v in variants if (p := stage_dir / HELD_OUT / f"{v}.json").exists()}
    judge_path = stage_dir / held_out.JUDGE
    judged = read_json(judge_path) if judge_path.exists() else {}
    details: dict = {"variants": {}, "tie_margin": cfg.preference.min_margin}
    for variant, data in signals.items():
        info: dict = {}
        if "loss" in data and data["loss"]["values"]:
            losses = data["loss"]["values"]
            interval = stats.mean_interval(losses, seed)
            rows.append(_row(variant, "held_out", "loss", interval, True))
            rows.append(_row(variant, "held_out", "perplexity",
                             {**interval, **{k: math.exp(interval[k]) for k in ("value", "ci_low", "ci_high")},
                              "stderr": None}, False))
            items.setdefault(("held_out", "loss"), {})[variant] = losses
        if "preference" in data and data["preference"]["margins"]:
            correct = [float(m > 0) for m in data["preference"]["margins"]]
            rows.append(_row(variant, "held_out_pairs", "accuracy", stats.mean_interval(correct, seed), True))
            items.setdefault(("held_out_pairs", "accuracy"), {})[variant] = correct
        if "answers" in data:
            a = data["answers"]
            info.update(backend=a["backend"], truncated=sum(a["truncated"]), empty=sum(not t for t in a["texts"]),
                        answers=len(a["texts"]))
            rows.append(_row(variant, "answers", "mean_tokens", stats.mean_interval(a["tokens"], seed), False))
            rows.append(_row(variant, "answers", "truncated_fraction",
                             stats.mean_interval([float(t) for t in a["truncated"]], seed), False))
        details["variants"][variant] = info
    # DPO's own implicit reward, beta * (its margin - its reference's margin), against the SFT
    # adapter it started from: right when it prefers chosen by more than the reference did.
    if "dpo" in signals and "sft" in signals and "preference" in signals["dpo"] and "preference" in signals["sft"]:
        gains = [float(d - s > 0) for d, s in zip(signals["dpo"]["preference"]["margins"],
                                                   signals["sft"]["preference"]["margins"])]
        if gains:
            rows.append(_row("dpo", "held_out_pairs", "dpo_reward_accuracy", stats.mean_interval(gains, seed), False))
    if "base" in judged:
        base_tokens = signals["base"]["answers"]["tokens"]
        # Base against itself ties on every item: the reference the others are compared with.
        items.setdefault((WIN_RATE, "win_rate"), {})["base"] = [0.5] * len(judged["base"])
        rows.append(_row("base", WIN_RATE, "win_rate", stats.mean_interval([0.5] * len(judged["base"]), seed), True))
        for variant in [v for v in variants if v in judged and v != "base"]:
            results = stats.outcomes(judged[variant], judged["base"], cfg.preference.min_margin)
            rows.append(_row(variant, WIN_RATE, "win_rate", stats.mean_interval(results, seed), True))
            items.setdefault((WIN_RATE, "win_rate"), {})[variant] = results
            diffs = [t - b for t, b in zip(signals[variant]["answers"]["tokens"], base_tokens)]
            lc = stats.length_controlled(results, diffs, seed)
            if lc["value"] is not None:
                rows.append(_row(variant, WIN_RATE, "lc_win_rate", {**lc, "stderr": None}, False))
            details["variants"][variant].update(
                wins=results.count(1.0), ties=results.count(0.5), losses=results.count(0.0),
                lc_reason=lc.get("reason"), sign_test_p=stats.sign_test(results.count(1.0), results.count(0.0)))
    return details
