"""Subject/object boxes: noun matching, ground-truth choice, detector path, drops, resume."""
from __future__ import annotations

import json
import sys

import pytest
from conftest import PROJECT_ROOT, make_image

from sapretrain.config import ConfigError
from sapretrain.curation.rois import (
    NounMatcher,
    RoiStage,
    YoloDetector,
    count_box_sources,
    load_roi_config,
)
from sapretrain.curation.stage import StageConfig, dropped_output, run_stage

sys.path.insert(0, str(PROJECT_ROOT / "tools"))
import detect_rois  # noqa: E402

PHOTOS = PROJECT_ROOT / "tests" / "fixtures" / "coco" / "images"


@pytest.fixture(scope="module")
def cfg():
    return load_roi_config(None, ["detector.enabled=false"])


@pytest.fixture(scope="module")
def matcher(cfg):
    return NounMatcher(cfg.synonyms, cfg.hypernyms)


def part(caption, text, head=None):
    start = caption.index(text)
    p = {"text": text, "start": start, "end": start + len(text)}
    return {**p, "head": head} if head else p


def sample(caption, subj, obj, objects=None, image="unused.jpg", size=(640, 480), id_="s", subj_head=None,
           obj_head=None):
    record = {"id": id_, "image": str(image), "caption": caption,
              "triplet": {"subj": part(caption, subj, subj_head), "rel": {"text": "x", "start": 0, "end": 1},
                          "obj": part(caption, obj, obj_head)}}
    if size:
        record["width"], record["height"] = size
    if objects is not None:
        record["objects"] = [{"name": n, "box": b, **({"crowd": True} if c else {})} for n, b, *c in objects]
    return record


# ---------------------------------------------------------------------------------------------
# Nouns


@pytest.mark.parametrize("text, head, noun", [
    ("men", None, "man"), ("puppies", None, "puppy"), ("two ponies", None, "pony"), ("knives", None, "knife"),
    ("boxes", None, "box"), ("benches", None, "bench"), ("buses", None, "bus"), ("glasses", None, "glasses"),
    ("skis", None, "skis"), ("skis", "ski", "ski"), ("white shirt", None, "shirt"), ("hot dog", "dog", "hot dog"),
    ("big teddy bear", "bear", "teddy bear"), ("cell phone", "phone", "cell phone"), ("Trees", None, "tree"),
    ("man in a green shirt", "man", "man"), ("dining room table", "table", "table"), ("people", "people", "people"),
])
def test_noun(matcher, text, head, noun):
    assert matcher.noun(text, head) == noun


@pytest.mark.parametrize("noun, name, level", [
    ("shirt", "shirt", 0), ("man", "person", 1), ("woman", "person", 1), ("people", "person", 1),
    ("skier", "person", 1), ("puppy", "dog", 1), ("kitten", "cat", 1), ("bike", "bicycle", 1),
    ("motorbike", "motorcycle", 1), ("jet", "airplane", 1), ("plane", "jet", 1), ("cellphone", "cell phone", 1),
    ("phone", "cell phone", 1), ("television", "tv", 1), ("sofa", "couch", 1), ("doughnut", "donut", 1),
    ("guy", "man", 1), ("table", "dining table", 1), ("animal", "dog", 2), ("dog", "animal", 2),
    ("computer", "laptop", 2), ("glass", "wine glass", 2), ("dog", "cat", None), ("hot dog", "dog", None),
    ("shirt", "person", None), ("", "person", None),
])
def test_level(matcher, noun, name, level):
    assert matcher.level(noun, name) == level


def test_config_checks():
    with pytest.raises(ConfigError, match="both"):
        NounMatcher({"dog": ["puppy"], "cat": ["puppy"]}, {})
    with pytest.raises(ConfigError, match="unknown config key"):
        load_roi_config(None, ["detector.weigths=x.pt"])
    cfg = load_roi_config()
    # COCO's 80 categories and the synthetic scenes' two shapes
    assert len(cfg.synonyms) == 82 and {"cube", "sphere"} <= set(cfg.synonyms)
    assert cfg.detector.fallback_for_gt_sources is False and cfg.detector.imgsz is None


