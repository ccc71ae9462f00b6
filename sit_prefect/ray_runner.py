"""Scale-out past one machine: a sharded stage's shards (Magpie generation, the preference
stage's responses and scores) as Ray tasks on a running Ray cluster (`sit run --ray ADDRESS`).
The driver (sit_core/driver.py) plans, files and merges exactly as with the process pool; this
module only says where the shards run and how their records reach the run directory.

The workers see no disk of the parent. Each shard is one Ray streaming-generator task that is
handed everything the shard reads (its phase's `files`: the run's input files, once per wave
through Ray's object store, and the lines of its own log the parent already holds), runs the
shard in a node-local scratch run directory, and yields the new complete lines of its log as
the work fsyncs them. The parent appends each batch to the shard's log in the run directory
(fsync'd) before it takes the next, so:
  - a worker node that dies loses at most the batch in flight; its shard is submitted again,
    to any node, with the parent's copy of the log, and resumes from there;
  - a parent that dies resumes from the run directory, as every run does;
  - the merged outputs equal a one-process run's: a shard's records depend on their indices
    and batches only, not on where or how often the shard ran.
Ray's own task retries are off (max_retries=0): Ray would rerun a task with its first
arguments, from the log as it was when the shard was first submitted.

The parent must be a node of the cluster (Ray drivers talk to their node's raylet): the head,
or a machine joined with `ray start --address HEAD:6379 --num-cpus 0 --num-gpus 0`.
At connect, one tiny task per node reports its Python, Ray and sit build, its hardware profile
and whether it has vLLM: a mismatch is one SitError before any model loads, and `auto`
(profile, generation backend) means the workers' hardware, not the parent's.
HF_TOKEN and the model cache come from each worker's own environment; nothing here sends
the token (task arguments are checked for it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sit_core.config import SitConfig
from sit_core.contract import Phase, Shard, ShardFiles
from sit_core.errors import SitError
from sit_core.secrets import contains_secret
from sit_core.stages import declared
from sit_core.store.fileio import append_jsonl, atomic_write_bytes, jsonl_text

# A node that dies mid-shard costs one more submission of that shard; past this many, the
# failure is the cluster's, not a node's, and the stage fails (a rerun resumes it).
ATTEMPTS = 4
# How often a worker looks for new lines in its shard's log: each look is a stat, and a batch
# takes seconds, so this only bounds how late a batch leaves the node.
POLL_S = 0.2
# A node's first task starts a worker process that imports torch; minutes on a cold VM.
PROBE_TIMEOUT_S = 600
CONNECT_TIMEOUT_S = 5.0


def sit_build() -> str:
    """sit's version and a digest of its code: every node must run the very same sit, and an
    editable install keeps the version number across commits."""
    digest = hashlib.sha256()
    for package in ("sit_core", "sit_prefect", "sit_cli"):
        root = Path(__import__(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes())
    return f"{importlib.metadata.version('sit')}+{digest.hexdigest()[:12]}"


def versions() -> dict:
    """What every node must run alike."""
    import ray

    return {"python": platform.python_version(), "ray": ray.__version__, "sit": sit_build()}


def node_report() -> dict:
    """What a node runs and has: its versions, and the hardware profile and generation backend
    that `auto` means there."""
    from sit_core.config.backend import detect_backend
    from sit_core.config.profiles import detect_profile

    return {"node": platform.node(), **versions(), "profile": detect_profile(), "backend": detect_backend()}


VERSIONED = ("python", "ray", "sit")


def check_versions(parent: dict, nodes: list[dict]) -> None:
    """One SitError naming every node whose Python, Ray or sit differs from the parent's."""
    problems = [f"{n['node']} ({n['address']}) has " + ", ".join(f"{k} {n[k]} (here {parent[k]})"
                                                                 for k in VERSIONED if n[k] != parent[k])
                for n in nodes if any(n[k] != parent[k] for k in VERSIONED)]
    if problems:
        raise SitError("nodes of the Ray cluster run other versions than this machine: " + "; ".join(problems),
                       "install the same Python, Ray and sit on every node (the same sit checkout, "
                       "`scripts/install.sh --ray`), then restart each node's raylet (`ray stop`, `ray start ...`)")


