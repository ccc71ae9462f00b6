"""Seeded text generation shared by Magpie and the preference stage.

Each row carries its own torch.Generator seeded from (run seed, stage, item index), so a
sample depends only on its index, never on which other items shared its batch or whether
the run was interrupted. Rows are left-padded and decoded together with a KV cache; a row
stops at any of its stop ids and is padded from then on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch


def item_seed(run_seed: int, stage: str, index: int, salt: str = "") -> int:
    digest = hashlib.sha256(f"{run_seed}:{stage}:{index}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    import torch

    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p  # always keeps the top token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
        return int(order[choice.to(order.device)])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    sampling: Sampling,
    stop_ids: set[int],
    pad_id: int,
    on_step: Callable[[int], None] | None = None,
    prefixes: Sequence[torch.Tensor | None] | None = None,
    adapter_names: Sequence[str] | None = None,
) -> list[list[int]]:
    """Sample a continuation for each prompt (token ids); returns the new ids, stop id excluded.

    `on_step(step)` is called after every decoding step: a heartbeat for a watchdog that must
    tell a slow batch from a hung one. Per prompt, optionally:
    - `prefixes`: a prompt tuning's soft prompt (virtual tokens x hidden size) or None, put in
      front of the prompt once, in the prefill (soft_prompt());
    - `adapter_names`: the LoRA adapter of a PeftModel holding several ("__base__": none), so
      that one batch decodes several variants of one base model (PEFT's mixed-adapter batch)."""
    import torch

    with torch.inference_mode():
        return _decode(model, prompts, seeds, sampling, stop_ids, pad_id, on_step, prefixes, adapter_names)


def soft_prompt(model) -> tuple[object, torch.Tensor | None]:
    """(the model to decode with, its soft prompt): a prompt-tuned PeftModel's base model and
    virtual-token embeddings; any other model as it is, and None.

    PEFT puts the soft prompt inside forward(), which with a KV cache prepends it again at every
    decoding step: transformers' generate() on a PEFT 0.18 prompt tuning under transformers 5
    fed 21 positions per new token and wrote garbage ("TheYer\n\n\n..." where the same model
    decoded without a cache answers). Handing the embeddings to the prefill puts them in the
    cache once, as training saw them."""
    import torch

    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return model, None
    with torch.no_grad():
        prompt = model.get_prompt(batch_size=1)[0]
    return model.get_base_model(), prompt  # cast to the embeddings' dtype where it is used


def _decode(model, prompts, seeds, sampling: Sampling, stop_ids: set[int], pad_id: int,
            on_step: Callable[[int], None] | None, prefixes=None, adapter_names=None) -> list[list[int]]:
    import torch

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    past = None
    step_inputs = {"input_ids": input_ids}
    if prefixes is not None and any(p is not None for p in prefixes):
        # [soft prompt][left padding][prompt]: the soft prompt takes positions 0..n-1, as in
        # training; a row without one has those slots masked, like padding.
        embeds = model.get_input_embeddings()(input_ids)
        slots = max(p.shape[0] for p in prefixes if p is not None)
        soft = torch.zeros((len(prompts), slots, embeds.shape[-1]), dtype=embeds.dtype, device=device)
        soft_mask = torch.zeros((len(prompts), slots), dtype=torch.long, device=device)
        for i, p in enumerate(prefixes):
            if p is not None:
                soft[i, slots - p.shape[0]:] = p.to(device=device, dtype=embeds.dtype)
                soft_mask[i, slots - p.shape[0]:] = 1
        step_inputs = {"inputs_embeds": torch.cat([soft, embeds], dim=1)}
        attention = torch.cat([soft_mask, attention], dim=1)
    mixed = {"adapter_names": list(adapter_names)} if adapter_names is not None else {}
    fed = attention.shape[1]  # positions the next forward call feeds: the prefill's, then one
    for step in range(sampling.max_new_tokens):
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -fed:]
        # logits_to_keep=1: only the last position is sampled from, and the prompt's
        # full-vocabulary logits would dominate the prefill's cost.
        out = model(**step_inputs, attention_mask=attention, position_ids=positions,
                    past_key_values=past, use_cache=True, logits_to_keep=1, **mixed)
        past = out.past_key_values
        logits = out.logits[:, -1, :]
        next_ids = []
        for i in range(len(prompts)):
            if finished[i]:
                next_ids.append(pad_id)
                continue
            tok = _pick(logits[i], sampling, generators[i])
            if tok in stop_ids:
                finished[i] = True
            else:
                outputs[i].append(tok)
            next_ids.append(tok)
        if on_step is not None:
            on_step(step)
        if all(finished):
            break
        step_inputs = {"input_ids": torch.tensor(next_ids, dtype=torch.long, device=device).unsqueeze(1)}
        fed = 1
        attention = torch.cat([attention, torch.tensor([[0 if f else 1] for f in finished],
                                                       dtype=torch.long, device=device)], dim=1)
    return outputs


# ---------------------------------------------------------------------------------------
# Chat-template helpers (Magpie and the preference stage prompt instruct models the same way)

_SENTINEL = "\u0000SIT_QUERY\u0000"


def pre_query_template(tokenizer, system_prompt: str | None) -> tuple[str, str]:
    """(text before the user's message, text right after it) from the model's own template."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": _SENTINEL})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if _SENTINEL not in rendered:
        raise ValueError("the chat template dropped the user message; it cannot be used for Magpie")
    before, after = rendered.split(_SENTINEL, 1)
    return before, after


def stop_token_ids(eos_ids: set[int], tokenizer, after_user: str) -> set[int]:
    """End-of-turn (the first token after a user message in the template), the model's eos ids
    (models.eos_token_ids) and the tokenizer's."""
    ids = set(eos_ids)
    follow = tokenizer(after_user, add_special_tokens=False)["input_ids"]
    if follow:
        ids.add(follow[0])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def chat_prompt(tokenizer, system_prompt: str | None, instruction: str) -> list[int]:
    """Token ids of a one-turn chat, ending where the assistant's answer starts."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": instruction})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
