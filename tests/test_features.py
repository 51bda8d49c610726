"""Feature shards (tools/cache_features.py, data.features): equivalence with the live tower, the CLI
round trip through the real entry points, refusal of another model, resume of the cache tool."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import PROJECT_ROOT, synthetic_shards
from sapretrain.data.loader import LoaderConfig, build_loader
from sapretrain.features import FeatureMismatch, build_frozen_model, cache_features, check_features
from sapretrain.losses import LossConfig, SAClipLoss
from sapretrain.data.batch import build_preprocess, decode_features
from sapretrain.model.saclip import SAClipConfig

TINY = SAClipConfig(name="sa-tiny", pretrained=None)
# fp16 storage of raw f_v: relative rounding error <= 2**-11 per element.
FP16_RTOL = 2.0**-11


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """12 records of synthetic scenes (64 px) in 4 shards."""
    return synthetic_shards(tmp_path_factory.mktemp("feature-data"), scenes=24, shard_size=3)


@pytest.fixture(scope="module")
def cached(shards, tmp_path_factory):
    """The sa-tiny tower (random init, seed 0, as tools/cache_features.py builds it) and its features."""
    model = build_frozen_model(TINY, seed=0)
    out = tmp_path_factory.mktemp("features") / "feat"
    report = cache_features(str(shards), str(out), model, batch_size=8, progress=False)
    assert report.finalized and report.records_written == 12 and report.records_skipped == 0
    return model, out


def first_batch(shards, features=None, preprocess=None):
    cfg = LoaderConfig(shards=str(shards), features=str(features) if features else None, batch_pairs=4, workers=0,
                       shuffle_buffer=4)
    return next(iter(build_loader(cfg, preprocess, rank=0, world_size=1)))


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    terms = loss_fn(model(batch))
    loss = sum(terms.values())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_feature_mode_equals_the_live_tower_within_fp16(shards, cached):
    """Same records, same weights: loss and every trainable gradient agree within fp16 storage error.

    Stated tolerance: features within 2**-11 relative (fp16 rounding; +1e-3 absolute) of the live
    f_v; loss within 2e-4 relative; each gradient within 5e-3 of its own largest magnitude
    (measured on this batch: 2e-5 and 6e-4).
    """
    model, features = cached
    pixels = first_batch(shards, preprocess=build_preprocess(model))
    feats = first_batch(shards, features=features)
    assert set(feats) == {"image_features", "roi_features", "boxes", "text", "spans", "neg_text", "neg_spans", "groups"}
    for key in ("boxes", "text", "spans", "neg_text", "neg_spans", "groups"):  # same records, same order
        assert torch.equal(feats[key], pixels[key]), key
    assert feats["image_features"].dtype == torch.float32 and feats["roi_features"].shape == (8, 2, model.embed_dim)

    live_image, live_rois = model.vision_features(pixels["image"], pixels["rois"])
    torch.testing.assert_close(feats["image_features"], live_image, rtol=FP16_RTOL, atol=1e-3)
    torch.testing.assert_close(feats["roi_features"], live_rois, rtol=FP16_RTOL, atol=1e-3)

    model.train()
    loss_fn = SAClipLoss(LossConfig(clip=True))
    loss_live, grads_live = loss_and_grads(model, loss_fn, pixels)
    loss_feat, grads_feat = loss_and_grads(model, loss_fn, feats)
    assert loss_feat == pytest.approx(loss_live, rel=2e-4)
    assert grads_live.keys() == grads_feat.keys() and not any(n.startswith("clip.visual.") for n in grads_live)
    assert {"roi_proj.weight", "box_embed.0.weight", "svo_proj.weight", "clip.logit_scale"} <= grads_live.keys()
    for name, g in grads_live.items():
        torch.testing.assert_close(grads_feat[name], g, rtol=0, atol=5e-3 * g.abs().max().item() + 1e-8, msg=name)

    # The model path itself is exact: fed the live features, feature mode gives the live loss.
    exact = {**{k: v for k, v in pixels.items() if k not in ("image", "rois")},
             "image_features": live_image, "roi_features": live_rois}
    assert loss_and_grads(model, loss_fn, exact)[0] == pytest.approx(loss_live, rel=1e-6)


def test_check_refuses_another_tower_or_preprocessing(shards, cached):
    model, features = cached
    header = check_features(str(features), model)
    assert header["model"]["embed_dim"] == 64 and header["dtype"] == "float16"
    with pytest.raises(FeatureMismatch, match="hash differently.*seed"):
        check_features(str(features), build_frozen_model(TINY, seed=1))
    with pytest.raises(FeatureMismatch, match="decode_image_size"):
        check_features(str(features), model, image_size=48)
    torch.manual_seed(0)
    from sapretrain.model.saclip import build_saclip

    with pytest.raises(FeatureMismatch, match="fully frozen vision tower"):
        check_features(str(features), build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False)))
    with pytest.raises(SystemExit, match="another model"):  # the cache tool will not mix models in one output
        cache_features(str(shards), str(features), build_frozen_model(TINY, seed=1), progress=False)


def shard_hashes(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", PROJECT_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_round_trip_resume_and_feature_training(shards, cached, tmp_path, capsys):
    out = tmp_path / "feat"
    code = load_tool("cache_features").main(["--shards", str(shards), "--output", str(out), "--model", "sa-tiny",
                                              "--pretrained", "none", "--batch-size", "8", "--no-progress"])
    assert code == 0 and "4 written now" in capsys.readouterr().out
    # Same device, same tower: the CLI's shards are byte-identical to the in-process ones.
    reference = shard_hashes(cached[1])
    assert shard_hashes(out) == reference
    assert json.loads((out / "sizes.json").read_text()) == json.loads((shards / "sizes.json").read_text())
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == [names[0].split(".")[0] + ".json", names[0].split(".")[0] + ".feat.npy"] and len(names) == 6

    # A run killed after committing shard 1 but before its progress file, and while writing shard 2
    # (a stale temporary): the re-run rewrites exactly those, with the same bytes.
    (out / "_progress" / "shard-000001.tar.json").unlink()
    (out / "_progress" / "shard-000002.tar.json").unlink()
    (out / "shard-000002.tar").rename(out / "shard-000002.tar.tmp.999")
    (out / "sizes.json").unlink()
    model = build_frozen_model(TINY, seed=0)
    report = cache_features(str(shards), str(out), model, batch_size=8, progress=False)
    assert (report.shards_written, report.shards_skipped, report.finalized) == (2, 2, True)
    assert not list(out.glob("*.tmp.*")) and shard_hashes(out) == reference
    again = cache_features(str(shards), str(out), model, batch_size=8, progress=False)  # idempotent
    assert (again.shards_written, again.shards_skipped) == (0, 4) and shard_hashes(out) == reference

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    train = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "launch" / "pretrain.py"), "--config", str(PROJECT_ROOT / "configs" / "demo.yaml"),
         "model.lock_image=true", f"data.shards={tmp_path}/not-read", f"data.features={out}", "data.batch_pairs=4",
         "data.workers=2", "data.shuffle_buffer=4", "data.image_size=null", "optim.steps=2", "optim.warmup_steps=1",
         "run.precision=no", "run.log_every=1", "run.checkpoint_every=2", "run.trackers=[]",
         f"run.output_dir={tmp_path / 'run'}"],
        env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "the vision tower is not run" in train.stdout and "step 2/2" in train.stdout
    state = torch.load(tmp_path / "run/checkpoints/step-00000002/state.pt", weights_only=True)
    assert not any(k.startswith("clip.visual.") for k in state["model"])  # the locked tower is not stored


def test_trainer_refuses_features_of_another_tower(cached):
    from sapretrain.config import load_config
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import build_model, build_preprocess_or_check_features

    _, features = cached
    base = ["model.name=sa-tiny", "model.pretrained=null", f"data.features={features}"]
    for extra, message in ((["model.lock_image=true", "run.seed=5"], "hash differently"),
                           (["model.lock_image=false"], "fully frozen vision tower"),
                           (["model.lock_image=true", "data.features=/nowhere"], "cache_features")):
        cfg = load_config(TrainConfig, None, base + extra)
        torch.manual_seed(cfg.run.seed)  # as the trainer's set_seed before build_model
        with pytest.raises(SystemExit, match=message):
            build_preprocess_or_check_features(cfg, build_model(cfg))
    cfg = load_config(TrainConfig, None, base + ["model.lock_image=true"])
    torch.manual_seed(0)
    assert build_preprocess_or_check_features(cfg, build_model(cfg), log=lambda *a: None) is None


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_bad_feature_arrays_are_rejected():
    good = np.zeros((2, 3, 8), np.float16)
    assert decode_features(npy(good)).shape == (2, 3, 8)
    for bad in (good.astype(np.float32), good[:1], np.full((2, 3, 8), np.inf, np.float16)):
        with pytest.raises(ValueError):
            decode_features(npy(bad))
    with pytest.raises(ValueError):
        decode_features(b"not an array")


def test_loader_skips_and_counts_a_bad_feature_record(cached, tmp_path):
    """A corrupt feat.npy is a bad record like an undecodable JPEG: skipped, counted, quota kept."""
    _, features = cached
    out = tmp_path / "feat"
    shutil.copytree(features, out)
    with tarfile.open(features / "shard-000000.tar") as src, tarfile.open(out / "shard-000000.tar", "w") as dst:
        for i, info in enumerate(src.getmembers()):
            data = src.extractfile(info).read()
            if i == 1:  # the first record's feat.npy
                data = npy(np.zeros((2, 3, 64), np.float32))
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    cfg = LoaderConfig(shards="unused", features=str(out), batch_pairs=4, workers=0, shuffle_buffer=4)
    loader = build_loader(cfg, None, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == 3 and all(b["image_features"].shape == (8, 64) for b in batches)
    assert loader.stats()["dropped"] == {"bad_features": 1}


def test_features_to_and_from_s3(shards, cached, s3_env):
    """Object-storage output (one upload per shard) and streaming it back: the same batch as local."""
    model, local = cached
    s3_env.mkdir("feature-test")
    report = cache_features(str(shards), "s3://feature-test/feat", model, batch_size=8, progress=False)
    assert report.finalized and report.shards_written == 4
    assert {p.rsplit("/", 1)[-1] for p in s3_env.ls("feature-test/feat")} >= {"features.json", "sizes.json", "shard-000003.tar"}
    assert hashlib.sha256(s3_env.cat("feature-test/feat/shard-000001.tar")).hexdigest() == shard_hashes(local)["shard-000001.tar"]
    check_features("s3://feature-test/feat", model)
    remote, here = first_batch(shards, features="s3://feature-test/feat"), first_batch(shards, features=local)
    assert all(torch.equal(remote[k], here[k]) for k in here)


# ----- the same switch in evaluation (tools/evaluate.py --task shards --features)


def test_shard_evaluation_on_features_equals_pixels(shards, cached):
    from sapretrain.eval.shards import embed_shards, score_shards

    model, features = cached
    live = embed_shards(model, str(shards), batch_pairs=4, progress=False)
    feat = embed_shards(model, str(shards), features=str(features), batch_pairs=4, progress=False)
    assert live["u"].shape == feat["u"].shape == (24, 128)  # 12 records = 3 batches of 4 pairs, 2 samples each
    torch.testing.assert_close(feat["u"], live["u"])  # the text side does not touch the cache
    torch.testing.assert_close(feat["v"], live["v"], rtol=0, atol=5e-3)  # fp16-stored tower outputs
    a, b = score_shards(live), score_shards(feat)
    assert a["samples"] == b["samples"] == 24
    assert abs(a["relation_accuracy"] - b["relation_accuracy"]) <= 1 / 24
    with pytest.raises(FeatureMismatch, match="hash differently"):
        embed_shards(build_frozen_model(TINY, seed=1), str(shards), features=str(features), batch_pairs=4,
                     progress=False)


def test_shard_scores_by_hand():
    from sapretrain.eval.shards import score_shards

    def unit(*degrees):
        a = torch.tensor(degrees).deg2rad()
        return torch.stack([a.cos(), a.sin()], dim=1)

    # 4 samples = 2 pairs: the partner of i is (i + 2) % 4.
    v, u, u_neg = unit(0.0, 90.0, 12.0, 102.0), unit(5.0, 95.0, 60.0, 180.0), unit(90.0, 0.0, 10.0, 100.0)
    r = score_shards({"u": u, "u_neg": u_neg, "v": v, "partner": torch.tensor([2, 3, 0, 1])})
    # cos(v, u) > cos(v, u_neg): 5 vs 90 deg yes, 5 vs 90 yes, 48 vs 2 no, 78 vs 2 no
    assert r["relation_accuracy"] == 0.5
    # nearest caption of each image: u0, u1, u0, u1 -> images 0, 1 right
    assert r["image_to_text"]["r1"] == 0.5
    # nearest image of each caption: v0, v1, v1, v3 -> captions 0, 1, 3 right
    assert r["text_to_image"]["r1"] == 0.75
    assert r["image_to_text"]["r5"] == r["text_to_image"]["r5"] == 1.0  # 4 samples: always in the top 5
    # nearest other caption: u2, u2, u1, u1 -> partners of 0 and 3 found; images: v2, v3, v0, v1 all partners
    assert r["partner_r1_text"] == 0.5 and r["partner_r1_image"] == 1.0
