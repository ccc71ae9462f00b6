"""The one validated configuration object of the pipeline.

A user's config.json (the seed format: flat `training` section, `checkpoint_interval`,
sample counts) or YAML file is merged over a preset and a hardware profile:

    defaults  <  hardware profile  <  preset  <  user file  <  command-line overrides

Fields marked `perf` in their description are performance-only: they change speed or
memory, not results, and are left out of every stage's cache key and resume fingerprint.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sit_core.config.batches import BATCH_FIELDS
from sit_core.errors import ConfigError
from sit_core.config.backend import detect_backend
from sit_core.config.profiles import PROFILE_NAMES, detect_profile, profile_overrides
from sit_core.secrets import hf_token  # noqa: F401 - lives in secrets.py; re-exported for existing callers

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
EMBEDDED_MINILM = "embedded:all-minilm-l6-v2"
PERF = {"perf": True}  # json_schema_extra marker for performance-only fields


def legacy(value: Any) -> dict:
    """json_schema_extra marker of a result-affecting field added after run directories existed:
    `value` is what a run that predates the field did. A run.json without the field continues
    with it, and the field enters fingerprints only at another value, so older run directories
    and their stages keep their fingerprints."""
    return {"legacy": value}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ResponseModel(_Section):
    """One response writer for preference data. The same model may appear twice with
    different sampling settings (the offline demo does this with the embedded model)."""

    name: str = Field(description="label used in statistics (wins per model)")
    model: str = Field(description="hub id, local path, or embedded:<name>")
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    load_in_4bit: bool = False


class ModelsConfig(_Section):
    generator: str = "meta-llama/Llama-3.1-8B-Instruct"
    generator_4bit: bool = Field(True, description="4-bit NF4 via bitsandbytes; CUDA only, ignored on CPU")
    response_models: list[ResponseModel] = Field(
        default_factory=lambda: [
            ResponseModel(name="llama-3.2-1b", model="meta-llama/Llama-3.2-1B-Instruct"),
            ResponseModel(name="mistral-7b", model="mistralai/Mistral-7B-Instruct-v0.2", load_in_4bit=True),
            ResponseModel(name="qwen2.5-3b", model="Qwen/Qwen2.5-3B-Instruct"),
        ]
    )
    reward_model: str = Field(
        "OpenAssistant/reward-model-deberta-v3-large-v2",
        description="a sequence-classification reward model, or any chat model when reward_type is llm_judge",
    )
    reward_type: Literal["classifier", "llm_judge"] = "classifier"
    target: str = "meta-llama/Llama-3.2-3B"
    trust_remote_code: bool = False

    @field_validator("response_models")
    @classmethod
    def _unique_names(cls, v: list[ResponseModel]) -> list[ResponseModel]:
        names = [m.name for m in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"response model names must be unique; repeated: {dupes}")
        return v


class GenerationConfig(_Section):
    """Stage 1, Magpie. Defaults follow the Magpie paper: instructions sampled at
    temperature 1.0 / top-p 1.0, responses decoded greedily."""

    num_samples: int = Field(1500, ge=1)
    system_prompt: str | None = None
    instruction_temperature: float = Field(1.0, ge=0.0, le=5.0)
    instruction_top_p: float = Field(1.0, gt=0.0, le=1.0)
    instruction_max_tokens: int = Field(128, ge=1)
    response_temperature: float = Field(0.0, ge=0.0, le=5.0)
    response_top_p: float = Field(1.0, gt=0.0, le=1.0)
    response_max_tokens: int = Field(1024, ge=1)
    max_attempts_factor: float = Field(
        3.0, ge=1.0, description="give up after num_samples x this many attempts (empty or duplicate instructions)"
    )
    batch_size: int = Field(1, ge=1, json_schema_extra=PERF,
                            description="prompts per engine call, and the unit of Magpie's checkpoints")
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", json_schema_extra=PERF,
        description="the engine of every generating stage (Magpie, preference responses, agent evaluation): "
                    "transformers (sit's seeded loop), vllm, or auto (vllm where its environment is found). Records "
                    "carry the backend that wrote them; a run may resume on the other one")
    vllm_python: str | None = Field(None, json_schema_extra=PERF,
                                    description="interpreter of the vLLM environment; default: found (sit engine check)")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, json_schema_extra=PERF,
                                          description="share of the GPU vLLM may take (weights, KV cache, activations)")
    stall_timeout_s: float = Field(300.0, gt=0, json_schema_extra=PERF,
                                   description="kill an engine process that makes no progress this long, then go on "
                                               "in stable mode")


class LengthRule(_Section):
    min: int = Field(20, ge=0)
    max: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "LengthRule":
        if self.min > self.max:
            raise ValueError(f"length.min ({self.min}) is greater than length.max ({self.max})")
        return self


class RepetitionRule(_Section):
    max_repeat: int = Field(3, ge=1)


class DiversityRule(_Section):
    jaccard_threshold: float = Field(0.8, gt=0.0, le=1.0)
    num_perm: int = Field(128, ge=16)
    shingle_size: int = Field(1, ge=1, description="word n-gram size of the Jaccard sets")
    semantic: bool = Field(False, description="also drop semantic near-duplicates (all-MiniLM embeddings)")
    semantic_threshold: float = Field(0.95, gt=0.0, le=1.0)
    semantic_model: str = EMBEDDED_MINILM


class FilterConfig(_Section):
    length: LengthRule = Field(default_factory=LengthRule)
    repetition: RepetitionRule = Field(default_factory=RepetitionRule)
    diversity: DiversityRule = Field(default_factory=DiversityRule)
    refusal_keywords: list[str] = Field(
        default_factory=lambda: ["I'm an AI", "I cannot", "I don't have", "As an AI", "I'm not able"]
    )
    language: str = Field("en", description="ISO 639-1 code of the language to keep")
    target_count: int = Field(1000, ge=1)
    min_count: int | None = Field(None, ge=1, description="fewest survivors to go on with; default target_count")


class PreferenceConfig(_Section):
    num_pairs: int = Field(600, ge=1)
    responses_per_model: int = Field(1, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    min_margin: float = Field(0.5, ge=0.0, description="chosen score minus rejected score must reach this")
    min_pairs: int | None = Field(None, ge=1, description="fewest pairs to go on with; default num_pairs")
    generation_batch_size: int = Field(1, ge=1, json_schema_extra=PERF, description="1 = stable sequential mode")
    stall_timeout_s: float = Field(300.0, gt=0, json_schema_extra=PERF)
    reward_batch_size: int = Field(8, ge=1, json_schema_extra=PERF)
    reward_max_length: int = Field(512, ge=8)
    judge_question: str = "Is the response a helpful, correct and complete answer to the user's request?"


class TrainingConfig(_Section):
    """Flat, as in seed 000. The per-method batch sizes and gradient accumulation come from
    the hardware profile unless set here."""

    sft_epochs: float = Field(3, gt=0)
    sft_batch_size: int = Field(4, ge=1, json_schema_extra=PERF)
    sft_learning_rate: float = Field(2e-4, gt=0)
    dpo_epochs: float = Field(1, gt=0)
    dpo_batch_size: int = Field(2, ge=1, json_schema_extra=PERF)
    dpo_learning_rate: float = Field(5e-5, gt=0)
    dpo_beta: float = Field(0.1, gt=0)
    gradient_accumulation_steps: int = Field(4, ge=1, json_schema_extra=PERF)
    dpo_gradient_accumulation_steps: int | None = Field(None, ge=1, json_schema_extra=PERF)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    prompt_tuning_virtual_tokens: int = Field(20, ge=1)
    prompt_tuning_init: Literal["RANDOM", "TEXT"] = "RANDOM"
    prompt_tuning_learning_rate: float = Field(3e-2, gt=0)
    prompt_tuning_epochs: float = Field(3, gt=0)
    prompt_tuning_batch_size: int = Field(4, ge=1, json_schema_extra=PERF)
    prompt_tuning_gradient_accumulation_steps: int | None = Field(None, ge=1, json_schema_extra=PERF)
    validation_size: int = Field(100, ge=1)
    dpo_validation_size: int | None = Field(
        None, ge=1, json_schema_extra=legacy(None),
        description="preference pairs held out from DPO, at most half of them (null: validation_size, at most a "
                    "tenth of them)")
    completion_only_loss: bool = Field(
        True, json_schema_extra=legacy(False),
        description="SFT and prompt tuning learn the responses only (trl's completion-only loss); false: the "
                    "whole conversation, instruction included")
    max_seq_length: int = Field(1024, ge=16)
    sft_warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    dpo_warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    lr_scheduler_type: str = "cosine"
    max_steps: int = Field(-1, description="cap on optimizer steps per method (-1: epochs decide); for smoke runs")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", json_schema_extra=PERF)
    tf32: bool = Field(False, json_schema_extra=PERF)
    qlora: bool = Field(False, description="load the target in 4-bit NF4 with a paged optimizer (CUDA only)")
    optim: str = Field("adamw_torch", json_schema_extra=PERF)
    sft_save_steps: int = Field(200, ge=1, json_schema_extra=PERF)
    dpo_save_steps: int = Field(100, ge=1, json_schema_extra=PERF)
    logging_steps: int = Field(10, ge=1, json_schema_extra=PERF)
    gradient_checkpointing: bool = Field(False, json_schema_extra=PERF)
    num_processes: int = Field(
        1, ge=1, json_schema_extra=PERF,
        description="data-parallel training processes (one per GPU), started with `accelerate launch` (DDP); "
                    "the effective batch stays the profile's, split over the processes")

    def batch(self, method: str) -> tuple[int, int]:
        """(per-device batch, gradient accumulation) of a training method: 'sft',
        'prompt_tuning' or 'dpo'. Their product is the method's effective batch."""
        size, accumulation = BATCH_FIELDS[method]
        return getattr(self, size), getattr(self, accumulation) or self.gradient_accumulation_steps


