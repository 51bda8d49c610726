"""DoTA zero-shot anomaly evaluation: grouping, labels, scores, AUC, skips, explanations, models.

Frames are drawn in DoTA's layout (``<root>/<clip>/images/000000.jpg``) for real clip ids from an
excerpt of the DoTA metadata (tests/fixtures/dota/). A fake encoder reads a frame's grey level
``p`` and embeds it as ``(p, 1 - p)``; abnormal descriptions embed as ``(1, 0)`` and normal ones as
``(0, 1)``, so every score and AUC can be worked out by hand.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sapretrain.eval import dota
from sapretrain.eval.dota import (
    Description,
    clip_group,
    description_triplets,
    evaluate_dota,
    explain,
    format_dota_table,
    frame_auc,
    frame_label,
    frame_scores,
    load_descriptions,
    pick_boxes,
    plot_dota,
)

from conftest import PROJECT_ROOT

METADATA = PROJECT_ROOT / "tests/fixtures/dota/metadata_val_excerpt.json"
DESCRIPTIONS = PROJECT_ROOT / "configs/eval/dota_descriptions.yaml"
STRIDE = 10
SIZE = (64, 36)
TURNING = "J-j5eIHg8I0_001654"  # other: turning, 41 frames, anomaly [21, 41)
LATERAL = "fTmYppzzloc_000821"  # other: lateral, 50 frames, anomaly [2, 49)
PEDESTRIAN = "Pbw0A-RCjcw_001580"  # other: pedestrian, 49 frames, anomaly [12, 49)
OBSTACLE = "eN6y6-4C1Rc_005830"  # other: obstacle, 59 frames, anomaly [12, 31)
EGO = "pWZSG2cUdEo_003797"
TARGET = "a car turns into the path of another car"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


@pytest.fixture(scope="module")
def nlp():
    from sapretrain.curation.svo import load_nlp

    return load_nlp()


@pytest.fixture(scope="module")
def metadata():
    return json.loads(METADATA.read_text())


def write_frames(root: Path, metadata: dict, levels=None, stride: int = STRIDE) -> Path:
    """Every ``stride``-th frame of each clip as a flat grey JPEG: white inside the anomaly window,
    black outside, unless ``levels[clip][frame]`` gives the grey level (0..1)."""
    for clip_id, meta in metadata.items():
        folder = root / clip_id / "images"
        folder.mkdir(parents=True)
        for frame in range(0, meta["num_frames"], stride):
            p = (levels or {}).get(clip_id, {}).get(frame, float(frame_label(meta, frame)))
            grey = round(255 * p)
            Image.new("RGB", SIZE, (grey, grey, grey)).save(folder / f"{frame:06d}.jpg", quality=95)
    return root


class FakeEncoder:
    """Images: (p, 1 - p) for grey level p; texts: (0, 1) normal, (1, 0.5) abnormal, (1, 0) ``target``."""

    uses_boxes = False

    def __init__(self, sections, target: str | None = None):
        self.abnormal = {d.text for ds in sections.values() for d in ds if d.abnormal}
        self.target = target
        self.image_calls = 0

    def texts(self, samples):
        rows = []
        for s in samples:
            assert s.triplet is not None and s.caption[s.triplet["rel"]["start"]:s.triplet["rel"]["end"]]
            if s.caption == self.target:
                rows.append([1.0, 0.0])
            elif s.caption in self.abnormal:
                rows.append([1.0, 0.5] if self.target else [1.0, 0.0])
            else:
                rows.append([0.0, 1.0])
        return torch.tensor(rows)

    def images(self, samples):
        self.image_calls += 1
        p = [round(float(np.asarray(s.image).mean()) / 255, 2) for s in samples]
        return torch.tensor([[x, 1 - x] for x in p])


def cos_abnormal(p: float) -> float:
    return p / math.hypot(p, 1 - p)


# --------------------------------------------------------------------------------------------
# Grouping, labels, boxes


def test_grouping_of_anomaly_classes(metadata):
    groups = {k: clip_group(v["anomaly_class"]) for k, v in metadata.items()}
    assert groups[EGO] is None
    assert groups[TURNING] == groups[LATERAL] == "VV"
    assert groups[PEDESTRIAN] == "VP" and groups[OBSTACLE] == "VO"
    assert groups["4wKjxDXnmYs_000061"] == groups["ezY7QrSWeWw_001685"] == dota.UNGROUPED
    for cat in ("start_stop_or_stationary", "moving_ahead_or_waiting", "oncoming"):
        assert clip_group(f"other: {cat}") == "VV"
        assert clip_group(f"ego: {cat}") is None
    for bad in ("other turning", "other: flying", "bus: turning"):
        with pytest.raises(ValueError, match="anomaly_class"):
            clip_group(bad)


def test_frame_labels_are_half_open(metadata):
    meta = metadata[OBSTACLE]  # [12, 31)
    assert [frame_label(meta, f) for f in (0, 11, 12, 30, 31, 58)] == [0, 0, 1, 1, 0, 0]


def test_pick_boxes_two_largest():
    objects = [{"bbox": [0, 0, 10, 10]}, {"bbox": [20, 20, 50, 30]}, {"bbox": [5, 5, 25, 25]},
               {"bbox": [100, 100, 120, 120]}]  # the last lies outside a 64x36 frame
    assert pick_boxes(objects, 64, 36) == {"subj": [5.0, 5.0, 25.0, 25.0], "obj": [20.0, 20.0, 50.0, 30.0]}
    assert pick_boxes(objects[:1], 64, 36) == {"subj": [0.0, 0.0, 10.0, 10.0], "obj": [0.0, 0.0, 64.0, 36.0]}
    assert pick_boxes(objects[3:], 64, 36) is None
    assert pick_boxes([], 64, 36) is None


# --------------------------------------------------------------------------------------------
# Descriptions


def test_shipped_descriptions_load_and_all_have_triplets(nlp):
    sections = load_descriptions(DESCRIPTIONS)
    assert set(sections) == {"VV", "VP", "VO", "common"}
    for group in ("VV", "VP", "VO"):
        kinds = {d.abnormal for d in sections[group]}
        assert kinds == {True, False}
        assert 8 <= sum(d.abnormal for d in sections[group]) <= 20
    turning = [d for d in sections["VV"] if d.path == "VV/abnormal/turning"]
    assert Description(TARGET, "VV/abnormal/turning", True) in turning
    texts = sorted({d.text for ds in sections.values() for d in ds})
    assert set(description_triplets(texts, nlp)) == set(texts)


@pytest.mark.parametrize("body, message", [
    ("VX:\n  normal: [a car hits a car]\n", "unknown group 'VX'"),
    ("VV:\n  normal: []\n  abnormal: [a car hits a car]\n", "VV/normal: empty list"),
    ("VV:\n  normal: [a car is behind a car, 3]\n  abnormal: [a car hits a car]\n", r"VV/normal\[1\]"),
    ("VV:\n  normal: [a car is behind a car]\n  abnormal:\n    turning: {}\n", "VV/abnormal/turning: empty mapping"),
    ("VV:\n  normal: [a car is behind a car]\n  strange: [a car hits a car]\n", "unknown key"),
    ("VV:\n  normal: [a car is behind a car]\n  abnormal: a car hits a car\n", "expected a list"),
    ("VV:\n  normal: [a car is behind a car, a car is behind a car]\n  abnormal: [a car hits a car]\n", "duplicate"),
    ("- a car hits a car\n", "expected a mapping"),
    ("common:\n  normal: [a car is behind a car]\nVV:\n  normal: [a car follows a bus]\n", "VV has no abnormal"),
])
def test_description_errors(tmp_path, body, message):
    path = tmp_path / "d.yaml"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_descriptions(path)


def test_description_without_triplet_is_named(tmp_path, nlp, metadata):
    path = tmp_path / "d.yaml"
    path.write_text("common:\n  normal: [a car is behind a car]\n  abnormal: [a car hits a car, very heavy rain]\n")
    with pytest.raises(ValueError, match="very heavy rain"):
        evaluate_dota(FakeEncoder(load_descriptions(path)), METADATA, tmp_path, descriptions=path, nlp=nlp,
                      progress=False)


# --------------------------------------------------------------------------------------------
# Scores and AUC by hand


def test_frame_scores_by_hand():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    score, contrast, sims = frame_scores(v, u, [True, False, True])
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(sims, [[1, 0, r], [0, 1, r]], atol=1e-12)
    np.testing.assert_allclose(score, [(1 + r) / 2, r / 2], atol=1e-12)
    np.testing.assert_allclose(contrast, [(1 + r) / 2, r / 2 - 1], atol=1e-12)


def test_frame_auc_ties_and_one_class():
    # positives 0.6, 0.9 vs negatives 0.2, 0.6, 0.8: 1 + 0.5 + 0 + 3 wins out of 6 pairs
    assert frame_auc([0, 0, 0, 1, 1], [0.2, 0.6, 0.8, 0.6, 0.9]) == (0.75, None)
    assert frame_auc([1, 0], [0.0, 1.0]) == (0.0, None)
    auc, note = frame_auc([0, 0], [0.1, 0.2])
    assert auc is None and "only normal" in note
    assert frame_auc([], []) == (None, "no frames")


def test_hand_computed_auc_end_to_end(tmp_path, nlp, metadata):
    meta = {TURNING: metadata[TURNING]}  # frames 0..40 by 10; labels 0 0 0 1 1
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    levels = {TURNING: {0: 0.2, 10: 0.6, 20: 0.8, 30: 0.6, 40: 0.9}}
    frames = write_frames(tmp_path / "frames", meta, levels)
    encoder = FakeEncoder(load_descriptions(DESCRIPTIONS))
    result = evaluate_dota(encoder, tmp_path / "meta.json", frames, nlp=nlp, frame_stride=STRIDE, progress=False)

    clip = result["clips"][TURNING]
    assert clip["frames"] == [0, 10, 20, 30, 40] and clip["labels"] == [0, 0, 0, 1, 1]
    np.testing.assert_allclose(clip["score"], [cos_abnormal(p) for p in (0.2, 0.6, 0.8, 0.6, 0.9)], atol=1e-5)
    # normal descriptions embed as (0, 1): contrast = (p - (1 - p)) / |v|
    np.testing.assert_allclose(clip["contrast"][1], (0.6 - 0.4) / math.hypot(0.6, 0.4), atol=1e-5)
    vv = result["groups"]["VV"]
    assert vv["auc"] == pytest.approx(0.75) and result["secondary"]["contrast"]["VV"]["auc"] == pytest.approx(0.75)
    assert (vv["frames"], vv["abnormal_frames"], vv["clips"]) == (5, 2, 1)
    assert result["groups"]["overall"]["auc"] == pytest.approx(0.75)
    for group in ("VP", "VO"):
        assert result["groups"][group]["auc"] is None and result["groups"][group]["note"] == "no frames"


# --------------------------------------------------------------------------------------------
# Whole runs with the fake encoder


def test_separable_frames_groups_and_counts(tmp_path, nlp, metadata):
    frames = write_frames(tmp_path / "frames", metadata)
    encoder = FakeEncoder(load_descriptions(DESCRIPTIONS))
    result = evaluate_dota(encoder, METADATA, frames, nlp=nlp, frame_stride=STRIDE, progress=False)

    assert result["excluded"] == {"ego": 1}
    assert EGO not in result["clips"] and result["clips_evaluated"] == 8
    assert encoder.image_calls == 8  # one batch per clip
    expected = {"VV": (2, 10, 6), "VP": (2, 12, 6), "VO": (2, 13, 5), "overall": (8, 48, 20)}
    for group, (clips, n, abnormal) in expected.items():
        m = result["groups"][group]
        assert (m["clips"], m["frames"], m["abnormal_frames"], m["normal_frames"]) == (clips, n, abnormal, n - abnormal)
        assert m["auc"] == 1.0 and all(result["secondary"][k][group]["auc"] == 1.0 for k in dota.SECONDARY_SCORES)
        assert m["ci95"] == [1.0, 1.0]  # every resample of separable clips is separable
    assert result["skipped"] == dict.fromkeys(dota.SKIP_REASONS, 0)
    assert result["clips"]["ezY7QrSWeWw_001685"]["group"] == dota.UNGROUPED

    table = format_dota_table(result)
    assert "| **model** (Eq. 11, D(a)) | ignored | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] |" in table
    assert "VV 2 clips / 10 frames (6 abnormal)" in table and "Ego clips excluded: 1" in table
    assert "oracle_group (secondary)" in table
    plot_dota(result, tmp_path / "roc.png")
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"

    limited = evaluate_dota(encoder, METADATA, frames, nlp=nlp, frame_stride=STRIDE, max_clips=3, progress=False)
    assert limited["clips_evaluated"] == 3 and limited["groups"]["overall"]["clips"] == 3


def test_explanations_name_the_matching_description(tmp_path, nlp, metadata):
    meta = {TURNING: metadata[TURNING]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    frames = write_frames(tmp_path / "frames", meta)
    encoder = FakeEncoder(load_descriptions(DESCRIPTIONS), target=TARGET)
    result = evaluate_dota(encoder, tmp_path / "meta.json", frames, nlp=nlp, frame_stride=STRIDE, progress=False)
    ex = result["clips"][TURNING]["explanations"]
    assert ex["anomaly_window"][0] == {"text": TARGET, "path": "VV/abnormal/turning", "abnormal": True,
                                       "similarity": 1.0}
    assert len(ex["anomaly_window"]) == 3 and all(d["abnormal"] for d in ex["anomaly_window"])
    assert ex["anomaly_window"][1]["similarity"] == pytest.approx(1 / math.hypot(1, 0.5), abs=1e-6)
    assert len(ex["normal_frames"]) == 3 and not any(d["abnormal"] for d in ex["normal_frames"])


def test_explain_without_anomalous_frames():
    ds = [Description("a", "VV/normal", False), Description("b", "VV/abnormal", True)]
    out = explain(np.array([[0.1, 0.9], [0.3, 0.5]]), [0, 0], ds, k=3)
    assert out["anomaly_window"] == []
    assert [d["text"] for d in out["normal_frames"]] == ["b", "a"]
    assert out["normal_frames"][0]["similarity"] == pytest.approx(0.7)


def test_missing_and_unreadable_frames_are_skipped_and_counted(tmp_path, nlp, metadata):
    frames = write_frames(tmp_path / "frames", metadata)
    (frames / TURNING / "images" / "000010.jpg").unlink()
    (frames / TURNING / "images" / "000030.jpg").write_bytes(b"not a jpeg")
    shutil.rmtree(frames / PEDESTRIAN)  # missing clip folder
    for f in (frames / OBSTACLE / "images").iterdir():  # folder there, every frame unreadable
        f.write_bytes(b"\xff\xd8\xff")
    encoder = FakeEncoder(load_descriptions(DESCRIPTIONS))
    result = evaluate_dota(encoder, METADATA, frames, nlp=nlp, frame_stride=STRIDE, progress=False)

    assert result["skipped"] == {"missing_folder": 1, "missing_clip": 1, "missing_frame": 1, "unreadable_frame": 7}
    assert PEDESTRIAN not in result["clips"] and OBSTACLE not in result["clips"]
    assert result["clips_evaluated"] == 6
    clip = result["clips"][TURNING]
    assert clip["frames"] == [0, 20, 40] and clip["labels"] == [0, 0, 1]
    assert result["groups"]["VP"]["clips"] == 1 and result["groups"]["VO"]["frames"] == 7
    assert result["groups"]["overall"]["frames"] == 48 - 2 - 5 - 6


# --------------------------------------------------------------------------------------------
# Eq. 11: one abnormal set D(a) for every frame; AUC split by group afterwards


class GroupEncoder(FakeEncoder):
    """Abnormal descriptions of VV's own section embed as (1, 0), every other abnormal one as
    (0.6, 0.8), normal ones as (0, 1): the headline and the oracle-group scores then differ."""

    def __init__(self, sections):
        super().__init__(sections)
        self.vv_abnormal = {d.text for d in sections["VV"] if d.abnormal}

    def texts(self, samples):
        return torch.tensor([[1.0, 0.0] if s.caption in self.vv_abnormal else
                             [0.6, 0.8] if s.caption in self.abnormal else [0.0, 1.0] for s in samples])


def test_every_frame_is_scored_against_the_same_abnormal_set(tmp_path, nlp, metadata):
    meta = {k: metadata[k] for k in (TURNING, PEDESTRIAN)}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    frames = write_frames(tmp_path / "frames", meta, {TURNING: {0: 0.3}, PEDESTRIAN: {0: 0.3}})
    sections = load_descriptions(DESCRIPTIONS)
    result = evaluate_dota(GroupEncoder(sections), tmp_path / "meta.json", frames, nlp=nlp, frame_stride=STRIDE,
                           progress=False)
    n_vv = sum(d.abnormal for d in sections["VV"])
    n_all = len({d.text for ds in sections.values() for d in ds if d.abnormal})
    n_normal = len({d.text for ds in sections.values() for d in ds if not d.abnormal})
    p = 0.3
    norm = math.hypot(p, 1 - p)
    cos_vv, cos_other, cos_normal = p / norm, (0.6 * p + 0.8 * (1 - p)) / norm, (1 - p) / norm
    headline = (n_vv * cos_vv + (n_all - n_vv) * cos_other) / n_all  # D(a): the same for both clips
    for clip_id in (TURNING, PEDESTRIAN):
        clip = result["clips"][clip_id]
        assert clip["score"][0] == pytest.approx(headline, abs=1e-5)
        assert clip["contrast"][0] == pytest.approx(headline - cos_normal, abs=1e-5)
        assert n_normal == len({d.text for d in dota.description_sets(sections)[dota.UNGROUPED] if not d.abnormal})
    # The secondary oracle score uses the clip's gold group: VV (own + common) vs VP (all "other").
    n_common = sum(d.abnormal for d in sections["common"])
    oracle_vv = (n_vv * cos_vv + n_common * cos_other) / (n_vv + n_common)
    assert result["clips"][TURNING]["oracle_group"][0] == pytest.approx(oracle_vv, abs=1e-5)
    assert result["clips"][PEDESTRIAN]["oracle_group"][0] == pytest.approx(cos_other, abs=1e-5)
    assert result["clips"][PEDESTRIAN]["oracle_group"][0] != pytest.approx(result["clips"][PEDESTRIAN]["score"][0])


def test_auc_over_all_frames_split_by_group_by_hand(tmp_path, nlp, metadata):
    # VV (TURNING, labels 0 0 0 1 1) and VP (PEDESTRIAN, labels 0 0 1 1 1): each separable alone,
    # but VP's normal frames (0.6, 0.65) outscore VV's abnormal ones (0.4, 0.5). Pooled:
    # VV positives beat 3 of 5 negatives each (6), VP positives all 5 (15): 21 / 25.
    meta = {k: metadata[k] for k in (TURNING, PEDESTRIAN)}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    levels = {TURNING: dict(zip(range(0, 50, 10), (0.1, 0.2, 0.3, 0.4, 0.5))),
              PEDESTRIAN: dict(zip(range(0, 50, 10), (0.6, 0.65, 0.7, 0.8, 0.9)))}
    frames = write_frames(tmp_path / "frames", meta, levels)
    result = evaluate_dota(FakeEncoder(load_descriptions(DESCRIPTIONS)), tmp_path / "meta.json", frames, nlp=nlp,
                           frame_stride=STRIDE, bootstrap=200, progress=False)
    g = result["groups"]
    assert result["clips"][PEDESTRIAN]["labels"] == [0, 0, 1, 1, 1]
    assert (g["VV"]["auc"], g["VP"]["auc"]) == (1.0, 1.0)
    assert g["overall"]["auc"] == pytest.approx(21 / 25)
    assert g["VO"]["auc"] is None and g["VO"]["ci95"] is None
    # One clip per group: every resample is that clip, so the interval is the point.
    assert g["VV"]["ci95"] == [1.0, 1.0]
    # Overall resamples: {VV, VV} and {VP, VP} give 1.0, {VV, VP} gives 0.84.
    lo, hi = g["overall"]["ci95"]
    assert lo == pytest.approx(0.84) and hi == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Bootstrap confidence intervals


def naive_bootstrap(labels, scores, resamples, seed, level=0.95):
    """The reference: draw clips the documented way, concatenate their frames, sklearn's AUC."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    aucs, undefined = [], 0
    for _ in range(resamples):
        pick = rng.integers(0, len(labels), len(labels))
        y = np.concatenate([labels[i] for i in pick])
        s = np.concatenate([scores[i] for i in pick])
        if len(set(y.tolist())) < 2:
            undefined += 1
            continue
        aucs.append(roc_auc_score(y, s))
    tail = 100 * (1 - level) / 2
    return np.percentile(aucs, [tail, 100 - tail]), undefined


