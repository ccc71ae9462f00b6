"""Stage 1: Magpie generation.

An instruct model is shown only the part of its chat template that comes before a user
message (the pre-query template). What it writes next is a user instruction, ending at its
end-of-turn token. The instruction is then answered through the normal chat template.

Every attempt is logged to `attempts.jsonl` (fsync every `checkpoint_interval` samples),
accepted or not, so a resumed run knows exactly where it stopped. Randomness is per index,
and batches are always the same index ranges, so a killed and resumed run writes the same
records as one that never stopped.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .config import SitConfig
from .errors import NotEnoughDataError
from .fileio import append_jsonl, atomic_write_json, atomic_write_text, jsonl_text, read_jsonl
from .manifest import StageRun
from .models import load_causal_lm, release
from .sampling import Sampling, chat_prompt, generate, item_seed, pre_query_template, stop_token_ids
from .stages import Progress, done_manifest, open_stage

STAGE = "generate"
ATTEMPTS = "attempts.jsonl"
OUTPUT = "generated.jsonl"


def input_paths(cfg: SitConfig, run_dir: Path) -> list[Path]:
    return []


def fingerprint(cfg: SitConfig) -> dict:
    return {"generation": cfg.fingerprint("generation"), "generator": cfg.models.generator,
            "generator_4bit": cfg.models.generator_4bit, "seed": cfg.seed}


def output_path(run_dir: Path) -> Path:
    return Path(run_dir) / STAGE / OUTPUT


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
    lm: object
    query_prefix: list[int]
    stops: set[int]
    instr_sampling: Sampling
    resp_sampling: Sampling


def _load_generator(cfg: SitConfig) -> _Generator:
    gen = cfg.generation
    lm = load_causal_lm(cfg.models.generator, load_in_4bit=cfg.models.generator_4bit,
                        trust_remote_code=cfg.models.trust_remote_code)
    tok = lm.tokenizer
    before, after = pre_query_template(tok, gen.system_prompt)
    return _Generator(lm, tok(before, add_special_tokens=False)["input_ids"], stop_token_ids(lm.model, tok, after),
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


def run(cfg: SitConfig, run_dir: Path, progress: Progress = None) -> dict:
    if (manifest := done_manifest(cfg, run_dir, STAGE)) is not None:
        return manifest
    stage = open_stage(cfg, run_dir, STAGE)
    gen = cfg.generation
    batch = gen.batch_size
    log_path = stage.dir / ATTEMPTS
    attempts = _load_log(log_path, batch)
    accepted = [r for r in attempts if r["status"] == "ok"]
    seen = {_normalize(r["instruction"]) for r in accepted}
    max_attempts = int(gen.num_samples * gen.max_attempts_factor)
    total_tokens, started = 0, time.perf_counter()

    if len(accepted) < gen.num_samples and len(attempts) < max_attempts:
        generator = _load_generator(cfg)
        bar = tqdm(total=gen.num_samples, initial=len(accepted), desc="magpie", unit="sample")
        pending: list[dict] = []
        next_index = len(attempts)
        while len(accepted) < gen.num_samples and next_index < max_attempts:
            indices = list(range(next_index, next_index + batch))
            next_index += batch
            records, n_tokens = _generate_batch(cfg, generator, indices)
            total_tokens += n_tokens
            for rec in records:
                rec = _dedup(rec, seen)
                if rec["status"] == "ok":
                    accepted.append(rec)
                    bar.update(1)
                pending.append(rec)
            if len(pending) >= cfg.checkpoint_interval or len(accepted) >= gen.num_samples:
                append_jsonl(log_path, pending)
                attempts.extend(pending)
                pending = []
                stage.progress(min(len(accepted), gen.num_samples), gen.num_samples)
                if progress:
                    progress(min(len(accepted), gen.num_samples), gen.num_samples)
        if pending:
            append_jsonl(log_path, pending)
            attempts.extend(pending)
        bar.close()
        release(generator.lm.model)
        elapsed = time.perf_counter() - started
        stage.event("generated", tokens=total_tokens, seconds=round(elapsed, 2),
                    tokens_per_sec=round(total_tokens / elapsed, 2) if elapsed else None)

    return finish(cfg, stage, attempts, accepted)


def generate_range(cfg: SitConfig, log_path: Path, start: int, end: int, progress: Progress = None) -> list[dict]:
    """Raw attempts for indices [start, end) into their own log, for sharded generation.

    The batches are the index ranges run() uses (start and end are multiples of batch_size), so
    each record is the one a single-process run writes for that index. Duplicates are not marked
    here: that depends on all earlier indices, so replay() does it over the merged shards."""
    batch = cfg.generation.batch_size
    if start % batch or end % batch:
        raise ValueError(f"shard [{start}, {end}) is not aligned to generation.batch_size={batch}")
    records = _load_log(Path(log_path), batch, first_index=start)
    if start + len(records) < end:
        generator = _load_generator(cfg)
        pending: list[dict] = []
        next_index = start + len(records)
        while next_index < end:
            batch_records, _ = _generate_batch(cfg, generator, list(range(next_index, next_index + batch)))
            pending.extend(batch_records)
            next_index += batch
            if len(pending) >= cfg.checkpoint_interval or next_index >= end:
                append_jsonl(log_path, pending)
                records.extend(pending)
                pending = []
                if progress:
                    progress(len(records), end - start)
        release(generator.lm.model)
    return records


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
    lm, stops = generator.lm, generator.stops
    instr_sampling, resp_sampling = generator.instr_sampling, generator.resp_sampling
    tok = lm.tokenizer
    seeds = [item_seed(cfg.seed, STAGE, i, "instruction") for i in indices]
    instr_ids = generate(lm.model, [generator.query_prefix] * len(indices), seeds, instr_sampling, stops,
                         tok.pad_token_id)
    n_tokens = sum(len(ids) for ids in instr_ids)
    records: list[dict] = []
    to_answer = []
    for index, ids in zip(indices, instr_ids):
        text = tok.decode(ids, skip_special_tokens=True).strip()
        if not text:
            records.append({"index": index, "status": "empty"})
        elif len(ids) >= instr_sampling.max_new_tokens:
            records.append({"index": index, "status": "unfinished", "instruction": text})
        else:
            records.append({"index": index, "status": "ok", "instruction": text})
            to_answer.append(records[-1])
    if to_answer:
        prompts = [chat_prompt(tok, cfg.generation.system_prompt, r["instruction"]) for r in to_answer]
        seeds = [item_seed(cfg.seed, STAGE, r["index"], "response") for r in to_answer]
        resp_ids = generate(lm.model, prompts, seeds, resp_sampling, stops, tok.pad_token_id)
        for rec, ids in zip(to_answer, resp_ids):
            n_tokens += len(ids)
            rec["response"] = tok.decode(ids, skip_special_tokens=True).strip()
            rec["response_truncated"] = len(ids) >= resp_sampling.max_new_tokens
            if not rec["response"]:
                rec["status"] = "empty_response"
    return records, n_tokens


def finish(cfg: SitConfig, stage: StageRun, attempts: list[dict], accepted: list[dict]) -> dict:
    """Write generated.jsonl and stats.json from the attempt log and close the stage."""
    gen = cfg.generation
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
    out = output_path(stage.run_dir)
    atomic_write_text(out, jsonl_text(records))
    stats = {"attempts": len(attempts), "accepted": len(records), "by_status": by_status}
    stats_path = stage.dir / "stats.json"
    atomic_write_json(stats_path, stats)
    stage.progress(len(records), gen.num_samples)
    return stage.finish([out, stats_path], stats)
