"""Checks on the real-photo COCO fixture set (tests/fixtures/coco/, see tests/fixtures/ATTRIBUTION.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

COCO_DIR = Path(__file__).resolve().parent / "fixtures" / "coco"
MANIFEST = COCO_DIR / "manifest.jsonl"
ANNOTATIONS = COCO_DIR / "annotations.jsonl"
SCRIPT = COCO_DIR / "make_manifest.py"
ID_RE = re.compile(r"^coco-\d{12}$")


def _records() -> list[dict]:
    with open(MANIFEST, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


RECORDS = _records()


def _rid(rec: dict) -> str:
    return rec["id"]


def test_manifest_has_23_unique_sorted_ids():
    ids = [r["id"] for r in RECORDS]
    assert len(ids) == 23
    assert len(set(ids)) == 23
    assert ids == sorted(ids)
    assert all(ID_RE.match(i) for i in ids)


def test_manifest_matches_annotations():
    with open(ANNOTATIONS, encoding="utf-8") as f:
        anns = {a["coco_id"]: a for a in map(json.loads, f)}
    assert len(anns) == 23
    for rec in RECORDS:
        ann = anns[rec["meta"]["coco_id"]]
        assert rec["id"] == f"coco-{ann['coco_id']:012d}"
        assert rec["image"] == f"images/{ann['file_name']}"
        assert (rec["width"], rec["height"]) == (ann["width"], ann["height"])
        assert rec["source"] == "coco"
        assert rec["license"] == ann["license"]
        assert rec["meta"]["flickr_url"] == ann["flickr_url"]
        if "caption_note" not in rec["meta"]:
            assert rec["caption"] in ann["captions"]


@pytest.mark.parametrize("rec", RECORDS, ids=_rid)
def test_image_file_exists(rec):
    path = MANIFEST.parent / rec["image"]
    assert path.is_file()
    with open(path, "rb") as f:
        assert f.read(3) == b"\xff\xd8\xff"  # JPEG


def _check_triplet(caption: str, triplet: dict) -> None:
    assert set(triplet) == {"subj", "rel", "obj"}
    for role in ("subj", "rel", "obj"):
        sp = triplet[role]
        assert 0 <= sp["start"] < sp["end"] <= len(caption)
        assert caption[sp["start"]:sp["end"]] == sp["text"], (role, caption)
        assert sp["text"] == sp["text"].strip()
    assert triplet["rel"]["kind"] in ("spatial", "action")


@pytest.mark.parametrize("rec", RECORDS, ids=_rid)
def test_spans_match_caption_and_negative(rec):
    _check_triplet(rec["caption"], rec["triplet"])
    neg = rec["negative"]
    _check_triplet(neg["caption"], neg["triplet"])
    t, nt = rec["triplet"], neg["triplet"]
    assert nt["subj"]["text"] == t["subj"]["text"]
    assert nt["obj"]["text"] == t["obj"]["text"]
    assert nt["rel"]["text"] != t["rel"]["text"]
    assert nt["rel"]["kind"] == t["rel"]["kind"]
    assert neg["caption"] != rec["caption"]
    # Only the relation words differ between caption and negative.
    r, nr = t["rel"], nt["rel"]
    assert rec["caption"][: r["start"]] == neg["caption"][: nr["start"]]
    assert rec["caption"][r["end"]:] == neg["caption"][nr["end"]:]


@pytest.mark.parametrize("rec", RECORDS, ids=_rid)
def test_boxes_inside_image(rec):
    assert set(rec["boxes"]) == {"subj", "obj"}
    for box in rec["boxes"].values():
        assert len(box) == 4
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= rec["width"]
        assert 0 <= y0 < y1 <= rec["height"]
        assert (x1 - x0) * (y1 - y0) > 0


def test_positives_reference_other_existing_ids():
    ids = {r["id"] for r in RECORDS}
    for rec in RECORDS:
        assert rec["positive"] in ids
        assert rec["positive"] != rec["id"]


def test_make_manifest_reproduces_manifest(tmp_path):
    out = tmp_path / "manifest.jsonl"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert out.read_bytes() == MANIFEST.read_bytes()