def test_bootstrap_by_hand_two_clips():
    # Clip A: normal 0.1 < abnormal 0.9 (AUC 1); clip B: abnormal 0.2 < normal 0.8 (AUC 0).
    # {A, A}: 1; {B, B}: 0; {A, B}: positives 0.9, 0.2 vs negatives 0.1, 0.8 -> 3 of 4 pairs = 0.75.
    labels, scores = [[0, 1], [0, 1]], [[0.1, 0.9], [0.8, 0.2]]
    by_draw = {(0, 0): 1.0, (1, 1): 0.0, (0, 1): 0.75, (1, 0): 0.75}
    rng = np.random.default_rng(7)
    draws = [tuple(rng.integers(0, 2, 2).tolist()) for _ in range(3)]
    values = sorted(by_draw[d] for d in draws)
    # numpy's percentile interpolates linearly between the sorted values: position q/100 * (n - 1)
    low = values[0] + 0.05 * (values[1] - values[0])
    high = values[1] + 0.95 * (values[2] - values[1])
    ci = dota.bootstrap_auc(labels, scores, resamples=3, seed=7)
    assert (ci["low"], ci["high"], ci["undefined"]) == (pytest.approx(low), pytest.approx(high), 0)
    # Many resamples: the interval spans the extremes 0 and 1, reproducibly for one seed.
    many = dota.bootstrap_auc(labels, scores, resamples=1000, seed=0)
    assert (many["low"], many["high"]) == (0.0, 1.0)
    assert dota.bootstrap_auc(labels, scores, resamples=1000, seed=0) == many


