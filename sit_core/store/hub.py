"""A Hugging Face Hub mirror of the run directory, so a run can resume on a brand-new VM.

The run directory stays the source of truth (local disk or a mounted Google Drive); the hub
repo (private, a dataset repo by default) is a copy of it, path for path:

    mirror = HubMirror("user/my-run", run_dir)       # token: HF_TOKEN / login / Colab secret
    mirror.pull()                                     # at start: restore what is missing locally
    ...
    progress = SyncThrottle(mirror, "sft", every=cfg.checkpoint_interval, progress=progress)
    stage.run(cfg, run_dir, progress)                 # pushes every `every` items, and at the end
    mirror.push([run_dir / "sft"])                    # after each stage
    mirror.push()                                     # the whole run directory

What is mirrored: every file of the run directory except local machinery and anything that
may hold a secret (see `is_mirrored`). Trainer checkpoints (`checkpoint-N/`) are mirrored
only once complete, i.e. once the trainer has written their `trainer_state.json`.

`push` uploads only the files whose content differs from the remote copy, in one commit; the
same commit deletes the remote copies of trainer checkpoints under the pushed paths that are
gone locally (the Trainer keeps the newest two), so the mirror does not grow by a checkpoint
every save. `delete` removes whole stages (what `sit reset` discards), so a later pull does not
bring them back. Nothing else is ever deleted remotely. The
comparison uses the remote tree listing (the LFS sha256, or the git blob sha1 of small files),
so it is right even on a fresh VM and even if another machine pushed in between. Local hashes
are cached in `<run_dir>/.sit/hub_state.json` by (size, mtime, inode), so a sync every checkpoint
interval does not re-read unchanged files from a slow Drive mount.

`pull` never overwrites local work: it downloads files that are missing locally, and files
whose local copy is damaged (an output of a finished stage that no longer matches its
manifest). Downloads land in `<run_dir>/.sit/download/`, are checked against the remote hash,
then renamed into place, manifests and `trainer_state.json` last, so an interrupted pull never
leaves a stage that claims to be done without its files or a checkpoint without its state.

Network calls are retried with exponential backoff and jitter on connection errors, timeouts,
429 and 5xx (on top of huggingface_hub's own per-request retries). 401/403/404 are not retried:
they raise `HubAccessError` at once, saying what to fix. When retries run out,
`HubUnavailableError` says how to resume; nothing local has been changed or deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, RepoFile
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from sit_core.config import STAGE_ORDER
from sit_core.errors import SitError
from sit_core.store.fileio import atomic_write_json, fsync_dir, read_json
from sit_core.store.manifest import MANIFEST, output_problems, read_manifest
from sit_core.store.rundir import RUN_RECORD
from sit_core.secrets import hf_token, redact, register_secret

log = logging.getLogger("sit.hub")

STATE_DIR = ".sit"  # local-only bookkeeping inside the run directory; never mirrored
STATE_FILE = f"{STATE_DIR}/hub_state.json"
STAGING_DIR = f"{STATE_DIR}/download"
TRAINER_STATE = "trainer_state.json"
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")
# Local machinery and secret-bearing names. Hidden files and folders (.sit.lock, .sit/, .cache/,
# the `.name.*.tmp` files of atomic writes, .env, .netrc) are excluded as a whole, below.
_EXCLUDED_SUFFIXES = (".tmp", ".incomplete", ".lock", ".pem", ".key")
# Whole names only: "special_tokens_map.json" and "tokenizer.json" are part of every saved adapter.
_SECRET_NAMES = re.compile(r"^(hf_)?(token|secrets?|credentials?|passwords?)$", re.I)


class HubAccessError(SitError):
    """The hub refused us for a reason retrying cannot fix (401, 403, 404)."""


class HubUnavailableError(SitError):
    """The hub kept failing (network, 429, 5xx) until the retries ran out."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying one hub operation before giving up."""

    attempts: int = 6
    initial_wait_s: float = 2.0
    max_wait_s: float = 60.0


