"""Every bad input ends in a clear error (SitError's problem + fix; exit code 2 from the CLI;
no traceback) before any work is lost, or in a documented recovery. The cases are data:
cases.yaml, one file under files/ each. The full-disk and read-only cases need a tmpfs
mount (root) and are written out below; without one they skip, saying why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sit_core.config import load_config
from sit_core.errors import SitError
from sit_core.store.fileio import read_jsonl

HERE = Path(__file__).parent
FILES = HERE / "files"
CASES = yaml.safe_load((HERE / "cases.yaml").read_text(encoding="utf-8"))


def test_the_corpus_is_complete():
    assert len(CASES) + 3 >= 30  # + the full-disk and read-only cases below
    named = {c["file"] for c in CASES if c.get("file")}
    assert named <= {p.name for p in FILES.iterdir()}, named - {p.name for p in FILES.iterdir()}
    assert {p.name for p in FILES.iterdir()} <= named | {"generated_three_records.jsonl"}, "unused corpus files"


@pytest.fixture
def no_flow(monkeypatch):
    """`sit run` cases must stop in the CLI's checks: reaching the Prefect flow fails the test."""
    import sit_prefect.flows

    def reached(**kwargs):
        raise AssertionError("the bad input got past `sit run`'s checks into the Prefect flow")

    monkeypatch.setattr(sit_prefect.flows, "synthetic_instruction_tuner", reached)


def _fill(value, file: Path | None, run_dir: Path):
    if isinstance(value, list):
        return [_fill(v, file, run_dir) for v in value]
    return value.replace("{file}", str(file)).replace("{run_dir}", str(run_dir))


