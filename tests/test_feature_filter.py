"""The features kind of the relation filter: parse features, the relation prior, the
precision-bound threshold, training / saving / scoring / the stage, and eval-filter with it."""
from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest

from sapretrain.cli import eval_filter, train_filter as train_filter_tool
from sapretrain.config import ConfigError, load_config
from sapretrain.curation.feature_filter import FEATURES, FeatureFilter, RelationPrior, triplet_features
from sapretrain.curation.relation_filter import FilterConfig, FilterStage, TripletScorer, choose_threshold, wilson_lower

SUBJECTS = ["man", "woman", "dog", "cat", "boy", "girl", "horse", "bird", "child", "person"]
PLACES = ["table", "bench", "couch", "bed", "grass", "street", "chair", "road", "beach", "field"]
PREPS = ["on", "near", "under", "beside", "behind"]
VERBS = ["holding", "eating", "carrying", "watching", "chasing"]
THINGS = ["ball", "book", "bag", "phone", "kite"]


@pytest.fixture(scope="module")
def nlp():
    from sapretrain.curation.svo import load_nlp

    return load_nlp()


def span(caption: str, text: str, after: int = 0) -> dict:
    start = caption.index(text, after)
    return {"text": text, "start": start, "end": start + len(text)}


def structural_labels(n: int, seed: int) -> list[dict]:
    """Half correct ("a dog on the bench": dog | on | bench), half wrong: the object span swallowed
    a clause ("a dog on the bench chasing the ball": dog | on | bench chasing the ball)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        s, o, p, v, x = (rng.choice(w) for w in (SUBJECTS, PLACES, PREPS, VERBS, THINGS))
        wrong = i % 2 == 1
        caption = f"a {s} {p} the {o} {v} the {x}" if wrong else f"a {s} {p} the {o}"
        subj = span(caption, s)
        rel = {**span(caption, p, subj["end"]), "kind": "spatial", "lemma": p}
        obj = span(caption, f"{o} {v} the {x}" if wrong else o, rel["end"])
        records.append({"id": f"{seed}-{i}", "caption": caption, "triplet": {"subj": subj, "rel": rel, "obj": obj},
                        "label": 0 if wrong else 1})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------- features and prior


def test_features_describe_the_parse(nlp):
    caption = "a man in a red shirt holding a phone"
    good = {"subj": span(caption, "man"), "rel": {**span(caption, "in"), "kind": "action", "lemma": "wear"},
            "obj": span(caption, "red shirt")}
    bad = {**good, "obj": span(caption, "red shirt holding a phone")}
    doc = nlp(caption)
    rows = {name: dict(zip(FEATURES, triplet_features(doc, caption, t, 0.7))) for name, t in (("good", good), ("bad", bad))}
    assert all(len(r) == len(FEATURES) for r in rows.values())
    assert rows["good"]["obj_tokens"] == 2 and rows["bad"]["obj_tokens"] == 5
    assert rows["good"]["obj_verbs"] == 0 and rows["bad"]["obj_verbs"] >= 1
    assert rows["good"]["rel_written"] == 0.0  # "in" read as "wear": not written as such
    assert rows["good"]["kind_action"] == 1.0 and rows["good"]["relation_prior"] == 0.7
    assert rows["good"]["caption_tokens"] == 9 and rows["good"]["subj_position"] == pytest.approx(1 / 9)

    text_only = {k: {f: x for f, x in v.items() if f not in ("start", "end")} for k, v in good.items()}
    assert triplet_features(doc, caption, text_only)[:-1] == triplet_features(doc, caption, good)[:-1]  # found by text
    missing = {**good, "obj": {"text": "zebra"}}
    row = dict(zip(FEATURES, triplet_features(doc, caption, missing)))
    assert row["caption_tokens"] == 9 and math.isnan(row["obj_tokens"]) and math.isnan(row["relation_prior"])


def test_relation_prior_backs_off_and_round_trips():
    prior = RelationPrior(smoothing=2.0).fit([("spatial", "on", 1)] * 6 + [("spatial", "under", 0)] * 2 + [("action", "hold", 0)] * 2)
    base = 6 / 10
    spatial = (6 + 2 * base) / (8 + 2)
    assert prior.rate("spatial", "on") == pytest.approx((6 + 2 * spatial) / (6 + 2))
    assert prior.rate("spatial", "beside") == pytest.approx(spatial)            # unseen lemma: its kind
    assert prior.rate("other", "x") == pytest.approx(base)                      # unseen kind: overall
    again = RelationPrior.from_dict(json.loads(json.dumps(prior.to_dict())))
    assert again.rate("spatial", "on") == prior.rate("spatial", "on") and again.rate("action", "hold") == prior.rate("action", "hold")


# --------------------------------------------------------------------------- threshold


def test_precision_bound_is_stricter_than_the_point_estimate():
    assert wilson_lower(np.array([8]), np.array([10]), 0.95)[0] == pytest.approx(0.5407, abs=1e-3)
    assert wilson_lower(np.array([850]), np.array([1000]), 0.95)[0] == pytest.approx(0.8306, abs=1e-3)
    rng = np.random.default_rng(0)
    scores = rng.random(400)
    labels = (rng.random(400) < 0.6 + 0.4 * scores).astype(int)  # precision rises with the score
    point = choose_threshold(labels, scores, "min_precision", 0.85)
    bound = choose_threshold(labels, scores, "precision_bound", 0.85, 0.95)
    assert bound > point
    kept = scores >= bound
    assert wilson_lower(labels[kept].sum(), kept.sum(), 0.95) >= 0.85
    looser = choose_threshold(labels, scores, "precision_bound", 0.85, 0.6)
    assert point <= looser <= bound
    # no threshold reaches the bound: the most confident one, not max-F1
    assert choose_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]), "precision_bound", 0.99) == pytest.approx(0.4)


def test_config_checks_the_new_keys():
    with pytest.raises(ConfigError, match="confidence"):
        load_config(FilterConfig, None, ["confidence=1.0"])
    with pytest.raises(ConfigError, match="threshold_folds"):
        load_config(FilterConfig, None, ["threshold_folds=1"])
    with pytest.raises(ConfigError, match="kind"):
        load_config(FilterConfig, None, ["kind=trees"])


# --------------------------------------------------------------------------- train, save, score, stage


def test_train_filter_features_end_to_end(nlp, tmp_path, capsys):
    labels = write_jsonl(tmp_path / "labels.jsonl", structural_labels(240, seed=0))
    out = tmp_path / "model"
    argv = ["--labels", str(labels), "--output", str(out), "--no-progress", "kind=features",
            "threshold_rule=precision_bound", "min_precision=0.9", "threshold_folds=3", "trees=60"]
    assert train_filter_tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "threshold" in printed and "training captions: " in printed and " words (10-90 %: " in printed
    saved = json.loads((out / "filter_config.json").read_text())
    assert saved["kind"] == "features" and saved["features"] == list(FEATURES) and (out / "model.joblib").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["roc_auc"] > 0.95 and metrics["validation"]["n"] == sum(metrics["split_sizes"][k] for k in ("train", "validation"))
    assert (out / "pr_curve.png").stat().st_size > 3000

    fresh = structural_labels(40, seed=1)
    scorer = TripletScorer(str(out), nlp=nlp)
    assert scorer.kind == "features" and scorer.threshold == pytest.approx(saved["threshold"])
    scores = scorer.score(fresh)
    assert np.array_equal(scores, FeatureFilter.load(str(out), saved, nlp).score(fresh))
    assert np.mean(scores[[r["label"] == 1 for r in fresh]]) > np.mean(scores[[r["label"] == 0 for r in fresh]]) + 0.5

    stage = FilterStage(str(out))
    stage.scorer = scorer
    decided = stage.process([{k: r[k] for k in ("id", "caption", "triplet")} for r in fresh])
    dropped = [d.get("drop_reason") == "low_score" for d in decided]
    assert all("filter_score" in d for d in decided)
    assert sum(d and r["label"] == 0 for d, r in zip(dropped, fresh)) >= 18 and sum(d and r["label"] == 1 for d, r in zip(dropped, fresh)) <= 2


@pytest.fixture(scope="module")
def structural_model(tmp_path_factory):
    """A features filter (max-F1 threshold) trained on ``structural_labels(240, seed=0)``."""
    folder = tmp_path_factory.mktemp("structural")
    labels = write_jsonl(folder / "labels.jsonl", structural_labels(240, seed=0))
    assert train_filter_tool.main(["--labels", str(labels), "--output", str(folder / "model"), "--no-progress",
                                   "kind=features", "threshold_folds=3", "trees=60"]) == 0
    return folder / "model"


def test_a_run_that_keeps_far_less_than_the_held_out_labels_warns(structural_model, tmp_path):
    from sapretrain.curation.relation_filter import yield_warning
    from sapretrain.curation.stage import format_stage_summary, run_stage

    out = structural_model
    saved = json.loads((out / "filter_config.json").read_text())
    reference = saved["reference"]
    assert reference["held_out"] == saved["metrics"]["validation"]["n"] and len(reference["score_quantiles"]) == 101
    assert 5 <= reference["caption_words"][1] <= 8  # "a dog on the bench" (5) and its 8-word wrong twin
    expected = np.mean(np.asarray(reference["score_quantiles"]) >= saved["threshold"])
    assert 0.35 < expected < 0.65  # half the labels are right

    def run(records, name):
        records = [{k: r[k] for k in ("id", "caption", "triplet")} for r in records]
        return run_stage(FilterStage(str(out)), str(write_jsonl(tmp_path / f"{name}.jsonl", records)),
                         str(tmp_path / f"{name}.out.jsonl"), progress=False)

    like = run(structural_labels(40, seed=1), "like")  # captions like the labels: about their share kept
    assert "warnings" not in like and like["kept"] >= 0.6 * expected * like["records"]
    fresh = structural_labels(80, seed=3)
    unlike = run([r for r in fresh if r["label"] == 0][:36] + [r for r in fresh if r["label"] == 1][:4], "unlike")
    assert unlike["kept"] <= 6 and len(unlike["warnings"]) == 1
    assert f"of {unlike['records']} triplets, against {expected:.1%}" in unlike["warnings"][0]
    assert "\nwarning: the filter kept" in format_stage_summary(unlike)
    saved_summary = json.loads((tmp_path / "unlike.out.jsonl.summary.json").read_text())
    assert saved_summary["warnings"] == unlike["warnings"]
    # no reference (a folder saved before it existed), or nothing scored: no warning
    assert yield_warning(None, 0.5, 100, 1) is None and yield_warning(reference, saved["threshold"], 0, 0) is None
    assert yield_warning(reference, saved["threshold"], 100, int(60 * expected)) is None


def test_curate_with_a_filter_trained_on_other_captions_says_why_it_kept_nothing(structural_model, tmp_path, capsys):
    from conftest import PROJECT_ROOT
    from sapretrain.cli import curate

    # Trained on 5- and 8-word captions where length tells right from wrong, the trees score
    # every triplet of the 115 COCO fixture captions (full sentences) as wrong.
    capsys.readouterr()
    config = PROJECT_ROOT / "configs" / "curation" / "coco_fixture.yaml"
    assert curate.main(["--config", str(config), "--no-progress", f"output_dir={tmp_path / 'out'}",
                        f"filter.model={structural_model}"]) == 2
    err = capsys.readouterr().err
    assert "relation_filter: all" in err and "were dropped (low_score" in err
    assert "warning: the filter kept 0.0% of" in err and "Train it on labels of captions like these" in err


def test_features_filter_needs_both_labels(nlp, tmp_path):
    from sapretrain.curation.feature_filter import train_feature_filter

    ones = [r for r in structural_labels(60, seed=2) if r["label"] == 1]
    cfg = load_config(FilterConfig, None, ["kind=features", "threshold_folds=2"])
    with pytest.raises(ValueError, match="both labels"):
        train_feature_filter(cfg, {"train": ones[:20], "validation": ones[20:], "test": []}, str(tmp_path / "m"), False, nlp)


# --------------------------------------------------------------------------- eval-filter


def test_eval_filter_cross_fit_with_the_features_kind(tmp_path, capsys):
    """Constructed FACTUAL rows: a gold graph that matches the caption, or one that names another relation."""
    rng = random.Random(3)
    path = tmp_path / "factual.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "region_id", "caption", "scene_graph"])
        for n in range(90):
            s, o, p = rng.choice(SUBJECTS), rng.choice(PLACES), rng.choice(PREPS)
            gold = p if n % 3 else rng.choice([q for q in PREPS if q != p])
            writer.writerow([n // 2, n, f"a {s} {p} the {o}", f"( {s} , {gold} , {o} )"])
    out = tmp_path / "eval"
    argv = ["--factual", str(path), "--cross-fit", "2", "--output", str(out), "--no-progress", "kind=features",
            "threshold_rule=precision_bound", "min_precision=0.85", "threshold_folds=2", "trees=20", "tree_min_leaf=5"]
    assert eval_filter.main(argv) == 0
    printed = capsys.readouterr().out
    assert "cross-fit of the features filter" in printed and "out-of-fold scores of its training folds" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert report["kind"] == "features" and report["threshold_on"] == "out_of_fold"
    pooled = report["pooled"]
    assert pooled["extractor"]["captions"] == 90 and pooled["extractor"]["gold"] == 90
    assert pooled["extractor"]["correct"] == report["labels"]["label_1"] == 60
    assert pooled["filter"]["extracted"] == 90 and pooled["filter"]["correct"] <= 60
    assert sum(fold["sizes"]["test"] for fold in report["folds"]) == 90
    assert all(0.0 <= fold["filter"]["threshold"] <= 1.0 and "auc" in fold["caption_length"] for fold in report["folds"])
    assert not list(out.glob("fold*")) and (out / "precision_yield.png").exists()
