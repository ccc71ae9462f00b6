"""What the three training stages (LoRA SFT, prompt tuning, DPO) share.

A method module describes itself as a `Method` (its data, its PEFT model, its trainer) and
hands it to `train_stage`, which owns everything else: the manifest, resume from the newest
complete checkpoint, OOM backoff, the final adapter, metrics and curves.

Layout of `<run_dir>/<stage>/`:
    checkpoints/checkpoint-N/   Trainer checkpoints (adapter, optimizer, scheduler, RNG, state)
    clock.json                  training seconds reached at each checkpoint (survives restarts)
    final/                      adapter + tokenizer + training_config.json
    metrics.json, log_history.json, curves.png
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sit_core.config import SitConfig, at_legacy
from sit_core.contract import Read, Stage
from sit_core.errors import SitError
from sit_core.store.fileio import atomic_write_json, iter_files, read_json, read_jsonl
from sit_core.store.manifest import StageRun, rel
from sit_core.engine.models import pick_device, resolve_model_path, torch_dtype
from sit_core.training import distributed
from sit_core.config.batches import effective_batch, split_batch, step_down

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.json"
LOG_HISTORY = "log_history.json"
CURVES = "curves.png"

# Greedy continuations of these prompts measure inference speed; fixed so that methods and
# runs compare on the same work.
INFERENCE_PROMPTS = (
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn rain.",
    "List three tips for writing clear emails.",
)
INFERENCE_NEW_TOKENS = 16

# A base model (Llama-3.2-3B, not -Instruct) has no chat template; the conversational data
# still needs one, and the tokenizer saved in final/ carries it to evaluation.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------
# Data: read and checked before any model loads


def read_records(path: Path, required: dict[str, type], what: str) -> list[dict]:
    """Rows of an upstream JSONL file, each checked for its required fields."""
    try:
        rows = read_jsonl(path)
    except ValueError as e:
        raise SitError(str(e), f"rerun the stage that writes {path.name}") from None
    for i, row in enumerate(rows, 1):
        bad = [k for k, t in required.items() if not isinstance(row.get(k), t) or not row.get(k)]
        if bad:
            raise SitError(f"{path}: record {i} has no usable {', '.join(bad)} (a {what} record needs "
                           f"{', '.join(required)})", f"rerun the stage that writes {path.name}")
    return rows


def split_records(rows: list[dict], validation_size: int, seed: int, stage: str) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split from the run seed (same split for SFT and
    prompt tuning, since both shuffle with the same seed)."""
    if len(rows) <= validation_size:
        raise SitError(
            f"stage '{stage}' has {len(rows)} record(s), too few for a validation split of {validation_size} "
            "plus at least one training record",
            "generate/keep more data (generation.num_samples, filter.target_count, preference.num_pairs) "
            "or lower training.validation_size",
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = [rows[i] for i in sorted(order[:validation_size])]
    train = [rows[i] for i in sorted(order[validation_size:])]
    return train, val


# ---------------------------------------------------------------------------------------
# Hardware, precision and the model


@dataclass
class Hardware:
    device: str
    bf16: bool
    fp16: bool
    tf32: bool
    qlora: bool
    optim: str

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def hardware(cfg: SitConfig) -> Hardware:
    """Precision and optimizer the profile asks for, as far as this machine can do them.
    CPU always trains in fp32: its bf16 is emulated and made steps 15-20x slower."""
    import torch

    t = cfg.training
    device = pick_device()
    if device != "cuda":
        optim = "adamw_torch" if t.optim.startswith("paged") or "8bit" in t.optim else t.optim
        return Hardware(device, bf16=False, fp16=False, tf32=False, qlora=False, optim=optim)
    precision = t.precision
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        precision = "fp16"  # a T4 given the a100 profile
    optim = t.optim if not t.qlora or t.optim.startswith("paged") else "paged_adamw_32bit"
    return Hardware(device, bf16=precision == "bf16", fp16=precision == "fp16", tf32=t.tf32, qlora=t.qlora,
                    optim=optim)


def linear_module_names(model) -> list[str]:
    """Leaf names of the modules LoRA can wrap (nn.Linear, incl. bitsandbytes', and GPT-2's Conv1D)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D))})


def check_lora_targets(cfg: SitConfig) -> list[str]:
    """Fail before loading weights when the target model has none of the LoRA target modules.
    The architecture is built on the meta device, so this costs no memory or download."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(cfg.models.target)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.models.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.models.trust_remote_code)
    have = linear_module_names(skeleton)
    wanted = cfg.training.lora_target_modules
    found = [m for m in wanted if m in have]
    if not found:
        raise SitError(
            f"the target model {cfg.models.target} ({type(skeleton).__name__}) has none of the LoRA target modules "
            f"{wanted}; its linear modules are: {', '.join(have)}",
            "set training.lora_target_modules to names from that list (the attention and MLP projections)",
        )
    return found


def load_tokenizer(cfg: SitConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.models.target),
                                        trust_remote_code=cfg.models.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


def load_base_model(cfg: SitConfig, hw: Hardware):
    """The target model for training: 4-bit NF4 for QLoRA on CUDA, else plain weights in the
    training precision (fp32 on CPU). PEFT keeps the adapter itself in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.models.trust_remote_code,
                              "dtype": torch_dtype(hw.precision)}
    if hw.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if hw.bf16 else torch.float16)
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # this rank's GPU under DDP
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.models.target), **kwargs)
    except OSError as e:
        raise SitError(f"could not load target model '{cfg.models.target}': {e}",
                       "check models.target; gated hub models need HF_TOKEN; offline, use a local path "
                       "or embedded:smollm2-135m-instruct") from None
    if hw.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    elif hw.device == "cuda":
        model.to("cuda")
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def lora_config(cfg: SitConfig, targets: list[str]):
    from peft import LoraConfig

    t = cfg.training
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def count_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_is_complete(path: Path) -> bool:
    """The Trainer writes a checkpoint in place: adapter, optimizer, scheduler, RNG, and
    trainer_state.json last. A directory missing any of them, or whose state disagrees with
    its name, was cut off mid-write."""
    needed = ["trainer_state.json", "optimizer.pt", "scheduler.pt"]
    if not all((path / n).is_file() and (path / n).stat().st_size > 0 for n in needed):
        return False
    if not any((path / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        return False
    if not any(path.glob("rng_state*.pth")):
        return False
    try:
        state = read_json(path / "trainer_state.json")
    except ValueError:
        return False
    return state.get("global_step") == int(path.name.rsplit("-", 1)[1])


def newest_complete_checkpoint(run: StageRun) -> Path | None:
    """The newest complete checkpoint; torn ones newer than it are removed (the Trainer will
    write those steps again) and recorded in the manifest."""
    root = run.dir / CHECKPOINTS
    candidates = sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()),
                        key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)
    for ckpt in candidates:
        if checkpoint_is_complete(ckpt):
            return ckpt
        run.event("checkpoint_incomplete", path=rel(run.run_dir, ckpt), action="removed")
        shutil.rmtree(ckpt)
    return None


def kept_split(cfg: SitConfig, kept: Path, stage: str) -> tuple[list[dict], list[dict]]:
    """The filter's kept records split train/validation from the run seed. SFT and prompt tuning
    both train on it, and evaluation scores every variant on its validation part."""
    rows = read_records(kept, {"instruction": str, "response": str}, "kept instruction")
    return split_records(rows, cfg.training.validation_size, cfg.seed, stage)


def instruction_split(cfg: SitConfig, kept: Path, stage: str) -> tuple[list[dict], list[dict]]:
    """`kept_split` as training rows: prompt/completion chats when the loss is on the response
    only (trl masks the prompt), whole conversations otherwise."""
    as_row = prompt_completion if cfg.training.completion_only_loss else conversation
    train, val = kept_split(cfg, kept, stage)
    return [as_row(r["instruction"], r["response"]) for r in train], [as_row(r["instruction"], r["response"]) for r in val]


def dpo_validation_size(cfg: SitConfig, n_pairs: int) -> int:
    """Preference pairs are scarcer than instructions (600 vs 1,000 in the seed): without
    training.dpo_validation_size, hold out validation_size pairs but never more than a tenth;
    with it, that many but never more than half, so DPO keeps as many to train on."""
    t = cfg.training
    if t.dpo_validation_size is None:
        return max(1, min(t.validation_size, n_pairs // 10))
    return max(1, min(t.dpo_validation_size, n_pairs // 2))


def pair_split(cfg: SitConfig, pairs: Path, stage: str) -> tuple[list[dict], list[dict]]:
    """The preference pairs in TRL's format, split train/validation from the run seed: DPO trains
    on the first part, and evaluation measures every variant's preferences on the second."""
    rows = read_records(pairs, {"prompt": list, "chosen": list, "rejected": list}, "preference pair")
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    return split_records(rows, dpo_validation_size(cfg, len(rows)), cfg.seed, stage)


def make_sft_trainer(model, tokenizer, kwargs, train_ds, eval_ds, callbacks, *, max_length: int,
                     completion_only_loss: bool):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**kwargs, max_length=max_length, packing=False, completion_only_loss=completion_only_loss)
    return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, callbacks=callbacks)


