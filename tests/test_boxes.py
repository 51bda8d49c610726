"""The one box choice (sapretrain/boxes.py): each former rule's distinctive case, and find_boxes."""
from __future__ import annotations

import pytest
from PIL import Image

from sapretrain.boxes import (
    Choice,
    as_detection,
    choose_boxes,
    clip_box,
    clip_detections,
    default_matcher,
    find_boxes,
    modifiers,
)
from sapretrain.detector import Detection


def det(name, box, score=0.9):
    return Detection(name, tuple(float(v) for v in box), score)


# ---- rule "nouns" (curation ROIs, SugarCrepe, the API)


def test_nouns_levels_size_and_same_category():
    m = default_matcher()
    dets = [det("person", [0, 0, 50, 100]), det("person", [60, 0, 100, 60]), det("horse", [0, 0, 200, 150]),
            det("dog", [150, 100, 170, 120])]
    # "man" matches "person" through the synonyms (level 1); the largest person is the subject.
    assert choose_boxes(dets, "man", "horse", matcher=m).boxes == {"subj": [0, 0, 50, 100], "obj": [0, 0, 200, 150]}
    # One category for both parts: the largest instance is the subject, the next one the object.
    assert choose_boxes(dets, "man", "woman", matcher=m).boxes == {"subj": [0, 0, 50, 100], "obj": [60, 0, 100, 60]}
    refused = choose_boxes(dets, "man", "woman", matcher=m, same_category=False)
    assert (refused.boxes, refused.reason) == (None, "same_box")
    # A hypernym (level 2) only when allowed.
    assert choose_boxes(dets, "man", "animal", matcher=m).boxes["obj"] == [0, 0, 200, 150]
    assert choose_boxes(dets, "man", "animal", matcher=m, max_level=1).reason == "no_box"
    missing = choose_boxes(dets, "man", "giraffe", matcher=m)
    assert missing.reason == "no_box" and "obj: no 'giraffe'" in missing.detail


def test_nouns_overlap_rule_vs_exact_names():
    # Two detections of one object (IoU >= 0.9) are one instance for the curation rule ...
    twins = [det("cat", [0, 0, 100, 100]), det("cat", [0, 0, 100, 98])]
    assert choose_boxes(twins, "cat", "cat", matcher=default_matcher()).reason == "same_box"
    # ... while VSR's rule (no matcher: exact names, same_instance_iou=None) takes both.
    assert choose_boxes(twins, "cat", "cat", same_instance_iou=None).boxes == {
        "subj": [0, 0, 100, 100], "obj": [0, 0, 100, 98]}
    # Without a matcher, "man" is not "person".
    assert choose_boxes([det("person", [0, 0, 9, 9]), det("dog", [20, 20, 29, 29])], "man", "dog").reason == "no_box"
    with pytest.raises(ValueError, match="nouns"):
        choose_boxes(twins, "cat", None)


# ---- rule "largest" (DoTA)


def test_largest_prefers_a_vehicle_and_ignores_other_classes():
    dets = [det("person", [0, 0, 40, 30]), det("car", [10, 10, 30, 20]), det("umbrella", [0, 0, 64, 36])]
    road, vehicles = {"person", "car"}, {"car"}
    choice = choose_boxes(dets, rule="largest", classes=road, subject_classes=vehicles, width=64, height=36)
    assert choice.boxes == {"subj": [10, 10, 30, 20], "obj": [0, 0, 40, 30]} and set(choice.how.values()) == {"detected"}
    one = choose_boxes(dets[:1], rule="largest", classes=road, subject_classes=vehicles, width=64, height=36)
    assert one.boxes == {"subj": [0, 0, 40, 30], "obj": [0.0, 0.0, 64.0, 36.0]} and one.how["obj"] == "missing"
    # Without a frame size a missing part is no pair.
    assert choose_boxes(dets[:1], rule="largest", classes=road).boxes is None


def test_nouns_class_modifiers_pick_the_named_one():
    """A detector whose classes are "colour shape": the noun is the shape, the colour a modifier."""
    matcher = default_matcher()
    dets = [det("red cube", [0, 0, 10, 10]), det("blue cube", [50, 0, 90, 40]), det("red sphere", [100, 0, 120, 20])]
    nouns = dict(subj=matcher.noun("red block"), obj=matcher.noun("cube"))
    assert nouns == {"subj": "block", "obj": "cube"}
    by_size = choose_boxes(dets, nouns["subj"], nouns["obj"], matcher=matcher)
    assert by_size.boxes == {"subj": [50, 0, 90, 40], "obj": [0, 0, 10, 10]}  # no texts: the larger cube
    named = choose_boxes(dets, nouns["subj"], nouns["obj"], matcher=matcher, texts={"subj": "red block", "obj": "cube"})
    assert named.boxes == {"subj": [0, 0, 10, 10], "obj": [50, 0, 90, 40]}  # "red" picks the red cube
    ball = choose_boxes(dets, matcher.noun("ball"), matcher.noun("blue cube"), matcher=matcher,
                        texts={"subj": "ball", "obj": "blue cube"})
    assert ball.boxes == {"subj": [100, 0, 120, 20], "obj": [50, 0, 90, 40]}  # ball -> sphere (hypernym)
    # COCO's names are nouns only: nothing changes for them
    assert modifiers("traffic light", matcher.noun("traffic light")) == frozenset()
    assert modifiers("red cube", "cube") == {"red"}


