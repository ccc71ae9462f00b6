"""Shared fixtures. Tests run on real models (the embedded SmolLM2 and MiniLM) and real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# How long a subprocess may run before a test calls it hung. A guard against hangs, never a
# speed limit: one 2-core machine ran the pipeline 2.8-4.9x slower than another, and a 900 s
# per-test limit broke CI there. Whole-pipeline tests run sit in subprocesses with this guard,
# so a hang or a crash ends that process, not the interpreter the later tests share.
HANG_GUARD_S = 3600

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `generation.backend: auto` means transformers here: the tests of the vLLM backend ask for it
# by name (the `vllm_python` fixture), so every other test's expectations hold whether or not
# this machine has a vLLM environment.
os.environ["SIT_VLLM_PYTHON"] = "none"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The embedded SmolLM2, materialized once into the shared cache."""
    from sit_core.engine.models import resolve_model_path

    return Path(resolve_model_path("embedded:smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter of the vLLM environment (`sit engine install`). CI sets SIT_REQUIRE_VLLM=1,
    where its absence fails the tests that need it instead of skipping them."""
    from sit_core.config.backend import default_vllm_env, has_vllm

    python = os.environ.get("SIT_TEST_VLLM_PYTHON") or str(default_vllm_env() / "bin" / "python")
    if not has_vllm(python):
        message = f"no vLLM environment at {python}: run `sit engine install` (or set SIT_TEST_VLLM_PYTHON)"
        if os.environ.get("SIT_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def one_thread_per_process():
    """Two cores shared with other test runs: torch's default two intra-op threads per process
    spin against each other and sampling got ~20x slower than with one. OMP_NUM_THREADS
    reaches subprocesses and spawned workers, so every process computes with one thread and
    float results compare exactly across processes."""
    import torch

    before_env, before = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if before_env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = before_env


def sigkill_when(child, ready, within_s: float = HANG_GUARD_S) -> None:
    """SIGKILL `child` (a Popen) as soon as `ready()` holds, as a crash mid-stage would; fails if
    the child ends first. Always reaps it."""
    import signal
    import time

    try:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and child.poll() is None and not ready():
            time.sleep(0.2)
        assert child.poll() is None, "the child finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()


def engine_processes() -> list[int]:
    """Live generation-engine workers (sit_core/engine/worker.py) started from this process."""
    from sit_core.engine import worker

    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if worker.__file__.encode() in cmdline and int(stat[1]) == os.getpid() and stat[0] != "Z":
            found.append(int(proc.name))
    return found


def run_flow_script(script: str, run_dir: Path, prefect_home: Path, overrides: list[str]) -> dict:
    """Run a Python snippet that calls a flow and prints `RESULT <json>`, in a fresh process
    with its own PREFECT_HOME (a new machine, as far as Prefect can tell)."""
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": ""}
    proc = subprocess.run([sys.executable, "-c", script, str(run_dir), *overrides], env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def random_lora(base: Path, out: Path) -> Path:
    """A LoRA adapter whose B matrices are not zero, so that it changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out
