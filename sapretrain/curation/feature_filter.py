"""The relation filter's ``kind: features``: gradient-boosted trees on how a triplet sits in its caption's parse.

    model = FeatureFilter(cfg).fit(records)       # records: {"caption", "triplet", "label"} (relation_filter format)
    model.score([{"caption": "a dog on a couch", "triplet": t}])   # (N,) P(correct)
    model.save("models/filter"); FeatureFilter.load("models/filter")

**Why**: the text kind (a BERT pair classifier, paper §2.1) needs thousands of labels to learn what
a wrong extraction looks like. What goes wrong is mostly structural: a long caption with several
clauses, an object span that swallowed a verb ("orange shirt brushing teeth"), a subject attached
across a conjunction, a relation read off a possessive ("his hand" → have). Those are a few dozen
numbers of the spaCy parse, and a small tree ensemble learns them from hundreds of labels, on a
CPU, in seconds.

**Features** (``FEATURES``, one row per triplet; ``NaN`` where a span cannot be found in the
caption — the trees route missing values): caption size (tokens, noun chunks, prepositions, verbs,
punctuation, a relative or adjectival clause), span sizes and the verbs / prepositions inside the
subject and object spans, token gaps and dependency-path lengths between subject, relation and
object heads, pronoun / plural / conjunct / out-of-vocabulary heads, the subject's position,
whether the relation is written as such in the caption (not read off "'s", "of", "his", "in"), the
relation kind, the dependency labels of the subject and object heads, the part of speech of the
relation's first word, and ``relation_prior``: the training labels' smoothed rate of correct
triplets for the relation lemma, backed off to its kind (``RelationPrior``, a count table).
Nothing in them names a word of a particular caption.

**Threshold**: cheap training allows what a held-out share cannot: ``threshold_folds`` inner
folds over the train and validation labels (by the split key, ``relation_filter.split_key``), each
scored by a model fit on the others, and the threshold chosen on those out-of-fold scores by
``threshold_rule`` (``relation_filter.choose_threshold``). The saved model is then fit on all of
train + validation; the test split is only reported.

**Saved**: ``model.joblib`` (the scikit-learn trees; like any pickle, load only folders you trust)
and ``filter_config.json`` (``kind: features``, threshold, the prior table, feature names, spaCy
model, metrics, full config).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .svo import extract_triplets

MODEL_FILE = "model.joblib"
KINDS = ("spatial", "action")
DEPS = ("nsubj", "nsubjpass", "dobj", "pobj", "ROOT", "conj", "appos", "compound", "attr", "npadvmod", "other")
REL_POS = ("ADP", "VERB", "AUX", "NOUN", "ADV", "PRON", "PART")
FEATURES = (
    "caption_tokens", "caption_triplets", "caption_noun_chunks", "caption_adpositions", "caption_verbs", "caption_punct", "caption_clause",
    "subj_tokens", "rel_tokens", "obj_tokens", "subj_verbs", "obj_verbs", "obj_adpositions",
    "gap_subj_rel", "gap_rel_obj", "obj_before_subj", "path_subj_obj", "path_subj_rel", "path_rel_obj",
    "subj_pronoun", "obj_pronoun", "subj_plural", "obj_plural", "subj_conjunct", "obj_conjunct", "subj_oov", "obj_oov",
    "subj_position", "rel_written",
    *(f"kind_{k}" for k in KINDS), *(f"subj_dep_{d}" for d in DEPS), *(f"obj_dep_{d}" for d in DEPS),
    *(f"rel_pos_{p}" for p in REL_POS), "relation_prior")


def relation_key(triplet: dict) -> tuple[str, str]:
    """(kind, lemma) of a triplet's relation: ``rel.lemma`` (else its text), lowercased, spaces collapsed."""
    rel = triplet["rel"]
    lemma = rel.get("lemma") or rel.get("text") or ""
    return str(rel.get("kind") or ""), " ".join(str(lemma).lower().split())


