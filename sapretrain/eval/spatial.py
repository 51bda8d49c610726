"""The demo's evidence on held-apart synthetic scenes: does a model tie the caption's relation to
the image, with boxes from a detector, measured so that geometry alone cannot pass for learning?

Held-apart scenes: the ``eval`` split of sapretrain/scenes/synthetic.py (seeds no training scene
uses), one scene per partner pair (even indices). Each scene has a caption ("a red cube is to the
left of a blue sphere") and its **opposite** (same words, objects and template, inverse relation).

**Headline: cross-modal relation accuracy** (``relation_accuracy``): the fraction of scenes whose
image prefers its caption over the opposite one, ``cos(v, u(c)) > cos(v, u(c'))`` (a tie counts as
wrong). ``v`` needs subject/object boxes; they come from a box *condition*:

- ``detector``: a YOLO trained on the train split (sapretrain/eval/scene_detector.py), boxes
  matched to the caption's subject and object words: the headline, what a user would have;
- ``gold``: the generator's boxes (secondary, labelled);
- ``detector + jitter s``: each detector box coordinate moved by N(0, s x box size) (robustness);
- ``detector, swapped``: subject and object boxes exchanged (counterfactual: a model that reads the
  roles from the boxes must change its mind; the **flip rate** is how often it does);
- ``whole frame``: both boxes the whole image (counterfactual: no ROI information at all).

Beside every model, no-learning rows: the **geometry oracle** (relation words of each caption
checked against the boxes: the ceiling a box-reading model can reach) and a **text-only** classifier
(TF-IDF + logistic regression trained to tell train captions from their opposites; it never sees
the image, so it measures what the captions alone give away: about 0.5 here by construction).

**Role-free image probe** (``role_free``): leave-one-out k-NN on the *global* image half
``f_v(image)`` alone (no boxes, no caption), label = where the sphere is relative to the cube (scenes
with one of each): does the image tower itself encode the layout? Beside it: raw pixels.

**Secondary: the relation k-NN probe** (paper Fig. 4; ``knn_accuracy``, ``silhouette``, t-SNE) on
``u`` and on ``v`` with detector boxes, with its own no-learning rows (subject-minus-object box
offsets; TF-IDF of the caption). Those rows score near 1.0: the probe shows how embeddings are
organised, it cannot show that a model learned anything.
"""
from __future__ import annotations

import multiprocessing
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sapretrain.scenes.synthetic import CONFIGURATIONS, OPPOSITE, plan_scene, render_scene
from sapretrain.eval.encode import Encoder, EvalSample

MODALITIES = ("text", "image")
HEADLINE = "detector"
JITTER = (0.1, 0.25)  # box jitter, in units of the box's width / height
TEXT_BASELINE_TRAIN = 4000  # train-split scenes the text-only baseline is fit on


@dataclass
class ProbeSet:
    samples: list[EvalSample]  # image, gold boxes, caption and its triplet
    negatives: list[EvalSample]  # the opposite caption and its triplet (same image and objects)
    labels: list[str]  # the caption's relation (subject relative to object)
    ids: list[str]
    role_free: list[str | None]  # the sphere's configuration relative to the cube; None: same shapes


def _render(index: int) -> tuple[EvalSample, EvalSample, str, str, str | None]:
    scene = render_scene("eval", index)
    a, b = scene.objects
    if a.shape == b.shape:
        role_free = None
    else:  # scene.configuration is of objects[0] relative to objects[1]
        role_free = scene.configuration if a.shape == "sphere" else OPPOSITE[scene.configuration]
    negative = EvalSample(caption=scene.negative["caption"], triplet=scene.negative["triplet"])
    return (EvalSample(scene.image, scene.boxes, scene.caption, scene.triplet), negative, scene.relation,
            scene.id, role_free)


def probe_set(scenes: int = 800, workers: int = 1, progress: bool = True) -> ProbeSet:
    """``scenes`` held-apart scenes (eval split, even indices: one per partner pair)."""
    if scenes < len(CONFIGURATIONS):
        raise ValueError(f"the probe needs at least {len(CONFIGURATIONS)} scenes, got {scenes}")
    indices = [2 * i for i in range(scenes)]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_render, indices, chunksize=16) if pool else map(_render, indices)
        rendered = list(tqdm(results, total=scenes, desc="probe scenes", unit="img", disable=not progress))
    finally:
        if pool:
            pool.close()
            pool.join()
    samples, negatives, labels, ids, role_free = zip(*rendered)
    return ProbeSet(list(samples), list(negatives), list(labels), list(ids), list(role_free))