# ---------------------------------------------------------------------------------------
# Callbacks


def _stage_callbacks(run: StageRun, clock_path: Path):
    """Progress reporting and a training clock that survives restarts: the seconds spent in
    optimizer steps (forward, backward, update; not eval or checkpoint I/O) and the wall
    time are saved alongside every checkpoint and picked up again on resume."""
    from transformers import TrainerCallback

    class StageCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            base = _read_clock(clock_path).get(str(state.global_step), {"step_s": 0.0, "wall_s": 0.0})
            self.step_s, self.wall_base = base["step_s"], base["wall_s"]
            self.started = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s += time.perf_counter() - self.t0

        def totals(self) -> dict:
            return {"step_s": self.step_s, "wall_s": self.wall_base + time.perf_counter() - self.started}

        def on_save(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            clock = _read_clock(clock_path)
            clock[str(state.global_step)] = self.totals()
            atomic_write_json(clock_path, clock)

        def on_log(self, args, state, control, **kw):
            run.progress(state.global_step, state.max_steps)

    return StageCallback()


def _read_clock(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


# ---------------------------------------------------------------------------------------
# The shared stage driver


@dataclass
class Method:
    """What one training method contributes; `train_stage` does the rest."""

    stage: str
    learning_rate: float
    epochs: float
    warmup_ratio: float
    batch_size: int
    grad_accum: int
    save_steps: int
    train_rows: list[dict]
    eval_rows: list[dict]
    # (cfg, hw, tokenizer) -> PEFT model whose trainable parameters are the method's
    build_model: Callable[[SitConfig, Hardware, Any], Any]
    # (model, tokenizer, TrainingArguments kwargs, train Dataset, eval Dataset, callbacks) -> Trainer
    make_trainer: Callable[..., Any]
    # the method's settings for training_config.json ("lora_config", "prompt_tuning_config", "dpo_config")
    describe: dict = field(default_factory=dict)


def fingerprint(cfg: SitConfig, fields: list[str], batch: int, grad_accum: int) -> dict:
    """Result-affecting settings of one method. Batch size and accumulation are perf fields
    one by one, but their product (the effective batch) changes the optimisation, so it is
    part of the fingerprint; OOM backoff keeps it constant."""
    return {
        "target": cfg.models.target,
        "trust_remote_code": cfg.models.trust_remote_code,
        "seed": cfg.seed,
        "training": {k: getattr(cfg.training, k) for k in fields if not at_legacy(cfg.training, k)},
        "effective_batch": effective_batch(batch, grad_accum),
    }


def training_stage(name: str, reads: tuple[Read, ...], fingerprint: Callable[[SitConfig], dict],
                   method: Callable[[SitConfig, Path], Method]) -> Stage:
    """The declaration of a training stage: `method` makes its Method, train_stage does the rest."""
    return Stage(
        name=name, reads=reads, fingerprint=fingerprint,
        writes={"adapter": FINAL, "metrics": METRICS, "log_history": LOG_HISTORY, "curves": CURVES},
        work=functools.partial(train_stage, method_factory=method),
        open=functools.partial(open_training_stage, stage=name),
    )


def open_training_stage(cfg: SitConfig, run_dir: Path, open_stage: Callable[[SitConfig, Path, str], StageRun],
                        stage: str) -> StageRun:
    """A training stage's opening, for the driver: in a distributed launch rank 0 opens the
    manifest (and the others wait for it, then follow it without writing); elsewhere the
    driver's own `open_stage`."""
    rank, processes = distributed.world()
    if processes == 1:
        return open_stage(cfg, run_dir, stage)
    group = distributed.start(cpu=hardware(cfg).device != "cuda")
    with distributed.rank0_first(group):
        return open_stage(cfg, run_dir, stage) if rank == 0 else distributed.follow_stage(run_dir, stage)


def train_stage(cfg: SitConfig, run: StageRun, method_factory: Callable[[SitConfig, Path], Method],
                callbacks: tuple = ()) -> dict:
    """Train (or resume) one training stage. `callbacks` are extra Trainer callbacks, used by
    tests to interrupt training at a chosen step."""
    method = method_factory(cfg, run.run_dir)  # reads and checks the data: no model loaded yet
    rank, processes = distributed.world()
    if processes == 1 and cfg.training.num_processes > 1:
        return distributed.launch(cfg, run)
    hw = hardware(cfg)
    group = distributed.start(cpu=hw.device != "cuda")

    import torch
    from transformers import set_seed

    # Seeded before the adapter exists: LoRA's A matrices and prompt embeddings start random.
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    model = method.build_model(cfg, hw, tokenizer)
    trainable, total = count_trainable(model)
    # The adapter as first built, restored before every fresh start (e.g. an OOM before the
    # first checkpoint) so that a restart never continues from half-trained weights.
    initial = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    batch, grad_accum = _current_batch(run, method, processes)
    clock_path = run.dir / "clock.json"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    while True:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])
        stage_cb = _stage_callbacks(run, clock_path)
        trainer = method.make_trainer(model, tokenizer, _trainer_kwargs(cfg, hw, method, run, batch, grad_accum),
                                      _dataset(method.train_rows), _dataset(method.eval_rows),
                                      [stage_cb, *callbacks])
        with distributed.rank0_first(group):
            checkpoint = newest_complete_checkpoint(run)
        run.event("train_start", batch_size=batch, gradient_accumulation_steps=grad_accum,
                  resume_from=rel(run.run_dir, checkpoint) if checkpoint else None)
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            break
        except torch.OutOfMemoryError:
            if group is not None:
                # The other ranks are stuck in a collective: end this launch and let the caller
                # relaunch every rank at the smaller batch.
                distributed.report_oom(run.dir, batch, grad_accum)
                raise
            batch, grad_accum = step_down(run, batch, grad_accum, processes=1)
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return _finish(cfg, run, method, hw, model, tokenizer, trainer, stage_cb, trainable, total, batch, grad_accum,
                   processes)