class RelationPrior:
    """Smoothed rate of label 1 per relation lemma, backed off to the relation kind, then to the
    overall rate: ``(ones + s * backoff) / (n + s)`` with ``s = smoothing``. A count table, no learning."""

    def __init__(self, smoothing: float = 2.0):
        self.smoothing = smoothing
        self.ones: dict[str, Counter] = {"kind": Counter(), "lemma": Counter()}
        self.counts: dict[str, Counter] = {"kind": Counter(), "lemma": Counter()}
        self.total = [0, 0]

    def fit(self, items) -> "RelationPrior":
        """``items``: (kind, lemma, label) triples."""
        for kind, lemma, label in items:
            for table, key in (("kind", kind), ("lemma", lemma)):
                self.ones[table][key] += int(label)
                self.counts[table][key] += 1
            self.total[0] += int(label)
            self.total[1] += 1
        return self

    def _rate(self, table: str, key: str, backoff: float) -> float:
        n = self.counts[table][key] + self.smoothing
        return (self.ones[table][key] + self.smoothing * backoff) / n if n else backoff

    def rate(self, kind: str, lemma: str) -> float:
        base = self.total[0] / self.total[1] if self.total[1] else 0.5
        return self._rate("lemma", lemma, self._rate("kind", kind, base))

    def to_dict(self) -> dict:
        return {"smoothing": self.smoothing, "total": self.total,
                **{f"{t}_{what}": dict(getattr(self, what)[t]) for t in ("kind", "lemma") for what in ("ones", "counts")}}

    @classmethod
    def from_dict(cls, data: dict) -> "RelationPrior":
        prior = cls(data["smoothing"])
        prior.total = list(data["total"])
        for t in ("kind", "lemma"):
            prior.ones[t] = Counter(data[f"{t}_ones"])
            prior.counts[t] = Counter(data[f"{t}_counts"])
        return prior


# --------------------------------------------------------------------------- features


def _span(doc, caption: str, span: dict):
    """The spaCy span of a triplet part: its character offsets, else its text found in the caption."""
    start, end = span.get("start"), span.get("end")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(caption)):
        text = span.get("text")
        start = caption.find(text) if isinstance(text, str) and text else -1
        if start < 0:
            return None
        end = start + len(text)
    out = doc.char_span(start, end, alignment_mode="expand")
    return out if out is not None and len(out) else None


def _path(a, b) -> int:
    """Dependency-tree distance between tokens ``a`` and ``b`` (edges to their lowest common ancestor)."""
    up_a, up_b = [a, *a.ancestors], [b, *b.ancestors]
    for i, token in enumerate(up_a):
        if token in up_b:
            return i + up_b.index(token)
    return len(up_a) + len(up_b)


def _conjunct(token) -> int:
    return int(token.dep_ == "conj" or any(child.dep_ == "conj" for child in token.children))


def _one_hot(value: str, names: tuple[str, ...]) -> list[float]:
    value = value if value in names else ("other" if "other" in names else "")
    return [float(value == name) for name in names]


def caption_features(doc) -> list[float]:
    """The caption part of a ``FEATURES`` row (the same for every triplet of the caption)."""
    return [len(doc), len(extract_triplets(doc)), len(list(doc.noun_chunks)), sum(t.pos_ == "ADP" for t in doc),
            sum(t.pos_ == "VERB" for t in doc), sum(t.is_punct for t in doc), float(any(t.dep_ in ("relcl", "acl") for t in doc))]


