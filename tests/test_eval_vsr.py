"""VSR zero-shot evaluation (sapretrain/eval/vsr.py): reading, boxes, spans, contrast captions, metrics."""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from sapretrain.eval import vsr
from sapretrain.eval.encode import EvalSample

COCO_DIR = Path(__file__).resolve().parent / "fixtures" / "coco"
ANNOTATIONS = COCO_DIR / "annotations.jsonl"
IMAGES = COCO_DIR / "images"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "yolo"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def fixture_vsr_rows() -> list[dict]:
    """The fixture's 5 VSR rows as VSR JSONL rows; subj/obj read off the templated caption."""
    rows = []
    for line in ANNOTATIONS.read_text().splitlines():
        record = json.loads(line)
        for entry in record["vsr"]:
            match = re.fullmatch(rf"The (.+) is {re.escape(entry['relation'])} the (.+)\.", entry["caption"])
            rows.append({"image": record["file_name"], "caption": entry["caption"], "label": entry["label"],
                         "relation": entry["relation"], "subj": match.group(1), "obj": match.group(2)})
    return rows


def row(caption, relation, subj, obj, label=1, image="a.jpg"):
    return {"image": image, "caption": caption, "label": label, "relation": relation, "subj": subj, "obj": obj}


# --------------------------------------------------------------------------------------------
# Reading and tables


def test_read_vsr_skips_and_counts_bad_lines(tmp_path):
    good = row("The cat is under the table.", "under", "cat", "dining table")
    path = write_jsonl(tmp_path / "vsr.jsonl", [
        good,
        "{not json",
        {k: v for k, v in good.items() if k != "caption"},  # missing field
        {**good, "label": 2},
        {**good, "label": "1"},
        {**good, "label": True},
        {**good, "relation": "levitating above"},
        "",
        {**good, "caption": "The cat is on the table.", "relation": "on", "label": 0, "id": "x7"},
        {k: v for k, v in good.items() if k not in ("subj", "obj")},  # random split: no subj/obj, kept
        {**good, "subj": 3},
    ])
    rows, bad = vsr.read_vsr(str(path))
    assert [r["caption"] for r in rows] == ["The cat is under the table.", "The cat is on the table.",
                                            "The cat is under the table."]
    assert [r["id"] for r in rows] == ["vsr.jsonl:1", "x7", "vsr.jsonl:10"]
    assert vsr.bad_line_counts(bad) == {"not_json": 1, "missing_field": 2, "bad_label": 3, "unknown_relation": 1}
    assert [(b["line"], b["reason"]) for b in bad] == [
        (2, "not_json"), (3, "missing_field"), (4, "bad_label"), (5, "bad_label"), (6, "bad_label"),
        (7, "unknown_relation"), (11, "missing_field")]


def test_relation_tables_are_consistent():
    assert len(vsr.RELATIONS) == 64
    assert set(vsr.INVERSE) <= vsr.RELATIONS and vsr.SYMMETRIC <= vsr.RELATIONS
    assert not set(vsr.INVERSE) & vsr.SYMMETRIC
    assert {r["relation"] for r in fixture_vsr_rows()} <= vsr.RELATIONS
    assert vsr.contrast_mode("left of") == "inverse"
    assert vsr.contrast_mode("touching") == "threshold"
    assert vsr.contrast_mode("against") == "swap"


# --------------------------------------------------------------------------------------------
# Boxes


def test_boxes_from_fixture_annotations():
    index = vsr.load_coco_annotations(str(ANNOTATIONS))
    assert len(index) == 23
    boxes = vsr.boxes_from_coco(index, "000000519208.jpg", "person", "elephant")
    assert boxes["subj"] == pytest.approx([282.2, 33.79, 282.2 + 356.84, 33.79 + 367.76])
    assert boxes["obj"] == pytest.approx([0.0, 0.0, 640.0, 400.53])
    # The larger crowd "person" box and the first-listed bench are not the largest non-crowd ones.
    boxes = vsr.boxes_from_coco(index, "000000174375.jpg", "person", "bench")
    assert boxes["subj"] == pytest.approx([271.55, 161.2, 271.55 + 76.77, 161.2 + 191.91])
    assert boxes["obj"] == pytest.approx([0.0, 253.27, 29.73, 253.27 + 50.36])
    # Same category: the two largest, the larger one the subject.
    boxes = vsr.boxes_from_coco(index, "000000212679.jpg", "wine glass", "wine glass")
    assert boxes["subj"] == pytest.approx([411.31, 31.21, 411.31 + 66.21, 31.21 + 82.68])
    assert boxes["obj"] == pytest.approx([467.68, 117.36, 467.68 + 67.68, 117.36 + 64.51])
    assert vsr.boxes_from_coco(index, "000000519208.jpg", "person", "giraffe") is None
    assert vsr.boxes_from_coco(index, "000000519208.jpg", "person", "person") is None  # only one
    assert vsr.boxes_from_coco(index, "no-such.jpg", "person", "elephant") is None


