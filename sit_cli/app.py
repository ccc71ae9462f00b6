"""The `sit` Typer app, its console and its error exit, shared by the modules that add commands."""

from __future__ import annotations

import typer
from rich.console import Console

from sit_core.errors import SitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Synthetic Instruction Tuner: Magpie data, "
                  "quality filter, preference pairs, LoRA / prompt tuning / DPO, evaluation - one resumable pipeline.")
console = Console(stderr=True)

def fail(err: SitError) -> None:
    console.print(f"[bold red]error:[/] {err.problem}")
    if err.fix:
        console.print(f"[bold]fix:[/] {err.fix}")
    raise typer.Exit(2)