class AgentEvalConfig(_Section):
    enabled: bool = True
    num_tasks: int = Field(24, ge=1)
    max_steps: int = Field(4, ge=1)
    agentbench_path: str | None = None


class EvaluationConfig(_Section):
    tasks: list[str] = Field(default_factory=lambda: ["ifeval", "mmlu", "truthfulqa_mc2", "hellaswag"])
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1, json_schema_extra=PERF)
    variants: list[Literal["base", "sft", "prompt_tuning", "dpo"]] = Field(
        default_factory=lambda: ["base", "sft", "prompt_tuning", "dpo"]
    )
    agent: AgentEvalConfig = Field(default_factory=AgentEvalConfig)
    answer_max_tokens: int | None = Field(
        None, ge=1, json_schema_extra=legacy(None),
        description="length budget of the held-out answers the win rate compares (null: preference.max_new_tokens)")


class SitConfig(_Section):
    run_name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 42
    profile: Literal["cpu", "t4", "a100", "h100"] = "cpu"
    checkpoint_interval: int = Field(100, ge=1, json_schema_extra=PERF)
    hub_repo: str | None = Field(None, description="user/name of a private Hub repo that mirrors the run directory")
    stages: list[str] = Field(default_factory=lambda: list(STAGE_ORDER))
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _counts_fit(self) -> "SitConfig":
        if self.filter.target_count > self.generation.num_samples:
            raise ValueError(
                f"filter.target_count ({self.filter.target_count}) is larger than generation.num_samples "
                f"({self.generation.num_samples}): the filter can only remove records"
            )
        if self.preference.num_pairs > self.filter.target_count:
            raise ValueError(
                f"preference.num_pairs ({self.preference.num_pairs}) is larger than filter.target_count "
                f"({self.filter.target_count}): each pair needs its own kept instruction"
            )
        unknown = [s for s in self.stages if s not in STAGE_ORDER]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGE_ORDER)}")
        return self

    def fingerprint(self, section: str | None = None) -> dict:
        """The config as it affects results: performance-only fields removed."""
        data = self.model_dump(mode="json")
        if section is not None:
            return _strip_perf(getattr(self, section), data[section])
        return {k: _strip_perf(getattr(self, k), v) if isinstance(getattr(self, k), BaseModel) else v
                for k, v in data.items() if not _is_perf(type(self), k)}


