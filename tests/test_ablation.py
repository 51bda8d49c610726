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


# ---- "w/o pretraining": VSR training rows as the only training data --------------------------------

COCO = PROJECT_ROOT / "tests" / "fixtures" / "coco"


def vsr_rows():
    """VSR-style rows on the fixture photos: two categories of each, alternating relations."""
    rows = []
    for number, line in enumerate((COCO / "annotations.jsonl").read_text().splitlines(), 1):
        record = json.loads(line)
        categories = sorted({o["category"] for o in record["objects"]})
        if len(categories) < 2:
            continue
        relation = ("left of", "on")[number % 2]
        a, b = categories[:2]
        rows.append({"id": f"train.jsonl:{number}", "image": record["file_name"], "label": 1, "relation": relation,
                     "caption": f"The {a} is {relation} the {b}.", "subj": a, "obj": b})
    return rows


def test_vsr_rows_become_samples_with_partners_and_counted_skips():
    from sapretrain.curation.vsr_train import vsr_train_manifest
    from sapretrain.shards.manifest import check_sample
    from sapretrain.eval.vsr import load_coco_annotations

    rows = vsr_rows()
    first = rows[0]
    extra = [
        {**first, "id": "x:1", "label": 0},  # a false caption is no positive
        {**first, "id": "x:2", "subj": "zebra", "caption": f"The zebra is {first['relation']} the {first['obj']}."},
        {**first, "id": "x:3", "relation": "touching", "caption": f"The {first['subj']} is touching the {first['obj']}."},
        {**first, "id": "x:4", "relation": "below", "caption": f"The {first['subj']} is below the {first['obj']}."},
        {**first, "id": "x:5", "relation": "above", "caption": f"The {first['subj']} is above the {first['obj']}."},
        {**first, "id": "x:6", "relation": "above", "caption": f"The {first['obj']} is above the {first['subj']}.",
         "subj": first["obj"], "obj": first["subj"]},  # same image as x:5: not its partner
    ]
    samples, skips = vsr_train_manifest(rows + extra, load_coco_annotations(str(COCO / "annotations.jsonl")), "imgs")
    assert dict(skips.counts) == {"false_row": 1, "no_box": 1, "no_negative": 1, "no_partner": 3}
    assert len(samples) == len(rows)
    by_id = {s["id"]: s for s in samples}
    for s in samples:
        check_sample(s)  # a valid manifest line
        partner = by_id[s["positive"]]
        assert partner["relation"] == s["relation"] and partner["image_key"] != s["image_key"]
        assert s["image"] == f"imgs/{s['image_key']}" and s["negative"]["caption"] != s["caption"]
    left = next(s for s in samples if s["relation"] == "left of")
    assert " right of " in left["negative"]["caption"]
    assert left["triplet"]["rel"]["text"] == "left of" and left["negative"]["triplet"]["rel"]["text"] == "right of"


def test_wo_pretraining_trains_on_vsr_train_shards(tmp_path, capsys):
    import runpy

    from sapretrain.shards.writer import ShardConfig, make_shards
    from sapretrain.train.trainer import train

    main = runpy.run_path(str(PROJECT_ROOT / "tools" / "vsr_train_manifest.py"))["main"]  # in-process: no second torch import
    vsr = tmp_path / "zeroshot_train.jsonl"
    vsr.write_text("".join(json.dumps(r) + "\n" for r in vsr_rows()))
    manifest = tmp_path / "manifest.jsonl"
    args = ["--annotations", str(COCO / "annotations.jsonl"), "--images", str(COCO / "images"), "--output"]
    assert main(["--vsr", str(vsr), *args, str(manifest)]) == 0
    assert f"{len(vsr_rows())} samples" in capsys.readouterr().out and manifest.exists()
    with pytest.raises(SystemExit) as refused:
        main(["--vsr", str(tmp_path / "zeroshot_test.jsonl"), *args, str(tmp_path / "x.jsonl")])
    assert refused.value.code == 2 and "evaluation split" in capsys.readouterr().err
    empty = tmp_path / "train_false.jsonl"
    empty.write_text(json.dumps({**vsr_rows()[0], "label": 0}) + "\n")
    assert main(["--vsr", str(empty), *args, str(tmp_path / "none.jsonl")]) == 1  # nothing made: an error
    assert "false_row: 1" in capsys.readouterr().out and not (tmp_path / "none.jsonl").exists()

    report = make_shards(str(manifest), str(tmp_path / "shards"), ShardConfig(image_size=64, roi_size=64, shard_size=4),
                         progress=False)
    assert report.summary["records"] >= 8, report.summary["skipped"]
    cfg = tiny("wo_pretraining", tmp_path / "shards", tmp_path / "run")
    assert train(cfg).step == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {k for k in lines[-1] if k.endswith("_loss")} == SA_TERMS