@dataclass
class Cluster:
    """A connected Ray cluster: its address and what each node reported."""

    address: str
    nodes: list[dict] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return int(sum(n["resources"].get("GPU", 0) for n in self.nodes))

    @property
    def cpus(self) -> int:
        return int(sum(n["resources"].get("CPU", 0) for n in self.nodes))

    def hardware(self, requested_profile: str | None) -> dict:
        """What `auto` means for the shards: the hardware of the nodes that run them (GPU nodes
        when the cluster has GPUs). Mixed GPU profiles have no one set of batch sizes: the
        user names one."""
        workers = [n for n in self.nodes if n["resources"].get("GPU", 0)] if self.gpus else \
            [n for n in self.nodes if n["resources"].get("CPU", 0)]
        profiles = sorted({n["profile"] for n in workers})
        if len(profiles) > 1 and requested_profile in (None, "auto"):
            raise SitError(f"the Ray cluster's workers have different hardware profiles ({', '.join(profiles)})",
                           "name the profile the shards use with --profile (its batch sizes shape the shards)")
        backend = "vllm" if workers and all(n["backend"] == "vllm" for n in workers) else "transformers"
        return {"profile": profiles[0] if profiles else None, "backend": backend}


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SitError(f"--ray {address!r} is not a Ray cluster address",
                       "give the head node's HOST:PORT (the GCS port, 6379 by default), or `auto` on a node "
                       "of the cluster")
    return host.strip("[]"), int(port)


