"""Evaluation core: model loading, encoding like the shards, the demo's spatial evidence, the verdict, the CLI."""
from __future__ import annotations

import json
import subprocess
from collections import Counter
import sys
import tarfile

import pytest
import torch

from conftest import PROJECT_ROOT, synthetic_shards
from sapretrain.scenes.synthetic import CONFIGURATIONS, EVAL_SEED_BASE, OPPOSITE, plan_scene, render_scene
from sapretrain.eval import run, spatial
from sapretrain.eval.encode import Encoder, EvalSample, load_model
from sapretrain.model import SAClipConfig, build_saclip, save_saclip

EVALUATE = str(PROJECT_ROOT / "tools" / "evaluate.py")


def tiny_saclip(seed: int = 0):
    torch.manual_seed(seed)
    return build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False)).eval()


# ----- k-NN and silhouette


def test_knn_accuracy_against_hand_computed_neighbours():
    # Four points on the unit circle (degrees 0, 10, 90, 100) and one at 180.
    angles = torch.tensor([0.0, 10.0, 90.0, 100.0, 180.0]).deg2rad()
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = ["a", "a", "b", "b", "a"]
    # 1-NN: 0->1 (a ok), 1->0 (a ok), 2->3 (b ok), 3->2 (b ok), 4 (180) -> 3 (100, b) wrong.
    assert spatial.knn_accuracy(x, labels, k=1) == pytest.approx(4 / 5)
    # 2-NN: every point but 180 has one neighbour of each label (or two of its own); ties go to the
    # larger summed similarity, i.e. the 10-degree neighbour: 0, 10 -> a, 90, 100 -> b (all right);
    # 180's two nearest are 100 and 90 (b), wrong.
    assert spatial.knn_accuracy(x, labels, k=2) == pytest.approx(4 / 5)
    # Scaling an embedding does not change cosine neighbours.
    assert spatial.knn_accuracy(x * torch.tensor([[1.0], [5.0], [0.1], [2.0], [3.0]]), labels, k=1) == pytest.approx(4 / 5)


def test_knn_accuracy_rejects_bad_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="k must be"):
        spatial.knn_accuracy(x, ["a", "b", "a", "b"], k=4)
    with pytest.raises(ValueError, match="labels"):
        spatial.knn_accuracy(x, ["a", "b"], k=1)


def test_silhouette_is_high_for_separated_relations_and_low_for_mixed():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4)
    labels = [CONFIGURATIONS[i % 4] for i in range(40)]
    tight = torch.stack([centres[i % 4] for i in range(40)]) + 0.01 * torch.randn(40, 4, generator=g)
    assert spatial.silhouette(tight, labels) > 0.9
    assert spatial.knn_accuracy(tight, labels, k=5) == 1.0
    mixed = torch.randn(40, 4, generator=g)
    assert spatial.silhouette(mixed, labels) < 0.2


# ----- the probe set


def test_probe_set_takes_one_scene_per_pair_from_the_held_apart_split():
    probe = spatial.probe_set(16, progress=False)
    assert len(probe.samples) == len(probe.labels) == 16
    assert probe.ids == [f"clevr-eval-{2 * i:09d}" for i in range(16)]  # even indices: no partners
    # The label is the caption's relation (subject to object), not the A/B configuration.
    assert probe.labels == [plan_scene("eval", 2 * i).relation for i in range(16)]
    assert len(set(probe.labels)) >= 6
    scene = render_scene("eval", 6)
    assert scene.seed >= EVAL_SEED_BASE
    assert probe.labels[3] == scene.relation and probe.samples[3].caption == scene.caption
    assert probe.samples[3].boxes == scene.boxes
    with pytest.raises(ValueError, match="at least 8"):
        spatial.probe_set(4, progress=False)
    # Each negative is the scene's opposite caption (same objects and words but the relation).
    assert probe.negatives[3].caption == scene.negative["caption"] != scene.caption
    assert probe.negatives[3].image is None
    # Role-free label: where the sphere is relative to the cube, None when both have one shape.
    for i in range(16):
        a, b = plan_scene("eval", 2 * i).objects
        expected = None if a.shape == b.shape else (
            plan_scene("eval", 2 * i).configuration if a.shape == "sphere"
            else OPPOSITE[plan_scene("eval", 2 * i).configuration])
        assert probe.role_free[i] == expected
    assert any(r is None for r in probe.role_free) and any(r is not None for r in probe.role_free)


# ----- encoding is the training input