# The stage registry, in pipeline order: each name is a module or package sit_core/stages/<name>
# declaring its STAGE (sit_core/contract.py). A stage comes after every stage it reads from.
STAGE_ORDER = ("generate", "filter", "preference", "sft", "prompt_tuning", "dpo", "evaluate", "report")


def _is_perf(model_cls: type[BaseModel], field: str) -> bool:
    extra = model_cls.model_fields[field].json_schema_extra
    return isinstance(extra, dict) and extra.get("perf") is True


def _legacy(model_cls: type[BaseModel], field: str) -> tuple[bool, Any]:
    """(whether the field carries a legacy value, that value)."""
    extra = model_cls.model_fields[field].json_schema_extra
    return (True, extra["legacy"]) if isinstance(extra, dict) and "legacy" in extra else (False, None)


def at_legacy(model: BaseModel, field: str) -> bool:
    """Whether a field holds the value that runs before the field existed had: such a value
    stays out of fingerprints, so they match the ones those runs recorded."""
    marked, value = _legacy(type(model), field)
    return marked and getattr(model, field) == value


def recorded_recipe(recorded: dict, continuing: bool) -> dict:
    """The layer a run directory's run.json (its resolved config, `recorded`) adds under what
    is given now: the legacy value of each legacy field it lacks, and, when the run continues
    from its record alone (`continuing`), every result-affecting value it recorded, so a run
    keeps its recipe when a preset's values change between releases. Keys this version does
    not know, performance-only fields and the run-level keys (profile, stages, hub mirror)
    are left to the layers below."""
    def walk(model_cls: type[BaseModel], data: Any) -> dict:
        out: dict = {}
        data = data if isinstance(data, dict) else {}
        for name, field in model_cls.model_fields.items():
            if _is_perf(model_cls, name) or (model_cls is SitConfig and name in RUN_LEVEL_KEYS):
                continue
            marked, value = _legacy(model_cls, name)
            sub = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
                else None
            if name not in data:
                if marked:
                    out[name] = value
            elif sub is not None:
                out[name] = walk(sub, data[name])
            elif continuing:
                out[name] = data[name]
        return out

    return walk(SitConfig, recorded)


