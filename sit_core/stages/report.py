"""Stage "report": which adaptation method did best, by how much beyond noise, and at what cost.

Reads the evaluation (`evaluate/scores.csv` with every score's interval, `comparisons.csv`
with every pair of variants compared on the same items, the held-out answers and their
summary, `agent/*.json`), the training metrics of each method (`<stage>/metrics.json`,
`log_history.json`, `curves.png`) and the data statistics and examples (the filter's stats and
removed records, the preference stage's stats, responses and chart), and writes to `report/`:

- `comparison_summary.csv`: one row per variant, every configured variant included; one
  whose training or evaluation did not run has status "missing" and empty cells; each score
  with its 95% interval;
- charts, each with labelled axes and a caption in the report: `held_out_loss.png`,
  `win_rate.png`, `scores_by_task.png`, `quality_vs_trainable_params.png`,
  `quality_vs_training_time.png`, `training_curves.png`, `preference_scores.png` (the
  preference stage's), and each stage's own curves.png copied as `curves_<stage>.png`;
- `report.md`: a five-line summary (the best variant per signal, with its interval and cost,
  or "within noise"), then the seed's outline (introduction, related work, method, setup,
  results, discussion, conclusion) filled from the data.

A variant "wins" a signal only where its paired difference to every other variant is
significant at 95% (evaluate/stats.py); otherwise the report says the difference is within
noise and gives the smallest difference the sample could have resolved.

The manifest's stats carry `tables` (summary, comparison, held_out, comparisons, filter rules,
response models), which the Prefect layer publishes as table artifacts, and `report_md` (the
report's path relative to the run directory) for its markdown artifact.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path
from typing import Any

from sit_core.config import SitConfig
from sit_core.contract import Read, Stage
from sit_core.stages import path_of
from sit_core.store.fileio import atomic_write_bytes, atomic_write_text, read_json, read_jsonl
from sit_core.store.manifest import StageRun, read_manifest

NAME = "report"
TRAINED = ("sft", "prompt_tuning", "dpo")  # each trained variant is the training stage of its name
SCORES = Read("evaluate", "scores")
COMPARISONS = Read("evaluate", "comparisons", optional=True)
HELD_OUT = Read("evaluate", "held_out", files=("*.json",), optional=True)
AGENT = Read("evaluate", "agent", files=("*.json",), optional=True)
FILTER_STATS = Read("filter", "stats", optional=True)
REMOVED = Read("filter", "removed", optional=True)
GENERATED = Read("generate", "records", optional=True)
PREFERENCE_STATS = Read("preference", "stats", optional=True)
RESPONSES = Read("preference", "responses", optional=True)
PREFERENCE_CHART = Read("preference", "histogram", optional=True, hashed=False)
METRICS = {v: Read(v, "metrics", optional=True) for v in TRAINED}
HISTORIES = {v: Read(v, "log_history", optional=True) for v in TRAINED}
CURVES = {v: Read(v, "curves", optional=True, hashed=False) for v in TRAINED}
REPORT_MD = "report.md"
TABLE = "comparison_summary.csv"
METHOD_NAMES = {"base": "Base model (no adaptation)", "sft": "LoRA SFT", "prompt_tuning": "Prompt tuning",
                "dpo": "DPO (LoRA)"}
COST_COLUMNS = ["trainable_params", "trainable_ratio_percent", "peak_memory_gb", "training_time_minutes",
                "eval_loss", "inference_tok_per_sec"]
# metrics.json key of each cost column where the names differ
METRIC_KEYS = {"inference_tok_per_sec": "inference_speed_tok_per_sec"}
MISSING = "missing"
# The signals the summary opens with, each (task, metric) of scores.csv, with its name there.
HELD_OUT_LOSS = ("held_out", "loss")
PAIR_ACCURACY = ("held_out_pairs", "accuracy")
WIN_RATE = ("win_rate_vs_base", "win_rate")
AGENT_SUCCESS = ("agent", "success_rate")
SIGNAL_NAMES = {HELD_OUT_LOSS: "held-out loss per response token", PAIR_ACCURACY: "preference accuracy on held-out pairs",
                WIN_RATE: "win rate against base", AGENT_SUCCESS: "agent success rate"}
NOISE_NOTE = ("Intervals are 95% and cover the noise of the examples only: each variant was trained once, with one "
              "seed, so how much another training run would differ is not in them.")


def fingerprint(cfg: SitConfig) -> dict:
    """The whole result-affecting config: the report describes every stage's settings."""
    return cfg.fingerprint()


def run(cfg: SitConfig, stage: StageRun) -> dict:
    run_dir = stage.run_dir
    stage.progress(0, 3)
    data = load_run_data(cfg, run_dir)
    rows = comparison_rows(cfg, data)
    csv_path = stage.dir / TABLE
    atomic_write_text(csv_path, _csv(rows))
    stage.progress(1, 3)
    charts = make_charts(cfg, data, rows, stage.dir)
    stage.progress(2, 3)
    md_path = stage.dir / REPORT_MD
    verdicts = all_verdicts(cfg, data)
    summary = summary_lines(cfg, data, rows, verdicts)
    atomic_write_text(md_path, render_markdown(cfg, data, rows, charts, verdicts, summary))
    tables = {"summary": [{"signal": line} for line in summary], "comparison": rows,
              "held_out": held_out_table(cfg, data), "comparisons": data["comparisons"],
              "filter_rules": filter_table(data["filter"]), "response_models": response_model_table(data["preference"])}
    stats = {"tables": {k: v for k, v in tables.items() if v}, "report_md": md_path.relative_to(run_dir).as_posix(),
             "winners": {f"{t}/{m}": v for (t, m), v in verdicts.items()}, "charts": [c.name for c in charts],
             "missing": [r["variant"] for r in rows if r["status"] == MISSING]}
    return stage.finish([csv_path, md_path, *charts], stats)


