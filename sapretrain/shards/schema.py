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
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1
MEMBERS = ("a", "p")  # anchor, positive partner
PARTS = ("subj", "rel", "obj")
KINDS = ("spatial", "action")
IMAGE_EXT = "jpg"
KEY_RE = re.compile(r"[A-Za-z0-9_-]+")  # use with fullmatch


def image_key_of(sample: dict[str, Any]) -> str:
    """The sample's image/group key: samples with equal keys show the same image, so the losses
    never count one as another's negative. Optional in the side-car (added in schema 1 without a
    version bump); shards written before it fall back to the sample id (same sample only)."""
    return sample.get("image_key") or sample["id"]


class SchemaError(ValueError):
    """A record does not follow the shard schema (``reason``: the counter a skip goes to)."""

    reason = "bad_sidecar"


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


# ---------------------------------------------------------------- validation
#
# Both validators are total: for ANY decoded JSON value they return or raise their own error,
# never TypeError/AttributeError/OverflowError, so a caller can skip and count on one except.
# Booleans are refused where numbers are expected (JSON true is Python's 1).

MAX_INT = 2**53  # integers beyond float precision are never a real pixel, offset or count


def _is_int(v: Any) -> bool:
    return type(v) is int and -MAX_INT <= v <= MAX_INT


def _is_number(v: Any) -> bool:
    return _is_int(v) or (type(v) is float and math.isfinite(v))


def _is_key(v: Any) -> bool:
    # fullmatch: KEY_RE.match would let "abc\n" through ($ matches before a final newline).
    return isinstance(v, str) and KEY_RE.fullmatch(v) is not None


def _text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


@dataclass(frozen=True)
class TokenizerSpec:
    vocab_size: int  # rows of the text tower's embedding: every id must be below
    sot: int  # first id of every caption
    eot: int  # last id; open_clip pools the text at the argmax id, so it must not occur inside


# Shard headers name the tokenizer "open_clip:SimpleTokenizer:<model>:ctx<L>" (shards/tokens.py,
# which checks these numbers against the live tokenizer); every such model shares the OpenAI BPE.
TOKENIZERS = {"open_clip:SimpleTokenizer:": TokenizerSpec(vocab_size=49408, sot=49406, eot=49407)}


def tokenizer_spec(name: Any) -> TokenizerSpec | None:
    if isinstance(name, str):
        for prefix, spec in TOKENIZERS.items():
            if name.startswith(prefix):
                return spec
    return None


