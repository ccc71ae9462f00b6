"""Stage "report": which adaptation method did best, and at what cost.

Reads the evaluation (`evaluate/scores.csv`, `evaluate/agent/*.json`), the training
metrics of each method (`<stage>/metrics.json`, `log_history.json`, `curves.png`) and the
data statistics (`filter/stats.json`, `preference/stats.json`), and writes to `report/`:

- `comparison_summary.csv`: one row per variant, every configured variant included; one
  whose training or evaluation did not run has status "missing" and empty cells;
- charts: `scores_by_task.png`, `quality_vs_trainable_params.png`,
  `quality_vs_training_time.png`, `training_curves.png` (plus each stage's own curves.png
  copied as `curves_<stage>.png`);
- `report.md`, following the seed's outline (introduction, related work, method, setup,
  results, discussion, conclusion) and filled from the data.

The manifest's stats carry `tables: {"comparison": rows}`, which the Prefect layer publishes
as a table artifact like every stage's `tables`, and `report_md` (the report's path relative
to the run directory) for its markdown artifact.
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
from sit_core.store.fileio import atomic_write_bytes, atomic_write_text, read_json
from sit_core.store.manifest import StageRun, read_manifest

NAME = "report"
TRAINED = ("sft", "prompt_tuning", "dpo")  # each trained variant is the training stage of its name
SCORES = Read("evaluate", "scores")
AGENT = Read("evaluate", "agent", files=("*.json",), optional=True)
FILTER_STATS = Read("filter", "stats", optional=True)
PREFERENCE_STATS = Read("preference", "stats", optional=True)
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
    atomic_write_text(md_path, render_markdown(cfg, data, rows, charts))
    winners = winners_per_task(cfg, rows)
    stats = {"tables": {"comparison": rows}, "report_md": md_path.relative_to(run_dir).as_posix(), "winners": winners,
             "charts": [c.name for c in charts], "missing": [r["variant"] for r in rows if r["status"] == MISSING]}
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


def load_run_data(cfg: SitConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    scores: dict[str, dict[str, float]] = {}
    with open(path_of(run_dir, SCORES), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("primary", "True").lower() == "true":
                scores.setdefault(row["variant"], {})[row["task"]] = float(row["value"])
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
    return {"scores": scores, "agent": agent, "training": training, "histories": histories, "curves": curves,
            "filter": _read_optional(path_of(run_dir, FILTER_STATS)),
            "preference": _read_optional(path_of(run_dir, PREFERENCE_STATS)),
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
    """One row per configured variant, in the configured order. Scores are each task's
    primary metric. The base model has no training cost; a variant without scores is missing."""
    rows = []
    for variant in cfg.evaluation.variants:
        scores = data["scores"].get(variant, {})
        agent = data["agent"].get(variant, {})
        evaluated = bool(scores) or bool(agent)
        row: dict[str, Any] = {"variant": variant, "method": METHOD_NAMES[variant],
                               "status": "evaluated" if evaluated else MISSING}
        for task in cfg.evaluation.tasks:
            row[task] = scores.get(task)
        row["mean_score"] = sum(scores.values()) / len(scores) if scores else None
        row["agent_success_rate"] = _number(agent.get("success_rate"))
        row["agent_valid_call_rate"] = _number(agent.get("valid_call_rate"))
        metrics = data["training"].get(variant, {})
        for column in COST_COLUMNS:
            value = _number(metrics.get(METRIC_KEYS.get(column, column)))
            if variant == "base" and column in ("trainable_params", "trainable_ratio_percent", "training_time_minutes"):
                value = 0
            row[column] = int(value) if column == "trainable_params" and value is not None else value
        rows.append(row)
    return rows


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


def winners_per_task(cfg: SitConfig, rows: list[dict]) -> dict[str, dict]:
    """Best variant per task (ties listed together); tasks nobody scored are left out."""
    out = {}
    for task in [*cfg.evaluation.tasks, "agent_success_rate"]:
        scored = [(r[task], r["variant"]) for r in rows if r.get(task) is not None]
        if scored:
            best = max(score for score, _ in scored)
            out[task] = {"score": best, "variants": [v for score, v in scored if math.isclose(score, best)]}
    return out


# ---------------------------------------------------------------------------------------
# Charts


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def make_charts(cfg: SitConfig, data: dict, rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and in Colab workers
    import matplotlib.pyplot as plt

    charts = []
    evaluated = [r for r in rows if r["status"] != MISSING]
    tasks = list(cfg.evaluation.tasks) + (["agent_success_rate"] if data["agent"] else [])

    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(tasks) + 2), 4))
    width = 0.8 / max(1, len(evaluated))
    for i, row in enumerate(evaluated):
        xs = [t + i * width for t in range(len(tasks))]
        ax.bar(xs, [row.get(t) or 0.0 for t in tasks], width, label=row["variant"])
    ax.set_xticks([t + width * (len(evaluated) - 1) / 2 for t in range(len(tasks))], tasks, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (primary metric)")
    ax.set_title("Scores per task by variant")
    if evaluated:
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
        ax.set_ylabel("mean score over tasks")
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
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Training curves")
        ax.legend()
        charts.append(_save(fig, out_dir / "training_curves.png"))
        plt.close(fig)
    for variant, path in data["curves"].items():
        target = out_dir / f"curves_{variant}.png"
        shutil.copyfile(path, target)
        charts.append(target)
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


def _table(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _describe_stats(stats: dict, indent: str = "") -> list[str]:
    """Any statistics JSON as bullets: scalars as they are, number lists summarized,
    nested objects one level deeper. The upstream stages own the schema, not the report."""
    lines = []
    for key, value in stats.items():
        label = key.replace("_", " ")
        if isinstance(value, dict):
            if value and all(not isinstance(v, (dict, list)) for v in value.values()):
                lines.append(f"{indent}- {label}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()))
            else:
                lines.append(f"{indent}- {label}:")
                lines += _describe_stats(value, indent + "  ")
        elif isinstance(value, list):
            numbers = [_number(v) for v in value]
            if value and all(n is not None for n in numbers):
                lines.append(f"{indent}- {label}: {len(numbers)} values, mean {_fmt(sum(numbers) / len(numbers))}, "
                             f"min {_fmt(min(numbers))}, max {_fmt(max(numbers))}")
            else:
                lines.append(f"{indent}- {label}: {len(value)} entries")
        else:
            lines.append(f"{indent}- {label}: {_fmt(value)}")
    return lines


def render_markdown(cfg: SitConfig, data: dict, rows: list[dict], charts: list[Path]) -> str:
    tasks = list(cfg.evaluation.tasks)
    t = cfg.training
    winners = winners_per_task(cfg, rows)
    missing = [r["variant"] for r in rows if r["status"] == MISSING]
    limit = cfg.evaluation.limit
    out = [f"# Synthetic Instruction Tuner — comparative report (`{cfg.run_name}`)", ""]

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
            "separate reward model during training.", ""]

    out += ["## 3. Method", "",
            f"1. Generation: Magpie with `{cfg.models.generator}`, {cfg.generation.num_samples} samples requested.",
            f"2. Quality filter to {cfg.filter.target_count}: {cfg.filter.length.min}–{cfg.filter.length.max} words, "
            f"at most {cfg.filter.repetition.max_repeat} repeats, Jaccard near-duplicates ≥ "
            f"{cfg.filter.diversity.jaccard_threshold}, refusal phrases, language `{cfg.filter.language}`.",
            f"3. Preference pairs: {cfg.preference.num_pairs} requested, responses from "
            + ", ".join(f"`{m.name}`" for m in cfg.models.response_models)
            + f", scored by `{cfg.models.reward_model}` ({cfg.models.reward_type}); minimum margin "
            f"{cfg.preference.min_margin}.",
            "4. Training: LoRA SFT, prompt tuning and DPO (LoRA) on the target model.",
            "5. Evaluation: lm-evaluation-harness on " + ", ".join(f"`{x}`" for x in tasks)
            + (f" (limit {limit} examples per task)" if limit else "")
            + (f"; agent evaluation with {cfg.evaluation.agent.num_tasks} tool-use tasks, at most "
               f"{cfg.evaluation.agent.max_steps} steps each" if cfg.evaluation.agent.enabled else "") + ".", ""]
    if data["filter"]:
        out += ["### Filter statistics", "", *_describe_stats(data["filter"]), ""]
    out += ["### Preference data statistics", ""]
    out += _describe_stats(data["preference"]) if data["preference"] else ["- no preference statistics in this run"]
    out.append("")

    out += ["## 4. Experimental setup", "",
            _table(["setting", "value"], [
                ["target model", cfg.models.target], ["hardware profile", cfg.profile], ["seed", cfg.seed],
                ["LoRA r / alpha / dropout", f"{t.lora_r} / {t.lora_alpha} / {t.lora_dropout}"],
                ["LoRA target modules", ", ".join(t.lora_target_modules)],
                ["SFT epochs / lr / batch x GA", f"{_fmt(t.sft_epochs)} / {t.sft_learning_rate:g} / "
                                               f"{t.sft_batch_size} x {t.gradient_accumulation_steps}"],
                ["prompt tuning virtual tokens / init / lr", f"{t.prompt_tuning_virtual_tokens} / "
                                                            f"{t.prompt_tuning_init} / {t.prompt_tuning_learning_rate:g}"],
                ["DPO beta / epochs / lr", f"{t.dpo_beta} / {_fmt(t.dpo_epochs)} / {t.dpo_learning_rate:g}"],
                ["max steps per method", "epochs decide" if t.max_steps < 0 else t.max_steps],
                ["precision", t.precision], ["evaluation tasks", ", ".join(tasks)],
                ["examples per task", limit or "all"],
            ]), ""]

    out += ["## 5. Results", "", "### Scores (primary metric per task)", "",
            _table(["variant", "status", *tasks, "mean", "agent success", "agent valid calls"],
                   [[r["variant"], r["status"], *(r[x] for x in tasks), r["mean_score"], r["agent_success_rate"],
                     r["agent_valid_call_rate"]] for r in rows]), ""]
    out += ["### Winner per task", ""]
    for task, win in winners.items():
        out.append(f"- `{task}`: **{', '.join(win['variants'])}** ({_fmt(win['score'])})")
    if not winners:
        out.append("- no variant was scored")
    out.append("")
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
        out += ["### Charts", ""] + [f"![{c.stem.replace('_', ' ')}]({c.name})" for c in charts] + [""]

    out += ["## 6. Discussion", ""]
    out += _discussion(rows, winners, missing, limit)
    out.append("")
    out += ["## 7. Conclusion", ""]
    out += _conclusion(rows, winners)
    out.append("")
    return "\n".join(out)


def _discussion(rows: list[dict], winners: dict, missing: list[str], limit: int | None) -> list[str]:
    lines = []
    base = next((r for r in rows if r["variant"] == "base" and r["mean_score"] is not None), None)
    trained = [r for r in rows if r["variant"] != "base" and r["mean_score"] is not None]
    for r in trained:
        parts = [f"- **{r['method']}**: mean score {_fmt(r['mean_score'])}"]
        if base:
            parts.append(f"({r['mean_score'] - base['mean_score']:+.3f} against the base model)")
        cost = []
        if r["trainable_params"] is not None:
            cost.append(f"{_fmt(r['trainable_params'])} trainable parameters"
                        + (f" ({_fmt(r['trainable_ratio_percent'])}%)" if r["trainable_ratio_percent"] is not None else ""))
        if r["training_time_minutes"] is not None:
            cost.append(f"{_fmt(r['training_time_minutes'], 1)} min of training")
        if r["peak_memory_gb"] is not None:
            cost.append(f"{_fmt(r['peak_memory_gb'], 2)} GB peak memory")
        lines.append(" ".join(parts) + (", for " + ", ".join(cost) if cost else "") + ".")
    efficient = [r for r in trained if r["trainable_params"] and r["mean_score"] is not None]
    if efficient:
        best = max(efficient, key=lambda r: r["mean_score"] / math.log10(max(10.0, r["trainable_params"])))
        lines.append(f"- Quality per trained parameter (mean score over log10 of trainable parameters) is "
                     f"highest for **{best['variant']}**.")
    if missing:
        lines.append(f"- Not evaluated (its training stage did not produce a model): {', '.join(missing)}. "
                     "These rows are empty rather than left out.")
    if limit:
        lines.append(f"- Each task was scored on at most {limit} examples, so differences of a few points are "
                     "within noise; rerun with evaluation.limit unset for conclusions.")
    lines.append("- Synthetic data inherits the generator's style and errors; the reward model's preferences "
                 "decide what DPO learns, and small preference sets limit how far DPO can move the model.")
    return lines


def _conclusion(rows: list[dict], winners: dict) -> list[str]:
    if not winners:
        return ["No variant produced scores in this run."]
    counts: dict[str, int] = {}
    for win in winners.values():
        for v in win["variants"]:
            counts[v] = counts.get(v, 0) + 1
    top = max(counts.values())
    leaders = sorted(v for v, c in counts.items() if c == top)
    return [f"{' and '.join(leaders)} won the most tasks ({top} of {len(winners)}). "
            "See the cost table for what each method needed to get there."]


STAGE = Stage(
    name=NAME,
    reads=(SCORES, FILTER_STATS, PREFERENCE_STATS, *METRICS.values(), *HISTORIES.values(), AGENT,
           *CURVES.values()),
    writes={"report": REPORT_MD, "table": TABLE},
    fingerprint=fingerprint,
    work=run,
)