def test_encoder_tokens_and_spans_equal_the_shards(tmp_path):
    shards = synthetic_shards(tmp_path, scenes=8, shard_size=8)
    with tarfile.open(next(shards.glob("*.tar"))) as tar:
        sides = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    encoder = Encoder(tiny_saclip())
    for side in sides:
        for member in ("a", "p"):
            sample = side[member]
            triplet = {p: {"start": s, "end": e} for p, (s, e) in sample["char_spans"].items()}
            ids, masks = encoder._caption(EvalSample(caption=sample["caption"], triplet=triplet))
            assert ids[: len(sample["tokens"])].tolist() == sample["tokens"]
            for i, part in enumerate(("subj", "rel", "obj")):
                assert masks[i].nonzero().flatten().tolist() == sample["spans"][part]


def test_encoder_gives_unit_embeddings_and_refuses_missing_inputs():
    scene = render_scene("eval", 0)
    sample = EvalSample(scene.image, scene.boxes, scene.caption, scene.triplet)
    encoder = Encoder(tiny_saclip(), batch_size=2)
    u = encoder.texts([sample] * 3)
    v = encoder.images([sample] * 3)
    assert u.shape == v.shape == (3, 128)  # 2 x sa-tiny's 64
    assert torch.allclose(u.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(v[0], v[2], atol=1e-6)  # batching does not change a sample's embedding
    parts = encoder.images([sample], parts=True)
    assert set(parts) == {"v", "image_embed", "r_roi"}
    with pytest.raises(ValueError, match="SVO spans"):
        encoder.texts([EvalSample(caption=scene.caption)])
    with pytest.raises(ValueError, match="boxes"):
        encoder.images([EvalSample(image=scene.image)])
    plain = Encoder(load_model("openclip:sa-tiny")[0])
    assert not plain.uses_spans and not plain.uses_boxes
    assert plain.texts([EvalSample(caption=scene.caption)]).shape == (1, 128)  # no spans needed


# ----- loading


def test_load_model_reads_runs_checkpoints_and_model_files(tmp_path):
    from sapretrain.config import load_config
    from sapretrain.train.checkpoint import load_tensor_file
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import train

    shards = synthetic_shards(tmp_path, scenes=16, shard_size=4)
    out = tmp_path / "run"
    cfg = load_config(TrainConfig, PROJECT_ROOT / "configs" / "demo.yaml", [
        f"data.shards={shards}", "data.batch_pairs=2", "data.workers=1", "data.shuffle_buffer=4",
        "optim.steps=2", "optim.warmup_steps=1", f"run.output_dir={out}", "run.trackers=[]",
        "run.checkpoint_every=2"])
    train(cfg)
    state = load_tensor_file(f"{out}/checkpoints/step-00000002/state.pt")

    from_run, _ = load_model(str(out))
    from_dir, _ = load_model(f"{out}/checkpoints/step-00000002")
    for model in (from_run, from_dir):
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in state["model"].items())
        assert not model.training

    save_saclip(from_run, str(tmp_path / "model.pt"))
    from_file, _ = load_model(str(tmp_path / "model.pt"))
    scene = render_scene("eval", 2)
    sample = EvalSample(scene.image, scene.boxes, scene.caption, scene.triplet)
    assert torch.allclose(Encoder(from_file).images([sample]), Encoder(from_run).images([sample]), atol=1e-6)

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="complete checkpoints"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="openclip:MODEL"):
        load_model(str(tmp_path / "nothing"))


# ----- verdict and the command line


def test_verdict_is_the_candidates_gain_in_the_headline_condition():
    def acc(x):
        return {"relation_accuracy": {"detector": {"accuracy": x}, "gold": {"accuracy": 1.0}}}

    results = {"CLIP": acc(0.55), "SA": acc(0.90), "weak": acc(0.70)}
    oracle = acc(0.98)
    v = run.verdict(results, "SA", "CLIP", 0.25, "detector", oracle)
    assert v["gain"] == pytest.approx(0.35) and v["pass"] and v["oracle_accuracy"] == 0.98
    v = run.verdict(results, "weak", "CLIP", 0.25, "detector", oracle)
    assert v["gain"] == pytest.approx(0.15) and not v["pass"]
    # The gold column does not count: every model is at 1.0 there.
    assert not run.verdict({"CLIP": acc(0.5), "SA": acc(0.6)}, "SA", "CLIP", 0.25, "detector")["pass"]