def test_official_instances_format_gives_the_same_boxes(tmp_path):
    official = {
        "images": [{"id": 5, "file_name": "000000519208.jpg", "width": 640, "height": 406}],
        "categories": [{"id": 1, "name": "person"}, {"id": 22, "name": "elephant"}],
        "annotations": [
            {"image_id": 5, "category_id": 1, "bbox": [282.2, 33.79, 356.84, 367.76], "iscrowd": 0},
            {"image_id": 5, "category_id": 1, "bbox": [0, 0, 640, 406], "iscrowd": 1},
            {"image_id": 5, "category_id": 22, "bbox": [0.0, 0.0, 640.0, 400.53], "iscrowd": 0},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(official))
    index = vsr.load_coco_annotations(str(tmp_path / "instances.json"))
    expected = vsr.boxes_from_coco(vsr.load_coco_annotations(str(ANNOTATIONS)), "000000519208.jpg",
                                   "person", "elephant")
    assert vsr.boxes_from_coco(index, "000000519208.jpg", "person", "elephant") == expected


# --------------------------------------------------------------------------------------------
# Spans and contrast captions


def test_locate_svo_on_templated_captions():
    caption = "The book is at the left side of the wine glass."
    t = vsr.locate_svo(caption, "book", "at the left side of", "wine glass")
    assert {p: (t[p]["start"], t[p]["end"]) for p in ("subj", "rel", "obj")} == {
        "subj": (4, 8), "rel": (12, 31), "obj": (36, 46)}
    assert caption[36:46] == "wine glass"
    # Same category twice: subject first, object after the relation; case-insensitive.
    t = vsr.locate_svo("The Person is behind the person.", "person", "behind", "person")
    assert (t["subj"]["start"], t["obj"]["start"]) == (4, 25)
    # "on" must be a word, not the "on" of "person"; missing parts give None.
    assert vsr.locate_svo("The person is on the bed.", "person", "on", "bed")["rel"]["start"] == 14
    assert vsr.locate_svo("The cat is under the table.", "cat", "under", "dog") is None
    found, flipped = vsr.caption_triplet("The bed is under the book.", "bed", "under", "book", nlp=None)
    assert (found["subj"]["text"], found["rel"]["text"], found["obj"]["text"], flipped) == ("bed", "under", "book", False)
    assert vsr.caption_triplet("A cat.", "cat", "under", "table", nlp=None) is None


def test_caption_triplet_uses_the_extractor():
    from sapretrain.curation.svo import load_nlp

    try:
        nlp = load_nlp()
    except (ImportError, OSError):
        pytest.skip("no spaCy model installed")
    t, flipped = vsr.caption_triplet("The book is at the left side of the wine glass.", "book",
                                     "at the left side of", "wine glass", nlp)
    assert (t["subj"]["text"], t["rel"]["text"], t["obj"]["text"], flipped) == (
        "book", "at the left side of", "wine glass", False)
    # A passive: the extractor takes the agent as subject, so the match is flipped.
    t, flipped = vsr.caption_triplet("The umbrella is enclosed by the person.", "umbrella", "enclosed by",
                                     "person", nlp)
    assert (t["subj"]["text"], t["obj"]["text"], flipped) == ("person", "umbrella", True)


def test_contrast_captions():
    assert vsr.contrast_caption("The cat is left of the dog.", "cat", "left of", "dog") == (
        "The cat is right of the dog.", "cat", "right of", "dog")
    assert vsr.contrast_caption("The bed is under the book.", "bed", "under", "book")[0] == "The bed is on the book."
    # The copula follows the relation's form, both ways.
    assert vsr.contrast_caption("The bowl contains the broccoli.", "bowl", "contains", "broccoli")[0] == (
        "The bowl is inside the broccoli.")
    assert vsr.contrast_caption("The tail is part of the cat.", "tail", "part of", "cat")[0] == (
        "The tail has as a part the cat.")
    assert vsr.contrast_caption("The cats are near the dog.", "cats", "near", "dog")[0] == (
        "The cats are far from the dog.")
    # Asymmetric without an opposite: subject and object exchanged.
    assert vsr.contrast_caption("The wine glass is against the cup.", "wine glass", "against", "cup") == (
        "The cup is against the wine glass.", "cup", "against", "wine glass")
    # Symmetric without an opposite: no contrast.
    assert vsr.contrast_caption("The pizza is touching the book.", "pizza", "touching", "book") is None


def test_tune_threshold():
    assert vsr.tune_threshold([0.2, 0.4, 0.5, 0.6], [0, 0, 1, 1]) == pytest.approx(0.45)
    # Best accuracy 3/4 is reached at 0.3 and 0.55; the lower one is taken.
    assert vsr.tune_threshold([0.2, 0.4, 0.5, 0.6], [0, 1, 0, 1]) == pytest.approx(0.3)
    assert vsr.tune_threshold([0.3, 0.5], [1, 1]) == pytest.approx(-0.7)  # all true: below all scores
    with pytest.raises(ValueError):
        vsr.tune_threshold([], [])


# --------------------------------------------------------------------------------------------
# Metrics with a fake encoder


class FakeEncoder:
    """v = e0 for every image; u(caption) = (s, sqrt(1 - s^2)), so sim(v, u(caption)) = s."""

    batch_size = 4

    def __init__(self, sims: dict[str, float]):
        self.sims = sims
        self.image_samples: list[EvalSample] = []
        self.text_samples: list[EvalSample] = []

    def texts(self, samples):
        self.text_samples += samples
        return torch.tensor([[self.sims[s.caption], math.sqrt(1 - self.sims[s.caption] ** 2)] for s in samples])

    def images(self, samples):
        self.image_samples += samples
        return torch.tensor([[1.0, 0.0]] * len(samples))


SUBJ_BOX, OBJ_BOX = [2.0, 3.0, 20.0, 30.0], [30.0, 10.0, 60.0, 40.0]


@pytest.fixture
def scene(tmp_path):
    """Images a.jpg / b.jpg (64x48) with a cat, a dog and a bird, and their annotations."""
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48), (120, 90, 60)).save(tmp_path / name)
    objects = [{"category": "cat", "bbox_xywh": [2, 3, 18, 27], "iscrowd": 0},
               {"category": "dog", "bbox_xywh": [30, 10, 30, 30], "iscrowd": 0},
               {"category": "bird", "bbox_xywh": [40, 5, 20, 10], "iscrowd": 0}]
    return tmp_path, {"a.jpg": objects, "b.jpg": objects}


