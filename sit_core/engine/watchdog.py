"""Response sampling for the preference stage.

Two ways to run the same `sample_batch`:

- **stable** (in this process, one item per call): what the seeds' STABLE notebook did after
  the batched notebook deadlocked inside `model.generate()`.
- **batched** (`BatchWorker`): a spawned worker process loads the model and samples whole
  batches. The worker sends a heartbeat from its decoding loop (a few per stall timeout);
  when none arrives for `stall_timeout_s` the parent SIGKILLs the worker. A hang in C code (the seeds'
  deadlock) cannot be interrupted from inside the process, but a separate process can
  always be killed.

Every item carries its own seed and `sampling.generate` gives each row its own generator, so
an item's response does not depend on the mode or its batch mates beyond float rounding.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass

from sit_core.config import ResponseModel
from sit_core.errors import SitError
from sit_core.engine.models import LoadedModel, load_causal_lm
from sit_core.engine.sampling import Sampling, chat_prompt, generate, pre_query_template, stop_token_ids

# Test hook, deliberately outside the config: a batched worker whose batch count reaches this
# number blocks forever inside its generation call, a real hang for the watchdog to catch.
HANG_ENV = "SIT_TEST_PREFERENCE_WORKER_HANG_AT_BATCH"


@dataclass(frozen=True)
class Item:
    """One response to write: model `model` answers instruction `id` for the `sample`-th time."""

    key: str
    model: str
    id: int | str
    sample: int
    instruction: str
    seed: int


class WorkerFailed(Exception):
    """The batched worker stalled or died; the caller falls back to stable mode."""


def load_response_model(spec: ResponseModel, trust_remote_code: bool) -> tuple[LoadedModel, set[int]]:
    """Load one response model and its stop ids; any failure becomes a SitError naming it."""
    try:
        lm = load_causal_lm(spec.model, load_in_4bit=spec.load_in_4bit, trust_remote_code=trust_remote_code)
        _, after_user = pre_query_template(lm.tokenizer, None)
    except SitError as e:
        raise SitError(f"response model '{spec.name}' ({spec.model}) could not be loaded: {e.problem}", e.fix) from None
    except Exception as e:  # noqa: BLE001 - a broken checkpoint can fail in many ways; name the model
        raise SitError(f"response model '{spec.name}' ({spec.model}) could not be loaded: {type(e).__name__}: {e}",
                       "fix or replace this entry of models.response_models; responses already written by the "
                       "other models are kept and reused when the stage runs again") from None
    return lm, stop_token_ids(lm.model, lm.tokenizer, after_user)


def sample_batch(lm: LoadedModel, stops: set[int], items: list[Item], sampling: Sampling,
                 on_step=None) -> list[dict]:
    """Answer each item through the model's chat template; one log record per item."""
    tok = lm.tokenizer
    prompts = [chat_prompt(tok, None, it.instruction) for it in items]
    out = generate(lm.model, prompts, [it.seed for it in items], sampling, stops, tok.pad_token_id, on_step)
    return [{"key": it.key, "model": it.model, "id": it.id, "sample": it.sample,
             "response": tok.decode(ids, skip_special_tokens=True).strip(), "tokens": len(ids),
             "truncated": len(ids) >= sampling.max_new_tokens}
            for it, ids in zip(items, out)]


def _worker_main(spec: dict, trust_remote_code: bool, sampling: dict, heartbeat_s: float, tasks, results) -> None:
    """Entry point of the spawned worker: load, then answer batches until told to stop."""
    try:
        lm, stops = load_response_model(ResponseModel(**spec), trust_remote_code)
    except SitError as e:
        results.put(("error", (e.problem, e.fix)))
        return
    results.put(("ready", None))
    hang_at = int(os.environ.get(HANG_ENV, "0"))
    last_beat = [0.0]

    def heartbeat(step: int) -> None:
        now = time.monotonic()
        if now - last_beat[0] >= heartbeat_s:
            last_beat[0] = now
            results.put(("tick", step))

    batches = 0
    while (payload := tasks.get()) is not None:
        batches += 1
        if batches == hang_at:
            threading.Event().wait()  # blocks forever, like a deadlocked generate()
        items = [Item(**d) for d in payload]
        results.put(("done", sample_batch(lm, stops, items, Sampling(**sampling), heartbeat)))


class BatchWorker:
    """A killable process that samples batches for one response model."""

    def __init__(self, spec: ResponseModel, trust_remote_code: bool, sampling: Sampling, stall_timeout_s: float):
        ctx = mp.get_context("spawn")  # fork would copy a parent that may hold CUDA or OpenMP state
        self.name = spec.name
        self.stall_timeout_s = stall_timeout_s
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.proc = ctx.Process(target=_worker_main, name=f"sit-preference-{spec.name}", daemon=True,
                                args=(spec.model_dump(), trust_remote_code, asdict(sampling),
                                      # several beats per timeout, but not one queue message per token
                                      min(0.5, stall_timeout_s / 4), self.tasks, self.results))
        self.proc.start()
        self._wait_ready()

    def _next_message(self, timeout: float):
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            return None

    def _wait_ready(self) -> None:
        # Loading has no stall timeout (a 7B download can take long), only a liveness check.
        while True:
            msg = self._next_message(1.0)
            if msg is None:
                if not self.proc.is_alive():
                    self.kill()
                    raise WorkerFailed(f"the worker for '{self.name}' exited with code {self.proc.exitcode} "
                                       "while loading the model")
                continue
            kind, payload = msg
            if kind == "error":
                self.kill()
                raise SitError(*payload)
            return

    def run(self, items: list[Item]) -> list[dict]:
        """Sample one batch. Raises WorkerFailed (after killing the worker) on a stall or crash."""
        self.tasks.put([asdict(it) for it in items])
        last_progress = time.monotonic()
        while True:
            msg = self._next_message(min(1.0, self.stall_timeout_s))
            if msg is not None:
                kind, payload = msg
                if kind == "done":
                    return payload
                last_progress = time.monotonic()  # a heartbeat
                continue
            if not self.proc.is_alive():
                code = self.proc.exitcode
                self.kill()
                raise WorkerFailed(f"the worker for '{self.name}' died with exit code {code}")
            idle = time.monotonic() - last_progress
            if idle >= self.stall_timeout_s:
                self.kill()
                raise WorkerFailed(f"the worker for '{self.name}' made no progress for {idle:.1f}s "
                                   f"(stall_timeout_s={self.stall_timeout_s:g})")

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()  # SIGKILL: a thread stuck in C code ignores anything gentler
        self.proc.join(timeout=30)
        self._drop_queues()

    def close(self) -> None:
        """Stop a healthy worker; it frees its model by exiting."""
        if self.proc.is_alive():
            self.tasks.put(None)
            self.proc.join(timeout=30)
        self.kill()

    def _drop_queues(self) -> None:
        # A queue whose reader was killed can hold unsent data; without cancel_join_thread the
        # parent would block at exit trying to flush it.
        for q in (self.tasks, self.results):
            q.cancel_join_thread()
            q.close()
