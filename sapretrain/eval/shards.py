"""Held-out shards as an evaluation set: relation accuracy, retrieval, partner retrieval.

A shard set the model did not train on (e.g. curated COCO val) is streamed with the training
loader (same decoding, preprocessing and bad-record handling), in order, one pass; with
``features`` the feature shards of it (tools/cache_features.py) stand in for the pixels exactly
as ``data.features`` does in training: the vision tower is not run, and features from another
tower or preprocessing are refused. Over all ``S`` evaluated samples (anchors and partners):

- **relation accuracy**: fraction with ``cos(v, u) > cos(v, u_neg)``: the image prefers its own
  caption over the same caption with the opposite relation (what the triplet loss trains);
- **retrieval** R@1 / R@5, image → text and text → image, among all ``S`` samples (``v . u``);
- **partner R@1**, text and image: the nearest other sample (``u . u``, ``v . v``) is its partner.

A plain CLIP (heads off) is scored the same way on its own ``u`` and ``v``. The loader drops the
last incomplete batch (``batch_pairs``), as in training.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sapretrain.data.loader import LoaderConfig, build_loader
from sapretrain.data.batch import batch_to, build_preprocess
from sapretrain.model import SAClip


@torch.no_grad()
def embed_shards(model: SAClip, shards: str, features: str | None = None, batch_pairs: int = 64,
                 max_batches: int | None = None, image_size: int | None = None,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """u, u_neg, v (S, 2D) and partner (S,) of the evaluated samples, S = 2 x pairs."""
    if features:
        from sapretrain.features import check_features

        check_features(features, model, image_size)
        preprocess = None
    else:
        preprocess = build_preprocess(model)
    cfg = LoaderConfig(shards=shards, features=features, batch_pairs=batch_pairs, workers=0,
                       shuffle_shards=False, shuffle_buffer=0, image_size=image_size)
    loader = build_loader(cfg, preprocess, rank=0, world_size=1, context_length=model.clip.context_length)
    device = next(model.parameters()).device
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    out: dict[str, list[torch.Tensor]] = {"u": [], "u_neg": [], "v": [], "partner": []}
    model.eval()
    offset = 0  # samples so far
    for i, batch in enumerate(tqdm(loader, total=total, desc="eval shards", unit="batch", disable=not progress)):
        if i == total:
            break
        feats = model(batch_to(batch, device))
        n = feats["u"].shape[0] // 2
        out["partner"].append(offset + (torch.arange(2 * n) + n) % (2 * n))
        offset += 2 * n
        for key in ("u", "u_neg", "v"):
            out[key].append(F.normalize(feats[key].float(), dim=-1).cpu())
    if not out["u"]:
        raise ValueError(f"{features or shards}: no complete batch of {batch_pairs} pairs to evaluate")
    return {k: torch.cat(v) for k, v in out.items()}


def recall_at(sims: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows whose target column is among their ``k`` highest similarities."""
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices
    return (top == targets[:, None]).any(dim=1).float().mean().item()


def score_shards(emb: dict[str, torch.Tensor]) -> dict[str, Any]:
    u, u_neg, v, partner = emb["u"], emb["u_neg"], emb["v"], emb["partner"]
    n = u.shape[0]
    own = torch.arange(n)
    sims = v @ u.T  # (S, S) image i vs caption j
    result = {
        "samples": n,
        "relation_accuracy": ((v * u).sum(-1) > (v * u_neg).sum(-1)).float().mean().item(),
        "image_to_text": {"r1": recall_at(sims, own, 1), "r5": recall_at(sims, own, 5)},
        "text_to_image": {"r1": recall_at(sims.T, own, 1), "r5": recall_at(sims.T, own, 5)},
    }
    for name, x in (("text", u), ("image", v)):
        same = x @ x.T
        same.fill_diagonal_(-float("inf"))
        result[f"partner_r1_{name}"] = recall_at(same, partner, 1)
    return result


def format_shards_table(results: dict[str, dict]) -> str:
    lines = ["| model | samples | relation acc. | image→text R@1 | R@5 | text→image R@1 | R@5 | partner R@1 text | image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['samples']} | {r['relation_accuracy']:.3f} | {r['image_to_text']['r1']:.3f} | "
                     f"{r['image_to_text']['r5']:.3f} | {r['text_to_image']['r1']:.3f} | {r['text_to_image']['r5']:.3f} | "
                     f"{r['partner_r1_text']:.3f} | {r['partner_r1_image']:.3f} |")
    return "\n".join(lines) + "\n"
