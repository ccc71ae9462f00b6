"""Stage 2: the quality filter (seed 003's five rules) and deterministic selection.

Rules, each evaluated on every record so the statistics show overlaps:
  length      response word count within [min, max]
  repetition  no word or line repeated more than max_repeat times in a row
  refusal     none of the refusal phrases (case- and apostrophe-insensitive)
  language    instruction and response detected as the configured language (lingua)
  near_dup    instruction word-set Jaccard >= threshold with an earlier record (MinHash LSH
              finds candidates, exact Jaccard confirms, so there are no false positives);
              optionally also cosine >= semantic_threshold on all-MiniLM embeddings

A record is kept when it passes the first four rules and is not a near-duplicate of an
earlier *kept* record, so a bad record never knocks out a good one. The target count is
drawn from the survivors by a seeded hash, then returned in generation order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from functools import lru_cache

from sit_core.config import FilterConfig, SitConfig
from sit_core.errors import NotEnoughDataError
from sit_core.store.fileio import atomic_write_json, atomic_write_text, read_jsonl
from sit_core.contract import Read, Stage
from sit_core.stages import path_of
from sit_core.store.manifest import StageRun

NAME = "filter"
OUTPUT = "kept.jsonl"
STATS = "stats.json"
REMOVED = "removed.jsonl"
RULES = ("length", "repetition", "refusal", "language", "near_dup")
_WORD = re.compile(r"\w+(?:['’]\w+)?", re.UNICODE)


GENERATED = Read("generate", "records")


def fingerprint(cfg: SitConfig) -> dict:
    return {"filter": cfg.fingerprint("filter"), "seed": cfg.seed}


# --- the rules ---------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def fails_length(record: dict, cfg: FilterConfig) -> bool:
    n = len(record["response"].split())
    return not (cfg.length.min <= n <= cfg.length.max)


def longest_run(items: list[str]) -> int:
    return max((len(list(g)) for _, g in itertools.groupby(items)), default=0)


def fails_repetition(record: dict, cfg: FilterConfig) -> bool:
    text = record["response"]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return max(longest_run(words(text)), longest_run(lines)) > cfg.repetition.max_repeat


def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("’", "'").replace("‘", "'")).lower()


def fails_refusal(record: dict, cfg: FilterConfig) -> bool:
    response = _fold(record["response"])
    return any(_fold(phrase) in response for phrase in cfg.refusal_keywords)


@lru_cache(maxsize=4)
def _language_detector(code: str):
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    try:
        wanted = Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
    except AttributeError:
        from sit_core.errors import ConfigError

        raise ConfigError(f"filter.language '{code}' is not an ISO 639-1 language code", "use a code such as 'en'") from None
    # Detecting among all 75 languages costs ~1 GB and adds little: a fixed set of widely
    # used languages is enough to tell "is this English?"
    common = {Language.ENGLISH, Language.GERMAN, Language.FRENCH, Language.SPANISH, Language.PORTUGUESE,
              Language.ITALIAN, Language.DUTCH, Language.RUSSIAN, Language.CHINESE, Language.JAPANESE,
              Language.KOREAN, Language.ARABIC, Language.HINDI, Language.TURKISH, Language.POLISH,
              Language.VIETNAMESE, Language.INDONESIAN, Language.SWEDISH, Language.UKRAINIAN, wanted}
    # Low-accuracy mode (trigrams only) is several times faster and as accurate on texts of
    # more than a sentence or two, which is what the filter sees.
    return wanted, (LanguageDetectorBuilder.from_languages(*common).with_low_accuracy_mode()
                    .with_preloaded_language_models().build())


def _prose(record: dict) -> str:
    # Code blocks read as no language in particular; judge the prose.
    # The first 1,000 characters are plenty to tell the language and bound the cost.
    return re.sub(r"```.*?```", " ", f"{record['instruction']}\n{record['response']}", flags=re.S)[:1000]


def language_flags(records: list[dict], cfg: FilterConfig) -> list[bool]:
    """True where a record is not in the configured language (detected in parallel, in Rust)."""
    wanted, detector = _language_detector(cfg.language)
    texts = [_prose(r) for r in records]
    detected = detector.detect_languages_in_parallel_of(texts)
    return [len(words(t)) >= 3 and lang != wanted for t, lang in zip(texts, detected)]


def fails_language(record: dict, cfg: FilterConfig) -> bool:
    return language_flags([record], cfg)[0]


def shingles(text: str, size: int) -> set[str]:
    toks = words(text)
    if size <= 1 or len(toks) < size:
        return set(toks)
    return {" ".join(toks[i : i + size]) for i in range(len(toks) - size + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class DedupIndex:
    """Word-set shingles and MinHash signatures of a list of texts, computed once (in bulk)
    and queried for near-duplicates as often as needed."""

    def __init__(self, texts: list[str], num_perm: int = 128, shingle_size: int = 1):
        from datasketch import MinHash

        self.num_perm = num_perm
        self.sets = [shingles(t, shingle_size) for t in texts]
        self.signatures = MinHash.bulk([[w.encode() for w in s] or [b""] for s in self.sets],
                                       num_perm=num_perm, seed=1)
        self._matches: dict[float, list[list[int]]] = {}

    def earlier_matches(self, threshold: float) -> list[list[int]]:
        """For each text, the earlier texts with Jaccard >= threshold, in index order. LSH
        proposes candidates in O(n); each is confirmed with exact Jaccard."""
        from datasketch import MinHashLSH

        # Tuned for recall (a lower band threshold, false negatives weighted 19:1): an extra
        # candidate costs one exact Jaccard, a missed duplicate would go unnoticed.
        lsh = MinHashLSH(threshold=threshold * 0.8, num_perm=self.num_perm, weights=(0.05, 0.95))
        matches: list[list[int]] = []
        for i, (s, sig) in enumerate(zip(self.sets, self.signatures)):
            matches.append(sorted(j for j in lsh.query(sig) if jaccard(s, self.sets[j]) >= threshold))
            lsh.insert(i, sig)
        return matches

    def find(self, threshold: float, eligible: list[bool] | None = None) -> list[int | None]:
        """For each text, the first earlier eligible text it near-duplicates, else None."""
        if threshold not in self._matches:
            self._matches[threshold] = self.earlier_matches(threshold)
        return [next((j for j in m if eligible is None or eligible[j]), None) for m in self._matches[threshold]]


def near_duplicates(texts: list[str], threshold: float, num_perm: int = 128, shingle_size: int = 1,
                    eligible: list[bool] | None = None) -> list[int | None]:
    return DedupIndex(texts, num_perm, shingle_size).find(threshold, eligible)


def exact_near_duplicates(texts: list[str], threshold: float, shingle_size: int = 1) -> list[int | None]:
    """The O(n^2) reference the LSH version is checked (and benchmarked) against."""
    sets = [shingles(t, shingle_size) for t in texts]
    return [next((j for j in range(i) if jaccard(sets[i], sets[j]) >= threshold), None) for i in range(len(sets))]


def semantic_duplicates(texts: list[str], threshold: float, model_ref: str,
                        eligible: list[bool] | None = None) -> list[int | None]:
    from sentence_transformers import SentenceTransformer

    from sit_core.engine.models import resolve_model_path

    model = SentenceTransformer(resolve_model_path(model_ref), device="cpu")
    emb = model.encode(texts, normalize_embeddings=True, convert_to_tensor=True, batch_size=64)
    sims = emb @ emb.T
    out: list[int | None] = []
    for i in range(len(texts)):
        earlier = [j for j in range(i) if (eligible is None or eligible[j]) and float(sims[i, j]) >= threshold]
        out.append(earlier[0] if earlier else None)
    return out


# --- the stage ---------------------------------------------------------------------------


def evaluate_rules(records: list[dict], cfg: FilterConfig, index: DedupIndex) -> list[dict[str, bool]]:
    """Which rules each record fails. near_dup here is against any earlier record."""
    language = language_flags(records, cfg)
    dup_any = index.find(cfg.diversity.jaccard_threshold)
    return [{"length": fails_length(r, cfg), "repetition": fails_repetition(r, cfg), "refusal": fails_refusal(r, cfg),
             "language": lang, "near_dup": dup is not None} for r, lang, dup in zip(records, language, dup_any)]


def select_kept(records: list[dict], flags: list[dict[str, bool]], cfg: FilterConfig,
                index: DedupIndex) -> tuple[list[int], dict]:
    clean = [not any(f[r] for r in RULES if r != "near_dup") for f in flags]
    dup_of_kept = index.find(cfg.diversity.jaccard_threshold, eligible=clean)
    semantic = [None] * len(records)
    if cfg.diversity.semantic:
        eligible = [c and d is None for c, d in zip(clean, dup_of_kept)]
        semantic = semantic_duplicates([r["instruction"] for r in records], cfg.diversity.semantic_threshold,
                                       cfg.diversity.semantic_model, eligible)
    survivors = [i for i in range(len(records)) if clean[i] and dup_of_kept[i] is None and semantic[i] is None]
    return survivors, {"near_dup_of_kept": sum(1 for c, d in zip(clean, dup_of_kept) if c and d is not None),
                       "semantic_dup": sum(1 for c, d, s in zip(clean, dup_of_kept, semantic)
                                           if c and d is None and s is not None)}


def filter_records(records: list[dict], cfg: FilterConfig) -> tuple[list[int], list[dict[str, bool]], dict]:
    """All rules over all records: (survivor indices, per-record flags, statistics)."""
    index = DedupIndex([r["instruction"] for r in records], cfg.diversity.num_perm, cfg.diversity.shingle_size)
    flags = evaluate_rules(records, cfg, index)
    survivors, dedup = select_kept(records, flags, cfg, index)
    return survivors, flags, {"input": len(records), "survivors": len(survivors), **rule_statistics(flags), **dedup}


def rule_statistics(flags: list[dict[str, bool]]) -> dict:
    flagged = {r: sum(f[r] for f in flags) for r in RULES}
    first = {r: 0 for r in RULES}
    for f in flags:
        for r in RULES:
            if f[r]:
                first[r] += 1
                break
    overlaps = {f"{a}+{b}": sum(1 for f in flags if f[a] and f[b]) for a, b in itertools.combinations(RULES, 2)}
    return {"flagged": flagged, "removed_first": first, "overlaps": {k: v for k, v in overlaps.items() if v}}


def _rank(seed: int, record_id: int) -> str:
    return hashlib.sha256(f"{seed}:filter:{record_id}".encode()).hexdigest()


def run(cfg: SitConfig, stage: StageRun) -> dict:
    fc = cfg.filter
    records = read_jsonl(path_of(stage.run_dir, GENERATED))
    survivors, flags, stats = filter_records(records, fc)
    needed = fc.min_count or fc.target_count
    if len(survivors) < needed:
        worst = max(stats["flagged"], key=stats["flagged"].get)
        atomic_write_json(stage.dir / STATS, stats)
        stage.event("too_few_survivors", survivors=len(survivors), needed=needed)
        raise NotEnoughDataError(
            f"only {len(survivors)} of {len(records)} records pass the quality filter; {needed} are needed. "
            f"The rule that removed most is '{worst}' ({stats['flagged'][worst]} records); per rule: "
            + ", ".join(f"{k}={v}" for k, v in stats["flagged"].items()),
            f"generate more samples (generation.num_samples), relax filter.{_rule_key(worst)}, or lower "
            "filter.min_count; statistics are in filter/stats.json",
        )
    chosen = sorted(sorted(survivors, key=lambda i: _rank(cfg.seed, records[i]["id"]))[: fc.target_count])
    kept = [records[i] for i in chosen]
    stats["kept"] = len(kept)
    stats["tables"] = {"rule_statistics": filter_table(stats)}
    out = stage.dir / OUTPUT
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in kept))
    removed_path = stage.dir / REMOVED
    surviving = set(survivors)
    removed = [{"id": records[i]["id"], "rules": [r for r in RULES if flags[i][r]]}
               for i in range(len(records)) if i not in surviving]
    atomic_write_text(removed_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in removed))
    stats_path = stage.dir / STATS
    atomic_write_json(stats_path, stats)
    stage.progress(len(kept), fc.target_count)
    return stage.finish([out, removed_path, stats_path], stats)


def _rule_key(rule: str) -> str:
    return {"length": "length", "repetition": "repetition.max_repeat", "refusal": "refusal_keywords",
            "language": "language", "near_dup": "diversity.jaccard_threshold"}[rule]


def filter_table(stats: dict) -> list[dict]:
    """Rows for the UI: one per rule."""
    return [{"rule": r, "flagged": stats["flagged"][r], "removed (first failing rule)": stats["removed_first"][r]}
            for r in RULES] + [{"rule": "kept", "flagged": stats.get("kept", 0), "removed (first failing rule)": ""}]


STAGE = Stage(
    name=NAME,
    reads=(GENERATED,),
    writes={"kept": OUTPUT, "removed": REMOVED, "stats": STATS},
    fingerprint=fingerprint,
    work=run,
)
