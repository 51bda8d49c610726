"""The shard record schema: the one place that says what a shard holds (see docs/shards.md).

A shard is a WebDataset tar. One record = one anchor sample and its positive partner, so a batch
of N records is N anchor/positive pairs (2N samples) with no random access. Members of record
``KEY`` (the anchor's manifest id):

    KEY.json         side-car: schema version, tokenizer identity, sizes, and per member sample
                     ("a" anchor, "p" partner) its caption, CLIP token ids and SVO span token
                     positions, negative caption likewise, normalised boxes, labels
    KEY.a.jpg        anchor image, shorter side = image_size, aspect kept
    KEY.a.subj.jpg   anchor subject ROI crop, roi_size x roi_size
    KEY.a.obj.jpg    anchor object ROI crop
    KEY.p.jpg, KEY.p.subj.jpg, KEY.p.obj.jpg   the same for the partner

Bump SCHEMA_VERSION on any change a reader would notice; readers refuse other versions.
Optional fields with a documented default (``image_key``, below) keep old shards readable.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

SCHEMA_VERSION = 1
MEMBERS = ("a", "p")  # anchor, positive partner
PARTS = ("subj", "rel", "obj")
KINDS = ("spatial", "action")
IMAGE_EXT = "jpg"
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def image_key_of(sample: dict[str, Any]) -> str:
    """The sample's image/group key: samples with equal keys show the same image, so the losses
    never count one as another's negative. Optional in the side-car (added in schema 1 without a
    version bump); shards written before it fall back to the sample id (same sample only)."""
    return sample.get("image_key") or sample["id"]


class SchemaError(ValueError):
    """A record does not follow the shard schema."""


def image_members(member: str) -> dict[str, str]:
    """Extension of each image of one member sample: ``{"image": "a.jpg", "subj": "a.subj.jpg", ...}``."""
    return {
        "image": f"{member}.{IMAGE_EXT}",
        "subj": f"{member}.subj.{IMAGE_EXT}",
        "obj": f"{member}.obj.{IMAGE_EXT}",
    }


EXTENSIONS = ("json",) + tuple(ext for m in MEMBERS for ext in image_members(m).values())

# Feature shards (tools/cache_features.py, docs/features.md): the same records with the images
# replaced by the frozen tower's outputs, float16 (2, 3, D) = [a, p] x FEATURE_SLOTS.
FEATURE_EXT = "feat.npy"
FEATURE_SLOTS = ("image", "subj", "obj")
FEATURE_EXTENSIONS = ("json", FEATURE_EXT)


def header(tokenizer: str, context_length: int, image_size: int, roi_size: int) -> dict[str, Any]:
    """Fields shared by every record of a dataset (repeated per record so a record stands alone)."""
    return {
        "schema": SCHEMA_VERSION,
        "tokenizer": tokenizer,
        "context_length": context_length,
        "image_size": image_size,
        "roi_size": roi_size,
    }


def encode_json(meta: dict[str, Any]) -> bytes:
    # Sorted keys and fixed separators: identical inputs give byte-identical shards.
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def validate_record(key: str, meta: dict[str, Any]) -> None:
    """Raise SchemaError naming the first problem of a decoded ``KEY.json`` side-car."""
    if not KEY_RE.match(key):
        raise SchemaError(f"key {key!r} is not dot/slash-free [A-Za-z0-9_-]+")
    version = meta.get("schema")
    if version != SCHEMA_VERSION:
        raise SchemaError(f"schema version {version!r}, this reader understands {SCHEMA_VERSION}")
    for field in ("tokenizer", "context_length", "image_size", "roi_size"):
        if field not in meta:
            raise SchemaError(f"missing header field {field!r}")
    context_length = meta["context_length"]
    for member in MEMBERS:
        sample = meta.get(member)
        if not isinstance(sample, dict):
            raise SchemaError(f"missing member sample {member!r}")
        _validate_sample(sample, context_length, where=member)
    if meta["a"]["id"] != key:
        raise SchemaError(f"anchor id {meta['a']['id']!r} differs from record key {key!r}")


def _validate_sample(sample: dict[str, Any], context_length: int, where: str) -> None:
    for field in ("id", "source", "caption", "tokens", "spans", "kind", "negative", "boxes"):
        if field not in sample:
            raise SchemaError(f"{where}: missing field {field!r}")
    if sample["kind"] not in KINDS:
        raise SchemaError(f"{where}: kind {sample['kind']!r} not in {KINDS}")
    if "image_key" in sample and (not isinstance(sample["image_key"], str) or not sample["image_key"]):
        raise SchemaError(f"{where}.image_key: {sample['image_key']!r} is not a non-empty string")
    _validate_text(sample, context_length, where)
    _validate_text(sample["negative"], context_length, f"{where}.negative")
    for part in ("subj", "obj"):
        box = sample["boxes"].get(part)
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        ):
            raise SchemaError(f"{where}.boxes.{part}: expected 4 finite numbers, got {box!r}")
        x0, y0, x1, y1 = box
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise SchemaError(f"{where}.boxes.{part}: {box} is not a normalised box inside [0, 1]")


def _validate_text(text: dict[str, Any], context_length: int, where: str) -> None:
    tokens = text.get("tokens")
    if not isinstance(tokens, list) or not 2 <= len(tokens) <= context_length:
        raise SchemaError(f"{where}.tokens: expected 2..{context_length} token ids")
    if not isinstance(text.get("caption"), str) or not text["caption"].strip():
        raise SchemaError(f"{where}.caption: empty or not text")
    spans = text.get("spans")
    if not isinstance(spans, dict):
        raise SchemaError(f"{where}.spans: missing")
    for part in PARTS:
        positions = spans.get(part)
        if not positions:
            raise SchemaError(f"{where}.spans.{part}: no token positions")
        # Position 0 is the start token and the last one the end token: spans lie strictly inside.
        if any(not isinstance(p, int) or not 0 < p < len(tokens) - 1 for p in positions):
            raise SchemaError(f"{where}.spans.{part}: positions {positions} outside 1..{len(tokens) - 2}")
        if positions != sorted(set(positions)):
            raise SchemaError(f"{where}.spans.{part}: positions {positions} not sorted and unique")