# --------------------------------------------------------------------------------------------
# Box conditions


def whole_frame(sample: EvalSample) -> dict[str, list[float]]:
    w, h = sample.image.size
    return {"subj": [0.0, 0.0, float(w), float(h)], "obj": [0.0, 0.0, float(w), float(h)]}


def jittered(boxes: dict[str, Sequence[float]], scale: float, rng: np.random.Generator, width: int, height: int
             ) -> dict[str, list[float]]:
    """Each coordinate moved by N(0, scale x the box's width or height), kept inside the image."""
    out = {}
    for part, (x0, y0, x1, y1) in boxes.items():
        w, h = x1 - x0, y1 - y0
        dx0, dx1 = rng.normal(0.0, scale * w, 2)
        dy0, dy1 = rng.normal(0.0, scale * h, 2)
        nx0, nx1 = sorted((min(max(x0 + dx0, 0.0), width), min(max(x1 + dx1, 0.0), width)))
        ny0, ny1 = sorted((min(max(y0 + dy0, 0.0), height), min(max(y1 + dy1, 0.0), height)))
        if nx1 - nx0 < 1 or ny1 - ny0 < 1:  # jittered out of existence: keep the original
            nx0, ny0, nx1, ny1 = x0, y0, x1, y1
        out[part] = [nx0, ny0, nx1, ny1]
    return out


def box_conditions(probe: ProbeSet, detected: list[dict[str, list[float]]] | None,
                   jitter: Sequence[float] = JITTER, seed: int = 0) -> dict[str, list[dict[str, list[float]]]]:
    """Per condition (see the module docstring), the subject/object boxes of every probe scene."""
    conditions: dict[str, list[dict[str, list[float]]]] = {}
    if detected is not None:
        if len(detected) != len(probe.samples):
            raise ValueError(f"{len(detected)} detected box pairs for {len(probe.samples)} scenes")
        conditions[HEADLINE] = [dict(b) for b in detected]
    conditions["gold"] = [dict(s.boxes) for s in probe.samples]
    base = HEADLINE if detected is not None else "gold"
    for scale in jitter:
        rng = np.random.default_rng([seed, int(round(scale * 1000))])
        conditions[f"{base} + jitter {scale:g}"] = [
            jittered(b, scale, rng, *s.image.size) for b, s in zip(conditions[base], probe.samples)]
    conditions[f"{base}, swapped"] = [{"subj": b["obj"], "obj": b["subj"]} for b in conditions[base]]
    conditions["whole frame"] = [whole_frame(s) for s in probe.samples]
    return conditions


def with_boxes(samples: Sequence[EvalSample], boxes: Sequence[dict[str, list[float]]]) -> list[EvalSample]:
    return [replace(s, boxes=b) for s, b in zip(samples, boxes)]


# --------------------------------------------------------------------------------------------
# Cross-modal relation accuracy


def preference(v: torch.Tensor, u_pos: torch.Tensor, u_neg: torch.Tensor) -> torch.Tensor:
    """cos(v, u_pos) - cos(v, u_neg) per scene (N,): > 0 means the image prefers its caption."""
    v, u_pos, u_neg = (F.normalize(x.double(), dim=-1) for x in (v, u_pos, u_neg))
    return (v * u_pos).sum(-1) - (v * u_neg).sum(-1)


def accuracy(margins: torch.Tensor | np.ndarray) -> float:
    """Share of strictly positive margins (a tie is no preference: wrong)."""
    margins = torch.as_tensor(margins)
    return float((margins > 0).double().mean()) if len(margins) else float("nan")


def flip_rate(margins: torch.Tensor | np.ndarray, counterfactual: torch.Tensor | np.ndarray) -> float:
    """Share of scenes whose preference changes sign under the counterfactual boxes (ties: no flip)."""
    a, b = torch.as_tensor(margins), torch.as_tensor(counterfactual)
    return float(((a > 0) & (b < 0) | (a < 0) & (b > 0)).double().mean()) if len(a) else float("nan")


def model_margins(encoder: Encoder, probe: ProbeSet, conditions: dict[str, list[dict[str, list[float]]]]
                  ) -> dict[str, torch.Tensor]:
    """The model's preference margin (N,) under every box condition."""
    u_pos, u_neg = encoder.texts(probe.samples), encoder.texts(probe.negatives)
    margins, shared = {}, None
    for name, boxes in conditions.items():
        if not encoder.uses_boxes and shared is not None:
            margins[name] = shared  # a plain CLIP never reads the boxes: one image pass serves all
            continue
        v = encoder.images(with_boxes(probe.samples, boxes))
        margins[name] = shared = preference(v, u_pos, u_neg)
    return margins