# ---------------------------------------------------------------------------------------
# Reading


def _read_optional(path: Path) -> dict:
    """An upstream JSON file that may legitimately be absent; unreadable counts as absent."""
    try:
        data = read_json(path)
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _records(path: Path) -> list[dict]:
    try:
        return read_jsonl(path) if path.exists() else []
    except ValueError:
        return []


def load_run_data(cfg: SitConfig, run_dir: Path) -> dict:
    """Everything the report shows. A run from before the intervals and held-out signals has
    scores.csv without interval columns and no comparisons: those cells stay empty."""
    run_dir = Path(run_dir)
    scores: dict[str, dict[str, float]] = {}
    signals: dict[tuple[str, str], dict[str, dict]] = {}
    primary: dict[str, str] = {}
    for row in _read_rows(path_of(run_dir, SCORES)):
        entry = {k: _number(row.get(k)) for k in ("value", "stderr", "ci_low", "ci_high", "n")}
        entry["better"] = row.get("better", "higher")
        signals.setdefault((row["task"], row["metric"]), {})[row["variant"]] = entry
        if row.get("primary", "True").lower() == "true" and row["task"] in cfg.evaluation.tasks:
            scores.setdefault(row["variant"], {})[row["task"]] = float(row["value"])
            primary[row["task"]] = row["metric"]
    comparisons = []
    for row in _read_rows(path_of(run_dir, COMPARISONS)):
        comparisons.append({**row, **{k: _number(row[k]) for k in ("diff", "ci_low", "ci_high", "p_value", "resolution")},
                            **{k: int(row[k]) for k in ("n", "a_better_items", "b_better_items")},
                            "significant": row["significant"].lower() == "true"})
    held = path_of(run_dir, HELD_OUT)
    agent = {}
    for variant in cfg.evaluation.variants:
        summary = _read_optional(path_of(run_dir, AGENT) / f"{variant}.json").get("summary")
        if summary:
            agent[variant] = summary
    training = {v: _read_optional(path_of(run_dir, METRICS[v])) for v in TRAINED}
    histories = {}
    for variant in TRAINED:
        path = path_of(run_dir, HISTORIES[variant])
        if path.exists():
            try:
                history = read_json(path)
            except ValueError:
                continue
            if isinstance(history, list):
                histories[variant] = history
    curves = {v: path_of(run_dir, CURVES[v]) for v in TRAINED if path_of(run_dir, CURVES[v]).exists()}
    generated = {r.get("id"): r for r in _records(path_of(run_dir, GENERATED))}
    removed = [{**generated.get(r.get("id"), {}), **r} for r in _records(path_of(run_dir, REMOVED))]
    return {"scores": scores, "signals": signals, "primary": primary, "comparisons": comparisons, "agent": agent, "training": training,
            "histories": histories, "curves": curves,
            "held_out": _read_optional(held / "summary.json"),
            "answers": {v: _read_optional(held / f"{v}.json").get("answers") for v in cfg.evaluation.variants},
            "filter": _read_optional(path_of(run_dir, FILTER_STATS)), "removed": removed,
            "preference": _read_optional(path_of(run_dir, PREFERENCE_STATS)),
            "responses": _records(path_of(run_dir, RESPONSES)),
            "preference_chart": path_of(run_dir, PREFERENCE_CHART),
            "evaluate": (read_manifest(run_dir, SCORES.stage) or {}).get("stats", {})}


# ---------------------------------------------------------------------------------------
# The comparison table


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def comparison_rows(cfg: SitConfig, data: dict) -> list[dict]:
    """One row per configured variant, in the configured order: each task's primary metric and
    each held-out signal with its 95% interval, and the method's cost. The base model has no
    training cost; a variant without scores is missing."""
    rows = []
    signals = [(t, None) for t in cfg.evaluation.tasks] + [
        (HELD_OUT_LOSS, "held_out_loss"), (PAIR_ACCURACY, "pair_accuracy"), (WIN_RATE, "win_rate"),
        (("win_rate_vs_base", "lc_win_rate"), "lc_win_rate"), (("answers", "mean_tokens"), "answer_tokens"),
        (AGENT_SUCCESS, "agent_success_rate")]
    for variant in cfg.evaluation.variants:
        scores = data["scores"].get(variant, {})
        agent = data["agent"].get(variant, {})
        evaluated = bool(scores) or bool(agent) or any(variant in v for v in data["signals"].values())
        row: dict[str, Any] = {"variant": variant, "method": METHOD_NAMES[variant],
                               "status": "evaluated" if evaluated else MISSING}
        for key, column in signals:
            if column is None:  # an lm-eval task: its primary metric
                entry = _task_entry(data, key, variant)
                column = key
            else:
                entry = data["signals"].get(key, {}).get(variant, {})
            row[column] = entry.get("value") if entry else (scores.get(key) if isinstance(key, str) else None)
            row[f"{column}_ci_low"], row[f"{column}_ci_high"] = entry.get("ci_low"), entry.get("ci_high")
        if row["agent_success_rate"] is None:
            row["agent_success_rate"] = _number(agent.get("success_rate"))
        row["mean_score"] = sum(scores.values()) / len(scores) if scores else None
        row["agent_valid_call_rate"] = _number(agent.get("valid_call_rate"))
        metrics = data["training"].get(variant, {})
        for column in COST_COLUMNS:
            value = _number(metrics.get(METRIC_KEYS.get(column, column)))
            if variant == "base" and column in ("trainable_params", "trainable_ratio_percent", "training_time_minutes"):
                value = 0
            row[column] = int(value) if column == "trainable_params" and value is not None else value
        rows.append(row)
    return rows


