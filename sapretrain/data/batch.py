"""Decoded shard records → the model's batch (the contract between loader and model).

A batch of N records (anchor/positive pairs) has 2N samples, ``[anchors (N) ; partners (N)]``:

    image      (2N, 3, H, W)      float, normalised with the model's mean/std
    rois       (2N, 2, 3, H, W)   subject, object ROI crops; same normalisation and size
    boxes      (2N, 2, 4)         normalised [x0, y0, x1, y1] of subject, object
    text       (2N, L)            int64 token ids, zero padded (open_clip convention, L = 77)
    spans      (2N, 3, L)         bool masks over token positions: subject, relation, object
    neg_text   (2N, L)            the negative caption (opposite relation)
    neg_spans  (2N, 3, L)
    groups     (2N,)              int64 image/group id: samples with equal ids show the same image
                                  (side-car ``image_key``, hashed), so the losses never take one
                                  for another's negative (``loss.mask_false_negatives``)

Sample i's positive partner is sample (i + N) mod 2N.

Feature shards (``collate_features``, docs/features.md) give the same batch with the frozen
tower's outputs instead of pixels (``SAClip.forward`` takes either):

    image_features  (2N, D)       float32 raw f_v of the images (stored float16)
    roi_features    (2N, 2, D)    float32 raw f_v of the subject, object crops
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Callable, Sequence

import numpy as np
import open_clip
import torch
from torch import nn

from sapretrain.shards.schema import FEATURE_EXT, FEATURE_SLOTS, MEMBERS, PARTS, image_key_of, image_members


def build_preprocess(model: nn.Module) -> Callable:
    """PIL image → normalised (3, H, W) tensor for ``model`` (SA-CLIP or open_clip).

    Whole-frame resize to the model's square input ("squash"), never a crop: shard boxes are
    normalised to the whole stored frame, and a centre crop would move them. No random
    augmentation for the same reason (a random crop or flip would have to move the boxes and,
    for a flip, swap "left of" / "right of" in the caption).
    """
    clip = getattr(model, "clip", model)
    cfg = open_clip.transform.merge_preprocess_dict(open_clip.get_model_preprocess_cfg(clip), {"resize_mode": "squash"})
    return open_clip.transform.image_transform_v2(open_clip.transform.PreprocessCfg(**cfg), is_train=False)


def caption_tensors(caption: dict, context_length: int, where: str = "caption") -> tuple[torch.Tensor, torch.Tensor]:
    """Side-car caption ``{"tokens", "spans"}`` → ids (L,) int64 zero padded, masks (3, L) bool."""
    tokens, spans = caption["tokens"], caption["spans"]
    if len(tokens) > context_length:
        raise ValueError(f"{where}: {len(tokens)} tokens, more than context length {context_length}")
    ids = torch.zeros(context_length, dtype=torch.int64)
    ids[: len(tokens)] = torch.as_tensor(tokens, dtype=torch.int64)
    masks = torch.zeros(len(PARTS), context_length, dtype=torch.bool)
    for i, part in enumerate(PARTS):
        positions = spans.get(part) or []
        if not positions:
            raise ValueError(f"{where}: {part} span has no token")
        if min(positions) < 0 or max(positions) >= len(tokens):
            raise ValueError(f"{where}: {part} span {positions} outside the {len(tokens)} tokens")
        masks[i, positions] = True
    return ids, masks


def _samples(records: Sequence[dict]) -> list[tuple[dict, dict, str, str]]:
    """(record, sample side-car, member, key) of anchors of all records, then their partners."""
    sides = [rec["json"] if isinstance(rec["json"], dict) else json.loads(rec["json"]) for rec in records]
    return [
        (rec, side[m], m, rec.get("__key__", f"record {i}"))
        for m in MEMBERS
        for i, (rec, side) in enumerate(zip(records, sides))
    ]


def group_id(image_key: str) -> int:
    """A side-car ``image_key`` as a signed 64-bit integer, the same on every rank and run (not
    Python's salted ``hash``): ranks compare the ids they gathered. Two different keys collide
    with probability 2**-64, and then only lose one negative."""
    return int.from_bytes(hashlib.blake2b(image_key.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _text_fields(samples: list, context_length: int) -> dict[str, torch.Tensor]:
    """boxes, caption / negative tensors and group ids of the samples, in order."""
    boxes, texts, spans, neg_texts, neg_spans, groups = [], [], [], [], [], []
    for _, sample, member, key in samples:
        groups.append(group_id(image_key_of(sample)))
        boxes.append([sample["boxes"]["subj"], sample["boxes"]["obj"]])
        ids, masks = caption_tensors(sample, context_length, f"{key}.{member} caption")
        texts.append(ids)
        spans.append(masks)
        ids, masks = caption_tensors(sample["negative"], context_length, f"{key}.{member} negative")
        neg_texts.append(ids)
        neg_spans.append(masks)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "text": torch.stack(texts),
        "spans": torch.stack(spans),
        "neg_text": torch.stack(neg_texts),
        "neg_spans": torch.stack(neg_spans),
        "groups": torch.tensor(groups, dtype=torch.int64),
    }


def collate_records(records: Sequence[dict], preprocess: Callable, context_length: int = 77) -> dict[str, torch.Tensor]:
    """Decoded shard records (``json`` side-car + PIL images per member) → the batch above."""
    if not records:
        raise ValueError("collate_records: no records")
    samples = _samples(records)
    images, rois = [], []
    for rec, _, member, _ in samples:
        names = image_members(member)
        images.append(preprocess(rec[names["image"]]))
        rois.append(torch.stack([preprocess(rec[names["subj"]]), preprocess(rec[names["obj"]])]))
    return {"image": torch.stack(images), "rois": torch.stack(rois), **_text_fields(samples, context_length)}


def decode_features(data: bytes) -> np.ndarray:
    """A feature shard's ``KEY.feat.npy`` → float16 (2, 3, D); ValueError on anything else."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.float16 or array.ndim != 3 or array.shape[:2] != (len(MEMBERS), len(FEATURE_SLOTS)):
        raise ValueError(f"feature array {array.dtype} {array.shape}, expected float16 ({len(MEMBERS)}, {len(FEATURE_SLOTS)}, D)")
    if not np.isfinite(array).all():
        raise ValueError("feature array holds non-finite values")
    return array


def collate_features(records: Sequence[dict], preprocess: Callable | None = None,
                     context_length: int = 77) -> dict[str, torch.Tensor]:
    """Feature-shard records (``json`` side-car + decoded ``feat.npy``) → the batch with
    ``image_features``/``roi_features`` in place of ``image``/``rois`` (``preprocess`` unused)."""
    if not records:
        raise ValueError("collate_features: no records")
    samples = _samples(records)
    feats = torch.from_numpy(np.stack([rec[FEATURE_EXT] for rec in records])).float()  # (N, 2, 3, D)
    feats = feats.transpose(0, 1).flatten(0, 1)  # (2N, 3, D): anchors of all records, then partners
    return {"image_features": feats[:, 0].contiguous(), "roi_features": feats[:, 1:].contiguous(),
            **_text_fields(samples, context_length)}


def batch_to(batch: dict[str, Any], device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Move a batch to ``device``; float tensors (pixels, boxes) also cast to ``dtype`` if given."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype if dtype is not None and v.is_floating_point() else None, non_blocking=True)
        out[k] = v
    return out
