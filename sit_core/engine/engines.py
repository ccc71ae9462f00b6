"""Generation engines: everything in sit that samples text goes through one of these.

An engine takes prompts as token ids, one seed per prompt and the sampling settings, and
returns the new token ids of each (stop token excluded). Prompts are rendered and replies
decoded here, in the parent, with the model's own tokenizer, so every backend sees the same
tokens.

- `LocalEngine` (local.py): sit's seeded decoding loop (sampling.py) in this process, for base, LoRA and
  prompt-tuned models alike. Batch 1 is the stable mode: the seeds' fix for the batched
  notebook's deadlock.
- `EngineProcess`: an engine in its own process (worker.py), either vLLM under the vLLM
  environment's interpreter (backend.py finds it) or sit's loop in batches. Its stall watchdog
  kills a worker that sends no heartbeat for `stall_timeout_s` and raises `EngineFailed`; the
  stage then records the stall and goes on in stable mode. Its exit frees the GPU memory for
  the next stage's models.

Each request's randomness comes from its own seed (sampling.item_seed), so a reply does not
depend on its batch mates or on where a run was interrupted, on either backend.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from sit_core.engine import worker
from sit_core.engine.local import Completion, LocalEngine, Variant, load_variants
from sit_core.engine.models import eos_token_ids, load_tokenizer, resolve_model_path
from sit_core.engine.sampling import Sampling, pre_query_template, soft_prompt, stop_token_ids
from sit_core.config import SitConfig
from sit_core.config.backend import find_vllm_python
from sit_core.errors import SitError


class EngineFailed(Exception):
    """The engine process stalled or died (it has been killed); the caller goes on in stable mode."""


class EngineProcess:
    """A worker process (worker.py) behind a stall watchdog."""

    @property
    def description(self) -> str:
        if self.backend == "transformers":
            return f"sit's seeded decoding loop (transformers {self.version}) in an engine process"
        return f"{self.backend} {self.version} in an engine process"

    def __init__(self, python: str, init: dict, *, name: str, stall_timeout_s: float, log_path: Path | None = None):
        self.backend, self.name, self.stall_timeout_s = init["backend"], name, stall_timeout_s
        self.log_path = log_path
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
        # A session of its own: the kill reaches any process the engine started.
        self.proc = subprocess.Popen([python, worker.__file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, start_new_session=True, env=_worker_env())
        self._messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"sit-engine-{name}").start()
        self._send({"init": init})
        self.version = self._wait_ready()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._messages.put(json.loads(line))
        self._messages.put(None)  # end of output: the worker exited

    def _send(self, message: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; the next read says how

    def _died(self) -> str:
        self.proc.wait()
        tail = ""
        if self.log_path is not None and self.log_path.exists():
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            tail = f"; the end of its log ({self.log_path}): " + " | ".join(lines[-3:])
        return f"the {self.backend} engine for '{self.name}' exited with code {self.proc.returncode}{tail}"

    def _wait_ready(self) -> str:
        # Loading has no stall timeout (an 8B download can take long), only a liveness check.
        message = self._messages.get()
        if message is None:
            raise EngineFailed(self._died())
        if "error" in message:
            self.kill()
            raise SitError(f"the {self.backend} engine could not load '{self.name}': {message['error']}",
                           "check the model id or path and that it fits in memory; with generation.backend=vllm, "
                           "check the vLLM environment (`sit engine check`), or set generation.backend=transformers")
        self.backend = message["ready"]["backend"]
        return message["ready"]["version"]

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], sampling: Sampling,
                 adapters: Sequence[str | None] | None = None) -> list[Completion]:
        """One call's completions. Raises EngineFailed, after killing the worker, on a stall or crash."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        done = self._call({"generate": {"sampling": asdict(sampling),
                                        "requests": [{"prompt": list(p), "seed": int(s), "adapter": a}
                                                     for p, s, a in zip(prompts, seeds, adapters)]}})
        return [Completion(d["ids"], d["truncated"]) for d in done]

    def lm_eval(self, task: str, *, adapter: str | None, tokenizer: str, limit: int | None, seed: int) -> dict:
        """lm-eval's result JSON for one task on a worker started with backend "lm_eval"."""
        return self._call({"lm_eval": {"task": task, "adapter": adapter, "tokenizer": tokenizer, "limit": limit,
                                       "seed": seed}})

    def _call(self, message: dict):
        """Send one call and wait for its answer while heartbeats come in."""
        self._send(message)
        last_progress = time.monotonic()
        while True:
            try:
                message = self._messages.get(timeout=min(1.0, self.stall_timeout_s))
            except queue.Empty:
                idle = time.monotonic() - last_progress
                if idle >= self.stall_timeout_s:
                    self.kill()
                    raise EngineFailed(f"the {self.backend} engine for '{self.name}' made no progress for "
                                       f"{idle:.1f}s (stall_timeout_s={self.stall_timeout_s:g})") from None
                continue
            if message is None:
                raise EngineFailed(self._died())
            if "done" in message:
                return message["done"]
            if "failed" in message:
                raise EngineFailed(f"the {self.backend} engine for '{self.name}' failed: {message['failed']}")
            last_progress = time.monotonic()  # a heartbeat

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # a thread stuck in C code ignores anything gentler
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._close_files()

    def close(self) -> None:
        """Stop a healthy worker: it frees its model (and GPU memory) by exiting."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _close_files(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def _worker_env() -> dict:
    env = dict(os.environ)
    # The transformers worker runs this sit: the folder holding sit_core goes first on its path.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


@dataclass
class Engine:
    """An engine for one model, with what the stages need around it: the model's tokenizer,
    its stop ids, and which backend answers."""

    impl: LocalEngine | EngineProcess
    tokenizer: object
    stops: set[int]

    @property
    def backend(self) -> str:
        return self.impl.backend

    @property
    def description(self) -> str:
        """What generated, for a report to name beside the results."""
        return self.impl.description

    def generate(self, prompts, seeds, sampling: Sampling, adapters: Sequence[str | None] | None = None) -> list[Completion]:
        """Completions of `prompts`; `adapters` names each prompt's adapter directory (None:
        the base model), on engines that hold them."""
        return self.impl.generate(prompts, seeds, sampling, adapters)

    def close(self) -> None:
        self.impl.close()


@dataclass(frozen=True)
class EngineSpec:
    """How to run one model. `backend` is transformers or vllm (auto is resolved when the config
    loads); `isolated` runs the transformers loop in a killable worker too (batched mode)."""

    model: str
    backend: str
    batch_size: int = 1
    isolated: bool = False
    load_in_4bit: bool = False
    trust_remote_code: bool = False
    max_model_len: int = 2048
    stall_timeout_s: float = 300.0
    vllm_python: str | None = None
    gpu_memory_utilization: float = 0.85
    max_lora_rank: int | None = None
    log_path: Path | None = None
    # transformers only: PEFT adapter directories loaded beside the base model, which requests
    # name (LocalEngine), and the worker process's torch threads (None: torch's default).
    adapters: tuple[str, ...] = ()
    threads: int | None = None


def engine_spec(cfg: SitConfig, model: str, *, stable: bool = False, isolated: bool = False, **settings) -> EngineSpec:
    """The EngineSpec of `model` under this config's backend; `stable` is the safe mode (sit's
    loop in this process, one prompt at a time), where a stage goes after a stall."""
    gen = cfg.generation
    backend = "transformers" if stable else gen.backend
    if stable:
        settings["batch_size"] = 1
    settings.setdefault("stall_timeout_s", gen.stall_timeout_s)
    return EngineSpec(model=model, backend=backend, isolated=isolated and not stable,
                      trust_remote_code=cfg.models.trust_remote_code,
                      vllm_python=find_vllm_python(gen.vllm_python) if backend == "vllm" else None,
                      gpu_memory_utilization=gen.gpu_memory_utilization, **settings)


def open_engine(spec: EngineSpec, name: str, tokenizer=None, *, lm_eval: dict | None = None) -> Engine:
    """Start the engine `spec` describes; `name` labels it in errors (a model or variant name).
    With `lm_eval` (harness.py's path, the task folder and the NLTK data; vLLM only), the engine
    is lm-eval's vLLM model and also takes `impl.lm_eval(...)` calls."""
    if spec.backend == "vllm" and spec.vllm_python is None:
        from sit_core.engine.backend import check

        check(None)  # raises the SitError that says how to install it
    tokenizer = tokenizer or load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    _, after_user = pre_query_template(tokenizer, None)
    if spec.backend == "transformers" and not spec.isolated:
        model, variants = load_variants(spec.model, spec.adapters, load_in_4bit=spec.load_in_4bit,
                                        trust_remote_code=spec.trust_remote_code)
        stops = stop_token_ids(eos_token_ids(model.generation_config), tokenizer, after_user)
        return Engine(LocalEngine(model, _pad_id(tokenizer, stops), stops, spec.batch_size, variants), tokenizer, stops)
    path = resolve_model_path(spec.model)
    stops = stop_token_ids(eos_token_ids(path), tokenizer, after_user)
    init = {"backend": spec.backend, "model": path, "stop_ids": sorted(stops),
            "trust_remote_code": spec.trust_remote_code}
    if spec.backend == "vllm":
        from sit_core.engine.backend import vllm_init

        init.update(vllm_init(spec))
        if lm_eval is not None:
            init.update(backend="lm_eval", **lm_eval)
        python = spec.vllm_python
    else:
        init.update(load_in_4bit=spec.load_in_4bit, adapters=list(spec.adapters), threads=spec.threads,
                    pad_id=_pad_id(tokenizer, stops))
        python = sys.executable
    process = EngineProcess(python, init, name=name, stall_timeout_s=spec.stall_timeout_s, log_path=spec.log_path)
    return Engine(process, tokenizer, stops)


def decode(engine: Engine, completion: Completion) -> str:
    return engine.tokenizer.decode(completion.ids, skip_special_tokens=True).strip()



def model_engine(model, tokenizer, batch_size: int = 1) -> Engine:
    """An Engine over a model already loaded in this process (base, LoRA or prompt tuning): sit's loop."""
    decoder, prefix = soft_prompt(model)
    after_user = pre_query_template(tokenizer, None)[1] if getattr(tokenizer, "chat_template", None) else ""
    stops = stop_token_ids(eos_token_ids(model.generation_config), tokenizer, after_user)
    return Engine(LocalEngine(decoder, _pad_id(tokenizer, stops), stops, batch_size, {None: Variant(prefix=prefix)}),
                  tokenizer, stops)


def _pad_id(tokenizer, stops: set[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
