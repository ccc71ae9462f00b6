"""The GPU measurements of issue 13 (item 10), as one script of a few minutes for a lent GPU
machine that has torch with CUDA, transformers and peft, and no network.

The models are randomly initialised, in the real architectures' shapes, in bf16:
- generation: Llama-3.1-8B's shape through sit's own decoding loop (sit_core/engine/sampling.py),
  at batch 1 (the seeds' notebooks and the GPU presets' transformers fallback) and at larger
  batches; tokens/s, sampled and greedy;
- training: Llama-3.2-3B's shape, a few optimizer steps of each of sit's training methods as
  plain PyTorch + PEFT loops with tf32 on: LoRA SFT, prompt tuning, DPO (policy with LoRA, the
  reference the same weights with the adapter off); tokens/s and model FLOPs utilisation;
- QLoRA (4-bit NF4 base) too, when bitsandbytes imports; trl's SFT step when trl imports.

MFU counts model FLOPs, not hardware FLOPs: 2N per token forward and 2N backward (a frozen base
needs gradients for activations only), recomputation under activation checkpointing excluded;
DPO adds the reference's forward (2N). N counts every weight except the input embedding.
Peak: the GPU's dense bf16 figure (`PEAK_TFLOPS`), else --peak-tflops.

    python bench/gpu_check.py [--out DIR] [--tiny]

--tiny runs the same code on small shapes, on a CPU too: the check that the script works before
a device minute is spent on it. Results go to stdout and DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sit_core.engine.sampling import Sampling, generate  # noqa: E402  (imports only the standard library)

# meta-llama/Llama-3.1-8B-Instruct and Llama-3.2-3B(-Instruct) config.json values.
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)
LLAMA_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024, tie_word_embeddings=True)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # sit's default
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0}


def random_model(shape: dict, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, torch_dtype=dtype)).to(dtype)
    return model.eval()


def matmul_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) + (
        model.get_input_embeddings().weight.numel() if model.config.tie_word_embeddings else 0)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def generation(shape: dict, device: str, dtype, batches: list[int], prompt_len: int, new_tokens: int) -> list[dict]:
    """sit's loop on the 8B shape: tokens/s per batch size. No stop ids: every row decodes
    `new_tokens`, so the counts are exact."""
    import torch

    model = random_model(shape, device, dtype)
    rows = []
    for temperature in (1.0, 0.0):
        for batch in batches:
            prompts = [[(7 * i + 13 * j) % shape["vocab_size"] for j in range(prompt_len)] for i in range(batch)]
            sampling = Sampling(temperature=temperature, top_p=1.0, max_new_tokens=new_tokens)
            try:
                generate(model, prompts[:1], [0], Sampling(temperature, 1.0, 2), set(), 0)  # warm-up
                sync(device)
                t = time.perf_counter()
                out = generate(model, prompts, list(range(batch)), sampling, set(), 0)
                sync(device)
            except torch.OutOfMemoryError:
                rows.append({"temperature": temperature, "batch": batch, "error": "out of memory"})
                torch.cuda.empty_cache()
                break
            seconds = time.perf_counter() - t
            tokens = sum(len(o) for o in out)
            rows.append({"temperature": temperature, "batch": batch, "tokens": tokens, "seconds": round(seconds, 3),
                         "tok_per_s": round(tokens / seconds, 1), "ms_per_step": round(seconds / new_tokens * 1000, 2)})
            print(f"  generate T={temperature} batch {batch}: {tokens / seconds:.1f} tok/s", flush=True)
    del model
    return rows


def _timed_steps(step, steps: int, device: str) -> float:
    for _ in range(2):  # warm-up: allocator, kernels' autotuning
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t) / steps


def training(shape: dict, device: str, dtype, batch: int, seq: int, steps: int, peak: float | None,
             quantized: bool = False) -> list[dict]:
    """A few optimizer steps of LoRA SFT, prompt tuning and DPO on the 3B shape."""
    import torch
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    if quantized:
        model = quantized_model(shape)
    else:
        model = random_model(shape, device, dtype)
    n = matmul_params(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    rows = []

    def record(method: str, seconds: float, tokens: int, flops_per_token: float) -> None:
        tps = tokens / seconds
        row = {"method": method, "batch": batch, "seq": seq, "step_s": round(seconds, 3), "tok_per_s": round(tps, 1),
               "model_tflops": round(tps * flops_per_token / 1e12, 1)}
        if peak:
            row["mfu"] = round(tps * flops_per_token / (peak * 1e12), 3)
        rows.append(row)
        print(f"  {method}: {tps:.0f} tok/s, {row['model_tflops']} TFLOP/s" + (f", MFU {row['mfu']:.1%}" if peak else ""),
              flush=True)

    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    lora.train()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)

    def sft_step() -> None:
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    record("qlora_sft" if quantized else "lora_sft", _timed_steps(sft_step, steps, device), batch * seq, 4 * n)

    half = max(1, batch // 2)  # batch/2 pairs: as many sequences per step as SFT
    chosen, rejected = ids[:half], ids[half:2 * half]

    def logps(m, x):
        logits = m(input_ids=x).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1).sum(-1)

    def dpo_step() -> None:
        with torch.no_grad(), lora.disable_adapter():
            ref = logps(lora, torch.cat([chosen, rejected]))
        pol = logps(lora, torch.cat([chosen, rejected]))
        margin = (pol[:half] - ref[:half]) - (pol[half:] - ref[half:])
        loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if not quantized:
        record("dpo", _timed_steps(dpo_step, steps, device), 2 * half * seq, 6 * n)
        base = lora.unload()
        tuned = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
        tuned.train()
        popt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=3e-2)

        def prompt_step() -> None:
            tuned(input_ids=ids, labels=ids).loss.backward()
            popt.step()
            popt.zero_grad(set_to_none=True)

        record("prompt_tuning", _timed_steps(prompt_step, steps, device), batch * (seq + 20), 4 * n)
    del model, lora
    return rows


def quantized_model(shape: dict):
    """The 3B shape in 4-bit NF4 (bitsandbytes quantizes on load, so the random weights are
    saved first)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as tmp:
        random_model(shape, "cpu", torch.bfloat16).save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, device_map={"": 0}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True))