def test_parse_model_args():
    assert run.parse_model_args(["SA=runs/a", "openclip:ViT-B-32:openai", "runs/b"]) == [
        ("SA", "runs/a"), ("openclip:ViT-B-32:openai", "openclip:ViT-B-32:openai"), ("runs/b", "runs/b")]
    with pytest.raises(ValueError, match="unique"):
        run.parse_model_args(["x=runs/a", "x=runs/b"])


def test_evaluate_cli_writes_results_and_fails_an_unmet_verdict(tmp_path):
    model = tiny_saclip(seed=1)
    save_saclip(model, str(tmp_path / "sa.pt"))
    out = tmp_path / "eval"
    cmd = [sys.executable, EVALUATE, "--task", "spatial", "--checkpoint", f"SA={tmp_path / 'sa.pt'}",
           "--checkpoint", "CLIP=openclip:sa-tiny", "--baseline", "CLIP", "--scenes", "24", "--k", "3",
           "--output", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"MPLBACKEND": "Agg", **_env()})
    # Two untrained models: no +0.25 gain in cross-modal relation accuracy, so the verdict fails (exit 1).
    assert done.returncode == 1, done.stderr
    report = json.loads((out / "results.json").read_text())
    assert set(report["models"]) == {"SA", "CLIP"}
    assert report["models"]["CLIP"]["plain_clip"] and not report["models"]["SA"]["plain_clip"]
    assert report["headline"] == "gold"  # no detector given: the gold boxes head the table, labelled
    for r in report["models"].values():
        assert 0.0 <= r["text"]["knn_accuracy"] <= 1.0 and -1.0 <= r["image"]["silhouette"] <= 1.0
        assert set(r["relation_accuracy"]) == set(report["conditions"])
        assert all(c["n"] == 24 for c in r["relation_accuracy"].values())
    # A plain CLIP never reads the boxes: every box condition gives it the same accuracy, no flips.
    clip = report["models"]["CLIP"]
    assert len({c["accuracy"] for c in clip["relation_accuracy"].values()}) == 1 and clip["flip_rate"] == 0.0
    oracle = report["baselines"]["geometry oracle (no learning)"]["relation_accuracy"]
    assert oracle["gold"]["accuracy"] == 1.0 and oracle["gold, swapped"]["accuracy"] == 0.0
    assert oracle["whole frame"]["accuracy"] == 0.0 and oracle["whole frame"]["ties"] == 24
    assert report["verdict"]["candidate"] == "SA" and report["verdict"]["pass"] is False
    assert (out / "spatial_tsne.png").stat().st_size > 10_000
    assert (out / "relation_accuracy.png").stat().st_size > 5_000
    assert ": FAIL**" in done.stdout and "| SA |" in (out / "results.md").read_text()

    bad = subprocess.run([sys.executable, EVALUATE, "--task", "vsr", "--checkpoint", "openclip:sa-tiny",
                          "--output", str(out)], capture_output=True, text=True, timeout=120, env=_env())
    assert bad.returncode == 2 and "needs --vsr and --images" in bad.stderr


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}


# ----- cross-modal relation accuracy, counterfactuals and the no-learning rows


def test_accuracy_and_flip_rate_count_ties_as_no_preference():
    margins = torch.tensor([0.3, -0.1, 0.0, 0.2])
    assert spatial.accuracy(margins) == 0.5  # 0.3 and 0.2; the tie is wrong
    swapped = torch.tensor([-0.2, 0.4, 0.5, 0.0])
    # 0.3 -> -0.2 and -0.1 -> 0.4 flip; a tie before (0.0) or after (0.2 -> 0.0) is no flip.
    assert spatial.flip_rate(margins, swapped) == 0.5
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    u_pos = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    u_neg = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # cos: row 0: 1/sqrt(2) - 0; row 1: 1 - 0.
    assert torch.allclose(spatial.preference(v, u_pos, u_neg), torch.tensor([0.5 ** 0.5, 1.0], dtype=torch.float64))


def test_relation_words_and_their_geometric_agreement():
    assert spatial.relation_direction("to the left of") == (-1, 0)
    assert spatial.relation_direction("behind and to the right of") == (1, 1)
    assert spatial.relation_direction("to the front left of") == (-1, -1)
    assert spatial.relation_direction("to the back right of") == (1, 1)
    assert spatial.relation_direction("next to") == (0, 0)
    boxes = {"subj": [0, 50, 20, 70], "obj": [60, 40, 100, 100]}  # subject left of and above (behind) the object
    # sideways: centres 10 vs 80 over width 200 -> -0.35; away: bottoms 70 vs 100 over height 100 -> +0.3
    assert spatial.geometric_agreement("left of", boxes, 200, 100) == pytest.approx(0.35)
    assert spatial.geometric_agreement("right of", boxes, 200, 100) == pytest.approx(-0.35)
    assert spatial.geometric_agreement("behind and left of", boxes, 200, 100) == pytest.approx(0.65)
    assert spatial.geometric_agreement("in front of", boxes, 200, 100) == pytest.approx(-0.3)
    assert spatial.geometric_agreement("near", boxes, 200, 100) == 0.0


