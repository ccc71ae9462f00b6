"""The Colab quickstart notebook, run with nbclient in a real Jupyter kernel (so the flow runs
inside the kernel's event loop): every cell not tagged `colab-only`, with the `parameters`
cell switched to the offline demo preset at a tiny size."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from sit_cli.server import REPO_ROOT
from conftest import HANG_GUARD_S

pytestmark = pytest.mark.slow

NOTEBOOK = REPO_ROOT / "deployments" / "colab" / "sit_quickstart.ipynb"
OVERRIDES = ["generation.num_samples=4", "filter.target_count=2", "filter.min_count=1", "preference.num_pairs=1",
             "generation.instruction_max_tokens=40", "generation.response_max_tokens=40", "filter.length.min=3",
             "generation.batch_size=4"]


def test_non_colab_cells_run_the_demo_in_a_jupyter_kernel(tmp_path, monkeypatch, smollm2_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tags = [set(c.metadata.get("tags", [])) for c in nb.cells]
    assert sum("colab-only" in t for t in tags) >= 4  # install, Drive, HF token, Prefect target
    nb.cells = [c for c, t in zip(nb.cells, tags) if "colab-only" not in t]
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = (f"RUN_DIR = {str(tmp_path / 'run')!r}\nPRESET = 'demo'\nOVERRIDES = {OVERRIDES!r}\n"
                     "STAGES = ['generate', 'filter']")
    # The kernel inherits this environment: a private, temporary Prefect server.
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_API_URL", "")

    NotebookClient(nb, timeout=HANG_GUARD_S, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}).execute()

    run_cell = next(c for c in nb.cells if "synthetic_instruction_tuner(" in c.source)
    result = run_cell.outputs[-1]["data"]["text/plain"]
    assert result == "{'generate': 'done', 'filter': 'done'}"
    status = "".join(o.get("text", "") for c in nb.cells if "stage_summary" in c.source for o in c.outputs)
    assert "generate       done" in status and "filter         done" in status
    assert (tmp_path / "run" / "filter" / "kept.jsonl").exists()