def test_bootstrap_matches_the_naive_reference_with_ties_and_one_class_clips():
    rng = np.random.default_rng(3)
    labels = [rng.integers(0, 2, n) for n in (5, 8, 3, 6, 7)] + [np.zeros(4, int), np.ones(2, int)]
    scores = [np.round(rng.random(len(y)), 1) for y in labels]  # 0.1 steps: many ties
    ci = dota.bootstrap_auc(labels, scores, resamples=300, seed=11)
    (low, high), undefined = naive_bootstrap(labels, scores, 300, 11)
    assert ci["low"] == pytest.approx(low, abs=1e-12) and ci["high"] == pytest.approx(high, abs=1e-12)
    assert ci["undefined"] == undefined
    # Only one-class clips: a resample is defined only if it draws both.
    ci = dota.bootstrap_auc([[0, 0], [1]], [[0.2, 0.4], [0.3]], resamples=400, seed=1)
    (low, high), undefined = naive_bootstrap([np.array([0, 0]), np.array([1])], [np.array([0.2, 0.4]), np.array([0.3])], 400, 1)
    assert ci["undefined"] == undefined and 50 < undefined < 350  # about half draw one clip twice
    assert (ci["low"], ci["high"]) == (pytest.approx(low), pytest.approx(high))
    assert dota.bootstrap_auc([], [], resamples=10)["low"] is None


