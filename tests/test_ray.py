"""Sharded Magpie generation and preference stage on a Ray cluster simulated on this machine:
two nodes of `ray.cluster_utils.Cluster` (each its own raylet, worker processes and TMPDIR),
one CPU each, the embedded SmolLM2.

The parent (sit's flow) runs in a mount namespace of its own, where its run directory is a bind
mount: at that path the Ray nodes see an empty directory. A worker that read or wrote the run
directory through the local disk, instead of through the task's arguments and the batches it
yields, would fail these tests rather than pass them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S
from test_shards import FILES, OVERRIDES, PREF_FILES, PREF_OVERRIDES, pref_run_dir

from sit_core.config import load_config
from sit_core.driver import run_stage
from sit_core.errors import SitError
from sit_core.stages.generate import shards
from sit_core.store.fileio import read_json, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_per_process")]

ROOT = Path(__file__).resolve().parents[1]
# A token-shaped value in the parent's environment, to look for where it must never be.
TOKEN = "hf_" + "RayTestTokenNeverShipped0123456789"

RUN_ON_RAY = textwrap.dedent("""
    import json, sys
    from sit_prefect.flows import synthetic_instruction_tuner
    result = synthetic_instruction_tuner(run_dir=sys.argv[1], ray=sys.argv[2], stages=sys.argv[3].split(","),
                                         preset="demo", overrides=sys.argv[4:])
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture
def cluster(smollm2_path, one_thread_per_process, monkeypatch):
    """A head and a worker node, one CPU each, each with a TMPDIR of its own (where its shards'
    scratch run directories go). The model is in the shared cache before any node starts."""
    from ray.cluster_utils import Cluster

    root = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))  # short: Ray's socket paths live under it
    nodes = []
    try:
        for name in ("head", "worker"):
            (root / name / "tmp" / "ray").mkdir(parents=True)  # Ray notes the cluster's address under TMPDIR/ray
            monkeypatch.setenv("TMPDIR", str(root / name / "tmp"))
            if not nodes:
                made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": str(root / name),
                                                                     "include_dashboard": False})
                nodes.append(made.head_node)
            else:
                nodes.append(made.add_node(num_cpus=1, temp_dir=str(root / name)))
        monkeypatch.delenv("TMPDIR")
        made.wait_for_nodes()
        yield made, nodes[1], root
    finally:
        if nodes:
            made.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def run_on_ray(tmp_path: Path, address: str, stages: str, overrides: list[str], prepare=None,
               during=None) -> tuple[Path, dict]:
    """The flow in a subprocess, in a mount namespace where its run directory <seen>/run is
    <real>/run bind-mounted; returns <real>/run (what the parent wrote) and the flow's result.
    `prepare(run_dir)` fills the run directory first; `during(child, run_dir)` runs alongside."""
    real, seen = tmp_path / "real", tmp_path / "seen"
    (real / "run").mkdir(parents=True)
    seen.mkdir()
    if prepare:
        prepare(real / "run")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": "", "HF_TOKEN": TOKEN}
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"',
           "sh", str(real), str(seen), sys.executable, "-c", RUN_ON_RAY, str(seen / "run"), address, stages, *overrides]
    # Output into files: a pipe nobody reads while `during` waits would fill and stall the child.
    with open(tmp_path / "out.log", "w") as out_file, open(tmp_path / "err.log", "w") as err_file:
        child = subprocess.Popen(cmd, env=env, stdout=out_file, stderr=err_file, text=True)
        try:
            if during:
                during(child, real / "run")
            child.wait(timeout=HANG_GUARD_S)
        finally:
            if child.poll() is None:
                child.kill()
    out, err = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert child.returncode == 0, out[-3000:] + err[-3000:]
    assert not any(seen.iterdir())  # outside the parent's namespace, its run directory's path stays empty
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return real / "run", json.loads(line[len("RESULT "):])


def ray_logs(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in root.rglob("logs/*") if p.is_file())