def _current_batch(run: StageRun, method: Method, processes: int) -> tuple[int, int]:
    """The profile's batch split over the processes, or the last OOM step-down recorded for
    this stage on as many processes: a restarted run does not walk into the same
    out-of-memory error again."""
    downs = [e for e in run.manifest.get("events", [])
             if e["event"] == "oom_backoff" and e.get("processes", 1) == processes]
    if downs:
        return downs[-1]["to_batch_size"], downs[-1]["to_gradient_accumulation_steps"]
    return split_batch(method.batch_size, method.grad_accum, processes)


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


def _trainer_kwargs(cfg: SitConfig, hw: Hardware, method: Method, run: StageRun, batch: int, grad_accum: int) -> dict:
    t = cfg.training
    return dict(
        output_dir=str(run.dir / CHECKPOINTS),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=method.epochs,
        max_steps=t.max_steps,
        learning_rate=method.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=method.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        optim=hw.optim,
        bf16=hw.bf16,  # explicit: trl's configs default to bf16=True, which is slow emulation on CPU
        fp16=hw.fp16,
        tf32=hw.tf32 if hw.device == "cuda" else None,
        use_cpu=hw.device != "cuda",
        activation_checkpointing=t.gradient_checkpointing,  # trl defaults to on; the profile decides
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=method.save_steps,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=method.save_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Every trainable parameter (LoRA, prompt embeddings) takes part in every step, so DDP
        # can skip its per-step search for unused ones.
        ddp_find_unused_parameters=False if distributed.world()[1] > 1 else None,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,
    )


