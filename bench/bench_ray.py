"""Magpie generation through Ray (1 node and 2 nodes) against the ProcessPool runner, on the same
total cores, and the per-shard overhead of the Ray runner.

Runners of the same generate stage (the demo preset on transformers: its shard sizes, 8 and 16
attempts in the first wave), each through the flow in a fresh process on a fresh run directory:
  pool    `workers=2`: Prefect's ProcessPoolTaskRunner, 2 processes on this machine
  ray-1   a Ray cluster of 1 node with 2 CPUs (`ray=ADDRESS`), started here
  ray-2   a Ray cluster of 2 nodes with 1 CPU each (ray.cluster_utils.Cluster: separate raylets)
Every process computes on one thread (OMP_NUM_THREADS=1), so each runner has 2 shards at once.
The runners run in blocks (a cluster is started once per block), `--repeats` runs each.

Prints the stage's wall time per runner (manifest started -> finished, 1 s resolution) and, for
the Ray runners, each shard's time split as the runner records it (`ray_shard` events):
  scheduling     submission -> the task starts on its node (a worker process, the arguments)
  data movement  fetching and unpacking the run's input files, and the last batch and summary
                 reaching the parent (the batches before it stream while the shard works)
  model load     the shard's engine start (its `engine_started` event), inside the work
each as a share of the shard's wall time: the median over all shards of all repeats, with the
min-max spread. Goal: scheduling + data movement <= 5% of a shard's time. Asserts nothing.

    .venv/bin/python bench/bench_ray.py [--repeats 3] [--samples 24]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FLOW = textwrap.dedent("""
    import json, sys
    from sit_prefect.flows import synthetic_instruction_tuner
    runner = json.loads(sys.argv[2])
    result = synthetic_instruction_tuner(run_dir=sys.argv[1], preset="demo", profile="cpu", overrides=sys.argv[3:],
                                         stages=["generate"], **runner)
    assert result["generate"]["status"] == "done", result
""")


def run_once(work: Path, runner: dict, overrides: list[str], env: dict) -> dict:
    """One generate stage in a fresh process; its wall time and its shards' `ray_shard` records."""
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", FLOW, str(run_dir), json.dumps(runner), *overrides], cwd=REPO,
                          env={**env, "PREFECT_HOME": str(run_dir / "prefect-home")}, capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    manifest = json.loads((run_dir / "generate" / "manifest.json").read_text())
    when = [datetime.datetime.fromisoformat(manifest[k]) for k in ("started_at", "finished_at")]
    events = manifest["events"]
    loads = {tuple(e["shard"]): e["seconds"] for e in events if e["event"] == "engine_started"}
    shards = [{**e, "model_load_s": loads.get(tuple(e["shard"]), 0.0)} for e in events if e["event"] == "ray_shard"]
    result = {"stage_s": (when[1] - when[0]).total_seconds(), "process_s": process_s, "shards": shards}
    print(f"  run {runner}: stage {result['stage_s']:.0f} s, process {process_s:.0f} s, {len(shards)} Ray shards",
          flush=True)
    return result


def start_cluster(nodes: int, cpus_per_node: int, root: Path):
    from ray.cluster_utils import Cluster

    (Path(tempfile.gettempdir()) / "ray").mkdir(exist_ok=True)  # Ray notes the newest cluster's address there
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False,
                                                            "temp_dir": str(root / "head")})
    for i in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node, temp_dir=str(root / f"node{i + 1}"))
    cluster.wait_for_nodes()
    return cluster


def spread(values: list[float]) -> str:
    return f"{100 * statistics.median(values):.1f}% (spread {100 * min(values):.1f}-{100 * max(values):.1f}%)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=24, help="generation.num_samples (the demo's: 24)")
    ap.add_argument("--runners", default="pool,ray-1,ray-2", help="which of pool, ray-1, ray-2 to run")
    args = ap.parse_args()
    overrides = [f"generation.num_samples={args.samples}", "generation.backend=transformers"]
    os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      SIT_VLLM_PYTHON="none")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    from sit_core.engine.models import resolve_model_path

    resolve_model_path("embedded:smollm2-135m-instruct")  # into the cache before any worker needs it
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="sit-bench-ray-") as tmp:
        work = Path(tmp)
        runners = args.runners.split(",")
        if "pool" in runners:
            results["pool (2 processes)"] = [run_once(work, {"workers": 2}, overrides, env)
                                             for _ in range(args.repeats)]
        for key, name, nodes, cpus in (("ray-1", "ray, 1 node x 2 CPUs", 1, 2), ("ray-2", "ray, 2 nodes x 1 CPU", 2, 1)):
            if key not in runners:
                continue
            root = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))  # short: Ray's socket paths live under it
            cluster = start_cluster(nodes, cpus, root)
            try:
                results[name] = [run_once(work, {"ray": cluster.address}, overrides, env) for _ in range(args.repeats)]
            finally:
                cluster.shutdown()
                shutil.rmtree(root, ignore_errors=True)

    pool = statistics.median(r["stage_s"] for r in results.get("pool (2 processes)", [{"stage_s": float("nan")}]))
    print(f"generate stage, demo preset, num_samples={args.samples}, transformers, {args.repeats} runs each")
    for name, runs in results.items():
        stage = [r["stage_s"] for r in runs]
        print(f"  {name:24s} stage median {statistics.median(stage):.0f} s (spread {min(stage):.0f}-{max(stage):.0f} s), "
              f"x{statistics.median(stage) / pool:.2f} the pool")
    for name, runs in results.items():
        shards = [s for r in runs for s in r["shards"]]
        if not shards:
            continue
        scheduling = [s["queued_s"] / s["wall_s"] for s in shards]
        movement = [(s["inputs_s"] + s["drain_s"]) / s["wall_s"] for s in shards]
        overhead = [(s["queued_s"] + s["inputs_s"] + s["drain_s"]) / s["wall_s"] for s in shards]
        load = [s["model_load_s"] / s["wall_s"] for s in shards]
        walls = [s["wall_s"] for s in shards]
        print(f"  {name}: {len(shards)} shards, shard wall median {statistics.median(walls):.1f} s "
              f"(spread {min(walls):.1f}-{max(walls):.1f} s)")
        print(f"    scheduling {spread(scheduling)}; data movement {spread(movement)}; "
              f"model load {spread(load)} of shard time")
        print(f"    ray shard overhead ({name}): {spread(overhead)} of shard time (goal <= 5%)")


if __name__ == "__main__":
    main()