def test_magpie_and_preference_on_two_ray_nodes_equal_one_process(cluster, tmp_path):
    made, _, root = cluster
    overrides = OVERRIDES + PREF_OVERRIDES
    reference = pref_run_dir(tmp_path / "one-process")
    cfg = load_config(None, preset="demo", profile="cpu", overrides=overrides)
    run_stage(cfg, reference, "generate")
    run_stage(cfg, reference, "preference")

    run_dir, result = run_on_ray(tmp_path / "ray", made.address, "generate,preference", overrides, pref_run_dir)
    assert result["generate"]["status"] == "done" and result["preference"]["status"] == "done"
    assert len(read_json(shards.shards_dir(run_dir) / "plan.json")["shards"]) >= 2
    for name in FILES:
        assert (run_dir / "generate" / name).read_bytes() == (reference / "generate" / name).read_bytes(), name
    for name in PREF_FILES:
        assert (run_dir / "preference" / name).read_bytes() == (reference / "preference" / name).read_bytes(), name
    # Each shard's engine start reached the manifest through the parent, from the workers.
    events = read_json(run_dir / "generate" / "manifest.json")["events"]
    assert sum(e["event"] == "engine_started" for e in events) >= 2
    # The workers' scratch run directories, one per shard under its node's TMPDIR, are gone.
    assert not list(root.glob("*/tmp/sit-shard-*"))
    # The parent's HF_TOKEN went to no node: not in a task's arguments' trace, not in Ray's logs.
    assert TOKEN not in ray_logs(root)


def test_a_node_killed_mid_shard_loses_nothing(cluster, tmp_path):
    """Two shards of three batches, one per node; the worker node is removed once both shards
    have saved a batch and neither is finished. Its shard runs again on the head node from the
    parent's copy of its log, and the merged output equals one process's."""
    made, worker, _ = cluster
    overrides = OVERRIDES + ["generation.num_samples=12", "filter.target_count=6"]
    reference = tmp_path / "one-process"
    run_stage(load_config(None, preset="demo", profile="cpu", overrides=overrides), reference, "generate")

    def kill_worker_node_mid_shard(child, run_dir: Path) -> None:
        def mid_shard() -> bool:
            plan = shards.shards_dir(run_dir) / "plan.json"
            if not plan.exists():
                return False
            lines = {tuple(s): len(read_jsonl(shards.shard_log(run_dir, tuple(s)), repair=True))
                     if shards.shard_log(run_dir, tuple(s)).exists() else 0 for s in read_json(plan)["shards"]}
            return all(2 <= n < s[1] - s[0] for s, n in lines.items())

        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline and child.poll() is None and not mid_shard():
            time.sleep(0.1)
        assert child.poll() is None, "the run finished before a node could be killed mid-shard"
        made.remove_node(worker, allow_graceful=False)

    run_dir, result = run_on_ray(tmp_path / "ray", made.address, "generate", overrides,
                                 during=kill_worker_node_mid_shard)
    assert result["generate"]["status"] == "done"
    for name in FILES:
        assert (run_dir / "generate" / name).read_bytes() == (reference / "generate" / name).read_bytes(), name
    events = read_json(run_dir / "generate" / "manifest.json")["events"]
    retried = [e for e in events if e["event"] == "shard_retried"]
    assert len(retried) == 1, retried
    # The retry resumed from the batches the parent had saved, not from the start.
    assert retried[0]["from_line"] == 0 and retried[0]["resumes_at_line"] >= 2
    shard = tuple(retried[0]["shard"])
    log = read_jsonl(shards.shard_log(run_dir, shard))
    assert [r["index"] for r in log] == list(range(*shard))  # every index once: nothing lost, nothing twice