T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the network or the hub may recover."""
    if isinstance(exc, OfflineModeIsEnabled):  # a ConnectionError subclass, but a setting
        return False
    if isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return True
    status = _status(exc)
    return status is not None and (status in (408, 429) or status >= 500)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
    return getattr(response, "status_code", None)


def checkpoint_is_complete(path: Path) -> bool:
    """A trainer checkpoint is complete once the trainer has written its state (its last file)."""
    return (Path(path) / TRAINER_STATE).is_file()


def is_mirrored(run_dir: Path, rel: str) -> bool:
    """Whether the run-directory file at `rel` (posix, relative) belongs in the mirror."""
    return mirrored_name(rel) and _checkpoints_complete(Path(run_dir), rel)


def mirrored_name(rel: str) -> bool:
    """The rules that depend on the path alone (also applied to what a pull restores)."""
    parts = rel.split("/")
    if any(p.startswith(".") or p.startswith("tmp-checkpoint-") for p in parts):
        return False
    name = parts[-1]
    return not (name.endswith(_EXCLUDED_SUFFIXES) or _SECRET_NAMES.search(Path(name).stem))


def _checkpoints_complete(run_dir: Path, rel: str) -> bool:
    parts = rel.split("/")
    return all(checkpoint_is_complete(run_dir.joinpath(*parts[: i + 1]))
               for i, part in enumerate(parts[:-1]) if _CHECKPOINT_DIR.match(part))


def verify_run_dir(run_dir: Path) -> dict[str, list[str]]:
    """Stages whose files disagree with their manifest: {stage: [problem, ...]}.

    Checks every finished stage's recorded outputs (presence, size, sha256) and that each
    manifest parses. An empty dict means the run directory is intact. Stages react to damage
    by themselves (`begin_stage` reopens a damaged done stage as partial); this is for telling
    the user at start and for checking a pull.
    """
    run_dir = Path(run_dir)
    damaged: dict[str, list[str]] = {}
    for stage in STAGE_ORDER:
        path = run_dir / stage / MANIFEST
        if not path.exists():
            continue
        manifest = read_manifest(run_dir, stage)
        if manifest is None:
            damaged[stage] = [f"{stage}/{MANIFEST} is not valid JSON"]
        elif manifest.get("status") == "done" and (problems := output_problems(run_dir, manifest)):
            damaged[stage] = problems
    return damaged


@dataclass
class FileHashes:
    sha256: str
    git_sha1: str  # what the hub reports as the `oid` of a non-LFS file
    has_secret: bool


def hash_file(path: Path, secrets: Iterable[bytes] = (), chunk: int = 1 << 20) -> FileHashes:
    """sha256 and git blob sha1 in one read, also looking for the given secret byte strings."""
    path = Path(path)
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    secrets = [s for s in secrets if s]
    overlap = max((len(s) for s in secrets), default=1) - 1
    tail = b""
    found = False
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            sha256.update(block)
            sha1.update(block)
            if secrets and not found:
                window = tail + block  # a secret may straddle two blocks
                found = any(s in window for s in secrets)
                tail = window[-overlap:] if overlap else b""
    return FileHashes(sha256.hexdigest(), sha1.hexdigest(), found)


def _same_content(local: FileHashes, remote) -> bool:
    if remote.lfs is not None:
        return local.sha256 == remote.lfs.sha256
    return local.git_sha1 == remote.blob_id


@dataclass
class PushResult:
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # would have published a secret
    deleted: list[str] = field(default_factory=list)  # remote copies of checkpoints rotated away locally
    commit_url: str | None = None


@dataclass
class PullResult:
    downloaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept_local: list[str] = field(default_factory=list)  # differs from the hub; local work wins
    damaged: dict[str, list[str]] = field(default_factory=dict)  # verify_run_dir after the pull


class HubMirror:
    """A private hub repo that mirrors one run directory."""

    def __init__(
        self,
        repo_id: str,
        run_dir: Path,
        token: str | None = None,
        repo_type: str = "dataset",
        private: bool = True,
        *,
        endpoint: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        resume_command: str | None = None,
    ):
        if not REPO_ID_RE.match(repo_id or ""):
            raise SitError(f"'{repo_id}' is not a hub repo id", "use the form user/name, e.g. --hub-repo alice/sit-run")
        self.repo_id = repo_id
        self.run_dir = Path(run_dir)
        self.repo_type = repo_type
        self.private = private
        self.retry = retry
        self.token = token or hf_token()
        register_secret(self.token)
        self.api = HfApi(endpoint=endpoint, token=self.token)
        self.resume_command = resume_command or f"sit run --run-dir {self.run_dir} --hub-repo {repo_id}"
        self.url: str | None = None  # the repo's web address, once ensure_repo has run

    # -- the two operations ---------------------------------------------------------------

    def push(self, paths: Iterable[Path] | None = None, message: str | None = None) -> PushResult:
        """Upload the mirrored files under `paths` (default: the whole run directory) whose
        content differs from the hub's copy, in one commit."""
        self.ensure_repo()
        local = self._local_files(paths)
        result = PushResult()
        if not local:
            return result
        remote = self._remote_files()
        result.deleted = self._rotated_checkpoints(paths, remote)
        hashes = self._hash_local(local)
        changed = []
        for rel in sorted(local):
            h = hashes[rel]
            if h.has_secret:
                result.refused.append(rel)
            elif rel in remote and _same_content(h, remote[rel]):
                result.unchanged.append(rel)
            else:
                changed.append(rel)
        if result.refused:
            log.warning("not mirroring %d file(s) that contain the Hugging Face token: %s",
                        len(result.refused), ", ".join(result.refused))
        if not changed and not result.deleted:
            return result
        info = self.upload({rel: local[rel] for rel in changed}, message or f"sit: sync {len(changed)} file(s)",
                           delete=result.deleted)
        result.uploaded = changed
        result.commit_url = info.commit_url
        log.info("hub %s: uploaded %d file(s), %d unchanged, %d deleted", self.repo_id, len(changed),
                 len(result.unchanged), len(result.deleted))
        return result

    def delete(self, doomed: Callable[[str], bool], message: str) -> list[str]:
        """Remove from the hub, in one commit, the files whose run-directory path `doomed`
        accepts. Returns them."""
        files = sorted(rel for rel in self._remote_files() if doomed(rel))
        if files:
            self.upload({}, message, delete=files)
            log.info("hub %s: deleted %d file(s)", self.repo_id, len(files))
        return files

    def upload(self, files: dict[str, Path | bytes], message: str, delete: Iterable[str] = ()):
        """Commit these files (path in repo -> local file or content), and the deletion of the
        `delete` paths, in one commit, with retries. Creates the repo first if needed. Returns
        huggingface_hub's CommitInfo."""
        self.ensure_repo()
        delete = list(delete)

        def commit():
            # Operations are built per attempt: huggingface_hub mutates them during a commit.
            ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src if isinstance(src, bytes) else str(src))
                   for rel, src in files.items()]
            ops += [CommitOperationDelete(path_in_repo=rel, is_folder=False) for rel in delete]
            return self.api.create_commit(self.repo_id, ops, repo_type=self.repo_type, commit_message=message)

        return self._call(f"upload {len(files)} file(s) to", commit)

    def pull(self) -> PullResult:
        """Restore into the run directory what the hub has and the run directory lacks.

        Creates the repo if it does not exist yet, so the first `sit run --hub-repo` of a new
        run pulls nothing instead of failing."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ensure_repo()
        sha = self._call("read", lambda: self.api.repo_info(self.repo_id, repo_type=self.repo_type).sha)
        remote = {rel: f for rel, f in self._remote_files(revision=sha).items() if mirrored_name(rel)}
        present = self._hash_local({rel: self.run_dir / rel for rel in remote if (self.run_dir / rel).is_file()})
        recorded = _recorded_outputs(self.run_dir)
        result = PullResult()
        wanted = []
        for rel, remote_file in sorted(remote.items()):
            local = present.get(rel)
            if local is None:
                wanted.append(rel)
            elif _same_content(local, remote_file):
                result.unchanged.append(rel)
            elif rel in recorded and recorded[rel] != local.sha256:
                wanted.append(rel)  # damaged: a finished stage's output that no longer matches its manifest
            else:
                result.kept_local.append(rel)
        if result.kept_local:
            log.warning("kept %d local file(s) that differ from hub %s (local work wins): %s",
                        len(result.kept_local), self.repo_id, ", ".join(result.kept_local[:10]))
        staging = self.run_dir / STAGING_DIR
        staged: dict[str, Path] = {}
        for rel in wanted:
            staged[rel] = Path(self._call(f"download {rel} from", lambda rel=rel: self.api.hf_hub_download(
                self.repo_id, rel, repo_type=self.repo_type, revision=sha, local_dir=staging)))
            if not _same_content(hash_file(staged[rel]), remote[rel]):
                staged[rel].unlink()
                raise HubUnavailableError(f"{rel} from hub {self.repo_id} arrived corrupted (hash mismatch)",
                                          self._resume_hint())
        for rel in sorted(wanted, key=_install_order):
            dest = self.run_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged[rel], dest)
            fsync_dir(dest.parent)
        shutil.rmtree(staging, ignore_errors=True)
        result.downloaded = wanted
        result.damaged = verify_run_dir(self.run_dir)
        log.info("hub %s: downloaded %d file(s), %d already present", self.repo_id, len(wanted), len(result.unchanged))
        return result

    def ensure_repo(self) -> str:
        """Create the repo (private by default) if it does not exist yet; once per mirror. Returns its URL."""
        if self.url is None:
            self.url = str(self._call("create", lambda: self.api.create_repo(
                self.repo_id, repo_type=self.repo_type, private=self.private, exist_ok=True)))
        return self.url

    # -- local side -----------------------------------------------------------------------

    def _rotated_checkpoints(self, paths: Iterable[Path] | None, remote: dict) -> list[str]:
        """Remote files under the pushed paths that lie in a checkpoint folder gone locally."""
        base = self.run_dir.resolve()
        roots = [""] if paths is None else [
            (Path(p) if Path(p).is_absolute() else self.run_dir / p).resolve().relative_to(base).as_posix()
            for p in paths]
        stale = []
        for rel in remote:
            if not mirrored_name(rel) or not any(r in ("", ".") or rel.startswith(r + "/") for r in roots):
                continue
            parts = rel.split("/")
            folders = ["/".join(parts[: i + 1]) for i, part in enumerate(parts[:-1]) if _CHECKPOINT_DIR.match(part)]
            if any(not (self.run_dir / f).is_dir() for f in folders):
                stale.append(rel)
        return sorted(stale)

    def _local_files(self, paths: Iterable[Path] | None) -> dict[str, Path]:
        roots = [self.run_dir] if paths is None else [Path(p) for p in paths]
        base = self.run_dir.resolve()
        files: dict[str, Path] = {}
        for root in roots:
            root = root if root.is_absolute() else self.run_dir / root
            if not root.exists():
                continue
            candidates = [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())
            for path in candidates:
                rel = path.resolve().relative_to(base).as_posix()
                if is_mirrored(self.run_dir, rel):
                    files[rel] = path
        return files

    def _hash_local(self, files: dict[str, Path]) -> dict[str, FileHashes]:
        """Hashes of the files, reusing the cached ones whose size, mtime and inode did not change."""
        secrets = [s.encode() for s in (self.token,) if s]
        secrets_id = hashlib.sha256(b"\0".join(secrets)).hexdigest()[:16]  # a cache made for another token is void
        state_path = self.run_dir / STATE_FILE
        try:
            state = read_json(state_path) if state_path.exists() else {}
        except ValueError:
            state = {}
        cache = state.get("files", {}) if state.get("secrets_id") == secrets_id else {}
        cache = {rel: entry for rel, entry in cache.items() if (self.run_dir / rel).is_file()}
        out: dict[str, FileHashes] = {}
        for rel, path in files.items():
            st = path.stat()
            hit = cache.get(rel)
            # The inode catches an atomic rewrite (a rename) of the same size within the mtime granularity.
            if hit and (hit["size"], hit["mtime_ns"], hit.get("ino")) == (st.st_size, st.st_mtime_ns, st.st_ino):
                out[rel] = FileHashes(hit["sha256"], hit["git_sha1"], hit["has_secret"])
            else:
                out[rel] = hash_file(path, secrets)
                cache[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, **out[rel].__dict__}
        if cache != state.get("files") or state.get("secrets_id") != secrets_id:
            atomic_write_json(state_path, {"secrets_id": secrets_id, "files": cache})
        return out

    # -- remote side ----------------------------------------------------------------------

    def _remote_files(self, revision: str | None = None) -> dict:
        def listing():
            entries = self.api.list_repo_tree(self.repo_id, recursive=True, repo_type=self.repo_type, revision=revision)
            return {e.path: e for e in entries if isinstance(e, RepoFile)}  # files, not folders

        return self._call("list the files of", listing)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one hub operation with retries; turn its failure into a SitError that says what to do."""
        where = f"hub repo {self.repo_id}"
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(self.retry.attempts),
                wait=wait_random_exponential(multiplier=self.retry.initial_wait_s, max=self.retry.max_wait_s),
                retry=retry_if_exception(is_transient),
                before_sleep=lambda state: self._log_retry(what, state),
                reraise=True,
            ):
                with attempt:
                    return fn()
        except OfflineModeIsEnabled:
            raise SitError(f"cannot {what} {where}: HF_HUB_OFFLINE is set",
                           "unset HF_HUB_OFFLINE, or run without --hub-repo") from None
        except Exception as exc:  # noqa: BLE001 - classified below; anything else re-raises
            if is_transient(exc):
                raise HubUnavailableError(
                    f"could not {what} {where} after {self.retry.attempts} attempts: {_short(exc)}",
                    self._resume_hint()) from None
            if isinstance(exc, HfHubHTTPError):
                raise self._access_error(what, exc) from None
            raise
        raise AssertionError("unreachable: tenacity returns or raises")

    def _log_retry(self, what: str, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("hub %s: %s failed (%s); retry %d/%d in %.1fs", self.repo_id, what, _short(exc),
                    state.attempt_number, self.retry.attempts - 1, state.next_action.sleep if state.next_action else 0)

    def _access_error(self, what: str, exc: HfHubHTTPError) -> SitError:
        status = _status(exc)
        where = f"hub repo {self.repo_id} ({self.repo_type})"
        token_fix = ("create a token with write access at https://huggingface.co/settings/tokens and export "
                     "HF_TOKEN=hf_... (in Colab: add HF_TOKEN in the Secrets panel and allow this notebook)")
        if status == 401:
            header = exc.response.headers.get("X-Error-Message", "") if exc.response is not None else ""
            if not self.token:
                return HubAccessError(f"cannot {what} {where}: no Hugging Face token is set", token_fix)
            if "Invalid credentials" in header or "invalid" in header.lower():
                return HubAccessError(f"cannot {what} {where}: the Hub rejected HF_TOKEN (invalid or expired)", token_fix)
            return HubAccessError(f"cannot {what} {where}: the Hub says 401 (missing or invalid token, or the repo "
                                  "is not visible with this token)", token_fix + "; check the repo id too")
        if status == 403:
            return HubAccessError(
                f"cannot {what} {where}: your token has no access to it (a gated or private repo of someone "
                "else, or a read-only token)",
                "use a token with write access to that namespace, or request access on the repo's page")
        if status == 404:
            return HubAccessError(f"cannot {what} {where}: it does not exist (wrong repo id or repo type?)",
                                  "check --hub-repo (user/name); sit mirrors into a dataset repo by default")
        return SitError(f"the Hub refused to let us {what} {where}: {_short(exc)}", self._resume_hint())

    def _resume_hint(self) -> str:
        return (f"the local run directory {self.run_dir} is intact; when the Hub is reachable again, "
                f"resume with `{self.resume_command}`")


def _short(exc: BaseException | None) -> str:
    """One redacted line: hub error messages can be long and could echo request details."""
    if exc is None:
        return "unknown error"
    text = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {text[0] if text else ''}")[:300]


def _recorded_outputs(run_dir: Path) -> dict[str, str]:
    """{path: sha256} of every output that a finished stage's manifest vouches for."""
    out = {}
    for stage in STAGE_ORDER:
        manifest = read_manifest(run_dir, stage)
        if manifest and manifest.get("status") == "done":
            out.update({rel: entry["sha256"] for rel, entry in manifest.get("outputs", {}).items()})
    return out


def _install_order(rel: str) -> tuple[int, str]:
    """Files that declare other files complete go in last: a checkpoint's trainer state, then
    the stage manifests, then the run record."""
    name = rel.rsplit("/", 1)[-1]
    rank = {TRAINER_STATE: 1, MANIFEST: 2, RUN_RECORD: 3}.get(name, 0)
    return rank, rel


class SyncThrottle:
    """A stage progress callback that also syncs the stage to the hub every `every` items
    (and when the stage reaches its total), forwarding to an inner `progress` callback.

    A sync that fails after its retries only logs a warning here: the stage keeps working
    locally and the next sync (at the latest, the end-of-stage push) tries again. Access
    errors (401/403/404) are raised, since waiting will not fix them.
    """

    def __init__(self, mirror: HubMirror, stage: str, every: int,
                 progress: Optional[Callable[[int, int], None]] = None):
        self.mirror = mirror
        self.stage = stage
        self.every = max(1, int(every))
        self.progress = progress
        self._last_synced: int | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)
        last = self._last_synced if self._last_synced is not None else 0
        if done - last >= self.every or (done >= total and done != self._last_synced):
            self.sync()
            self._last_synced = done

    def sync(self) -> PushResult | None:
        try:
            return self.mirror.push([self.mirror.run_dir / self.stage], message=f"sit: sync {self.stage}")
        except HubUnavailableError as e:
            log.warning("hub sync of %s skipped for now: %s", self.stage, e.problem)
            return None
