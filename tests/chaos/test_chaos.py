"""The whole pipeline, killed the way a Colab session dies: at any moment, more than once.

- The demo pipeline (reduced counts, tests/chaos/chaos_harness.py) runs in a subprocess and
  is SIGKILLed at seeded random moments inside at least three different stages, then
  restarted with the same command until it finishes. Its datasets, adapters and report
  table must equal those of an uninterrupted run with the same seed; no record may appear
  twice; every file must parse; every manifest's hashes must match. While the first session
  runs, a second `sit run` on the same directory must refuse, naming the holder; the lock
  each kill leaves behind must be taken over by the next session.
  Replay a failure with SIT_CHAOS_SEED=<the printed seed>.
- A process SIGKILLed while it rewrites a file through fileio.atomic_write_* leaves the old
  or the new content, never a mix; a torn JSONL append is dropped on read.
- A pipeline run mirrored to a hub (tests/test_hub.py's FakeHub behind a real HTTP server,
  so the child process talks to it over sockets) is killed while a sync commit is in
  flight; the next run completes and the remote equals the local run directory.

The long mode is `bench/chaos --kills N`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import pytest

import chaos_harness as harness
from sit_core.store.fileio import read_json, read_jsonl
from sit_core.store.hub import is_mirrored

sys.path.insert(0, str(harness.REPO / "tests"))
import test_hub  # noqa: E402
from test_hub import FAKE_TOKEN, FakeHub  # noqa: E402
from conftest import HANG_GUARD_S  # noqa: E402

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------
# The whole pipeline


def _second_run_is_refused(tmp_path: Path, run_dir: Path):
    """on_first_session hook: once the first session holds the lock, the same command in
    another process must exit 2 naming the holder."""

    def check(first: subprocess.Popen) -> str:
        lock = run_dir / harness.LOCK_NAME
        deadline = time.monotonic() + 600
        while not lock.exists():
            assert first.poll() is None, f"first session exited early\n{harness.log_tail(tmp_path / 'chaos.log')}"
            assert time.monotonic() < deadline, "the first session never took the lock"
            time.sleep(0.1)
        second = subprocess.run(harness.sit_run_command(run_dir), cwd=harness.REPO, capture_output=True, text=True,
                                env=harness.session_env(tmp_path / "prefect-second"), timeout=HANG_GUARD_S)
        out = " ".join((second.stdout + second.stderr).split())  # rich wraps long lines
        assert second.returncode == 2, out[-3000:]
        assert f"in use by pid {first.pid} on {socket.gethostname()}" in out, out[-3000:]
        assert f"sit_cli/main.py run --run-dir {run_dir}" in out, out[-3000:]  # the holder's command
        assert "Traceback" not in out and "Starting temporary server" not in out  # refused before Prefect
        return out

    return check


def test_pipeline_killed_anywhere_equals_an_uninterrupted_run(tmp_path, smollm2_path):
    seed = int(os.environ.get("SIT_CHAOS_SEED") or random.SystemRandom().randrange(1_000_000))
    print(f"chaos seed: {seed} (replay with SIT_CHAOS_SEED={seed})")
    reference, run_dir = tmp_path / "reference", tmp_path / "chaos"
    stale_locks = []

    def record_stale_lock(kill: harness.Kill, killed: subprocess.Popen) -> None:
        lock = run_dir / harness.LOCK_NAME
        stale_locks.append(json.loads(lock.read_text())["pid"] == killed.pid if lock.exists() else False)

    # The uninterrupted run goes on beside the killed one: every process of a session computes on
    # one thread (chaos_harness.session_env), so the two share the two cores instead of queueing.
    with ThreadPoolExecutor(max_workers=1) as pool:
        uninterrupted = pool.submit(harness.run_uninterrupted, reference, tmp_path / "prefect-ref",
                                    tmp_path / "reference.log")
        result = harness.run_with_kills(run_dir, tmp_path / "prefect-chaos", tmp_path / "chaos.log", seed=seed,
                                        kills=3, on_first_session=_second_run_is_refused(tmp_path, run_dir),
                                        after_kill=record_stale_lock)
        ref_s = uninterrupted.result()
    print(f"uninterrupted run: {ref_s:.0f}s")
    print(f"killed run: {result.wall_s:.0f}s over {result.sessions} sessions; kills: {result.kills}")
    # What a library prints to a redirected stdout stays out of the run log (dill's bytecode
    # scan, when datasets hashes a function during training, printed ~1,000 lines there).
    assert "LOAD_GLOBAL" not in (tmp_path / "reference.log").read_text(errors="replace")

    assert len(result.kills) == 3
    landed = [k.stage for k in result.kills]
    assert len(set(landed)) >= 2, f"the kills did not spread across stages: {landed}"
    assert result.refused_second_run is not None
    # Each kill left the dead session's lock behind, and the next session took it over.
    assert any(stale_locks), stale_locks
    assert not (run_dir / harness.LOCK_NAME).exists()
    assert harness.resumed_stages(run_dir), "no stage recorded a resume: the kills missed the work"

    assert harness.all_problems(reference, run_dir) == []


# ---------------------------------------------------------------------------------------
# A kill during an atomic write or an append

WRITER = textwrap.dedent("""
    import sys
    from sit_core.store.fileio import append_jsonl, atomic_write_json
    target, log, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    while True:
        # Big enough that the kill usually lands inside write() or fsync().
        atomic_write_json(target, {"n": n, "payload": "x" * 300_000, "check": n * 7})
        append_jsonl(log, [{"n": n, "payload": "y" * 20_000}])
        n += 1