def trl_sft(shape: dict, device: str, dtype, batch: int, seq: int, steps: int) -> dict:
    """trl's SFTTrainer for `steps` steps on the same shape and batch: its tokens/s beside the
    plain loop's, so the trainer's overhead shows."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model = random_model(shape, device, dtype)
    data = Dataset.from_list([{"text": " ".join(["word"] * seq)}] * (batch * (steps + 2)))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = SFTTrainer(model=model, train_dataset=data, processing_class=word_tokenizer(), peft_config=LoraConfig(
            r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"), args=SFTConfig(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps + 2, bf16=device == "cuda",
            tf32=device == "cuda" or None, gradient_checkpointing=True, logging_steps=1, report_to=[],
            save_strategy="no", max_length=seq, use_cpu=device != "cuda"))
        t = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t
    tokens = out.metrics.get("num_input_tokens_seen") or batch * seq * (steps + 2)
    print(f"  trl SFT: {tokens / seconds:.0f} tok/s (warm-up steps included)", flush=True)
    return {"method": "trl_sft", "steps": steps + 2, "seconds": round(seconds, 2), "tok_per_s": round(tokens / seconds, 1)}


def word_tokenizer():
    """A tokenizer with no download: one id per whitespace-separated word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "</s>": 2, "word": 3}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--tiny", action="store_true", help="small shapes: check the script, on a CPU too")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen_shape, train_shape = (TINY, TINY) if args.tiny else (LLAMA_8B, LLAMA_3B)
    sizes = dict(batches=[1, 4], prompt_len=16, new_tokens=8) if args.tiny else dict(
        batches=[1, 8, 32, 128], prompt_len=128, new_tokens=128)
    train = dict(batch=2, seq=32, steps=2) if args.tiny else dict(batch=12, seq=512, steps=5)  # a100: sft_batch_size 12

    result = {"device": name, "torch": torch.__version__, "peak_tflops": peak, "tiny": args.tiny}
    for module in ("transformers", "peft", "trl", "bitsandbytes", "datasets"):
        try:
            result[module] = __import__(module).__version__
        except Exception as e:  # noqa: BLE001 - recorded: what the machine lacks is part of the result
            result[module] = f"missing ({type(e).__name__})"
    print(json.dumps(result), flush=True)
    t0 = time.perf_counter()
    print("generation (Llama-3.1-8B shape):" if not args.tiny else "generation (tiny):", flush=True)
    result["generation"] = generation(gen_shape, device, dtype, **sizes)
    print("training (Llama-3.2-3B shape):" if not args.tiny else "training (tiny):", flush=True)
    result["training"] = training(train_shape, device, dtype, peak=peak, **train)
    if device == "cuda" and not result["bitsandbytes"].startswith("missing"):
        result["training"] += training(train_shape, device, dtype, peak=peak, quantized=True, **train)
    if not result["trl"].startswith("missing") and not result["datasets"].startswith("missing"):
        result["training"].append(trl_sft(train_shape, device, dtype, train["batch"], train["seq"], train["steps"]))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(f"done in {result['seconds']} s -> {args.out / 'gpu_check.json'}", flush=True)


if __name__ == "__main__":
    main()
