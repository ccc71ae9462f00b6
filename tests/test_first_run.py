"""A user's first run: Prefect's temporary server given time and announced, a prepared database
for an empty PREFECT_HOME, and one clear error for each situation that would stop it."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from sit_cli.main import app
from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "SIT_CACHE": str(tmp_path / "sit-cache")}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    return {**env, "COLUMNS": "400", **extra}  # rich folds a long path over lines otherwise


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


def test_sit_leaves_prefect_a_startup_timeout_that_fits_a_cold_start_and_keeps_the_users(tmp_path):
    code = "import sit_prefect.flows, os; print(os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS'])"
    assert _python(code, _env(tmp_path)).stdout.split() == ["600"]
    users = _python(code, _env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="42"))
    assert users.stdout.split() == ["42"]


def test_an_empty_prefect_home_gets_the_database_prepared_at_install(tmp_path):
    """`scripts/install.sh` prepares it once; a new PREFECT_HOME (a new VM resuming from Drive)
    starts from a copy instead of migrating a database while the user waits."""
    env = _env(tmp_path)
    prepared = _python("from sit_prefect.local_server import prepare_database; print(prepare_database())", env)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    template = Path(prepared.stdout.split()[-1])
    assert template.is_relative_to(tmp_path / "sit-cache")
    with sqlite3.connect(template) as db:
        assert db.execute("select version_num from alembic_version").fetchone()
        assert db.execute("select count(*) from block_type").fetchone()[0] > 0  # blocks registered too

    started = _python("from sit_prefect.local_server import start_temporary_server as s; print('API', s())", env)
    assert started.returncode == 0, started.stderr[-2000:]
    assert "seeded with the Prefect database prepared at install" in started.stderr
    assert started.stdout.split()[-1].startswith("http://127.0.0.1:")
    assert (tmp_path / "prefect-home" / "prefect.db").exists()


def test_a_server_that_never_answers_is_one_clear_error_not_a_traceback(tmp_path):
    code = ("import sit_prefect, sys\nfrom sit_core.errors import SitError\nfrom sit_prefect.local_server import start_temporary_server\n"
            "try:\n    start_temporary_server()\nexcept SitError as e:\n    print('PROBLEM', e.problem); print('FIX', e.fix)")
    # A one-second budget is shorter than the server's own import on any machine.
    out = _python(code, _env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"))
    assert "PROBLEM Prefect's temporary server did not answer within 1 s" in out.stdout, out.stderr[-2000:]
    assert "PREFECT_API_URL" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_sit_server_on_a_port_in_use_names_it_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = CliRunner().invoke(app, ["server", "--port", str(port)])
    out = " ".join(result.output.split())
    assert result.exit_code == 2, out
    assert f"port {port} on 127.0.0.1 is already in use" in out
    assert f"sit server --port {port + 1}" in out


def _unwritable_home(tmp_path: Path) -> Path:
    """Root may write anywhere chmod forbids; nobody can make a directory under a file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "prefect-home"


def test_an_unwritable_prefect_home_is_a_clear_error_for_sit_server(tmp_path, monkeypatch):
    home = _unwritable_home(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    result = CliRunner().invoke(app, ["server", "--port", "0"])
    out = "".join(result.output.split())  # rich folds a long path mid-word, so compare without blanks
    assert result.exit_code == 2, result.output
    assert f"PREFECT_HOME{home}isnotwritable" in out and "exportPREFECT_HOME=" in out


def test_an_unwritable_prefect_home_stops_sit_run_before_any_model_loads(tmp_path):
    home = _unwritable_home(tmp_path)
    run = subprocess.run([sys.executable, "-m", "sit_cli.main", "run", "--run-dir", str(tmp_path / "run"),
                          "--stages", "generate"], cwd=REPO,
                         env={**_env(tmp_path), "PREFECT_HOME": str(home)}, capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    out = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 2, out[-3000:]
    assert f"PREFECT_HOME {home} is not writable" in out
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "generate").exists()


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path):
    from sit_core.config import load_config, read_config_file

    path = tmp_path / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{\n  // Notepad saves a BOM\n  "generation": {"num_samples": 70}\n}\n')
    assert read_config_file(path) == {"generation": {"num_samples": 70}}
    assert load_config(path, preset="demo", profile="cpu").generation.num_samples == 70
    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_bytes(b"\xef\xbb\xbfgeneration:\n  num_samples: 8\n")
    assert read_config_file(yaml_path) == {"generation": {"num_samples": 8}}