# ---- rule "attributes" (the synthetic scenes' detector)


def test_attributes_agreement_and_size_words():
    from sapretrain.eval.scene_detector import part_attributes

    dets = [det("red cube", [0, 0, 10, 10], 0.9), det("blue cube", [50, 0, 90, 40], 0.8)]
    kw = dict(rule="attributes", attributes=part_attributes, width=200, height=100)
    # Equal agreement either way round: "large" gives the subject the larger cube.
    choice = choose_boxes(dets, "large cube", "cube", **kw)
    assert choice.boxes == {"subj": [50, 0, 90, 40], "obj": [0, 0, 10, 10]} and choice.how["subj"] == "by_size"
    assert choose_boxes(dets, "red cube", "blue cube", **kw).how == {"subj": "detected", "obj": "detected"}
    with pytest.raises(ValueError, match="attributes"):
        choose_boxes(dets, "cube", "cube", rule="attributes")
    with pytest.raises(ValueError, match="rule must be"):
        choose_boxes(dets, "cube", "cube", rule="closest")


# ---- shared pieces


def test_detections_from_mappings_and_clipping():
    assert as_detection({"name": "cat", "box": [1, 2, 3, 4]}) == Detection("cat", (1.0, 2.0, 3.0, 4.0), 1.0)
    with pytest.raises(ValueError, match="'name' and a 4-number 'box'"):
        as_detection({"box": [1, 2, 3, 4]})
    assert clip_box([-5, -5, 10.123, 10], 8, 8) == [0.0, 0.0, 8.0, 8.0]
    assert clip_box([0, 0, 1, 1], 8, 8) is None and clip_box("box", 8, 8) is None
    assert clip_box([0, 0, 3.333, 3.333], 8, 8, decimals=None) == [0.0, 0.0, 3.333, 3.333]
    kept = clip_detections([{"name": "a", "box": [0, 0, 100, 5]}, {"name": "b", "box": [7, 7, 8, 8]}], 50, 50)
    assert kept == [Detection("a", (0.0, 0.0, 50.0, 5.0), 1.0)]


class FakeDetector:
    """The detector interface: ``detector(images, classes) -> [[Detection]]``; records its calls."""

    def __init__(self, per_image):
        self.per_image, self.calls = per_image, []

    def __call__(self, images, classes=None):
        self.calls.append((len(images), classes))
        return [self.per_image[im.width] for im in images]


def test_find_boxes_runs_the_detector_once_and_chooses_per_image():
    detector = FakeDetector({64: [det("person", [0, 0, 30, 40]), det("horse", [20, 5, 90, 60])],
                             32: [det("horse", [0, 0, 10, 10])]})
    a, b = Image.new("RGB", (64, 48)), Image.new("RGB", (32, 32))
    found = find_boxes(detector, [a, b], "men", "a horse")  # caption words: nouns via the matcher
    assert detector.calls == [(2, ["horse", "man"])]  # one call; an open-vocabulary model's classes
    assert isinstance(found[0], Choice) and found[0].source == "detector"
    assert found[0].boxes == {"subj": [0, 0, 30, 40], "obj": [20, 5, 64, 48]}  # clipped to the image
    assert (found[1].boxes, found[1].reason) == (None, "no_box")
    single = find_boxes(detector, a, "man", "horse")
    assert single.boxes == found[0].boxes
    with pytest.raises(ValueError, match="2 images but 1 subjects"):
        find_boxes(detector, [a, b], ["man"], ["horse"])


def test_yolo_detector_returns_detections(tmp_path):
    pytest.importorskip("ultralytics")
    from sapretrain.detector import YoloDetector

    detector = YoloDetector("yolov8n.yaml", imgsz=64, batch=2)  # random init, offline
    found = detector([Image.new("RGB", (64, 48), (120, 90, 60))] * 2)
    assert len(found) == 2 and all(isinstance(d, Detection) for dets in found for d in dets)
    assert not detector.open_vocab and detector([]) == []
    # untrained weights say no training size: ultralytics' 640; class names from the model
    assert YoloDetector("yolov8n.yaml").imgsz == 640 and detector.names == [str(i) for i in range(80)]