def test_box_conditions_oracle_and_text_only_baseline():
    probe = spatial.probe_set(40, progress=False)
    conditions = spatial.box_conditions(probe, None, jitter=(0.1,), seed=3)
    assert list(conditions) == ["gold", "gold + jitter 0.1", "gold, swapped", "whole frame"]
    assert spatial.box_conditions(probe, None, jitter=(0.1,), seed=3)["gold + jitter 0.1"] == conditions["gold + jitter 0.1"]
    for s, j, w in zip(probe.samples, conditions["gold + jitter 0.1"], conditions["whole frame"]):
        width, height = s.image.size
        assert j != s.boxes and all(0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height for b in j.values())
        assert w == {"subj": [0.0, 0.0, width, height], "obj": [0.0, 0.0, width, height]}
    assert conditions["gold, swapped"][0] == {"subj": probe.samples[0].boxes["obj"], "obj": probe.samples[0].boxes["subj"]}
    # The generator only keeps placements that read clearly, so the oracle is exact on gold boxes,
    # always wrong on swapped ones, and has no preference on whole frames.
    assert spatial.accuracy(spatial.oracle_margins(probe, conditions["gold"])) == 1.0
    assert spatial.accuracy(spatial.oracle_margins(probe, conditions["gold, swapped"])) == 0.0
    assert (spatial.oracle_margins(probe, conditions["whole frame"]) == 0).all()
    detected = [dict(s.boxes) for s in probe.samples]
    assert list(spatial.box_conditions(probe, detected, jitter=()))[:2] == ["detector", "gold"]
    with pytest.raises(ValueError, match="detected box pairs"):
        spatial.box_conditions(probe, detected[:-1])
    # Captions and their opposites are equally plausible sentences: text alone is near chance.
    text_only = spatial.TextOnlyBaseline(train_scenes=400)
    assert 0.3 <= spatial.accuracy(text_only.margins(probe)) <= 0.7


def test_model_margins_read_boxes_only_for_sa_clip():
    probe = spatial.probe_set(16, progress=False)
    conditions = spatial.box_conditions(probe, None, jitter=())
    plain = spatial.model_margins(Encoder(load_model("openclip:sa-tiny")[0]), probe, conditions)
    assert all(torch.equal(plain["gold"], m) for m in plain.values())
    sa = spatial.model_margins(Encoder(tiny_saclip()), probe, conditions)
    assert not torch.allclose(sa["gold"], sa["gold, swapped"])
    assert sa["gold"].shape == (16,)


def test_role_free_probe_and_raw_pixels():
    probe = spatial.probe_set(40, progress=False)
    keep = [i for i, r in enumerate(probe.role_free) if r is not None]
    # An embedding that is the label itself: 1-NN is right for every scene whose label another kept
    # scene shares (a label seen once has no neighbour of its own); only labelled scenes count.
    codes = torch.stack([torch.eye(8)[CONFIGURATIONS.index(probe.role_free[i])] if i in keep else torch.zeros(8)
                         for i in range(40)])
    counts = Counter(probe.role_free[i] for i in keep)
    expected = sum(counts[probe.role_free[i]] > 1 for i in keep) / len(keep)
    assert spatial.role_free(codes, probe, k=1) == {"knn_accuracy": expected, "scenes": len(keep)}
    pixels = spatial.raw_pixels(probe.samples)
    assert pixels.shape == (40, 3 * 32 * 24) and torch.allclose(pixels.mean(1), torch.zeros(40, dtype=torch.float64), atol=1e-9)


# ----- the scene detector: from caption words to detected boxes


