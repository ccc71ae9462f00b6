"""Data loader and scorer of `sit_ifeval_local`: lm-eval's own IFEval checker.

lm-eval imports this file by path when it builds the task. NLTK's punkt data must be on
the path before lm-eval's IFEval modules import (they download it otherwise).
"""

from pathlib import Path

from sit_core.stages.evaluate.nltk_punkt import ensure_punkt_tab

ensure_punkt_tab()

from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: E402

__all__ = ["agg_inst_level_acc", "load_dataset", "process_results"]

DATA = Path(__file__).with_name("data.jsonl")


def load_dataset(**_metadata):
    """Our prompts as a DatasetDict with a `test` split.

    Every kwargs dict gets every key used anywhere, set to None where unused, as in
    IFEval's own data; the checker drops the None values before building each instruction."""
    import json

    import datasets

    docs = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = sorted({k for doc in docs for kw in doc["kwargs"] for k in kw})
    for doc in docs:
        doc["kwargs"] = [{k: kw.get(k) for k in keys} for kw in doc["kwargs"]]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