# Spatial words of a relation phrase -> (sideways, away from the camera) of the subject.
_DIRECTION_WORDS = {"left": (-1, 0), "right": (1, 0), "front": (0, -1), "behind": (0, 1), "back": (0, 1)}


def relation_direction(text: str) -> tuple[int, int]:
    """(+1 right / -1 left, +1 behind / -1 in front) named by a relation phrase; (0, 0) if none."""
    dx = dy = 0
    for word in re.findall(r"[a-z]+", text.lower()):
        wx, wy = _DIRECTION_WORDS.get(word, (0, 0))
        dx, dy = dx or wx, dy or wy
    return dx, dy


def geometric_agreement(text: str, boxes: dict[str, Sequence[float]], width: int, height: int) -> float:
    """How well the boxes show the relation phrase: the subject's box-centre offset from the object
    (sideways, over the width) and its bottom-edge offset (the ground contact: further back is
    higher in the image, over the height), each times the direction the phrase names."""
    dx, dy = relation_direction(text)
    s, o = boxes["subj"], boxes["obj"]
    sideways = ((s[0] + s[2]) - (o[0] + o[2])) / 2 / width
    away = (o[3] - s[3]) / height
    return dx * sideways + dy * away


def oracle_margins(probe: ProbeSet, boxes: Sequence[dict[str, list[float]]]) -> np.ndarray:
    """The no-learning geometry oracle's margin per scene: agreement of the caption's relation words
    with the boxes minus that of the opposite caption's."""
    out = []
    for s, n, b in zip(probe.samples, probe.negatives, boxes):
        w, h = s.image.size
        pos = geometric_agreement(_span(s.caption, s.triplet["rel"]), b, w, h)
        neg = geometric_agreement(_span(n.caption, n.triplet["rel"]), b, w, h)
        out.append(pos - neg)
    return np.asarray(out)


def _span(caption: str, part: dict[str, Any]) -> str:
    return caption[part["start"]:part["end"]]


class TextOnlyBaseline:
    """TF-IDF (word 1-2 grams) + logistic regression telling train captions from their opposites.

    It never sees an image: its accuracy is what the caption pairs alone give away (a generator
    whose opposites read oddly, or whose relations are unbalanced, would show up here)."""

    def __init__(self, train_scenes: int = TEXT_BASELINE_TRAIN):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        captions, labels = [], []
        for index in range(train_scenes):
            scene = plan_scene("train", index)
            captions += [scene.caption, scene.negative["caption"]]
            labels += [1, 0]
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), lowercase=True)
        self.model = LogisticRegression(max_iter=2000).fit(self.vectorizer.fit_transform(captions), labels)
        self.train_scenes = train_scenes

    def margins(self, probe: ProbeSet) -> np.ndarray:
        def score(samples):
            return self.model.decision_function(self.vectorizer.transform([s.caption for s in samples]))

        return score(probe.samples) - score(probe.negatives)


# --------------------------------------------------------------------------------------------
# k-NN probes


def knn_accuracy(embeddings: torch.Tensor, labels: Sequence[str], k: int = 10) -> float:
    """Leave-one-out k-NN accuracy under cosine similarity: the ``k`` nearest other points vote,
    ties go to the label with the larger summed similarity."""
    n = len(labels)
    if embeddings.shape[0] != n:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {n} labels")
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got {k}")
    x = F.normalize(torch.as_tensor(embeddings).double(), dim=-1)
    sims = x @ x.T
    sims.fill_diagonal_(-float("inf"))
    top_sims, top = sims.topk(k, dim=1)
    correct = 0
    for i in range(n):
        votes, weight = Counter(), Counter()
        for j, s in zip(top[i].tolist(), top_sims[i].tolist()):
            votes[labels[j]] += 1
            weight[labels[j]] += s
        predicted = max(votes, key=lambda label: (votes[label], weight[label]))
        correct += predicted == labels[i]
    return correct / n


def silhouette(embeddings: torch.Tensor, labels: Sequence[str]) -> float:
    from sklearn.metrics import silhouette_score

    if len(set(labels)) < 2:
        raise ValueError("silhouette needs at least two relation labels")
    return float(silhouette_score(torch.as_tensor(embeddings).double().numpy(), np.asarray(labels), metric="cosine"))


