"""Magpie generation: the work of the "generate" stage.

An instruct model is shown only the part of its chat template that comes before a user
message (the pre-query template). What it writes next is a user instruction, ending at its
end-of-turn token. The instruction is then answered through the normal chat template.

Every attempt is logged to `attempts.jsonl` (fsync every `checkpoint_interval` samples),
accepted or not, so a resumed run knows exactly where it stopped. Randomness is per index,
and batches are always the same index ranges, so a killed and resumed run writes the same
records as one that never stopped.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from sit_core.config import SitConfig
from sit_core.errors import NotEnoughDataError
from sit_core.store.fileio import append_jsonl, atomic_write_json, atomic_write_text, jsonl_text, read_jsonl
from sit_core.store.manifest import StageRun
from sit_core.engine.engines import Engine, EngineFailed, decode, engine_spec, open_engine
from sit_core.engine.models import load_tokenizer
from sit_core.engine.sampling import Sampling, chat_prompt, item_seed, pre_query_template

NAME = "generate"
ATTEMPTS = "attempts.jsonl"
OUTPUT = "generated.jsonl"
STATS = "stats.json"

log = logging.getLogger("sit.generate")


def fingerprint(cfg: SitConfig) -> dict:
    return {"generation": cfg.fingerprint("generation"), "generator": cfg.models.generator,
            "generator_4bit": cfg.models.generator_4bit, "seed": cfg.seed}


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _load_log(log_path: Path, batch_size: int, first_index: int = 0) -> list[dict]:
    """Attempts so far, cut back to the last whole batch so batches keep their index ranges."""
    attempts = read_jsonl(log_path, repair=True)
    for expected, rec in enumerate(attempts, start=first_index):
        if rec.get("index") != expected:
            raise ValueError(f"{log_path} is out of order at line {expected - first_index + 1}: the log is corrupt")
    whole = len(attempts) - len(attempts) % batch_size
    if whole != len(attempts):
        attempts = attempts[:whole]
        atomic_write_text(log_path, jsonl_text(attempts))
    return attempts


@dataclass
class _Generator:
    engine: Engine
    query_prefix: list[int]
    instr_sampling: Sampling
    resp_sampling: Sampling


def _open_generator(cfg: SitConfig, log_dir: Path, stable: bool) -> _Generator:
    """The generator's engine; `stable` (after a stall) means sit's loop, in this process, one
    prompt at a time."""
    gen = cfg.generation
    tokenizer = load_tokenizer(cfg.models.generator, trust_remote_code=cfg.models.trust_remote_code)
    before, _ = pre_query_template(tokenizer, gen.system_prompt)
    # The longest sequence: the chat template around the longest instruction, then the response.
    template = len(chat_prompt(tokenizer, gen.system_prompt, ""))
    longest = template + gen.instruction_max_tokens + gen.response_max_tokens + 16
    spec = engine_spec(cfg, cfg.models.generator, load_in_4bit=cfg.models.generator_4bit,
                       batch_size=gen.batch_size, max_model_len=longest, stable=stable,
                       log_path=log_dir / "engine.log")
    engine = open_engine(spec, cfg.models.generator, tokenizer)
    return _Generator(engine, tokenizer(before, add_special_tokens=False)["input_ids"],
                      Sampling(gen.instruction_temperature, gen.instruction_top_p, gen.instruction_max_tokens),
                      Sampling(gen.response_temperature, gen.response_top_p, gen.response_max_tokens))


def _dedup(rec: dict, seen: set[str]) -> dict:
    """An instruction accepted at an earlier index makes this one a duplicate (the first one wins,
    so the outcome depends on index order only)."""
    if rec["status"] != "ok":
        return rec
    key = _normalize(rec["instruction"])
    if key in seen:
        return {"index": rec["index"], "status": "duplicate", "instruction": rec["instruction"]}
    seen.add(key)
    return rec


def run(cfg: SitConfig, stage: StageRun) -> dict:
    """Attempts into attempts.jsonl, batch by batch, until enough are accepted (as replay() counts)."""
    log_path = stage.dir / ATTEMPTS
    started = time.perf_counter()
    tally = _Tally(cfg)

    def checkpoint(records: list[dict]) -> None:
        tally.complete(records)
        stage.progress(min(tally.accepted, cfg.generation.num_samples), cfg.generation.num_samples)

    stable = any(e["event"] == "stall" for e in stage.manifest["events"])
    records, tokens = extend_log(cfg, log_path, 0, tally.complete, checkpoint, stage.event, stable)
    if tokens:
        elapsed = time.perf_counter() - started
        stage.event("generated", tokens=tokens, seconds=round(elapsed, 2),
                    tokens_per_sec=round(tokens / elapsed, 2) if elapsed else None)
    return finish(cfg, stage, replay(cfg, records))


def generate_range(cfg: SitConfig, log_path: Path, start: int, end: int, event=None) -> list[dict]:
    """Raw attempts for indices [start, end) into their own log, for sharded generation.

    The batches are the index ranges run() uses (start and end are multiples of batch_size), so
    each record is the one a single-process run writes for that index. Duplicates are marked
    by replay() over the merged shards: that depends on all earlier indices."""
    batch = cfg.generation.batch_size
    if start % batch or end % batch:
        raise ValueError(f"shard [{start}, {end}) is not aligned to generation.batch_size={batch}")
    return extend_log(cfg, Path(log_path), start, lambda records: start + len(records) >= end, event=event)[0]


def extend_log(cfg: SitConfig, log_path: Path, first: int, complete, on_checkpoint=None, event=None,
               stable: bool = False) -> tuple[list[dict], int]:
    """Magpie's one generation loop. Continues the attempt log whose first index is `first`,
    a batch at a time, fsyncing every checkpoint_interval attempts, until `complete(records)`.
    An engine that stalls is killed; `event("stall", ...)` records it and the loop goes on in
    stable mode. Returns the records and the tokens generated now."""
    batch = cfg.generation.batch_size
    records = _load_log(log_path, batch, first_index=first)
    if complete(records):
        return records, 0
    loading = time.perf_counter()
    generator = _open_generator(cfg, log_path.parent, stable)
    if event is not None:  # what a shard spends before its first batch (bench/bench_ray.py)
        event("engine_started", backend=generator.engine.backend, seconds=round(time.perf_counter() - loading, 2))
    bar = tqdm(total=None, initial=len(records), desc="magpie", unit="attempt")
    pending: list[dict] = []
    tokens = 0
    while not complete(records + pending):
        index = first + len(records) + len(pending)
        try:
            batch_records, n_tokens = _generate_batch(cfg, generator, list(range(index, index + batch)))
        except EngineFailed as e:
            log.warning("magpie: %s; continuing in stable mode", e)
            if event is not None:
                event("stall", reason=str(e), backend=generator.engine.backend, first_index=index,
                      stall_timeout_s=cfg.generation.stall_timeout_s, fallback="stable")
            generator = _open_generator(cfg, log_path.parent, stable=True)
            continue
        pending += batch_records
        tokens += n_tokens
        bar.update(len(batch_records))
        if len(pending) >= cfg.checkpoint_interval or complete(records + pending):
            append_jsonl(log_path, pending)
            records += pending
            pending = []
            if on_checkpoint:
                on_checkpoint(records)
    bar.close()
    generator.engine.close()
    return records, tokens


class _Tally:
    """replay()'s verdict kept up to date as the log grows by whole batches: replaying the whole
    log after every batch would cost time quadratic in the number of samples."""

    def __init__(self, cfg: SitConfig):
        self.num_samples = cfg.generation.num_samples
        self.max_attempts = int(cfg.generation.num_samples * cfg.generation.max_attempts_factor)
        self.seen: set[str] = set()
        self.counted = self.accepted = 0

    def complete(self, records: list[dict]) -> bool:
        for rec in records[self.counted:]:
            self.accepted += _dedup(rec, self.seen)["status"] == "ok"
        self.counted = len(records)
        return self.accepted >= self.num_samples or len(records) >= self.max_attempts


def accepted_progress(cfg: SitConfig, records: list[dict]) -> tuple[int, int]:
    """(accepted samples, num_samples) over raw attempts in index order."""
    accepted = len(replay(cfg, records).accepted)
    return min(accepted, cfg.generation.num_samples), cfg.generation.num_samples


@dataclass
class Replay:
    attempts: list[dict]
    accepted: list[dict]
    complete: bool  # run() would have stopped within these records


def replay(cfg: SitConfig, records: list[dict]) -> Replay:
    """What run() logs, given raw attempts 0..n-1 in index order (from generate_range): duplicates
    marked, cut after the batch in which run() stops (enough accepted, or out of attempts)."""
    gen = cfg.generation
    max_attempts = int(gen.num_samples * gen.max_attempts_factor)
    attempts: list[dict] = []
    accepted: list[dict] = []
    seen: set[str] = set()
    for first in range(0, len(records) - len(records) % gen.batch_size, gen.batch_size):
        if len(accepted) >= gen.num_samples or first >= max_attempts:
            break
        for rec in records[first:first + gen.batch_size]:
            rec = _dedup(rec, seen)
            if rec["status"] == "ok":
                accepted.append(rec)
            attempts.append(rec)
    complete = len(accepted) >= gen.num_samples or len(attempts) >= max_attempts
    return Replay(attempts, accepted, complete)


def _generate_batch(cfg, generator: _Generator, indices) -> tuple[list[dict], int]:
    engine = generator.engine
    seeds = [item_seed(cfg.seed, NAME, i, "instruction") for i in indices]
    instructions = engine.generate([generator.query_prefix] * len(indices), seeds, generator.instr_sampling)
    n_tokens = sum(len(c.ids) for c in instructions)
    records: list[dict] = []
    to_answer = []
    for index, completion in zip(indices, instructions):
        text = decode(engine, completion)
        record = {"index": index, "backend": engine.backend}
        if not text:
            records.append({**record, "status": "empty"})
        elif completion.truncated:
            records.append({**record, "status": "unfinished", "instruction": text})
        else:
            records.append({**record, "status": "ok", "instruction": text})
            to_answer.append(records[-1])
    if to_answer:
        prompts = [chat_prompt(engine.tokenizer, cfg.generation.system_prompt, r["instruction"]) for r in to_answer]
        seeds = [item_seed(cfg.seed, NAME, r["index"], "response") for r in to_answer]
        for rec, completion in zip(to_answer, engine.generate(prompts, seeds, generator.resp_sampling)):
            n_tokens += len(completion.ids)
            rec["response"] = decode(engine, completion)
            rec["response_truncated"] = completion.truncated
            if not rec["response"]:
                rec["status"] = "empty_response"
    return records, n_tokens


def finish(cfg: SitConfig, stage: StageRun, outcome: Replay) -> dict:
    """Write attempts.jsonl (duplicates marked), generated.jsonl and stats.json, and close the stage."""
    gen = cfg.generation
    attempts, accepted = outcome.attempts, outcome.accepted
    atomic_write_text(stage.dir / ATTEMPTS, jsonl_text(attempts))
    by_status: dict[str, int] = {}
    for rec in attempts:
        by_status[rec["status"]] = by_status.get(rec["status"], 0) + 1
    if len(accepted) < gen.num_samples:
        raise NotEnoughDataError(
            f"Magpie produced {len(accepted)} usable samples of {gen.num_samples} after {len(attempts)} attempts "
            f"(rejected: {', '.join(f'{k}={v}' for k, v in sorted(by_status.items()) if k != 'ok') or 'none'})",
            "raise generation.max_attempts_factor or generation.instruction_max_tokens, or lower "
            "generation.num_samples; the attempts so far are kept in the run directory",
        )
    records = [{"id": r["index"], "instruction": r["instruction"], "response": r["response"],
                "response_truncated": r["response_truncated"], "model": cfg.models.generator}
               for r in accepted[: gen.num_samples]]
    out = stage.dir / OUTPUT
    atomic_write_text(out, jsonl_text(records))
    stats = {"attempts": len(attempts), "accepted": len(records), "by_status": by_status}
    stats_path = stage.dir / STATS
    atomic_write_json(stats_path, stats)
    stage.progress(len(records), gen.num_samples)
    return stage.finish([out, stats_path], stats)
