"""A generation engine in its own process, spoken to in JSON lines over stdin/stdout.

Why a process: a hang in C code (the seeds' batched `generate()` deadlock) cannot be
interrupted from inside a process, but a process can always be killed; and vLLM cannot share
an environment with Prefect's server (their fastapi pins conflict), so its engine runs under
another interpreter. This file therefore imports only the standard library at module level:
the vLLM environment runs it by path, without sit installed. The parent side is
sit_core/engine/engines.py (`EngineProcess`).

Protocol, one JSON object per line:
    parent -> {"init": {"backend": "vllm"|"transformers", "model": path, ...}}
    worker -> {"ready": {"backend": ..., "version": ...}}  or  {"error": problem, "fix": fix}
    parent -> {"generate": {"sampling": {...}, "requests": [{"prompt": [ids], "seed": n, "adapter": path|null}]}}
    worker -> {"tick": n} while it decodes (a heartbeat, at most a few per second)
    worker -> {"done": [{"ids": [ids], "truncated": bool}, ...]}   (request order; stop token excluded)
  or, with backend "lm_eval" (lm-eval's own vLLM model on the engine):
    parent -> {"lm_eval": {"task": name, "adapter": path|null, "tokenizer": path, "limit": n|null, "seed": n}}
    worker -> {"tick": n} ...  then  {"done": lm-eval's result JSON}
  a call that raises is answered {"failed": "Type: message"} (its traceback goes to the log).
    parent closes stdin -> the worker exits, and its memory (GPU included) is freed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

# Test hook, deliberately outside the config: the worker's Nth generate call blocks forever
# inside the engine's decoding step, a real hang for the parent's watchdog to catch.
HANG_ENV = "SIT_TEST_ENGINE_HANG_AT_CALL"
HEARTBEAT_S = 0.5


class Heartbeat:
    def __init__(self, send):
        self.send, self.last, self.steps = send, 0.0, 0

    def __call__(self, *_) -> None:
        self.steps += 1
        now = time.monotonic()
        if now - self.last >= HEARTBEAT_S:
            self.last = now
            self.send({"tick": self.steps})


def vllm_settings(init: dict) -> dict:
    """The environment vLLM reads at import, then the LLM(...) arguments of an init message."""
    if init.get("device") == "cpu":
        # One process: the engine core in a child would outlive a SIGKILL of this one.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # Threads the scheduler may move: vLLM's default pins its threads to cores, and pinned
        # OpenMP threads on a 2-core machine shared with the stage's own process crawled (the
        # demo's Magpie stage: 11 min against 1 on transformers). Unpinned, every core this
        # process may use: the stage waits while the engine generates, and 2 threads made
        # 24 requests 1.6x faster than 1 on a 2-core EPYC (bench/README). OMP_NUM_THREADS, when
        # set (the test suite sets 1), is kept.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    if init.get("batch_invariant"):
        # The same tokens whatever a request's batch mates (Ampere and newer); read at import.
        os.environ.setdefault("VLLM_BATCH_INVARIANT", "1")
    kwargs = dict(seed=0, dtype=init.get("dtype", "auto"), max_model_len=init["max_model_len"],
                  enforce_eager=init["enforce_eager"], enable_prefix_caching=True,
                  trust_remote_code=init.get("trust_remote_code", False),
                  gpu_memory_utilization=init["gpu_memory_utilization"])
    if init.get("max_lora_rank"):
        kwargs.update(enable_lora=True, max_lora_rank=init["max_lora_rank"], max_loras=init.get("max_loras", 2))
    if init.get("quantization"):
        kwargs["quantization"] = init["quantization"]
    return kwargs


def lora_request(adapters: dict[str, int], adapter: str | None):
    """vLLM's LoRARequest for an adapter directory, one stable id per directory (None: base)."""
    if not adapter:
        return None
    from vllm.lora.request import LoRARequest

    lora_id = adapters.setdefault(adapter, len(adapters) + 1)
    return LoRARequest(f"adapter-{lora_id}", lora_id, adapter)


