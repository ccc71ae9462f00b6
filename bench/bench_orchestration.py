"""Orchestration overhead: the same generation work through the Prefect flow and through
plain function calls (sit_core.pipeline.run_pipeline), measured in the same run.

Each side is a fresh process on a fresh run directory (so each loads the model once, as a
user's `sit run` does), run alternately `--repeats` times; the figures are the medians.
The flow side includes everything Prefect adds: its import, the temporary local server
(the default with no PREFECT_API_URL), task-run bookkeeping, cache-key hashing, result
persistence and artifacts. The fixed part (an empty flow in a fresh process) is printed
separately: it does not grow with the work, so on a short run it dominates the ratio.
With --api-url the flow side reports to a running server (`sit server`) instead, as runs on
the deployment VM do: no temporary server per process.
Goal: overhead <= 3% of the work. Prints; asserts nothing.

    .venv/bin/python bench/bench_orchestration.py [--samples 16] [--repeats 2] [--api-url http://127.0.0.1:4200/api]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DIRECT = textwrap.dedent("""
    import sys
    from sit_core.pipeline import run_pipeline
    run_pipeline(sys.argv[1], preset="demo", profile="cpu", overrides=sys.argv[2:], stages=["generate"])
""")

# Prefect's fixed cost per process (import, temporary server start and stop): an empty flow.
EMPTY_FLOW = textwrap.dedent("""
    from prefect import flow
    flow(name="empty")(lambda: None)()
""")

FLOW = textwrap.dedent("""
    import sys
    from sit_prefect.flows import synthetic_instruction_tuner
    synthetic_instruction_tuner(run_dir=sys.argv[1], preset="demo", profile="cpu", overrides=sys.argv[2:],
                                stages=["generate"])
""")


def timed(script: str, run_dir: Path, overrides: list[str], prefect_home: Path, api_url: str | None = None) -> float:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, str(run_dir), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{run_dir.name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16, help="Magpie samples generated on each side")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--api-url", help="a running Prefect server's API (default: a temporary server per process)")
    args = ap.parse_args()
    overrides = [f"generation.num_samples={args.samples}", f"filter.target_count={args.samples}",
                 "preference.num_pairs=1", "generation.instruction_max_tokens=40", "generation.response_max_tokens=64"]
    direct, flow = [], []
    with tempfile.TemporaryDirectory(prefix="sit-bench-orch-") as tmp:
        for i in range(args.repeats):
            direct.append(timed(DIRECT, Path(tmp) / f"direct-{i}", overrides, Path(tmp) / f"home-d{i}"))
            flow.append(timed(FLOW, Path(tmp) / f"flow-{i}", overrides, Path(tmp) / f"home-f{i}", args.api_url))
        fixed = timed(EMPTY_FLOW, Path(tmp) / "empty", [], Path(tmp) / "home-empty", args.api_url)
        fixed -= timed("pass", Path(tmp) / "bare", [], Path(tmp) / "home-bare")  # the interpreter's own start
    d, f = statistics.median(direct), statistics.median(flow)
    print(f"generation of {args.samples} samples, median of {args.repeats}: direct run_pipeline {d:.1f}s, "
          f"Prefect flow {f:.1f}s (each side: {', '.join(f'{x:.1f}' for x in direct)} / "
          f"{', '.join(f'{x:.1f}' for x in flow)})")
    # How far two runs of the same side differ: an overhead smaller than this is noise.
    spread = max((max(x) - min(x)) / statistics.median(x) for x in (direct, flow)) * 100 if args.repeats > 1 else None
    print(f"orchestration overhead: {f - d:+.1f}s = {(f - d) / d * 100:+.1f}% (goal <= 3%: "
          f"{'met' if (f - d) / d <= 0.03 else 'missed'}); run-to-run spread "
          + (f"{spread:.1f}%" if spread is not None else "unknown (one repeat)"))
    server = f"reporting to {args.api_url}" if args.api_url else "temporary server"
    print(f"of which Prefect's fixed start-up per process (an empty flow: import, {server}): {fixed:.1f}s; "
          f"the rest, which grows with the work: {(f - d - fixed) / d * 100:+.1f}%")


if __name__ == "__main__":
    main()
