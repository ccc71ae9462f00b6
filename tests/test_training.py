"""Training stages on the real embedded SmolLM2 at tiny scale: SFT kill/resume equals an
uninterrupted run, prompt tuning through an injected OOM, DPO from the SFT adapter, and the
bad-input errors that must come before any model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sit_core.driver import run_stage
from sit_core.config import load_config
from sit_core.errors import ResumeMismatchError, SitError
from sit_core.store.fileio import append_jsonl, read_json
from sit_core.driver import open_stage
from sit_core.config import batches
from sit_core.training import common

TINY = ["training.max_steps=4", "training.sft_save_steps=2", "training.dpo_save_steps=2",
        "training.max_seq_length=96", "training.validation_size=2", "training.sft_batch_size=2",
        "training.prompt_tuning_batch_size=2", "training.dpo_batch_size=2", "training.logging_steps=1"]
TOPICS = ["rivers", "volcanoes", "bread", "chess", "the moon", "bees", "rain", "glass",
          "maps", "clocks", "salt", "trains", "owls", "paper", "tea", "bridges"]


def tiny_cfg(*extra: str):
    return load_config(None, preset="demo", profile="cpu", overrides=[*TINY, *extra])


def write_inputs(run_dir: Path, n_kept: int = 16, n_pairs: int = 10) -> None:
    (run_dir / "filter").mkdir(parents=True, exist_ok=True)
    append_jsonl(run_dir / "filter" / "kept.jsonl", [
        {"id": i, "instruction": f"Tell me one interesting fact about {t}.",
         "response": f"Here is a fact about {t}: people have studied {t} for centuries."}
        for i, t in enumerate(TOPICS[:n_kept])])
    (run_dir / "filter" / "kept.jsonl").touch()
    append_jsonl(run_dir / "preference" / "pairs.jsonl", [
        {"id": i, "prompt": [{"role": "user", "content": f"Describe {t} briefly."}],
         "chosen": [{"role": "assistant", "content": f"{t.capitalize()} are fascinating and useful to people."}],
         "rejected": [{"role": "assistant", "content": "I don't know."}]}
        for i, t in enumerate(TOPICS[:n_pairs])])


def adapter_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


@pytest.fixture(scope="module")
def sft_done(tmp_path_factory, smollm2_path) -> Path:
    """One uninterrupted SFT run, the reference for the resume test and the input of DPO."""
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    write_inputs(run_dir)
    run_stage(tiny_cfg(), run_dir, "sft")
    return run_dir


# ---------------------------------------------------------------------------------------
# Bad input: clear errors before any model loads


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(common, "load_base_model", refuse)


@pytest.mark.parametrize("n_kept", [0, 2])
def test_too_small_dataset_fails_before_model_load(run_dir, n_kept, no_model_loads):
    write_inputs(run_dir, n_kept=n_kept)
    with pytest.raises(SitError, match="too few for a validation split"):
        run_stage(tiny_cfg(), run_dir, "sft")


def test_model_without_lora_targets_lists_its_modules(run_dir, smollm2_path, no_model_loads):
    write_inputs(run_dir)
    with pytest.raises(SitError) as e:
        run_stage(tiny_cfg('training.lora_target_modules=["c_attn","query"]'), run_dir, "sft")
    msg = str(e.value)
    assert "none of the LoRA target modules" in msg
    for have in ("q_proj", "down_proj", "lm_head"):
        assert have in msg


def test_resume_against_different_config_is_refused(run_dir, smollm2_path, no_model_loads):
    write_inputs(run_dir)
    open_stage(tiny_cfg(), run_dir, "sft")  # a partial SFT stage made with r=8
    with pytest.raises(ResumeMismatchError, match="lora_r"):
        run_stage(tiny_cfg("training.lora_r=4"), run_dir, "sft")


def test_backoff_keeps_effective_batch():
    assert batches.backoff(12, 2) == (6, 4)
    assert batches.backoff(6, 4) == (3, 8)
    assert batches.backoff(3, 8) == (1, 24)
    assert batches.backoff(8, 2) == (4, 4)
    assert batches.backoff(2, 1) == (1, 2)


def test_split_is_deterministic_and_disjoint():
    rows = [{"id": i} for i in range(20)]
    a = common.split_records(rows, 5, seed=7, stage="sft")
    assert a == common.split_records(rows, 5, seed=7, stage="sft")
    assert a != common.split_records(rows, 5, seed=8, stage="sft")
    train, val = a
    assert len(val) == 5 and len(train) == 15
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in val})


# ---------------------------------------------------------------------------------------
# SFT: outputs, idempotency, kill and resume


def test_sft_outputs_and_metrics(sft_done, monkeypatch):
    d = sft_done / "sft"
    metrics = read_json(d / "metrics.json")
    for key in ("train_loss", "eval_loss", "total_steps", "training_time_minutes", "trainable_params",
                "trainable_ratio_percent", "peak_memory_gb", "tokens_per_sec", "inference_speed_tok_per_sec"):
        assert metrics[key] is not None and metrics[key] >= 0, key
    assert metrics["total_steps"] == 4 and metrics["precision"] == "fp32"
    assert 0 < metrics["trainable_ratio_percent"] < 5
    config = read_json(d / "final" / "training_config.json")
    assert config["lora_config"]["r"] == 8 and config["training_data_size"] == 14
    assert config["results"]["total_steps"] == 4
    assert (d / "final" / "tokenizer_config.json").exists() and (d / "curves.png").stat().st_size > 0
    history = read_json(d / "log_history.json")
    assert any("eval_loss" in h for h in history) and any("loss" in h for h in history)
    assert (d / "checkpoints" / "checkpoint-4" / "optimizer.pt").exists()
    manifest = read_json(d / "manifest.json")
    assert manifest["status"] == "done" and "sft/metrics.json" in manifest["outputs"]
    # Done: a second call returns the manifest without loading a model.
    monkeypatch.setattr(common, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    assert run_stage(tiny_cfg(), sft_done, "sft")["finished_at"] == manifest["finished_at"]


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from transformers import TrainerCallback
    from sit_core.config import load_config
    from sit_core.driver import run_stage

    run_dir, marker, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]

    class Hang(TrainerCallback):
        # After step 3, checkpoint-2 is on disk: say so, then wait for the SIGKILL.
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                marker.write_text("ready")
                time.sleep(3600)

    run_stage(load_config(None, preset="demo", profile="cpu", overrides=overrides), run_dir, "sft", callbacks=(Hang(),))
""")


