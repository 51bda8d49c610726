"""Gold-derived filter labels, and the filter measured against gold relations (FACTUAL).

    rows = load_factual_rows("../shared/data/factual/dev.csv")
    cases = extract_cases(load_nlp(), rows)                    # extractor output + gold, per caption
    labels = gold_labels(cases)                                # the relation_filter label format
    relation_pr(cases)                                         # the extractor alone, as evaluate.py counts
    relation_pr(cases, keep)                                   # extractor + filter (keep: per-caption bools)

**Labels** (``labeler: "gold:factual"``): every triplet the extractor finds in a FACTUAL caption,
1 when it matches the caption's gold scene graph under ``evaluate.py``'s normalisation and
matching (head-noun lemmas, lemmatised relation, one-to-one matches, compound spellings), else 0.
The one-to-one matching is kept: the triplets of a caption are taken in extractor order and one is
1 when it raises ``evaluate._match``'s count, so a second copy of an already-matched gold triple is
0, and the labels of a caption add up to its ``correct`` count in ``evaluate.evaluate``.

**Measurement**: precision = matched / kept triplets, recall = matched / **all** gold relation
triples of the captions (attributes and lone entities excluded, as in ``evaluate.py``), so a
caption with no extracted triplet still counts its gold in the denominator; matches are recounted
with ``evaluate._match`` on the kept triplets of each caption, never taken from the labels.
The precision-yield curve sweeps the keep threshold from the highest score down; yield is both
the recall of gold and the kept fraction of extracted triplets. ROC-AUC of each scorer against
the triplet labels is reported per fold.

**Cross-fitting** (``cross_fit``): captions go to ``k`` folds by a stable hash of their Visual
Genome image (``image_id``, else the caption: the region captions of one image describe the same
objects in near-identical words, so they stay in one fold; the hash ignores file order); fold
``i`` is scored by a model trained on the other folds, whose threshold is chosen on a held-out
share of those folds (``val_fraction``), so every caption is scored by a model that never saw it
and the threshold never sees the fold it is applied to. Pooled numbers sum the folds' counts at
their own thresholds; the pooled curves of learned scores use rank fractions within each fold
(``fold_ranks``: the fold models are not calibrated to each other). Baselines get the same folds
and the same threshold rule:
``relation_prior`` (the training folds' rate of correct triplets for the same relation lemma,
backed off to the relation kind: counts, no learning), ``caption_length`` (shorter captions
first), ``length_then_prior`` (shorter captions first, ties broken by the relation prior) and
``random`` (a random keep at the filter's kept fraction, averaged over draws).
"""
from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .evaluate import Normaliser, _match, parse_scene_graph
from .feature_filter import RelationPrior, inner_fold
from .relation_filter import choose_threshold, split_key
from .svo import extract_triplets

LABELER = "gold:factual"
TARGET = {"precision": 0.85, "recall": 0.60}  # issue 16 item 3: precision >= 0.85 at recall >= 0.60 of gold
METHODS = ("extractor", "filter", "relation_prior", "caption_length", "length_then_prior")


@dataclass
class Case:
    """One FACTUAL caption: its gold relation triples and the extractor's triplets with labels."""

    id: str
    caption: str
    gold: Counter                                   # normalised gold relation triples
    triplets: list[dict] = field(default_factory=list)
    triples: list[tuple] = field(default_factory=list)  # normalised, one per triplet
    labels: list[int] = field(default_factory=list)     # 1 = matches the gold graph
    image_id: str = ""                                  # Visual Genome image: the unit of the splits

    @property
    def group(self) -> str:
        """The split key (``relation_filter.split_key`` with ``split_by=image``)."""
        return split_key({"caption": self.caption, "image_id": self.image_id}, "image")


