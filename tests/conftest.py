"""Shared fixtures. Tests run on real models (the embedded SmolLM2 and MiniLM) and real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The embedded SmolLM2, materialized once into the shared cache."""
    from sit_core.models import resolve_model_path

    return Path(resolve_model_path("embedded:smollm2-135m-instruct"))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d
