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
"""
from __future__ import annotations

import csv
import json
import re
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


def evaluate(nlp, items: list[tuple[str, list]], batch_size: int = 256, max_errors: int = 10) -> dict:
    """Micro P/R/F1 of ``extract_triplets`` over ``(caption, gold triples)`` items."""
    norm = Normaliser(nlp)
    tp = n_pred = n_gold = 0
    errors = []
    docs = nlp.pipe((c for c, _ in items), batch_size=batch_size)
    for (caption, gold), doc in zip(items, docs):
        gold_n = Counter((norm.entity(s), norm.relation(r), norm.entity(o)) for s, r, o in gold)
        pred_n = Counter(
            (norm.entity(t["subj"]["text"]), norm.relation(t["rel"]["lemma"]), norm.entity(t["obj"]["text"]))
            for t in extract_triplets(doc)
        )
        hit = _match(gold_n, pred_n)
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