# Config keys that describe the run rather than its recipe: left out of run.json's fingerprint.
RUN_LEVEL_KEYS = ("stages", "profile", "hub_repo")


def _strip_perf(model: BaseModel, data: Any) -> Any:
    if not isinstance(model, BaseModel):
        return data
    out = {}
    for name, value in data.items():
        if _is_perf(type(model), name) or at_legacy(model, name):
            continue
        sub = getattr(model, name)
        if isinstance(sub, BaseModel):
            out[name] = _strip_perf(sub, value)
        elif isinstance(sub, list) and sub and isinstance(sub[0], BaseModel):
            out[name] = [_strip_perf(s, v) for s, v in zip(sub, value)]
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------
# Loading


PRESETS = ("demo", "colab-t4", "colab-a100")

_OLD_LORA_KEYS = {"r": "lora_r", "lora_alpha": "lora_alpha", "alpha": "lora_alpha",
                  "lora_dropout": "lora_dropout", "dropout": "lora_dropout", "target_modules": "lora_target_modules"}


def load_preset(name: str) -> dict:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'.{hint}", f"use one of: {', '.join(PRESETS)}")
    text = resources.files("sit_core.config.presets").joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def read_config_file(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist", "check the path given to --config")
    # utf-8-sig: Windows editors (Notepad) save UTF-8 with a byte-order mark, which json refuses.
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(_strip_json_comments(text))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
                          "fix the syntax there (a missing comma or quote is the usual cause)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}", "fix the syntax at the position shown") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold an object/mapping at the top level, not {type(data).__name__}",
                          "wrap the settings in { ... }")
    return data


def _strip_json_comments(text: str) -> str:
    """The seed documents annotate config.json with // comments; accept them."""
    out_lines = []
    for line in text.splitlines():
        in_str = False
        cut = None
        i = 0
        while i < len(line):
            c = line[i]
            if c == '"' and (i == 0 or line[i - 1] != "\\"):
                in_str = not in_str
            elif not in_str and line.startswith("//", i):
                cut = i
                break
            i += 1
        out_lines.append(line if cut is None else line[:cut])
    return "\n".join(out_lines)


