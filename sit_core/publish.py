"""Publish a finished run: its adapters as model repos, its datasets as dataset repos, with cards.

Intended CLI (wired in sit_cli):

    sit publish --run-dir runs/demo --namespace alice [--public]

calls `publish_run(run_dir, namespace, token=hf_token(), private=not public)` and prints the
returned repo URLs. An optional final flow stage can call the same function.

What is published, from stages that are finished and intact (their files match their manifest):

    sft/final/            -> {namespace}/{run_name}-sft-lora        (model, PEFT LoRA adapter)
    prompt_tuning/final/  -> {namespace}/{run_name}-prompt-tuning   (model, PEFT prompt tuning)
    dpo/final/            -> {namespace}/{run_name}-dpo             (model, PEFT LoRA after DPO)
    generate/generated.jsonl -> {namespace}/{run_name}-generated    (dataset, Magpie output)
    filter/kept.jsonl        -> {namespace}/{run_name}-filtered     (dataset, quality-filtered)
    preference/pairs.jsonl   -> {namespace}/{run_name}-preference   (dataset, chosen/rejected pairs)

Each repo gets a card (huggingface_hub's ModelCard / DatasetCard) stating the base model, the
stage's result-affecting config (from its manifest), data counts, the metrics in
`<stage>/metrics.json`, and how the data were made. Cards go through `secrets.redact`.
Re-publishing updates the same repos.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from sit_core.contract import Read
from sit_core.errors import SitError
from sit_core.stages import declared, path_of
from sit_core.store.fileio import read_json
from sit_core.store.hub import HubMirror, RetryPolicy, verify_run_dir
from sit_core.store.manifest import read_manifest
from sit_core.store.rundir import RUN_RECORD
from sit_core.secrets import redact

log = logging.getLogger("sit.publish")


@dataclass(frozen=True)
class Adapter:
    stage: str
    suffix: str
    title: str
    tags: tuple[str, ...]
    trained_on: str  # the dataset stage it learned from


@dataclass(frozen=True)
class Dataset:
    stage: str
    output: str  # the name the stage declares for the file
    suffix: str
    title: str
    how: str


ADAPTERS = (
    Adapter("sft", "sft-lora", "LoRA supervised fine-tune", ("lora", "sft"), "filter"),
    Adapter("prompt_tuning", "prompt-tuning", "Prompt tuning", ("prompt-tuning", "sft"), "filter"),
    Adapter("dpo", "dpo", "DPO-aligned LoRA adapter", ("lora", "dpo"), "preference"),
)
DATASETS = (
    Dataset("generate", "records", "generated", "Magpie-generated instructions",
            "Instructions were sampled from the generator model by giving it only the pre-query part of its chat "
            "template (Magpie), and each instruction was answered by the same model."),
    Dataset("filter", "kept", "filtered", "Quality-filtered instructions",
            "The generated pairs were filtered by length, repetition, refusal keywords and language, then "
            "near-duplicates were removed with MinHash LSH (and optionally embedding similarity)."),
    Dataset("preference", "pairs", "preference", "Preference pairs",
            "For each kept instruction, several models wrote responses; a reward model (or an LLM judge) scored "
            "them, and the best and worst responses form a chosen/rejected pair when their margin is large enough."),
)


def publish_run(run_dir: Path, namespace: str, token: str | None = None, private: bool = True, *,
                endpoint: str | None = None, retry: RetryPolicy = RetryPolicy()) -> list[str]:
    """Push the run's final adapters and datasets to `namespace`; returns the repo URLs."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_RECORD).is_file():
        raise SitError(f"{run_dir} holds no run (no run.json)", "pass the --run-dir of a run started with `sit run`")
    config = read_json(run_dir / RUN_RECORD)["config"]
    damaged = verify_run_dir(run_dir)
    if damaged:
        details = "; ".join(f"{stage}: {', '.join(problems[:3])}" for stage, problems in damaged.items())
        raise SitError(f"refusing to publish damaged stages ({details})",
                       f"run `sit run --run-dir {run_dir}` to recompute them, then publish again")
    run_name = config.get("run_name", "run")
    repo_of = {item.stage: f"{namespace}/{run_name}-{item.suffix}" for item in (*ADAPTERS, *DATASETS)}
    ready = {stage for stage in repo_of if _is_done(run_dir, stage)}
    if not ready:
        raise SitError(f"nothing to publish in {run_dir}: no training or data stage has finished",
                       f"finish the run first (`sit run --run-dir {run_dir}`); `sit status` shows where it stands")

    def mirror(repo_id: str, repo_type: str) -> HubMirror:
        return HubMirror(repo_id, run_dir, token=token, repo_type=repo_type, private=private, endpoint=endpoint,
                         retry=retry, resume_command=f"sit publish --run-dir {run_dir} --namespace {namespace}")

    urls = []
    for ds in DATASETS:
        if ds.stage in ready:
            repo = mirror(repo_of[ds.stage], "dataset")
            card = dataset_card(run_dir, ds, config)
            repo.upload({"data/train.jsonl": _output(run_dir, ds.stage, ds.output), "README.md": card.encode()},
                        f"sit: publish {ds.stage} data")
            urls.append(repo.url)
    for ad in ADAPTERS:
        if ad.stage in ready:
            repo = mirror(repo_of[ad.stage], "model")
            dataset_repo = repo_of[ad.trained_on] if ad.trained_on in ready else None
            final, curves = path_of(run_dir, Read(ad.stage, "adapter")), path_of(run_dir, Read(ad.stage, "curves"))
            files = {p.relative_to(final).as_posix(): p for p in sorted(final.rglob("*")) if p.is_file()}
            if curves.is_file():
                files[curves.name] = curves
            files["README.md"] = model_card(run_dir, ad, config, repo.repo_id, dataset_repo).encode()
            repo.upload(files, f"sit: publish {ad.stage} adapter")
            urls.append(repo.url)
    log.info("published %d repo(s): %s", len(urls), ", ".join(urls))
    return urls