def triplet_features(doc, caption: str, triplet: dict, prior: float = math.nan, caption_row: list[float] | None = None) -> list[float]:
    """The ``FEATURES`` row of ``triplet`` in the parsed ``caption`` (``doc``); ``prior``: its relation
    prior; ``caption_row``: ``caption_features(doc)`` when already computed."""
    nan = math.nan
    n = len(doc)
    row = list(caption_row) if caption_row is not None else caption_features(doc)
    subj, rel, obj = (_span(doc, caption, triplet[k]) for k in ("subj", "rel", "obj"))
    if subj is None or rel is None or obj is None:
        return row + [nan] * (len(FEATURES) - len(row) - 1) + [prior]
    s, o, r = subj.root, obj.root, rel[0]
    verbs = lambda span: sum(t.pos_ in ("VERB", "AUX") for t in span)  # noqa: E731
    lemma = relation_key(triplet)[1].split() or [""]
    written = rel.text.lower().split()[0]
    row += [len(subj), len(rel), len(obj), verbs(subj), verbs(obj), sum(t.pos_ == "ADP" for t in obj),
            rel.start - subj.end, obj.start - rel.end, float(obj.start < subj.start),
            _path(s, o), _path(s, r), _path(r, o),
            float(s.pos_ == "PRON"), float(o.pos_ == "PRON"), float(s.tag_ in ("NNS", "NNPS")), float(o.tag_ in ("NNS", "NNPS")),
            _conjunct(s), _conjunct(o), float(s.is_oov), float(o.is_oov),
            s.i / max(n, 1), float(written[:3] == lemma[0][:3])]
    row += _one_hot(str(triplet["rel"].get("kind") or ""), KINDS)
    row += _one_hot(s.dep_, DEPS) + _one_hot(o.dep_, DEPS) + _one_hot(r.pos_, REL_POS)
    return row + [prior]


# --------------------------------------------------------------------------- model


def inner_fold(key: str, k: int) -> int:
    """The threshold fold of a split key (a salted ``evaluate.fold_of``, independent of the outer splits)."""
    from .evaluate import fold_of

    return fold_of(f"threshold:{key}", k)


class FeatureFilter:
    """``fit`` / ``score`` / ``save`` / ``load`` of the features kind (see the module docstring)."""

    def __init__(self, cfg, nlp=None):
        self.cfg = cfg
        self._nlp = nlp
        self.prior = RelationPrior()
        self.trees = None
        self.threshold = 0.5

    @property
    def nlp(self):
        if self._nlp is None:
            from .svo import load_nlp

            self._nlp = load_nlp(self.cfg.spacy_model or None)
        return self._nlp

    def features(self, samples: list[dict], prior: RelationPrior | None = None) -> np.ndarray:
        """(N, len(FEATURES)) rows of ``samples`` (dicts with ``caption`` and ``triplet``); each caption parsed once."""
        prior = prior or self.prior
        captions = list(dict.fromkeys(s["caption"] for s in samples))
        docs = dict(zip(captions, self.nlp.pipe(captions, batch_size=256)))
        parts = {caption: caption_features(doc) for caption, doc in docs.items()}
        rows = [triplet_features(docs[s["caption"]], s["caption"], s["triplet"], prior.rate(*relation_key(s["triplet"])),
                                 parts[s["caption"]]) for s in samples]
        return np.asarray(rows, dtype=np.float64).reshape(len(samples), len(FEATURES))

    def _trees(self):
        from sklearn.ensemble import HistGradientBoostingClassifier

        c = self.cfg
        return HistGradientBoostingClassifier(max_iter=c.trees, max_depth=c.tree_depth, learning_rate=c.tree_learning_rate,
                                              min_samples_leaf=c.tree_min_leaf, l2_regularization=c.tree_l2,
                                              early_stopping=False, random_state=c.seed)

    def _fit_rows(self, records: list[dict], rows: np.ndarray):
        """Trees fit on ``rows`` of ``records`` (their last column, the prior, refit on these records)."""
        prior = RelationPrior().fit((*relation_key(r["triplet"]), r["label"]) for r in records)
        rows = rows.copy()
        rows[:, -1] = [prior.rate(*relation_key(r["triplet"])) for r in records]
        labels = np.array([r["label"] for r in records], dtype=np.int64)
        if len(set(labels.tolist())) < 2:
            raise ValueError(f"the features filter needs both labels among its {len(records)} training lines")
        return prior, self._trees().fit(rows, labels)

    def out_of_fold(self, records: list[dict], keys: list[str]) -> np.ndarray:
        """Score of each record by a model fit on the other ``threshold_folds`` folds of ``keys``."""
        k = self.cfg.threshold_folds
        folds = np.array([inner_fold(key, k) for key in keys])
        rows = self.features(records, RelationPrior())
        scores = np.full(len(records), np.nan)
        for i in range(k):
            held = np.flatnonzero(folds == i)
            rest = np.flatnonzero(folds != i)
            if not len(held):
                continue
            if not len(rest):
                raise ValueError(f"threshold fold {i} holds every label: more labels or fewer threshold_folds")
            prior, trees = self._fit_rows([records[j] for j in rest], rows[rest])
            held_rows = rows[held].copy()
            held_rows[:, -1] = [prior.rate(*relation_key(records[j]["triplet"])) for j in held]
            scores[held] = trees.predict_proba(held_rows)[:, 1]
        return scores

    def fit(self, records: list[dict]) -> "FeatureFilter":
        self.prior, self.trees = self._fit_rows(records, self.features(records, RelationPrior()))
        return self

    def score(self, samples: list[dict]) -> np.ndarray:
        if not samples:
            return np.zeros(0, dtype=np.float32)
        return self.trees.predict_proba(self.features(samples))[:, 1].astype(np.float32)

    def save(self, output_dir: str, extra: dict[str, Any]) -> None:
        import joblib

        from .relation_filter import FILTER_CONFIG

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.trees, out / MODEL_FILE)
        config = {"kind": "features", "threshold": self.threshold, "features": list(FEATURES),
                  "parser": f"{self.nlp.meta.get('lang', '')}_{self.nlp.meta.get('name', '')}-{self.nlp.meta.get('version', '')}",
                  "prior": self.prior.to_dict(),
                  **extra, "config": dataclasses.asdict(self.cfg)}
        (out / FILTER_CONFIG).write_text(json.dumps(config, indent=1))

    @classmethod
    def load(cls, model_dir: str, config: dict, nlp=None) -> "FeatureFilter":
        import joblib

        from .relation_filter import FilterConfig

        if config.get("features") != list(FEATURES):
            raise ValueError(f"{model_dir}: its features differ from this version's; train it again")
        known = {f.name for f in dataclasses.fields(FilterConfig)}
        model = cls(FilterConfig(**{k: v for k, v in config["config"].items() if k in known}), nlp)
        model.prior = RelationPrior.from_dict(config["prior"])
        model.trees = joblib.load(Path(model_dir) / MODEL_FILE)
        model.threshold = float(config["threshold"])
        return model


