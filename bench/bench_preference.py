"""Preference sampling on the embedded SmolLM2 (CPU): batched mode against stable mode.

Runs the real stage three times on the same kept instructions: stable (batch 1), batched at
batch 4 and at batch 8. Prints tokens/s as ratios to stable, twice: end to end (model loads
and worker start-up included, as a user of this small run sees it) and sampling only (what
a long run converges to, since loads are a fixed cost per model). Also the pair counts of
each mode, how many responses came out word-for-word the same as in stable mode, and the
watchdog's overhead when nothing stalls: the stage's batch-8 engine process (pipes,
heartbeats) against the same batches sampled in this process with no worker at all.
Timings are printed, never asserted.

    .venv/bin/python bench/bench_preference.py [--instructions 8] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# One intra-op thread per process in every mode (set before torch loads; the spawned worker
# inherits it): on a shared 2-core machine two spinning OpenMP threads per process made
# sampling ~20x slower and the ratios meaningless.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from sit_core.driver import run_stage  # noqa: E402
from sit_core.stages.preference import build as preference  # noqa: E402
from sit_core.config import load_config  # noqa: E402
from sit_core.store.fileio import read_jsonl  # noqa: E402
from sit_core.engine.engines import EngineSpec, open_engine  # noqa: E402
from sit_core.engine.sampling import Sampling  # noqa: E402

INSTRUCTIONS = [
    "Name three primary colors.", "Write a haiku about the sea.", "Explain in one sentence what a CPU does.",
    "Give two tips for learning a new language.", "What is the capital of France?",
    "Describe a cat to someone who has never seen one.", "List three uses of a paperclip.",
    "Why is the sky blue?", "Suggest a name for a bakery.", "How do plants make food?",
    "Write a short thank-you note to a teacher.", "What does a compiler do?",
    "Give a synonym for 'happy'.", "Summarize the water cycle.", "Recommend a weekend hobby.",
    "Explain what a prime number is.",
]
MODELS = [
    {"name": "greedy", "model": "embedded:smollm2-135m-instruct", "temperature": 0.0, "top_p": 1.0},
    {"name": "t0.7", "model": "embedded:smollm2-135m-instruct", "temperature": 0.7, "top_p": 0.9},
]


def config(n: int, max_new_tokens: int, batch: int):
    return load_config(None, preset="demo", profile="cpu", overrides=[
        f"models.response_models={json.dumps(MODELS)}", f"preference.max_new_tokens={max_new_tokens}",
        f"preference.num_pairs={max(1, n // 2)}", "preference.min_pairs=1", "preference.min_margin=0.0",
        f"preference.generation_batch_size={batch}", "preference.stall_timeout_s=120",
        "generation.backend=transformers"])


def stage_run(root: Path, n: int, max_new_tokens: int, batch: int) -> dict:
    run_dir = root / f"batch{batch}"
    (run_dir / "filter").mkdir(parents=True)
    (run_dir / "filter" / "kept.jsonl").write_text(
        "".join(json.dumps({"id": i, "instruction": q, "response": ""}) + "\n" for i, q in enumerate(INSTRUCTIONS[:n])))
    manifest = run_stage(config(n, max_new_tokens, batch), run_dir, "preference")
    generated = next(e for e in manifest["events"] if e["event"] == "generated")
    responses = {r["key"]: r["response"] for r in read_jsonl(run_dir / "preference" / "responses.jsonl")}
    return {"tokens": generated["tokens"], "seconds": generated["seconds"],
            "sampling_seconds": generated["seconds"] - generated["load_seconds"], "pairs": manifest["stats"]["pairs"],
            "qualifying": manifest["stats"]["qualifying_pairs"], "stalls": manifest["stats"]["stalls"],
            "responses": responses}


def in_process_batched(n: int, max_new_tokens: int, batch: int) -> dict:
    """The same batches as the stage's worker, sampled here: no process, queue or watchdog."""
    cfg = config(n, max_new_tokens, batch)
    kept = [{"id": i, "instruction": q} for i, q in enumerate(INSTRUCTIONS[:n])]
    tokens, started = 0, time.perf_counter()
    engine = open_engine(EngineSpec(MODELS[0]["model"], "transformers", batch_size=batch), "in-process")
    loading = time.perf_counter() - started
    for spec in cfg.models.response_models:  # one model at two settings: one engine, as in the stage
        items = [preference.response_item(cfg, spec.name, rec, 0) for rec in kept]
        sampling = Sampling(spec.temperature, spec.top_p, max_new_tokens)
        for i in range(0, len(items), batch):
            tokens += sum(r["tokens"] for r in preference.answer_items(engine, items[i:i + batch], sampling))
    engine.close()
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "sampling_seconds": seconds - loading}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instructions", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    n, m = min(args.instructions, len(INSTRUCTIONS)), args.max_new_tokens
    with tempfile.TemporaryDirectory(prefix="sit-bench-pref-") as tmp:
        runs = {b: stage_run(Path(tmp), n, m, b) for b in (1, 4, 8)}
    reference = in_process_batched(n, m, 8)

    def rate(r: dict, key: str = "seconds") -> float:
        return r["tokens"] / r[key]

    stable = runs[1]
    print(f"preference sampling, embedded SmolLM2, CPU: {n} instructions x {len(MODELS)} models, "
          f"max_new_tokens={m}")
    for b, r in runs.items():
        same = sum(r["responses"][k] == stable["responses"][k] for k in stable["responses"])
        print(f"  batch {b}: {r['tokens']} tokens; end to end {r['seconds']:.1f}s = {rate(r):.1f} tok/s "
              f"(x{rate(r) / rate(stable):.2f} stable); sampling only {r['sampling_seconds']:.1f}s = "
              f"{rate(r, 'sampling_seconds'):.1f} tok/s (x{rate(r, 'sampling_seconds') / rate(stable, 'sampling_seconds'):.2f} "
              f"stable); pairs {r['pairs']} (qualifying {r['qualifying']}), stalls {r['stalls']}, "
              f"responses identical to stable {same}/{len(stable['responses'])}")
    counts = {r["pairs"] for r in runs.values()}
    print(f"  pair counts identical across modes: {len(counts) == 1}")
    steady = runs[8]["sampling_seconds"] / reference["sampling_seconds"] - 1
    startup = (runs[8]["seconds"] - runs[8]["sampling_seconds"]) - (reference["seconds"] - reference["sampling_seconds"])
    print(f"  watchdog overhead at batch 8 when nothing stalls, against the same batches in this process "
          f"({rate(reference, 'sampling_seconds'):.1f} tok/s sampling only): {steady * 100:+.1f}% sampling time "
          f"(pipes, heartbeats), plus {startup:.1f}s start-up of the worker (process + imports)")


if __name__ == "__main__":  # the batched worker is spawned: importing this file must not rerun the bench
    main()
