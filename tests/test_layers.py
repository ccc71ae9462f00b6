"""The layering of the code (pyproject.toml's [tool.importlinter]): each layer imports only the
layers below it, and no stage imports another. A change that breaks it fails here, naming the
import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def test_imports_follow_the_layers():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_a_stage_importing_another_breaks_the_contract(tmp_path):
    """The contract can fail: the same check on a copy where filter imports generate."""
    import shutil

    copy = tmp_path / "repo"
    for name in ("sit_core", "sit_prefect", "sit_cli"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    stage = copy / "sit_core" / "stages" / "filter.py"
    stage.write_text(stage.read_text() + "\nfrom sit_core.stages.generate import magpie  # noqa: E402,F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=copy, capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "sit_core.stages.filter is not allowed to import sit_core.stages.generate" in " ".join(proc.stdout.split())
