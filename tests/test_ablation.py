"""Every config of configs/ablation/ (paper Table 3 and beside it) trains: each runs 2 steps of the
real trainer on tiny synthetic shards, and its logged loss terms are exactly those of its row."""
from __future__ import annotations

import json
import math

import pytest

from conftest import PROJECT_ROOT, synthetic_shards
from sapretrain.config import load_config
from sapretrain.train.config import TrainConfig

ABLATIONS = PROJECT_ROOT / "configs" / "ablation"
SA_TERMS = {"contrastive_u_loss", "contrastive_v_loss", "triplet_loss"}

# Per config: the loss terms its row trains with, and the model branches it keeps (svo, roi).
EXPECTED = {
    "no_lu": ({"contrastive_v_loss", "triplet_loss"}, (True, True)),
    "no_lv": ({"contrastive_u_loss", "triplet_loss"}, (True, True)),
    "no_triplet": ({"contrastive_u_loss", "contrastive_v_loss"}, (True, True)),
    "no_svo": (SA_TERMS, (False, True)),
    "no_roi": (SA_TERMS, (True, False)),
    "clip_baseline": ({"clip_loss"}, (False, False)),
    "clip_partners": ({"clip_loss"}, (False, False)),
    "wo_pretraining": (SA_TERMS, (True, True)),
    "wo_pretraining_clip": ({"clip_loss"}, (False, False)),
}


def test_every_ablation_config_has_its_expectation_and_a_header():
    names = sorted(p.stem for p in ABLATIONS.glob("*.yaml"))
    assert names == sorted(EXPECTED)
    for name in names:
        text = (ABLATIONS / f"{name}.yaml").read_text()
        assert text.startswith("# ") and f"--config configs/ablation/{name}.yaml" in text, name


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """16 records of synthetic scenes (64 px) in 4 shards."""
    return synthetic_shards(tmp_path_factory.mktemp("ablation-data"), scenes=32, shard_size=4)


def tiny(name: str, shards, out) -> TrainConfig:
    """The config with its loss and branch switches, on the tiny model and the demo-size data."""
    return load_config(TrainConfig, ABLATIONS / f"{name}.yaml", [
        "model.name=sa-tiny", "model.pretrained=null", f"data.shards={shards}", "data.batch_pairs=4",
        "data.workers=0", "data.shuffle_buffer=8", "data.image_size=64", "optim.steps=2",
        "optim.warmup_steps=1", "run.precision=no", "run.log_every=1", "run.checkpoint_every=100",
        "run.trackers=[]", f"run.output_dir={out}",
    ])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ablation_trains_with_exactly_its_loss_terms(name, shards, tmp_path):
    from sapretrain.train.trainer import train

    terms, (svo, roi) = EXPECTED[name]
    cfg = tiny(name, shards, tmp_path / name)
    assert (cfg.model.use_svo, cfg.model.use_roi) == (svo, roi)
    assert cfg.loss.clip_partners == (name == "clip_partners")
    assert cfg.loss.mask_false_negatives  # every row masks false negatives (the default)
    assert train(cfg).step == 2
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        logged = {k for k in line if k.endswith("_loss")}
        assert logged == terms, (name, logged)
        assert all(math.isfinite(line[k]) for k in logged)
        assert line["loss"] == pytest.approx(sum(line[k] for k in logged), rel=1e-6)


def test_demo_clip_partners_is_the_demo_clip_baseline_plus_partners():
    from dataclasses import asdict

    partners = asdict(load_config(TrainConfig, PROJECT_ROOT / "configs" / "demo_clip_partners.yaml"))
    plain = asdict(load_config(TrainConfig, PROJECT_ROOT / "configs" / "demo_clip.yaml"))
    assert partners["loss"]["clip_partners"] and not plain["loss"]["clip_partners"]
    assert partners["run"]["output_dir"] == "runs/demo/clip_partners"
    partners["loss"]["clip_partners"] = False
    partners["run"]["output_dir"] = plain["run"]["output_dir"]
    assert partners == plain  # same data, model, steps and seed
