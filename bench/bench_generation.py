"""One Magpie workload, four ways, in one run: sit's transformers loop at batch 1 and at its best
batch, sit's vLLM backend, and raw `vllm.LLM.generate` on the same prompts.

The workload is Magpie's instruction phase on the embedded SmolLM2: the pre-query template as
the prompt of every request, each request seeded from its index, temperature 1.0. Throughput
counts generated tokens over generation time; model loads and engine starts are reported
apart (a fixed cost per stage). Ratios are against sit's loop at batch 1 and against raw vLLM,
both measured here. Timings are printed, never asserted.

    .venv/bin/python bench/bench_generation.py [--requests 64] [--max-new-tokens 64] [--batches 4,8,16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the test suite and bench_preference: one thread per process

from sit_core.config.backend import find_vllm_python  # noqa: E402
from sit_core.engine.backend import cuda_available, vllm_dtype  # noqa: E402
from sit_core.engine.engines import EngineSpec, open_engine  # noqa: E402
from sit_core.engine.models import load_tokenizer, resolve_model_path  # noqa: E402
from sit_core.engine.sampling import Sampling, item_seed, pre_query_template  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"

# Raw vLLM, in the vLLM environment: the same token ids, seeds and stop ids as sit sends.
RAW = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
args = json.loads(sys.stdin.read())
t = time.perf_counter()
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=args["model"], tokenizer=args["model"], seed=0, max_model_len=args["max_model_len"],
          dtype=args["dtype"], enforce_eager=True, enable_prefix_caching=True, gpu_memory_utilization=args["memory"])
start = time.perf_counter() - t
params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args["max_new_tokens"], seed=s,
                         stop_token_ids=args["stops"], detokenize=False) for s in args["seeds"]]
t = time.perf_counter()
outs = llm.generate([TokensPrompt(prompt_token_ids=args["prompt"]) for _ in args["seeds"]], params, use_tqdm=False)
seconds = time.perf_counter() - t
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
print("RAW " + json.dumps({"start": start, "seconds": seconds, "tokens": tokens}))
"""


def sit_engine(spec: EngineSpec, prompt: list[int], seeds: list[int], sampling: Sampling, call: int) -> dict:
    started = time.perf_counter()
    engine = open_engine(spec, "bench")
    start = time.perf_counter() - started
    tokens, t = 0, time.perf_counter()
    for i in range(0, len(seeds), call):  # as Magpie calls it: generation.batch_size requests a call
        chunk = seeds[i:i + call]
        tokens += sum(len(c.ids) for c in engine.generate([prompt] * len(chunk), chunk, sampling))
    seconds = time.perf_counter() - t
    engine.close()
    return {"start": start, "seconds": seconds, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="4,8,16", help="the transformers loop's batch sizes to try")
    args = ap.parse_args()
    n, m = args.requests, args.max_new_tokens
    tokenizer = load_tokenizer(MODEL)
    before, _ = pre_query_template(tokenizer, None)
    prompt = tokenizer(before, add_special_tokens=False)["input_ids"]
    seeds = [item_seed(42, "generate", i, "instruction") for i in range(n)]
    sampling = Sampling(1.0, 1.0, m)
    max_model_len = len(prompt) + m + 16

    runs: dict[str, dict] = {}
    runs["transformers loop, batch 1"] = sit_engine(EngineSpec(MODEL, "transformers", batch_size=1), prompt,
                                                    seeds[: max(8, n // 4)], sampling, 1)
    best = None
    for b in (int(x) for x in args.batches.split(",")):
        r = sit_engine(EngineSpec(MODEL, "transformers", batch_size=b), prompt, seeds, sampling, b)
        if best is None or r["tokens"] / r["seconds"] > best[1]["tokens"] / best[1]["seconds"]:
            best = (b, r)
    runs[f"transformers loop, best batch ({best[0]})"] = best[1]
    python = find_vllm_python()
    if python is None:
        print("no vLLM environment (`sit engine install`): the vLLM rows are missing")
    else:
        runs["sit vllm backend"] = sit_engine(EngineSpec(MODEL, "vllm", vllm_python=python, max_model_len=max_model_len,
                                                         gpu_memory_utilization=0.3), prompt, seeds, sampling, n)
        engine = open_engine(EngineSpec(MODEL, "transformers"), "stops")  # the stop ids sit sends
        stops = sorted(engine.stops)
        engine.close()
        proc = subprocess.run([python, "-c", RAW], input=json.dumps({
            "model": resolve_model_path(MODEL), "prompt": prompt, "seeds": seeds, "max_new_tokens": m,
            "stops": stops, "max_model_len": max_model_len, "memory": 0.3,
            "dtype": vllm_dtype(cuda_available())}), capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RAW ")), None)
        if line is None:
            print(f"raw vLLM failed: {proc.stderr[-2000:]}")
        else:
            runs["raw vllm.LLM.generate"] = json.loads(line[4:])

    def rate(r: dict) -> float:
        return r["tokens"] / r["seconds"]

    base = runs["transformers loop, batch 1"]
    raw = runs.get("raw vllm.LLM.generate")
    print(f"Magpie instruction phase, embedded SmolLM2, CPU: {n} requests (batch 1: {max(8, n // 4)}), "
          f"max_new_tokens={m}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    for name, r in runs.items():
        vs_raw = f", x{rate(r) / rate(raw):.2f} raw vLLM" if raw else ""
        print(f"  {name}: {r['tokens']} tokens in {r['seconds']:.1f}s = {rate(r):.1f} tok/s "
              f"(x{rate(r) / rate(base):.2f} loop at batch 1{vs_raw}); start {r['start']:.1f}s")
    if raw and "sit vllm backend" in runs:
        sit = runs["sit vllm backend"]
        print(f"  sit on vLLM vs raw vLLM: x{rate(sit) / rate(raw):.2f} (goal >= 0.9); vs sit's loop at batch 1: "
              f"x{rate(sit) / rate(base):.2f} (goal >= 5)")


if __name__ == "__main__":
    main()