def load_factual_rows(path: str) -> list[dict]:
    """FACTUAL csv rows as ``{"id", "image_id", "caption", "gold"}`` (gold: ``parse_scene_graph`` triples).

    ``id`` is the ``region_id`` column, else the 1-based row number; ``image_id`` may be empty. Raises ``ValueError`` on a
    file without rows or without the ``caption`` / ``scene_graph`` columns."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"caption", "scene_graph"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a FACTUAL csv (missing columns {sorted(missing)})")
        rows = [{"id": row.get("region_id") or str(n), "image_id": (row.get("image_id") or "").strip(),
                 "caption": row["caption"], "gold": parse_scene_graph(row["scene_graph"])}
                for n, row in enumerate(reader, 1) if (row["caption"] or "").strip()]
    if not rows:
        raise ValueError(f"{path}: no captions")
    return rows


def predicted_triple(norm: Normaliser, triplet: dict) -> tuple[str, str, str]:
    """A triplet as ``evaluate.evaluate`` normalises it (relation from ``rel.lemma``)."""
    return norm.entity(triplet["subj"]["text"]), norm.relation(triplet["rel"]["lemma"]), norm.entity(triplet["obj"]["text"])


def label_triples(gold: Counter, triples: list[tuple]) -> list[int]:
    """1 for each triple that raises the one-to-one match count, in order (see the module docstring)."""
    labels, seen, hits = [], Counter(), 0
    for triple in triples:
        seen[triple] += 1
        now = _match(gold, seen)
        labels.append(int(now > hits))
        hits = now
    return labels


def extract_cases(nlp, rows: list[dict], batch_size: int = 256, progress: bool = False) -> list[Case]:
    """Parse each row's caption, extract, normalise gold and predictions, label."""
    norm = Normaliser(nlp)
    docs = nlp.pipe((r["caption"] for r in rows), batch_size=batch_size)
    if progress:
        from tqdm import tqdm

        docs = tqdm(docs, total=len(rows), desc="extract + label", unit="caption", dynamic_ncols=True)
    cases = []
    for row, doc in zip(rows, docs):
        gold = Counter((norm.entity(s), norm.relation(r), norm.entity(o)) for s, r, o in row["gold"])
        triplets = extract_triplets(doc)
        triples = [predicted_triple(norm, t) for t in triplets]
        cases.append(Case(str(row["id"]), row["caption"], gold, triplets, triples, label_triples(gold, triples),
                          str(row.get("image_id") or "")))
    return cases


def gold_labels(cases: list[Case]) -> list[dict]:
    """Label records (``relation_filter`` format), one per extracted triplet."""
    records = []
    for case in cases:
        for j, (triplet, triple, label) in enumerate(zip(case.triplets, case.triples, case.labels)):
            reason = "matches gold" if label else ("duplicate of a matched triple" if triple in case.gold else "not in the gold graph")
            record = {"id": f"factual-{case.id}-{j}", "caption": case.caption, "triplet": triplet, "label": label,
                      "reason": f"{reason}: ({', '.join(triple)})", "labeler": LABELER}
            if case.image_id:
                record["image_id"] = case.image_id
            records.append(record)
    return records


def label_counts(cases: list[Case]) -> dict:
    """Captions, gold relations, extracted triplets, labels 1/0 (overall and per relation kind)."""
    by_kind: dict[str, list[int]] = {}
    for case in cases:
        for t, label in zip(case.triplets, case.labels):
            by_kind.setdefault(t["rel"].get("kind", "?"), [0, 0])[1 - label] += 1
    positives = sum(sum(c.labels) for c in cases)
    triplets = sum(len(c.triplets) for c in cases)
    return {"captions": len(cases), "captions_without_triplets": sum(not c.triplets for c in cases),
            "gold_relations": sum(sum(c.gold.values()) for c in cases), "triplets": triplets,
            "label_1": positives, "label_0": triplets - positives,
            "by_kind": {k: {"label_1": v[0], "label_0": v[1]} for k, v in sorted(by_kind.items())}}


# --------------------------------------------------------------------------- metrics


def relation_pr(cases: list[Case], keep: list | None = None) -> dict:
    """Micro precision / recall / F1 against all gold relations; ``keep[i]``: bools for case i's triplets."""
    correct = kept = gold = extracted = 0
    for i, case in enumerate(cases):
        mask = [True] * len(case.triples) if keep is None else list(keep[i])
        chosen = Counter(t for t, k in zip(case.triples, mask) if k)
        correct += _match(case.gold, chosen)
        kept += sum(chosen.values())
        gold += sum(case.gold.values())
        extracted += len(case.triples)
    precision = correct / kept if kept else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"captions": len(cases), "gold": gold, "extracted": extracted, "kept": kept, "correct": correct,
            "precision": precision, "recall": recall, "f1": f1,
            "kept_fraction": kept / extracted if extracted else 0.0}


