"""VSR's training rows → a curated manifest, for the "w/o pretraining" rows of paper Table 3.

    samples, skips = vsr_train_manifest(rows, annotations, "coco/train2017")
    # rows: read_vsr("zeroshot_train.jsonl")[0]; annotations: load_coco_annotations(instances_train2017.json)

Those rows train a model on the target task's own data only (``configs/ablation/wo_pretraining*.yaml``).
Only a *training* split may go in (VSR zero-shot ``train``; never ``dev``/``test``, which the
evaluation scores). One manifest sample (docs/manifest.md) per true row (``label`` 1; a false
caption describes no image and is no positive), built with the evaluation's own VSR code
(``sapretrain.eval.vsr``) so training and scoring read a row the same way:

- **spans**: subject, relation, object located in the templated caption (``locate_svo``);
- **boxes**: the COCO instances of the subject and object categories (``boxes_from_coco``: the
  largest instance of each);
- **negative**: the evaluation's contrast caption (the opposite relation, or subject and object
  exchanged for an asymmetric relation without one); symmetric relations (touching, with, …)
  have none, and the row is skipped;
- **partner**: the next true row (file order, cyclic) with the same relation on another image,
  the synthetic scenes' notion of a positive (same relation, different objects and image);
- ``image_key``: the COCO file name, so two captions of one photo are never each other's negative.

Rows that cannot become a sample are counted by reason (``SkipLog``): ``false_row``,
``no_subj_obj``, ``no_svo``, ``no_box``, ``no_negative``, ``no_partner``.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Sequence

from sapretrain import storage
from sapretrain.shards.manifest import SkipLog
from sapretrain.eval.vsr import boxes_from_coco, contrast_caption, locate_svo

SOURCE = "vsr-train"


def sample_id(row: dict[str, Any]) -> str:
    """A tar-key-safe id from the row's id (``read_vsr`` gives ``<file>:<line>`` without one)."""
    return "vsr-" + re.sub(r"[^A-Za-z0-9_-]+", "-", str(row["id"])).strip("-")


def row_sample(row: dict[str, Any], annotations: dict[str, list[dict]], images_root: str
               ) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest sample without ``positive``, None) or (None, skip reason) for one VSR row."""
    if row["label"] != 1:
        return None, "false_row"
    subj, obj, relation, caption = row.get("subj"), row.get("obj"), row["relation"], row["caption"]
    if not subj or not obj:
        return None, "no_subj_obj"
    triplet = locate_svo(caption, subj, relation, obj)
    if triplet is None:
        return None, "no_svo"
    boxes = boxes_from_coco(annotations, row["image"], subj, obj)
    if boxes is None:
        return None, "no_box"
    contrast = contrast_caption(caption, subj, relation, obj)
    negative = contrast and locate_svo(*contrast)
    if not negative:
        return None, "no_negative"
    return {
        "id": sample_id(row),
        "image": storage.join(images_root, row["image"]),
        "image_key": row["image"],
        "caption": caption,
        "triplet": triplet,
        "relation": relation,
        "boxes": boxes,
        "negative": {"caption": contrast[0], "triplet": negative},
        "source": SOURCE,
    }, None


def assign_partners(samples: Sequence[dict[str, Any]], skips: SkipLog) -> list[dict[str, Any]]:
    """Each sample with ``positive`` = the next sample of its relation on another image (cyclic);
    samples with none are dropped (``no_partner``)."""
    by_relation: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_relation[s["relation"]].append(s)
    kept = []
    for s in samples:
        ring = by_relation[s["relation"]]
        start = ring.index(s)
        partner = next((ring[(start + k) % len(ring)] for k in range(1, len(ring))
                        if ring[(start + k) % len(ring)]["image_key"] != s["image_key"]), None)
        if partner is None:
            skips.add("no_partner", f"{s['id']}: no other image with relation {s['relation']!r}")
            continue
        kept.append({**s, "positive": partner["id"]})
    return kept


def vsr_train_manifest(rows: Sequence[dict[str, Any]], annotations: dict[str, list[dict]], images_root: str
                       ) -> tuple[list[dict[str, Any]], SkipLog]:
    """Curated-manifest samples of VSR training rows (module docs), in file order, and the skips.

    A partner whose own row was dropped is never named: partners are chosen among kept samples.
    """
    skips = SkipLog()
    samples, seen = [], set()
    for row in rows:
        sample, reason = row_sample(row, annotations, images_root)
        if reason is not None:
            skips.add(reason, f"{row['id']}: {row['caption']!r}")
            continue
        if sample["id"] in seen:
            skips.add("duplicate_id", f"{row['id']}: id {sample['id']} already used")
            continue
        seen.add(sample["id"])
        samples.append(sample)
    return assign_partners(samples, skips), skips