EVAL_ROWS = [  # caption, relation, subj, obj, label; sims of caption and contrast caption
    ("The cat is left of the dog.", "left of", "cat", "dog", 1),      # 0.8 > 0.5: true, right
    ("The cat is above the dog.", "above", "cat", "dog", 0),          # 0.6 < 0.7: false, right
    ("The bird is above the dog.", "above", "bird", "dog", 1),        # 0.3 < 0.4: false, wrong
    ("The cat is against the dog.", "against", "cat", "dog", 1),      # 0.5 > 0.2 (swapped): right
    ("The cat is touching the dog.", "touching", "cat", "dog", 1),    # 0.7 > t=0.45: right
    ("The bird is touching the dog.", "touching", "bird", "dog", 1),  # 0.3 < t: wrong
]
DEV_ROWS = [("The bird is touching the cat.", "touching", "bird", "cat", 1),
            ("The bird is near the cat.", "near", "bird", "cat", 0),
            ("The dog is near the cat.", "near", "dog", "cat", 1),
            ("The cat is touching the bird.", "touching", "cat", "bird", 0)]
SIMS = {"The cat is left of the dog.": 0.8, "The cat is right of the dog.": 0.5,
        "The cat is above the dog.": 0.6, "The cat is below the dog.": 0.7,
        "The bird is above the dog.": 0.3, "The bird is below the dog.": 0.4,
        "The cat is against the dog.": 0.5, "The dog is against the cat.": 0.2,
        "The cat is touching the dog.": 0.7, "The bird is touching the dog.": 0.3,
        # dev: 0.2 (0), 0.4 (0), 0.5 (1), 0.6 (1) -> threshold 0.45
        "The bird is touching the cat.": 0.6, "The bird is near the cat.": 0.2,
        "The dog is near the cat.": 0.5, "The cat is touching the bird.": 0.4}