def _finish(cfg, run, method, hw, model, tokenizer, trainer, stage_cb, trainable, total, batch, grad_accum,
            processes) -> dict | None:
    import torch

    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    # The Trainer's own training_loss covers only the last session after a resume; the
    # logged losses span the whole run (each is the mean over its logging window).
    train_loss = sum(train_losses) / len(train_losses) if train_losses else None
    step = trainer.state.global_step
    # The last periodic evaluation usually fell on the final step; evaluate only if it did not.
    final_eval = [h["eval_loss"] for h in history if "eval_loss" in h and h["step"] == step]
    eval_loss = final_eval[-1] if final_eval else trainer.evaluate()["eval_loss"]  # every rank: a collective
    if distributed.world()[0] != 0:
        return None  # rank 0 alone measures and writes the results
    history = trainer.state.log_history
    clock = stage_cb.totals()
    tokens = trainer.state.num_input_tokens_seen
    if hw.device == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    metrics = {
        "method": method.stage,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "total_steps": step,
        "training_time_minutes": clock["wall_s"] / 60,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_ratio_percent": 100.0 * trainable / total,
        "peak_memory_gb": peak_gb,
        "peak_memory_kind": "cuda_max_allocated" if hw.device == "cuda" else "process_max_rss",
        "train_tokens": tokens,
        "tokens_per_sec": tokens / clock["step_s"] if clock["step_s"] > 0 else None,
        "inference_speed_tok_per_sec": inference_speed(model, tokenizer, hw.device),
        "device": hw.device,
        "precision": hw.precision,
        "batch_size": batch,
        "gradient_accumulation_steps": grad_accum,
        "processes": processes,
    }

    final = run.dir / FINAL
    if final.exists():
        shutil.rmtree(final)  # a save cut off by a kill: write it whole again
    model.save_pretrained(final, selected_adapters=["default"])
    tokenizer.save_pretrained(final)
    atomic_write_json(final / "training_config.json", {
        "method": method.stage,
        "base_model": cfg.models.target,
        "training_data_size": len(method.train_rows),
        "validation_data_size": len(method.eval_rows),
        **method.describe,
        "training_args": {"epochs": method.epochs, "max_steps": cfg.training.max_steps, "batch_size": batch,
                          "gradient_accumulation_steps": grad_accum, "processes": processes, "learning_rate": method.learning_rate,
                          "warmup_ratio": method.warmup_ratio, "lr_scheduler_type": cfg.training.lr_scheduler_type,
                          "precision": hw.precision, "qlora": hw.qlora, "seed": cfg.seed},
        "results": {"train_loss": train_loss, "eval_loss": eval_loss, "total_steps": step},
        "timestamp": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    })
    atomic_write_json(run.dir / METRICS, metrics)
    atomic_write_json(run.dir / LOG_HISTORY, history)
    plot_curves(history, run.dir / CURVES, method.stage)
    outputs = [*iter_files(final), run.dir / METRICS, run.dir / LOG_HISTORY, run.dir / CURVES]
    return run.finish(outputs, stats=metrics)


def inference_speed(model, tokenizer, device: str) -> float:
    """Greedy tokens/s of the tuned model over INFERENCE_PROMPTS, after one warm-up call, through
    the decoding loop the evaluation uses (PEFT's own generate() repeats a soft prompt at every
    cached step: sampling.soft_prompt)."""
    import torch

    from sit_core.engine.engines import model_engine
    from sit_core.engine.sampling import Sampling, chat_prompt

    model.eval()
    engine = model_engine(model, tokenizer)  # its loop asks for the KV cache itself
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=INFERENCE_NEW_TOKENS)
    generated, seconds = 0, 0.0
    for i, prompt in enumerate((INFERENCE_PROMPTS[0], *INFERENCE_PROMPTS)):
        ids = chat_prompt(tokenizer, None, prompt)
        t0 = time.perf_counter()
        [completion] = engine.generate([ids], [0], greedy)
        if device == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first call is the warm-up
            seconds += time.perf_counter() - t0
            generated += len(completion.ids)
    return generated / seconds if seconds > 0 else 0.0


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title} training curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def conversation(instruction: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]}


def prompt_completion(instruction: str, response: str) -> dict:
    return {"prompt": [{"role": "user", "content": instruction}], "completion": [{"role": "assistant", "content": response}]}
