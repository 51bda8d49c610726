"""Negative captions judged without the image: a blind probe, fluency and validity counts.

    pairs = read_pairs("negatives.jsonl")              # ours; SugarCrepe and ARO files too
    report = evaluate_negatives(pairs, encoder="minilm")
    print(format_report(report))

A negative is only useful to the triplet loss (and a benchmark only measures grounding) if it
cannot be told from the real caption **by text alone**. Three measurements, every one per method
(``inverse``, ``swap``, ``llm``, or the anchor's file) and per relation:

**Blind probe** (``blind_probe``): a linear scorer ``s(text) = w·f(text)`` on a frozen sentence
encoder ``f`` is trained so that ``s(caption) > s(negative)`` (logistic regression on the
symmetrised differences ``±(f(caption) − f(negative))``). Pairs are split into ``folds`` groups
by a hash of the caption (2: the issue's "train on half, test on the other half", both ways),
so every pair is scored by a probe that never saw its caption, and all pairs count. The split is
seeded (``split_seed``): the negatives stage's refinement drops by held-out margins on seed 0, so
an evaluation scores on another split (default 1) rather than the one the drops were chosen on.
The number is
**pairwise accuracy**: the share of pairs whose held-out margin ``s(caption) − s(negative)`` is
positive (0.5 = the text gives nothing away), with a 95 % bootstrap interval over captions.
Encoders: ``minilm`` (the bundled all-MiniLM-L6-v2, or any sentence-transformers folder) and
``ngram`` (hashed word uni-/bigrams: a lexical probe, no model). The two disagree where an
artefact is lexical ("without") rather than about meaning.

**Fluency** (``NgramStats.unattested``): the word bigrams a negative has and its caption lacks are
looked up in a reference corpus (the pairs' own captions, plus ``corpus`` files). A bigram is
*unattested* when it never occurs although both words are common enough that it should: the
expected count under independence, ``c(a)·c(b) / N``, is at least ``min_expected`` (Poisson
P(0) ≤ e⁻³ ≈ 5 % at 3). "standing *under front* of" and "holding *off*" a kite are caught this
way; a rare word is never held against a rewrite (no evidence either way).

**Validity** (``validity``): the negative re-parsed with the SVO extractor still carries a relation
between the caption's subject and object — either the same two head nouns with a different
relation (``inverse`` shape), or exchanged (``swap`` shape); otherwise ``invalid``.

The negatives stage uses the same probe to choose and drop negatives (``refine_choices``,
``drop_most_detectable``; sapretrain/curation/negatives.py).

Formats (``read_pairs``, by content): our negatives JSONL (``caption``, ``negative.caption``,
``negative_method``, ``triplet``); SugarCrepe ``{id: {filename, caption, negative_caption}}``
(method ``sugarcrepe/<file stem>``); ARO VG-Relation / VG-Attribution lists
``[{true_caption, false_caption, relation_name | attributes, ...}]`` and COCO/Flickr-Order
lists ``[{caption_options: [true, false, ...]}]`` (method ``aro/<file stem>``).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

ENCODERS = ("minilm", "ngram")
TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class Pair:
    caption: str
    negative: str
    method: str
    relation: str = ""        # the caption's relation (lemma), "" when the format has none
    triplet: dict | None = None  # the caption's triplet (ours), for validity


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def group_key(caption: str) -> str:
    """What keeps pairs of one caption together in a split: the caption, normalised."""
    return " ".join(tokens(caption))


REFINE_SPLIT_SEED = 0  # the negatives stage's refinement (refine_choices)
EVAL_SPLIT_SEED = 1    # evaluate_negatives / sapretrain eval-negatives: another split than the drops'


def fold_of(caption: str, folds: int, seed: int = 0) -> int:
    """The caption's fold; ``seed`` picks one of many independent splits (0: the unsalted hash)."""
    key = group_key(caption) if not seed else f"{seed}\x00{group_key(caption)}"
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % folds


# --------------------------------------------------------------------------- readers


def _relation_of(record: dict) -> str:
    if record.get("relation"):
        return str(record["relation"])
    rel = (record.get("triplet") or {}).get("rel") or {}
    return str(rel.get("lemma") or rel.get("text") or "").lower()