def rows_of(spec, image="a.jpg"):
    return [{**row(c, r, s, o, y, image), "id": f"r{i}"} for i, (c, r, s, o, y) in enumerate(spec)]


def test_contrast_rule_metrics(scene):
    root, annotations = scene
    encoder = FakeEncoder(SIMS)
    result = vsr.evaluate_vsr(encoder, rows_of(EVAL_ROWS), str(root), annotations,
                              dev_rows=rows_of(DEV_ROWS, "b.jpg"), progress=False, nlp=None)
    assert result["threshold"] == pytest.approx(0.45)
    assert result["dev"] == {"n": 4, "skipped": {}}
    assert (result["n"], result["correct"]) == (6, 4)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert {k: (v["n"], v["accuracy"]) for k, v in result["per_relation"].items()} == {
        "left of": (1, 1.0), "above": (2, 0.5), "against": (1, 1.0), "touching": (2, 0.5)}
    assert result["per_category"]["projective"]["accuracy"] == pytest.approx(2 / 3)
    assert result["modes"] == {"inverse": 3, "swap": 1, "threshold": 2}
    assert [p["pred"] for p in result["predictions"]] == [1, 0, 0, 1, 1, 0]
    assert result["predictions"][0]["score"] == pytest.approx(0.8 - 0.5)
    assert result["predictions"][4]["score"] == pytest.approx(0.7 - 0.45)
    assert result["skipped"] == {}
    # Boxes and spans reach the encoder: the swapped caption names the dog as its subject.
    # (the 4 dev rows come first: encoder.image_samples[4] is the first evaluated row's)
    assert {k: list(b) for k, b in encoder.image_samples[4].boxes.items()} == {"subj": SUBJ_BOX, "obj": OBJ_BOX}
    assert list(encoder.image_samples[-1].boxes["subj"]) == [40.0, 5.0, 60.0, 15.0]  # the bird
    swapped = next(s for s in encoder.text_samples if s.caption == "The dog is against the cat.")
    assert swapped.triplet["subj"]["text"] == "dog" and swapped.triplet["obj"]["text"] == "cat"

    table = vsr.format_vsr_table(result)
    lines = table.splitlines()
    assert "| **overall (all rows)** | 6 | 66.7 |" in lines
    assert (result["scored"], result["accuracy_scored"], result["boxes"]) == (6, pytest.approx(4 / 6), "gold")
    assert lines.index("| above | 2 | 50.0 |") < lines.index("| left of | 1 | 100.0 |")


def test_contrast_rule_without_dev_skips_symmetric_relations(scene):
    root, annotations = scene
    result = vsr.evaluate_vsr(FakeEncoder(SIMS), rows_of(EVAL_ROWS), str(root), annotations,
                              progress=False, nlp=None)
    assert result["threshold"] is None
    # Over all 6 rows: the 2 symmetric rows cannot be scored and count as wrong.
    assert (result["n"], result["scored"], result["correct"]) == (6, 4, 3)
    assert result["accuracy"] == pytest.approx(3 / 6) and result["accuracy_scored"] == pytest.approx(3 / 4)
    assert result["skipped"] == {"no_contrast": 2}
    assert result["skipped_rows"] == [{"id": "r4", "reason": "no_contrast"}, {"id": "r5", "reason": "no_contrast"}]
    assert result["per_relation"]["touching"] == {"n": 2, "accuracy": 0.0}
    assert [p["pred"] for p in result["predictions"]] == [1, 0, 0, 1, None, None]
    assert result["predictions"][4]["skipped"] == "no_contrast"


def test_threshold_rule_is_tuned_on_dev_only(scene):
    root, annotations = scene
    dev = rows_of(DEV_ROWS, "b.jpg")
    result = vsr.evaluate_vsr(FakeEncoder(SIMS), rows_of(EVAL_ROWS), str(root), annotations,
                              rule="threshold", dev_rows=dev, progress=False, nlp=None)
    assert result["threshold"] == pytest.approx(0.45)
    assert [p["pred"] for p in result["predictions"]] == [1, 1, 0, 1, 1, 0]  # sim > 0.45
    assert (result["n"], result["correct"]) == (6, 3)
    assert result["modes"] == {"threshold": 6}
    # The evaluated labels play no part: flipping them all leaves threshold and predictions.
    flipped = [{**r, "label": 1 - r["label"]} for r in rows_of(EVAL_ROWS)]
    again = vsr.evaluate_vsr(FakeEncoder(SIMS), flipped, str(root), annotations, rule="threshold",
                             dev_rows=dev, progress=False, nlp=None)
    assert again["threshold"] == result["threshold"]
    assert [p["pred"] for p in again["predictions"]] == [p["pred"] for p in result["predictions"]]
    assert again["correct"] == 3  # 6 - 3
    with pytest.raises(ValueError, match="dev_rows"):
        vsr.evaluate_vsr(FakeEncoder(SIMS), dev, str(root), annotations, rule="threshold", progress=False, nlp=None)


