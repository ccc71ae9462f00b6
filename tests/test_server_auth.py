"""`sit server` on an address other machines reach: anyone who reaches an open Prefect API can
start deployments that run code on the GPU VM, so it starts only with Prefect's API
authentication (or an explicit --insecure), and clients that carry the credentials work."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from typer.testing import CliRunner

from conftest import HANG_GUARD_S
from sit_cli.main import app
from sit_cli.server import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = "alice:correct-horse"


def test_an_open_server_on_every_interface_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["server", "--host", "0.0.0.0", "--port", str(free_port())])
    out = " ".join(result.output.split())
    assert result.exit_code == 2, out
    assert "would serve Prefect's API without authentication" in out
    assert "PREFECT_SERVER_API_AUTH_STRING" in out and "--insecure" in out


def _flow_runs(api: str, credentials: str | None) -> int:
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return len(json.loads(response.read()))


def test_an_authenticated_server_serves_clients_that_carry_its_credentials(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_API_AUTH_STRING": CREDENTIALS}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "sit_cli.main", "server", "--host", "0.0.0.0", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server)
        try:
            _flow_runs(api, None)
            raise AssertionError("the API answered a request without credentials")
        except urllib.error.HTTPError as e:
            assert e.code == 401

        run_dir = tmp_path / "run"  # a finished run: the client only talks to the server
        shutil.copytree(Path(__file__).parent / "fixtures" / "previous_run", run_dir)
        client_env = {**os.environ, "PREFECT_HOME": str(tmp_path / "client"), "PREFECT_API_URL": api,
                      "PREFECT_API_AUTH_STRING": CREDENTIALS}
        client_env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
        proc = subprocess.run([sys.executable, "-m", "sit_cli.main", "run", "--run-dir", str(run_dir),
                               "--stages", "generate,filter"], cwd=ROOT, env=client_env, capture_output=True,
                              text=True, timeout=HANG_GUARD_S)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert _flow_runs(api, CREDENTIALS) == 1
    finally:
        server.terminate()
        server.wait(timeout=60)