class VllmBackend:
    """vLLM's engine stepped by hand (what `LLM.generate` does inside), so that a heartbeat goes
    out after every scheduler step."""

    def __init__(self, init: dict):
        settings = vllm_settings(init)
        import vllm
        from vllm import LLM

        self.version = vllm.__version__
        self.stops = list(init["stop_ids"])
        self.engine = LLM(model=init["model"], tokenizer=init["model"], **settings).llm_engine
        self.adapters: dict[str, int] = {}

    def hang_in_step(self) -> None:
        def blocked():
            threading.Event().wait()

        self.engine.step = blocked

    def generate(self, sampling: dict, requests: list[dict], beat) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        results: dict[str, dict] = {}
        for i, req in enumerate(requests):
            params = SamplingParams(temperature=sampling["temperature"], top_p=sampling["top_p"],
                                    max_tokens=sampling["max_new_tokens"], seed=req["seed"],
                                    stop_token_ids=self.stops, detokenize=False)
            self.engine.add_request(str(i), TokensPrompt(prompt_token_ids=req["prompt"]), params,
                                    lora_request=lora_request(self.adapters, req.get("adapter")))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    completion = out.outputs[0]
                    ids = list(completion.token_ids)
                    if completion.finish_reason == "stop" and ids and ids[-1] in self.stops:
                        ids.pop()
                    results[out.request_id] = {"ids": ids, "truncated": completion.finish_reason == "length"}
            beat()
        return [results[str(i)] for i in range(len(requests))]


class TransformersBackend:
    """sit's own seeded decoding loop (sit_core/engine/sampling.py), for the transformers
    backend's batched mode: the parent sends one batch per call, so rows keep their batch mates.
    Requests may name an adapter of `init["adapters"]` (local.load_variants)."""

    def __init__(self, init: dict):
        import torch
        import transformers

        from sit_core.engine.local import LocalEngine, load_variants

        if init.get("threads"):
            torch.set_num_threads(init["threads"])
        self.version = transformers.__version__
        model, variants = load_variants(init["model"], init.get("adapters", []),
                                        load_in_4bit=init.get("load_in_4bit", False),
                                        trust_remote_code=init.get("trust_remote_code", False))
        # One call, one batch: the parent sizes the calls.
        self.engine = LocalEngine(model, init["pad_id"], set(init["stop_ids"]), batch_size=1 << 30, variants=variants)
        self.hang = False

    def hang_in_step(self) -> None:
        self.hang = True

    def generate(self, sampling: dict, requests: list[dict], beat) -> list[dict]:
        from sit_core.engine.sampling import Sampling

        def on_step(step: int) -> None:
            if self.hang:
                threading.Event().wait()
            beat()

        done = self.engine.generate([r["prompt"] for r in requests], [r["seed"] for r in requests],
                                    Sampling(**sampling), [r.get("adapter") for r in requests], on_step)
        return [{"ids": c.ids, "truncated": c.truncated} for c in done]


