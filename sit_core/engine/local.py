"""sit's seeded decoding loop (sampling.py) over a model loaded in this process: `LocalEngine`,
and `load_variants`, which puts several adapters of one base model in it. The stages reach it
through engines.py; the transformers engine process (worker.py) runs it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sit_core.engine.models import LOADING, load_causal_lm, release
from sit_core.engine.sampling import Sampling, generate, soft_prompt


@dataclass(frozen=True)
class Completion:
    ids: list[int]
    truncated: bool  # reached max_new_tokens without a stop token


@dataclass(frozen=True)
class Variant:
    """How a LocalEngine applies one adapter: a LoRA by its PEFT adapter name, a prompt tuning
    by its soft prompt; neither is the base model."""

    lora: str | None = None
    prefix: object = None  # torch.Tensor, virtual tokens x hidden size


class LocalEngine:
    """sit's decoding loop in this process, `batch_size` prompts at a time.

    `variants` maps what a request names as its adapter (an adapter directory; None: no
    adapter) to how it applies here. A batch may mix them: its rows share every decoding
    step's pass over the base weights, which is what a step costs."""

    backend = "transformers"
    description = "sit's seeded decoding loop (sit_core/engine/sampling.py)"

    def __init__(self, model, pad_id: int, stops: set[int], batch_size: int = 1,
                 variants: dict[str | None, Variant] | None = None):
        self.model, self.pad_id, self.stops, self.batch_size = model, pad_id, stops, batch_size
        self.variants = variants or {None: Variant()}

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], sampling: Sampling,
                 adapters: Sequence[str | None] | None = None, on_step=None) -> list[Completion]:
        rows = [self._variant(a) for a in adapters] if adapters is not None else [self._variant(None)] * len(prompts)
        mixed = any(v.lora for v in self.variants.values())
        out: list[Completion] = []
        for i in range(0, len(prompts), self.batch_size):
            batch = rows[i:i + self.batch_size]
            for ids in generate(self.model, prompts[i:i + self.batch_size], seeds[i:i + self.batch_size],
                                sampling, self.stops, self.pad_id, on_step,
                                prefixes=[v.prefix for v in batch],
                                adapter_names=[v.lora or "__base__" for v in batch] if mixed else None):
                out.append(Completion(ids, len(ids) >= sampling.max_new_tokens))
        return out

    def _variant(self, adapter: str | None) -> Variant:
        try:
            return self.variants[adapter]
        except KeyError:
            raise ValueError(f"this engine has no adapter {adapter!r}; it has {sorted(map(str, self.variants))}") from None

    def close(self) -> None:
        self.model = self.variants = None
        release()


def load_variants(model: str, adapters: Sequence[str], *, load_in_4bit: bool = False,
                  trust_remote_code: bool = False) -> tuple[object, dict[str | None, Variant]]:
    """One copy of the base model `model` with every adapter directory in `adapters` on it:
    LoRAs as named adapters of one PeftModel, prompt tunings as soft prompts. Returns the model
    to decode with and LocalEngine's variants."""
    with LOADING:  # PEFT builds the adapters' layers as from_pretrained does
        return _load_variants(model, adapters, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)


def _load_variants(model: str, adapters: Sequence[str], *, load_in_4bit: bool,
                   trust_remote_code: bool) -> tuple[object, dict[str | None, Variant]]:
    base = load_causal_lm(model, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code).model
    variants: dict[str | None, Variant] = {None: Variant()}
    if not adapters:
        return base, variants
    from peft import PeftConfig, PeftModel

    loras = []
    for adapter in adapters:
        if PeftConfig.from_pretrained(adapter).is_prompt_learning:
            # Prompt learning adds no layers to the base model: its wrapper is dropped once the
            # soft prompt is read.
            variants[adapter] = Variant(prefix=soft_prompt(PeftModel.from_pretrained(base, adapter))[1])
        else:
            loras.append(adapter)
    decoder = base
    for n, adapter in enumerate(loras):
        if n == 0:
            decoder = PeftModel.from_pretrained(base, adapter, adapter_name=f"lora{n}")
        else:
            decoder.load_adapter(adapter, adapter_name=f"lora{n}")
        variants[adapter] = Variant(lora=f"lora{n}")
    return decoder.eval(), variants