def test_part_attributes_and_matching_by_colour_shape_and_size():
    from sapretrain.eval.scene_detector import instances, match_parts, part_attributes

    assert part_attributes("large red metal cube") == {"shape": "cube", "color": "red", "size": "large"}
    assert part_attributes("shiny ball") == {"shape": "sphere", "color": None, "size": None}
    dets = [{"name": "red cube", "box": [0, 0, 10, 10], "score": 0.9},
            {"name": "blue cube", "box": [50, 0, 90, 40], "score": 0.8},
            {"name": "blue sphere", "box": [100, 0, 120, 20], "score": 0.7}]
    boxes, how = match_parts({"subj": "red cube", "obj": "blue sphere"}, dets, 200, 100)
    assert boxes == {"subj": [0, 0, 10, 10], "obj": [100, 0, 120, 20]} and set(how.values()) == {"detected"}
    # "red cube" agrees best with the red cube (2 x 0.9); "large cube" then takes the blue cube
    # (shape +1 x 0.8) over the sphere (-1 x 0.7).
    boxes, how = match_parts({"subj": "large cube", "obj": "red cube"}, dets, 200, 100)
    assert boxes == {"subj": [50, 0, 90, 40], "obj": [0, 0, 10, 10]}
    # "small cube" / "cube": both assignments agree equally (0.9 + 0.8); the size word decides.
    boxes, how = match_parts({"subj": "small cube", "obj": "cube"}, dets, 200, 100)
    assert boxes == {"subj": [0, 0, 10, 10], "obj": [50, 0, 90, 40]} and how["subj"] == "by_size"
    # A shape the detector got wrong: the red cube detected as "red sphere" still wins on colour.
    wrong_shape = [{"name": "red sphere", "box": [0, 0, 10, 10], "score": 0.6},
                   {"name": "blue sphere", "box": [100, 0, 120, 20], "score": 0.9}]
    boxes, _ = match_parts({"subj": "red cube", "obj": "blue sphere"}, wrong_shape, 200, 100)
    assert boxes == {"subj": [0, 0, 10, 10], "obj": [100, 0, 120, 20]}
    # One object under two labels is one instance keeping both; the better label counts.
    merged = instances([{"name": "red sphere", "box": [0, 0, 10, 10], "score": 0.5},
                        {"name": "red cube", "box": [0, 0, 10, 11], "score": 0.4},
                        {"name": "blue sphere", "box": [100, 0, 120, 20], "score": 0.3}])
    assert len(merged) == 2 and merged[0]["labels"] == [("red sphere", 0.5), ("red cube", 0.4)]
    # Fewer than two instances: the best-fitting part gets it, the other the whole frame.
    boxes, how = match_parts({"subj": "green sphere", "obj": "cube"}, dets[:1], 200, 100)
    assert boxes == {"subj": [0.0, 0.0, 200.0, 100.0], "obj": [0.0, 0.0, 10.0, 10.0]}
    assert how == {"subj": "missing", "obj": "detected"}
    boxes, how = match_parts({"subj": "cube", "obj": "sphere"}, [], 200, 100)
    assert set(how.values()) == {"missing"}


def test_scene_detector_labels_and_training_round_trip(tmp_path):
    from sapretrain.scenes.synthetic import write_synthetic
    from sapretrain.eval.scene_detector import CLASSES, DetectorSettings, train_scene_detector, write_yolo_dataset

    synthetic = tmp_path / "synthetic"
    write_synthetic(synthetic, "train", 12, progress=False)
    settings = DetectorSettings(train_scenes=8, val_scenes=4, epochs=1, imgsz=64, batch=4)
    data = write_yolo_dataset(synthetic, tmp_path / "dataset", settings)
    assert "names:" in data.read_text() and len((tmp_path / "dataset" / "val.txt").read_text().split()) == 4
    scene = plan_scene("train", 5)
    lines = (synthetic / "labels" / "clevr-train-000000005.txt").read_text().split("\n")[:2]
    for line, obj in zip(lines, scene.objects):
        cls, cx, cy, w, h = line.split()
        x0, y0, x1, y1 = scene._clip(obj.box)
        assert CLASSES[int(cls)] == f"{obj.color} {obj.shape}"
        assert float(cx) == pytest.approx((x0 + x1) / 2 / 320, abs=1e-5) and float(h) == pytest.approx((y1 - y0) / 240, abs=1e-5)
    with pytest.raises(FileNotFoundError, match="make_shards"):
        write_yolo_dataset(synthetic, tmp_path / "d2", DetectorSettings(train_scenes=20, val_scenes=4))
    logs = []
    weights = train_scene_detector(tmp_path / "det", synthetic, settings, workers=0, log=logs.append)
    meta = json.loads((tmp_path / "det" / "detector.json").read_text())
    assert weights.exists() and meta["classes"] == list(CLASSES) and 0.0 <= meta["metrics"]["mAP50"] <= 1.0
    assert train_scene_detector(tmp_path / "det", synthetic, settings, log=logs.append) == weights
    assert "already trained" in logs[-1]