def _check_old_layout(data: dict) -> None:
    if "lora" in data:
        lora = data["lora"] if isinstance(data["lora"], dict) else {}
        moves = [f'"{k}" -> training.{_OLD_LORA_KEYS.get(k, "lora_" + k)}' for k in lora]
        raise ConfigError(
            "config uses the old nested layout with a separate 'lora' section",
            "move its keys into the flat 'training' section and delete 'lora' (seed 000's layout): "
            + (", ".join(moves) if moves else "lora.r -> training.lora_r, lora.lora_alpha -> training.lora_alpha"),
        )
    training = data.get("training")
    if isinstance(training, dict):
        nested = [k for k in ("sft", "dpo", "lora") if isinstance(training.get(k), dict)]
        if nested:
            raise ConfigError(
                f"config uses the old nested layout: training.{nested[0]} is a section",
                "flatten it into 'training' with prefixed keys, e.g. training.sft.batch_size -> training.sft_batch_size, "
                "training.dpo.beta -> training.dpo_beta",
            )


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(expr: str) -> dict:
    """`training.sft_epochs=1` -> {"training": {"sft_epochs": 1}} (value parsed as JSON when it can be)."""
    if "=" not in expr:
        raise ConfigError(f"override '{expr}' has no '='", "write overrides as section.key=value, e.g. generation.num_samples=20")
    key, raw = expr.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(
    config: str | Path | dict | None = None,
    *,
    preset: str | None = None,
    profile: str | None = None,
    overrides: list[str] | None = None,
    recipe: dict | None = None,
    auto_profile: str | None = None,
    auto_backend: str | None = None,
) -> SitConfig:
    """Resolve defaults < profile < preset < recipe < user config < overrides into one SitConfig.
    `recipe`: what a run directory being continued recorded (`recorded_recipe`). `auto_profile`
    and `auto_backend`: what `auto` means when the work runs on other machines (a Ray cluster's
    workers, which report their own GPU and vLLM); by default, this machine's."""
    user = read_config_file(config) if isinstance(config, (str, Path)) else copy.deepcopy(config or {})
    _check_old_layout(user)
    preset_name = preset or user.pop("preset", None) or ("demo" if config is None else None)
    preset_data = load_preset(preset_name) if preset_name else {}
    layered = deep_merge(deep_merge(preset_data, recipe or {}), user)
    for expr in overrides or []:
        layered = deep_merge(layered, parse_override(expr))
    requested = profile or layered.get("profile", "auto")
    if requested != "auto" and requested not in PROFILE_NAMES:
        close = difflib.get_close_matches(str(requested), PROFILE_NAMES + ("auto",), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown hardware profile '{requested}'.{hint}", f"use one of: auto, {', '.join(PROFILE_NAMES)}")
    resolved_profile = (auto_profile or detect_profile()) if requested == "auto" else requested
    generation = layered.get("generation") if isinstance(layered.get("generation"), dict) else {}
    backend = generation.get("backend", "auto")
    if backend == "auto":
        backend = auto_backend or detect_backend(generation.get("vllm_python"))
    merged = deep_merge(profile_overrides(resolved_profile, backend), layered)
    merged["profile"] = resolved_profile
    if backend in ("transformers", "vllm"):  # anything else is left for validation to name
        merged.setdefault("generation", {})["backend"] = backend
    try:
        return SitConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(*_explain(e)) from None


def _explain(err: ValidationError) -> tuple[str, str]:
    problems, fixes = [], []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            parent = _model_at(SitConfig, item["loc"][:-1])
            known = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(item["loc"][-1]), known, n=1, cutoff=0.6)
            problems.append(f"unknown key '{loc}'")
            fixes.append(f"did you mean '{'.'.join(map(str, item['loc'][:-1] + (close[0],)))}'?" if close
                         else f"remove it; valid keys here are: {', '.join(known)}")
        else:
            problems.append(f"'{loc}': {item['msg']} (got {item.get('input')!r})" if loc else item["msg"])
            fixes.append(f"set '{loc}' to a valid value" if loc else "adjust the counts")
    return "invalid configuration: " + "; ".join(problems), "; ".join(dict.fromkeys(fixes))


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or os.path.isabs(ref) or "\\" in ref
