"""Spatial probe (paper Fig. 4, plus numbers): do a model's embeddings separate the 8 relations?

Held-apart synthetic two-object scenes (the ``eval`` split of sapretrain/data/synthetic.py, whose
seeds no training scene uses) are embedded by the model; each scene's label is the relation of
its caption's subject to its object (front, behind, left, right and the four diagonals). Per
modality (text: ``u`` of the caption; image: ``v`` of the image with its subject/object boxes):

- **k-NN accuracy**: leave-one-out, cosine similarity, the ``k`` nearest other scenes vote
  (ties go to the label with the larger summed similarity). Chance is 1/8.
- **silhouette** of the relation labels (cosine; -1..1, higher = tighter, better separated).
- a **t-SNE** plot coloured by relation.

Only one scene per partner pair is used (even indices): partners share objects and relation, so a
model that only recognises objects would find its partner and look like it knows the relation.
Objects, colours, sizes, materials, camera and caption template vary independently of the
relation, so a high score needs the relation itself.
"""
from __future__ import annotations

import multiprocessing
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sapretrain.data.synthetic import CONFIGURATIONS, render_scene
from sapretrain.eval.encode import Encoder, EvalSample

MODALITIES = ("text", "image")


@dataclass
class ProbeSet:
    samples: list[EvalSample]
    labels: list[str]
    ids: list[str]


def _render(index: int) -> tuple[EvalSample, str, str]:
    scene = render_scene("eval", index)
    return EvalSample(scene.image, scene.boxes, scene.caption, scene.triplet), scene.relation, scene.id


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
    samples, labels, ids = zip(*rendered)
    return ProbeSet(list(samples), list(labels), list(ids))


def knn_accuracy(embeddings: torch.Tensor, labels: Sequence[str], k: int = 10) -> float:
    """Leave-one-out k-NN accuracy under cosine similarity (see the module docstring)."""
    n = len(labels)
    if embeddings.shape[0] != n:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {n} labels")
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got {k}")
    x = F.normalize(embeddings.double(), dim=-1)
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
    return float(silhouette_score(embeddings.double().numpy(), np.asarray(labels), metric="cosine"))


def embed(encoder: Encoder, probe: ProbeSet) -> dict[str, torch.Tensor]:
    """The probe's text (u) and image (v) embeddings: {"text": (N, 2D), "image": (N, 2D)}."""
    return {"text": encoder.texts(probe.samples), "image": encoder.images(probe.samples)}


def score(embeddings: dict[str, torch.Tensor], labels: Sequence[str], k: int = 10) -> dict[str, dict[str, float]]:
    return {m: {"knn_accuracy": knn_accuracy(e, labels, k), "silhouette": silhouette(e, labels)}
            for m, e in embeddings.items()}


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
                          metric="cosine").fit_transform(x)
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