def read_pairs(path: str | Path, method: str | None = None) -> tuple[list[Pair], Counter]:
    """(pairs, skipped counts by reason) of one file of any supported format; ``method`` overrides
    the method name (default: ours per record, ``sugarcrepe/<stem>`` or ``aro/<stem>``)."""
    from sapretrain import storage

    path = str(path)
    text = storage.read_bytes(path).decode("utf-8")
    stem = Path(path.split("?")[0]).name.split(".")[0]
    skipped: Counter = Counter()
    pairs: list[Pair] = []
    stripped = text.lstrip()
    data: Any = None
    if stripped.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON lines: more than one value
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "negative_caption" in v for v in data.values()):
        for row in data.values():
            _add(pairs, skipped, row.get("caption"), row.get("negative_caption"), method or f"sugarcrepe/{stem}")
    elif isinstance(data, list):
        for row in data:
            if not isinstance(row, dict):
                skipped["not an object"] += 1
            elif "caption_options" in row:
                options = row["caption_options"]
                if not isinstance(options, list) or len(options) < 2:
                    skipped["caption_options with fewer than 2 captions"] += 1
                    continue
                for neg in options[1:]:
                    _add(pairs, skipped, options[0], neg, method or f"aro/{stem}")
            elif "true_caption" in row:
                rel = row.get("relation_name") or " ".join(map(str, row.get("attributes") or []))
                _add(pairs, skipped, row.get("true_caption"), row.get("false_caption"), method or f"aro/{stem}",
                     str(rel or ""))
            else:
                skipped["unknown row format"] += 1
    elif isinstance(data, dict) and "negative" in data:
        _add_ours(pairs, skipped, data, method)
    elif data is not None:
        raise ValueError(f"{path}: not a negatives JSONL, SugarCrepe or ARO file")
    else:
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped["bad JSON line"] += 1
                continue
            if not isinstance(record, dict):
                skipped["not an object"] += 1
                continue
            _add_ours(pairs, skipped, record, method)
    return pairs, skipped


def _add_ours(pairs: list[Pair], skipped: Counter, record: dict, method: str | None) -> None:
    neg = record.get("negative")
    if not isinstance(neg, dict):
        skipped["no negative"] += 1
        return
    _add(pairs, skipped, record.get("caption"), neg.get("caption"), method or record.get("negative_method") or "?",
         _relation_of(record), record.get("triplet") if isinstance(record.get("triplet"), dict) else None)


def _add(pairs: list[Pair], skipped: Counter, caption, negative, method: str, relation: str = "",
         triplet: dict | None = None) -> None:
    if not isinstance(caption, str) or not caption.strip():
        skipped["no caption"] += 1
    elif not isinstance(negative, str) or not negative.strip():
        skipped["no negative caption"] += 1
    elif group_key(caption) == group_key(negative):
        skipped["negative equals caption"] += 1
    else:
        pairs.append(Pair(caption.strip(), negative.strip(), method, relation, triplet))


# --------------------------------------------------------------------------- encoders


class NgramEncoder:
    """Hashed word unigrams and bigrams (sparse, L2-normalised): a lexical probe without a model."""

    name = "ngram"

    def __init__(self, n_features: int = 2**18):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.vectorizer = HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False,
                                            token_pattern=TOKEN.pattern, norm="l2")

    def encode(self, texts: Sequence[str]):
        return self.vectorizer.transform(list(texts))


class SentenceEncoder:
    """A sentence-transformers model (``minilm``: the bundled all-MiniLM-L6-v2), L2-normalised."""

    def __init__(self, model: str = "minilm", device: str = "auto", batch_size: int = 256):
        from sapretrain.curation.positives import TextEmbedder

        self.name = model
        self.embedder = TextEmbedder(model, device=device, max_length=64, batch_size=batch_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.embedder.embed(list(texts)).astype(np.float32)


class JointEncoder:
    """Several encoders side by side (``minilm+ngram``): a probe on both sees meaning and words."""

    def __init__(self, encoders: Sequence[Any]):
        self.encoders = list(encoders)
        self.name = "+".join(e.name for e in self.encoders)

    def encode(self, texts: Sequence[str]):
        import scipy.sparse as sp

        return sp.hstack([sp.csr_matrix(e.encode(texts)) for e in self.encoders]).tocsr()


def make_encoder(name: str, device: str = "auto"):
    """``ngram``, ``minilm``, a sentence-transformers folder / hub id, or several joined by ``+``."""
    if "+" in name:
        return JointEncoder([make_encoder(part, device) for part in name.split("+")])
    return NgramEncoder() if name == "ngram" else SentenceEncoder(name, device=device)


# --------------------------------------------------------------------------- blind probe


def _stack_rows(a, b):
    import scipy.sparse as sp

    return sp.vstack([a, b]).tocsr() if sp.issparse(a) else np.concatenate([a, b])


def fit_pair_probe(diffs, c: float = 1.0):
    """A logistic-regression scorer on ``diffs`` = f(caption) − f(negative) rows: returns ``w``."""
    from sklearn.linear_model import LogisticRegression

    n = diffs.shape[0]
    x = _stack_rows(diffs, -diffs)
    y = np.r_[np.ones(n), np.zeros(n)]
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000)
    model.fit(x, y)
    return model.coef_.ravel()


