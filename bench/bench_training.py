"""Training throughput of the pipeline's stages against raw PyTorch loops, same process.

SFT:  the `sft` stage (trl SFTTrainer) vs a plain LoRA forward/backward/AdamW loop.
DPO:  the `dpo` stage (trl DPOTrainer) vs two forwards (policy with grad, reference with the
      adapter disabled) plus one backward and an AdamW step.

Same model, LoRA settings, batch size, sequence lengths and number of optimizer steps on
both sides; tokens are non-padding input tokens, as the stage's metrics count them. The
stage's figure is `tokens_per_sec` from its metrics.json (time inside optimizer steps only,
eval and checkpoint I/O excluded). Prints the ratios (goal >= 0.9); never asserts.

    .venv/bin/python bench/bench_training.py [--steps 8] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sit_core.config import load_config
from sit_core.driver import run_stage
from sit_core.stages import path_of
from sit_core.store.fileio import append_jsonl, read_json
from sit_core.training import common
from sit_core.stages import dpo
from sit_core.stages import sft

SUBJECTS = ["rivers", "volcanoes", "bread", "chess", "the moon", "bees", "rain", "glass", "maps", "clocks",
            "salt", "trains", "owls", "paper", "tea", "bridges", "copper", "wind", "cats", "ink"]


def write_inputs(run_dir: Path, n: int) -> None:
    """Records of varied length, so padding behaves as with real data."""
    kept, pairs = [], []
    for i in range(n):
        s = SUBJECTS[i % len(SUBJECTS)]
        body = " ".join(f"Fact {j} about {s}: it has a long history and many uses." for j in range(1 + i % 6))
        kept.append({"id": i, "instruction": f"Tell me about {s} (variant {i}).", "response": body})
        pairs.append({"id": i, "prompt": [{"role": "user", "content": f"Describe {s} (variant {i})."}],
                      "chosen": [{"role": "assistant", "content": body}],
                      "rejected": [{"role": "assistant", "content": f"{s} is a thing."}]})
    append_jsonl(run_dir / "filter" / "kept.jsonl", kept)
    append_jsonl(run_dir / "preference" / "pairs.jsonl", pairs)


def timed_steps(step, batches) -> float:
    """Tokens/s over all steps of `step(batch) -> tokens`."""
    tokens, seconds = 0, 0.0
    for batch in batches:
        t0 = time.perf_counter()
        tokens += step(batch)
        seconds += time.perf_counter() - t0
    return tokens / seconds


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def raw_sft(cfg, run_dir: Path, steps: int, batch: int) -> float:
    hw = common.hardware(cfg)
    tok = common.load_tokenizer(cfg)
    from peft import get_peft_model

    model = get_peft_model(common.load_base_model(cfg, hw), common.lora_config(cfg, cfg.training.lora_target_modules))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.training.sft_learning_rate)
    train, _ = common.kept_split(cfg, path_of(run_dir, sft.KEPT), "sft")
    seqs = [tok.apply_chat_template(common.conversation(r["instruction"], r["response"])["messages"], tokenize=True,
                                    return_dict=True)["input_ids"][: cfg.training.max_seq_length]
            for r in train]
    batches = [seqs[(i * batch) % len(seqs):][:batch] for i in range(steps)]

    def step(b):
        ids, mask = pad(b, tok.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids.to(hw.device), attention_mask=mask.to(hw.device), labels=labels.to(hw.device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(mask.sum())

    return timed_steps(step, batches)


def sequence_logps(model, ids, mask, completion) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logps = torch.gather(F.log_softmax(logits.float(), -1), 2, ids[:, 1:, None]).squeeze(-1)
    return (logps * completion[:, 1:]).sum(-1)


def raw_dpo(cfg, run_dir: Path, steps: int, batch: int) -> float:
    hw = common.hardware(cfg)
    tok = common.load_tokenizer(cfg)
    from peft import PeftModel

    model = PeftModel.from_pretrained(common.load_base_model(cfg, hw), str(path_of(run_dir, dpo.SFT_ADAPTER)),
                                      is_trainable=True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.training.dpo_learning_rate)
    rows, _ = common.pair_split(cfg, path_of(run_dir, dpo.PAIRS), "dpo")

    def encode(r, answer):
        prompt = tok.apply_chat_template(r["prompt"], tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        full = tok.apply_chat_template(r["prompt"] + r[answer], tokenize=True, return_dict=True)["input_ids"]
        return full[: cfg.training.max_seq_length], len(prompt)

    examples = [(encode(r, "chosen"), encode(r, "rejected")) for r in rows]
    batches = [examples[(i * batch) % len(examples):][:batch] for i in range(steps)]
    beta = cfg.training.dpo_beta

    def step(b):
        encoded = [c for c, _ in b] + [r for _, r in b]  # [chosen..., rejected...] as trl batches them
        ids, mask = pad([e[0] for e in encoded], tok.pad_token_id)
        completion = mask.clone()
        for i, (_, n_prompt) in enumerate(encoded):
            completion[i, :n_prompt] = 0
        ids, mask, completion = ids.to(hw.device), mask.to(hw.device), completion.to(hw.device)
        policy = sequence_logps(model, ids, mask, completion)
        with torch.no_grad(), model.disable_adapter():
            ref = sequence_logps(model, ids, mask, completion)
        pc, pr = policy.chunk(2)
        rc, rr = ref.chunk(2)
        loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(mask.sum())

    return timed_steps(step, batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    a = ap.parse_args()
    torch.manual_seed(0)
    n = a.steps * a.batch + 4
    cfg = load_config(None, preset="demo", profile="cpu" if not torch.cuda.is_available() else None, overrides=[
        f"models.target={a.model}", f"training.max_steps={a.steps}", f"training.max_seq_length={a.seq}",
        f"training.sft_batch_size={a.batch}", f"training.dpo_batch_size={a.batch}",
        "training.gradient_accumulation_steps=1", "training.dpo_gradient_accumulation_steps=1",
        "training.validation_size=4", f"training.sft_save_steps={a.steps}", f"training.dpo_save_steps={a.steps}",
        f"training.logging_steps={a.steps}", "generation.num_samples=1000", f"filter.target_count={n}",
        f"preference.num_pairs={n}"])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        write_inputs(run_dir, n)
        rows = []
        for name, stage, raw in (("SFT", sft, raw_sft), ("DPO", dpo, raw_dpo)):
            baseline = raw(cfg, run_dir, a.steps, a.batch)
            run_stage(cfg, run_dir, stage.NAME)
            ours = read_json(run_dir / stage.NAME / common.METRICS)["tokens_per_sec"]
            rows.append((name, ours, baseline))
    print(f"device={common.hardware(cfg).device} model={a.model} steps={a.steps} batch={a.batch} seq<={a.seq}")
    print(f"{'method':6} {'stage tok/s':>12} {'raw tok/s':>10} {'ratio':>6}")
    for name, ours, baseline in rows:
        print(f"{name:6} {ours:12.1f} {baseline:10.1f} {ours / baseline:6.2f}")


if __name__ == "__main__":
    main()