def _is_done(run_dir: Path, stage: str) -> bool:
    manifest = read_manifest(run_dir, stage)
    return bool(manifest) and manifest.get("status") == "done"


def _output(run_dir: Path, stage: str, output: str) -> Path:
    """The stage's published file, which its manifest must vouch for (so a file the stage no
    longer lists is an explicit error here, not a silently missing dataset)."""
    path = path_of(run_dir, Read(stage, output))
    rel = path.relative_to(run_dir).as_posix()
    if rel not in read_manifest(run_dir, stage).get("outputs", {}):
        raise SitError(f"stage '{stage}' finished without {rel} among its outputs",
                       "rerun that stage (`sit reset` it, then `sit run`) so that it lists the file")
    return path


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


def _metrics(run_dir: Path, stage: str) -> dict:
    """The training metrics of a stage that writes them, else {}."""
    if "metrics" not in declared(stage).writes:
        return {}
    path = path_of(run_dir, Read(stage, "metrics"))
    return read_json(path) if path.is_file() else {}


def _table(values: dict) -> str:
    rows = [(k, v) for k, v in sorted(values.items()) if isinstance(v, (int, float, str, bool)) or v is None]
    if not rows:
        return "_none recorded_\n"
    return "| name | value |\n|---|---|\n" + "".join(
        f"| {k} | {f'{v:.4g}' if isinstance(v, float) else v} |\n" for k, v in rows)


def _config_block(run_dir: Path, stage: str) -> str:
    fingerprint = read_manifest(run_dir, stage).get("fingerprint", {})
    return "```json\n" + json.dumps(fingerprint, indent=2, sort_keys=True, default=str) + "\n```\n"


def _data_lineage(config: dict) -> str:
    models = config.get("models", {})
    responders = ", ".join(f"{m.get('name')} ({m.get('model')})" for m in models.get("response_models", []))
    return (f"- Generator: `{models.get('generator')}`\n"
            f"- Response models for preferences: {responders or 'n/a'}\n"
            f"- Reward: `{models.get('reward_model')}` ({models.get('reward_type')})\n"
            f"- Seed: {config.get('seed')}\n")


def dataset_card(run_dir: Path, ds: Dataset, config: dict) -> str:
    """The README.md of a published dataset."""
    path = _output(run_dir, ds.stage, ds.output)
    n = _count_lines(path)
    stats = read_manifest(run_dir, ds.stage).get("stats", {})
    data = DatasetCardData(
        pretty_name=f"{config.get('run_name', 'run')}: {ds.title}",
        task_categories=["text-generation"],
        language=[config.get("filter", {}).get("language", "en")],
        size_categories=[_size_category(n)],
        tags=["synthetic", "sit", ds.stage],
        configs=[{"config_name": "default", "data_files": "data/train.jsonl"}],
    )
    body = (f"# {ds.title}\n\nMade by sit (Synthetic Instruction Tuner), stage `{ds.stage}`.\n\n"
            f"## How the data were made\n\n{ds.how}\n\n{_data_lineage(config)}\n"
            f"## Size\n\n{n} records in `data/train.jsonl`.\n\n"
            f"## Statistics\n\n{_table(stats)}\n## Metrics\n\n{_table(_metrics(run_dir, ds.stage))}\n"
            f"## Configuration of this stage\n\n{_config_block(run_dir, ds.stage)}")
    return redact(str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")))


def model_card(run_dir: Path, ad: Adapter, config: dict, repo_id: str, dataset_repo: str | None) -> str:
    """The README.md of a published adapter."""
    final = path_of(run_dir, Read(ad.stage, "adapter"))
    training = read_json(final / "training_config.json") if (final / "training_config.json").is_file() else {}
    base = training.get("base_model") or config.get("models", {}).get("target")
    # The Hub validates base_model as a repo id; a local path or an embedded model only goes in the text.
    hub_base = base if isinstance(base, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", base) else None
    data = ModelCardData(base_model=hub_base, library_name="peft", pipeline_tag="text-generation",
                         tags=["sit", "peft", *ad.tags], datasets=[dataset_repo] if dataset_repo else None)
    counts = {k: training[k] for k in ("training_data_size", "validation_data_size") if k in training}
    curves = "![training curves](curves.png)\n\n" if path_of(run_dir, Read(ad.stage, "curves")).is_file() else ""
    body = (f"# {ad.title} of {base}\n\nMade by sit (Synthetic Instruction Tuner), stage `{ad.stage}`, "
            f"on synthetic data{f' ([{dataset_repo}](https://huggingface.co/datasets/{dataset_repo}))' if dataset_repo else ''}.\n\n"
            f"## Use\n\n```python\nfrom peft import AutoPeftModelForCausalLM\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo_id}\")\n```\n\n"
            f"## Training data\n\n{_table(counts)}\n{_data_lineage(config)}\n"
            f"## Metrics\n\n{_table(_metrics(run_dir, ad.stage))}\n{curves}"
            f"## Training results\n\n{_table(training.get('results', {}))}\n"
            f"## Configuration of this stage\n\n{_config_block(run_dir, ad.stage)}")
    return redact(str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")))