def connect(address: str) -> Cluster:
    """Connect this process to the Ray cluster at `address` (HOST:PORT or `auto`) and check its
    nodes; a wrong or unreachable address, or a node with other versions, is one SitError."""
    import ray

    if address.startswith("ray://"):
        raise SitError(f"--ray {address}: Ray Client addresses are not supported (untested with streaming tasks)",
                       "run sit on a node of the cluster (the head, or one joined with `ray start --address "
                       "HEAD:6379 --num-cpus 0 --num-gpus 0`) and give the GCS address HEAD:6379")
    fix = ("start the cluster first (`ray start --head --node-ip-address PRIVATE_IP --port 6379` on the head), and "
           "give its HOST:PORT; `auto` means the cluster this machine is a node of")
    if address != "auto":
        host, port = _host_port(address)
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise SitError(f"no Ray cluster answers at {address}: {e.strerror or e}", fix) from None
    if not ray.is_initialized():
        try:
            # A driver's prints and worker logs go to this process's stderr, which `sit run`
            # captures into the run's log file (redacted).
            ray.init(address=address, namespace="sit", logging_level="WARNING", log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SitError(f"could not join the Ray cluster at {address}: {str(e).splitlines()[0]}", fix) from None
    cluster = Cluster(address, _probe())
    check_versions(versions(), cluster.nodes)
    return cluster


def _probe() -> list[dict]:
    """One report per alive node, from a task pinned to that node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    report = ray.remote(num_cpus=0, max_retries=0)(node_report)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = [report.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    try:
        reports = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise SitError(f"nodes of the Ray cluster did not answer within {PROBE_TIMEOUT_S} s",
                       "check `ray status` on the head: every node must be alive and have sit installed") from None
    return [{**r, "address": n["NodeManagerAddress"], "resources": n["Resources"]} for n, r in zip(nodes, reports)]


# ---------------------------------------------------------------------------------------
# A shard on a worker


def _complete_lines(data: bytes) -> bytes:
    """Up to the last newline: a torn last line is the writer's to finish or cut."""
    return data[: data.rfind(b"\n") + 1]


def _common_lines(a: bytes, b: bytes) -> int:
    """The length of the longest common prefix of a and b that ends at a line's end."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a.rfind(b"\n", 0, n) + 1


class LogTail:
    """What a log has that its mirror (the parent's copy, `known`) lacks, as (offset, lines):
    the mirror keeps its first `offset` bytes and appends `lines`. The work may cut its log
    back before it appends (Magpie keeps whole batches), so a new part does not always start
    where the mirror ends."""

    def __init__(self, path: Path, known: bytes):
        self.path, self.known = path, known

    def read(self) -> tuple[int, bytes] | None:
        data = _complete_lines(self.path.read_bytes())
        keep = len(self.known) if data.startswith(self.known) else _common_lines(self.known, data)
        if keep == len(self.known) == len(data):
            return None
        self.known = data
        return keep, data[keep:]


def shard_task(stage: str, phase: str, config: dict, shard: list[int], params: dict, inputs: dict,
               log: str, saved: bytes) -> Iterator:
    """Run one shard in a scratch run directory of this node; yield ("lines", offset, bytes) for
    each batch of new complete log lines (LogTail), then ("timing", dict), then ("summary", the
    shard's summary).
    `inputs`: run-dir-relative path -> ObjectRef of its bytes. `log`: the shard log's
    run-dir-relative path, and `saved` what the parent holds of it."""
    import ray

    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="sit-shard-"))
    try:
        for rel, data in zip(inputs, ray.get(list(inputs.values()))):
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            (scratch / rel).write_bytes(data)
        log_path = scratch / log
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(saved)
        work = next(p for p in declared(stage).sharding.phases if p.name == phase).work
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["summary"] = work(SitConfig.model_validate(config), scratch, tuple(shard), **params)
            except BaseException as e:  # noqa: BLE001 - handed to the generator, which raises it
                outcome["error"] = e

        unpacked = time.time()
        worker = threading.Thread(target=run, name=f"sit-shard-{shard[0]}-{shard[1]}")
        worker.start()
        tail = LogTail(log_path, saved)
        while True:
            alive = worker.is_alive()
            worker.join(POLL_S)
            if new := tail.read():
                yield ("lines", *new)
            if not alive:
                break
        if "error" in outcome:
            raise outcome["error"]
        yield ("timing", {"node": ray.get_runtime_context().get_node_id()[:12], "started": started,
                          "inputs_s": unpacked - started, "work_s": time.time() - unpacked})
        yield ("summary", outcome["summary"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# The parent's side


@functools.lru_cache(maxsize=None)
def _remote_shard_task():
    """shard_task as a Ray task, made once: Ray exports a remote function to the cluster when it is made."""
    import ray

    return ray.remote(num_returns="streaming", max_retries=0)(shard_task)


def _saved_lines(path: Path) -> bytes:
    return _complete_lines(path.read_bytes()) if path.exists() else b""


def _mirror(log: Path, offset: int, lines: bytes) -> None:
    """Bring the run directory's copy of a shard log up to the worker's: keep its first `offset`
    bytes (a cut-back part, or a torn last line, goes) and append `lines`, fsync'd, parsed first
    so that only whole records are ever saved."""
    records = [json.loads(line) for line in lines.splitlines()]
    # Logs are written as jsonl_text writes them, which reads back to the same bytes: the
    # offsets of worker and parent stay one.
    if jsonl_text(records).encode() != lines:
        raise ValueError(f"a batch for {log} is not in sit's JSONL form; its offsets would not hold")
    if log.exists() and log.stat().st_size > offset:
        atomic_write_bytes(log, log.read_bytes()[:offset])
    append_jsonl(log, records)


class RayRunner:
    """The driver's ShardRunner over a Ray cluster: a shard per GPU when the profile has GPUs
    (each task asks Ray for one), else a shard per CPU (Ray gives the task one thread)."""

    def __init__(self, stage: str, cluster: Cluster, cfg: SitConfig):
        self.stage, self.cluster = stage, cluster
        if cfg.profile != "cpu":
            if not cluster.gpus:
                raise SitError(f"profile {cfg.profile} runs shards on GPUs, and the Ray cluster at {cluster.address} "
                               "has none", "start the workers on GPU machines (`ray start` finds their GPUs), or "
                               "run with --profile cpu")
            self.resources, self.size = {"num_gpus": 1, "num_cpus": 1}, cluster.gpus
        else:
            self.resources, self.size = {"num_cpus": 1}, max(1, cluster.cpus)

    def run_wave(self, phase: Phase, cfg: SitConfig, run_dir: Path, wave: list[Shard],
                 params: dict) -> Iterator[dict]:
        import ray

        config = cfg.model_dump(mode="json")
        for what in (config, params):
            if contains_secret(json.dumps(what)):
                raise SitError("a shard's arguments would carry a Hugging Face token to the Ray cluster",
                               "keep the token out of the config; each worker reads HF_TOKEN from its own environment")
        files = {shard: phase.files(cfg, run_dir, shard) for shard in wave}
        # Each input once per wave into the object store; a node fetches it once for its shards.
        inputs = {path.relative_to(run_dir).as_posix(): ray.put(path.read_bytes())
                  for f in files.values() for path in dict.fromkeys(f.reads) if path.exists()}
        results: dict[Shard, dict | BaseException] = {}
        threads = [threading.Thread(target=self._collect, args=(phase, config, params, shard, files[shard], run_dir,
                                                                 inputs, results)) for shard in wave]
        for t in threads:
            t.start()
        failure = None
        for shard, t in zip(wave, threads):
            t.join()
            if isinstance(results[shard], BaseException):
                failure = failure or results[shard]
            else:
                yield results[shard]
        if failure:
            raise failure

    def _collect(self, phase: Phase, config: dict, params: dict, shard: Shard, files: ShardFiles, run_dir: Path,
                 inputs: dict, results: dict) -> None:
        try:
            results[shard] = self._run_shard(phase, config, params, shard, files, run_dir, inputs)
        except BaseException as e:  # noqa: BLE001 - raised by run_wave once every shard is over
            results[shard] = e

    def _run_shard(self, phase: Phase, config: dict, params: dict, shard: Shard, files: ShardFiles, run_dir: Path,
                   inputs: dict) -> dict:
        import ray

        log, retries, attempt = files.log, [], 0
        while True:
            attempt += 1
            saved = _saved_lines(log)
            submitted, saving, timing = time.time(), 0.0, {}
            stream = _remote_shard_task().options(name=f"{self.stage}-{phase.name}-{shard[0]}-{shard[1]}", **self.resources).remote(
                self.stage, phase.name, config, list(shard), params, inputs,
                log.relative_to(run_dir).as_posix(), saved)
            try:
                for ref in stream:
                    kind, *item = ray.get(ref)
                    if kind == "lines":
                        t = time.time()
                        _mirror(log, *item)
                        saving += time.time() - t
                    elif kind == "timing":
                        timing = item[0]
                    else:
                        summary = item[0]
            except ray.exceptions.RayError as e:
                cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
                if not isinstance(cause, ray.exceptions.RayError):  # the shard's own error, as raised there
                    raise (cause if cause is not None else e) from None
                # The node or its worker died: retry from the log.
                # from_line: where the lost attempt started; resumes_at_line: what the parent had
                # saved of it, where the next attempt starts.
                retries.append({"event": "shard_retried", "attempt": attempt, "from_line": saved.count(b"\n"),
                                "resumes_at_line": _saved_lines(log).count(b"\n"),
                                "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
                if attempt == ATTEMPTS:
                    raise SitError(f"shard {list(shard)} of {self.stage} failed on the Ray cluster {ATTEMPTS} times "
                                   f"(last: {retries[-1]['reason']})",
                                   "check `ray status` and the nodes' logs, then rerun the same command: "
                                   "every saved batch is kept") from None
                continue
            # The parent files these with the shard's events (Phase.record): a retry shows where
            # the shard resumed, so what a lost node cost is on record, and `ray_shard` where the
            # shard's time went (bench/bench_ray.py reads it). queued_s: from submission to the
            # task's start (scheduling, a worker process, the arguments); inputs_s: fetching and
            # unpacking the run's files; work_s: the shard's work on the node (its model load
            # included, which the work's `engine_started` events give); drain_s: from the work's
            # end to its last batch and summary reaching the parent; save_s: the parent's appends.
            finished = time.time()
            timing_event = {"event": "ray_shard", "node": timing["node"], "attempt": attempt,
                            "wall_s": round(finished - submitted, 3),
                            "queued_s": round(timing["started"] - submitted, 3),
                            "inputs_s": round(timing["inputs_s"], 3), "work_s": round(timing["work_s"], 3),
                            "drain_s": round(finished - timing["started"] - timing["inputs_s"] - timing["work_s"], 3),
                            "save_s": round(saving, 3)}
            return {**summary, "events": [*retries, timing_event, *summary.get("events", [])]}
