"""The quality filter: each seed rule on records written to show it, LSH against exact
Jaccard, statistics, deterministic selection and the too-few error."""

from __future__ import annotations

import json
import random

import pytest

from sit_core.driver import run_stage
from sit_core.stages import filter as qf
from sit_core.config import load_config
from sit_core.errors import NotEnoughDataError
from sit_core.store.fileio import read_jsonl

GOOD = ("Photosynthesis is the process plants use to turn light, water and carbon dioxide into sugar "
        "and oxygen. It happens mostly in the leaves, inside chloroplasts, where chlorophyll absorbs light.")


def rec(i: int, instruction: str, response: str = GOOD) -> dict:
    return {"id": i, "instruction": instruction, "response": response}


@pytest.fixture
def fcfg():
    return load_config({}, profile="cpu").filter


def test_length_rule(fcfg):
    assert qf.fails_length(rec(0, "q", "Too short to keep."), fcfg)
    assert not qf.fails_length(rec(0, "q", GOOD), fcfg)
    assert qf.fails_length(rec(0, "q", "word " * 501), fcfg)
    assert not qf.fails_length(rec(0, "q", "word " * 500), fcfg)


def test_repetition_rule(fcfg):
    assert not qf.fails_repetition(rec(0, "q", "very very very good " + GOOD), fcfg)  # 3 in a row is allowed
    assert qf.fails_repetition(rec(0, "q", "very very very very good " + GOOD), fcfg)
    looped = "\n".join(["Step one: mix."] * 4)
    assert qf.fails_repetition(rec(0, "q", looped), fcfg)


def test_refusal_rule_is_case_and_apostrophe_insensitive(fcfg):
    assert qf.fails_refusal(rec(0, "q", "As an AI, I have no opinions. " + GOOD), fcfg)
    assert qf.fails_refusal(rec(0, "q", "i cannot help with that. " + GOOD), fcfg)
    assert qf.fails_refusal(rec(0, "q", "I’m not able to browse. " + GOOD), fcfg)  # curly apostrophe
    assert not qf.fails_refusal(rec(0, "q", GOOD), fcfg)


def test_language_rule(fcfg):
    assert not qf.fails_language(rec(0, "Explain photosynthesis simply.", GOOD), fcfg)
    german = ("Die Photosynthese ist der Vorgang, bei dem Pflanzen Licht, Wasser und Kohlendioxid in Zucker "
              "und Sauerstoff umwandeln. Sie findet vor allem in den Blättern statt.")
    assert qf.fails_language(rec(0, "Erkläre die Photosynthese.", german), fcfg)


def test_near_duplicates_exact_jaccard_threshold():
    texts = ["how do plants make food from sunlight today",
             "how do plants make food from sunlight",      # 7/8 = 0.875 of the first: duplicate
             "write a poem about the sea",
             "write a short poem about the sea at night"]  # 6/9 = 0.67: kept
    assert qf.near_duplicates(texts, 0.8) == [None, 0, None, None]
    assert qf.exact_near_duplicates(texts, 0.8) == [None, 0, None, None]


def test_lsh_agrees_with_exact_jaccard_on_a_test_set():
    rnd = random.Random(7)
    vocab = [f"w{i}" for i in range(400)]
    base = [rnd.sample(vocab, 12) for _ in range(150)]
    texts = []
    for words in base:
        texts.append(" ".join(words))
        if rnd.random() < 0.4:  # a variant that differs in one word (Jaccard 11/13 = 0.85)
            texts.append(" ".join(words[:-1] + [rnd.choice(vocab)]))
    rnd.shuffle(texts)
    lsh = qf.near_duplicates(texts, 0.8)
    exact = qf.exact_near_duplicates(texts, 0.8)
    flagged_lsh = {i for i, d in enumerate(lsh) if d is not None}
    flagged_exact = {i for i, d in enumerate(exact) if d is not None}
    assert flagged_exact, "the test set must contain near-duplicates"
    assert flagged_lsh <= flagged_exact  # candidates are confirmed exactly: no false positives
    recall = len(flagged_lsh) / len(flagged_exact)
    assert recall >= 0.98, f"LSH recall {recall:.3f}"


def test_stage_statistics_selection_and_overlaps(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "generate").mkdir(parents=True)
    topics = ["volcanoes", "tides", "vaccines", "rainbows", "glaciers", "magnets", "bread yeast", "comets",
              "coral reefs", "solar panels", "earthquakes", "honey bees"]
    asks = ["Explain how {} work to a student.", "Why do {} matter for people?", "Give me three facts about {}.",
            "What is the history of {}?"]
    records = [rec(i, asks[i % 4].format(t)) for i, t in enumerate(topics)]
    records[1]["response"] = "Too short."                                    # length
    records[2]["response"] = "no no no no " + GOOD                           # repetition
    records[3]["response"] = "As an AI I cannot say. " + GOOD                # refusal
    records[4]["response"] = "As an AI, short."                              # refusal + length (overlap)
    records[5] = rec(5, "Erkläre bitte die Photosynthese für einen Schüler.",
                     "Die Photosynthese ist der Vorgang, bei dem Pflanzen Licht, Wasser und Kohlendioxid in "
                     "Zucker und Sauerstoff umwandeln. Sie findet vor allem in den Blättern statt, genau dort.")
    records[6]["instruction"] = records[0]["instruction"]                    # near-duplicate of a kept one
    (run_dir / "generate" / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config({"generation": {"num_samples": 12}, "filter": {"target_count": 4, "min_count": 4},
                       "preference": {"num_pairs": 2}}, profile="cpu")
    manifest = run_stage(cfg, run_dir, "filter")
    stats = manifest["stats"]
    assert stats["flagged"] == {"length": 2, "repetition": 1, "refusal": 2, "language": 1, "near_dup": 1}
    assert stats["overlaps"] == {"length+refusal": 1}
    assert stats["survivors"] == 6 and stats["kept"] == 4
    kept = read_jsonl(run_dir / "filter" / "kept.jsonl")
    assert [r["id"] for r in kept] == sorted(r["id"] for r in kept)
    assert {r["id"] for r in kept} <= {0, 7, 8, 9, 10, 11}
    rows = {r["rule"]: r for r in stats["tables"]["rule_statistics"]}
    assert rows["near_dup"]["flagged"] == 1 and rows["kept"]["flagged"] == 4
    # Deterministic: the same seed selects the same records in a fresh run directory.
    other = tmp_path / "again"
    (other / "generate").mkdir(parents=True)
    (other / "generate" / "generated.jsonl").write_text((run_dir / "generate" / "generated.jsonl").read_text())
    run_stage(cfg, other, "filter")
    assert (other / "filter" / "kept.jsonl").read_text() == (run_dir / "filter" / "kept.jsonl").read_text()
    assert manifest["outputs"]["filter/kept.jsonl"]["sha256"]


def test_too_few_survivors_names_the_worst_rule(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "generate").mkdir(parents=True)
    records = [rec(i, f"Tell me fact {i} about birds and their songs", "Short answer.") for i in range(10)]
    (run_dir / "generate" / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config({"generation": {"num_samples": 10}, "filter": {"target_count": 5},
                       "preference": {"num_pairs": 2}}, profile="cpu")
    with pytest.raises(NotEnoughDataError) as e:
        run_stage(cfg, run_dir, "filter")
    assert "removed most is 'length'" in str(e.value) and "filter.length" in str(e.value)
    assert (run_dir / "filter" / "stats.json").exists()  # the statistics survive the failure
    assert not (run_dir / "filter" / "kept.jsonl").exists()  # never an empty training set