def test_sft_sigkill_then_resume_matches_uninterrupted(tmp_path, sft_done):
    run_dir = tmp_path / "run"
    write_inputs(run_dir)
    script, marker = tmp_path / "child.py", tmp_path / "ready"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(run_dir), str(marker), *TINY],
                             cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "child never reached step 3"
        time.sleep(0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    ckpts = run_dir / "sft" / "checkpoints"
    assert common.checkpoint_is_complete(ckpts / "checkpoint-2")
    # A checkpoint cut off mid-write: adapter present, optimizer and trainer state missing.
    torn = ckpts / "checkpoint-4"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes((ckpts / "checkpoint-2" / "adapter_model.safetensors").read_bytes())

    manifest = run_stage(tiny_cfg(), run_dir, "sft")

    events = [e["event"] for e in manifest["events"]]
    assert "checkpoint_incomplete" in events
    starts = [e for e in manifest["events"] if e["event"] == "train_start"]
    assert starts[-1]["resume_from"] == "sft/checkpoints/checkpoint-2"
    assert read_json(run_dir / "sft" / "metrics.json")["total_steps"] == 4
    assert_same_weights(adapter_weights(run_dir / "sft" / "final"), adapter_weights(sft_done / "sft" / "final"))
    state = read_json(run_dir / "sft" / "checkpoints" / "checkpoint-4" / "trainer_state.json")
    reference = read_json(sft_done / "sft" / "checkpoints" / "checkpoint-4" / "trainer_state.json")
    assert state["global_step"] == reference["global_step"] == 4
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses == pytest.approx([h["loss"] for h in reference["log_history"] if "loss" in h], rel=1e-5)


# ---------------------------------------------------------------------------------------
# Prompt tuning through an OOM; DPO from the SFT adapter


def test_prompt_tuning_backs_off_on_oom_and_resumes(run_dir, smollm2_path):
    import torch
    from transformers import TrainerCallback

    write_inputs(run_dir)

    class OomOnce(TrainerCallback):
        fired = False

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2 and not OomOnce.fired:  # checkpoint-2 exists by now
                OomOnce.fired = True
                raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    manifest = run_stage(tiny_cfg(), run_dir, "prompt_tuning", callbacks=(OomOnce(),))

    assert OomOnce.fired
    backoffs = [e for e in manifest["events"] if e["event"] == "oom_backoff"]
    assert len(backoffs) == 1
    assert (backoffs[0]["from_batch_size"], backoffs[0]["to_batch_size"]) == (2, 1)
    assert backoffs[0]["to_gradient_accumulation_steps"] == 2
    starts = [e for e in manifest["events"] if e["event"] == "train_start"]
    assert starts[-1]["resume_from"] == "prompt_tuning/checkpoints/checkpoint-2"
    metrics = read_json(run_dir / "prompt_tuning" / "metrics.json")
    assert metrics["total_steps"] == 4 and metrics["batch_size"] == 1 and metrics["gradient_accumulation_steps"] == 2
    # 20 virtual tokens x hidden size are the only trainable parameters
    assert metrics["trainable_params"] == 20 * 576
    adapter = json.loads((run_dir / "prompt_tuning" / "final" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PROMPT_TUNING" and adapter["num_virtual_tokens"] == 20


def test_dpo_starts_from_sft_and_references_it(sft_done):
    import torch
    from transformers import TrainerCallback

    sft_weights = adapter_weights(sft_done / "sft" / "final")
    seen = {}

    class Inspect(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            params = dict(model.named_parameters())
            for key, value in sft_weights.items():
                name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                    ".lora_B.weight", ".lora_B.default.weight")
                seen.setdefault("policy", []).append(torch.equal(params[name].detach().cpu(), value))
                seen.setdefault("ref", []).append(
                    torch.equal(params[name.replace(".default.", ".ref.")].detach().cpu(), value))
            seen["ref_frozen"] = not any(p.requires_grad for n, p in params.items() if ".ref." in n)

    manifest = run_stage(tiny_cfg(), sft_done, "dpo", callbacks=(Inspect(),))

    assert all(seen["policy"]) and all(seen["ref"]) and seen["ref_frozen"]
    assert manifest["status"] == "done"
    metrics = read_json(sft_done / "dpo" / "metrics.json")
    assert metrics["total_steps"] == 4
    assert metrics["trainable_params"] == read_json(sft_done / "sft" / "metrics.json")["trainable_params"]
    final = adapter_weights(sft_done / "dpo" / "final")
    assert final.keys() == sft_weights.keys()  # only the policy adapter is saved, not the reference copy
    assert any(not torch.equal(final[k], sft_weights[k]) for k in final)
    assert read_json(sft_done / "dpo" / "final" / "training_config.json")["dpo_config"]["beta"] == 0.1


# ---------------------------------------------------------------------------------------
# What SFT learns, measured on held-out records at the demo's sizes


def held_out_losses(cfg, run_dir: Path, adapter: Path | None) -> list[float]:
    """Per held-out record, the mean loss of its response's tokens under base or an adapter: the
    evaluate stage's held-out loss."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sit_core.engine.models import resolve_model_path
    from sit_core.stages.evaluate import held_out

    path = resolve_model_path(cfg.models.target)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)) if adapter else model
    tokenizer = AutoTokenizer.from_pretrained(str(adapter) if adapter else path)
    _, records = common.kept_split(cfg, run_dir / "filter" / "kept.jsonl", "sft")
    scored = [held_out.response_logprob(model.eval(), tokenizer, [held_out.user(r["instruction"])],
                                        [held_out.assistant(r["response"])], cfg.training.max_seq_length)
              for r in records]
    return [-lp / n for lp, n in scored]


@pytest.mark.slow
def test_sft_lowers_the_held_out_loss_beyond_noise_and_response_only_learns_the_responses(tmp_path, smollm2_path):
    """The demo's SFT settings (8 records held out, 4 steps): SFT's loss on the held-out responses
    is below base's on every record, significant in the paired test the report uses. Trained on
    the responses only (the default), it ends lower on those response tokens than trained on
    whole conversations (the switch's other setting) after the same steps."""
    from sit_core.stages.evaluate import stats

    runs = {}
    for only in (True, False):
        run_dir = tmp_path / f"only-{only}"
        write_inputs(run_dir)
        cfg = load_config(None, preset="demo", profile="cpu", overrides=[f"training.completion_only_loss={json.dumps(only)}"])
        assert cfg.training.validation_size == 8 and cfg.training.max_steps == 4
        run_stage(cfg, run_dir, "sft")
        runs[only] = held_out_losses(cfg, run_dir, run_dir / "sft" / "final")
    base = held_out_losses(cfg, run_dir, None)
    versus_base = stats.paired(runs[True], base, seed=42)
    assert versus_base["diff"] < 0 and versus_base["significant"], versus_base
    response_only_vs_full = stats.paired(runs[True], runs[False], seed=42)
    assert response_only_vs_full["diff"] < 0, (response_only_vs_full, base)