def train_feature_filter(cfg, splits: dict[str, list[dict]], output_dir: str, progress: bool = True, nlp=None) -> dict[str, Any]:
    """``relation_filter.train_filter`` for ``kind: features``: the threshold from out-of-fold scores
    of train + validation, the model fit on both, the test split scored; saved to ``output_dir``.
    The metrics' ``validation`` entry is the out-of-fold scores at the threshold."""
    from tqdm import tqdm

    from .relation_filter import binary_metrics, choose_threshold, held_out_reference, save_pr_curve, split_key

    fit_on, test = splits["train"] + splits["validation"], splits["test"]
    model = FeatureFilter(cfg, nlp)
    with tqdm(total=3, desc="train filter (features)", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        labels = np.array([r["label"] for r in fit_on], dtype=np.int64)
        oof = model.out_of_fold(fit_on, [split_key(r, cfg.split_by) for r in fit_on])
        model.threshold = choose_threshold(labels, oof, cfg.threshold_rule, cfg.min_precision, cfg.confidence)
        bar.update(1)
        model.fit(fit_on)
        bar.update(1)
        scored = {"out_of_fold": (labels, oof),
                  "test": (np.array([r["label"] for r in test], dtype=np.int64), model.score(test))}
        bar.update(1)
    metrics = {"threshold": model.threshold, "threshold_rule": cfg.threshold_rule,
               "threshold_on": f"out-of-fold scores of train + validation ({cfg.threshold_folds} folds by {cfg.split_by})",
               "split_sizes": {k: len(v) for k, v in splits.items()},
               "validation": binary_metrics(*scored["out_of_fold"], model.threshold),
               "test": binary_metrics(*scored["test"], model.threshold)}
    model.save(output_dir, {"metrics": metrics, "reference": held_out_reference(oof, [r["caption"] for r in fit_on])})
    (Path(output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_pr_curve(str(Path(output_dir) / "pr_curve.png"), scored, model.threshold)
    return metrics