def cross_fitted_margins(captions: Sequence[str], negatives: Sequence[str], encoder, folds: int = 2,
                         c: float = 1.0, groups: Sequence[str] | None = None, seed: int = 0) -> np.ndarray:
    """(N,) held-out margins ``s(caption) − s(negative)``: fold k is scored by a probe trained on
    the other folds (folds by a hash of ``groups``, default the captions, under split ``seed``). A fold with no
    training pairs of both directions gets margin 0 (undecided)."""
    n = len(captions)
    if n == 0:
        return np.zeros(0)
    if folds < 2:
        raise ValueError("folds must be at least 2 (a probe is never scored on its own training pairs)")
    keys = list(groups) if groups is not None else list(captions)
    fold = np.array([fold_of(k, folds, seed) for k in keys])
    texts = list(dict.fromkeys(list(captions) + list(negatives)))
    index = {t: i for i, t in enumerate(texts)}
    feats = encoder.encode(texts)
    ci = np.array([index[t] for t in captions])
    ni = np.array([index[t] for t in negatives])
    diffs = feats[ci] - feats[ni]
    margins = np.zeros(n)
    for k in range(folds):
        test, train = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        if len(test) == 0 or len(train) == 0:
            continue
        w = fit_pair_probe(diffs[train], c)
        margins[test] = np.asarray(diffs[test] @ w).ravel()
    return margins