# --------------------------------------------------------------------------------------------
# Detector boxes and no-learning baselines


def test_pick_detections_rule():
    detections = [
        {"name": "person", "box": [0, 0, 40, 30], "score": 0.9},       # largest, not a vehicle
        {"name": "car", "box": [10, 10, 30, 20], "score": 0.5},        # the only vehicle: subject
        {"name": "traffic light", "box": [50, 0, 60, 10], "score": 0.99},
        {"name": "umbrella", "box": [0, 0, 64, 36], "score": 0.9},     # not a road class
        {"name": "truck", "box": [62, 30, 70, 40], "score": 0.9},      # 2 px wide after clipping... kept
        {"name": "bus", "box": [63, 35, 90, 50], "score": 0.9},        # 1 px x 1 px inside: dropped
    ]
    assert dota.pick_detections(detections, 64, 36) == [[10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 40.0, 30.0]]
    # No vehicle: the two largest detections; one detection: the object is left to the whole frame.
    assert dota.pick_detections(detections[:1] + detections[2:3], 64, 36) == [[0, 0, 40, 30], [50, 0, 60, 10]]
    assert dota.pick_detections(detections[2:3], 64, 36) == [[50.0, 0.0, 60.0, 10.0]]
    assert dota.box_pair([[50.0, 0.0, 60.0, 10.0]], 64, 36) == {"subj": [50.0, 0.0, 60.0, 10.0],
                                                                "obj": [0.0, 0.0, 64.0, 36.0]}
    assert dota.pick_detections(detections[3:4], 64, 36) == []
    assert dota.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert dota.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0


