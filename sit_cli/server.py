"""`sit server` and `sit deploy`: the Prefect server with its UI, and the scheduled GPU deployment.

Both wrap Prefect's own CLI (run with this Python) rather than re-implementing it, so what
`deployments/README.md` documents with plain `prefect ...` commands behaves the same.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, List, Optional

import typer
import yaml

from sit_core.errors import SitError
from sit_prefect.local_server import DEFAULT_STARTUP_TIMEOUT_S, NOTICE_EVERY_S, check_prefect_home

from sit_cli.app import app, console, fail

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"


def prefect_cli(*args: str) -> list[str]:
    """`prefect ...` with the interpreter sit runs under (a venv's prefect, not a global one)."""
    return [sys.executable, "-m", "prefect", *args]


def start_server(host: str, port: int, env: dict | None = None, log_path: Path | None = None) -> subprocess.Popen:
    """Start `prefect server start` as a child process; it serves the API under /api and the UI at /."""
    env = dict(os.environ if env is None else env)
    # The UI's pages call the API at PREFECT_UI_API_URL, which does not follow --port (it defaults
    # to port 4200). Behind 0.0.0.0, set it to the address browsers use (deployments/README.md).
    env.setdefault("PREFECT_UI_API_URL", f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/api")
    out = open(log_path, "ab") if log_path else None
    return subprocess.Popen(prefect_cli("server", "start", "--host", host, "--port", str(port)),
                            env=env, stdout=out, stderr=subprocess.STDOUT if out else None)


def wait_until_healthy(url: str, proc: subprocess.Popen | None = None,
                       timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S, say=None) -> None:
    """Poll <url>/api/health; the first start imports the server and runs database migrations,
    which took over 30 s on a slow machine. `say` gets a line every NOTICE_EVERY_S seconds."""
    started = time.monotonic()
    deadline, next_notice = started + timeout_s, started + NOTICE_EVERY_S
    while time.monotonic() < deadline:
        if say is not None and time.monotonic() >= next_notice:
            say(f"waiting for the Prefect server at {url} ({time.monotonic() - started:.0f} s): the first start "
                "creates its database in PREFECT_HOME")
            next_notice += NOTICE_EVERY_S
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the Prefect server at {url} was not healthy after {timeout_s:.0f}s")


def check_port_free(host: str, port: int) -> None:
    """A second server on a taken port dies deep in uvicorn; say so before starting."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise SitError(f"port {port} on {host} is already in use ({err.strerror}): another Prefect server "
                           "(an earlier `sit server`, a systemd service) or another program holds it",
                           f"use that server (export PREFECT_API_URL=http://127.0.0.1:{port}/api), stop it, or "
                           f"choose another port: sit server --port {port + 1}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background_server(prefect_home: Path, port: int | None = None) -> Iterator[tuple[str, dict]]:
    """A throwaway loopback server with its own PREFECT_HOME (database, settings), for tests and
    demos. Yields (UI url, environment for clients: PREFECT_HOME and PREFECT_API_URL set)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = start_server("127.0.0.1", port, env=env, log_path=prefect_home / "server.log")
    try:
        wait_until_healthy(url, proc)
        yield url, {**env, "PREFECT_API_URL": f"{url}/api"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_exposure(host: str, insecure: bool) -> None:
    """Anyone who reaches an open Prefect API can start deployments that run code on this GPU
    VM, so a server others can reach starts only with Prefect's API authentication, or when the
    user says --insecure."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback or insecure or os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        return
    raise SitError(
        f"sit server --host {host} would serve Prefect's API without authentication to every machine that "
        "reaches it, and the API starts deployments that run code here",
        "keep the default --host 127.0.0.1 and reach the UI through an SSH tunnel, or set "
        "PREFECT_SERVER_API_AUTH_STRING='user:password' here and PREFECT_API_AUTH_STRING (the same value) for "
        "sit run, workers and notebooks (deployments/README.md); --insecure starts it open anyway")


@app.command()
def server(host: str = typer.Option("127.0.0.1", "--host", help="0.0.0.0 to listen on every interface"),
           port: int = typer.Option(4200, "--port"),
           insecure: bool = typer.Option(False, "--insecure", help="serve a non-loopback address without API "
                                         "authentication (PREFECT_SERVER_API_AUTH_STRING)")) -> None:
    """Start a Prefect server with its UI and print the URL. Runs until stopped (Ctrl-C / SIGTERM).
    On an address other machines reach, it needs PREFECT_SERVER_API_AUTH_STRING (or --insecure)."""
    url = f"http://{host}:{port}"
    try:
        check_exposure(host, insecure)
        check_port_free(host, port)
        check_prefect_home()
    except SitError as err:
        fail(err)
    proc = start_server(host, port)
    # systemd stops the service with SIGTERM: pass it on so the server shuts down cleanly.
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}" if host == "0.0.0.0" else url, proc, say=console.print)
        shown = url if host != "0.0.0.0" else f"http://<this machine's address>:{port}"
        console.print(f"[bold green]Prefect UI:[/] {shown}")
        console.print(f"clients (sit run, workers, notebooks): export PREFECT_API_URL={shown}/api")
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
    except (RuntimeError, TimeoutError) as err:
        proc.terminate()
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(1)
    raise typer.Exit(proc.returncode if proc.returncode and proc.returncode > 0 else 0)


def local_source_file(prefect_file: Path, checkout: Path) -> Path:
    """A copy of prefect.yaml whose pull step runs the flow from `checkout` instead of a fresh
    git clone + install: for a VM (or a test) that already has an installed checkout."""
    spec = yaml.safe_load(prefect_file.read_text(encoding="utf-8"))
    spec["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(checkout.resolve())}}]
    for deployment in spec.get("deployments", []):
        deployment.pop("pull", None)
    out = Path(tempfile.mkdtemp(prefix="sit-deploy-")) / "prefect.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return out


@app.command()
def deploy(
    name: str = typer.Option("sit-weekly", "--name", "-n", help="deployment name in deployments/prefect.yaml"),
    prefect_file: Path = typer.Option(PREFECT_FILE, "--prefect-file", help="the deployment spec"),
    local_source: bool = typer.Option(False, "--local-source", help="run from this checkout instead of "
                                      "cloning and installing the repo on every run"),
    params: Optional[List[str]] = typer.Option(None, "--param", help="override a flow parameter: key=JSON (repeatable)"),
) -> None:
    """Create the process work pool (if missing) and register the deployment from prefect.yaml with
    the Prefect server at PREFECT_API_URL. Then start a worker: prefect worker start --pool <pool>."""
    spec = yaml.safe_load(prefect_file.read_text(encoding="utf-8"))
    found = [d for d in spec.get("deployments", []) if d.get("name") == name]
    if not found:
        names = ", ".join(d.get("name", "?") for d in spec.get("deployments", []))
        console.print(f"[bold red]error:[/] no deployment '{name}' in {prefect_file}")
        console.print(f"[bold]fix:[/] use one of: {names}")
        raise typer.Exit(2)
    pool = found[0]["work_pool"]["name"]
    exists = subprocess.run(prefect_cli("work-pool", "inspect", pool), cwd=REPO_ROOT,
                            capture_output=True, text=True).returncode == 0
    if not exists:
        subprocess.run(prefect_cli("work-pool", "create", pool, "--type", "process"), cwd=REPO_ROOT, check=True)
    spec_file = local_source_file(prefect_file, REPO_ROOT) if local_source else prefect_file
    # Run from the repo root: the entrypoint (sit_prefect/flows.py) is resolved relative to it.
    cmd = prefect_cli("deploy", "--no-prompt", "--prefect-file", str(spec_file), "--name", name)
    for p in params or []:
        cmd += ["--param", p]
    result = subprocess.run(cmd, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise typer.Exit(result.returncode)
    console.print(f"deployment registered; start a worker with: prefect worker start --pool {pool}")
