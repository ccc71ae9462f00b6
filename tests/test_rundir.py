"""Crash-safe files, the stage manifest, and the run-directory lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sit_core.config import load_config
from sit_core.errors import ResumeMismatchError, RunLockedError, SitError
from sit_core.store.fileio import append_jsonl, atomic_write_json, read_jsonl
from sit_core.store.manifest import begin_stage, output_problems, stage_summary
from sit_core.store.rundir import RunLock, ensure_writable, record_run


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    log = tmp_path / "log.jsonl"
    append_jsonl(log, [{"i": 0}, {"i": 1}])
    with open(log, "a") as f:
        f.write('{"i": 2, "tex')
    assert read_jsonl(log) == [{"i": 0}, {"i": 1}]
    read_jsonl(log, repair=True)
    append_jsonl(log, [{"i": 2}])
    assert read_jsonl(log) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_corruption_in_the_middle_is_an_error(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(log)


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


def test_manifest_detects_damaged_outputs(tmp_path):
    run = begin_stage(tmp_path, "filter", {"a": 1}, {})
    out = run.dir / "kept.jsonl"
    out.write_text('{"id": 1}\n{"id": 2}\n')
    run.finish([out], {"kept": 2})
    assert stage_summary(tmp_path, "filter")["status"] == "done"
    out.write_text('{"id": 1}\n')  # truncated
    assert output_problems(tmp_path, json.loads((run.dir / "manifest.json").read_text()))
    assert stage_summary(tmp_path, "filter")["status"] == "damaged"
    resumed = begin_stage(tmp_path, "filter", {"a": 1}, {})
    assert resumed.manifest["status"] == "partial"
    assert resumed.manifest["events"][-1]["event"] == "outputs_damaged"
    with pytest.raises(ResumeMismatchError, match="changed: a"):
        begin_stage(tmp_path, "filter", {"a": 2}, {})


def test_record_run_refuses_a_different_config_but_not_other_batch_sizes(tmp_path):
    record_run(tmp_path, load_config({}, profile="t4"))
    record_run(tmp_path, load_config({}, profile="a100"))  # a T4 run may continue on an A100
    with pytest.raises(ResumeMismatchError, match="training.lora_r"):
        record_run(tmp_path, load_config({"training": {"lora_r": 4}}, profile="a100"))


def test_second_run_on_the_same_directory_is_refused_with_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from sit_core.store.rundir import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and is taken over.
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over and lock.took_over["pid"] == holder.pid
    lock.release()
    assert not (tmp_path / ".sit.lock").exists()


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SitError, match="not writable"):
        ensure_writable(blocker / "run")


def test_a_run_keeps_its_effective_batches_on_other_hardware(tmp_path):
    """Started on a T4 (SFT 4 x 4 = 16), continued on an A100, whose profile says 12 x 2 = 24:
    the run keeps 16, so every training stage's fingerprint, and its half-trained checkpoints,
    stay valid. Prompt tuning's and DPO's effective batches stay too, though SFT's accumulation
    (which they share by default) changes."""
    from sit_core.pipeline import resolve_config
    from sit_core.stages import dpo
    from sit_core.stages import prompt_tuning
    from sit_core.stages import sft

    run_dir = tmp_path / "run"
    on_t4, source = resolve_config(run_dir, None, "colab-t4", "t4", None)
    run_dir.mkdir()
    record_run(run_dir, on_t4, source)

    on_a100, _ = resolve_config(run_dir, None, None, "a100", None)  # `sit run --run-dir D` on the new VM

    t = on_a100.training
    assert (t.sft_batch_size, t.gradient_accumulation_steps) == (8, 2)  # at most the A100's 12 per device
    assert t.precision == "bf16" and on_a100.profile == "a100"  # the rest of the profile applies
    for stage in (sft, prompt_tuning, dpo):
        assert stage.fingerprint(on_a100) == stage.fingerprint(on_t4), stage.NAME
    fresh, _ = resolve_config(tmp_path / "new-run", None, "colab-t4", "a100", None)
    assert sft.fingerprint(fresh) != sft.fingerprint(on_t4)  # a new run takes the profile's batch as is

    # A batch the user names is theirs: no adjustment (a changed recipe is refused later, with the key named).
    named, _ = resolve_config(run_dir, None, None, "a100", ["training.sft_batch_size=12"])
    assert (named.training.sft_batch_size, named.training.gradient_accumulation_steps) == (12, 2)