class FakeDetector:
    """Two cars on abnormal (bright) frames, overlapping by half; one small car otherwise."""

    def __init__(self):
        self.images = 0

    def __call__(self, images):
        self.images += len(images)
        out = []
        for im in images:
            bright = np.asarray(im).mean() > 127
            out.append([{"name": "car", "box": [0, 0, 32, 18], "score": 0.9},
                        {"name": "car", "box": [16, 0, 48, 18], "score": 0.8}] if bright else
                       [{"name": "car", "box": [0, 0, 8, 9], "score": 0.9}])
        return out


class BoxEncoder(FakeEncoder):
    uses_boxes = True

    def __init__(self, sections):
        super().__init__(sections)
        self.boxes = []

    def images(self, samples):
        self.boxes += [s.boxes for s in samples]
        return super().images(samples)


def test_detector_boxes_and_baselines_by_hand(tmp_path, nlp, metadata):
    meta = {TURNING: metadata[TURNING]}  # 41 frames, frames 0..40 by 10, labels 0 0 0 1 1
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    frames = write_frames(tmp_path / "frames", meta)
    detector = FakeDetector()
    boxes = dota.DetectorBoxes(detector, name="fake")
    encoder = BoxEncoder(load_descriptions(DESCRIPTIONS))
    result = evaluate_dota(encoder, tmp_path / "meta.json", frames, boxes=boxes, baselines=True, nlp=nlp,
                           frame_stride=STRIDE, progress=False)
    assert encoder.boxes[0] == {"subj": [0.0, 0.0, 8.0, 9.0], "obj": [0.0, 0.0, 64.0, 36.0]}
    assert encoder.boxes[-1] == {"subj": [0.0, 0.0, 32.0, 18.0], "obj": [16.0, 0.0, 48.0, 18.0]}
    assert result["boxes"]["mode"] == "detector" and result["no_boxes"] == 0
    b = result["clips"][TURNING]["baselines"]
    assert b["position"] == [0.0, 0.25, 0.5, 0.75, 1.0]  # frame / 40
    assert b["box_area"] == pytest.approx([72 / 2304] * 3 + [576 / 2304] * 2)
    assert b["box_iou"] == pytest.approx([0.0] * 3 + [288 / 864] * 2)  # 16x18 shared of 2 x 576 - 288
    for name in dota.BASELINES:
        assert result["baselines"][name]["groups"]["VV"]["auc"] == 1.0
    assert result["baselines"]["box_area"]["boxes"] == "detector"
    # A second model reuses the detections (one pass over the frames).
    evaluate_dota(encoder, tmp_path / "meta.json", frames, boxes=boxes, nlp=nlp, frame_stride=STRIDE, progress=False)
    assert detector.images == 5
    # Whole-frame mode: labelled, no box baselines, every frame counted without boxes.
    whole = evaluate_dota(BoxEncoder(load_descriptions(DESCRIPTIONS)), tmp_path / "meta.json", frames,
                          baselines=True, nlp=nlp, frame_stride=STRIDE, progress=False)
    assert whole["boxes"]["mode"] == "whole_frame" and whole["no_boxes"] == 5
    assert set(whole["baselines"]) == {"position"}


