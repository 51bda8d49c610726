"""Relation-triplet precision / recall / F1 of SVO extraction against gold triplets.

    python tools/eval_svo.py --factual ../shared/data/factual/dev.csv --vsr ../shared/data/vsr/zeroshot_dev.jsonl

Normalisation, applied the same way to gold and predicted triplets:

- **subject / object**: the head noun's lemma = the last word of the phrase, lowercased and
  lemmatised as a noun ("bed spread" → spread, "boats" → boat).
- **relation**: lowercased, determiners dropped ("at the right side of" → "at right side of"),
  the first word lemmatised as a verb unless it is a preposition or spatial word ("touching" →
  touch, "contains" → contain, "grow on" → grow on). Predicted relations use the extractor's
  ``rel.lemma`` (so a passive "ridden by" counts as "ride"), gold ones their text.
- **excluded gold**: attribute triples ``( x , is , y )`` and single-entity groups ``( x )``.

A predicted triplet is correct if the normalised triple is in the caption's gold triples
(one-to-one matching; head nouns also match across compound spellings, "wetsuit" ~ "wet
suit" → "suit", "snowboard" ~ "snow board"); precision, recall and F1 are micro-averaged over all triplets.

Gold sets: FACTUAL (csv: caption, scene_graph ``( bike , rest against , box ) , ...`` with
lemmatised predicates and inverted passives) and VSR (jsonl: caption, subj, relation, obj; every
row's triplet is in its caption, true or false, so all rows count).

**Folds** (``evaluate_folds``, ``eval-svo --folds K``): captions are split into K disjoint folds
by a hash of their **image id** (``fold_of``; the caption where a row has none), so all region
captions of one image land in the same fold: regions of one Visual Genome image describe the
same objects in near-identical words, and rules written on one of them would otherwise be
scored on its near-duplicate. The hash (blake2b) does not depend on row order, Python's hash
seed or K's other folds, so a caption keeps its fold when rows are added. Rules are written on
one fold's errors and scored on another (docs/curation.md, "Extraction folds").
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import statistics
from collections import Counter
from functools import lru_cache

from .lexicon import LEMMA_FIXES, RELATIONAL_NOUNS, SPATIAL_HEADS, SPATIAL_PREPS
from .svo import extract_triplets

DETERMINERS = frozenset(("a", "an", "the"))
_GROUP = re.compile(r"\(([^()]*)\)")


class Normaliser:
    """Head-noun and relation normalisation with the pipeline's own rule lemmatizer."""

    def __init__(self, nlp):
        self.nlp = nlp
        self.lemmatizer = nlp.get_pipe("lemmatizer") if "lemmatizer" in nlp.pipe_names else None
        self.noun = lru_cache(maxsize=None)(self._noun)
        self.verb = lru_cache(maxsize=None)(self._verb)

    def _lemma(self, word: str, pos: str) -> str:
        if self.lemmatizer is None:
            return word
        from spacy.tokens import Doc

        doc = Doc(self.nlp.vocab, words=[word])
        doc[0].pos_ = pos
        lemmas = self.lemmatizer.rule_lemmatize(doc[0])
        return lemmas[0] if lemmas else word

    def _noun(self, word: str) -> str:
        return self._lemma(word, "NOUN")

    def _verb(self, word: str) -> str:
        return LEMMA_FIXES.get(word) or self._lemma(word, "VERB")

    def entity(self, phrase: str) -> str:
        words = re.split(r"[\s\-]+", phrase.lower().strip())
        return self.noun(words[-1]) if words and words[-1] else ""

    def relation(self, phrase: str) -> str:
        words = [w for w in phrase.lower().split() if w not in DETERMINERS]
        if words and not (words[0] in SPATIAL_PREPS or words[0] in SPATIAL_HEADS or words[0] in RELATIONAL_NOUNS):
            words[0] = self.verb(words[0])
        return " ".join(words)


def parse_scene_graph(text: str) -> list[tuple[str, str, str]]:
    """FACTUAL ``( s , r , o ) , ...`` → relation triples, attributes and lone entities dropped."""
    out = []
    for group in _GROUP.findall(text or ""):
        parts = [p.strip() for p in group.split(" , ")]
        if len(parts) != 3 or not all(parts) or parts[1] == "is":
            continue
        out.append(tuple(parts))
    return out


def load_factual(path: str) -> list[tuple[str, list]]:
    with open(path, newline="") as f:
        return [(row["caption"], parse_scene_graph(row["scene_graph"])) for row in csv.DictReader(f)]


