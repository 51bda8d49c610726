"""Evaluation core: model loading, encoding like the shards, the spatial probe, the verdict, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import PROJECT_ROOT, synthetic_shards
from sapretrain.data.synthetic import CONFIGURATIONS, EVAL_SEED_BASE, plan_scene, render_scene
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


def test_verdict_needs_every_modality_to_reach_the_target():
    results = {
        "CLIP": {"text": {"knn_accuracy": 0.15}, "image": {"knn_accuracy": 0.12}},
        "SA": {"text": {"knn_accuracy": 0.70}, "image": {"knn_accuracy": 0.33}},
        "weak": {"text": {"knn_accuracy": 0.90}, "image": {"knn_accuracy": 0.30}},
    }
    v = run.verdict({k: results[k] for k in ("CLIP", "SA")}, "CLIP", 0.20)
    assert v["gains"] == {"SA": {"text": 0.55, "image": 0.21}} and v["pass"]
    v = run.verdict(results, "CLIP", 0.20)
    assert v["gains"]["weak"]["image"] == pytest.approx(0.18) and not v["pass"]


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
           "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"MPLBACKEND": "Agg", **_env()})
    # Two untrained models: no +0.20 gain in both modalities, so the verdict fails (exit 1).
    assert done.returncode == 1, done.stderr
    report = json.loads((out / "results.json").read_text())
    assert set(report["models"]) == {"SA", "CLIP"}
    assert report["models"]["CLIP"]["plain_clip"] and not report["models"]["SA"]["plain_clip"]
    for r in report["models"].values():
        assert 0.0 <= r["text"]["knn_accuracy"] <= 1.0 and -1.0 <= r["image"]["silhouette"] <= 1.0
    assert report["verdict"]["baseline"] == "CLIP" and report["verdict"]["pass"] is False
    assert (out / "spatial_tsne.png").stat().st_size > 10_000
    assert "verdict: FAIL" in done.stdout and "| SA |" in (out / "results.md").read_text()

    bad = subprocess.run([sys.executable, EVALUATE, "--task", "vsr", "--checkpoint", "openclip:sa-tiny",
                          "--out", str(out)], capture_output=True, text=True, timeout=120, env=_env())
    assert bad.returncode == 2 and "needs --vsr and --images" in bad.stderr


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}
