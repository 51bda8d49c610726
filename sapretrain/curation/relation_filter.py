"""The relation-triplet filter (paper §2.1): a binary classifier scores every triplet.

    labels, bad = load_labels("seed_labels.jsonl")            # bad lines skipped and counted
    metrics = train_filter(load_config(FilterConfig, "configs/curation/filter.yaml"), labels, "models/filter")
    scorer = TripletScorer("models/filter")
    scorer.score([{"caption": "a dog on a couch", "triplet": t}])  # (N,) P(correct)
    run_stage(FilterStage("models/filter"), "triplets.jsonl", "filtered.jsonl")

**Kinds** (``kind``): ``text`` (the paper's: a BERT-style classifier fine-tuned on the pair
below) or ``features`` (gradient-boosted trees on parse features of the triplet in its caption,
``feature_filter.py``: trains in seconds on a CPU, and is the one that meets the precision
target on held-out FACTUAL captions, where a no-learning rule does as well: docs/curation.md). Both read the same labels and split, and save a folder
that ``TripletScorer`` and ``FilterStage`` load by its ``filter_config.json``.

**Input** of the text kind (``INPUT_FORMAT``): a sentence pair, the caption as text and ``"subj | rel | obj"`` (the
span texts) as text_pair, so a BERT tokenizer gives ``[CLS] caption [SEP] subj | rel | obj [SEP]``
with segment ids telling the two apart. The triplet is never truncated: a long caption is.

**Labels** (the format ``tools/label_seeds.py`` writes): JSONL lines ``{"id", "caption", "triplet":
{"subj": {"text", "start", "end"}, "rel": {..., "kind"}, "obj": {...}}, "label": 0|1, "reason"?,
"labeler"?}``; 1 = the triplet is a correct reading of the caption.

**Split**: deterministic by a hash of ``split_by`` (default the caption, so every triplet of one
caption, including corrupted copies, lands in the same split and the held-out metrics never see a
caption seen in training; ``id`` splits line by line; ``image`` by the record's ``image_id``, so
the region captions of one image, which describe the same objects in near-identical words, stay
together; the caption where there is none). Independent of the seed and of file order.

**Threshold**: chosen on the validation split only (the features kind: on out-of-fold scores of
train + validation, see ``feature_filter.py``) and reported, never tuned, on the test split. Rules
(``choose_threshold``): ``max_f1``, the F1-maximising score; ``min_precision``, the lowest score
whose precision reaches ``min_precision`` (most recall at that precision; max-F1 when no threshold
reaches it); ``precision_bound``, the lowest score whose precision's one-sided Wilson lower bound
at ``confidence`` reaches ``min_precision`` — the point estimate at the chosen threshold is biased
upwards (it is the best of many), and the bound is what makes "precision >= 0.85" hold on new
captions rather than on the labels it was chosen on (the highest bound when none reaches it). A
triplet is kept when ``score >= threshold``.

**Saved model**: the text kind in Hugging Face format (``save_pretrained`` model and tokenizer),
the features kind as ``model.joblib``; both with ``filter_config.json`` (``kind``, threshold,
metrics, full config; the text kind also input format and base model), ``metrics.json`` and
``pr_curve.png``.

**What it keeps of other captions** (``reference`` in ``filter_config.json``, ``yield_warning``):
the held-out scores it was thresholded on (101 quantiles) and the word counts of its training
captions. A filter learns what goes wrong *in its training captions*: trained on FACTUAL's short
Visual Genome regions (median 6 words), where long captions are the ones with wrong triplets, it
drops most triplets of full COCO sentences (about 10 words) for their length alone. ``FilterStage``
(and ``curate``'s report) therefore warns when a run keeps less than ``YIELD_WARNING`` (half) of
the share the filter keeps of its own held-out labels at the threshold used: train it on labels of
captions like the ones being filtered, or set the threshold.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

INPUT_FORMAT = "caption [SEP] subj | rel | obj"
FILTER_CONFIG = "filter_config.json"
SPLITS = ("train", "validation", "test")
YIELD_WARNING = 0.5  # warn when a run keeps < this times the share kept of the held-out labels


@dataclass
class FilterConfig:
    kind: Literal["text", "features"] = "text"  # text: BERT pair classifier; features: trees on parse features
    base_model: str = "bert-base-uncased"  # HF name, local folder, or "pkg:MODULE" (MODULE.get_model_path())
    max_length: int = 128                  # tokens of the pair; the caption is truncated, not the triplet
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 3.0e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1              # fraction of steps of linear warm-up, then linear decay to 0
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_by: Literal["caption", "id", "image"] = "caption"  # image: image_id (else caption), see split_key
    threshold_rule: Literal["max_f1", "min_precision", "precision_bound"] = "max_f1"
    min_precision: float = 0.9             # for threshold_rule = min_precision / precision_bound
    confidence: float = 0.95               # for threshold_rule = precision_bound (one-sided)
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    # kind = features (feature_filter.py)
    spacy_model: str = ""                  # the parser ("": svo.load_nlp's default)
    threshold_folds: int = 4               # inner folds of train + validation whose out-of-fold scores set the threshold
    trees: int = 200                       # boosting iterations
    tree_depth: int = 3
    tree_learning_rate: float = 0.05
    tree_min_leaf: int = 20
    tree_l2: float = 1.0

    def __post_init__(self):
        from sapretrain.config import require

        require(0.0 < self.min_precision <= 1.0, "min_precision", self.min_precision, "must be in (0, 1]")
        require(0.5 <= self.confidence < 1.0, "confidence", self.confidence, "must be in [0.5, 1)")
        require(self.threshold_folds >= 2, "threshold_folds", self.threshold_folds, "must be >= 2")


# --------------------------------------------------------------------------- labels and input


def triplet_text(triplet: dict, caption: str = "") -> str:
    """``"subj | rel | obj"``; a span without ``text`` is cut from ``caption`` by its offsets."""
    parts = []
    for key in ("subj", "rel", "obj"):
        span = triplet[key]
        text = span.get("text")
        if text is None:
            text = caption[span["start"]:span["end"]]
        parts.append(" ".join(str(text).split()))
    return " | ".join(parts)


def _label_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "not_object"
    if not isinstance(record.get("caption"), str) or not record["caption"].strip():
        return "no_caption"
    if record.get("label") not in (0, 1) or isinstance(record.get("label"), bool):
        return "bad_label"
    return None if _valid_triplet(record.get("triplet")) else "bad_triplet"


def load_labels(path: str) -> tuple[list[dict], dict[str, int]]:
    """Valid label records of JSONL ``path`` and the count of skipped lines by reason.

    A line without ``id`` gets ``"line-N"`` (its 1-based line number)."""
    from sapretrain import jsonl

    labels, bad = [], {}
    for number, line in jsonl.iter_lines(path):
        try:
            record = jsonl.parse_value(line)
        except jsonl.BadLine as e:  # the shared reader's reasons: bad_json, bad_encoding, too_deep ...
            record, problem = None, e.reason
        else:
            problem = _label_problem(record)
        if problem:
            bad[problem] = bad.get(problem, 0) + 1
            continue
        record.setdefault("id", f"line-{number}")
        labels.append(record)
    return labels, bad


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """``train``/``validation``/``test`` from a stable hash of ``key`` (not Python's salted hash)."""
    u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + val_fraction else "train"


def split_key(record: dict, split_by: str = "caption") -> str:
    """What a record's split is hashed from: its caption (lowercased, whitespace collapsed), its
    ``id``, or (``image``) its ``image_id`` when it has one, else its caption."""
    if split_by == "id":
        return str(record["id"])
    if split_by == "image" and record.get("image_id") not in (None, ""):
        return f"image:{record['image_id']}"
    return " ".join(record["caption"].lower().split())


def split_labels(labels: list[dict], cfg: FilterConfig) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in labels:
        splits[split_of(split_key(record, cfg.split_by), cfg.val_fraction, cfg.test_fraction)].append(record)
    return splits


# --------------------------------------------------------------------------- model


def resolve_model_path(name: str) -> str:
    """``pkg:MODULE`` → ``MODULE.get_model_path()`` (a model shipped as a Python package); else ``name``."""
    if name.startswith("pkg:"):
        import importlib

        return str(importlib.import_module(name[4:]).get_model_path())
    return name


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def encode(tokenizer, samples: list[dict], max_length: int):
    """Pair encoding of ``samples`` (dicts with ``caption`` and ``triplet``), padded to the longest."""
    return tokenizer([s["caption"] for s in samples], [triplet_text(s["triplet"], s["caption"]) for s in samples],
                     truncation="only_first", max_length=max_length, padding=True, return_tensors="pt")


def _predict(model, tokenizer, samples: list[dict], max_length: int, batch_size: int, device, progress=False) -> np.ndarray:
    """P(label 1) for each sample, in input order; batches are length-sorted to cut padding."""
    import torch

    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["caption"]))
    scores = np.zeros(len(samples), dtype=np.float32)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="score", unit="batch", leave=False)
    model.eval()
    with torch.no_grad():
        for start in starts:
            idx = order[start:start + batch_size]
            batch = encode(tokenizer, [samples[i] for i in idx], max_length).to(device)
            logits = model(**batch).logits.float()  # (B, 2)
            scores[idx] = torch.softmax(logits, dim=-1)[:, 1].cpu().numpy()
    return scores