""")


def test_kill_during_atomic_writes_leaves_old_or_new_never_partial(tmp_path):
    seed = int(os.environ.get("SIT_CHAOS_SEED") or random.SystemRandom().randrange(1_000_000))
    print(f"chaos seed: {seed}")
    rng = random.Random(seed)
    target, log = tmp_path / "state.json", tmp_path / "log.jsonl"
    last_n, cut_short = -1, 0
    for _ in range(20):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(log), str(last_n + 1)],
                                 stdout=subprocess.PIPE, text=True, cwd=harness.REPO)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        if target.exists():
            state = read_json(target)  # raises if a reader could ever see half a file
            assert state["payload"] == "x" * 300_000 and state["check"] == state["n"] * 7
        temp_files = list(tmp_path.glob(".*.tmp"))
        torn = log.exists() and not log.read_bytes().endswith(b"\n")
        cut_short += bool(torn or temp_files)
        for temp in temp_files:  # what a resumed stage ignores (fileio.iter_files, the hub mirror)
            temp.unlink()
        records = read_jsonl(log, repair=True)  # a torn last append is dropped (and cut)
        assert [r["n"] for r in records] == list(range(len(records)))
        assert all(r["payload"] == "y" * 20_000 for r in records)
        last_n = records[-1]["n"] if records else -1
        if target.exists():
            # Each record is appended right after its state write: the log is at most one behind.
            assert state["n"] - last_n in (0, 1), (state["n"], last_n)
    print(f"{cut_short} of 20 kills landed inside a write")
    assert last_n >= 0, "no write ever completed: the kills came too early to test anything"
    assert cut_short >= 1, "no kill landed inside a write: nothing was tested"
    assert {p.name for p in tmp_path.iterdir()} == {"state.json", "log.jsonl"}


# ---------------------------------------------------------------------------------------
# A kill during a hub sync


class _HubServer:
    """FakeHub behind a real HTTP server on 127.0.0.1, so a child process's unmodified
    huggingface_hub client reaches it through HF_ENDPOINT. `hold_commit(n)` makes the n-th
    commit request wait (unapplied) until `release()`: the window in which the test kills."""

    def __init__(self, fake: FakeHub):
        self.fake = fake
        self.commits_seen = 0
        self.hold_at: int | None = None
        self.held = threading.Event()
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().strip() or b"0", 16)):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self) -> None:
                body = self._body()
                if "/commit/" in self.path:
                    server.commits_seen += 1
                    if server.commits_seen == server.hold_at:
                        server.held.set()
                        server._release.wait(600)
                        self.close_connection = True
                        return  # the client was killed meanwhile; the commit is never applied
                request = httpx2.Request(self.command, f"http://{self.headers['Host']}{self.path}",
                                         headers=dict(self.headers.items()), content=body)
                response = server.fake.handler(request)
                payload = response.content if self.command != "HEAD" else b""
                self.send_response(response.status_code)
                for key, value in response.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                length = response.headers.get("Content-Length") if self.command == "HEAD" else len(payload)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def hold_commit(self, n: int) -> None:
        self.hold_at = n

    def release(self) -> None:
        self.hold_at = None
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self.httpd.shutdown()


HUB_CHILD = textwrap.dedent("""
    import sys
    from sit_core.pipeline import run_pipeline
    run_pipeline(sys.argv[1], preset="demo", profile="cpu", overrides=sys.argv[2:], stages=["generate"])
