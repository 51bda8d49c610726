"""The synthetic CLEVR-like scenes: determinism, held-apart splits, labels that match the pixels."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sapretrain.scenes import synthetic as S
from sapretrain.shards.manifest import check_sample

PLANNED = 160  # scenes whose labels are checked without rendering (planning costs ~1 ms each)


@pytest.fixture(scope="module")
def planned():
    return [S.plan_scene("train", i) for i in range(PLANNED)]


def record(scene):
    return S.scene_record(scene.split, scene.index, scene, f"images/{scene.id}.png")


def skeleton(caption, triplet):
    """The caption with its spans replaced by {s}, {r}, {o}: the template it was filled from."""
    for part, mark in sorted((("subj", "{s}"), ("rel", "{r}"), ("obj", "{o}")), key=lambda p: -triplet[p[0]]["start"]):
        caption = caption[:triplet[part]["start"]] + mark + caption[triplet[part]["end"]:]
    return caption


def fits(description, obj):
    """Whether every word of a noun phrase is true of ``obj``."""
    for word in description.split():
        if word in S.COLORS:
            ok = word == obj.color
        elif word in S.SIZES:
            ok = word == obj.size
        elif any(word in words for words in S._NOUNS.values()):
            ok = word in S._NOUNS[obj.shape]
        else:
            ok = word in S._MATERIAL_WORDS[obj.material]
        if not ok:
            return False
    return True


def components(relation):
    """(side, away) of a configuration name: -1/0/+1 for left/none/right and front/none/behind."""
    side = -1 if "left" in relation else 1 if "right" in relation else 0
    away = -1 if "front" in relation else 1 if "behind" in relation else 0
    return side, away


def test_render_is_deterministic():
    first, second = S.render_scene("train", 5), S.render_scene("train", 5)
    assert first.image.size == (320, 240) and first.image.mode == "RGB"
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    assert record(first) == record(second) == record(S.plan_scene("train", 5))


def test_splits_use_disjoint_seeds():
    assert S.EVAL_SEED_BASE == 10**9
    assert S.scene_seed("train", S.EVAL_SEED_BASE - 1) < S.EVAL_SEED_BASE <= S.scene_seed("eval", 0)
    train, held_out = S.render_scene("train", 0), S.render_scene("eval", 0)
    assert held_out.id == "clevr-eval-000000000" and train.seed != held_out.seed
    assert not np.array_equal(np.asarray(train.image), np.asarray(held_out.image))
    with pytest.raises(ValueError, match="outside"):
        S.scene_seed("train", S.EVAL_SEED_BASE)
    with pytest.raises(ValueError, match="unknown split"):
        S.plan_scene("test", 0)


def test_every_relation_is_dealt_evenly(planned):
    assert S.CONFIGURATIONS == ("front", "behind", "left", "right",
                                "front-left", "front-right", "behind-left", "behind-right")
    assert all(S.OPPOSITE[S.OPPOSITE[c]] == c != S.OPPOSITE[c] for c in S.CONFIGURATIONS)
    # Blocks of 8 pairs (16 scenes) hold each caption relation once per pair.
    assert Counter(s.relation for s in planned) == {c: PLANNED // 8 for c in S.CONFIGURATIONS}
    assert set(s.configuration for s in planned) == set(S.CONFIGURATIONS)


def test_captions_vary_and_name_the_subject_either_way(planned):
    templates = {skeleton(s.caption, s.triplet) for s in planned}
    assert templates <= set(S._TEMPLATES) and len(templates) >= 8
    assert {s.subject for s in planned} == {0, 1}
    assert len({s.triplet["rel"]["text"] for s in planned}) >= 16


def test_spans_relation_and_negative(planned):
    for scene in planned:
        rec = record(scene)
        check_sample(rec)
        # The relation label belongs to the caption's grammatical subject.
        expected = scene.configuration if scene.subject == 0 else S.OPPOSITE[scene.configuration]
        assert rec["relation"] == expected
        assert rec["triplet"]["rel"]["text"] in S._PHRASES[expected]
        neg = rec["negative"]
        assert neg["triplet"]["rel"]["text"] in S._PHRASES[S.OPPOSITE[expected]]
        for caption, triplet in ((rec["caption"], rec["triplet"]), (neg["caption"], neg["triplet"])):
            for part in ("subj", "rel", "obj"):
                span = triplet[part]
                assert caption[span["start"]:span["end"]] == span["text"]
            assert triplet["rel"]["kind"] == "spatial"
            assert not triplet["subj"]["text"].startswith(("a ", "the "))
        for part in ("subj", "obj"):
            assert neg["triplet"][part]["text"] == rec["triplet"][part]["text"]
        subj, obj = scene.objects[scene.subject], scene.objects[1 - scene.subject]
        assert rec["triplet"]["subj"]["text"].split()[-1] in S._NOUNS[subj.shape]
        assert rec["triplet"]["obj"]["text"].split()[-1] in S._NOUNS[obj.shape]


def test_descriptions_are_true_and_unambiguous(planned):
    for scene in planned:
        subj, obj = scene.objects[scene.subject], scene.objects[1 - scene.subject]
        assert fits(scene.triplet["subj"]["text"], subj) and not fits(scene.triplet["subj"]["text"], obj)
        assert fits(scene.triplet["obj"]["text"], obj) and not fits(scene.triplet["obj"]["text"], subj)


def test_partners_share_the_relation_and_nothing_else(planned):
    by_id = {s.id: s for s in planned}
    same_objects = 0
    for scene in planned:
        partner = by_id[record(scene)["positive"]]
        assert partner.index == scene.index ^ 1 and record(partner)["positive"] == scene.id
        assert partner.relation == scene.relation
        same_objects += [(o.shape, o.color, o.size, o.material) for o in scene.objects] == \
                        [(o.shape, o.color, o.size, o.material) for o in partner.objects]
        assert scene.objects[0].box != partner.objects[0].box  # placed independently
        assert skeleton(scene.caption, scene.triplet) != skeleton(partner.caption, partner.triplet)
    assert same_objects < len(planned) // 10  # objects are drawn per scene


def test_boxes_show_the_relation_in_the_image(planned):
    for scene in planned:
        rec = record(scene)
        subj, obj = rec["boxes"]["subj"], rec["boxes"]["obj"]
        for x0, y0, x1, y1 in (subj, obj):
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
        side, away = components(rec["relation"])
        centre_dx = (subj[0] + subj[2] - obj[0] - obj[2]) / 2
        if side:
            assert side * centre_dx > 0, rec["caption"]
        if away:  # further away = higher in the image: compare where the boxes meet the ground
            assert away * (obj[3] - subj[3]) > 0, rec["caption"]


def test_behind_object_of_the_same_size_looks_smaller(planned):
    checked = 0
    for scene in planned:
        a, b = scene.objects
        _, away = components(scene.configuration)
        if away and (a.shape, a.size) == (b.shape, b.size):
            far, near = (a, b) if away > 0 else (b, a)
            assert far.box[3] - far.box[1] < near.box[3] - near.box[1]
            if far.shape == "sphere":  # a cube's width also depends on its rotation
                assert far.box[2] - far.box[0] < near.box[2] - near.box[0]
            checked += 1
    assert checked >= 5


def test_boxes_are_the_rendered_silhouettes(monkeypatch):
    """Each gold box is the bounding box of the pixels its object changes (within anti-aliasing)."""
    scene = S.plan_scene("train", 21)
    background = np.asarray(_render_only(monkeypatch, scene, [])).astype(int)
    for k, obj in enumerate(scene.objects):
        alone = np.asarray(_render_only(monkeypatch, scene, [k])).astype(int)
        ys, xs = np.nonzero(np.abs(alone - background).max(axis=-1) > 2)
        x0, y0, x1, y1 = obj.box
        assert abs(xs.min() - x0) <= 1.0 and abs(xs.max() + 1 - x1) <= 1.0
        assert abs(ys.min() - y0) <= 1.0 and abs(ys.max() + 1 - y1) <= 1.0


def _render_only(monkeypatch, scene, keep):
    """Render ``scene`` with shadows but only the objects numbered in ``keep``."""
    composite = S._composite
    with monkeypatch.context() as m:
        m.setattr(S, "_composite", lambda img, obj, cam, light: composite(img, obj, cam, light)
                  if any(obj is scene.objects[k] for k in keep) else None)
        return S._draw(scene)


def test_objects_are_painted_in_their_colours(planned):
    primaries = {"red": 0, "green": 1, "blue": 2}
    checked = 0
    for scene in planned[:24]:
        objects = [o for o in scene.objects if o.color in primaries and o.material == "rubber"]
        if not objects:
            continue
        pixels = np.asarray(S.render_scene("train", scene.index).image).astype(float)
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            centre = pixels[cy - 2:cy + 3, cx - 2:cx + 3].reshape(-1, 3).mean(axis=0)
            assert np.argmax(centre) == primaries[obj.color], (scene.id, obj.color, centre)
            checked += 1
    assert checked >= 3


def test_write_synthetic_is_valid_resumable_and_byte_identical(tmp_path, monkeypatch):
    out = tmp_path / "synthetic"
    manifest = S.write_synthetic(out, "train", count=6, progress=False)
    assert manifest == out / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"clevr-train-{i:09d}" for i in range(6)]
    ids = {r["id"] for r in lines}
    for rec in lines:
        check_sample(rec)
        assert rec["source"] == "clevr-synthetic" and rec["positive"] in ids and rec["positive"] != rec["id"]
        assert rec["image"] == f"images/{rec['id']}.png"
        with Image.open(out / rec["image"]) as image:
            assert image.size == (rec["width"], rec["height"])
    first = manifest.read_bytes()
    image_bytes = (out / "images" / "clevr-train-000000004.png").read_bytes()

    # A second run renders nothing and rewrites the same bytes; a lost image is rendered again.
    (out / "images" / "clevr-train-000000004.png").unlink()
    drawn = []
    draw = S._draw
    monkeypatch.setattr(S, "_draw", lambda scene: drawn.append(scene.index) or draw(scene))
    assert S.write_synthetic(out, "train", count=6, progress=False).read_bytes() == first
    assert drawn == [4]
    assert (out / "images" / "clevr-train-000000004.png").read_bytes() == image_bytes
    assert S.write_synthetic(out, "train", count=6, progress=False).read_bytes() == first
    assert drawn == [4]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_write_synthetic_with_workers_matches_serial(tmp_path):
    serial = S.write_synthetic(tmp_path / "serial", "eval", count=4, progress=False)
    pooled = S.write_synthetic(tmp_path / "pooled", "eval", count=4, workers=2, progress=False)
    assert serial.read_bytes() == pooled.read_bytes()
    for path in (tmp_path / "serial" / "images").iterdir():
        assert path.read_bytes() == (tmp_path / "pooled" / "images" / path.name).read_bytes()


def test_write_synthetic_rejects_unpaired_counts(tmp_path):
    with pytest.raises(ValueError, match="even"):
        S.write_synthetic(tmp_path, count=5, progress=False)