# --------------------------------------------------------------------------------------------
# Real (random-init) models


def test_end_to_end_random_saclip_and_plain_clip(tmp_path, nlp, metadata):
    from sapretrain.eval.encode import Encoder, load_model
    from sapretrain.model import SAClipConfig, build_saclip

    torch.manual_seed(0)
    frames = write_frames(tmp_path / "frames", metadata)
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    labels = [{"frame_id": 0, "image_path": f"frames/{TURNING}/images/000000.jpg", "accident_id": 5,
               "accident_name": "turning", "objects": [
                   {"obj_track_id": 1, "bbox": [2, 2, 30, 20], "category": "car"},
                   {"obj_track_id": 2, "bbox": [35, 10, 60, 30], "category": "car"}]},
              {"frame_id": 10, "image_path": f"frames/{TURNING}/images/000010.jpg", "accident_id": 5,
               "accident_name": "turning", "objects": [{"obj_track_id": 1, "bbox": [2, 2, 30, 20], "category": "car"}]}]
    (annotations / f"{TURNING}.json").write_text(json.dumps({"labels": labels}))

    model = build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False)).eval()
    result = evaluate_dota(Encoder(model), METADATA, frames, boxes=dota.AnnotationBoxes(annotations), nlp=nlp,
                           frame_stride=STRIDE, bootstrap=50, progress=False)
    assert result["clips_evaluated"] == 8 and result["groups"]["overall"]["frames"] == 48
    assert result["no_boxes"] == 48 - 2  # two annotated frames of TURNING
    assert result["boxes"]["mode"] == "annotations"
    for m in [*result["groups"].values(), *result["secondary"]["contrast"].values()]:
        assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["ci95"][0] <= m["ci95"][1] <= 1.0
    clip = result["clips"][TURNING]
    assert len(clip["score"]) == len(clip["contrast"]) == len(clip["frames"]) == 5
    assert all(-1.0 <= s <= 1.0 for s in clip["score"])
    assert len(clip["explanations"]["anomaly_window"]) == 3
    json.dumps(result)  # the result is JSON-serialisable as is

    plain = load_model("openclip:sa-tiny")[0]
    result = evaluate_dota(Encoder(plain), METADATA, frames, boxes=dota.AnnotationBoxes(annotations), nlp=nlp,
                           frame_stride=STRIDE, max_clips=2, bootstrap=50, progress=False)
    assert result["no_boxes"] == 0 and result["boxes"]["mode"] == "ignored"
    assert result["clips_evaluated"] == 2