def answer_vllm_cpu_as_vllm() -> None:
    """lm-eval asks importlib.metadata for the version of the distribution "vllm" (at import and
    before LoRA); vllm-cpu installs the same package under its own name. The answer is vLLM's own
    for that case (vllm/platforms: the vllm-cpu version + "+cpu"), which its platform check reads."""
    import importlib.metadata as metadata

    version = metadata.version

    def version_of(name: str) -> str:
        try:
            return version(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return version("vllm-cpu") + "+cpu"
            raise

    metadata.version = version_of


class LmEvalBackend(VllmBackend):
    """lm-eval's own vLLM model (`lm_eval.models.vllm_causallms.VLLM`), whose engine also takes
    `generate` calls: one engine for a model's benchmarks and its agent turns, every variant a
    LoRA request on it. lm-eval hands the engine token ids, so a variant's tokenizer and chat
    template (saved beside its adapter) are swapped in with its adapter. The scoring is
    harness.py, loaded by path, as in sit's own environment."""

    name = "vllm"

    def __init__(self, init: dict):
        settings = vllm_settings(init)
        # lm-eval's IFEval checker downloads NLTK data at import unless it finds it here.
        os.environ["NLTK_DATA"] = init["nltk_data"]
        answer_vllm_cpu_as_vllm()
        import importlib.util

        import lm_eval
        import vllm
        from lm_eval.models.vllm_causallms import VLLM

        spec = importlib.util.spec_from_file_location("sit_harness", init["harness"])
        self.harness = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.harness)
        self.include_path = init["include_path"]
        self.version = f"{vllm.__version__} (lm-eval {lm_eval.__version__})"
        self.stops = list(init["stop_ids"])
        # lm-eval passes every keyword it does not name on to LLM(...).
        self.lm = VLLM(pretrained=init["model"], batch_size="auto", **settings)
        self.engine = self.lm.model.llm_engine
        self.tokenizers = {init["model"]: self.lm.tokenizer}
        self.adapters: dict[str, int] = {}
        self.beat = None
        step = self.engine.step

        def step_with_heartbeat():
            outputs = step()
            if self.beat is not None:
                self.beat()
            return outputs

        self.engine.step = step_with_heartbeat

    def evaluate(self, call: dict, beat) -> dict:
        from transformers import AutoTokenizer

        path = call["tokenizer"]
        if path not in self.tokenizers:
            from lm_eval.models.utils import configure_pad_token

            self.tokenizers[path] = configure_pad_token(AutoTokenizer.from_pretrained(path),
                                                        model_config=self.lm._config)
        self.lm.tokenizer = self.tokenizers[path]
        self.lm.hf_chat_template = getattr(self.lm.tokenizer, "chat_template", None)
        self.lm.lora_request = lora_request(self.adapters, call.get("adapter"))
        self.beat = beat
        try:
            return self.harness.evaluate_task(self.lm, call["task"], limit=call.get("limit"), seed=call["seed"],
                                              include_path=self.include_path)
        finally:
            self.beat = None


BACKENDS = {"vllm": VllmBackend, "transformers": TransformersBackend, "lm_eval": LmEvalBackend}


def die_with_parent() -> None:
    """Linux: the kernel kills this worker when the process that started it dies, even by
    SIGKILL, so that a killed stage leaves no engine holding the GPU behind it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the worker exits at its next read from the closed pipe
    if os.getppid() == 1:  # the parent died before the call above
        os._exit(1)


def main() -> None:
    die_with_parent()
    # The protocol gets a private copy of stdout; fd 1 then points at stderr, so whatever a
    # library prints (vLLM logs to stdout) cannot corrupt a message.
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    lock = threading.Lock()

    def send(message: dict) -> None:
        with lock:
            channel.write(json.dumps(message) + "\n")
            channel.flush()

    first = sys.stdin.readline()
    if not first:
        return
    init = json.loads(first)["init"]
    try:
        backend = BACKENDS[init["backend"]](init)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which names the model and the fix
        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return
    send({"ready": {"backend": getattr(backend, "name", init["backend"]), "version": backend.version}})
    hang_at = int(os.environ.get(HANG_ENV, "0"))
    calls = 0
    for line in sys.stdin:
        call = json.loads(line)
        calls += 1
        if calls == hang_at:
            backend.hang_in_step()
        try:
            if "lm_eval" in call:
                done = backend.evaluate(call["lm_eval"], Heartbeat(send))
            else:
                done = backend.generate(call["generate"]["sampling"], call["generate"]["requests"], Heartbeat(send))
        except Exception as e:  # noqa: BLE001 - the parent decides: fall back, or name the problem
            traceback.print_exc()
            send({"failed": f"{type(e).__name__}: {e}"})
            continue
        send({"done": done})


if __name__ == "__main__":
    if os.path.dirname(os.path.abspath(__file__)) == sys.path[0]:
        # Run by path: this folder (sit_core/engine) must not shadow top-level modules.
        sys.path.pop(0)
    main()