def factual_keys(path: str) -> list[str]:
    """The fold key of each row of ``load_factual(path)``: its image id, else its caption."""
    with open(path, newline="") as f:
        return [(row.get("image_id") or "").strip() or row["caption"] for row in csv.DictReader(f)]


def fold_of(key: str, k: int) -> int:
    """Fold (0 … k-1) of a caption with fold key ``key``: a stable hash, independent of row order."""
    if k < 1:
        raise ValueError(f"folds must be >= 1, got {k}")
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % k


def split_folds(keys: list[str], k: int) -> list[list[int]]:
    """Row indices of each of ``k`` folds (disjoint, together all rows, in row order)."""
    folds: list[list[int]] = [[] for _ in range(k)]
    for i, key in enumerate(keys):
        folds[fold_of(key, k)].append(i)
    return folds


def load_vsr(path: str) -> list[tuple[str, list]]:
    items = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                items.append((row["caption"], [(row["subj"], row["relation"], row["obj"])]))
    return items


def _same_entity(a: str, b: str) -> bool:
    """Head nouns match, also across compound spellings: "wetsuit" / "suit", "snowboard" / "board"."""
    if a == b:
        return True
    short, long_ = sorted((a, b), key=len)
    return len(short) >= 3 and long_.endswith(short)


def _match(gold: Counter, pred: Counter) -> int:
    """Greedy one-to-one matches between gold and predicted triples (exact ones first)."""
    gold, pred = Counter(gold), Counter(pred)
    hits = sum((gold & pred).values())
    gold, pred = gold - pred, pred - gold
    for g in list(gold.elements()):
        for p in pred:
            if pred[p] and p[1] == g[1] and _same_entity(p[0], g[0]) and _same_entity(p[2], g[2]):
                pred[p] -= 1
                hits += 1
                break
    return hits


def _score(nlp, items: list[tuple[str, list]], batch_size: int = 256) -> list[tuple[int, Counter, Counter]]:
    """Per item: (matches, normalised gold triples, normalised predicted triples)."""
    norm = Normaliser(nlp)
    out = []
    docs = nlp.pipe((c for c, _ in items), batch_size=batch_size)
    for (_, gold), doc in zip(items, docs):
        gold_n = Counter((norm.entity(s), norm.relation(r), norm.entity(o)) for s, r, o in gold)
        pred_n = Counter(
            (norm.entity(t["subj"]["text"]), norm.relation(t["rel"]["lemma"]), norm.entity(t["obj"]["text"]))
            for t in extract_triplets(doc)
        )
        out.append((_match(gold_n, pred_n), gold_n, pred_n))
    return out


def _summarise(items: list[tuple[str, list]], scores: list, max_errors: int) -> dict:
    tp = n_pred = n_gold = 0
    errors = []
    for (caption, _), (hit, gold_n, pred_n) in zip(items, scores):
        tp += hit
        n_pred += sum(pred_n.values())
        n_gold += sum(gold_n.values())
        if (hit < sum(pred_n.values()) or hit < sum(gold_n.values())) and len(errors) < max_errors:
            errors.append({"caption": caption, "missed": sorted(gold_n - pred_n), "wrong": sorted(pred_n - gold_n)})
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "captions": len(items),
        "gold": n_gold,
        "predicted": n_pred,
        "correct": tp,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "errors": errors,
    }


def evaluate(nlp, items: list[tuple[str, list]], batch_size: int = 256, max_errors: int = 10) -> dict:
    """Micro P/R/F1 of ``extract_triplets`` over ``(caption, gold triples)`` items."""
    return _summarise(items, _score(nlp, items, batch_size), max_errors)


def evaluate_folds(nlp, items: list[tuple[str, list]], keys: list[str], k: int, batch_size: int = 256,
                   max_errors: int = 0) -> dict:
    """``evaluate`` on each of ``k`` folds (``split_folds(keys, k)``; one parse of all items).

    Returns ``folds`` (one ``evaluate`` result per fold, plus ``fold``), ``all`` (the whole set)
    and ``spread``: per metric the mean, min, max and population std over the folds.
    """
    if len(keys) != len(items):
        raise ValueError(f"{len(keys)} fold keys for {len(items)} items")
    scores = _score(nlp, items, batch_size)
    folds = []
    for f, idx in enumerate(split_folds(keys, k)):
        r = _summarise([items[i] for i in idx], [scores[i] for i in idx], max_errors)
        folds.append({"fold": f, **r})
    spread = {}
    for metric in ("precision", "recall", "f1"):
        values = [r[metric] for r in folds]
        spread[metric] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                          "std": statistics.pstdev(values)}
    return {"k": k, "folds": folds, "all": _summarise(items, scores, max_errors), "spread": spread}
