"""`sit run`'s terminal (sit_cli/console.py): sit's own lines on the terminal, everything else
in <run_dir>/logs/sit-run-<time>.log, with the Hugging Face token masked there too.

The end-to-end tests run `sit run` as a subprocess without a TTY (as in CI) on a tiny
generate + filter run, then rerun it twice: with -v, and through the sharded flow (all cached). The
others drive RunConsole in this process: what each kind of write (print, a raw fd write, a
subprocess, a library logger, a tqdm bar) ends up as, a crash, Ctrl-C, and the live bar on a
pseudo-terminal.
"""

from __future__ import annotations

import logging
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sit_cli.console import RunConsole, _View
from sit_core import console_events
from sit_core.secrets import MASK

REPO = Path(__file__).resolve().parents[1]
SIT = [sys.executable, "-m", "sit_cli.main"]
TINY = ["--preset", "demo", "--profile", "cpu", "--stages", "generate,filter",
        "--set", "generation.num_samples=2", "--set", "generation.batch_size=2",
        "--set", "generation.instruction_max_tokens=40", "--set", "generation.response_max_tokens=16",
        "--set", "filter.target_count=1", "--set", "filter.min_count=1", "--set", "filter.length.min=1",
        "--set", "preference.num_pairs=1"]
# Neither shaped like a real token (so only the registered value can catch it) nor short.
FAKE_TOKEN = "fake-token-for-console-tests-4711"
HF_SHAPED = "hf_ConsoleTestsFakeToken0123456789abc"
ANSI = re.compile(r"\x1b[\[\]()=>]")
THIRD_PARTY = ["Loading weights", "FutureWarning", "it/s]", "%|", "| INFO", "Finished in state"]


def sit_run(run_dir: Path, prefect_home: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": "", "HF_TOKEN": FAKE_TOKEN,
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
           "OMP_NUM_THREADS": "1"}  # two shared cores: one torch thread generates ~5x faster here
    proc = subprocess.run([*SIT, "run", "--run-dir", str(run_dir), *TINY, *flags], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def log_named_in(output: str) -> Path:
    match = re.search(r"^log: (\S+)", output, re.M)
    assert match, output
    return Path(match.group(1))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("console")
    run_dir, home = base / "run", base / "prefect-home"
    proc = sit_run(run_dir, home)
    return run_dir, home, proc


def test_plain_terminal_lines_and_everything_else_in_the_log(first_run):
    run_dir, _, proc = first_run
    terminal = proc.stdout + proc.stderr
    for stage in ("generate", "filter"):
        assert re.search(rf"^{stage}: started$", proc.stderr, re.M), terminal
        assert re.search(rf"^{stage}: done in [0-9.]+s$|^{stage}: done in \d+m \d\ds$", proc.stderr, re.M), terminal
    assert not ANSI.search(terminal), repr(terminal)
    assert "\r" not in terminal  # no bars redrawn in place
    for noise in THIRD_PARTY:
        assert noise not in terminal, terminal
    # The closing table: every stage, with this run's time and cache column.
    for stage in ("generate", "filter"):
        assert re.search(rf"{stage}\s+│ done\s+│ [^│]+│ [0-9.ms ]+│ no", proc.stdout), proc.stdout
    assert re.search(r"preference\s+│ pending\s+│\s+│ not run", proc.stdout), proc.stdout

    log = log_named_in(proc.stderr)
    assert log.parent == run_dir / "logs" and re.fullmatch(r"sit-run-\d{8}T\d{6}Z\.log", log.name)
    text = log.read_text(errors="replace")
    assert "Loading weights" in text and "magpie:" in text  # the model load's and the stage's tqdm bars
    assert "Task run 'generate' - Finished in state Completed()" in text  # Prefect's own lines
    assert "sit: generate: done in" in text
    assert FAKE_TOKEN not in text and FAKE_TOKEN not in terminal


def test_rerun_is_cached_and_verbose_shows_the_library_lines(first_run):
    run_dir, home, _ = first_run
    proc = sit_run(run_dir, home, "-v")
    for stage in ("generate", "filter"):
        assert re.search(rf"^{stage}: done in [0-9.]+s \(cached\)$", proc.stderr, re.M), proc.stderr
        assert re.search(rf"{stage}\s+│ done\s+│ [^│]+│ [0-9.]+s\s+│ yes", proc.stdout), proc.stdout
    assert "Finished in state Cached" in proc.stderr  # Prefect's lines, shown with -v
    log = log_named_in(proc.stderr)
    assert "Finished in state Cached" in log.read_text()
    assert FAKE_TOKEN not in proc.stderr


def test_the_sharded_flow_gives_the_same_lines(first_run):
    run_dir, home, _ = first_run
    proc = sit_run(run_dir, home, "--workers", "2")
    for stage in ("generate", "filter"):
        assert re.search(rf"^{stage}: started$", proc.stderr, re.M), proc.stderr
        assert re.search(rf"^{stage}: done in [0-9.]+s \(cached\)$", proc.stderr, re.M), proc.stderr
    assert "| INFO" not in proc.stderr


# --- RunConsole in this process ------------------------------------------------------------


@pytest.fixture
def token_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)