# ---------------------------------------------------------------------------------------------
# Ground truth


def run(records, cfg, detector=None):
    return RoiStage(cfg, detector).process(records)


def test_gt_largest_box_and_crowd_skipped(cfg):
    objects = [("person", [0, 0, 10, 10]), ("person", [0, 0, 100, 200]), ("person", [0, 0, 600, 400], True),
               ("horse", [50, 50, 300, 300]), ("horse", [0, 0, 20, 20])]
    out, = run([sample("a man riding a horse", "man", "horse", objects)], cfg)
    assert out["boxes"] == {"subj": [0.0, 0.0, 100.0, 200.0], "obj": [50.0, 50.0, 300.0, 300.0]}
    assert out["box_source"] == "gt"
    only_crowd = [("person", [0, 0, 600, 400], True), ("horse", [50, 50, 300, 300])]
    out, = run([sample("a man riding a horse", "man", "horse", only_crowd)], cfg)
    assert out["drop_reason"] == "no_box" and out["drop_detail"].startswith("gt subj: no 'man' (person)")


def test_gt_same_category_two_instances(cfg):
    objects = [("person", [300, 0, 350, 50]), ("person", [0, 0, 100, 200]), ("person", [10, 10, 30, 30])]
    rec = sample("a man next to a woman", "man", "woman", objects)
    out, = run([rec], cfg)
    # subject: the largest instance; object: the largest one left
    assert out["boxes"] == {"subj": [0.0, 0.0, 100.0, 200.0], "obj": [300.0, 0.0, 350.0, 50.0]}
    strict = load_roi_config(None, ["detector.enabled=false", "same_category=false"])
    assert run([rec], strict)[0]["drop_reason"] == "same_box"
    out, = run([sample("a man next to a woman", "man", "woman", objects[1:2])], cfg)
    assert out["drop_reason"] == "same_box"


def test_gt_vg_free_form_names(cfg):
    caption = "a guy in a white shirt next to a person"
    objects = [("white shirt", [10, 40, 60, 90]), ("man", [0, 0, 80, 200]), ("person", [1, 1, 80, 199]),
               ("people", [200, 0, 400, 300])]
    # "guy" matches "man", "person" and "people" by category: the largest wins; "shirt" by name
    out, = run([sample(caption, "guy", "white shirt", objects)], cfg)
    assert out["boxes"] == {"subj": [200.0, 0.0, 400.0, 300.0], "obj": [10.0, 40.0, 60.0, 90.0]}
    out, = run([sample(caption, "guy", "person", objects[:3])], cfg)
    assert out["drop_reason"] == "same_box"  # "man" and "person" are one instance (IoU > 0.9)
    out, = run([sample("a man next to a horse", "man", "horse", [("man", [0, 0, 10, 10]), ("person", [0, 0, 99, 99]),
                                                                  ("horse", [100, 0, 200, 100])])], cfg)
    assert out["boxes"]["subj"] == [0.0, 0.0, 10.0, 10.0]  # the same noun beats a larger synonym


def test_gt_clipping_and_tiny_boxes(cfg):
    objects = [("dog", [-5, 10, 50, 500]), ("frisbee", [639, 470, 660, 490])]
    out, = run([sample("a dog catching a frisbee", "dog", "frisbee", objects)], cfg)
    assert out["drop_reason"] == "no_box" and "obj: no 'frisbee'" in out["drop_detail"]  # 1 px wide once clipped
    objects[1] = ("frisbee", [600, 400, 660, 500])
    out, = run([sample("a dog catching a frisbee", "dog", "frisbee", objects)], cfg)
    assert out["boxes"] == {"subj": [0.0, 10.0, 50.0, 480.0], "obj": [600.0, 400.0, 640.0, 480.0]}


