"""Caption records with triplets → one sample per (caption, triplet): the unit of later stages.

``extract_svo`` writes one line per caption with a ``triplets`` list; the filter, negative, ROI
and positive stages, and the curated manifest, work on *samples*: one image, one caption, one
triplet (docs/manifest.md). ``SampleStage`` makes them:

- ``id``: the caption record's id made dot-free (``[A-Za-z0-9_-]``, a WebDataset key) plus
  ``-t<k>`` for its k-th triplet; ``image``, ``width``, ``height``, ``source``, ``objects``,
  ``license`` are carried over; ``caption``, ``triplet`` (with ``head`` nouns kept for box
  matching) and ``relation`` come from ``svo.triplets_to_manifest_fields``.
- dropped, with a reason: ``skipped_caption`` (the extractor's ``skip_reason``), ``no_triplet``,
  ``no_image``, ``bad_span`` (a span that does not match its caption), ``kind`` (a relation kind
  not in ``kinds``), ``too_many`` (past ``max_per_caption`` triplets of one caption).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from sapretrain.curation.svo import triplets_to_manifest_fields

CARRIED = ("image", "width", "height", "source", "objects", "license")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class SampleConfig:
    kinds: list[str] = field(default_factory=lambda: ["spatial", "action"])  # relation kinds kept
    max_per_caption: int = 4  # triplets of one caption kept as samples (the rest: too_many)


def sample_key(record_id: str) -> str:
    """A dot-free, slash-free key for ``record_id`` (``coco/123.jpg#2`` → ``coco_123_jpg_2``)."""
    return _KEY_UNSAFE.sub("_", str(record_id)).strip("_") or "sample"


class SampleStage:
    name = "samples"

    def __init__(self, cfg: SampleConfig | None = None):
        self.cfg = cfg or SampleConfig()

    def setup(self) -> None:
        pass

    def fingerprint(self) -> dict:
        return {"kinds": sorted(self.cfg.kinds), "max_per_caption": self.cfg.max_per_caption}

    def process(self, records: list[dict]) -> list[dict]:
        out = []
        for record in records:
            out += self.samples(record)
        return out

    def samples(self, record: dict) -> list[dict]:
        base = {"id": record.get("id"), "caption": record.get("caption")}
        if record.get("skip_reason"):
            return [{**base, "drop_reason": "skipped_caption", "drop_detail": record["skip_reason"]}]
        if not record.get("image"):
            return [{**base, "drop_reason": "no_image"}]
        triplets = record.get("triplets") or []
        if not triplets:
            return [{**base, "drop_reason": "no_triplet"}]
        key = sample_key(record.get("id") or record["image"])
        carried = {k: record[k] for k in CARRIED if k in record}
        out, kept = [], 0
        for k, triplet in enumerate(triplets):
            sample_id = f"{key}-t{k}"
            try:
                fields = triplets_to_manifest_fields(record, triplet)
            except (KeyError, TypeError, ValueError) as e:
                out.append({"id": sample_id, "caption": record.get("caption"), "drop_reason": "bad_span",
                            "drop_detail": str(e)[:200]})
                continue
            if fields["triplet"]["rel"]["kind"] not in self.cfg.kinds:
                out.append({"id": sample_id, "caption": fields["caption"], "drop_reason": "kind",
                            "drop_detail": fields["triplet"]["rel"]["kind"]})
                continue
            if kept == self.cfg.max_per_caption:
                out.append({"id": sample_id, "caption": fields["caption"], "drop_reason": "too_many"})
                continue
            for part in ("subj", "obj"):  # head nouns help the ROI stage match boxes
                if triplet[part].get("head"):
                    fields["triplet"][part]["head"] = triplet[part]["head"]
            out.append({"id": sample_id, **carried, **fields})
            kept += 1
        return out