def test_unusable_rows_are_skipped_and_counted(scene):
    root, annotations = scene
    rows = rows_of(EVAL_ROWS[:1]) + [
        {**row("The cat is left of the dog.", "left of", "cat", "dog"), "id": "gone", "image": "gone.jpg"},
        {**row("The cat is left of the horse.", "left of", "cat", "horse"), "id": "no-horse"},
        {**row("The cat is levitating over the dog.", "levitating over", "cat", "dog"), "id": "odd"},
        {**row("The cat sleeps.", "left of", "cat", "dog"), "id": "no-svo"},
    ]
    sims = {**SIMS, "The cat is left of the horse.": 0.1, "The cat is right of the horse.": 0.2}
    bad_lines = [{"id": "vsr.jsonl:9", "line": 9, "reason": "not_json"}]
    result = vsr.evaluate_vsr(FakeEncoder(sims), rows, str(root), annotations, bad_lines=bad_lines,
                              progress=False, nlp=None)
    assert (result["n"], result["scored"], result["correct"]) == (6, 1, 1)  # every row of the file counts
    assert result["accuracy"] == pytest.approx(1 / 6) and result["accuracy_scored"] == 1.0
    assert [p["id"] for p in result["predictions"]] == ["r0", "gone", "no-horse", "odd", "no-svo", "vsr.jsonl:9"]
    assert result["skipped"] == {"missing_image": 1, "no_box": 1, "unknown_relation": 1, "no_svo": 1, "not_json": 1}
    assert [r["id"] for r in result["skipped_rows"]] == ["gone", "no-horse", "odd", "no-svo", "vsr.jsonl:9"]
    with pytest.raises(ValueError, match="one box source"):
        vsr.evaluate_vsr(FakeEncoder(sims), rows, str(root), annotations, detector=lambda im: [], nlp=None)


def test_detector_supplies_boxes_once_per_image(scene):
    root, _ = scene
    calls = []

    def detector(images):  # the project's detector interface (sapretrain.detector.YoloDetector)
        calls.append(images[0].size)
        return [[{"name": "cat", "box": [2, 3, 20, 30], "score": 0.9},
                 {"name": "dog", "box": [30, 10, 60, 40], "score": 0.8}]]

    encoder = FakeEncoder(SIMS)
    result = vsr.evaluate_vsr(encoder, rows_of(EVAL_ROWS[:3]), str(root), detector=detector,
                              progress=False, nlp=None)
    assert calls == [(64, 48)]  # three rows, one image
    assert (result["n"], result["scored"], result["boxes"]) == (3, 2, "detector")
    assert result["skipped"] == {"no_box": 1}  # no bird found
    assert [list(s.boxes["obj"]) for s in encoder.image_samples] == [OBJ_BOX, OBJ_BOX]
    # A shared cache: a second model and the geometry baseline reuse the detections.
    shared: dict = {}
    for _ in range(2):
        vsr.evaluate_vsr(FakeEncoder(SIMS), rows_of(EVAL_ROWS[:3]), str(root), detector=detector,
                         progress=False, nlp=None, detections=shared)
    geometry = vsr.evaluate_geometry(rows_of(EVAL_ROWS[:3]), str(root), detector=detector, nlp=None,
                                     detections=shared)
    assert calls == [(64, 48)] * 2 and list(shared) == ["a.jpg"]
    assert (geometry["scored"], geometry["boxes"]) == (2, "detector")


# --------------------------------------------------------------------------------------------
# Real models on the real fixture rows


@pytest.fixture(scope="module")
def fixture_annotations():
    return vsr.load_coco_annotations(str(ANNOTATIONS))