# --------------------------------------------------------------------------- metrics and threshold


def wilson_lower(correct: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Wilson score lower bound of a proportion ``correct / n`` at ``confidence``."""
    from scipy.stats import norm

    z = float(norm.ppf(confidence))
    n = np.asarray(n, dtype=np.float64)
    p = np.asarray(correct, dtype=np.float64) / n
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: str = "max_f1", min_precision: float = 0.9,
                     confidence: float = 0.95) -> float:
    """The validation threshold (see the module docstring); 0.5 when one class is missing."""
    from sklearn.metrics import precision_recall_curve

    if len(set(labels.tolist())) < 2:
        return 0.5
    if rule == "precision_bound":
        order = np.argsort(-scores, kind="stable")
        ranked, hits = scores[order], np.cumsum(labels[order])
        ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last index of each distinct score
        bound = wilson_lower(hits[ends], ends + 1, confidence)
        ok = np.flatnonzero(bound >= min_precision)
        best = ok[np.argmax(hits[ends][ok])] if len(ok) else int(np.argmax(bound))
        return float(ranked[ends[best]])
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    if rule == "min_precision":
        ok = np.flatnonzero(precision >= min_precision)
        if len(ok):
            return float(thresholds[ok[np.argmax(recall[ok])]])
    return float(thresholds[int(np.argmax(f1))])


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    pred = scores >= threshold
    tp = int(np.sum(pred & (labels == 1)))
    fp = int(np.sum(pred & (labels == 0)))
    fn = int(np.sum(~pred & (labels == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    auc = float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else None
    return {"n": int(len(labels)), "positives": int(labels.sum()), "precision": precision, "recall": recall,
            "f1": f1, "roc_auc": auc, "accuracy": float(np.mean(pred == (labels == 1))) if len(labels) else None,
            "kept_fraction": float(np.mean(pred)) if len(labels) else None}


def save_pr_curve(path: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (labels, scores) in curves.items():
        if len(set(labels.tolist())) < 2:
            continue
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        ax.plot(recall, precision, label=name)
        at = min(int(np.searchsorted(thresholds, threshold)), len(thresholds) - 1)
        ax.scatter([recall[at]], [precision[at]], marker="o")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title=f"triplet filter (threshold {threshold:.3f}, dot)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- training


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: FilterConfig):
    """Tokenizer and a 2-label classifier from ``cfg.base_model`` (the head is newly initialised)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier.* newly initialised" notice is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, id2label={0: "wrong", 1: "correct"}, label2id={"wrong": 0, "correct": 1})
    finally:
        hf_logging.set_verbosity(verbosity)
    return tokenizer, model


def build_optimizer(model, cfg: FilterConfig, total_steps: int):
    """AdamW (no decay on biases and LayerNorm) with linear warm-up then linear decay to 0."""
    import torch
    from transformers.optimization import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


def train_filter(cfg: FilterConfig, labels: list[dict], output_dir: str, progress: bool = True,
                 splits: dict[str, list[dict]] | None = None, nlp=None) -> dict[str, Any]:
    """Fine-tune (text kind), choose the threshold on validation, save to ``output_dir``; returns the
    metrics. The features kind goes to ``feature_filter.train_feature_filter``.

    ``splits`` (``train`` / ``validation`` / ``test`` label lists) replaces the hash split of
    ``labels`` (then unused), e.g. for the cross-fitted folds of ``filter_eval``; ``nlp``: a loaded
    spaCy pipeline for the features kind to share."""
    # data
    splits = split_labels(labels, cfg) if splits is None else {name: list(splits.get(name, [])) for name in SPLITS}
    train = splits["train"]
    if not train or not splits["validation"]:
        raise ValueError(f"need labelled lines in train and validation, got "
                         f"{ {k: len(v) for k, v in splits.items()} }: more labels or other fractions")
    if cfg.kind == "features":
        from .feature_filter import train_feature_filter

        return train_feature_filter(cfg, splits, output_dir, progress=progress, nlp=nlp)
    import torch

    _seed_everything(cfg.seed)
    device = resolve_device(cfg.device)

    # model, optimizer
    tokenizer, model = build_model(cfg)
    model.to(device)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)

    # loop
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc="train filter", unit="step", dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            batch_samples = [train[i] for i in order[start:start + cfg.batch_size]]
            batch = encode(tokenizer, batch_samples, cfg.max_length).to(device)
            target = torch.tensor([s["label"] for s in batch_samples], device=device)
            loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses))})
    if bar is not None:
        bar.close()

    # eval: threshold from validation only, then both splits at it
    scored = {}
    for name in ("validation", "test"):
        samples = splits[name]
        scores = _predict(model, tokenizer, samples, cfg.max_length, cfg.eval_batch_size, device) if samples else np.zeros(0)
        scored[name] = (np.array([s["label"] for s in samples], dtype=np.int64), scores)
    threshold = choose_threshold(*scored["validation"], cfg.threshold_rule, cfg.min_precision, cfg.confidence)
    metrics = {"threshold": threshold, "threshold_rule": cfg.threshold_rule, "history": history,
               "split_sizes": {k: len(v) for k, v in splits.items()},
               **{name: binary_metrics(*scored[name], threshold) for name in ("validation", "test")}}

    # checkpoint
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    filter_config = {"kind": "text", "threshold": threshold, "input_format": INPUT_FORMAT, "max_length": cfg.max_length,
                     "base_model": cfg.base_model, "base_model_path": resolve_model_path(cfg.base_model),
                     "metrics": metrics, "config": dataclasses.asdict(cfg),
                     "reference": held_out_reference(scored["validation"][1], [s["caption"] for s in train])}
    (out / FILTER_CONFIG).write_text(json.dumps(filter_config, indent=1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_pr_curve(str(out / "pr_curve.png"), scored, threshold)
    return metrics


# --------------------------------------------------------------------------- inference


class TripletScorer:
    """A trained filter folder: ``score(samples)`` → (N,) probabilities that each triplet is correct."""

    def __init__(self, model_dir: str, device: str = "auto", batch_size: int = 128, progress: bool = False, nlp=None):
        self.model_dir = str(model_dir)
        self.config = read_filter_config(self.model_dir)
        self.kind = self.config.get("kind", "text")
        self.threshold = float(self.config["threshold"])
        self.max_length = int(self.config.get("max_length", 128))
        self.batch_size, self.progress = batch_size, progress
        if self.kind == "features":  # nlp: a loaded spaCy pipeline to share, else the model's own
            from .feature_filter import FeatureFilter

            self.model = FeatureFilter.load(self.model_dir, self.config, nlp)
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir).to(self.device).eval()

    def score(self, samples: list[dict]) -> np.ndarray:
        """``samples``: dicts with ``caption`` and ``triplet``."""
        if not samples:
            return np.zeros(0, dtype=np.float32)
        if self.kind == "features":
            return self.model.score(samples)
        return _predict(self.model, self.tokenizer, samples, self.max_length, self.batch_size, self.device, self.progress)


def _valid_triplet(triplet: Any) -> bool:
    return isinstance(triplet, dict) and all(
        isinstance(triplet.get(k), dict) and (isinstance(triplet[k].get("text"), str) or isinstance(triplet[k].get("start"), int))
        for k in ("subj", "rel", "obj"))


def held_out_reference(scores: np.ndarray, train_captions: list[str]) -> dict[str, Any]:
    """``filter_config.json``'s ``reference``: 101 quantiles of the held-out scores the threshold
    was chosen on, their count, and the 10 / 50 / 90 % word counts of the distinct training captions."""
    words = [len(c.split()) for c in set(train_captions)] or [0]
    quantiles = np.quantile(scores, np.linspace(0, 1, 101)) if len(scores) else np.zeros(0)
    return {"held_out": int(len(scores)), "score_quantiles": [round(float(q), 6) for q in quantiles],
            "caption_words": [float(w) for w in np.quantile(words, [0.1, 0.5, 0.9])]}


def yield_warning(reference: dict | None, threshold: float, scored: int, kept: int) -> str | None:
    """A warning when ``kept`` of ``scored`` triplets is under ``YIELD_WARNING`` times the share of
    held-out scores at or above ``threshold`` (``reference`` from ``held_out_reference``); else None."""
    if not reference or not reference.get("score_quantiles") or scored <= 0:
        return None
    expected = float(np.mean(np.asarray(reference["score_quantiles"]) >= threshold))
    share = kept / scored
    if share >= YIELD_WARNING * expected:
        return None
    low, median, high = reference["caption_words"]
    return (f"the filter kept {share:.1%} of {scored} triplets, against {expected:.1%} of its own held-out labels at "
            f"threshold {threshold:.4f}. It learned what goes wrong in captions of {median:.0f} words (10-90 %: "
            f"{low:.0f}-{high:.0f}); on captions of another kind its scores shift (a filter trained on short region "
            f"captions drops long sentences for their length). Train it on labels of captions like these, or set its threshold.")


def read_filter_config(model_dir: str) -> dict:
    path = os.path.join(str(model_dir), FILTER_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: {model_dir} is not a folder written by tools/train_filter.py")
    return json.loads(Path(path).read_text())


class FilterStage:
    """Scores triplets and drops those under the threshold (a ``stage.Stage``).

    Triplet-level records (``caption`` + ``triplet``) are kept with ``filter_score`` or dropped as
    ``low_score`` (score in ``drop_detail``). Caption-level records (``caption`` + ``triplets``
    list) keep the surviving triplets, each with its ``filter_score``; the record gets the best
    score as ``filter_score`` and ``filter_removed`` (triplets removed), and is dropped as
    ``low_score`` when none survives (``no_triplets`` when the list was empty, ``bad_record``
    without a caption or any triplet field).
    """

    name = "relation_filter"

    def __init__(self, model_dir: str, threshold: float | None = None, device: str = "auto", batch_size: int = 128):
        self.model_dir, self.device, self.batch_size = str(model_dir), device, batch_size
        config = read_filter_config(model_dir)
        self.threshold = float(threshold if threshold is not None else config["threshold"])
        self.reference = config.get("reference")  # absent in folders saved before it existed: no yield check
        self.scorer: TripletScorer | None = None

    def setup(self) -> None:
        self.scorer = TripletScorer(self.model_dir, self.device, self.batch_size)

    def fingerprint(self) -> dict:
        path = self.model_dir if "://" in self.model_dir else os.path.abspath(self.model_dir)
        return {"model": path, "threshold": self.threshold}

    def counts(self, kept: list[dict]) -> dict:
        return {"caption_level": sum("triplets" in r and not _valid_triplet(r.get("triplet")) for r in kept)}

    def summarize(self, totals: dict) -> dict:
        return {"caption_level": totals.get("caption_level", 0)}

    def warnings(self, summary: dict) -> list[str]:
        """``yield_warning`` of a finished run of triplet-level records (caption-level ones keep
        a caption while one triplet survives: not comparable)."""
        if summary.get("caption_level"):
            return []
        kept = summary.get("kept", 0)
        note = yield_warning(self.reference, self.threshold, kept + summary.get("dropped", {}).get("low_score", 0), kept)
        return [note] if note else []

    def process(self, records: list[dict]) -> list[dict]:
        if self.scorer is None:
            self.setup()
        samples, owners = [], []  # owners[k] = (record index, triplet index or None)
        for i, r in enumerate(records):
            caption = r.get("caption")
            if not isinstance(caption, str):
                continue
            if _valid_triplet(r.get("triplet")):
                samples.append({"caption": caption, "triplet": r["triplet"]})
                owners.append((i, None))
            elif isinstance(r.get("triplets"), list):
                for j, t in enumerate(r["triplets"]):
                    if not _valid_triplet(t):
                        continue  # malformed list entries are removed (counted in filter_removed)
                    samples.append({"caption": caption, "triplet": t})
                    owners.append((i, j))
        scores = self.scorer.score(samples)
        by_record: dict[int, list[tuple[int | None, float]]] = {}
        for (i, j), s in zip(owners, scores.tolist()):
            by_record.setdefault(i, []).append((j, round(s, 6)))
        return [self._decide(r, by_record.get(i, [])) for i, r in enumerate(records)]

    def _decide(self, record: dict, scored: list[tuple[int | None, float]]) -> dict:
        t = self.threshold
        if not isinstance(record.get("caption"), str) or not (
                _valid_triplet(record.get("triplet")) or isinstance(record.get("triplets"), list)):
            return {**record, "drop_reason": "bad_record", "drop_detail": "needs a caption and a triplet or a triplets list"}
        if _valid_triplet(record.get("triplet")):
            score = scored[0][1]
            if score >= t:
                return {**record, "filter_score": score}
            return {**record, "filter_score": score, "drop_reason": "low_score", "drop_detail": f"score {score:.4f} < {t:.4f}"}
        if not scored:
            return {**record, "drop_reason": "no_triplets"}
        removed = len(record["triplets"])
        kept = [{**record["triplets"][j], "filter_score": s} for j, s in scored if s >= t]
        best = max(s for _, s in scored)
        if not kept:
            return {**record, "filter_score": best, "drop_reason": "low_score",
                    "drop_detail": f"best of {len(scored)} triplets {best:.4f} < {t:.4f}"}
        return {**record, "triplets": kept, "filter_score": best, "filter_removed": removed - len(kept)}