class BadSample(SchemaError):
    """A manifest sample that must be skipped; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


MANIFEST_REQUIRED = ("id", "image", "caption", "triplet", "boxes", "negative", "positive", "source")


def validate_manifest_sample(sample: Any) -> None:
    """Raise BadSample for anything wrong with a manifest line that needs no image to see
    (docs/manifest.md); reasons: missing_field, bad_id, bad_field, bad_caption, empty_caption,
    bad_span, bad_kind, bad_box, bad_size, bad_image_key."""
    if not isinstance(sample, dict):
        raise BadSample("bad_json", f"a {type(sample).__name__}, not a JSON object")
    missing = [k for k in MANIFEST_REQUIRED if k not in sample]
    if missing:
        raise BadSample("missing_field", f"missing {', '.join(missing)}")
    if not _is_key(sample["id"]):
        raise BadSample("bad_id", f"id {sample['id']!r} must match [A-Za-z0-9_-]+ (it becomes a tar key)")
    if not isinstance(sample["image"], str) or not sample["image"] or "\x00" in sample["image"]:
        raise BadSample("missing_field", "image reference is empty or not a path")
    if not isinstance(sample["positive"], str):
        raise BadSample("missing_field", "positive must be the partner's id")
    if not _text(sample["source"]):
        raise BadSample("bad_field", f"source {sample['source']!r} is not a name")
    if "relation" in sample and not isinstance(sample["relation"], str):
        raise BadSample("bad_field", f"relation {sample['relation']!r} is not text")
    _validate_manifest_caption(sample["caption"], sample["triplet"], where="caption")
    negative = sample["negative"]
    if not isinstance(negative, dict) or "caption" not in negative or "triplet" not in negative:
        raise BadSample("missing_field", "negative needs caption and triplet")
    _validate_manifest_caption(negative["caption"], negative["triplet"], where="negative")
    boxes = sample["boxes"]
    if not isinstance(boxes, dict):
        raise BadSample("bad_box", "boxes must be {subj, obj}")
    for part in ("subj", "obj"):
        box = boxes.get(part)
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise BadSample("bad_box", f"{part} box {box!r} is not [x0, y0, x1, y1]")
        if not (box[0] < box[2] and box[1] < box[3]):
            raise BadSample("bad_box", f"{part} box {box!r} has no area")
    key = sample.get("image_key")
    if key is not None and not (isinstance(key, str) and key.strip()) and not _is_int(key):
        raise BadSample("bad_image_key", f"image_key {key!r} is not a non-empty string or an integer")
    for dim in ("width", "height"):
        if dim in sample and (not _is_int(sample[dim]) or sample[dim] <= 0):
            raise BadSample("bad_size", f"{dim} {sample[dim]!r} is not a positive integer")


def _validate_manifest_caption(caption: Any, triplet: Any, where: str) -> None:
    if not isinstance(caption, str):
        raise BadSample("bad_caption", f"{where} is {type(caption).__name__}, not text")
    if not caption.strip():
        raise BadSample("empty_caption", f"{where} is empty")
    if not isinstance(triplet, dict) or any(not isinstance(triplet.get(p), dict) for p in PARTS):
        raise BadSample("missing_field", f"{where} triplet needs subj, rel and obj")
    for part in PARTS:
        span = triplet[part]
        start, end = span.get("start"), span.get("end")
        if not _is_int(start) or not _is_int(end) or not 0 <= start < end <= len(caption):
            raise BadSample("bad_span", f"{where} {part} span [{start!r}, {end!r}) outside the caption "
                            f"({len(caption)} chars)")
        if "text" in span and caption[start:end] != span["text"]:
            raise BadSample(
                "bad_span", f"{where} {part} span [{start}, {end}) is {caption[start:end]!r}, not {span['text']!r}"
            )
    if where == "caption":
        kind = triplet["rel"].get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            raise BadSample("bad_kind", f"relation kind {kind!r} not in {KINDS}")


def validate_record(key: Any, meta: Any, vocab_size: int | None = None) -> None:
    """Raise SchemaError naming the first problem of a decoded ``KEY.json`` side-car.

    Token ids must lie below ``vocab_size`` (the text tower's embedding rows) when given, and
    within the tokenizer the header names; SOT/EOT are checked for known tokenizers. A header
    naming no known tokenizer is refused unless ``vocab_size`` says what ids are valid.
    """
    if not _is_key(key):
        raise SchemaError(f"key {key!r} is not dot/slash-free [A-Za-z0-9_-]+")
    if not isinstance(meta, dict):
        raise SchemaError(f"side-car is a {type(meta).__name__}, not a JSON object")
    version = meta.get("schema")
    if not _is_int(version) or version != SCHEMA_VERSION:
        raise SchemaError(f"schema version {version!r}, this reader understands {SCHEMA_VERSION}")
    for field in ("tokenizer", "context_length", "image_size", "roi_size"):
        if field not in meta:
            raise SchemaError(f"missing header field {field!r}")
    if not _text(meta["tokenizer"]):
        raise SchemaError(f"tokenizer {meta['tokenizer']!r} is not a name")
    for field in ("context_length", "image_size", "roi_size"):
        if not _is_int(meta[field]) or not 2 <= meta[field] <= 65535:
            raise SchemaError(f"header {field} {meta[field]!r} is not an integer in 2..65535")
    spec = tokenizer_spec(meta["tokenizer"])
    if spec is None and vocab_size is None:
        raise SchemaError(f"tokenizer {meta['tokenizer']!r} is unknown to this reader: its token ids cannot be checked")
    limit = min(v for v in (vocab_size, spec and spec.vocab_size) if v)
    context_length = meta["context_length"]
    for member in MEMBERS:
        sample = meta.get(member)
        if not isinstance(sample, dict):
            raise SchemaError(f"missing member sample {member!r}")
        _validate_sample(sample, context_length, limit, spec, where=member)
    if meta["a"]["id"] != key:
        raise SchemaError(f"anchor id {meta['a']['id']!r} differs from record key {key!r}")


def _validate_sample(sample: dict[str, Any], context_length: int, vocab: int, spec: TokenizerSpec | None,
                     where: str) -> None:
    for field in ("id", "source", "caption", "tokens", "spans", "kind", "negative", "boxes"):
        if field not in sample:
            raise SchemaError(f"{where}: missing field {field!r}")
    if not _is_key(sample["id"]):
        raise SchemaError(f"{where}.id: {sample['id']!r} is not [A-Za-z0-9_-]+")
    if not isinstance(sample["source"], str):  # a counter key for readers: must be hashable text
        raise SchemaError(f"{where}.source: {sample['source']!r} is not text")
    if not isinstance(sample["kind"], str) or sample["kind"] not in KINDS:
        raise SchemaError(f"{where}: kind {sample['kind']!r} not in {KINDS}")
    if "image_key" in sample and (not isinstance(sample["image_key"], str) or not sample["image_key"]):
        raise SchemaError(f"{where}.image_key: {sample['image_key']!r} is not a non-empty string")
    if "truncated" in sample and type(sample["truncated"]) is not bool:
        raise SchemaError(f"{where}.truncated: {sample['truncated']!r} is not true/false")
    if "relation" in sample and not isinstance(sample["relation"], str):
        raise SchemaError(f"{where}.relation: {sample['relation']!r} is not text")
    size = sample.get("orig_size", [1, 1])
    if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
        raise SchemaError(f"{where}.orig_size: {size!r} is not [width, height]")
    _validate_text(sample, context_length, vocab, spec, where)
    if not isinstance(sample["negative"], dict):
        raise SchemaError(f"{where}.negative: a {type(sample['negative']).__name__}, not a caption object")
    _validate_text(sample["negative"], context_length, vocab, spec, f"{where}.negative")
    boxes = sample["boxes"]
    if not isinstance(boxes, dict):
        raise SchemaError(f"{where}.boxes: a {type(boxes).__name__}, not {{subj, obj}}")
    for part in ("subj", "obj"):
        box = boxes.get(part)
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise SchemaError(f"{where}.boxes.{part}: expected 4 finite numbers, got {box!r}")
        x0, y0, x1, y1 = box
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise SchemaError(f"{where}.boxes.{part}: {box} is not a normalised box inside [0, 1]")


def _validate_text(text: dict[str, Any], context_length: int, vocab: int, spec: TokenizerSpec | None,
                   where: str) -> None:
    caption = text.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise SchemaError(f"{where}.caption: empty or not text")
    tokens = text.get("tokens")
    if not isinstance(tokens, list) or not 2 <= len(tokens) <= context_length:
        raise SchemaError(f"{where}.tokens: expected a list of 2..{context_length} token ids")
    if not all(type(t) is int for t in tokens) or min(tokens) < 0 or max(tokens) >= vocab:
        bad = next((t for t in tokens if type(t) is not int or not 0 <= t < vocab), None)
        raise SchemaError(f"{where}.tokens: id {bad!r} is not an integer in 0..{vocab - 1}")
    if spec is not None:
        inner = tokens[1:-1]
        if tokens[0] != spec.sot or tokens[-1] != spec.eot or spec.sot in inner or spec.eot in inner:
            raise SchemaError(f"{where}.tokens: must be SOT ({spec.sot}) ... EOT ({spec.eot}) with neither inside")
    spans = text.get("spans")
    if not isinstance(spans, dict):
        raise SchemaError(f"{where}.spans: missing")
    for part in PARTS:
        positions = spans.get(part)
        if not isinstance(positions, list) or not positions:
            raise SchemaError(f"{where}.spans.{part}: no token positions")
        # Position 0 is the start token and the last one the end token: spans lie strictly inside.
        if any(not _is_int(p) or not 0 < p < len(tokens) - 1 for p in positions):
            raise SchemaError(f"{where}.spans.{part}: positions {positions} outside 1..{len(tokens) - 2}")
        if positions != sorted(set(positions)):
            raise SchemaError(f"{where}.spans.{part}: positions {positions} not sorted and unique")
    char_spans = text.get("char_spans")
    if char_spans is not None:
        if not isinstance(char_spans, dict):
            raise SchemaError(f"{where}.char_spans: not {{subj, rel, obj}}")
        for part in PARTS:
            span = char_spans.get(part)
            if (not isinstance(span, list) or len(span) != 2 or not all(_is_int(v) for v in span)
                    or not 0 <= span[0] < span[1] <= len(caption)):
                raise SchemaError(f"{where}.char_spans.{part}: {span!r} is not [start, end) inside the caption")


def validate_sizes(sizes: Any, where: str = "sizes.json") -> dict[str, int]:
    """A ``sizes.json`` (``{shard file name: records}``), or SchemaError saying what is wrong.

    Names must be plain file names: a name with a path in it would make readers open files
    outside the shard directory.
    """
    if not isinstance(sizes, dict):
        raise SchemaError(f"{where}: a JSON {type(sizes).__name__}, expected {{shard file name: record count}}")
    for name, count in sizes.items():
        if not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
            raise SchemaError(f"{where}: {name!r} is not a shard file name in this directory")
        if not _is_int(count) or count < 0:
            raise SchemaError(f"{where}: {name}: record count {count!r} is not a non-negative integer")
    return sizes