def test_end_to_end_random_saclip_on_fixture_rows(tmp_path, fixture_annotations):
    from sapretrain.eval.encode import Encoder
    from sapretrain.model import SAClipConfig, build_saclip

    path = write_jsonl(tmp_path / "vsr.jsonl", fixture_vsr_rows())
    rows, bad = vsr.read_vsr(str(path))
    assert len(rows) == 5 and not bad
    torch.manual_seed(0)
    model = build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False)).eval()
    encoder = Encoder(model, batch_size=8)

    # nlp: the default, the training extractor (string search if no spaCy model is installed)
    result = vsr.evaluate_vsr(encoder, rows, str(IMAGES), fixture_annotations, dev_rows=rows,
                              progress=False)
    assert result["n"] == 5 and result["skipped"] == {} and result["dev"] == {"n": 5, "skipped": {}}
    assert result["modes"] == {"inverse": 3, "threshold": 2}
    assert {k: v["n"] for k, v in result["per_relation"].items()} == {
        "touching": 2, "behind": 1, "under": 1, "at the left side of": 1}
    assert result["accuracy"] == pytest.approx(sum(p["pred"] == p["label"] for p in result["predictions"]) / 5)
    assert all(math.isfinite(p["score"]) and p["pred"] == int(p["score"] > 0) for p in result["predictions"])
    assert [p["id"] for p in result["predictions"]] == [r["id"] for r in rows]

    again = vsr.evaluate_vsr(encoder, rows, str(IMAGES), fixture_annotations, dev_rows=rows,
                             progress=False)
    assert [p["score"] for p in again["predictions"]] == pytest.approx([p["score"] for p in result["predictions"]], abs=1e-6)
    assert again["threshold"] == pytest.approx(result["threshold"], abs=1e-6)


def random_yolo(path: Path) -> Path:
    """A random-init YOLOv8n (offline, from ultralytics' packaged yaml) saved as weights: class
    names "0".."79", so it never names a VSR category."""
    pytest.importorskip("ultralytics")
    from sapretrain.detector import load_yolo

    torch.manual_seed(0)
    load_yolo("yolov8n.yaml").save(str(path))
    return path


def test_yolo_detector_runs_end_to_end(tmp_path):
    detector = vsr.YoloBoxes(str(random_yolo(tmp_path / "yolo.pt")))
    rows = fixture_vsr_rows()[:2]  # one image
    result = vsr.evaluate_vsr(FakeEncoder(defaultdict(lambda: 0.5)), rows, str(IMAGES), detector=detector,
                              progress=False, nlp=None)
    assert result["boxes"] == "detector" and result["n"] == 2
    assert result["scored"] + result["skipped"].get("no_box", 0) == 2
    assert set(result["skipped"]) <= {"no_box"}


# --------------------------------------------------------------------------------------------
# VSR's random split: subject and object from the caption


def test_derive_names_from_the_caption(nlp):
    assert vsr.derive_names("The umbrella is enclosed by the person.", "enclosed by", nlp) == {
        "subj": "umbrella", "obj": "person", "subj_category": "umbrella", "obj_category": "person"}
    # Caption words for the spans, COCO categories (the curation's synonyms) for the boxes.
    assert vsr.derive_names("The man is at the left side of the dining table.", "at the left side of", nlp) == {
        "subj": "man", "obj": "dining table", "subj_category": "person", "obj_category": "dining table"}
    assert vsr.derive_names("The teddy bear is far away from the hot dog.", "far away from", nlp)["obj"] == "hot dog"
    assert vsr.derive_names("A sunny day.", "left of", nlp) is None
    assert vsr.derive_names("The cat is left of the dog.", "left of", None) is None


@pytest.fixture(scope="module")
def nlp():
    from sapretrain.curation.svo import load_nlp

    try:
        return load_nlp()
    except (ImportError, OSError):
        pytest.skip("no spaCy model installed")


