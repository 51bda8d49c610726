"""Gold-derived filter labels (FACTUAL), the filter's relation precision / recall against gold,
the precision-yield curve, the no-learning baselines, cross-fitting, and the two commands."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sapretrain.cli import eval_filter, gold_labels as gold_labels_cli
from sapretrain.curation import filter_eval
from sapretrain.curation.filter_eval import (
    Case,
    assign_folds,
    caption_length_score,
    extract_cases,
    gold_labels,
    label_triples,
    length_then_prior,
    load_factual_rows,
    precision_yield_curve,
    random_keep,
    relation_pr,
    relation_prior,
)
from sapretrain.curation.relation_filter import load_labels

ROOT = Path(__file__).resolve().parents[1]
FACTUAL = ROOT.parent / "shared" / "data" / "factual" / "dev.csv"
needs_factual = pytest.mark.skipif(not FACTUAL.exists(), reason="FACTUAL dev set not in ../shared/data")


@pytest.fixture(scope="module")
def nlp():
    from sapretrain.curation.svo import load_nlp

    return load_nlp()


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "region_id", "caption", "scene_graph"])
        for n, (caption, graph) in enumerate(rows):
            writer.writerow([n, 100 + n, caption, graph])
    return path


def case(gold: list[tuple], triples: list[tuple], kinds: list[str] | None = None, caption: str = "c") -> Case:
    kinds = kinds or ["spatial"] * len(triples)
    triplets = [{"subj": {"text": s}, "rel": {"text": r, "lemma": r, "kind": k}, "obj": {"text": o}}
                for (s, r, o), k in zip(triples, kinds)]
    return Case(caption, caption, Counter(gold), triplets, list(triples), label_triples(Counter(gold), list(triples)))


# --------------------------------------------------------------------------- labels


def test_label_triples_is_one_to_one_and_uses_compound_spellings():
    gold = Counter({("dog", "on", "couch"): 1, ("man", "ride", "board"): 1})
    triples = [("dog", "on", "couch"), ("dog", "on", "couch"), ("cat", "on", "couch"), ("man", "ride", "snowboard")]
    assert label_triples(gold, triples) == [1, 0, 0, 1]  # a second copy of a matched triple is wrong
    assert label_triples(Counter(), triples) == [0, 0, 0, 0]


def test_gold_labels_on_real_rows(nlp, tmp_path):
    rows = load_factual_rows(str(write_csv(tmp_path / "f.csv", [
        ("white stove in a kitchen", "( stove , is , white ) , ( stove , in , kitchen )"),
        ("white stove in a kitchen", "( stove , on , kitchen )"),       # same caption, another graph: wrong
        ("a dog on a couch", "( dog , on , couch )"),
        ("a man riding a horse", "( horse , ride , man )"),              # subject and object swapped: wrong
        ("a sunny day", "( day , is , sunny )"),                         # no relation, nothing extracted
    ])))
    cases = extract_cases(nlp, rows)
    assert [c.labels for c in cases] == [[1], [0], [1], [0], []]
    assert cases[0].gold == Counter({("stove", "in", "kitchen"): 1})  # the attribute is not a relation
    labels = gold_labels(cases)
    assert [r["id"] for r in labels] == ["factual-100-0", "factual-101-0", "factual-102-0", "factual-103-0"]
    assert all(r["labeler"] == "gold:factual" for r in labels)
    assert labels[0]["reason"] == "matches gold: (stove, in, kitchen)"
    assert labels[3]["reason"].startswith("not in the gold graph") and labels[3]["triplet"]["rel"]["lemma"] == "ride"
    counts = filter_eval.label_counts(cases)
    assert (counts["label_1"], counts["label_0"], counts["gold_relations"], counts["captions_without_triplets"]) == (2, 2, 4, 1)


@needs_factual
def test_gold_labels_add_up_to_evaluate_counts(nlp):
    """On real FACTUAL rows, the labels of the extractor's triplets give evaluate.py's own numbers."""
    from sapretrain.curation.evaluate import evaluate

    rows = load_factual_rows(str(FACTUAL))[:80]
    cases = extract_cases(nlp, rows)
    reference = evaluate(nlp, [(r["caption"], r["gold"]) for r in rows])
    assert sum(sum(c.labels) for c in cases) == reference["correct"]
    assert relation_pr(cases)["correct"] == reference["correct"]
    assert relation_pr(cases)["gold"] == reference["gold"] and relation_pr(cases)["extracted"] == reference["predicted"]
    assert 0 < reference["correct"] < reference["predicted"]  # both labels occur


def test_gold_labels_command_writes_the_filter_label_format(tmp_path, capsys):
    path = write_csv(tmp_path / "f.csv", [("a dog on a couch", "( dog , on , couch )"),
                                          ("a cat under a table", "( cat , on , table )")])
    out = tmp_path / "labels.jsonl"
    assert gold_labels_cli.main(["--factual", str(path), "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "label 1: 1  label 0: 1" in printed and "gold relations 2" in printed
    labels, bad = load_labels(str(out))
    assert bad == {} and [r["label"] for r in labels] == [1, 0]


def test_commands_help_and_empty_input(tmp_path, capsys):
    for command in (gold_labels_cli, eval_filter):
        with pytest.raises(SystemExit) as e:
            command.main(["--help"])
        assert e.value.code == 0
        assert "--factual" in capsys.readouterr().out
    empty = write_csv(tmp_path / "empty.csv", [])
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("caption,label\na dog,1\n")
    for command, extra in ((gold_labels_cli, ["--output", str(tmp_path / "o.jsonl")]),
                           (eval_filter, ["--output", str(tmp_path / "o"), "--cross-fit", "2"])):
        for path, message in ((empty, "no captions"), (wrong, "not a FACTUAL csv")):
            with pytest.raises(SystemExit) as e:
                command.main(["--factual", str(path), *extra])
            assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


# --------------------------------------------------------------------------- metrics


def constructed() -> list[Case]:
    return [
        case([("a", "on", "b"), ("b", "near", "c")], [("a", "on", "b"), ("c", "on", "b")]),
        case([("x", "in", "y")], [("x", "in", "y"), ("x", "in", "y")]),
        case([("p", "hold", "q")], []),  # gold that nothing extracted still counts in the recall
    ]


def test_relation_pr_counts_recall_against_all_gold():
    cases = constructed()
    alone = relation_pr(cases)
    assert (alone["gold"], alone["extracted"], alone["kept"], alone["correct"]) == (4, 4, 4, 2)
    assert alone["precision"] == 0.5 and alone["recall"] == 0.5 and alone["kept_fraction"] == 1.0
    # keep the second copy of (x, in, y) instead of the first: still one match (recounted, not the labels)
    kept = relation_pr(cases, [[True, False], [False, True], []])
    assert (kept["kept"], kept["correct"], kept["precision"], kept["recall"]) == (2, 2, 1.0, 0.5)
    none = relation_pr(cases, [[False, False], [False, False], []])
    assert (none["precision"], none["recall"], none["f1"]) == (0.0, 0.0, 0.0)


def test_precision_yield_curve_equals_relation_pr_at_each_threshold():
    cases = constructed()
    scores = [np.array([0.9, 0.2]), np.array([0.5, 0.5]), np.array([])]
    curve = precision_yield_curve(cases, scores)
    assert curve["threshold"] == [0.9, 0.5, 0.2]  # ties enter together
    for t, p, r, q in zip(curve["threshold"], curve["precision"], curve["recall"], curve["kept_fraction"]):
        m = relation_pr(cases, [s >= t for s in scores])
        assert (p, r, q) == pytest.approx((m["precision"], m["recall"], m["kept_fraction"]))
    assert curve["precision"] == pytest.approx([1.0, 2 / 3, 0.5]) and curve["recall"] == pytest.approx([0.25, 0.5, 0.5])


def test_baselines_are_what_they_say():
    train = [case([("a", "on", "b")], [("a", "on", "b")]), case([], [("a", "leave on", "b")], ["action"]),
             case([("c", "on", "d")], [("c", "on", "d")]), case([], [("c", "on", "e")])]
    score = relation_prior(train, smoothing=0.0)
    new = case([], [("x", "on", "y"), ("x", "leave on", "y"), ("x", "stand", "y")], ["spatial", "action", "action"])
    assert score(new).tolist() == pytest.approx([2 / 3, 0.0, 0.0])  # "stand": unseen lemma -> its kind's rate
    assert caption_length_score(case([], [("a", "on", "b")] * 2, caption="a b c")).tolist() == [-3.0, -3.0]
    both = length_then_prior(score)
    short, long = case([], [("x", "on", "y"), ("x", "leave on", "y")], ["spatial", "action"], caption="x on y"), new
    long.caption = "x on y and x leave on y"
    assert both(short).tolist() == pytest.approx([-3 + 1 / 3, -3.0])  # within a length, the prior orders
    assert max(both(long)) < min(both(short))                          # a shorter caption always first
    cases = constructed()
    everything = random_keep(cases, 1.0, draws=3)
    assert (everything["precision"], everything["recall"], everything["kept_fraction"]) == (0.5, 0.5, 1.0)
    half = random_keep(cases * 50, 0.5, draws=20)
    assert 0.4 < half["kept_fraction"] < 0.6 and half["recall"] < 0.35


def test_folds_partition_captions_and_keep_duplicates_together():
    cases = [case([], [], caption=f"caption {i % 40}") for i in range(80)]
    splits = assign_folds(cases, 4, 0.2)
    tested = [c.caption for s in splits for c in s["test"]]
    assert sorted(tested) == sorted(c.caption for c in cases)  # each case is tested exactly once
    for s in splits:
        parts = [{c.caption for c in s[name]} for name in ("train", "validation", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert sum(len(s[n]) for n in ("train", "validation", "test")) == 80 and s["validation"]


# --------------------------------------------------------------------------- end to end (tiny random BERT)


@pytest.fixture(scope="module")
def small_factual(tmp_path_factory) -> Path:
    """The first 60 rows of FACTUAL dev."""
    rows = list(csv.reader(open(FACTUAL, newline="")))
    path = tmp_path_factory.mktemp("factual") / "small.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows[:61])
    return path


@needs_factual
def test_eval_filter_cross_fit_end_to_end(tiny_base, small_factual, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--factual", str(small_factual), "--cross-fit", "2", "--output", str(out), "--no-progress",
            f"base_model={tiny_base}", "epochs=1", "batch_size=16", "max_length=48", "device=cpu",
            "threshold_rule=min_precision", "min_precision=0.85"]
    assert eval_filter.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2-fold cross-fit" in printed and "fold spread filter" in printed and "random_at_filter_yield" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert (out / "precision_yield.png").stat().st_size > 5000 and not list(out.glob("fold*"))
    pooled = report["pooled"]
    assert pooled["extractor"]["gold"] == report["labels"]["gold_relations"]  # every caption is scored once
    assert pooled["extractor"]["extracted"] == report["labels"]["triplets"] == pooled["filter"]["extracted"]
    assert pooled["extractor"]["captions"] == 60 and pooled["extractor"]["kept_fraction"] == 1.0
    assert pooled["filter"]["correct"] <= pooled["extractor"]["correct"]
    assert len(report["folds"]) == 2 and len(report["spread"]["filter"]["precision"]["folds"]) == 2
    assert set(report["curves"]) == {"filter", "relation_prior", "caption_length", "length_then_prior", "random"}
    curve = report["curves"]["filter"]
    assert curve["kept_fraction"][-1] == 1.0 and curve["recall"][-1] == pytest.approx(pooled["extractor"]["recall"])
    assert len(report["out_of_fold"]) == report["labels"]["triplets"]
    assert sum(r["label"] for r in report["out_of_fold"]) == report["labels"]["label_1"]


@needs_factual
def test_eval_filter_on_a_trained_model(nlp, tiny_base, small_factual, tmp_path, capsys):
    """--model: the filter's own test split (by image), kept at the filter's saved threshold."""
    from sapretrain.config import load_config
    from sapretrain.curation.relation_filter import FilterConfig, split_labels, train_filter

    labels = gold_labels(extract_cases(nlp, load_factual_rows(str(small_factual))))
    assert all(r["image_id"] for r in labels)
    cfg = load_config(FilterConfig, None, [f"base_model={tiny_base}", "epochs=1", "max_length=48", "device=cpu",
                                           "val_fraction=0.3", "test_fraction=0.3", "split_by=image"])
    by_image = split_labels(labels, cfg)
    images = [{r["image_id"] for r in by_image[name]} for name in ("train", "validation", "test")]
    assert not (images[0] & images[1] or images[0] & images[2] or images[1] & images[2])
    train_filter(cfg, labels, str(tmp_path / "model"), progress=False)
    assert eval_filter.main(["--factual", str(small_factual), "--model", str(tmp_path / "model"), "--output",
                             str(tmp_path / "eval"), "--no-progress", "--device", "cpu"]) == 0
    assert "on its test split" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    saved = json.loads((tmp_path / "model" / "filter_config.json").read_text())
    assert report["mode"] == "model" and report["filter"]["threshold"] == pytest.approx(saved["threshold"])
    assert "auc" in report["filter"]
    test_triplets = sum(1 for r in labels if r["image_id"] in images[2])
    assert report["extractor"]["extracted"] == test_triplets > 0
