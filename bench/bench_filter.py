"""Filter scaling: the whole quality filter on 100,000 synthetic records (goal: <= 60 s on
2 cores), against the exact pairwise Jaccard baseline at 5,000 records, measured in the
same process. Prints figures and ratios; asserts nothing.

    python bench/bench_filter.py [--records 100000] [--baseline 5000]
"""

from __future__ import annotations

import argparse
import random
import time

from sit_core.stages import filter as qf
from sit_core.config import load_config

TOPICS = ["photosynthesis", "volcanoes", "tax returns", "sorting algorithms", "bread baking", "jazz history",
          "marathon training", "quantum computing", "gardening", "budget travel", "chess openings", "climate"]
VERBS = ["Explain", "Summarize", "Compare", "Describe", "List the key facts about", "Give advice on", "Teach me"]


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    vocab = [f"term{i}" for i in range(5000)]
    records = []
    for i in range(n):
        if records and rnd.random() < 0.1:  # near-duplicate of an earlier instruction
            base = rnd.choice(records)["instruction"].split()
            base[rnd.randrange(len(base))] = rnd.choice(vocab)
            instruction = " ".join(base)
        else:
            instruction = f"{rnd.choice(VERBS)} {rnd.choice(TOPICS)} " + " ".join(rnd.sample(vocab, 8))
        response = " ".join(rnd.choice(vocab) for _ in range(rnd.randint(10, 120)))
        if rnd.random() < 0.05:
            response = "As an AI I cannot help. " + response
        records.append({"id": i, "instruction": instruction, "response": f"The answer: {response}."})
    return records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--baseline", type=int, default=5_000)
    args = ap.parse_args()
    cfg = load_config({}, profile="cpu").filter

    small = synthetic_records(args.baseline)
    texts = [r["instruction"] for r in small]
    t0 = time.perf_counter()
    exact = qf.exact_near_duplicates(texts, cfg.diversity.jaccard_threshold)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lsh = qf.near_duplicates(texts, cfg.diversity.jaccard_threshold, cfg.diversity.num_perm)
    lsh_small_s = time.perf_counter() - t0
    agree = sum((a is None) == (b is None) for a, b in zip(exact, lsh)) / len(texts)

    big = synthetic_records(args.records, seed=1)
    qf.language_flags(big[:10], cfg)  # load the language models outside the timing
    t0 = time.perf_counter()
    survivors, _, stats = qf.filter_records(big, cfg)
    full_s = time.perf_counter() - t0

    print(f"exact pairwise Jaccard, {args.baseline:,} records: {exact_s:.2f} s")
    print(f"MinHash LSH dedup,      {args.baseline:,} records: {lsh_small_s:.2f} s "
          f"(speed-up {exact_s / lsh_small_s:.1f}x, agreement with exact {agree:.4f})")
    print(f"full filter (5 rules),  {args.records:,} records: {full_s:.1f} s (goal <= 60 s: "
          f"{'met' if full_s <= 60 else 'missed'}); survivors {len(survivors):,}, flagged {stats['flagged']}")
    projected_exact = exact_s * (args.records / args.baseline) ** 2
    print(f"ratio: full filter at {args.records:,} / exact dedup alone projected to {args.records:,} "
          f"(O(n^2)) = {full_s / projected_exact:.4f}")


if __name__ == "__main__":
    main()