def embed(encoder: Encoder, probe: ProbeSet, boxes: Sequence[dict[str, list[float]]] | None = None
          ) -> dict[str, torch.Tensor]:
    """Text ``u`` (N, 2D), image ``v`` (N, 2D) with ``boxes`` (default: gold), and the global image
    half ``f_v`` (N, D) as "global"."""
    samples = with_boxes(probe.samples, boxes) if boxes is not None else probe.samples
    image = encoder.images(samples, parts=True)
    return {"text": encoder.texts(probe.samples), "image": image["v"], "global": image["image_embed"]}


def score(embeddings: dict[str, torch.Tensor], labels: Sequence[str], k: int = 10) -> dict[str, dict[str, float]]:
    return {m: {"knn_accuracy": knn_accuracy(embeddings[m], labels, k), "silhouette": silhouette(embeddings[m], labels)}
            for m in MODALITIES}


def box_offsets(boxes: Sequence[dict[str, Sequence[float]]], samples: Sequence[EvalSample]) -> torch.Tensor:
    """(N, 4) subject-minus-object box coordinates over the image size: geometry without a model."""
    rows = []
    for b, s in zip(boxes, samples):
        w, h = s.image.size
        rows.append([(b["subj"][i] - b["obj"][i]) / (w if i % 2 == 0 else h) for i in range(4)])
    return torch.tensor(rows, dtype=torch.float64)


def tfidf_captions(probe: ProbeSet) -> torch.Tensor:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return torch.tensor(TfidfVectorizer(ngram_range=(1, 2)).fit_transform([s.caption for s in probe.samples])
                        .toarray())


def raw_pixels(samples: Sequence[EvalSample], size: tuple[int, int] = (32, 24)) -> torch.Tensor:
    """(N, 3 * 32 * 24) downsampled, per-image standardised pixels: the image without a model."""
    rows = []
    for s in samples:
        x = np.asarray(s.image.convert("RGB").resize(size), dtype=np.float64).ravel()
        rows.append((x - x.mean()) / (x.std() + 1e-8))
    return torch.tensor(np.stack(rows))


def role_free(global_embeddings: torch.Tensor, probe: ProbeSet, k: int = 10) -> dict[str, float]:
    """k-NN accuracy of the sphere-vs-cube configuration from the global image half alone."""
    keep = [i for i, label in enumerate(probe.role_free) if label is not None]
    labels = [probe.role_free[i] for i in keep]
    return {"knn_accuracy": knn_accuracy(global_embeddings[keep], labels, k), "scenes": len(keep)}


def tsne_plot(embeddings: dict[str, dict[str, torch.Tensor]], labels: Sequence[str], path: str,
              seed: int = 0) -> None:
    """One t-SNE panel per (model, modality): rows are models, columns text / image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    names = list(embeddings)
    fig, axes = plt.subplots(len(names), len(MODALITIES), figsize=(5 * len(MODALITIES), 4.4 * len(names)),
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    label_array = np.asarray(labels)
    for r, name in enumerate(names):
        for c, modality in enumerate(MODALITIES):
            ax = axes[r][c]
            x = F.normalize(embeddings[name][modality].double(), dim=-1).numpy()
            perplexity = min(30.0, (len(x) - 1) / 3)
            points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                          metric="cosine", max_iter=500).fit_transform(x)  # converged well before 1000 here
            for i, relation in enumerate(CONFIGURATIONS):
                mask = label_array == relation
                ax.scatter(points[mask, 0], points[mask, 1], s=7, color=colours(i), label=relation)
            ax.set_title(f"{name}: {modality}")
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2.5, title="relation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_plot(report: dict[str, Any], path: str) -> None:
    """Bars: cross-modal relation accuracy per model and box condition, oracle and chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = report["conditions"]
    rows = {**{label: r["relation_accuracy"] for label, r in report["models"].items()},
            **{label: b["relation_accuracy"] for label, b in report["baselines"].items()}}
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows) * len(conditions) / 3), 4.2))
    width = 0.8 / len(conditions)
    colours = plt.get_cmap("tab10")
    for j, cond in enumerate(conditions):
        xs = [i + (j - (len(conditions) - 1) / 2) * width for i in range(len(rows))]
        ys = [rows[label].get(cond, {}).get("accuracy", float("nan")) for label in rows]
        ax.bar(xs, ys, width=width, color=colours(j), label=cond)
    ax.axhline(0.5, color="gray", lw=1, ls="--")
    ax.set_xticks(range(len(rows)), list(rows), rotation=15)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("image prefers its caption over the opposite")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="boxes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
