"""Data loader of `sit_mc_local` (lm-eval imports this file by path)."""

import json
from pathlib import Path

DATA = Path(__file__).with_name("data.jsonl")


def load_dataset(**_metadata):
    import datasets

    docs = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