def _expected(case: dict) -> list[str]:
    return case["expect"] if isinstance(case["expect"], list) else [case["expect"]]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch, no_flow):
    file = FILES / case["file"] if case.get("file") else None
    run_dir = tmp_path / "run"
    for var in case.get("env_unset", []):
        monkeypatch.delenv(var, raising=False)
    if "env_unset" in case:  # nor a token saved by `huggingface-cli login`
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    if case.get("place"):
        (run_dir / case["place"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, run_dir / case["place"])

    if "recover" in case:
        copy = tmp_path / file.name
        shutil.copy(file, copy)
        records = read_jsonl(copy, repair=True)
        assert len(records) == case["recover"]["records"]
        assert copy.read_bytes() == b"".join(json.dumps(r).encode() + b"\n" for r in records) or \
            read_jsonl(copy) == records  # cut back to the whole records, which read back unchanged
        assert copy.read_bytes().endswith(b"\n")
        return

    if "stage" in case:
        import importlib
        import sys

        from sit_core.driver import run_stage

        loads = []
        importlib.import_module(f"sit_core.stages.{case['stage']}")
        owners = [m for n, m in list(sys.modules.items())  # the stage's modules' own imports of it, too
                  if n.startswith(f"sit_core.stages.{case['stage']}") or n.startswith("sit_core.engine.")]
        for owner in owners:
            if hasattr(owner, "load_causal_lm"):
                monkeypatch.setattr(owner, "load_causal_lm", lambda *a, **k: loads.append(a) or 1 / 0)
        cfg = load_config(None, preset="demo", profile="cpu", overrides=case.get("overrides"))
        with pytest.raises(SitError) as err:
            run_stage(cfg, run_dir, case["stage"])
        for phrase in _expected(case):
            assert phrase in str(err.value)
        assert err.value.fix, "a SitError must say how to fix it"
        assert not loads, "the error came after a model load"
        return

    result = CliRunner().invoke(__import__("sit_cli.main", fromlist=["app"]).app, _fill(case["cli"], file, run_dir))
    out = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {out}\n{result.exception!r}"
    assert "error:" in out and "fix:" in out, out
    for phrase in _expected(case):
        assert phrase in " ".join(out.split()), out  # rich wraps long lines
    assert "Traceback" not in out


# ---------------------------------------------------------------------------------------
# A full disk (a 1 MiB tmpfs) and a read-only one. Need root and mount; skipped with the
# reason otherwise.


def _tmpfs(tmp_path: Path, options: str):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot simulate a full disk: mount is unavailable ({e})")
    if proc.returncode != 0:
        pytest.skip(f"cannot simulate a full disk: mounting a tmpfs failed ({proc.stderr.strip()}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path):
    yield from _tmpfs(tmp_path, "size=1m")


@pytest.fixture
def read_only_disk(tmp_path):
    yield from _tmpfs(tmp_path, "ro,size=1m")


def test_read_only_run_directory_is_a_clear_error(read_only_disk, no_flow):
    """chmod cannot make a directory unwritable for root; a read-only mount can."""
    result = CliRunner().invoke(__import__("sit_cli.main", fromlist=["app"]).app,
                                ["run", "--run-dir", str(read_only_disk / "run"), "--preset", "demo", "--profile", "cpu"])
    assert result.exit_code == 2, result.output
    assert "is not writable: Read-only file system" in " ".join(result.output.split())


def _fill_disk(path: Path) -> Path:
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_full_disk_before_the_run_is_a_clear_error(small_disk, no_flow):
    _fill_disk(small_disk)
    result = CliRunner().invoke(__import__("sit_cli.main", fromlist=["app"]).app,
                                ["run", "--run-dir", str(small_disk / "run"), "--preset", "demo", "--profile", "cpu"])
    assert result.exit_code == 2, result.output
    assert "is not writable: No space left on device" in " ".join(result.output.split())


def test_no_space_for_the_model_cache_is_a_clear_error_before_any_model_loads(small_disk, monkeypatch, no_flow):
    """The embedded SmolLM2 is dequantized into SIT_CACHE on first use (about 0.5 GiB)."""
    monkeypatch.setenv("SIT_CACHE", str(small_disk / "cache"))
    result = CliRunner().invoke(__import__("sit_cli.main", fromlist=["app"]).app,
                                ["run", "--run-dir", str(small_disk.parent / "run"), "--preset", "demo",
                                 "--profile", "cpu", "--stages", "generate"])
    out = " ".join(result.output.split())
    assert result.exit_code == 2, out
    assert "no disk space for the model cache: embedded:smollm2-135m-instruct needs about 0.5 GiB" in out
    assert "export SIT_CACHE=" in out
    assert not (small_disk / "cache" / "models").exists() or not any((small_disk / "cache" / "models").iterdir())


def test_disk_filling_up_mid_stage_keeps_finished_work_and_resumes(small_disk, tmp_path, monkeypatch):
    """The filter stage runs out of space writing its outputs: a SitError saying so, the
    input and the manifest intact, and after space is freed the same call finishes."""
    from sit_core.store.manifest import read_manifest
    from sit_core.driver import run_stage

    cfg = load_config(None, preset="demo", profile="cpu", overrides=["generation.num_samples=300",
                      "filter.target_count=200", "filter.min_count=1", "filter.length.min=1",
                      "filter.diversity.jaccard_threshold=1.0", "filter.language=en"])
    run_dir = small_disk / "run"
    generated = run_dir / "generate" / "generated.jsonl"
    generated.parent.mkdir(parents=True)
    words = "plants need light water and good soil to grow tall and strong in the garden".split()
    records = [{"id": i, "instruction": f"Explain item {i}: " + " ".join(words[i % 7:]),
                "response": f"Item {i}. " + " ".join(words * 12), "response_truncated": False,
                "model": "embedded:smollm2-135m-instruct"} for i in range(300)]
    generated.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    before = generated.read_bytes()
    filler = _fill_disk(small_disk)
    os.truncate(filler, max(0, filler.stat().st_size - 64 * 1024))  # room to start, not to finish

    with pytest.raises(SitError, match="no space left on the device") as err:
        run_stage(cfg, run_dir, "filter")
    assert "rerun the same command" in err.value.fix
    assert generated.read_bytes() == before
    manifest = read_manifest(run_dir, "filter")
    assert manifest is None or manifest["status"] == "partial"
    kept = run_dir / "filter" / "kept.jsonl"
    assert not kept.exists() or read_jsonl(kept)  # never a half-written output

    filler.unlink()
    done = run_stage(cfg, run_dir, "filter")
    assert done["status"] == "done" and read_jsonl(kept)