def test_every_kind_of_output_goes_to_the_log_with_the_token_masked(tmp_path, capfd, token_env):
    from tqdm import tqdm

    with RunConsole(tmp_path) as run_console:
        print(f"a print with {FAKE_TOKEN} and {HF_SHAPED}")
        os.write(2, f"a raw write to fd 2 with {FAKE_TOKEN}\n".encode())
        subprocess.run(["sh", "-c", 'echo "a subprocess sees $HF_TOKEN"; echo "its stderr" >&2'], check=True)
        library = logging.getLogger("transformers.fake")  # a handler on sys.stderr, as Prefect's console one is
        library.addHandler(logging.StreamHandler(sys.stderr))
        library.warning("a library warning with %s", FAKE_TOKEN)
        library.handlers.clear()
        for _ in tqdm(range(3), desc="a library bar"):
            pass
        logging.getLogger("sit.hub").warning("sit's own warning")
        console_events.stage_started("filter")
        console_events.stage_finished("filter", "done", 1.25, cached=False)
    out, err = capfd.readouterr()
    text = run_console.log_path.read_text()
    assert run_console.log_path.parent == tmp_path / "logs"
    assert FAKE_TOKEN not in text and HF_SHAPED not in text
    for line in ("a print with", "a raw write to fd 2 with", "a subprocess sees", "its stderr",
                 "a library warning with", "a library bar"):
        assert line in text, text
    assert f"a subprocess sees {MASK}" in text and f"a raw write to fd 2 with {MASK}" in text
    terminal = out + err
    assert f"log: {run_console.log_path}" in terminal
    assert "filter: started" in terminal and "filter: done in 1.2s" in terminal
    assert "warning: sit's own warning" in terminal  # sit's own log lines stay on the terminal
    for noise in ("a print", "a raw write", "a subprocess", "its stderr", "a library"):
        assert noise not in terminal, terminal
    assert run_console.stages == {"filter": {"status": "done", "seconds": 1.25, "cached": False}}
    print("fd 1 is back")
    os.write(2, b"fd 2 is back\n")
    out, err = capfd.readouterr()
    assert "fd 1 is back" in out and "fd 2 is back" in err


def test_verbose_shows_the_library_output_too(tmp_path, capfd, token_env):
    with RunConsole(tmp_path, verbose=True) as run_console:
        os.write(2, f"library line with {FAKE_TOKEN}\n".encode())
        print("a library print", file=sys.stderr)
        time.sleep(0.5)
    terminal = "".join(capfd.readouterr())
    assert terminal.count(f"library line with {MASK}") == 1 and terminal.count("a library print") == 1, terminal
    assert FAKE_TOKEN not in terminal
    text = run_console.log_path.read_text()
    assert text.count(f"library line with {MASK}") == 1 and text.count("a library print") == 1, text


def test_a_crash_prints_the_end_of_the_log_and_keeps_the_traceback(tmp_path, capfd):
    with pytest.raises(RuntimeError, match="boom"):
        with RunConsole(tmp_path) as run_console:
            console_events.stage_started("sft")
            os.write(2, b"child: CUDA error: out of memory\n")
            with console_events.timed_stage("dpo"):
                raise RuntimeError("boom")
    terminal = "".join(capfd.readouterr())
    assert "child: CUDA error: out of memory" in terminal  # the tail of the log
    assert f"full log: {run_console.log_path}" in terminal
    assert re.search(r"dpo: failed after [0-9.]+s", terminal)
    text = run_console.log_path.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: boom" in text


@pytest.mark.parametrize("then", [KeyboardInterrupt, ConnectionRefusedError])
def test_ctrl_c_restores_the_terminal_and_says_how_to_resume(tmp_path, capfd, then):
    """Ctrl-C stops Prefect's temporary server too, so the flow may end in the failed API call
    after the interrupted stage: that is an interruption as well, exit 130 without a traceback."""
    import typer

    with pytest.raises(typer.Exit) as exit_:
        with RunConsole(tmp_path) as run_console:
            try:
                with console_events.timed_stage("generate"):
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise then from None
    assert exit_.value.exit_code == 130
    terminal = "".join(capfd.readouterr())
    assert "generate: interrupted after" in terminal and "run the same command again to resume" in terminal
    assert "unexpected error" not in terminal
    assert f"{then.__name__}" in run_console.log_path.read_text()  # the traceback, for the record
    os.write(2, b"fd 2 is back\n")
    assert "fd 2 is back" in capfd.readouterr().err


def test_no_handler_no_output(capfd):
    """Without `sit run`'s handler (a notebook calling the flow) the events show nothing and
    never reach Prefect's handlers on "sit"."""
    assert console_events.log.propagate is False
    console_events.stage_started("filter")
    console_events.stage_finished("filter", "done", 0.1, cached=True)
    assert "filter" not in "".join(capfd.readouterr())


def test_on_a_terminal_the_running_stage_has_a_live_bar():
    master, replica = pty.openpty()
    stream = os.fdopen(replica, "w", encoding="utf-8")
    view = _View(stream, live=True)
    view.event({"kind": "started", "stage": "generate"})
    for done in range(5):
        view.event({"kind": "progress", "stage": "generate", "done": done, "total": 4})
        time.sleep(0.15)
    view.event({"kind": "finished", "stage": "generate", "status": "done", "seconds": 0.8, "cached": False})
    view.close()
    stream.flush()
    os.set_blocking(master, False)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        shown += chunk
    stream.close()
    os.close(master)
    text = shown.decode("utf-8", "replace")
    assert "\x1b[" in text and "━" in text  # a rich bar, redrawn in place
    assert "4/4" in text and "generate: done in 0.8s" in text
