"""Reading and checking curated manifests (the format is documented in docs/manifest.md)."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec

from sapretrain import storage
from sapretrain.shards.schema import KEY_RE, KINDS, PARTS

REQUIRED = ("id", "image", "caption", "triplet", "boxes", "negative", "positive", "source")
MAX_EXAMPLES = 5


class BadSample(ValueError):
    """A sample that must be skipped; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class SkipLog:
    """Skipped inputs counted by reason, with the first few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < MAX_EXAMPLES:
            bucket.append(detail)

    def merge(self, other: "SkipLog") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            bucket = self.examples.setdefault(reason, [])
            bucket.extend(other.examples.get(reason, [])[: MAX_EXAMPLES - len(bucket)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SkipLog":
        return cls(Counter(data.get("counts", {})), {k: list(v) for k, v in data.get("examples", {}).items()})


def iter_lines(url: str) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of a JSONL file (local or fsspec URL, compression inferred)."""
    with fsspec.open(url, "rt", encoding="utf-8", compression="infer") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def read_manifest(url: str, skips: SkipLog) -> list[dict[str, Any]]:
    """All valid samples of a manifest in file order; invalid lines are counted in ``skips``.

    Relative image references are resolved against the manifest's directory. Duplicate ids keep
    the first occurrence.
    """
    base = storage.parent(url)
    samples: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, line in iter_lines(url):
        try:
            sample = json.loads(line)
            if not isinstance(sample, dict):
                raise BadSample("bad_json", f"line {number}: not a JSON object")
            check_sample(sample)
        except json.JSONDecodeError as e:
            skips.add("bad_json", f"line {number}: {e}")
            continue
        except BadSample as e:
            skips.add(e.reason, f"line {number} ({sample.get('id', '?')}): {e.detail}")
            continue
        if sample["id"] in seen:
            skips.add("duplicate_id", f"line {number}: id {sample['id']!r} already used")
            continue
        seen.add(sample["id"])
        sample["image"] = storage.join(base, sample["image"])
        samples.append(sample)
    return samples


def check_sample(sample: dict[str, Any]) -> None:
    """Raise BadSample for anything wrong with a manifest line that needs no image to see."""
    missing = [k for k in REQUIRED if k not in sample]
    if missing:
        raise BadSample("missing_field", f"missing {', '.join(missing)}")
    if not isinstance(sample["id"], str) or not KEY_RE.match(sample["id"]):
        raise BadSample("bad_id", f"id {sample['id']!r} must match [A-Za-z0-9_-]+ (it becomes a tar key)")
    if not isinstance(sample["image"], str) or not sample["image"]:
        raise BadSample("missing_field", "image reference is empty")
    if not isinstance(sample["positive"], str):
        raise BadSample("missing_field", "positive must be the partner's id")
    check_caption(sample["caption"], sample["triplet"], where="caption")
    negative = sample["negative"]
    if not isinstance(negative, dict) or "caption" not in negative or "triplet" not in negative:
        raise BadSample("missing_field", "negative needs caption and triplet")
    check_caption(negative["caption"], negative["triplet"], where="negative")
    boxes = sample["boxes"]
    if not isinstance(boxes, dict):
        raise BadSample("bad_box", "boxes must be {subj, obj}")
    for part in ("subj", "obj"):
        box = boxes.get(part)
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        ):
            raise BadSample("bad_box", f"{part} box {box!r} is not [x0, y0, x1, y1]")
        if not (box[0] < box[2] and box[1] < box[3]):
            raise BadSample("bad_box", f"{part} box {box!r} has no area")
    key = sample.get("image_key")
    if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int)) or not str(key).strip()):
        raise BadSample("bad_image_key", f"image_key {key!r} is not a non-empty string or an integer")
    for dim in ("width", "height"):
        if dim in sample and (not isinstance(sample[dim], int) or sample[dim] <= 0):
            raise BadSample("bad_size", f"{dim} {sample[dim]!r} is not a positive integer")


def check_caption(caption: Any, triplet: Any, where: str) -> None:
    if not isinstance(caption, str):
        raise BadSample("bad_caption", f"{where} is {type(caption).__name__}, not text")
    if not caption.strip():
        raise BadSample("empty_caption", f"{where} is empty")
    if not isinstance(triplet, dict) or any(not isinstance(triplet.get(p), dict) for p in PARTS):
        raise BadSample("missing_field", f"{where} triplet needs subj, rel and obj")
    for part in PARTS:
        span = triplet[part]
        start, end = span.get("start"), span.get("end")
        if not isinstance(start, int) or not isinstance(end, int) or not 0 <= start < end <= len(caption):
            raise BadSample("bad_span", f"{where} {part} span [{start}, {end}) outside the caption ({len(caption)} chars)")
        if "text" in span and caption[start:end] != span["text"]:
            raise BadSample(
                "bad_span", f"{where} {part} span [{start}, {end}) is {caption[start:end]!r}, not {span['text']!r}"
            )
    if where == "caption" and triplet["rel"].get("kind") not in KINDS:
        raise BadSample("bad_kind", f"relation kind {triplet['rel'].get('kind')!r} not in {KINDS}")