def test_random_split_rows_score_like_rows_with_fields(tmp_path, nlp, fixture_annotations):
    """Rows without subj/obj (random split) give the same boxes, spans and scores as with them."""
    from sapretrain.eval.encode import Encoder
    from sapretrain.model import SAClipConfig, build_saclip

    with_fields = vsr.read_vsr(str(write_jsonl(tmp_path / "zeroshot.jsonl", fixture_vsr_rows())))[0]
    random_rows = [{k: v for k, v in r.items() if k not in ("subj", "obj")} for r in fixture_vsr_rows()]
    without, bad = vsr.read_vsr(str(write_jsonl(tmp_path / "random.jsonl", random_rows)))
    assert len(without) == 5 and not bad and not any("subj" in r for r in without)
    torch.manual_seed(0)
    encoder = Encoder(build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False)).eval())
    a = vsr.evaluate_vsr(encoder, with_fields, str(IMAGES), fixture_annotations, dev_rows=with_fields,
                         progress=False, nlp=nlp)
    b = vsr.evaluate_vsr(encoder, without, str(IMAGES), fixture_annotations, dev_rows=without,
                         progress=False, nlp=nlp)
    assert (b["n"], b["scored"], b["derived_names"], a["derived_names"]) == (5, 5, 5, 0)
    assert [p["score"] for p in b["predictions"]] == pytest.approx([p["score"] for p in a["predictions"]], abs=1e-6)
    assert b["threshold"] == pytest.approx(a["threshold"], abs=1e-6)
    ga = vsr.evaluate_geometry(with_fields, str(IMAGES), fixture_annotations, nlp=nlp)
    gb = vsr.evaluate_geometry(without, str(IMAGES), fixture_annotations, nlp=nlp)
    assert [p["pred"] for p in gb["predictions"]] == [p["pred"] for p in ga["predictions"]]


# --------------------------------------------------------------------------------------------
# The box-geometry baseline (no model)


def test_geometry_rules_by_hand(scene):
    root, annotations = scene  # cat [2, 3, 20, 30], dog [30, 10, 60, 40], bird [40, 5, 60, 15]
    rows = rows_of(EVAL_ROWS + [
        ("The cat is facing the dog.", "facing", "cat", "dog", 0),    # no rule: dev majority (overall 1)
        ("The bird is near the cat.", "near", "bird", "cat", 1),      # gap 20 >= sqrt(200): far -> 0
        ("The cat is left of the horse.", "left of", "cat", "horse", 1),  # no horse: no_box, wrong
    ])
    result = vsr.evaluate_geometry(rows, str(root), annotations, dev_rows=rows_of(DEV_ROWS, "b.jpg"), nlp=None)
    # left of: cat cx 11 < dog cx 45 -> 1 (right); cat above dog: cy 16.5 < 25 -> 1 (label 0, wrong);
    # bird above dog: 10 < 25 -> 1 (right); against / touching cat-dog: no overlap -> 0 (wrong, wrong);
    # bird touching dog: overlap [40, 10, 60, 15] -> 1 (right); facing -> 1 (wrong); near -> 0 (wrong).
    assert [p["pred"] for p in result["predictions"]] == [1, 1, 1, 0, 0, 1, 1, 0, None]
    assert (result["n"], result["scored"], result["correct"]) == (9, 8, 3)
    assert result["accuracy"] == pytest.approx(3 / 9) and result["accuracy_scored"] == pytest.approx(3 / 8)
    assert result["modes"] == {"rule": 7, "majority": 1} and result["skipped"] == {"no_box": 1}
    # dev: touching 1 of 2 (a tie -> 1), near 1 of 2 -> 1; overall 2 of 4 -> 1
    assert result["dev"]["majority"] == {"touching": 1, "near": 1} and result["dev"]["overall_majority"] == 1
    assert vsr.majority_labels([{**r, "label": 0} for r in rows_of(DEV_ROWS)]) == ({"touching": 0, "near": 0}, 0)
    assert vsr.majority_labels(None) == ({}, 1)


def test_geometry_rule_details():
    s, o = [10, 10, 20, 20], [0, 0, 40, 40]
    assert vsr.GEOMETRY_RULES["inside"](s, o) and not vsr.GEOMETRY_RULES["inside"](o, s)
    assert vsr.GEOMETRY_RULES["contains"](o, s) and vsr.GEOMETRY_RULES["outside"](o, s)
    assert vsr.GEOMETRY_RULES["in front of"]([0, 0, 5, 50], [0, 0, 5, 40])  # lower bottom edge: nearer
    assert vsr.GEOMETRY_RULES["behind"]([0, 0, 5, 40], [0, 0, 5, 50])
    assert vsr.GEOMETRY_RULES["under"]([0, 30, 5, 40], [0, 0, 5, 10])  # image y grows downwards
    assert vsr.GEOMETRY_RULES["near"]([0, 0, 10, 10], [15, 0, 25, 10])  # gap 5 < side 10
    assert vsr.GEOMETRY_RULES["far from"]([0, 0, 10, 10], [25, 0, 35, 10])  # gap 15
    assert not vsr.GEOMETRY_RULES["detached from"]([0, 0, 10, 10], [5, 5, 15, 15])