def random_yolo(path: Path) -> Path:
    """A random-init YOLOv8n (offline, from ultralytics' packaged yaml) saved as weights."""
    pytest.importorskip("ultralytics")
    from sapretrain.detector import load_yolo

    torch.manual_seed(0)
    model = load_yolo("yolov8n.yaml")
    model.save(str(path))
    return path


def test_evaluate_cli_dota_writes_results_and_roc_plots(tmp_path, metadata, capsys):
    import subprocess
    import sys

    frames = write_frames(tmp_path / "frames", metadata)
    weights = random_yolo(tmp_path / "yolo.pt")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "tools" / "evaluate.py"), "--task", "dota",
         "--checkpoint", "CLIP=openclip:sa-tiny", "--metadata", str(METADATA), "--frames", str(frames),
         "--detector-weights", str(weights), "--bootstrap", "100",
         "--frame-stride", str(STRIDE), "--max-clips", "3", "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "YOLO_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "results.json").read_text())
    result = report["models"]["CLIP"]
    assert result["clips_evaluated"] == 3 and result["plain_clip"]
    assert report["plots"] == ["dota_roc-CLIP.png"] and (out / "dota_roc-CLIP.png").stat().st_size > 5_000
    assert report["boxes"].startswith("detector") and set(report["baselines"]) == set(dota.BASELINES)
    assert report["models"]["CLIP"]["bootstrap"]["resamples"] == 100
    table = (out / "results.md").read_text()
    assert "| **CLIP** | ignored |" in table and "| position (no model) | none |" in table
    assert "| box_area (no model) | detector |" in table and "oracle_group" in table

    # Nothing to score (no frames folder for any clip): the run says so and exits 2.
    empty = tmp_path / "empty"
    empty.mkdir()
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_tool", PROJECT_ROOT / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(["--task", "dota", "--checkpoint", "openclip:sa-tiny", "--metadata", str(METADATA),
                      "--frames", str(empty), "--max-clips", "2", "--bootstrap", "10",
                      "--output", str(tmp_path / "out2"), "--no-progress"])
    assert code == 2 and "no clip could be scored" in capsys.readouterr().err
    assert json.loads((tmp_path / "out2" / "results.json").read_text())["models"]["openclip:sa-tiny"]["skipped"][
        "missing_folder"] == 2