def keep_masks(cases: list[Case], scores: list[np.ndarray], threshold: float) -> list[np.ndarray]:
    return [np.asarray(s) >= threshold for s in scores]


def precision_yield_curve(cases: list[Case], scores: list[np.ndarray]) -> dict[str, list[float]]:
    """Precision, recall of gold and kept fraction as the threshold goes from the top score down.

    One point per distinct score (ties enter together); matches are recounted per caption with
    ``evaluate._match`` as triplets enter, so the points equal ``relation_pr`` at each threshold."""
    flat = [(float(s), i, j) for i, case_scores in enumerate(scores) for j, s in enumerate(case_scores)]
    flat.sort(key=lambda x: -x[0])
    gold = sum(sum(c.gold.values()) for c in cases)
    total = len(flat)
    chosen = [Counter() for _ in cases]
    hits = [0] * len(cases)
    correct = kept = 0
    curve: dict[str, list[float]] = {"threshold": [], "precision": [], "recall": [], "kept_fraction": []}
    for n, (score, i, j) in enumerate(flat):
        chosen[i][cases[i].triples[j]] += 1
        now = _match(cases[i].gold, chosen[i])
        correct += now - hits[i]
        hits[i] = now
        kept += 1
        if n + 1 < total and flat[n + 1][0] == score:
            continue
        curve["threshold"].append(score)
        curve["precision"].append(correct / kept)
        curve["recall"].append(correct / gold if gold else 0.0)
        curve["kept_fraction"].append(kept / total)
    return curve


def meets_target(metrics: dict, target: dict = TARGET) -> bool:
    return metrics["precision"] >= target["precision"] and metrics["recall"] >= target["recall"]


# --------------------------------------------------------------------------- scorers without learning


def relation_prior(train: list[Case], smoothing: float = 2.0) -> Callable[[Case], np.ndarray]:
    """Scores = the training cases' smoothed rate of label 1 for the triplet's relation lemma,
    backed off to its relation kind, then to the overall rate (``feature_filter.RelationPrior``:
    a count table, no learning)."""
    table = RelationPrior(smoothing).fit((t["rel"].get("kind"), triple[1], label) for case in train
                                         for t, triple, label in zip(case.triplets, case.triples, case.labels))

    def score(case: Case) -> np.ndarray:
        return np.array([table.rate(t["rel"].get("kind"), triple[1]) for t, triple in zip(case.triplets, case.triples)],
                        dtype=np.float64)

    return score


def caption_length_score(case: Case) -> np.ndarray:
    """Shorter captions first: score = -words (every triplet of a caption gets the same score)."""
    return np.full(len(case.triplets), -float(len(case.caption.split())))


def length_then(case: Case, prior_scores: np.ndarray) -> np.ndarray:
    """Shorter captions first, ties broken by ``prior_scores`` (rates in [0, 1], halved so that they
    never outrank one word): the two no-learning signals together, still without learning."""
    return caption_length_score(case) + 0.5 * prior_scores


def length_then_prior(prior: Callable[[Case], np.ndarray]) -> Callable[[Case], np.ndarray]:
    """``length_then`` with the scores of ``prior``."""
    return lambda case: length_then(case, prior(case))


def random_keep(cases: list[Case], fraction: float, draws: int = 50, seed: int = 0) -> dict:
    """``relation_pr`` of keeping each triplet with probability ``fraction``: mean and spread over draws."""
    rng = np.random.default_rng(seed)
    runs = [relation_pr(cases, [rng.random(len(c.triples)) < fraction for c in cases]) for _ in range(draws)]
    out = {k: float(np.mean([r[k] for r in runs])) for k in ("precision", "recall", "f1", "kept_fraction")}
    out["precision_std"] = float(np.std([r["precision"] for r in runs]))
    out["recall_std"] = float(np.std([r["recall"] for r in runs]))
    out["draws"] = draws
    return out