def _task_entry(data: dict, task: str, variant: str) -> dict:
    """The primary metric's entry of an lm-eval task for a variant ({} when not scored)."""
    metric = primary_metric(data, task)
    return data["signals"].get((task, metric), {}).get(variant, {}) if metric else {}


def primary_metric(data: dict, task: str) -> str | None:
    return data["primary"].get(task)


def _columns(rows: list[dict]) -> list[str]:
    return list(rows[0]) if rows else ["variant", "status"]


def _csv(rows: list[dict]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Verdicts: a winner only where the paired differences say so


def all_verdicts(cfg: SitConfig, data: dict) -> dict[tuple[str, str], dict]:
    """A verdict for every ranked signal some variant has a value for."""
    keys = [(t, primary_metric(data, t)) for t in cfg.evaluation.tasks]
    keys += [HELD_OUT_LOSS, PAIR_ACCURACY, WIN_RATE, AGENT_SUCCESS]
    return {k: v for k in keys if k[1] and (v := verdict(data, k))}


def verdict(data: dict, key: tuple[str, str]) -> dict | None:
    """The best variant by its point estimate; it is the winner only if its paired difference to
    every other variant is significant at 95%. Otherwise the difference is within noise, and the
    verdict carries the smallest difference the items could have resolved."""
    per_variant = {v: e for v, e in data["signals"].get(key, {}).items() if e.get("value") is not None}
    if not per_variant:
        return None
    lower = next(iter(per_variant.values())).get("better") == "lower"
    ranked = sorted(per_variant, key=lambda v: per_variant[v]["value"], reverse=not lower)
    best = ranked[0]
    out = {"best": best, "value": per_variant[best]["value"], "ci_low": per_variant[best].get("ci_low"),
           "ci_high": per_variant[best].get("ci_high"), "lower_is_better": lower, "significant": False,
           "against": {}}
    tests = {}
    for c in data["comparisons"]:
        if (c["task"], c["metric"]) == key and best in (c["variant_a"], c["variant_b"]):
            other = c["variant_b"] if c["variant_a"] == best else c["variant_a"]
            sign = 1 if c["variant_a"] == best else -1
            tests[other] = {**c, "diff": sign * c["diff"] if c["diff"] is not None else None}
    others = [v for v in ranked[1:]]
    if not others:
        out["reason"] = "only one variant was scored"
        return out
    if any(v not in tests for v in others):
        out["reason"] = "no per-item results to compare on (an evaluation from before paired comparisons)"
        return out
    out["against"] = tests
    ahead = [v for v in others if tests[v]["significant"] and ((tests[v]["diff"] < 0) if lower else (tests[v]["diff"] > 0))]
    out["significant"] = len(ahead) == len(others)
    out["beaten"] = ahead  # behind the best beyond noise
    out["level"] = [v for v in others if v not in ahead]  # within noise of the best
    runner_up = (out["level"] or others)[0]
    out["runner_up"] = runner_up
    out["margin"] = tests[runner_up]["diff"]
    out["resolution"] = tests[runner_up]["resolution"]
    out["n"] = tests[runner_up]["n"]
    return out


def _fmt_diff(value: float | None) -> str:
    """A difference, with two significant digits where three decimals would show 0.000."""
    return f"{value:.2g}" if value is not None and 0 < abs(value) < 0.005 else _fmt(value)


def verdict_text(key: tuple[str, str], v: dict) -> str:
    """One sentence: the winner with its interval and its margin, or why there is none."""
    value = f"{_fmt(v['value'])} [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}]" if v.get("ci_low") is not None \
        else _fmt(v["value"])
    if v["significant"]:
        return (f"**{v['best']}** wins ({value}); it beats every other variant beyond noise, by "
                f"{_fmt_diff(abs(v['margin']))} or more (paired, n={v['n']})")
    if "reason" in v:
        return f"best point estimate: {v['best']} ({value}); no winner: {v['reason']}"
    resolvable = (f"the smallest difference {v['n']} items could resolve is {_fmt_diff(v['resolution'])}"
                  if v["resolution"] is not None else
                  f"{v['n']} items are too few for any difference to be significant")
    level = ", ".join([v["best"], *v["level"]])
    text = (f"within noise among {level}: {v['best']} has the best point estimate ({value}), "
            f"{_fmt_diff(abs(v['margin']))} from {v['runner_up']}; {resolvable}")
    if v["beaten"]:
        text += f"; {v['best']} is ahead of {', '.join(v['beaten'])} beyond noise"
    return text


# ---------------------------------------------------------------------------------------
# Summary and tables


def _cost(row: dict | None) -> str:
    if not row:
        return "cost unknown"
    if row["variant"] == "base":
        return "no training"
    parts = []
    if row["trainable_params"] is not None:
        parts.append(f"{_fmt(row['trainable_params'])} trainable parameters")
    if row["training_time_minutes"] is not None:
        parts.append(f"{_fmt(row['training_time_minutes'], 1)} min of training")
    return ", ".join(parts) or "cost unknown"


def summary_lines(cfg: SitConfig, data: dict, rows: list[dict], verdicts: dict) -> list[str]:
    """Five lines: held-out loss, preference accuracy, win rate, the benchmarks, the agent."""
    by_variant = {r["variant"]: r for r in rows}
    lines = []
    for key in (HELD_OUT_LOSS, PAIR_ACCURACY, WIN_RATE):
        v = verdicts.get(key)
        lines.append(f"{SIGNAL_NAMES[key]}: " + (f"{verdict_text(key, v)}; cost of {v['best']}: "
                                                 f"{_cost(by_variant.get(v['best']))}" if v else "not measured in this run"))
    tasks = [(t, verdicts[(t, m)]) for t in cfg.evaluation.tasks if (m := primary_metric(data, t)) and (t, m) in verdicts]
    won = [f"`{t}` {v['best']}" for t, v in tasks if v["significant"]]
    lines.append("benchmarks: " + (("; ".join(f"`{t}`: {verdict_text((t, ''), v)}" for t, v in tasks)
                                    if won else "no variant beats the others beyond noise on any of "
                                    + ", ".join(f"`{t}`" for t, _ in tasks)
                                    + f" ({_task_n(data, tasks)} examples per task)") if tasks else "not measured"))
    v = verdicts.get(AGENT_SUCCESS)
    lines.append(f"{SIGNAL_NAMES[AGENT_SUCCESS]}: " + (verdict_text(AGENT_SUCCESS, v) if v else "not measured"))
    return lines


def _task_n(data: dict, tasks: list) -> str:
    ns = sorted({int(v["n"]) for _, v in tasks if v.get("n")})
    return "/".join(str(n) for n in ns) or "?"


def held_out_table(cfg: SitConfig, data: dict) -> list[dict]:
    """Per variant: every held-out signal with its interval, wins/ties/losses against base, the
    answers' length and truncation, and the backend that wrote them."""
    details = data["held_out"].get("variants", {})
    out = []
    for variant in cfg.evaluation.variants:
        sig = {k: e.get(variant) for k, e in data["signals"].items()}
        if not any(sig.values()):
            continue
        d = details.get(variant, {})

        def cell(key, digits=3):
            e = sig.get(key)
            return _interval(e, digits) if e else "—"

        out.append({
            "variant": variant, "held-out loss": cell(HELD_OUT_LOSS), "perplexity": cell(("held_out", "perplexity"), 2),
            "pair accuracy": cell(PAIR_ACCURACY),
            "DPO reward accuracy": cell(("held_out_pairs", "dpo_reward_accuracy")),
            "win rate vs base": "reference" if variant == "base" else cell(WIN_RATE),
            "wins / ties / losses": (f"{d['wins']} / {d['ties']} / {d['losses']}" if "wins" in d else "—"),
            "length-controlled": ("—" if variant == "base" else cell(("win_rate_vs_base", "lc_win_rate"))
                                  if sig.get(("win_rate_vs_base", "lc_win_rate")) else d.get("lc_reason") or "—"),
            "mean answer tokens": cell(("answers", "mean_tokens"), 1),
            "truncated": f"{d['truncated']} of {d['answers']}" if "answers" in d else "—",
            "answered by": d.get("backend", "—"),
        })
    return out


def filter_table(stats: dict) -> list[dict]:
    """Each rule: records it flags, and records it removed as their first failing rule."""
    return [{"rule": r.get("rule"), "flagged": r.get("flagged"),
             "removed (first failing rule)": r.get("removed (first failing rule)")}
            for r in stats.get("tables", {}).get("rule_statistics", [])]


def response_model_table(stats: dict) -> list[dict]:
    """Per response model: its reward scores and how often its answer was chosen or rejected."""
    out = []
    for name, s in (stats.get("score_summary") or {}).items():
        out.append({"response model": name, "responses": s.get("count"), "mean score": s.get("mean"),
                    "min": s.get("min"), "max": s.get("max"),
                    "chosen": (stats.get("wins_per_model") or {}).get(name),
                    "rejected": (stats.get("losses_per_model") or {}).get(name)})
    return out


# ---------------------------------------------------------------------------------------
# Charts

CAPTIONS = {
    "held_out_loss.png": "Each variant's mean loss per response token on the held-out instructions minus base's, "
                         "paired per instruction, with its 95% paired-bootstrap interval; green where the difference "
                         "is significant. Below zero: the variant finds the held-out responses more likely than base does.",
    "win_rate.png": "Each variant's answers to the held-out instructions against base's, judged by the pipeline's "
                    "reward scorer: the share of wins, ties and losses. A tie is a score difference below the "
                    "preference stage's minimum margin.",
    "scores_by_task.png": "Each benchmark's primary metric per variant, with 95% intervals (lm-eval's standard error "
                          "where it gives one, a bootstrap over examples otherwise).",
    "quality_vs_trainable_params.png": "Mean benchmark score against the number of trained parameters "
                                       "(log scale; the base model trains none and is drawn at 1).",
    "quality_vs_training_time.png": "Mean benchmark score against the wall time each method trained.",
    "training_curves.png": "Training loss (solid) and validation loss (dashed) of each training stage by optimizer step.",
    "preference_scores.png": "Left: reward scores of each response model's answers. Right: per instruction, the best "
                             "minus the worst score, with the minimum margin a pair needs (red).",
}


def _caption(name: str) -> str:
    if name.startswith("curves_"):
        return f"The {name[len('curves_'):-len('.png')]} stage's own training and validation loss by step."
    return CAPTIONS.get(name, "")


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _errors(entries: list[dict]) -> list[list[float]] | None:
    """Matplotlib's asymmetric error bars from entries with value and interval."""
    if not all(e.get("ci_low") is not None for e in entries):
        return None
    return [[e["value"] - e["ci_low"] for e in entries], [e["ci_high"] - e["value"] for e in entries]]


def versus_base(data: dict, key: tuple[str, str]) -> dict[str, dict]:
    """Each variant's paired difference to base on a signal (variant minus base), with its
    interval and significance, from the evaluate stage's comparisons."""
    out = {}
    for c in data["comparisons"]:
        if (c["task"], c["metric"]) == key and "base" in (c["variant_a"], c["variant_b"]) and c["diff"] is not None:
            sign, other = (-1, c["variant_b"]) if c["variant_a"] == "base" else (1, c["variant_a"])
            low, high = sorted((sign * c["ci_low"], sign * c["ci_high"]))
            out[other] = {"value": sign * c["diff"], "ci_low": low, "ci_high": high, "significant": c["significant"]}
    return out


def make_charts(cfg: SitConfig, data: dict, rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and in Colab workers
    import matplotlib.pyplot as plt

    charts = []
    evaluated = [r for r in rows if r["status"] != MISSING]

    against_base = versus_base(data, HELD_OUT_LOSS)
    if against_base:
        names = [v for v in cfg.evaluation.variants if v in against_base]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(names, [against_base[v]["value"] for v in names], yerr=_errors([against_base[v] for v in names]),
               capsize=6, color=["tab:green" if against_base[v]["significant"] else "tab:gray" for v in names])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("variant")
        ax.set_ylabel("held-out loss minus base's (nats per token)")
        ax.set_title("Held-out loss against base, paired per instruction")
        charts.append(_save(fig, out_dir / "held_out_loss.png"))
        plt.close(fig)

    details = data["held_out"].get("variants", {})
    judged = [v for v in cfg.evaluation.variants if "wins" in details.get(v, {})]
    if judged:
        fig, ax = plt.subplots(figsize=(6, 4))
        bottom = [0.0] * len(judged)
        for outcome, color in (("wins", "tab:green"), ("ties", "tab:gray"), ("losses", "tab:red")):
            shares = [details[v][outcome] / max(1, details[v]["answers"]) for v in judged]
            ax.bar(judged, shares, bottom=bottom, label=outcome, color=color)
            bottom = [b + x for b, x in zip(bottom, shares)]
        ax.set_ylim(0, 1)
        ax.set_xlabel("variant")
        ax.set_ylabel("share of held-out instructions")
        ax.set_title("Answers against base's")
        ax.legend()
        charts.append(_save(fig, out_dir / "win_rate.png"))
        plt.close(fig)

    tasks = list(cfg.evaluation.tasks)
    if any(r.get(t) is not None for r in evaluated for t in tasks):
        fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(tasks) + 2), 4))
        width = 0.8 / max(1, len(evaluated))
        for i, row in enumerate(evaluated):
            entries = [{"value": row.get(t) or 0.0, "ci_low": row.get(f"{t}_ci_low"), "ci_high": row.get(f"{t}_ci_high")}
                       for t in tasks]
            ax.bar([t + i * width for t in range(len(tasks))], [e["value"] for e in entries], width,
                   yerr=_errors(entries), capsize=3, label=row["variant"])
        ax.set_xticks([t + width * (len(evaluated) - 1) / 2 for t in range(len(tasks))], tasks, rotation=15)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("task")
        ax.set_ylabel("score (primary metric)")
        ax.set_title("Benchmark scores by variant")
        ax.legend()
        charts.append(_save(fig, out_dir / "scores_by_task.png"))
        plt.close(fig)

    for column, name, label, log in [
        ("trainable_params", "quality_vs_trainable_params.png", "trainable parameters", True),
        ("training_time_minutes", "quality_vs_training_time.png", "training time (minutes)", False),
    ]:
        points = [(r[column], r["mean_score"], r["variant"]) for r in evaluated
                  if r.get(column) is not None and r.get("mean_score") is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for x, y, variant in points:
            # log axes cannot show the base model's 0, so it sits at 1 and says so in its label
            shown = max(x, 1) if log else x
            ax.scatter([shown], [y], s=60)
            ax.annotate(variant + (" (0)" if log and x == 0 else ""), (shown, y),
                        textcoords="offset points", xytext=(5, 5))
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("mean benchmark score")
        ax.set_title(f"Quality vs {label}")
        charts.append(_save(fig, out_dir / name))
        plt.close(fig)

    if data["histories"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for variant, history in data["histories"].items():
            for key, style in (("loss", "-"), ("eval_loss", "--")):
                points = [(h["step"], h[key]) for h in history if isinstance(h, dict) and "step" in h and key in h]
                if points:
                    ax.plot(*zip(*points), style, marker=".", label=f"{variant} {key}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title("Training curves")
        ax.legend()
        charts.append(_save(fig, out_dir / "training_curves.png"))
        plt.close(fig)
    copies = {f"curves_{v}.png": path for v, path in data["curves"].items()}
    if data["preference_chart"].exists():
        copies["preference_scores.png"] = data["preference_chart"]
    for name, path in copies.items():
        shutil.copyfile(path, out_dir / name)
        charts.append(out_dir / name)
    return charts


# ---------------------------------------------------------------------------------------
# report.md


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 100):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _interval(entry: dict | None, digits: int = 3) -> str:
    """"value [low, high]", or the value alone where there is no interval."""
    if not entry or entry.get("value") is None:
        return "—"
    if entry.get("ci_low") is None:
        return _fmt(entry["value"], digits)
    return f"{_fmt(entry['value'], digits)} [{_fmt(entry['ci_low'], digits)}, {_fmt(entry['ci_high'], digits)}]"


def _table(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _dict_table(rows: list[dict]) -> str:
    return _table(list(rows[0]), [list(r.values()) for r in rows]) if rows else ""


def _excerpt(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return "> " + (text if len(text) <= limit else text[:limit].rstrip() + " …")


def _refuses(text: str, keywords: list[str]) -> bool:
    folded = str(text).lower().replace("’", "'")
    return any(k.lower().replace("’", "'") in folded for k in keywords)


def data_quality(cfg: SitConfig, data: dict) -> list[str]:
    """Truncated, empty and refusing texts in the data and the held-out answers: a count, and one
    example of each."""
    out = []
    keywords = cfg.filter.refusal_keywords

    def call_out(what: str, items: list[dict], total: int, text_key: str, detail: str) -> None:
        line = f"- **{what}**: {len(items)} of {total}"
        if items:
            out.append(line + f" {detail}. One of them:")
            out.append("")
            out.append("  " + _excerpt(items[0].get(text_key, "") or "(empty)"))
        else:
            out.append(line + ".")

    refusals = [r for r in data["removed"] if "refusal" in r.get("rules", [])]
    if data["filter"]:
        call_out("Refusals in the generated records", refusals, data["filter"].get("input", 0), "response",
                 "were flagged by the refusal rule and removed")
    responses = data["responses"]
    if responses:
        limit = cfg.preference.max_new_tokens
        call_out("Truncated preference responses", [r for r in responses if r.get("truncated")], len(responses),
                 "response", f"stopped at preference.max_new_tokens ({limit}) before the model ended its turn; "
                             "the reward scorer judged them cut off")
        call_out("Empty preference responses", [r for r in responses if not str(r.get("response", "")).strip()],
                 len(responses), "response", "were empty")
        call_out("Refusing preference responses", [r for r in responses if _refuses(r.get("response", ""), keywords)],
                 len(responses), "response", "contain a refusal phrase of filter.refusal_keywords")
    for variant, answers in data["answers"].items():
        if not answers:
            continue
        texts = [{"response": t} for t in answers["texts"]]
        n = len(texts)
        trunc = [t for t, cut in zip(texts, answers["truncated"]) if cut]
        empty = [t for t in texts if not t["response"]]
        refusing = [t for t in texts if _refuses(t["response"], keywords)]
        counts = f"{len(trunc)} truncated, {len(empty)} empty, {len(refusing)} refusing of {n}"
        example = next((x for x in (trunc, empty, refusing) if x), None)
        out.append(f"- **Held-out answers of {variant}**: {counts}" + (". One of them:" if example else "."))
        if example:
            out += ["", "  " + _excerpt(example[0]["response"] or "(empty)")]
    return out


def render_markdown(cfg: SitConfig, data: dict, rows: list[dict], charts: list[Path], verdicts: dict,
                    summary: list[str]) -> str:
    tasks = list(cfg.evaluation.tasks)
    t = cfg.training
    missing = [r["variant"] for r in rows if r["status"] == MISSING]
    limit = cfg.evaluation.limit
    held = data["held_out"]
    out = [f"# Synthetic Instruction Tuner — comparative report (`{cfg.run_name}`)", "", "## Summary", ""]
    out += [f"{i}. {line}" for i, line in enumerate(summary, 1)]
    out += ["", f"*{NOISE_NOTE}*", ""]

    out += ["## 1. Introduction", "",
            "This run builds an instruction-tuning data set synthetically and compares adaptation methods on "
            f"`{cfg.models.target}`: LoRA supervised fine-tuning, prompt tuning and DPO on preference pairs, "
            "against the unadapted base model. The question is which method does best, and at what cost.", ""]

    out += ["## 2. Related work", "",
            "- **Magpie** (Xu et al., 2024): instructions are sampled from an aligned model by giving it only the "
            "pre-query part of its chat template; the model then answers its own instruction.",
            "- **LoRA** (Hu et al., 2021): trains low-rank updates of the attention and MLP weights; the base stays frozen.",
            "- **Prompt tuning** (Lester et al., 2021): trains only a few virtual token embeddings prepended to the input.",
            "- **DPO** (Rafailov et al., 2023): optimizes the policy directly on chosen/rejected pairs, with no "
            "separate reward model during training.",
            "- **AlpacaEval 2** (Dubois et al., 2024): win rates against a reference model's answers, judged by a model, "
            "with a length-controlled variant because judges favour longer answers.", ""]

    out += ["## 3. Method", "",
            f"1. Generation: Magpie with `{cfg.models.generator}`, {cfg.generation.num_samples} samples requested.",
            f"2. Quality filter to {cfg.filter.target_count}: {cfg.filter.length.min}–{cfg.filter.length.max} words, "
            f"at most {cfg.filter.repetition.max_repeat} repeats, Jaccard near-duplicates ≥ "
            f"{cfg.filter.diversity.jaccard_threshold}, refusal phrases, language `{cfg.filter.language}`.",
            f"3. Preference pairs: {cfg.preference.num_pairs} requested, responses from "
            + ", ".join(f"`{m.name}`" for m in cfg.models.response_models)
            + f", scored by `{cfg.models.reward_model}` ({cfg.models.reward_type}); minimum margin "
            f"{cfg.preference.min_margin}.",
            "4. Training: LoRA SFT, prompt tuning and DPO (LoRA, from the SFT adapter) on the target model; SFT and "
            "prompt tuning learn " + ("the responses only (the instruction's tokens carry no loss)."
                                      if t.completion_only_loss else "the whole conversation, instruction included."),
            "5. Evaluation on data no training stage learned from: the loss of every variant on the held-out "
            "instructions' responses (SFT's validation split); on held-out preference pairs (DPO's validation split) "
            "how often the variant's log-probability prefers the chosen response; and a win rate against the base "
            "model, where every variant answers the held-out instructions with the same settings and "
            f"`{cfg.models.reward_model}` scores each answer against base's. Then lm-evaluation-harness on "
            + ", ".join(f"`{x}`" for x in tasks) + (f" (limit {limit} examples per task)" if limit else "")
            + (f" and an agent evaluation with {cfg.evaluation.agent.num_tasks} tool-use tasks, at most "
               f"{cfg.evaluation.agent.max_steps} steps each" if cfg.evaluation.agent.enabled else "") + ".",
            "6. Uncertainty: every score carries a 95% interval; variants are compared on the same items (paired "
            "bootstrap and sign test), and a variant is called the winner only where that difference is significant.",
            ""]
    if data["filter"]:
        f = data["filter"]
        out += ["### Filter statistics", "",
                f"{f.get('input', '—')} generated records, {f.get('survivors', '—')} passed every rule, "
                f"{f.get('kept', '—')} kept (filter.target_count {cfg.filter.target_count}).", ""]
        if rules := filter_table(f):
            out += [_dict_table(rules), ""]
        overlaps = f.get("overlaps") or {}
        out += ["Records flagged by more than one rule: " + (", ".join(f"{k.replace('+', ' and ')}: {v}"
                                                                        for k, v in overlaps.items())
                                                              if overlaps else "none") + ".", ""]
    out += ["### Preference data statistics", ""]
    p = data["preference"]
    if p:
        sel = p.get("selected_margins") or {}
        out += [f"{p.get('responses', '—')} responses to {p.get('instructions', '—')} instructions; "
                f"{p.get('qualifying_pairs', '—')} instructions had a pair with a margin of at least "
                f"{p.get('min_margin', cfg.preference.min_margin)}, {p.get('pairs', '—')} pairs kept "
                f"(target {p.get('target_pairs', cfg.preference.num_pairs)}). Margins of the kept pairs: "
                f"min {_fmt(sel.get('min'))}, median {_fmt(sel.get('median'))}, max {_fmt(sel.get('max'))}.", ""]
        if models := response_model_table(p):
            out += [_dict_table(models), ""]
    else:
        out += ["No preference statistics in this run.", ""]
    if quality := data_quality(cfg, data):
        out += ["### Truncation, empty answers and refusals", "", *quality, ""]

    out += ["## 4. Experimental setup", "",
            _table(["setting", "value"], [
                ["target model", cfg.models.target], ["hardware profile", cfg.profile], ["seed", cfg.seed],
                ["LoRA r / alpha / dropout", f"{t.lora_r} / {t.lora_alpha} / {t.lora_dropout}"],
                ["LoRA target modules", ", ".join(t.lora_target_modules)],
                ["SFT epochs / lr / batch x GA", f"{_fmt(t.sft_epochs)} / {t.sft_learning_rate:g} / "
                                               f"{t.sft_batch_size} x {t.gradient_accumulation_steps}"],
                ["SFT / prompt tuning loss on", "responses only" if t.completion_only_loss else "whole sequence"],
                ["prompt tuning virtual tokens / init / lr", f"{t.prompt_tuning_virtual_tokens} / "
                                                            f"{t.prompt_tuning_init} / {t.prompt_tuning_learning_rate:g}"],
                ["DPO beta / epochs / lr", f"{t.dpo_beta} / {_fmt(t.dpo_epochs)} / {t.dpo_learning_rate:g}"],
                ["max steps per method", "epochs decide" if t.max_steps < 0 else t.max_steps],
                ["held-out instructions / preference pairs", f"{held.get('instructions', '—')} / {held.get('pairs', '—')}"],
                ["held-out answers: temperature / top-p / max new tokens",
                 f"{cfg.generation.response_temperature:g} / {cfg.generation.response_top_p:g} / "
                 f"{cfg.evaluation.answer_max_tokens or cfg.preference.max_new_tokens}"],
                ["win / tie threshold (score difference)", f"{cfg.preference.min_margin:g}"],
                ["precision", t.precision], ["evaluation tasks", ", ".join(tasks)],
                ["examples per task", limit or "all"],
            ]), ""]

    out += ["## 5. Results", ""]
    if ho := held_out_table(cfg, data):
        out += ["### Held-out signals", "", _dict_table(ho), "",
                "Loss: mean negative log-likelihood per response token (perplexity is its exponential). Pair "
                "accuracy: share of held-out pairs where the variant gives the chosen response the higher "
                "log-probability. DPO reward accuracy: the same for DPO's implicit reward, its margin minus its "
                "reference's (the SFT adapter's). Win rate: (wins + ties / 2) / answers against base. Judges favour "
                "longer answers, so the mean answer length stands beside it, and the length-controlled win rate "
                "(a logistic regression on the length difference, read at equal length, as AlpacaEval 2 does) "
                "where it can be fitted.", ""]
        backends = {r["answered by"] for r in ho if r["answered by"] != "—"}
        if len(backends) > 1:
            out += ["The variants could not all answer through one backend: the column *answered by* names each "
                    "one's. The sampling settings were the same for all.", ""]
        if cfg.models.reward_model == cfg.models.target or cfg.models.reward_type == "llm_judge":
            out += [f"The judge here is `{cfg.models.reward_model}`"
                    + (", the target model itself, judging answers of models trained on its own outputs: ties and "
                       "differences within noise are an honest outcome, not a failure of the comparison."
                       if cfg.models.reward_model == cfg.models.target else
                       ", a chat model asked a yes/no question; a weak judge at small sizes.") , ""]
    scored_by = data["held_out"].get("scored_by", {})
    out += ["### Benchmarks", "",
            _table(["variant", "status", *tasks, "agent success", "agent valid calls", "scored by"],
                   [[r["variant"], r["status"], *(_interval({"value": r[x], "ci_low": r.get(f"{x}_ci_low"),
                                                             "ci_high": r.get(f"{x}_ci_high")}) for x in tasks),
                     _interval({"value": r["agent_success_rate"], "ci_low": r.get("agent_success_rate_ci_low"),
                                "ci_high": r.get("agent_success_rate_ci_high")}), r["agent_valid_call_rate"],
                     "; ".join(scored_by.get(r["variant"], [])) or "—"]
                    for r in rows]), ""]
    if len({tuple(b) for b in scored_by.values()}) > 1:
        out += ["The benchmarks were not all scored through one backend (vLLM runs no soft prompts, so prompt "
                "tuning is scored on transformers): *scored by* names each variant's. The backends' numerics "
                "differ slightly, so small differences between variants on different backends are not "
                "evidence.", ""]
    out += ["### Winner per signal", "", "A variant wins only where it beats every other one beyond noise on the "
            "same items (paired bootstrap and sign test, 95%).", ""]
    for key, v in verdicts.items():
        out.append(f"- {SIGNAL_NAMES.get(key, f'`{key[0]}` ({key[1]})')}: {verdict_text(key, v)}")
    if not verdicts:
        out.append("- no variant was scored")
    out.append("")
    if data["comparisons"]:
        body = []
        for c in data["comparisons"]:
            body.append([f"{c['task']} / {c['metric']}", f"{c['variant_a']} − {c['variant_b']}", c["n"],
                         _interval({"value": c["diff"], "ci_low": c["ci_low"], "ci_high": c["ci_high"]}),
                         f"{c['a_better_items']} / {c['b_better_items']}", _fmt(c["p_value"]),
                         "yes" if c["significant"] else "no", c["resolution"]])
        out += ["### Paired comparisons", "",
                _table(["signal", "difference", "items", "mean difference [95%]", "items better (a / b)",
                        "sign test p", "significant", "smallest resolvable"], body), ""]
    out += ["### Cost of each method", "",
            _table(["variant", "trainable params", "trainable %", "peak memory (GB)", "training time (min)",
                    "eval loss", "inference tok/s"],
                   [[r["variant"], *(r[c] for c in COST_COLUMNS)] for r in rows]), ""]
    if data["agent"]:
        out += ["### Agent evaluation", "",
                _table(["variant", "success rate", "valid-call rate", "mean steps", "answer rate"],
                       [[v, s.get("success_rate"), s.get("valid_call_rate"), s.get("mean_steps"), s.get("answer_rate")]
                        for v, s in data["agent"].items()]), ""]
    if charts:
        out += ["### Charts", ""]
        for i, c in enumerate(charts, 1):
            out += [f"![{c.stem.replace('_', ' ')}]({c.name})", "", f"*Figure {i}: {_caption(c.name)}*", ""]

    out += ["## 6. Discussion", ""]
    out += _discussion(rows, verdicts, missing, limit)
    out.append("")
    out += ["## 7. Conclusion", ""]
    out += _conclusion(verdicts)
    out.append("")
    return "\n".join(out)


def _discussion(rows: list[dict], verdicts: dict, missing: list[str], limit: int | None) -> list[str]:
    lines = []
    for r in (r for r in rows if r["variant"] != "base" and r["status"] != MISSING):
        parts = [f"- **{r['method']}**:"]
        if r.get("held_out_loss") is not None:
            parts.append(f"held-out loss {_fmt(r['held_out_loss'])}")
        if r.get("win_rate") is not None:
            parts.append(f"win rate against base {_fmt(r['win_rate'])}")
        if r.get("mean_score") is not None:
            parts.append(f"mean benchmark score {_fmt(r['mean_score'])}")
        lines.append(" ".join(parts[:1]) + " " + ", ".join(parts[1:]) + f"; cost: {_cost(r)}.")
    within = [SIGNAL_NAMES.get(k, k[0]) for k, v in verdicts.items() if not v["significant"]]
    if within:
        lines.append("- Within noise, so no winner is claimed: " + ", ".join(within) + ". More examples (a larger "
                     "training.validation_size, more preference pairs, evaluation.limit unset) narrow the intervals.")
    if missing:
        lines.append(f"- Not evaluated (its training stage did not produce a model): {', '.join(missing)}. "
                     "These rows are empty rather than left out.")
    if limit:
        lines.append(f"- Each benchmark was scored on at most {limit} examples.")
    lines.append(f"- {NOISE_NOTE}")
    lines.append("- Synthetic data inherits the generator's style and errors; the reward model's preferences "
                 "decide what DPO learns, and small preference sets limit how far DPO can move the model.")
    return lines


def _conclusion(verdicts: dict) -> list[str]:
    if not verdicts:
        return ["No variant produced scores in this run."]
    lines = []
    for key, v in verdicts.items():
        name = SIGNAL_NAMES.get(key, f"`{key[0]}`")
        if v["significant"]:
            lines.append(f"- {name}: {v['best']} wins beyond noise.")
        elif v.get("beaten"):
            lines.append(f"- {name}: no single winner; {', '.join([v['best'], *v['level']])} are level within noise, "
                         f"and {v['best']} is ahead of {', '.join(v['beaten'])} beyond noise.")
    if not lines:
        return ["No variant beats another beyond noise on any signal of this run; see the summary for the "
                "smallest differences its sample sizes could resolve."]
    return lines + ["", "Every other signal is within noise. See the cost table for what each method needed."]


STAGE = Stage(
    name=NAME,
    reads=(SCORES, COMPARISONS, HELD_OUT, FILTER_STATS, REMOVED, GENERATED, PREFERENCE_STATS, RESPONSES,
           *METRICS.values(), *HISTORIES.values(), AGENT, *CURVES.values(), PREFERENCE_CHART),
    writes={"report": REPORT_MD, "table": TABLE},
    fingerprint=fingerprint,
    work=run,
)
