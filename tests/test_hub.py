"""The Hugging Face Hub mirror (sit_core/store/hub.py) and publishing (sit_core/publish.py).

This machine cannot reach the Hub, so the tests cut at the HTTP boundary: huggingface_hub's
own client stack runs unmodified (HfApi, create_commit with its preupload and ndjson commit,
list_repo_tree with pagination parsing, hf_hub_download to a local dir, hf_raise_for_status
turning responses into RepositoryNotFoundError / HfHubHTTPError, its own per-request retries),
and only the transport underneath is replaced, through huggingface_hub's public
`set_client_factory`, by an httpx2.MockTransport in front of `FakeHub`, an in-memory imitation
of the endpoints those calls use.

Covered: which files are uploaded, which are skipped as unchanged (compared with the remote
git blob sha1, or the LFS sha256 for files the fake lists as LFS), which are never uploaded
(lock, temp files, our .sit/ state, secret-named files, files containing the token,
incomplete trainer checkpoints); retries on 503/429/connection errors then success, and the
error with a resume hint when retries run out; fail-fast on 401/403/404 with the request
counted; pull onto a fresh VM (empty run dir) that restores files and manifests which then
verify; a second pull downloads nothing; pull repairs a damaged output and keeps local work
that differs; the sync throttle; publishing adapters and datasets with cards; the token in no
file written and no log line.

Not covered: the real Hub's server behaviour (its rate limits, LFS/Xet transfers: the fake
answers "regular" to every preupload so content travels inline in the commit, redirects to a
CDN, repos with more than one page of tree listing), and real network timeouts (a ConnectError
raised by the transport stands in for them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import _http as hf_http

from sit_core.config import load_config
from sit_core.errors import SitError
from sit_core.store.fileio import append_jsonl, atomic_write_json, atomic_write_text, sha256_file
from sit_core.store.hub import (
    STATE_FILE,
    HubAccessError,
    HubMirror,
    HubUnavailableError,
    RetryPolicy,
    SyncThrottle,
    is_mirrored,
    verify_run_dir,
)
from sit_core.store.manifest import begin_stage, read_manifest, stage_is_done
from sit_core.reset import reset_run
from sit_core.store.rundir import LOCK_NAME, record_run

FAKE_TOKEN = "hf_FakeTokenForTestsOnly0123456789abcd"
ENDPOINT = "https://hub.test"
FAST = RetryPolicy(attempts=3, initial_wait_s=0, max_wait_s=0)
REPO = "alice/sit-run"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """In-memory Hub: the endpoints of create_repo, repo_info, list_repo_tree, create_commit
    (preupload + commit), hf_hub_download (HEAD + GET /resolve) and YAML validation."""

    LFS_SUFFIXES = (".safetensors", ".bin", ".pt")

    def __init__(self, token: str | None = FAKE_TOKEN):
        self.token = token
        self.repos: dict[str, dict] = {}  # "dataset:alice/x" -> {"files": {path: bytes}, "sha": str, "private": bool}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[list[str]] = []  # paths sent in each commit
        self.forbidden: set[str] = set()
        self._faults: list[tuple[str, re.Pattern, list]] = []

    # -- test controls
    def fail(self, method: str, path_regex: str, outcomes: list) -> None:
        """The next matching requests get these outcomes in turn: an HTTP status or 'connect'."""
        self._faults.append((method, re.compile(path_regex), list(outcomes)))

    def count(self, method: str, path_regex: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(path_regex, p))

    def files(self, repo_id: str = REPO, repo_type: str = "dataset") -> dict[str, bytes]:
        return self.repos[f"{repo_type}:{repo_id}"]["files"]

    # -- transport
    def handler(self, request: httpx2.Request) -> httpx2.Response:
        method, path = request.method, request.url.path
        self.requests.append((method, path))
        for fault_method, regex, outcomes in self._faults:
            if fault_method == method and regex.search(path) and outcomes:
                outcome = outcomes.pop(0)
                if outcome == "connect":
                    raise httpx2.ConnectError("connection refused (fake)", request=request)
                return httpx2.Response(outcome, json={"error": "injected"}, request=request)
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return httpx2.Response(401, headers={"X-Error-Message": "Invalid credentials in Authorization header"},
                                   json={"error": "Invalid credentials in Authorization header"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if path == "/api/repos/create":
            return self._create(json.loads(request.content))
        m = re.match(r"^/api/(model|dataset)s/([^/]+/[^/]+)(/.*)?$", path)
        if m:
            return self._api(request, m.group(1), m.group(2), m.group(3) or "")
        m = re.match(r"^/(datasets/)?([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)
        if m:
            return self._resolve(request, "dataset" if m.group(1) else "model", m.group(2), m.group(3))
        return httpx2.Response(404, json={"error": f"fake hub has no route {method} {path}"})

    def _repo(self, repo_type: str, repo_id: str) -> dict | httpx2.Response:
        if repo_id in self.forbidden:
            return httpx2.Response(403, headers={"X-Error-Message": "Access denied"}, json={"error": "Access denied"})
        repo = self.repos.get(f"{repo_type}:{repo_id}")
        if repo is None:
            return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "Repository not found"})
        return repo

    def _create(self, body: dict) -> httpx2.Response:
        repo_id = f"{body['organization']}/{body['name']}"
        if repo_id in self.forbidden:
            return httpx2.Response(403, headers={"X-Error-Message": "no write access"}, json={"error": "forbidden"})
        key = f"{body.get('type') or 'model'}:{repo_id}"
        url = f"{ENDPOINT}/{'datasets/' if key.startswith('dataset') else ''}{repo_id}"
        if key in self.repos:
            return httpx2.Response(409, json={"error": "You already created this repo", "url": url})
        self.repos[key] = {"files": {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                           "private": body.get("visibility", "private" if body.get("private") else "public") == "private",
                           "sha": "0" * 40}
        return httpx2.Response(200, json={"url": url})

    def _api(self, request: httpx2.Request, repo_type: str, repo_id: str, rest: str) -> httpx2.Response:
        repo = self._repo(repo_type, repo_id)
        if isinstance(repo, httpx2.Response):
            return repo
        if rest == "" or rest.startswith("/revision/"):
            return httpx2.Response(200, json={"id": repo_id, "sha": repo["sha"], "private": repo["private"],
                                              "siblings": [{"rfilename": p} for p in repo["files"]]})
        if rest.startswith("/tree/"):
            return httpx2.Response(200, json=self._tree(repo["files"]))
        if rest.startswith("/preupload/"):
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if rest.startswith("/commit/"):
            lines = [json.loads(line) for line in request.content.splitlines() if line.strip()]
            paths = []
            for item in lines:
                if item["key"] == "file":
                    repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    paths.append(item["value"]["path"])
                elif item["key"] == "deletedFile":
                    del repo["files"][item["value"]["path"]]  # deleting a missing path fails the test
                    paths.append(f"-{item['value']['path']}")
            self.commits.append(paths)
            repo["sha"] = hashlib.sha1(json.dumps(sorted((p, git_sha1(c)) for p, c in repo["files"].items()))
                                       .encode()).hexdigest()
            return httpx2.Response(200, json={"commitUrl": f"{ENDPOINT}/{repo_id}/commit/{repo['sha']}",
                                              "commitOid": repo["sha"], "pullRequestUrl": None})
        return httpx2.Response(404, json={"error": f"fake hub has no route {rest}"})

    def _tree(self, files: dict[str, bytes]) -> list[dict]:
        entries, folders = [], set()
        for path, content in sorted(files.items()):
            parts = path.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry = {"type": "file", "path": path, "size": len(content), "oid": git_sha1(content)}
            if path.endswith(self.LFS_SUFFIXES):  # the listing an LFS file gets: its sha256 as lfs.oid
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 130}
            entries.append(entry)
        entries += [{"type": "directory", "path": f, "oid": "f" * 40} for f in sorted(folders)]
        return entries

    def _resolve(self, request: httpx2.Request, repo_type: str, repo_id: str, path: str) -> httpx2.Response:
        repo = self._repo(repo_type, repo_id)
        if isinstance(repo, httpx2.Response):
            return repo
        content = repo["files"].get(path)
        if content is None:
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "Entry not found"})
        etag = hashlib.sha256(content).hexdigest() if path.endswith(self.LFS_SUFFIXES) else git_sha1(content)
        headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{etag}"', "Content-Length": str(len(content))}
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else content)


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # conftest turns it on for the model tests
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(hf_http.time, "sleep", lambda s: None)  # huggingface_hub's own backoff, and ours
    hf_http.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(fake.handler), event_hooks={"request": [hf_http.hf_request_event_hook]},
        follow_redirects=True))
    yield fake
    hf_http.set_client_factory(hf_http.default_client_factory)


def mirror(run_dir: Path, **kwargs) -> HubMirror:
    return HubMirror(REPO, run_dir, endpoint=ENDPOINT, retry=FAST, **kwargs)


def make_run(run_dir: Path) -> None:
    """A run directory as the pipeline leaves it mid-run: a finished stage, a training stage
    with one complete and one half-written checkpoint, and the lock and temp files of a live process."""
    cfg = load_config(preset="demo", profile="cpu")
    record_run(run_dir, cfg)
    gen = begin_stage(run_dir, "generate", {"n": 3}, {})
    samples = gen.dir / "samples.jsonl"
    append_jsonl(samples, [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(3)])
    gen.finish([samples], {"kept": 3})
    sft = begin_stage(run_dir, "sft", {"lr": 1}, {"generate/samples.jsonl": sha256_file(samples)})
    sft.progress(20, 40)
    done = sft.dir / "checkpoints" / "checkpoint-10"
    atomic_write_text(done / "adapter_model.safetensors", "weights-10" * 100)
    atomic_write_json(done / "trainer_state.json", {"global_step": 10})
    partial = sft.dir / "checkpoints" / "checkpoint-20"
    atomic_write_text(partial / "adapter_model.safetensors", "weights-20 (being written)")
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "vm"}))
    (sft.dir / ".samples.jsonl.123.tmp").write_text("half")


MIRRORED = {"run.json", "generate/manifest.json", "generate/samples.jsonl", "sft/manifest.json",
            "sft/checkpoints/checkpoint-10/adapter_model.safetensors", "sft/checkpoints/checkpoint-10/trainer_state.json"}


# ---------------------------------------------------------------------------------------
# What is uploaded and what is skipped


def test_push_uploads_the_run_dir_except_machinery(hub, run_dir):
    make_run(run_dir)
    result = mirror(run_dir).push()
    assert set(result.uploaded) == MIRRORED
    assert set(hub.files()) == MIRRORED | {".gitattributes"}
    assert hub.repos[f"dataset:{REPO}"]["private"] is True
    assert hub.files()["generate/samples.jsonl"] == (run_dir / "generate/samples.jsonl").read_bytes()
    assert len(hub.commits) == 1  # one commit for the whole sync


def test_second_push_uploads_only_what_changed(hub, run_dir):
    make_run(run_dir)
    mirror(run_dir).push()
    append_jsonl(run_dir / "generate/samples.jsonl", [{"instruction": "q3", "response": "a3"}])
    result = mirror(run_dir).push()  # a new mirror object: nothing remembered in memory
    assert result.uploaded == ["generate/samples.jsonl"]
    assert set(result.unchanged) == MIRRORED - {"generate/samples.jsonl"}
    assert hub.commits[-1] == ["generate/samples.jsonl"]
    # Unchanged again: no commit at all.
    n_commits = len(hub.commits)
    assert mirror(run_dir).push().uploaded == []
    assert len(hub.commits) == n_commits


def test_unchanged_is_judged_against_the_remote_not_local_memory(hub, run_dir):
    """A fresh VM has no .sit/hub_state.json; a file another machine already pushed is skipped,
    and one that differs from the remote (LFS sha256 or git sha1) is sent."""
    make_run(run_dir)
    mirror(run_dir).push()
    (run_dir / STATE_FILE).unlink()
    ckpt = "sft/checkpoints/checkpoint-10/adapter_model.safetensors"
    hub.files()[ckpt] = b"someone else's weights"
    result = mirror(run_dir).push()
    assert result.uploaded == [ckpt]


def test_completed_checkpoint_is_synced_when_its_state_appears(hub, run_dir):
    make_run(run_dir)
    m = mirror(run_dir)
    m.push([run_dir / "sft"])
    assert not any("checkpoint-20" in p for p in hub.files())
    atomic_write_json(run_dir / "sft/checkpoints/checkpoint-20/trainer_state.json", {"global_step": 20})
    result = m.push([run_dir / "sft"])
    assert set(result.uploaded) == {"sft/checkpoints/checkpoint-20/adapter_model.safetensors",
                                    "sft/checkpoints/checkpoint-20/trainer_state.json"}


def test_mirror_path_rules(run_dir):
    (run_dir / "sft/checkpoints/checkpoint-5").mkdir(parents=True)
    for rel in ["generate/samples.jsonl", "sft/final/special_tokens_map.json", "sft/final/tokenizer.json",
                "sft/final/tokenizer_config.json", "sft/final/added_tokens.json"]:
        assert is_mirrored(run_dir, rel), rel
    for rel in [".sit.lock", ".sit/hub_state.json", "generate/.samples.jsonl.99.tmp", ".env",
                ".cache/huggingface/x", "sft/hf_token", "sft/token.json", "credentials.json", "x.incomplete", "secrets.yaml",
                "sft/checkpoints/checkpoint-5/adapter.safetensors", "sft/checkpoints/tmp-checkpoint-7/a.bin"]:
        assert not is_mirrored(run_dir, rel), rel
    (run_dir / "sft/checkpoints/checkpoint-5/trainer_state.json").write_text("{}")
    assert is_mirrored(run_dir, "sft/checkpoints/checkpoint-5/adapter.safetensors")


def test_a_file_containing_the_token_is_never_uploaded(hub, run_dir, caplog):
    make_run(run_dir)
    atomic_write_text(run_dir / "generate/notes.txt", f"oops: {FAKE_TOKEN}\n")
    with caplog.at_level(logging.WARNING, logger="sit.hub"):
        result = mirror(run_dir).push()
    assert result.refused == ["generate/notes.txt"]
    assert "generate/notes.txt" not in hub.files()
    assert "contain the Hugging Face token" in caplog.text


# ---------------------------------------------------------------------------------------
# Retries and failing fast


def test_transient_errors_are_retried_then_succeed(hub, run_dir):
    make_run(run_dir)
    hub.fail("POST", r"^/api/repos/create$", [503, 429])  # create_repo: not retried by huggingface_hub itself
    hub.fail("GET", r"/resolve/", ["connect"])
    mirror(run_dir).push()
    assert hub.count("POST", r"^/api/repos/create$") == 3
    shutil.rmtree(run_dir)
    mirror(run_dir).pull()
    assert verify_run_dir(run_dir) == {}


def test_retries_run_out_with_a_resume_hint_and_local_state_intact(hub, run_dir):
    make_run(run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".sit" not in p.parts}
    hub.fail("POST", r"^/api/repos/create$", [503] * 10)
    with pytest.raises(HubUnavailableError) as err:
        mirror(run_dir).push()
    assert hub.count("POST", r"^/api/repos/create$") == FAST.attempts
    assert f"sit run --run-dir {run_dir} --hub-repo {REPO}" in str(err.value)
    assert "intact" in err.value.fix
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".sit" not in p.parts}
    assert after == before


@pytest.mark.parametrize("status, words", [(401, "missing or invalid token"), (403, "no access"), (404, "does not exist")])
def test_auth_and_missing_repo_fail_fast(hub, run_dir, status, words):
    make_run(run_dir)
    mirror(run_dir).push()
    hub.requests.clear()
    hub.fail("GET", r"/tree/", [status] * 10)
    with pytest.raises(HubAccessError) as err:
        mirror(run_dir).push()
    assert words in str(err.value)
    assert hub.count("GET", r"/tree/") == 1  # never retried
    assert err.value.fix


def test_invalid_token_wrong_repo_and_forbidden_repo(hub, run_dir, monkeypatch):
    make_run(run_dir)
    with pytest.raises(HubAccessError, match="rejected HF_TOKEN"):
        mirror(run_dir, token="hf_WrongWrongWrongWrongWrongWrong00").push()
    assert hub.count("POST", r"^/api/repos/create$") == 1
    hub.fail("GET", r"^/api/datasets/alice/deleted-run", [404] * 10)  # e.g. deleted while we ran
    with pytest.raises(HubAccessError, match="does not exist"):
        HubMirror("alice/deleted-run", run_dir, endpoint=ENDPOINT, retry=FAST).pull()
    assert hub.count("GET", r"^/api/datasets/alice/deleted-run") == 1
    hub.forbidden.add("bob/gated")
    with pytest.raises(HubAccessError, match="no access"):
        HubMirror("bob/gated", run_dir, endpoint=ENDPOINT, retry=FAST).push()
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("sit_core.store.hub.hf_token", lambda: None)
    with pytest.raises(HubAccessError, match="no Hugging Face token"):
        mirror(run_dir).push()


def test_bad_repo_id_and_offline_mode(hub, run_dir, monkeypatch):
    with pytest.raises(SitError, match="not a hub repo id"):
        HubMirror("just-a-name", run_dir)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SitError, match="HF_HUB_OFFLINE"):
        mirror(run_dir).push()


# ---------------------------------------------------------------------------------------
# Pull: a fresh VM, repairs, and what is left alone


def test_fresh_vm_pull_restores_files_and_manifests(hub, run_dir):
    make_run(run_dir)
    mirror(run_dir).push()
    originals = {rel: (run_dir / rel).read_bytes() for rel in MIRRORED}
    shutil.rmtree(run_dir)

    result = mirror(run_dir).pull()
    assert set(result.downloaded) == MIRRORED
    assert {rel: (run_dir / rel).read_bytes() for rel in MIRRORED} == originals
    assert verify_run_dir(run_dir) == {} and result.damaged == {}
    assert stage_is_done(run_dir, "generate")
    assert read_manifest(run_dir, "sft")["progress"] == {"done": 20, "total": 40}
    assert not (run_dir / LOCK_NAME).exists() and not (run_dir / ".sit/download").exists()

    gets = hub.count("GET", r"/resolve/")
    again = mirror(run_dir).pull()
    assert again.downloaded == [] and set(again.unchanged) == MIRRORED
    assert hub.count("GET", r"/resolve/") == gets  # nothing downloaded twice


def test_pull_repairs_damaged_outputs_and_keeps_local_work(hub, run_dir):
    make_run(run_dir)
    mirror(run_dir).push()
    samples = run_dir / "generate/samples.jsonl"
    good = samples.read_bytes()
    samples.write_bytes(good[:10])  # truncated: no longer matches the generate manifest
    assert "generate" in verify_run_dir(run_dir)
    (run_dir / "sft/manifest.json").unlink()  # missing: restored
    atomic_write_text(run_dir / "sft/checkpoints/checkpoint-10/trainer_state.json", '{"global_step": 11}')

    result = mirror(run_dir).pull()
    assert samples.read_bytes() == good
    assert set(result.downloaded) == {"generate/samples.jsonl", "sft/manifest.json"}
    assert result.kept_local == ["sft/checkpoints/checkpoint-10/trainer_state.json"]
    assert result.damaged == {}


def test_push_deletes_remote_checkpoints_rotated_away_locally(hub, run_dir, tmp_path):
    make_run(run_dir)
    m = mirror(run_dir)
    m.push()
    # checkpoint-20 completes and the Trainer, keeping only the newest, removes checkpoint-10.
    atomic_write_json(run_dir / "sft/checkpoints/checkpoint-20/trainer_state.json", {"global_step": 20})
    shutil.rmtree(run_dir / "sft/checkpoints/checkpoint-10")
    assert m.push([run_dir / "generate"]).deleted == []  # not under the pushed path: left alone
    assert "sft/checkpoints/checkpoint-10/trainer_state.json" in hub.files()

    commits = len(hub.commits)
    result = m.push([run_dir / "sft"])
    assert result.deleted == ["sft/checkpoints/checkpoint-10/adapter_model.safetensors",
                              "sft/checkpoints/checkpoint-10/trainer_state.json"]
    assert len(hub.commits) == commits + 1  # the uploads and the deletions in one commit
    assert not any("checkpoint-10" in p for p in hub.files())
    assert "sft/checkpoints/checkpoint-20/trainer_state.json" in hub.files()
    assert "generate/samples.jsonl" in hub.files()

    fresh = tmp_path / "fresh"
    mirror(fresh).pull()
    assert sorted(p.name for p in (fresh / "sft/checkpoints").iterdir()) == ["checkpoint-20"]


def _run_with_hub_records(run_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(hf_constants, "ENDPOINT", ENDPOINT)  # reset_run's mirror uses the default endpoint
    make_run(run_dir)
    cfg = load_config(preset="demo", profile="cpu").model_copy(update={"hub_repo": REPO})
    record_run(run_dir, cfg)
    for record in ("generate-0123abcd", "sft-4567ef01"):
        atomic_write_text(run_dir / "prefect-results" / record, "{}")
    mirror(run_dir).push()


def test_reset_deletes_the_stages_on_the_hub_too(hub, run_dir, tmp_path, monkeypatch):
    _run_with_hub_records(run_dir, monkeypatch)

    assert reset_run(run_dir, "sft") == ["sft"]

    remote = hub.files()
    assert not any(p.startswith("sft/") for p in remote) and "prefect-results/sft-4567ef01" not in remote
    assert {"generate/samples.jsonl", "prefect-results/generate-0123abcd", "run.json"} <= set(remote)
    assert not (run_dir / "sft").exists() and not (run_dir / "prefect-results/sft-4567ef01").exists()
    assert stage_is_done(run_dir, "generate") and (run_dir / "prefect-results/generate-0123abcd").exists()
    # A new VM's pull does not bring the discarded stage back.
    fresh = tmp_path / "fresh"
    mirror(fresh).pull()
    assert (fresh / "generate/samples.jsonl").exists() and not (fresh / "sft").exists()


def test_reset_deletes_nothing_when_the_hub_refuses(hub, run_dir, monkeypatch):
    _run_with_hub_records(run_dir, monkeypatch)
    hub.token = "hf_SomeoneElsesToken000000000000000000"  # our token is now rejected: 401

    with pytest.raises(HubAccessError):
        reset_run(run_dir, "sft")

    assert (run_dir / "sft/manifest.json").exists() and (run_dir / "prefect-results/sft-4567ef01").exists()
    assert "sft/manifest.json" in hub.files()


def test_first_pull_of_a_new_run_creates_the_private_repo(hub, run_dir):
    result = mirror(run_dir).pull()
    assert result.downloaded == [] and hub.repos[f"dataset:{REPO}"]["private"] is True


def test_verify_run_dir_reports_unreadable_manifest(run_dir):
    (run_dir / "filter").mkdir()
    (run_dir / "filter/manifest.json").write_text('{"status": "do')
    assert verify_run_dir(run_dir) == {"filter": ["filter/manifest.json is not valid JSON"]}


# ---------------------------------------------------------------------------------------
# The throttle a stage's progress callback uses


def test_sync_throttle_pushes_every_interval_and_at_the_end(hub, run_dir):
    make_run(run_dir)
    seen = []
    throttle = SyncThrottle(mirror(run_dir), "generate", every=10, progress=lambda d, t: seen.append(d))
    samples = run_dir / "generate/samples.jsonl"
    for done in range(1, 26):
        append_jsonl(samples, [{"i": done}])
        throttle(done, 25)
    assert seen == list(range(1, 26))
    # The first sync also creates the repo and uploads the stage; then at 20 and at 25 (the end).
    assert len(hub.commits) == 3
    assert hub.files()["generate/samples.jsonl"] == samples.read_bytes()


def test_sync_throttle_survives_an_outage(hub, run_dir, caplog):
    make_run(run_dir)
    throttle = SyncThrottle(mirror(run_dir), "generate", every=1)
    hub.fail("POST", r"^/api/repos/create$", [503] * FAST.attempts)
    with caplog.at_level(logging.WARNING, logger="sit.hub"):
        throttle(1, 3)
    assert "skipped for now" in caplog.text
    throttle(2, 3)  # the hub is back
    assert "generate/samples.jsonl" in hub.files()


# ---------------------------------------------------------------------------------------
# Publishing


def make_finished_run(run_dir: Path) -> None:
    """Finished generate, filter and sft stages with the files those stages write."""
    cfg = load_config(preset="demo", profile="cpu", overrides=["run_name=demo1"])
    record_run(run_dir, cfg)
    for stage, name, n in (("generate", "generated.jsonl", 5), ("filter", "kept.jsonl", 3)):
        st = begin_stage(run_dir, stage, {"stage": stage}, {})
        append_jsonl(st.dir / name, [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(n)])
        atomic_write_json(st.dir / "stats.json", {"kept": n})
        st.finish([st.dir / name, st.dir / "stats.json"], {"kept": n, "input": 5})
    sft = begin_stage(run_dir, "sft", {"lr": 2e-4, "lora_r": 8}, {})
    final = sft.dir / "final"
    atomic_write_text(final / "adapter_model.safetensors", "lora weights")
    atomic_write_json(final / "adapter_config.json", {"peft_type": "LORA", "r": 8})
    atomic_write_json(final / "training_config.json", {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                        "training_data_size": 3, "validation_data_size": 1,
                                                        "results": {"train_loss": 1.234, "eval_loss": 1.5}})
    atomic_write_json(sft.dir / "metrics.json", {"eval_loss": 1.5, "tokens_per_sec": 321.0})
    (sft.dir / "curves.png").write_bytes(b"\x89PNG fake")
    sft.finish([*final.iterdir(), sft.dir / "metrics.json", sft.dir / "curves.png"], {"train_loss": 1.234})


def test_publish_run_pushes_adapters_and_datasets_with_cards(hub, run_dir):
    from sit_core.publish import publish_run

    make_finished_run(run_dir)
    urls = publish_run(run_dir, "alice", endpoint=ENDPOINT, retry=FAST)
    assert urls == [f"{ENDPOINT}/datasets/alice/demo1-generated", f"{ENDPOINT}/datasets/alice/demo1-filtered",
                    f"{ENDPOINT}/alice/demo1-sft-lora"]
    kept = hub.files("alice/demo1-filtered")
    assert kept["data/train.jsonl"] == (run_dir / "filter/kept.jsonl").read_bytes()
    card = kept["README.md"].decode()
    assert "3 records" in card and "size_categories:\n- n<1K" in card and "Generator: `embedded:" in card
    model = hub.files("alice/demo1-sft-lora", "model")
    assert {"adapter_model.safetensors", "adapter_config.json", "training_config.json", "curves.png",
            "README.md"} <= set(model)
    card = model["README.md"].decode()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "alice/demo1-filtered" in card and "| eval_loss | 1.5 |" in card and "| train_loss | 1.234 |" in card
    assert '"lora_r": 8' in card
    assert all(hub.repos[key]["private"] for key in hub.repos)


def test_publish_refuses_damaged_or_empty_runs(hub, run_dir):
    from sit_core.publish import publish_run

    with pytest.raises(SitError, match="no run.json"):
        publish_run(run_dir, "alice", endpoint=ENDPOINT, retry=FAST)
    make_finished_run(run_dir)
    (run_dir / "sft/final/adapter_model.safetensors").write_text("tampered")
    with pytest.raises(SitError, match="damaged stages .*sft"):
        publish_run(run_dir, "alice", endpoint=ENDPOINT, retry=FAST)
    assert hub.requests == []


# ---------------------------------------------------------------------------------------
# The token appears nowhere


def test_token_never_written_to_files_hub_or_logs(hub, run_dir, tmp_path, caplog):
    """A fake token in HF_TOKEN; a run directory pushed, pulled onto a fresh directory, published,
    and an auth failure: no file, no hub object and no captured log line contains the token."""
    from sit_core.publish import publish_run
    from sit_core.secrets import install_log_redaction

    install_log_redaction()
    caplog.set_level(logging.DEBUG)
    make_finished_run(run_dir)
    logging.getLogger("sit.test").info("about to push with token %s", FAKE_TOKEN)  # would leak unredacted
    mirror(run_dir).push()
    fresh = tmp_path / "fresh"
    mirror(fresh).pull()
    publish_run(run_dir, "alice", endpoint=ENDPOINT, retry=FAST)
    hub.token = "hf_TheHubNowWantsAnotherToken000000"
    with pytest.raises(HubAccessError) as err:
        mirror(run_dir).push()

    assert FAKE_TOKEN not in str(err.value)
    written = [p for d in (run_dir, fresh) for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "hub_state.json" for p in written) and any(p.name == "run.json" for p in written)
    token = FAKE_TOKEN.encode()
    assert [p for p in written if token in p.read_bytes()] == []
    assert [(key, path) for key, repo in hub.repos.items() for path, data in repo["files"].items() if token in data] == []
    assert "hf_***" in caplog.text and FAKE_TOKEN not in caplog.text
    assert all(FAKE_TOKEN not in r.getMessage() for r in caplog.records)