# --------------------------------------------------------------------------- operating points and folds


def flat_labels(cases: list[Case]) -> np.ndarray:
    return np.array([label for c in cases for label in c.labels], dtype=np.int64)


def triplet_auc(cases: list[Case], scores: list[np.ndarray]) -> float | None:
    """ROC-AUC of the scores against the triplet labels (``None`` when one class is missing)."""
    from sklearn.metrics import roc_auc_score

    labels = flat_labels(cases)
    if len(set(labels.tolist())) < 2:
        return None
    return float(roc_auc_score(labels, np.concatenate([np.asarray(s, dtype=np.float64) for s in scores])))


def fold_ranks(scores: list[np.ndarray]) -> list[np.ndarray]:
    """Scores → their rank fraction in (0, 1] within this list (ties share the mean rank).

    The models of different folds are not calibrated to each other, so their raw scores are not
    pooled: a pooled curve of rank fractions keeps the same share of each fold at every point."""
    flat = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores]) if scores else np.zeros(0)
    from scipy.stats import rankdata

    ranks = rankdata(flat) / max(len(flat), 1)
    out, start = [], 0
    for s in scores:
        out.append(ranks[start:start + len(s)])
        start += len(s)
    return out


def operating_point(val_cases: list[Case], val_scores: list[np.ndarray], test_cases: list[Case],
                    test_scores: list[np.ndarray], rule: str, min_precision: float, confidence: float = 0.95,
                    threshold: float | None = None) -> dict:
    """Threshold chosen on the validation cases by ``rule`` (or given), then ``relation_pr`` on the test cases."""
    if threshold is None:
        flat = np.concatenate([np.asarray(s, dtype=np.float64) for s in val_scores]) if val_scores else np.zeros(0)
        threshold = choose_threshold(flat_labels(val_cases), flat, rule, min_precision, confidence) if len(flat) else 0.5
    return {"threshold": float(threshold), **relation_pr(test_cases, keep_masks(test_cases, test_scores, threshold))}


def fold_of(key: str, k: int) -> int:
    """The fold of a split key (``Case.group``), from a stable hash (independent of row order)."""
    u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return min(int(u * k), k - 1)


def assign_folds(cases: list[Case], k: int, val_fraction: float) -> list[dict[str, list[Case]]]:
    """For each fold: ``train`` / ``validation`` (of the other folds, by a second hash) / ``test``."""
    from .relation_filter import split_of

    folds = [fold_of(c.group, k) for c in cases]
    out = []
    for i in range(k):
        split = {"train": [], "validation": [], "test": []}
        for case, f in zip(cases, folds):
            if f == i:
                split["test"].append(case)
            else:
                inner = split_of("validation:" + case.group, val_fraction, 0.0)
                split["validation" if inner == "validation" else "train"].append(case)
        out.append(split)
    return out


def prior_for_test(split: dict[str, list[Case]], out_of_fold: int = 0) -> Callable[[Case], np.ndarray]:
    """The relation prior that scores the test cases: fit on train, or with ``out_of_fold`` > 0 on
    train + validation (``threshold_cases``)."""
    return relation_prior(split["train"] + split["validation"] if out_of_fold else split["train"])


def threshold_cases(split: dict[str, list[Case]], out_of_fold: int = 0, split_by: str = "image",
                    ) -> tuple[list[Case], list[np.ndarray], Callable]:
    """The cases whose scores set the thresholds, the relation-prior scores of those cases, and
    the relation prior for the test cases.

    ``out_of_fold`` 0: the validation cases, the prior fit on train. ``k`` > 0 (the features
    filter's protocol): train + validation, each case's prior fit on the other of ``k`` inner folds
    (``feature_filter.inner_fold`` of the ``split_by`` key: the folds the filter's threshold comes
    from), the test cases' prior fit on all of them."""
    prior = prior_for_test(split, out_of_fold)
    if not out_of_fold:
        return split["validation"], [prior(c) for c in split["validation"]], prior
    pool = split["train"] + split["validation"]
    folds = [inner_fold(split_key({"caption": c.caption, "image_id": c.image_id}, split_by), out_of_fold) for c in pool]
    scores: list[np.ndarray] = [np.zeros(0)] * len(pool)
    for i in range(out_of_fold):
        fit = relation_prior([c for c, f in zip(pool, folds) if f != i])
        for n in (n for n, f in enumerate(folds) if f == i):
            scores[n] = fit(pool[n])
    return pool, scores, prior


