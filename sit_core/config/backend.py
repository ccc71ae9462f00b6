"""Which generation backend `generation.backend: auto` means on this machine.

vLLM runs in an environment of its own (its fastapi pin excludes Prefect's server; see
DEVELOPERS.md), found in this order: `generation.vllm_python`, $SIT_VLLM_PYTHON, the
environment `sit engine install` makes ($SIT_CACHE/vllm-env, default ~/.cache/sit/vllm-env),
and last this interpreter, if it has vllm itself. SIT_VLLM_PYTHON=none turns the search off
(auto then means transformers). Finding it costs no vLLM import: a `find_spec` in that
interpreter.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

BACKENDS = ("auto", "transformers", "vllm")


def cache_root() -> Path:
    return Path(os.environ.get("SIT_CACHE", Path.home() / ".cache" / "sit")).expanduser()


def default_vllm_env() -> Path:
    return cache_root() / "vllm-env"


def vllm_python_candidates(configured: str | None) -> list[str]:
    """Where to look; SIT_VLLM_PYTHON=none looks nowhere but the configured interpreter."""
    if os.environ.get("SIT_VLLM_PYTHON") == "none":
        return [configured] if configured else []
    env_python = default_vllm_env() / "bin" / "python"
    return [p for p in (configured, os.environ.get("SIT_VLLM_PYTHON"), str(env_python)) if p]


@functools.lru_cache(maxsize=None)
def has_module(python: str, module: str) -> bool:
    """Whether `module` can be found by the interpreter `python` (without importing it)."""
    if python == sys.executable:
        return importlib.util.find_spec(module) is not None
    if not Path(python).exists():
        return False
    probe = subprocess.run([python, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


def has_vllm(python: str) -> bool:
    return has_module(python, "vllm")


def find_vllm_python(configured: str | None = None) -> str | None:
    """The interpreter whose environment has vLLM, or None."""
    for python in vllm_python_candidates(configured):
        if has_vllm(python):
            return python
    if os.environ.get("SIT_VLLM_PYTHON") == "none":
        return None
    return sys.executable if has_vllm(sys.executable) else None


def detect_backend(configured_python: str | None = None) -> str:
    return "vllm" if find_vllm_python(configured_python) else "transformers"
