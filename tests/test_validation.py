"""Validation during training (sapretrain/train/validate.py): config checks, the numbers against a
direct computation, determinism, two processes against one, and the curves in training.png."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import PROJECT_ROOT, synthetic_shards
from sapretrain.config import ConfigError, load_config
from sapretrain.eval.shards import score_shards
from sapretrain.losses import SAClipLoss
from sapretrain.train.config import TrainConfig
from sapretrain.train.plots import metrics_figure, plot_metrics, read_metrics
from sapretrain.train.validate import build_validation, held_out_shards, retrieval_correct, validate
from test_train import random_batch

TINY = ["model.name=sa-tiny", "model.pretrained=null", "model.lock_image=false", "run.precision=no"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """32 records of synthetic scenes (64 px) in 8 shards of 4."""
    return synthetic_shards(tmp_path_factory.mktemp("held-out"), scenes=64, shard_size=4)


def config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, TINY + list(overrides))


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def tiny_model(cfg: TrainConfig):
    from sapretrain.train.trainer import build_model

    torch.manual_seed(0)
    return build_model(cfg)


# ----- config


@pytest.mark.parametrize("overrides, message", [
    (["eval.every=-1"], "eval.every=-1: must be >= 0"),
    (["eval.every=10"], "eval.shards='': must name the held-out shards"),
    (["eval.batches=0"], "eval.batches=0: must be > 0"),
    (["eval.batch_pairs=0"], "eval.batch_pairs=0: must be > 0"),
    (["eval.workers=-1"], "eval.workers=-1: must be >= 0"),
    (["eval.spatial_probe=3"], "eval.spatial_probe=3: must be 0 .off. or >= 8"),
    (["eval.every=5", "data.shards=data/held", "eval.shards=data/held/"], "must not be the training data"),
    (["eval.evry=5"], "unknown config key 'eval.evry'"),
])
def test_bad_eval_values_fail_as_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


def test_eval_defaults_are_off_and_a_section_loads():
    assert config().eval.every == 0
    cfg = config("eval.every=500", "eval.shards=data/shards/val", "eval.batches=2", "eval.spatial_probe=8")
    assert (cfg.eval.every, cfg.eval.shards, cfg.eval.batches, cfg.eval.spatial_probe) == (500, "data/shards/val", 2, 8)


def test_build_validation_checks_the_set_before_training(held_out, accelerator):
    assert build_validation(config(), None, accelerator) is None  # eval.every = 0: off
    cfg = config("eval.every=1", f"eval.shards={held_out}", "data.batch_pairs=64")
    with pytest.raises(ConfigError, match="holds 32 records, fewer than one validation batch"):
        build_validation(cfg, tiny_model(cfg), accelerator)
    lines = []
    cfg = config("eval.every=3", f"eval.shards={held_out}", "data.batch_pairs=8", "eval.batches=10",
                 "optim.steps=10")
    validation = build_validation(cfg, tiny_model(cfg), accelerator, lines.append)
    assert validation.pairs == 32 and "on 4 of eval.batches=10 batches" in lines[0]
    assert [s for s in range(1, 11) if validation.due(s)] == [3, 6, 9, 10]  # and at the last step


def test_the_set_is_a_prefix_of_the_listed_shards(held_out):
    shards = held_out_shards(str(held_out), 10)
    assert [s.records for s in shards] == [4, 4, 2]
    assert [s.url.rsplit("/", 1)[-1] for s in shards] == [f"shard-{i:06d}.tar" for i in range(3)]


# ----- the numbers


def test_validate_is_finite_in_range_deterministic_and_leaves_training_alone(held_out, accelerator):
    cfg = config("eval.every=1", f"eval.shards={held_out}", "data.batch_pairs=8", "eval.batches=3", "loss.clip=true")
    model, loss_fn = tiny_model(cfg), SAClipLoss(cfg.loss)
    validation = build_validation(cfg, model, accelerator)
    model.train()
    torch.manual_seed(1)
    expected_draw = torch.rand(4)
    torch.manual_seed(1)
    first = validation.run(model, loss_fn)
    assert torch.equal(torch.rand(4), expected_draw)  # the RNG states are restored
    assert model.training and model.clip.visual.training  # back in train mode (the tower is not locked)
    second = validation.run(model, loss_fn)
    assert set(first) == {"val/contrastive_u_loss", "val/contrastive_v_loss", "val/triplet_loss", "val/clip_loss",
                          "val/loss", "val/relation_accuracy", "val/image_to_text_r1", "val/text_to_image_r1",
                          "val/pairs", "val/seconds"}
    assert first["val/pairs"] == 24
    for key, value in first.items():
        assert math.isfinite(value), key
        if key != "val/seconds":
            assert second[key] == value, key  # the same batches, the same numbers
    for key in ("val/relation_accuracy", "val/image_to_text_r1", "val/text_to_image_r1"):
        assert 0 <= first[key] <= 1
        assert (first[key] * 48) == pytest.approx(round(first[key] * 48))  # a count over 48 samples
    # Random init: the contrastive terms sit near log(47 negatives + 1), the triplet term near the margin.
    assert 2.5 < first["val/contrastive_u_loss"] < 6 and 0 <= first["val/triplet_loss"] < 1
    assert first["val/loss"] == pytest.approx(sum(v for k, v in first.items() if k.endswith("_loss")))
    assert first["val/seconds"] > 0


def test_numbers_equal_a_direct_computation_on_the_same_batches(accelerator):
    """Two batches validated == the loss and metrics of the one batch they make (pairs kept)."""
    cfg = config("loss.clip=true")
    model, loss_fn = tiny_model(cfg), SAClipLoss(cfg.loss)
    a, b = random_batch(3, seed=1), random_batch(3, seed=2)
    b["groups"] = b["groups"] + 100  # other images than a's
    values = validate(model, loss_fn, accelerator, [a, b])

    def merged(key):  # [anchors a; anchors b; partners a; partners b]
        return torch.cat([a[key][:3], b[key][:3], a[key][3:], b[key][3:]])

    model.eval()
    with torch.no_grad():
        feats = model({key: merged(key) for key in a})
        direct = {f"val/{k}": v.item() for k, v in loss_fn(feats).items()}
    for key, value in direct.items():
        assert values[key] == pytest.approx(value, rel=1e-5), key
    n = feats["u"].shape[0]
    emb = {k: torch.nn.functional.normalize(feats[k], dim=-1) for k in ("u", "u_neg", "v")}
    reference = score_shards({**emb, "partner": (torch.arange(n) + n // 2) % n})  # own-column R@1 (unique groups)
    assert values["val/relation_accuracy"] == pytest.approx(reference["relation_accuracy"])
    assert values["val/image_to_text_r1"] == pytest.approx(reference["image_to_text"]["r1"])
    assert values["val/text_to_image_r1"] == pytest.approx(reference["text_to_image"]["r1"])
    assert values["val/pairs"] == 6


def test_r1_counts_the_same_image_as_right_and_a_tie_as_wrong():
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # samples 0 and 1: the same image
    u = torch.tensor([[0.0, 1.0], [1.0, 0.1], [0.0, 1.0]])
    groups = torch.tensor([7, 7, 8])
    i2t, t2i = retrieval_correct(v, u, groups)
    # image->text: images 0 and 1 find caption 1 first (their image: right); image 2 ties its own
    # caption with caption 0 (another image): wrong
    assert i2t.item() == 2
    # text->image: caption 0 finds image 2 first (wrong); captions 1 and 2 their own images
    assert t2i.item() == 2
    i2t, _ = retrieval_correct(v, u, torch.tensor([0, 1, 2]))  # every sample its own image
    assert i2t.item() == 1  # only sample 1 finds its own caption strictly first


def test_feature_shards_validate_like_the_pixels(held_out, accelerator, tmp_path):
    """eval.features (the locked tower's cached outputs) gives the pixel shards' numbers, within fp16."""
    from sapretrain.features import build_frozen_model, cache_features
    from sapretrain.model.saclip import SAClipConfig

    model = build_frozen_model(SAClipConfig(name="sa-tiny", pretrained=None), seed=0)
    cache_features(str(held_out), str(tmp_path / "feat"), model, batch_size=8, progress=False)
    common = ["model.lock_image=true", "eval.every=1", "eval.batches=2", "data.batch_pairs=8"]
    live = build_validation(config(*common, f"eval.shards={held_out}"), model, accelerator).run(model, SAClipLoss(config().loss))
    feat = build_validation(config(*common, f"eval.features={tmp_path / 'feat'}"), model, accelerator).run(
        model, SAClipLoss(config().loss))
    assert feat["val/pairs"] == live["val/pairs"] == 16
    for key in ("val/contrastive_u_loss", "val/contrastive_v_loss", "val/triplet_loss"):
        assert feat[key] == pytest.approx(live[key], abs=5e-3), key
    for key in ("val/relation_accuracy", "val/image_to_text_r1", "val/text_to_image_r1"):
        assert abs(feat[key] - live[key]) <= 1 / 32, key  # a near-tie may flip with fp16 features
    with pytest.raises(SystemExit, match="eval.features"):  # features of another tower are refused
        other = build_frozen_model(SAClipConfig(name="sa-tiny", pretrained=None), seed=1)
        build_validation(config(*common, f"eval.features={tmp_path / 'feat'}"), other, accelerator)


# ----- two processes


SCRIPT = r"""
import json, os, sys
import torch
from accelerate import Accelerator
from sapretrain.config import load_config
from sapretrain.losses import SAClipLoss
from sapretrain.train.config import TrainConfig
from sapretrain.train.trainer import build_model
from sapretrain.train.validate import build_validation

out, overrides = sys.argv[1], sys.argv[2:]
accelerator = Accelerator(cpu=True)
cfg = load_config(TrainConfig, None, overrides)
torch.manual_seed(0)
model = build_model(cfg)
prepared = accelerator.prepare(model)  # DDP-wrapped with two processes: validated through the wrapper
loss_fn = SAClipLoss(cfg.loss)
validation = build_validation(cfg, model, accelerator, log_line=lambda line: None)
values = validation.run(prepared, loss_fn)
assert prepared.training
if accelerator.is_main_process:
    json.dump({"world": accelerator.num_processes, **values}, open(out, "w"))
"""


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(held_out, tmp_path):
    """3 batches of 8 pairs (a prefix cutting the shards): each rank reads its half, the numbers are
    those of one process reading all (and of other worker counts)."""
    script = tmp_path / "validate_once.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    overrides = TINY + [f"eval.shards={held_out}", "eval.every=1", "eval.batches=3", "data.batch_pairs=8",
                        "loss.clip=true"]
    results = {}
    for procs, workers in ((1, 2), (2, 1)):
        out = tmp_path / f"{procs}.json"
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              str(procs), str(script), str(out)] + overrides + [f"eval.workers={workers}"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[procs] = json.loads(out.read_text())
    one, two = results[1], results[2]
    assert (one["world"], two["world"]) == (1, 2)
    assert one["val/pairs"] == two["val/pairs"] == 24  # every pair counted once
    for key in ("val/relation_accuracy", "val/image_to_text_r1", "val/text_to_image_r1"):
        assert two[key] == one[key], key
    for key in ("val/contrastive_u_loss", "val/contrastive_v_loss", "val/triplet_loss", "val/clip_loss", "val/loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key


# ----- in the trainer


def _trainer_validates() -> bool:
    from sapretrain.train.trainer import MetricsLog

    return hasattr(MetricsLog, "log_validation")


@pytest.mark.skipif(not _trainer_validates(), reason="the trainer does not call validate.py yet (issue 17, item 4 hook)")
def test_a_run_validates_and_trains_exactly_as_without(held_out, tmp_path):
    """launch/pretrain.py with eval.every=2: validations at steps 2 and 4 in metrics.jsonl, and
    the training losses bit for bit those of the same run without validation."""
    from test_train import PRETRAIN, cpu_env, overrides

    train = synthetic_shards(tmp_path / "train", scenes=32, shard_size=4)
    cmd = [sys.executable, PRETRAIN, "--config", str(PROJECT_ROOT / "configs" / "demo.yaml")]
    runs = {}
    for name, extra in (("plain", {}), ("validated", {"eval.every": 2, "eval.shards": held_out, "eval.batches": 2})):
        out = tmp_path / name
        run = subprocess.run(cmd + overrides(train, out, steps=4, **extra), env=cpu_env(), capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = (read_metrics(out / "metrics.jsonl"), run.stdout, out)
    plain, (validated, stdout, out) = runs["plain"][0], runs["validated"]
    val = [r for r in validated if "val/loss" in r]
    assert [r["step"] for r in val] == [2, 4] and all(r["val/pairs"] == 16 for r in val)
    assert "validation at step 4/4" in stdout

    def training(records):  # the logged training numbers, without the timings
        return [{k: v for k, v in r.items() if k not in ("pairs_per_s", "data_fraction")} for r in records if "loss" in r]

    assert len(training(plain)) == 4 and training(validated) == training(plain)
    assert (out / "training.png").stat().st_size > 0


# ----- the curves


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 7, "loss"')  # a torn last line


TRAIN = [{"step": s, "loss": 5.0 - 0.1 * s, "triplet_loss": 0.2, "lr": 1e-3, "pairs_per_s": 100.0, "data_fraction": 0.1}
         for s in range(1, 7)]
VALS = [{"step": s, "val/triplet_loss": 0.3 - 0.01 * s, "val/loss": 6.0 - 0.2 * s, "val/relation_accuracy": 0.1 * s,
         "val/image_to_text_r1": 0.05 * s, "val/text_to_image_r1": 0.04 * s, "val/pairs": 24, "val/seconds": 0.2}
        for s in (3, 6)]


def test_training_png_draws_the_validation_curves_beside_the_training_loss(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, TRAIN[:3] + VALS[:1] + TRAIN[3:] + VALS[1:])
    records = read_metrics(metrics)
    assert len(records) == 8
    fig = metrics_figure(records)
    ax_loss, ax_speed, ax_val = fig.axes
    lines = {line.get_label(): line for line in ax_loss.get_lines()}
    assert set(lines) == {"loss", "triplet", "val loss", "val triplet"}
    assert list(lines["loss"].get_xdata()) == list(range(1, 7))
    assert list(lines["val loss"].get_xdata()) == [3, 6]
    assert list(lines["val loss"].get_ydata()) == pytest.approx([5.4, 4.8])
    assert lines["val loss"].get_linestyle() == "--"
    assert lines["val triplet"].get_color() == lines["triplet"].get_color()
    assert list(ax_speed.get_lines()[0].get_xdata()) == list(range(1, 7))  # validations are no throughput points
    val_lines = {line.get_label(): line for line in ax_val.get_lines()}
    assert set(val_lines) == {"relation accuracy", "R@1 image→text", "R@1 text→image"}
    assert list(val_lines["relation accuracy"].get_ydata()) == pytest.approx([0.3, 0.6])
    assert "24 held-out pairs" in ax_val.get_title()
    import matplotlib.pyplot as plt

    plt.close(fig)
    png = plot_metrics(metrics, tmp_path / "training.png")
    assert png.stat().st_size > 0


def test_training_png_without_validations_keeps_two_panels(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, TRAIN)
    fig = metrics_figure(read_metrics(metrics))
    assert len(fig.axes) == 2
    assert {line.get_label() for line in fig.axes[0].get_lines()} == {"loss", "triplet"}
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_metrics(tmp_path / "empty.jsonl", tmp_path / "empty.png") is None