def evaluate_split(split: dict[str, list[Case]], filter_scores: dict[str, list[np.ndarray]] | None,
                   rule: str, min_precision: float, seed: int = 0, confidence: float = 0.95, out_of_fold: int = 0,
                   filter_threshold: float | None = None, split_by: str = "image") -> dict:
    """Extractor alone, extractor + filter (when ``filter_scores`` has validation and test) and
    the baselines on one (train, validation, test) split of cases. Thresholds come from
    ``threshold_cases(split, out_of_fold, split_by)``; the filter's is ``filter_threshold`` when given (a
    features filter chose it on the same out-of-fold cases itself)."""
    test = split["test"]
    pool, prior_scores, prior = threshold_cases(split, out_of_fold, split_by)
    out = {"sizes": {k: len(v) for k, v in split.items()}, "extractor": relation_pr(test)}
    both = length_then_prior(prior)
    baselines = {"relation_prior": (prior_scores, prior),
                 "caption_length": ([caption_length_score(c) for c in pool], caption_length_score),
                 "length_then_prior": ([length_then(c, p) for c, p in zip(pool, prior_scores)], both)}
    for name, (pool_scores, fn) in baselines.items():
        test_scores = [fn(c) for c in test]
        out[name] = operating_point(pool, pool_scores, test, test_scores, rule, min_precision, confidence)
        out[name]["auc"] = triplet_auc(test, test_scores)
    if filter_scores is not None:
        out["filter"] = operating_point(pool, filter_scores.get("validation", []), test, filter_scores["test"], rule,
                                        min_precision, confidence, filter_threshold)
        out["filter"]["auc"] = triplet_auc(test, filter_scores["test"])
        out["random_at_filter_yield"] = random_keep(test, out["filter"]["kept_fraction"], seed=seed)
    return out


def pooled(folds: list[dict], name: str) -> dict:
    """Micro totals over the folds' test parts for method ``name`` (counts summed, then ratios)."""
    keys = ("gold", "extracted", "kept", "correct")
    tot = {k: sum(f[name][k] for f in folds) for k in keys}
    precision = tot["correct"] / tot["kept"] if tot["kept"] else 0.0
    recall = tot["correct"] / tot["gold"] if tot["gold"] else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"captions": sum(f[name].get("captions", 0) for f in folds), **tot, "precision": precision, "recall": recall, "f1": f1,
            "kept_fraction": tot["kept"] / tot["extracted"] if tot["extracted"] else 0.0}


def spread(folds: list[dict], name: str) -> dict:
    """Per-fold precision / recall of method ``name``: list, min, max, std."""
    out = {}
    for key in ("precision", "recall", "kept_fraction", "auc"):
        if key not in folds[0][name]:
            continue
        values = [f[name][key] if f[name][key] is not None else float("nan") for f in folds]
        out[key] = {"folds": values, "min": min(values), "max": max(values), "std": float(np.std(values))}
    return out


# --------------------------------------------------------------------------- plot