""")

HUB_OVERRIDES = ["generation.num_samples=4", "generation.instruction_max_tokens=24",
                 "generation.response_max_tokens=16", "filter.target_count=2", "preference.num_pairs=1",
                 "generation.batch_size=8", "checkpoint_interval=2", "hub_repo=alice/sit-chaos"]


def kill_at_held_commit(server: "_HubServer", n: int, cmd: list[str], env: dict) -> None:
    """Start the pipeline, hold the hub's n-th commit in flight, and SIGKILL the pipeline there."""
    server.hold_commit(n)
    child = subprocess.Popen(cmd, cwd=harness.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 600
    while not (held := server.held.wait(0.2)) and child.poll() is None and time.monotonic() < deadline:
        pass
    harness.kill_session(child)
    output = child.stdout.read().decode(errors="replace")
    child.stdout.close()
    assert held, f"commit {n} never arrived\n{output[-3000:]}"
    server.release()


def test_kill_during_hub_sync_then_resume_makes_remote_equal_local(tmp_path, smollm2_path, monkeypatch):
    fake = FakeHub()
    server = _HubServer(fake)
    monkeypatch.setattr(test_hub, "ENDPOINT", server.url)  # the URLs FakeHub answers with must name this server
    run_dir = tmp_path / "run"
    env = {**harness.session_env(tmp_path / "prefect"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": server.url,
           "HF_TOKEN": FAKE_TOKEN}
    cmd = [sys.executable, "-c", HUB_CHILD, str(run_dir), *HUB_OVERRIDES]
    try:
        # Commit 1 is run.json at the start; commit 2 is the first mid-stage sync of generate/.
        kill_at_held_commit(server, 2, cmd, env)
        assert set(fake.files("alice/sit-chaos")) == {".gitattributes", "run.json"}  # the held commit never landed

        second = subprocess.run(cmd, cwd=harness.REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    finally:
        server.close()

    local = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    local = {rel: data for rel, data in local.items() if is_mirrored(run_dir, rel)}
    remote = dict(fake.files("alice/sit-chaos"))
    remote.pop(".gitattributes")
    assert "generate/generated.jsonl" in local
    assert remote.keys() == local.keys()
    assert [rel for rel in local if remote[rel] != local[rel]] == []


FRESH_VM_CHILD = textwrap.dedent("""
    import sys
    from sit_core.pipeline import run_pipeline
    run_pipeline(sys.argv[1], preset="demo", profile="cpu", overrides=sys.argv[2:], stages=["generate", "filter"])
""")

FRESH_VM_OVERRIDES = ["generation.num_samples=6", "generation.batch_size=2", "generation.instruction_max_tokens=64",
                      "generation.response_max_tokens=24", "filter.target_count=2", "filter.min_count=1",
                      "filter.length.min=3", "preference.num_pairs=1", "checkpoint_interval=2"]


def start_reference(tmp_path: Path, run_dir: Path) -> subprocess.Popen:
    """The uninterrupted run, beside the test's own: one thread per process, so they share the
    two cores instead of queueing. harness.wait_for_success(...) before comparing."""
    return harness.start_session([sys.executable, "-c", FRESH_VM_CHILD, str(run_dir), *FRESH_VM_OVERRIDES],
                                 harness.session_env(tmp_path / "prefect-ref"), tmp_path / "reference.log")


def test_fresh_vm_resumes_mid_stage_from_the_hub_and_equals_an_uninterrupted_run(tmp_path, smollm2_path, monkeypatch):
    """A Colab VM is lost mid-generation; a new VM with an empty disk pulls the hub mirror and
    continues from the last synced checkpoint: same records as a run that never stopped."""
    reference = tmp_path / "reference"
    uninterrupted = start_reference(tmp_path, reference)

    fake = FakeHub()
    server = _HubServer(fake)
    monkeypatch.setattr(test_hub, "ENDPOINT", server.url)
    env = {**harness.session_env(tmp_path / "prefect"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": server.url,
           "HF_TOKEN": FAKE_TOKEN}
    overrides = [*FRESH_VM_OVERRIDES, "hub_repo=alice/sit-fresh-vm"]
    first_vm = tmp_path / "vm1" / "run"
    try:
        # Commit 1 is run.json, commit 2 the first mid-stage sync (one batch of two); holding
        # commit 3 stops the first VM between two checkpoints, where it is killed.
        kill_at_held_commit(server, 3, [sys.executable, "-c", FRESH_VM_CHILD, str(first_vm), *overrides], env)
        synced = fake.files("alice/sit-fresh-vm")
        assert "generate/attempts.jsonl" in synced and "generate/generated.jsonl" not in synced  # mid-stage

        shutil.rmtree(tmp_path / "vm1")  # the VM and its disk are gone
        second_vm = tmp_path / "vm2" / "run"  # a new VM, another path, an empty PREFECT_HOME
        env["PREFECT_HOME"] = str(tmp_path / "prefect-vm2")
        resumed = subprocess.run([sys.executable, "-c", FRESH_VM_CHILD, str(second_vm), *overrides],
                                 cwd=harness.REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    finally:
        server.close()

    manifest = json.loads((second_vm / "generate" / "manifest.json").read_text())
    assert any(e["event"] == "resumed" for e in manifest["events"])  # continued, not started over
    harness.wait_for_success(uninterrupted, HANG_GUARD_S, tmp_path / "reference.log", "reference run")
    for name in ("generate/generated.jsonl", "filter/kept.jsonl"):
        assert (second_vm / name).read_bytes() == (reference / name).read_bytes(), name


SHARDED_CHILD = textwrap.dedent("""
    import sys
    from sit_prefect.flows import synthetic_instruction_tuner
    result = synthetic_instruction_tuner(run_dir=sys.argv[1], preset="demo", profile="cpu", overrides=sys.argv[2:],
                                         stages=["generate"], workers=2)
    sys.exit(0 if result["generate"]["status"] == "done" else 1)
""")


def test_sharded_run_killed_resumes_on_an_empty_machine_from_the_hub_alone(tmp_path, smollm2_path, monkeypatch):
    """`sit run --workers 2 --hub-repo ...`: each finished shard is synced to the mirror while the
    stage runs; the VM dies; a new VM with an empty disk pulls the mirror, generates only the
    shards that never reached it, and writes what one uninterrupted process writes."""
    reference = tmp_path / "reference"
    uninterrupted = start_reference(tmp_path, reference)

    fake = FakeHub()
    server = _HubServer(fake)
    monkeypatch.setattr(test_hub, "ENDPOINT", server.url)
    env = {**harness.session_env(tmp_path / "prefect-vm1"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": server.url,
           "HF_TOKEN": FAKE_TOKEN}
    overrides = [*FRESH_VM_OVERRIDES, "checkpoint_interval=1", "hub_repo=alice/sit-sharded"]
    first_vm = tmp_path / "vm1" / "run"
    try:
        # Commit 1 is run.json, commit 2 the sync after the first finished shard; holding
        # commit 3 stops the first VM with the other shard not on the mirror.
        kill_at_held_commit(server, 3, [sys.executable, "-c", SHARDED_CHILD, str(first_vm), *overrides], env)
        synced = fake.files("alice/sit-sharded")
        assert any(f.startswith("generate/shards/") and f.endswith(".jsonl") for f in synced), sorted(synced)
        assert "generate/generated.jsonl" not in synced  # mid-stage

        shutil.rmtree(tmp_path / "vm1")  # the VM and its disk are gone
        second_vm = tmp_path / "vm2" / "run"
        env["PREFECT_HOME"] = str(tmp_path / "prefect-vm2")
        resumed = subprocess.run([sys.executable, "-c", SHARDED_CHILD, str(second_vm), *overrides],
                                 cwd=harness.REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
        remote = fake.files("alice/sit-sharded")
    finally:
        server.close()

    manifest = json.loads((second_vm / "generate" / "manifest.json").read_text())
    assert any(e["event"] == "resumed" for e in manifest["events"])  # continued from the mirror's manifest
    assert "generate/generated.jsonl" in remote  # the end of the stage reached the mirror
    harness.wait_for_success(uninterrupted, HANG_GUARD_S, tmp_path / "reference.log", "reference run")
    for name in ("generate/generated.jsonl", "generate/attempts.jsonl"):
        assert (second_vm / name).read_bytes() == (reference / name).read_bytes(), name