def test_bad_triplet(cfg):
    rec = sample("a dog on a couch", "dog", "couch", [])
    del rec["triplet"]["obj"]
    assert run([rec], cfg)[0]["drop_reason"] == "bad_triplet"


# ---------------------------------------------------------------------------------------------
# Detector path (a fake detector with known boxes)


class FakeDetector:
    """Same interface as ``YoloDetector``: boxes by image file name; records its calls."""

    def __init__(self, boxes, open_vocab=False):
        self.boxes, self.open_vocab, self.calls = boxes, open_vocab, []

    def __call__(self, images, classes=None):
        self.calls.append((len(images), classes))
        return [self.boxes.get(im.info["name"], []) for im in images]


@pytest.fixture()
def photos(tmp_path, monkeypatch):
    """Three small JPEGs; decoded images carry their file name (for the fake detector)."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"im{i}.jpg")
        make_image(paths[-1], size=(200, 100), seed=i)
    import sapretrain.curation.rois as rois

    real = rois.load_image

    def tagged(ref):
        image = real(ref)
        if image is not None:
            image.info["name"] = ref.rsplit("/", 1)[-1]
        return image

    monkeypatch.setattr(rois, "load_image", tagged)
    return paths


def test_fake_detector_batched_and_cached(photos):
    cfg = load_roi_config(None, ["detector.batch=2"])
    fake = FakeDetector({
        "im0.jpg": [{"name": "person", "box": [10, 10, 60, 90], "score": 0.9},
                    {"name": "horse", "box": [80, 20, 260, 120], "score": 0.8}],
        "im1.jpg": [{"name": "dog", "box": [0, 0, 50, 50], "score": 0.9},
                    {"name": "cat", "box": [60, 0, 61, 50], "score": 0.9}],
    }, open_vocab=True)
    records = [sample("a man riding a horse", "man", "horse", image=photos[0], size=None, id_="a"),
               sample("a woman on a horse", "woman", "horse", image=photos[0], size=None, id_="b"),
               sample("a puppy next to a kitten", "puppy", "kitten", image=photos[1], size=None, id_="c"),
               sample("a cat on a bed", "cat", "bed", image=photos[2], size=None, id_="d")]
    out = run(records, cfg, fake)
    assert [n for n, _ in fake.calls] == [2, 1]  # 3 images in batches of 2, each image once
    assert fake.calls[0][1] == ["horse", "kitten", "man", "puppy", "woman"]  # open vocabulary: the batch's nouns
    assert out[0]["boxes"] == {"subj": [10.0, 10.0, 60.0, 90.0], "obj": [80.0, 20.0, 200.0, 100.0]}
    assert out[0]["box_source"] == "detector" and (out[0]["width"], out[0]["height"]) == (200, 100)
    assert out[1]["boxes"] == out[0]["boxes"]
    assert out[2]["drop_reason"] == "no_box" and "obj: no 'kitten' (cat)" in out[2]["drop_detail"]  # 1 px wide
    assert out[3]["drop_reason"] == "no_box" and out[3]["drop_detail"].startswith("detector subj")


def test_fallback_for_gt_sources(photos):
    fake = FakeDetector({"im0.jpg": [{"name": "person", "box": [10, 10, 60, 90], "score": 0.9},
                                     {"name": "horse", "box": [80, 20, 190, 90], "score": 0.8}]})
    gt_lacks_horse = sample("a man riding a horse", "man", "horse", [("person", [0, 0, 20, 20])], image=photos[0],
                            size=(200, 100))
    out, = run([dict(gt_lacks_horse)], load_roi_config(), fake)
    assert out["drop_reason"] == "no_box" and out["drop_detail"].startswith("gt obj") and not fake.calls
    out, = run([dict(gt_lacks_horse)], load_roi_config(None, ["detector.fallback_for_gt_sources=true"]), fake)
    assert out["box_source"] == "detector" and out["boxes"]["obj"] == [80.0, 20.0, 190.0, 90.0]
    no_gt = sample("a man riding a horse", "man", "horse", image=photos[0])
    out, = run([no_gt], load_roi_config(None, ["detector.enabled=false"]), fake)
    assert out["drop_reason"] == "no_box" and "detector disabled" in out["drop_detail"]


def test_unreadable_images(tmp_path, cfg, photos):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    fake = FakeDetector({})
    records = [sample("a dog on a couch", "dog", "couch", image=junk, id_="a"),
               sample("a dog on a couch", "dog", "couch", image=tmp_path / "missing.jpg", id_="b"),
               sample("a dog on a couch", "dog", "couch", [("dog", [0, 0, 9, 9])], image=junk, size=None, id_="c")]
    out = run(records, load_roi_config(), fake)
    assert [r["drop_reason"] for r in out] == ["unreadable_image"] * 3
    assert not fake.calls  # nothing readable: the detector is not called


# ---------------------------------------------------------------------------------------------
# The real ultralytics path (random-init model: runs offline, finds nothing) and the tool


def test_random_init_yolo_end_to_end(tmp_path, capsys):
    photos = sorted(PHOTOS.glob("*.jpg"))[:3]
    records = [sample("a man riding a horse", "man", "horse", image=p, size=None, id_=f"p{i}")
               for i, p in enumerate(photos)]
    gt = [("person", [0, 0, 50, 90]), ("horse", [40, 30, 300, 200])]
    records.append(sample("a man riding a horse", "man", "horse", gt, image=photos[0], size=(640, 480), id_="gt"))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    argv = ["--input", str(src), "--output", str(out), "--weights", "yolov8n.yaml", "--no-progress",
            "detector.imgsz=160", "detector.batch=2"]
    assert detect_rois.main(argv) == 0
    printed = capsys.readouterr().out
    assert "kept 1, dropped: no_box 3" in printed and "kept by box_source: gt 1" in printed
    dropped = [json.loads(line) for line in open(dropped_output(str(out)))]
    assert all(d["drop_detail"].startswith("detector subj: no 'man' (person)") for d in dropped)
    assert "width" in dropped[0]  # size taken from the decoded image
    assert count_box_sources(str(out)) == {"gt": 1}

    detector = YoloDetector("yolov8n.yaml", imgsz=160, batch=2)
    from PIL import Image

    found = detector([Image.open(p).convert("RGB") for p in photos[:2]])
    assert len(found) == 2 and all(isinstance(f, list) for f in found) and not detector.open_vocab


def test_stage_resume(tmp_path, cfg):
    objects = [("person", [0, 0, 100, 200]), ("horse", [50, 50, 300, 300])]
    lines = [json.dumps(sample("a man riding a horse", "man", "horse" if i % 3 else "man", objects, id_=f"s{i}"))
             for i in range(10)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")

    class Crashing(RoiStage):
        def process(self, records):
            if records[0]["id"] == "s6":
                raise RuntimeError("killed")
            return super().process(records)

    with pytest.raises(RuntimeError):
        run_stage(Crashing(cfg), str(src), str(tmp_path / "a.jsonl"), StageConfig(chunk_size=3), progress=False)
    resumed = run_stage(RoiStage(cfg), str(src), str(tmp_path / "a.jsonl"), StageConfig(chunk_size=3), progress=False)
    whole = run_stage(RoiStage(cfg), str(src), str(tmp_path / "b.jsonl"), StageConfig(chunk_size=3), progress=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert resumed["kept"] == whole["kept"] == 6 and resumed["dropped"] == {"same_box": 4}
    with pytest.raises(RuntimeError):
        run_stage(Crashing(cfg), str(src), str(tmp_path / "c.jsonl"), StageConfig(chunk_size=3), progress=False)
    other = load_roi_config(None, ["detector.enabled=false", "min_box_size=4"])
    with pytest.raises(ValueError, match="other settings"):
        run_stage(RoiStage(other), str(src), str(tmp_path / "c.jsonl"), StageConfig(chunk_size=3), progress=False)
