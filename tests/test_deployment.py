"""deployments/prefect.yaml against a real local Prefect server: `sit deploy` creates the work
pool and the deployment (schedule, colab-a100 parameters, concurrency limit stored), and a
worker started here executes one triggered run on the demo preset to completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sit_cli.server import REPO_ROOT, background_server, prefect_cli
from conftest import HANG_GUARD_S

pytestmark = pytest.mark.slow

DEMO_OVERRIDES = ["generation.num_samples=4", "filter.target_count=2", "filter.min_count=1", "preference.num_pairs=1",
                  "generation.instruction_max_tokens=40", "generation.response_max_tokens=40", "filter.length.min=3",
                  "generation.batch_size=8"]

INSPECT = textwrap.dedent("""
    import json
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name("synthetic_instruction_tuner/sit-weekly")
        pool = client.read_work_pool(d.work_pool_name)
        print("RESULT " + json.dumps({
            "parameters": d.parameters, "pool": d.work_pool_name, "pool_type": pool.type,
            "crons": [s.schedule.cron for s in d.schedules], "active": [s.active for s in d.schedules],
            "concurrency": d.global_concurrency_limit.limit if d.global_concurrency_limit else None,
            "pull": d.pull_steps}))
""")

TRIGGER = textwrap.dedent("""
    import json, sys
    from prefect.client.orchestration import get_client
    params, job_env = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name("synthetic_instruction_tuner/sit-weekly")
        run = client.create_flow_run_from_deployment(d.id, parameters=params, job_variables={"env": job_env})
    print("RESULT " + json.dumps(str(run.id)))
""")

STATE = textwrap.dedent("""
    import json, sys
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(sys.argv[1])
    print("RESULT " + json.dumps({"state": run.state.type.value, "message": run.state.message,
                                  "parameters": run.parameters}))
""")


def call(script: str, env: dict, *args: str):
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_deployment_is_stored_and_a_worker_runs_it(tmp_path, smollm2_path):
    with background_server(tmp_path / "prefect-home") as (_url, env):
        deploy = subprocess.run([sys.executable, "-c", "from sit_cli.main import app; app()", "deploy", "--local-source"],
                                env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO_ROOT)
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-3000:]

        stored = call(INSPECT, env)
        assert stored["pool"] == "sit-gpu" and stored["pool_type"] == "process"
        assert stored["crons"] == ["0 3 * * 1"] and stored["active"] == [True]
        assert stored["parameters"] == {"run_dir": "/var/lib/sit/runs/colab-a100", "preset": "colab-a100",
                                        "profile": "a100"}
        assert stored["concurrency"] == 1
        # --local-source swaps the clone + install for this checkout.
        assert stored["pull"] == [{"prefect.deployments.steps.set_working_directory":
                                   {"directory": str(REPO_ROOT)}}]

        run_dir = tmp_path / "run"
        params = {"run_dir": str(run_dir), "preset": "demo", "profile": "cpu", "overrides": DEMO_OVERRIDES,
                  "stages": ["generate", "filter"]}
        # The deployment's job env points the caches at the VM's disk; here, at this machine's.
        job_env = {"SIT_CACHE": os.environ.get("SIT_CACHE", str(Path.home() / ".cache" / "sit")),
                   "HF_HOME": os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")),
                   "HF_HUB_OFFLINE": "1"}
        flow_run_id = call(TRIGGER, env, json.dumps(params), json.dumps(job_env))

        # --run-once: poll once, run what is due (our run), wait for it, exit.
        worker = subprocess.run(prefect_cli("worker", "start", "--pool", "sit-gpu", "--run-once"), env=env,
                                capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path)
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]

        final = call(STATE, env, flow_run_id)
        assert final["state"] == "COMPLETED", (final, worker.stdout[-3000:] + worker.stderr[-3000:])
        assert final["parameters"]["preset"] == "demo"
    for stage in ("generate", "filter"):
        assert json.loads((run_dir / stage / "manifest.json").read_text())["status"] == "done"
    assert len((run_dir / "filter" / "kept.jsonl").read_text().splitlines()) >= 1
