"""Export (sapretrain/export.py): the Hub folder loads back with the checkpoint's embeddings
(exactly: max |diff| 0), the open_clip part loads in plain open_clip with the CLIP tower's
embeddings, the model card holds the numbers given, the dataset card the counts of summary.json."""
from __future__ import annotations

import json
from dataclasses import asdict

import open_clip
import pytest
import torch
import yaml

import sapretrain
from conftest import synthetic_shards
from sapretrain.data.batch import build_preprocess
from sapretrain.eval.encode import Encoder, EvalSample
from sapretrain.export import dataset_card, export_model, main
from sapretrain.model import SAClipConfig, build_saclip, save_saclip
from sapretrain.model.checkpoint import training_weights
from sapretrain.scenes.synthetic import render_scene
from sapretrain.train.checkpoint import save_tensor_file
from sapretrain.train.config import TrainConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_saclip(SAClipConfig(**{"name": "sa-tiny", "pretrained": None, "lock_image": False, **overrides}))


def embeddings(model, scenes):
    encoder = Encoder(model)
    samples = [EvalSample(s.image, s.boxes, s.caption, s.triplet) for s in scenes]
    return encoder.texts(samples, parts=True), encoder.images(samples, parts=True)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def fake_run(tmp_path, model, shards: str, seed: int = 0):
    """A run directory with one complete trainer checkpoint of ``model``, as the trainer writes it."""
    cfg = TrainConfig()
    cfg.model = model.cfg
    cfg.data.shards = shards
    cfg.run.seed = seed
    cfg.run.output_dir = str(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000007"
    ckpt.mkdir(parents=True)
    state = {"position": {"step": 7, "epoch": 0, "batch": 7}, "world_size": 1,
             "config": json.loads(json.dumps(asdict(cfg))), **training_weights(model, include_frozen=False)}
    save_tensor_file(state, str(ckpt / "state.pt"))
    (ckpt / "DONE").write_bytes(b"")
    return tmp_path / "run"


def test_export_folder_loads_back_with_the_checkpoints_embeddings(tmp_path):
    model = tiny(seed=3).eval()
    save_saclip(model, str(tmp_path / "sa.pt"))
    assert main([str(tmp_path / "sa.pt"), "--output", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md", "open_clip"}
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "sapretrain.saclip" and config["config"] == asdict(model.cfg)
    assert config["tokenizer"] == {"name": "ViT-B-32", "context_length": 77}

    scenes = [render_scene("eval", i) for i in range(3)]
    (text_a, image_a), (text_b, image_b) = embeddings(model, scenes), embeddings(sapretrain.load(str(out)).model, scenes)
    for a, b in ((text_a, text_b), (image_a, image_b)):
        for key in a:
            assert (a[key] - b[key]).abs().max().item() == 0.0, key  # tolerance: exact
    # The API on the folder and on the file agree too.
    caption = "a cat under a table"
    assert torch.equal(sapretrain.load(str(out)).encode_text([caption]).u,
                       sapretrain.load(str(tmp_path / "sa.pt")).encode_text([caption]).u)


def test_open_clip_part_loads_in_plain_open_clip(tmp_path):
    model = tiny(seed=4).eval()
    done = export_model_from(model, tmp_path)
    clip, _, preprocess = open_clip.create_model_and_transforms(done["open_clip"])
    clip.eval()
    scene = render_scene("eval", 1)
    pixels = build_preprocess(model)(scene.image).unsqueeze(0)
    tokens = open_clip.get_tokenizer("ViT-B-32")([scene.caption])
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(pixels), model.clip.encode_image(pixels), rtol=0, atol=0)
        torch.testing.assert_close(clip.encode_text(tokens), model.clip.encode_text(tokens), rtol=0, atol=0)
    assert preprocess(scene.image).shape == pixels.shape[1:]  # same input size and normalisation config
    (tmp_path / "no-oc").mkdir()
    assert main([str(tmp_path / "sa.pt"), "--output", str(tmp_path / "no-oc"), "open_clip=false"]) == 0
    assert not (tmp_path / "no-oc" / "open_clip").exists()


def export_model_from(model, tmp_path, **kwargs):
    save_saclip(model, str(tmp_path / "sa.pt"))
    return export_model(str(tmp_path / "sa.pt"), str(tmp_path / "out"), **kwargs)


def test_model_card_holds_training_config_data_summary_and_results(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    summary = {"schema": 1, "manifest": "m.jsonl", "samples_read": 123, "records": 61, "mutual_pairs_merged": 1,
               "skipped": {"counts": {"bad_box": 4, "unreadable_image": 2}, "examples": {}},
               "shards": [{"shard": "shard-000000.tar", "records": 61, "bytes": 1000, "sha256": "x"}]}
    (shards / "summary.json").write_text(json.dumps(summary))
    (shards / "config.yaml").write_text("image_size: 64\nroi_size: 64\ntokenizer: ViT-B-32\n")
    model = tiny(seed=5, lock_image=True).eval()  # random-init locked tower: rebuilt from run.seed, not stored
    run = fake_run(tmp_path, model, str(shards), seed=5)
    results = {"task": "spatial", "headline": "detector", "models": {
        "SA": {"spec": str(run), "config": {"name": "sa-tiny"}, "relation_accuracy": {"detector": {"accuracy": 0.9038}}},
        "CLIP": {"spec": "openclip:sa-tiny", "relation_accuracy": {"detector": {"accuracy": 0.5123}}}},
        "verdict": {"candidate": "SA", "baseline": "CLIP", "gain": 0.3915, "pass": True}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))

    out = tmp_path / "out"
    code = main([str(run), "--output", str(out), "--eval-results", str(tmp_path / "eval"),
                 "license=apache-2.0", "name=SA test", "tags=[demo]"])
    assert code == 0
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "sapretrain"
    assert "demo" in meta["tags"] and "sa-clip" in meta["tags"]
    assert "# SA test" in card
    assert "| relation_accuracy.detector.accuracy | 0.9038 | 0.5123 |" in card  # the numbers given
    assert "| **SA** | CLIP |" in card.replace("| metric ", "")  # the exported model is marked
    assert "gain 0.3915" in card
    assert "| samples read | 123 |" in card and "| records (anchor/partner pairs) | 61 |" in card
    assert "| bad_box | 4 |" in card and "| samples skipped | 6 |" in card
    assert "step 7" in card and "lock_image: true" in card  # the training config, every key
    config = json.loads((out / "config.json").read_text())
    assert config["shards"]["image_size"] == 64 and config["training"]["position"]["step"] == 7

    # The run's weights (frozen tower rebuilt from run.seed) and the export give the same embeddings.
    scenes = [render_scene("eval", 5)]
    a, b = embeddings(sapretrain.load(str(run)).model, scenes), embeddings(sapretrain.load(str(out)).model, scenes)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(embeddings(model, scenes), a) for k in x)

    # Re-exporting an exported folder keeps the training record.
    assert main([str(out), "--output", str(tmp_path / "again")]) == 0
    assert "lock_image: true" in (tmp_path / "again" / "README.md").read_text()


def test_export_command_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing.pt"), "--output", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--output", str(tmp_path / "o"), "licence=mit"])
    assert e.value.code == 2 and "licence" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path / "o")])  # no source
    save_saclip(tiny(), str(tmp_path / "sa.pt"))
    (tmp_path / "bad.json").write_text("{}")
    assert main([str(tmp_path / "sa.pt"), "--output", str(tmp_path / "o"), "--eval-results", str(tmp_path / "bad.json")]) == 1
    assert "not a results.json" in capsys.readouterr().out
    assert main(["--dataset-card", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "no summary.json" in capsys.readouterr().out


def test_dataset_card_counts_match_summary(tmp_path):
    shards = synthetic_shards(tmp_path, scenes=12, shard_size=4)
    summary = json.loads((shards / "summary.json").read_text())
    report = {"stages": [{"stage": "rois", "records": 14, "kept": 12, "dropped": {"no_box": 2}}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["--dataset-card", str(shards), "--output", str(tmp_path / "card"),
                 "--curation-report", str(tmp_path / "report.json"), "license=cc-by-4.0"]) == 0
    card = (tmp_path / "card" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "cc-by-4.0" and meta["size_categories"] == ["n<1K"]
    assert f"| records | {summary['records']} |" in card
    assert f"| samples read from the manifest | {summary['samples_read']} |" in card
    assert f"| shards | {len(summary['shards'])} |" in card
    assert f"| bytes | {sum(s['bytes'] for s in summary['shards'])} |" in card
    manifest = [json.loads(line) for line in open(summary["manifest"])]
    assert f"| clevr-synthetic | {len(manifest)} |" in card
    relations = {}
    for r in manifest:
        relations[r["relation"]] = relations.get(r["relation"], 0) + 1
    for relation, n in relations.items():
        assert f"| {relation} | {n} |" in card
    assert "| rois | 14 | 12 | no_box: 2 |" in card
    # Without the manifest, the card says what it cannot list; the default licence is then "other".
    summary["manifest"] = str(tmp_path / "gone.jsonl")
    summary["manifest_files"] = [str(tmp_path / "gone.jsonl")]  # the files make_shards read, moved away
    (shards / "summary.json").write_text(json.dumps(summary))
    card = dataset_card(str(shards))
    assert "not reachable" in card and front_matter(card)["license"] == "other"
