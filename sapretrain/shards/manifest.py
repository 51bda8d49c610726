"""Reading and checking curated manifests (the format is documented in docs/manifest.md)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sapretrain import jsonl, storage
from sapretrain.shards.schema import MANIFEST_REQUIRED as REQUIRED
from sapretrain.shards.process import hashed_image_key
from sapretrain.shards.schema import BadSample, validate_manifest_sample

__all__ = ["REQUIRED", "BadSample", "SkipLog", "check_sample", "read_manifest"]

MAX_EXAMPLES = 5


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


def read_manifest(url: str, skips: SkipLog) -> list[dict[str, Any]]:
    """All valid samples of a manifest in file order; invalid lines are counted in ``skips``.

    Lines go through the one JSONL reader (``sapretrain.jsonl``: encoding, syntax, non-objects,
    nesting, number size) and then ``schema.validate_manifest_sample``. Relative image
    references are resolved against the manifest's directory. Duplicate ids keep the first
    occurrence.
    """
    base = storage.parent(url)
    samples: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, line in jsonl.iter_lines(url):
        try:
            sample = jsonl.parse_record(line)
            check_sample(sample)
        except jsonl.BadLine as e:
            skips.add(e.reason, f"line {number}: {e.detail}")
            continue
        except BadSample as e:
            skips.add(e.reason, f"line {number} ({jsonl.excerpt(sample.get('id', '?'), 80)}): {e.detail}")
            continue
        if sample["id"] in seen:
            skips.add("duplicate_id", f"line {number}: id {sample['id']!r} already used")
            continue
        seen.add(sample["id"])
        if sample.get("image_key") is None:  # from the reference as written: independent of where it is read
            sample["image_key"] = hashed_image_key(sample["image"])
        sample["image"] = storage.join(base, sample["image"])
        samples.append(sample)
    return samples


# The manifest's schema lives with the shard schema (one validator for what goes in and what comes out).
check_sample = validate_manifest_sample