def bootstrap_ci(correct: np.ndarray, groups: Sequence[str], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``correct`` resampling whole groups (captions)."""
    if len(correct) == 0:
        return (math.nan, math.nan)
    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    g = np.array([ids[x] for x in groups])
    hits = np.bincount(g, weights=correct.astype(float), minlength=len(ids))
    sizes = np.bincount(g, minlength=len(ids)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=n_boot)  # (B, G) counts
    means = (draws @ hits) / np.maximum(draws @ sizes, 1.0)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def refine_choices(captions: Sequence[str], candidates: Sequence[Sequence[str]], encoder, folds: int = 2,
                   rounds: int = 3, c: float = 1.0) -> tuple[list[int], np.ndarray]:
    """Adversarial refinement of one negative per caption among its ``candidates`` (first =
    preferred). A linear probe learns the mean direction of ``f(caption) − f(negative)``; so the
    choices are balanced, by coordinate descent over the captions for ``rounds`` passes, to make
    the summed difference ``S = Σ f(caption) − f(choice)`` as short as possible (each caption takes
    the candidate that minimises ``|S|`` given the others; ties: the earlier one). Returns (choice per caption, held-out margins of the
    choices from probes cross-fitted over ``folds``, grouped by caption)."""
    import scipy.sparse as sp

    n = len(captions)
    if n == 0:
        return [], np.zeros(0)
    if any(not cands for cands in candidates):
        raise ValueError("every caption needs at least one candidate")
    texts = list(dict.fromkeys(list(captions) + [t for cands in candidates for t in cands]))
    index = {t: i for i, t in enumerate(texts)}
    feats = sp.csr_matrix(encoder.encode(texts))
    owner = np.array([i for i, cands in enumerate(candidates) for _ in cands])
    offset = np.r_[0, np.cumsum([len(cands) for cands in candidates])]
    cap_rows = feats[[index[t] for t in captions]]                       # (N, d)
    cand_rows = feats[[index[t] for cands in candidates for t in cands]]  # (C, d)
    diffs = (cap_rows[owner] - cand_rows).tocsr()  # (C, d): one row per candidate
    sq = np.asarray(diffs.multiply(diffs).sum(axis=1)).ravel()
    choice = np.zeros(n, dtype=int)
    total = np.asarray(diffs[offset[:-1]].sum(axis=0)).ravel()  # S, (d,)
    for _ in range(rounds):
        changed = 0
        for i in range(n):
            lo, hi = offset[i], offset[i + 1]
            if hi - lo < 2:
                continue
            cur = lo + choice[i]
            rest = total - diffs[cur].toarray().ravel()
            rows = diffs[lo:hi]
            cost = sq[lo:hi] + 2 * (rows @ rest)  # |rest + d_j|² − |rest|²
            best = int(np.argmin(cost))
            if lo + best != cur:
                total = rest + rows[best].toarray().ravel()
                choice[i] = best
                changed += 1
        if not changed:
            break
    chosen = diffs[offset[:-1] + choice]  # (N, d)
    fold = np.array([fold_of(t, folds, REFINE_SPLIT_SEED) for t in captions])
    margins = np.zeros(n)
    for k in range(folds):
        test, train = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        if len(test) and len(train):
            margins[test] = np.asarray(chosen[test] @ fit_pair_probe(chosen[train], c)).ravel()
    return choice.tolist(), margins


def drop_most_detectable(margins: np.ndarray, max_accuracy: float, min_kept: float) -> list[int]:
    """Indices to drop, largest margin first, until the share of positive margins among the rest
    is ``<= max_accuracy`` or only ``ceil(min_kept · N)`` are left."""
    n = len(margins)
    floor = math.ceil(min_kept * n)
    positive = int((margins > 0).sum())
    drop: list[int] = []
    for k in np.argsort(-margins, kind="stable"):
        left = n - len(drop)
        if left <= floor or left == 0 or positive / left <= max_accuracy:
            break
        drop.append(int(k))
        positive -= int(margins[k] > 0)
    return drop


def read_captions(paths: Iterable[str]) -> Iterator[str]:
    """Captions of caption files: JSONL lines with a ``caption`` field, or plain text lines."""
    from sapretrain import storage

    for path in paths:
        for line in storage.read_bytes(path).decode("utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    caption = json.loads(line).get("caption")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(caption, str):
                    yield caption
            else:
                yield line


# --------------------------------------------------------------------------- fluency


class NgramStats:
    """Word and bigram counts of a corpus of captions, for the unattested-bigram test."""

    def __init__(self, texts: Iterable[str] = ()):
        self.unigrams: Counter = Counter()
        self.bigrams: Counter = Counter()
        self.total = 0
        self.add(texts)

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            words = ["<s>"] + tokens(text) + ["</s>"]
            self.unigrams.update(words)
            self.bigrams.update(zip(words, words[1:]))
            self.total += len(words) - 1

    def __add__(self, other: "NgramStats") -> "NgramStats":
        out = NgramStats()
        out.unigrams = self.unigrams + other.unigrams
        out.bigrams = self.bigrams + other.bigrams
        out.total = self.total + other.total
        return out

    def expected(self, a: str, b: str) -> float:
        return self.unigrams[a] * self.unigrams[b] / self.total if self.total else 0.0

    def unattested(self, negative: str, caption: str, min_expected: float = 3.0) -> list[tuple[str, str]]:
        """Bigrams of ``negative`` not in ``caption`` that the corpus should have but never has."""
        have = set(_bigrams(caption))
        return [bg for bg in _bigrams(negative) if bg not in have and self.bigrams[bg] == 0
                and self.expected(*bg) >= min_expected]


def _bigrams(text: str) -> list[tuple[str, str]]:
    words = ["<s>"] + tokens(text) + ["</s>"]
    return list(zip(words, words[1:]))


# --------------------------------------------------------------------------- validity


def validity(pairs: Sequence[Pair], nlp, batch_size: int = 256) -> list[str]:
    """Per pair ``inverse`` / ``swap`` (the shape the re-parsed negative has) or ``invalid``."""
    from sapretrain.curation.negatives import validate
    from sapretrain.curation.svo import extract_triplets

    need = [p.caption for p in pairs if p.triplet is None]
    caption_triplets = dict(zip(need, (extract_triplets(d) for d in nlp.pipe(need, batch_size=batch_size))))
    negs = [extract_triplets(d) for d in nlp.pipe([p.negative for p in pairs], batch_size=batch_size)]
    out = []
    for p, found in zip(pairs, negs):
        originals = [p.triplet] if p.triplet is not None else caption_triplets.get(p.caption, [])
        shape = "invalid"
        for t in originals:
            if not isinstance(validate(t, found, "inverse"), str):
                shape = "inverse"
                break
            if not isinstance(validate(t, found, "swap"), str):
                shape = "swap"
        out.append(shape)
    return out


# --------------------------------------------------------------------------- report


def _score(idx: np.ndarray, correct: np.ndarray, groups: list[str], flags: dict[str, np.ndarray],
           n_boot: int) -> dict:
    g = [groups[i] for i in idx]
    c = correct[idx]
    out = {"pairs": int(len(idx)), "blind_accuracy": float(c.mean()) if len(idx) else math.nan,
           "ci95": bootstrap_ci(c, g, n_boot) if len(idx) else (math.nan, math.nan)}
    for name, flag in flags.items():
        out[name] = int(flag[idx].sum())
    return out


def evaluate_negatives(pairs: Sequence[Pair], encoder: str | Any = "minilm", folds: int = 2,
                       corpus: Iterable[str] = (), nlp=None, min_expected: float = 3.0,
                       n_boot: int = 1000, min_relation_pairs: int = 20, device: str = "auto",
                       by_method_probe: bool = True, split_seed: int = EVAL_SPLIT_SEED) -> dict:
    """The full report (see the module docstring) of ``pairs`` as a JSON-able dict.

    With ``by_method_probe`` each method is also probed on its own (its own train/test split):
    the probe then learns that method's artefacts, as a model trained on that set would."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    enc = make_encoder(encoder, device) if isinstance(encoder, str) else encoder
    caps = [p.caption for p in pairs]
    groups = [group_key(c) for c in caps]
    stats = NgramStats(dict.fromkeys(caps))
    stats.add(corpus)
    unattested = np.array([bool(stats.unattested(p.negative, p.caption, min_expected)) for p in pairs])
    flags = {"unattested_bigram": unattested}
    if nlp is not None:
        shapes = validity(pairs, nlp)
        flags["invalid"] = np.array([s == "invalid" for s in shapes])
    margins = cross_fitted_margins(caps, [p.negative for p in pairs], enc, folds, groups=groups, seed=split_seed)
    correct = margins > 0
    report: dict[str, Any] = {"encoder": getattr(enc, "name", str(encoder)), "folds": folds, "split_seed": split_seed,
                              "overall": _score(np.arange(len(pairs)), correct, groups, flags, n_boot)}
    methods: dict[str, list[int]] = defaultdict(list)
    relations: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        methods[p.method].append(i)
        if p.relation:
            relations[p.relation].append(i)
    report["methods"] = {}
    for m, idx in sorted(methods.items()):
        row = _score(np.array(idx), correct, groups, flags, n_boot)
        if by_method_probe and len(methods) > 1:
            own = cross_fitted_margins([caps[i] for i in idx], [pairs[i].negative for i in idx], enc, folds,
                                       groups=[groups[i] for i in idx], seed=split_seed) > 0
            row["own_probe_accuracy"] = float(own.mean())
            row["own_probe_ci95"] = bootstrap_ci(own, [groups[i] for i in idx], n_boot)
        report["methods"][m] = row
    report["relations"] = {r: _score(np.array(idx), correct, groups, flags, n_boot)
                           for r, idx in sorted(relations.items(), key=lambda kv: -len(kv[1]))
                           if len(idx) >= min_relation_pairs}
    report["examples"] = [{"caption": pairs[i].caption, "negative": pairs[i].negative, "method": pairs[i].method,
                           "margin": round(float(margins[i]), 3)} for i in np.argsort(-margins)[:10]]
    return report


def format_report(report: dict) -> str:
    """A plain-text table of a report."""
    def row(name: str, r: dict) -> str:
        lo, hi = r["ci95"]
        cells = [f"{name[:32]:<32}", f"{r['pairs']:>7}", f"{r['blind_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"]
        if "own_probe_accuracy" in r:
            cells.append(f"own {r['own_probe_accuracy']:.3f}")
        cells.append(f"unattested {r['unattested_bigram'] / max(r['pairs'], 1):.1%}")
        if "invalid" in r:
            cells.append(f"invalid {r['invalid'] / max(r['pairs'], 1):.1%}")
        return "  ".join(cells)

    lines = [f"blind probe: {report['encoder']} encoder, {report['folds']}-fold by caption, split seed "
             f"{report.get('split_seed', 0)} (0.5 = the text gives nothing away)",
             f"{'':<32}  {'pairs':>7}  accuracy [95% CI]", row("all", report["overall"]), "by method:"]
    lines += ["  " + row(m, r) for m, r in report["methods"].items()]
    if report["relations"]:
        lines.append("by relation:")
        lines += ["  " + row(k, r) for k, r in list(report["relations"].items())[:25]]
    return "\n".join(lines)