def test_geometry_on_the_fixture_rows_by_hand(fixture_annotations):
    result = vsr.evaluate_geometry([{**r, "id": str(i)} for i, r in enumerate(fixture_vsr_rows())], str(IMAGES),
                                   fixture_annotations, nlp=None)
    # person touching elephant (label 0): the boxes overlap -> 1, wrong; elephant behind person:
    # person's bottom 401.55 > elephant's 400.53 -> 1, right; bed under book: book cy 352.9 is below
    # bed cy 309.0 -> 0, wrong; pizza touching book: overlap -> 1, right; book left of wine glass:
    # cx 157.9 < 394.9 -> 1, right.
    assert [p["pred"] for p in result["predictions"]] == [1, 1, 0, 1, 1]
    assert (result["n"], result["correct"], result["accuracy"]) == (5, 3, 0.6)


# --------------------------------------------------------------------------------------------
# The tool


def evaluate_tool():
    """tools/evaluate.py imported, to call its ``main`` in this process (the subprocess test
    above covers the script itself)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_tool", COCO_DIR.parents[2] / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_cli_vsr_writes_results_per_model(tmp_path, capsys):
    import subprocess
    import sys

    from sapretrain.model import SAClipConfig, build_saclip, save_saclip

    torch.manual_seed(0)
    save_saclip(build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False)), str(tmp_path / "sa.pt"))
    weights = random_yolo(tmp_path / "yolo.pt")
    path = write_jsonl(tmp_path / "vsr.jsonl", fixture_vsr_rows() + ["not json"])
    out = tmp_path / "out"
    tool = str(COCO_DIR.parents[2] / "tools" / "evaluate.py")
    done = subprocess.run(
        [sys.executable, tool, "--task", "vsr",
         "--checkpoint", f"SA={tmp_path / 'sa.pt'}", "--checkpoint", "CLIP=openclip:sa-tiny",
         "--vsr", str(path), "--images", str(IMAGES), "--instances", str(ANNOTATIONS), "--dev", str(path),
         "--detector-weights", str(weights), "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "results.json").read_text())
    assert report["bad_lines"] == {"not_json": 1} and report["rows"] == 6
    assert report["headline_boxes"] == "detector" and report["box_modes"] == ["detector", "gold"]
    assert report["empty_modes"] == ["detector"]  # the random detector names no VSR category
    for label in ("SA", "CLIP"):  # same rows for both: skips never depend on the model
        gold = report["models"][label]["modes"]["gold"]
        assert (gold["n"], gold["scored"], gold["skipped"]) == (6, 5, {"not_json": 1})
        assert gold["accuracy"] == pytest.approx(gold["correct"] / 6)
        predictions = [json.loads(l) for l in (out / gold["predictions_file"]).read_text().splitlines()]
        assert len(predictions) == 6 and predictions[-1] == {"id": "vsr.jsonl:6", "line": 6, "pred": None,
                                                             "skipped": "not_json"}
        detector = report["models"][label]["modes"]["detector"]
        assert (detector["scored"], detector["skipped"]) == (0, {"no_box": 5, "not_json": 1})
    geometry = report["models"]["geometry (no model)"]["modes"]["gold"]
    assert (geometry["correct"], geometry["n"]) == (3, 6)  # the by-hand fixture result, over all 6 rows
    table = (out / "results.md").read_text()
    assert "| geometry (no model) | gold | 50.0 | 3 / 6 | 60.0 | 5 | not_json 1 |" in table
    assert "| SA | detector | 0.0 | 0 / 6 | - | 0 | no_box 5, not_json 1 |" in table
    assert "WARNING: no row could be scored with detector boxes" in table
    assert "| SA | gold |" in done.stdout and "| CLIP | gold |" in done.stdout

    # Random split (no subj/obj) with the random detector only: nothing is scored, exit 2.
    random_rows = [{k: v for k, v in r.items() if k not in ("subj", "obj")} for r in fixture_vsr_rows()]
    code = evaluate_tool().main(
        ["--task", "vsr", "--checkpoint", "openclip:sa-tiny",
         "--vsr", str(write_jsonl(tmp_path / "random.jsonl", random_rows)), "--images", str(IMAGES),
         "--detector-weights", str(weights), "--output", str(tmp_path / "out2"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no row of" in err and "no_box" in err
    report = json.loads((tmp_path / "out2" / "results.json").read_text())
    # subject and object were derived from the captions: the rows got as far as the boxes
    assert report["models"]["openclip:sa-tiny"]["modes"]["detector"]["skipped"] == {"no_box": 5}