def save_curves(path: str, curves: dict[str, dict], points: dict[str, dict], target: dict = TARGET, title: str = "") -> None:
    """Precision vs recall of gold and precision vs kept fraction, one line per method, the
    operating points as dots and the target as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, x in zip(axes, ("recall", "kept_fraction")):
        for name, curve in curves.items():
            line, = ax.plot(curve[x], curve["precision"], label=name)
            if name in points:
                ax.scatter([points[name][x]], [points[name]["precision"]], color=line.get_color(), zorder=3)
        for name, point in points.items():
            if name not in curves:
                ax.scatter([point[x]], [point["precision"]], marker="x", color="k" if name == "extractor" else "grey",
                           zorder=3, label=name)
        ax.axhline(target["precision"], color="k", ls="--", lw=0.8)
        if x == "recall":
            ax.axvline(target["recall"], color="k", ls="--", lw=0.8)
        ax.set(xlabel="recall of gold relations" if x == "recall" else "kept fraction of extracted triplets",
               xlim=(0, 1.02), ylim=(0.4, 1.02))
    axes[0].set_ylabel("precision")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title or "relation filter on held-out FACTUAL captions (dashed: target)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- runs


def score_cases(scorer, cases: list[Case]) -> list[np.ndarray]:
    """``scorer.score`` over every triplet of ``cases``, split back per case."""
    samples = [{"caption": c.caption, "triplet": t} for c in cases for t in c.triplets]
    flat = scorer.score(samples)
    out, start = [], 0
    for c in cases:
        out.append(flat[start:start + len(c.triplets)])
        start += len(c.triplets)
    return out


def _curves(cases: list[Case], scores: dict[str, list[np.ndarray]], extractor: dict) -> dict[str, dict]:
    curves = {name: precision_yield_curve(cases, s) for name, s in scores.items()}
    q = np.linspace(0.0, 1.0, 21)[1:]  # a random keep: the extractor's precision, recall scaled by the yield
    curves["random"] = {"kept_fraction": q.tolist(), "precision": [extractor["precision"]] * len(q),
                        "recall": (q * extractor["recall"]).tolist()}
    return curves


def _verdict(report: dict, methods: list[str]) -> dict:
    return {name: meets_target(report[name]) for name in methods if name in report}


def evaluate_model(cases: list[Case], model_dir: str, device: str = "auto", progress: bool = False, nlp=None) -> dict:
    """A trained filter on the FACTUAL captions of its own test split (the model's split config);
    the filter keeps at its saved threshold, the baselines use its threshold rule on what its
    threshold was chosen on (validation; a features filter: out-of-fold train + validation).
    ``nlp``: a loaded spaCy pipeline for a features filter to share."""
    from .relation_filter import TripletScorer, read_filter_config, split_of

    saved = read_filter_config(model_dir)
    cfg = saved.get("config", {})
    split_by = cfg.get("split_by", "caption")
    if split_by not in ("caption", "image"):
        raise ValueError(f"{model_dir} was trained with split_by={split_by}: its test captions are unknown")
    split = {"train": [], "validation": [], "test": []}
    for case in cases:
        key = split_key({"caption": case.caption, "image_id": case.image_id}, split_by)
        split[split_of(key, cfg.get("val_fraction", 0.15), cfg.get("test_fraction", 0.15))].append(case)
    if not split["test"]:
        raise ValueError("no caption of this file falls in the model's test split")
    scorer = TripletScorer(model_dir, device=device, progress=progress, nlp=nlp)
    scores = {"test": score_cases(scorer, split["test"])}
    out_of_fold = cfg.get("threshold_folds", 4) if scorer.kind == "features" else 0
    if not out_of_fold:
        scores["validation"] = score_cases(scorer, split["validation"])
    rule, min_precision = cfg.get("threshold_rule", "max_f1"), cfg.get("min_precision", 0.9)
    report = evaluate_split(split, scores, rule, min_precision, confidence=cfg.get("confidence", 0.95),
                            out_of_fold=out_of_fold, filter_threshold=scorer.threshold, split_by=split_by)
    prior = prior_for_test(split, out_of_fold)
    test = split["test"]
    report["curves"] = _curves(test, {"filter": scores["test"], "relation_prior": [prior(c) for c in test],
                                      "caption_length": [caption_length_score(c) for c in test],
                                      "length_then_prior": [length_then_prior(prior)(c) for c in test]}, report["extractor"])
    report.update(mode="model", model=str(model_dir), kind=scorer.kind, threshold_rule=rule, min_precision=min_precision,
                  target=TARGET, meets_target=_verdict(report, METHODS))
    return report


def cross_fit(cases: list[Case], cfg, k: int, work_dir: str, progress: bool = False, keep_models: bool = False,
              on_fold: Callable[[int, dict], None] | None = None, nlp=None) -> dict:
    """``k``-fold cross-fitted filter (see the module docstring): per-fold and pooled numbers,
    the fold spread, and the out-of-fold precision-yield curves. ``cfg``: a ``FilterConfig`` (its
    ``split_by`` is set to ``image``, as the folds are); ``on_fold(i, result)`` is called as each
    fold finishes; ``nlp``: a loaded spaCy pipeline for a features filter to share."""
    import dataclasses
    import shutil
    from pathlib import Path

    from .relation_filter import TripletScorer, train_filter

    if k < 2:
        raise ValueError(f"cross-fitting needs k >= 2 folds, got {k}")
    cfg = dataclasses.replace(cfg, split_by="image")
    out_of_fold = cfg.threshold_folds if cfg.kind == "features" else 0
    folds, oof = [], {"filter": {}, "relation_prior": {}, "length_then_prior": {}}
    for i, split in enumerate(assign_folds(cases, k, cfg.val_fraction)):
        if not split["test"] or not split["train"] or not split["validation"]:
            raise ValueError(f"fold {i} has an empty part {({n: len(v) for n, v in split.items()})}: more captions or fewer folds")
        out = Path(work_dir) / f"fold{i}"
        labels = {name: gold_labels(split[name]) for name in ("train", "validation", "test")}
        train_filter(cfg, [], str(out), progress=progress, splits=labels, nlp=nlp)
        scorer = TripletScorer(str(out), device=cfg.device, batch_size=cfg.eval_batch_size, nlp=nlp)
        scores = {name: score_cases(scorer, split[name]) for name in (("test",) if out_of_fold else ("validation", "test"))}
        threshold = scorer.threshold if out_of_fold else None
        del scorer
        if not keep_models:
            shutil.rmtree(out, ignore_errors=True)
        result = evaluate_split(split, scores, cfg.threshold_rule, cfg.min_precision, seed=i, confidence=cfg.confidence,
                                out_of_fold=out_of_fold, filter_threshold=threshold)
        folds.append(result)
        if on_fold is not None:
            on_fold(i, result)
        prior = prior_for_test(split, out_of_fold)
        learned = {"filter": fold_ranks(scores["test"]), "relation_prior": fold_ranks([prior(c) for c in split["test"]]),
                   "length_then_prior": fold_ranks([length_then_prior(prior)(c) for c in split["test"]])}
        for n, case in enumerate(split["test"]):
            for name in oof:
                oof[name][id(case)] = learned[name][n]
    methods = list(METHODS)
    report = {"mode": "cross_fit", "kind": cfg.kind,
              "curve_scores": "filter, relation_prior, length_then_prior: rank fraction within their fold",
              "folds_k": k, "threshold_rule": cfg.threshold_rule, "min_precision": cfg.min_precision,
              "confidence": cfg.confidence, "threshold_on": "out_of_fold" if out_of_fold else "validation", "target": TARGET, "folds": folds, "pooled": {name: pooled(folds, name) for name in methods},
              "spread": {name: spread(folds, name) for name in methods}}
    report["pooled"]["random_at_filter_yield"] = random_keep(cases, report["pooled"]["filter"]["kept_fraction"])
    report["meets_target"] = {"pooled": _verdict(report["pooled"], methods),
                              "folds": [meets_target(f["filter"]) for f in folds]}
    scores = {name: [table[id(c)] for c in cases] for name, table in oof.items()}
    scores["caption_length"] = [caption_length_score(c) for c in cases]
    report["curves"] = _curves(cases, scores, report["pooled"]["extractor"])
    fold = {id(c): i for i, split in enumerate(assign_folds(cases, k, cfg.val_fraction)) for c in split["test"]}
    report["out_of_fold"] = [{"id": f"factual-{c.id}-{j}", "fold": fold[id(c)], "label": c.labels[j],  # rank fractions
                              **{name: round(float(scores[name][n][j]), 6) for name in oof}}
                             for n, c in enumerate(cases) for j in range(len(c.triplets))]
    return report
