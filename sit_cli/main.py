"""The `sit` command line. Library code is in sit_core; orchestration with Prefect in sit_prefect/."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from sit_core.config import STAGE_ORDER, load_config
from sit_core.errors import SitError
from sit_cli.app import app, console, fail

ConfigOpt = typer.Option(None, "--config", "-c", help="config.json or YAML in the seed format")
PresetOpt = typer.Option(None, "--preset", "-p", help="demo | colab-t4 | colab-a100")
ProfileOpt = typer.Option(None, "--profile", help="auto | cpu | t4 | a100 | h100 (default: auto-detect)")
SetOpt = typer.Option(None, "--set", "-s", help="override a value: section.key=value (repeatable)")


@app.command()
def run(
    config: Optional[Path] = ConfigOpt,
    preset: Optional[str] = PresetOpt,
    profile: Optional[str] = ProfileOpt,
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-d", help="default: ./runs/<run_name>"),
    stages: Optional[str] = typer.Option(None, "--stages", help="comma-separated subset, e.g. generate,filter"),
    hub_repo: Optional[str] = typer.Option(None, "--hub-repo", help="user/name: mirror the run dir to a private hub repo"),
    overrides: Optional[List[str]] = SetOpt,
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="shard generation and preference pairs over N worker processes"),
    devices: Optional[str] = typer.Option(None, "--devices", help="shard them one worker per GPU, e.g. 0,1,2,3"),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS",
                                      help="run their shards on the Ray cluster at HOST:PORT (or auto), one GPU each "
                                           "(deployments/README.md); sit runs on a node of the cluster"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also show library warnings, progress bars and "
                                 "Prefect's log here (they always go to <run_dir>/logs/sit-run-<time>.log)"),
) -> None:
    """Run the pipeline (the embedded demo on CPU with no arguments). Rerun the same command
    to resume: finished stages are skipped, partial ones continue from their checkpoints."""
    overrides = list(overrides or []) + ([f"hub_repo={hub_repo}"] if hub_repo else [])
    stage_list = stages.split(",") if stages else None
    from .console import RunConsole

    run_console = None
    try:
        if run_dir is None:
            name = load_config(config, preset=preset, profile=profile or "cpu", overrides=overrides).run_name
            run_dir = Path("runs") / name
        from sit_core.pipeline import check_run
        from sit_core.store.rundir import ensure_writable

        ensure_writable(run_dir)  # the run's log file goes there (check_run says it again)
        # From here on, library output goes to the run's log file; the terminal shows sit's
        # own lines (sit_cli/console.py).
        with RunConsole(run_dir, verbose=verbose, console=console) as run_console:
            # Configuration, model, lock and run.json mistakes: one clear error, before Prefect starts.
            check_run(run_dir, str(config) if config else None, preset=preset, profile=profile, overrides=overrides,
                      stages=stage_list)
            if ray:
                if workers or devices:
                    raise SitError("--ray, and --workers or --devices, name two places for the shards",
                                   "give one of them")
                from sit_prefect.ray_runner import connect

                connect(ray)  # a wrong address or a node with other versions: one error, before Prefect starts
            arguments = dict(run_dir=str(run_dir), config=str(config) if config else None, preset=preset,
                             profile=profile, overrides=overrides, stages=stage_list)
            from sit_prefect.flows import synthetic_instruction_tuner

            result = synthetic_instruction_tuner(**arguments, workers=workers,
                                                 devices=devices.split(",") if devices else None, ray=ray)
    except SitError as err:
        if run_console is not None and run_console.stages:  # a stage ran: what it printed is in the log
            console.print(f"log: {run_console.log_path}", style="dim", markup=False)
        fail(err)
    _print_status(run_dir, run_console.stages)
    if any(summary.get("status") != "done" for summary in (result or {}).values()):
        raise typer.Exit(1)


def _print_status(run_dir: Path, ran: Optional[dict] = None) -> None:
    """Each stage's status and progress from its manifest; after `sit run`, `ran` (stage ->
    status, seconds, cached, from sit_cli/console.py) adds this run's wall time and cache hits."""
    from sit_core.store.manifest import stage_summary

    from .console import format_seconds

    table = Table(title=f"run {run_dir}")
    for col in ("stage", "status", "progress") + (("time", "cached") if ran is not None else ()):
        table.add_column(col)
    for stage in STAGE_ORDER:
        s = stage_summary(run_dir, stage)
        prog = f"{s['done']} of {s['total']}" if "total" in s else ""
        status = s["status"] if s["status"] != "partial" else f"partial ({prog})"
        color = {"done": "green", "pending": "dim", "damaged": "red"}.get(s["status"], "yellow")
        row = [stage, f"[{color}]{status}[/]", prog]
        if ran is not None:
            this = ran.get(stage, {})
            row += ([format_seconds(this["seconds"]), "yes" if this["cached"] else "no"] if "seconds" in this
                    else ["[dim]not run[/]", ""])
        table.add_row(*row)
    Console().print(table)


@app.command()
def status(run_dir: Path = typer.Argument(..., help="the run directory")) -> None:
    """Show each stage as done, partial (n of N) or pending."""
    if not run_dir.exists():
        fail(SitError(f"run directory {run_dir} does not exist", "check the path, or start it with `sit run --run-dir`"))
    _print_status(run_dir)


@app.command("config")
def show_config(
    config: Optional[Path] = ConfigOpt,
    preset: Optional[str] = PresetOpt,
    profile: Optional[str] = ProfileOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Print the resolved configuration as JSON (defaults < profile < preset < file < --set)."""
    try:
        cfg = load_config(config, preset=preset, profile=profile, overrides=overrides)
    except SitError as err:
        fail(err)
    sys.stdout.write(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")


@app.command()
def reset(run_dir: Path = typer.Argument(...), stage: str = typer.Argument(..., help="the stage to discard"),
          yes: bool = typer.Option(False, "--yes", "-y", help="do not ask")) -> None:
    """Discard a stage and the stages that depend on it, directly or through others (on the hub
    mirror too), so they are recomputed. Stages that do not read it are kept: resetting
    prompt_tuning keeps dpo, which reads only sft and preference."""
    from sit_core.reset import reset_run, stages_from

    try:
        doomed = stages_from(stage)
        present = [s for s in doomed if (run_dir / s).exists()]
        if not yes and not typer.confirm(f"delete {', '.join(present) or 'nothing'} in {run_dir}?"):
            raise typer.Exit(1)
        present = reset_run(run_dir, stage)
    except SitError as err:
        fail(err)
    console.print(f"reset: {', '.join(present) or 'nothing to delete'}")


@app.command()
def publish(run_dir: Path = typer.Option(..., "--run-dir", "-d"),
            namespace: str = typer.Option(..., "--namespace", "-n", help="hub user or organisation"),
            public: bool = typer.Option(False, "--public", help="create public repos (default private)")) -> None:
    """Push the final adapters as model repos and the datasets as dataset repos, with cards."""
    from sit_core.publish import publish_run
    from sit_core.secrets import install_log_redaction

    install_log_redaction()
    try:
        urls = publish_run(run_dir, namespace, private=not public)
    except SitError as err:
        fail(err)
    for url in urls:
        console.print(url)


# `sit server` and `sit deploy` (sit_cli/server.py), and `sit engine` (sit_cli/engine.py),
# register themselves on `app`.
from sit_cli import engine, server  # noqa: E402,F401


if __name__ == "__main__":
    app()
