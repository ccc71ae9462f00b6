"""Magpie generation on the real embedded model: the pre-query template, and a run killed
with SIGKILL mid-stage that resumes to exactly the records of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import sigkill_when

from sit_core.driver import run_stage
from sit_core.stages.generate import magpie
from sit_core.config import load_config
from sit_core.store.fileio import read_jsonl

OVERRIDES = ["generation.num_samples=12", "filter.target_count=6", "preference.num_pairs=3",
             "generation.instruction_max_tokens=40", "generation.response_max_tokens=24",
             "generation.batch_size=4", "checkpoint_interval=4"]


def demo_cfg():
    return load_config(None, preset="demo", profile="cpu", overrides=OVERRIDES)


def test_pre_query_template_comes_from_the_chat_template(smollm2_path):
    from sit_core.engine.models import load_tokenizer

    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    before, after = magpie.pre_query_template(tok, None)
    assert before.endswith("<|im_start|>user\n") and after.startswith("<|im_end|>")
    before_sys, _ = magpie.pre_query_template(tok, "You are a chemistry tutor.")
    assert "You are a chemistry tutor." in before_sys and before_sys.endswith("<|im_start|>user\n")


def test_packed_cpu_weights_compute_what_the_plain_ones_do(smollm2_path):
    """load_causal_lm packs every Linear weight on a CPU (models.pack_for_cpu): a decoding step's
    few rows take the packed path and a prefill's many rows the plain one, and both give the
    plain model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from sit_core.engine.models import PACKED_MAX_ROWS, load_causal_lm

    packed = load_causal_lm("embedded:smollm2-135m-instruct").model
    plain = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    assert hasattr(packed.model.layers[0].mlp.down_proj, "_sit_packed")
    for rows in (1, 4, PACKED_MAX_ROWS + 8):
        ids = torch.arange(rows).remainder(900)[None, :] + 100
        with torch.inference_mode():
            assert torch.allclose(packed(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_models_loaded_on_two_threads_at_once_are_whole(smollm2_path):
    """The evaluate stage loads its judge on one thread while it loads a variant on another;
    two concurrent from_pretrained calls once left weights uninitialised (logits of 1e31 or NaN
    in 2 of 8 loads). Every load here must compute what a load alone does."""
    import threading

    import torch

    from sit_core.engine.models import load_causal_lm

    ids = torch.tensor([[100, 200, 300, 400, 500]])
    with torch.inference_mode():
        alone = load_causal_lm("embedded:smollm2-135m-instruct").model(input_ids=ids).logits
    results = []

    def load_five() -> None:
        for _ in range(5):
            model = load_causal_lm("embedded:smollm2-135m-instruct").model
            with torch.inference_mode():
                results.append(model(input_ids=ids).logits)

    threads = [threading.Thread(target=load_five) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 10
    assert all(torch.allclose(logits, alone, atol=1e-4, rtol=1e-4) for logits in results)


CHILD = """
import sys
from sit_core.driver import run_stage
from sit_core.stages.generate import magpie
from sit_core.config import load_config
cfg = load_config(None, preset="demo", profile="cpu", overrides=sys.argv[2:])
run_stage(cfg, sys.argv[1], "generate")
"""


def test_kill_and_resume_gives_identical_records(tmp_path, smollm2_path):
    cfg = demo_cfg()
    reference = tmp_path / "uninterrupted"
    run_stage(cfg, reference, "generate")
    expected = (reference / "generate" / "generated.jsonl").read_text()
    records = [json.loads(x) for x in expected.splitlines()]
    assert len(records) == 12 and all(r["instruction"] and r["response"] for r in records)
    assert len({r["instruction"].lower() for r in records}) == 12  # exact duplicates are rejected

    killed = tmp_path / "killed"
    log = killed / "generate" / "attempts.jsonl"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(killed), *OVERRIDES],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    sigkill_when(child, lambda: log.exists() and len(log.read_text().splitlines()) >= 4)
    done_before = len(read_jsonl(log))
    assert 4 <= done_before < 12
    with open(log, "a") as f:  # a torn last line, as from a kill mid-append
        f.write('{"index": 99, "status": "ok", "instr')

    manifest = run_stage(cfg, killed, "generate")
    assert (killed / "generate" / "generated.jsonl").read_text() == expected
    assert any(e["event"] == "resumed" for e in manifest["events"])
    assert manifest["status"] == "done"
    # A finished stage is not redone: the second call returns without loading the model.
    before = (killed / "generate" / "manifest.json").stat().st_mtime_ns
    assert run_stage(cfg, killed, "generate")["status"] == "done"
    assert (killed / "generate" / "manifest.json").stat().st_mtime_ns == before


def test_resume_with_other_settings_is_refused(tmp_path, smollm2_path):
    from sit_core.errors import ResumeMismatchError

    cfg = demo_cfg()
    stage_dir = tmp_path / "generate"
    stage_dir.mkdir()
    from sit_core.driver import open_stage

    open_stage(cfg, tmp_path, "generate")
    other = load_config(None, preset="demo", profile="cpu", overrides=OVERRIDES + ["generation.response_temperature=0.7"])
    with pytest.raises(ResumeMismatchError, match="generation.response_temperature"):
        run_stage(other, tmp_path, "generate")
    # batch size is performance-only: a different one resumes the same work
    faster = load_config(None, preset="demo", profile="cpu", overrides=OVERRIDES + ["generation.batch_size=2"])
    assert magpie.fingerprint(faster) == magpie.fingerprint(cfg)