def test_an_unreachable_ray_address_is_one_error_before_any_model_loads(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    proc = subprocess.run([sys.executable, "-m", "sit_cli.main", "run", "--run-dir", str(run_dir), "--preset", "demo",
                           "--ray", f"127.0.0.1:{port}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("error:") == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in out, out[-3000:]
    assert "fix:" in out and "ray start --head" in out
    assert not (run_dir / "generate").exists()  # no stage opened, so no model loaded
    assert "Traceback" not in out


def test_nodes_with_other_versions_are_named_in_one_error():
    from sit_prefect.ray_runner import check_versions

    here = {"python": "3.11.7", "ray": "2.60.0", "sit": "0.1.0+aaaa"}
    same = {**here, "node": "gpu-1", "address": "10.0.0.5"}
    other = {**here, "sit": "0.1.0+bbbb", "node": "gpu-2", "address": "10.0.0.6"}
    check_versions(here, [same])
    with pytest.raises(SitError) as err:
        check_versions(here, [same, other])
    assert "gpu-2 (10.0.0.6) has sit 0.1.0+bbbb (here 0.1.0+aaaa)" in err.value.problem
    assert "gpu-1" not in err.value.problem and "python" not in err.value.problem


def test_a_token_in_the_config_never_reaches_a_task_argument(tmp_path):
    from sit_core.stages import declared
    from sit_prefect.ray_runner import Cluster, RayRunner

    cfg = load_config(None, preset="demo", profile="cpu",
                      overrides=[f"generation.system_prompt=You are {TOKEN}"])
    runner = RayRunner("generate", Cluster("nowhere:6379", [{"resources": {"CPU": 1}}]), cfg)
    with pytest.raises(SitError, match="Hugging Face token"):
        next(runner.run_wave(declared("generate").sharding.phases[0], cfg, tmp_path, [(0, 2)], {}))


def test_auto_means_the_workers_hardware_and_a_named_profile_wins():
    from sit_prefect.ray_runner import Cluster

    gpu = {"resources": {"CPU": 8, "GPU": 1}, "profile": "t4", "backend": "transformers"}
    head = {"resources": {"CPU": 4}, "profile": "cpu", "backend": "transformers"}
    hardware = Cluster("head:6379", [head, gpu, gpu]).hardware(None)
    assert hardware == {"profile": "t4", "backend": "transformers"}  # not the CPU head's
    # No preset, so the batch sizes are the profile's: t4's one at a time, not the cpu profile's 8.
    on_workers = load_config({}, auto_profile=hardware["profile"], auto_backend="transformers")
    assert on_workers.profile == "t4" and on_workers.generation.batch_size == 1
    named = load_config({}, profile="cpu", auto_profile="t4")
    assert named.profile == "cpu" and named.generation.batch_size == 8
    with pytest.raises(SitError, match="different hardware profiles"):
        Cluster("head:6379", [gpu, {**gpu, "profile": "a100"}]).hardware(None)


def test_the_parents_copy_of_a_log_follows_the_workers_through_appends_and_cut_backs(tmp_path):
    """The stream's protocol without Ray: what a worker's log gains, loses (Magpie cuts a part
    batch) or has torn reaches the parent's copy as exactly the worker's complete lines."""
    from sit_prefect.ray_runner import LogTail, _mirror

    def lines(*indices):
        return "".join(json.dumps({"index": i}, sort_keys=True) + "\n" for i in indices).encode()

    worker, parent = tmp_path / "worker.jsonl", tmp_path / "parent.jsonl"
    parent.write_bytes(lines(0, 1, 2) + b'{"ind')  # a torn line the parent's earlier life left
    saved = lines(0, 1, 2)
    worker.write_bytes(saved)
    tail = LogTail(worker, saved)
    assert tail.read() is None
    for change in (lambda: worker.write_bytes(lines(0, 1)),             # cut back to a whole batch
                   lambda: worker.write_bytes(lines(0, 1, 2, 3) + b'{"in'),  # regrown, a torn tail
                   lambda: worker.write_bytes(lines(0, 1, 2, 3, 4, 5))):
        change()
        if new := tail.read():
            _mirror(parent, *new)
        assert parent.read_bytes() == worker.read_bytes()[: worker.read_bytes().rfind(b"\n") + 1]
    assert [json.loads(x)["index"] for x in parent.read_text().splitlines()] == [0, 1, 2, 3, 4, 5]
