"""Blind evaluation of negatives (sapretrain/curation/negeval.py) and its command."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from sapretrain.curation.negeval import (
    NgramEncoder,
    NgramStats,
    bootstrap_ci,
    cross_fitted_margins,
    drop_most_detectable,
    evaluate_negatives,
    fold_of,
    read_pairs,
    refine_choices,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NOUNS = ("dog cat man woman boy girl table chair car bus horse bike bench tree lamp cup plate box bag "
         "kite boat train truck sign clock phone laptop bed couch door window fence wall road").split()
RELS = ("on", "under", "next to", "behind", "in front of")


def templated(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(subject, relation, object) triples of distinct nouns."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        s, o = rng.sample(NOUNS, 2)
        out.append((s, rng.choice(RELS), o))
    return out


def write_ours(path: Path, pairs: list[tuple[str, str, str]]) -> None:
    lines = [json.dumps({"id": f"s{i}", "caption": c, "negative": {"caption": n}, "negative_method": m,
                         "relation": "on"}) for i, (c, n, m) in enumerate(pairs)]
    path.write_text("\n".join(lines + ["not json", json.dumps({"id": "x", "caption": "a dog"})]) + "\n")


def write_sugarcrepe(path: Path) -> Path:
    """Three rows of SugarCrepe's replace_rel.json (../shared/data/sugarcrepe, MIT), in its format."""
    path.write_text(json.dumps({
        "46": {"filename": "000000397133.jpg", "caption": "A man is in a kitchen making pizzas.",
               "negative_caption": "A man is in a kitchen cleaning up after making pizzas."},
        "105": {"filename": "000000475678.jpg", "caption": "Several suit cases lined in rows with luggage tags on them.",
                "negative_caption": "Several suit cases stacked on top of each other with luggage tags on them."},
        "1243": {"filename": "000000397133.jpg", "caption": "A person standing by a stove in a kitchen.",
                 "negative_caption": "A person sitting by a stove in a kitchen."}}))
    return path


@pytest.mark.skipif(not (SHARED / "sugarcrepe" / "replace_rel.json").exists(), reason="../shared/data not here")
def test_the_real_sugarcrepe_file_reads():
    pairs, skipped = read_pairs(SHARED / "sugarcrepe" / "replace_rel.json")
    assert pairs and not skipped and {p.method for p in pairs} == {"sugarcrepe/replace_rel"}


def test_read_pairs_of_every_format(tmp_path):
    ours = tmp_path / "neg.jsonl"
    write_ours(ours, [("a dog on a bed", "a dog under a bed", "inverse")])
    pairs, skipped = read_pairs(ours)
    assert [(p.caption, p.negative, p.method, p.relation) for p in pairs] == [
        ("a dog on a bed", "a dog under a bed", "inverse", "on")]
    assert skipped == {"bad JSON line": 1, "no negative": 1}

    sugarcrepe = write_sugarcrepe(tmp_path / "replace_rel.json")
    pairs, skipped = read_pairs(sugarcrepe)
    assert len(pairs) == 3 and not skipped and {p.method for p in pairs} == {"sugarcrepe/replace_rel"}
    assert ("A person standing by a stove in a kitchen.", "A person sitting by a stove in a kitchen.") in [
        (p.caption, p.negative) for p in pairs]

    vg = tmp_path / "visual_genome_relation.json"
    vg.write_text(json.dumps([{"image_id": "1", "true_caption": "the cup is on the table",
                               "false_caption": "the table is on the cup", "relation_name": "on"},
                              {"true_caption": "x", "false_caption": ""}]))
    pairs, skipped = read_pairs(vg)
    assert [(p.method, p.relation) for p in pairs] == [("aro/visual_genome_relation", "on")]
    assert skipped == {"no negative caption": 1}

    order = tmp_path / "coco_order.json"
    order.write_text(json.dumps([{"caption_options": ["a man rides a horse", "a horse rides a man", "man a rides horse"]},
                                 {"caption_options": ["alone"]}]))
    pairs, skipped = read_pairs(order)
    assert [p.negative for p in pairs] == ["a horse rides a man", "man a rides horse"]
    assert skipped == {"caption_options with fewer than 2 captions": 1}

    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a negatives JSONL"):
        read_pairs(bad)


def test_folds_keep_a_caption_together():
    assert fold_of("A dog on a bed.", 2) == fold_of("a dog   on a bed", 2)
    folds = [fold_of(f"caption {i}", 2) for i in range(400)]
    assert 150 < sum(folds) < 250  # both halves are used
    # Another seed is another split (the evaluation's is not the refinement's), still caption-stable.
    other = [fold_of(f"caption {i}", 2, seed=1) for i in range(400)]
    assert fold_of("A dog on a bed.", 2, seed=1) == fold_of("a dog   on a bed", 2, seed=1)
    assert 150 < sum(other) < 250 and 120 < sum(a != b for a, b in zip(folds, other)) < 280


def test_probe_finds_a_lexical_artefact_and_not_a_balanced_set():
    triples = templated(600)
    enc = NgramEncoder()
    # Artefact: every negative says "without" (the with -> without inverse).
    caps = [f"a {s} with a {o}" for s, _, o in triples]
    negs = [f"a {s} without a {o}" for s, _, o in triples]
    assert (cross_fitted_margins(caps, negs, enc) > 0).mean() > 0.95
    # Balanced: relation words occur as often in captions as in negatives (each relation is the
    # caption of one pair and the negative of another), so the text gives nothing away.
    caps = [f"a {s} {r} a {o}" for s, r, o in triples]
    negs = [f"a {s} {RELS[(RELS.index(r) + 1 + i % 4) % 5]} a {o}" for i, (s, r, o) in enumerate(triples)]
    acc = (cross_fitted_margins(caps, negs, enc) > 0).mean()
    assert 0.4 < acc < 0.6, acc


def test_evaluate_negatives_report(tmp_path):
    triples = templated(300, seed=1)
    pairs = [(f"a {s} with a {o}", f"a {s} without a {o}", "inverse") for s, _, o in triples[:150]]
    pairs += [(f"a {s} {r} a {o}", f"a {o} {r} a {s}", "swap") for s, r, o in triples[150:]]
    path = tmp_path / "neg.jsonl"
    write_ours(path, pairs)
    found, _ = read_pairs(path)
    report = evaluate_negatives(found, encoder="ngram", n_boot=200)
    assert report["overall"]["pairs"] == 300
    inverse, swap = report["methods"]["inverse"], report["methods"]["swap"]
    assert inverse["blind_accuracy"] > 0.95 and inverse["own_probe_accuracy"] > 0.95
    assert swap["own_probe_accuracy"] < 0.7  # a swap keeps the words: only their order differs
    lo, hi = report["overall"]["ci95"]
    assert lo <= report["overall"]["blind_accuracy"] <= hi
    assert report["relations"]["on"]["pairs"] == 300
    with pytest.raises(ValueError, match="no pairs"):
        evaluate_negatives([], encoder="ngram")


def test_bootstrap_interval_is_over_captions():
    correct = np.r_[np.ones(80), np.zeros(20)]
    groups = [f"c{i}" for i in range(100)]
    lo, hi = bootstrap_ci(correct, groups, n_boot=500)
    assert lo < 0.8 < hi and hi - lo < 0.2
    # The same 100 results from 2 captions: far less evidence, a far wider interval.
    lo2, hi2 = bootstrap_ci(correct, ["a"] * 80 + ["b"] * 20, n_boot=500)
    assert hi2 - lo2 > 0.5


def test_unattested_bigrams():
    corpus = ["a man standing in front of a bus", "a dog under the table", "a cat on the table",
              "a cat under a chair"] * 60 + ["a man behind a fence"] * 3 + ["a unicorn near a castle"]
    stats = NgramStats(corpus)
    caption = "a man standing in front of a bus"
    assert ("under", "front") in stats.unattested("a man standing under front of a bus", caption)
    assert stats.unattested("a man standing behind a bus", caption) == []  # every new bigram is seen
    # "unicorn" is rare: its unseen bigram is no evidence against the rewrite.
    assert stats.unattested("a man standing in front of a unicorn", caption) == []


def test_refinement_prefers_balanced_candidates_and_drops_the_rest():
    triples = templated(400, seed=2)
    caps = [f"a {s} {r} a {o}" for s, r, o in triples]
    # First candidate: a giveaway word; second: a relation drawn like the captions' relations.
    cands = [[f"a {s} not {r} a {o}", f"a {s} {RELS[(RELS.index(r) + 1 + i % 4) % 5]} a {o}"]
             for i, (s, r, o) in enumerate(triples)]
    before = (cross_fitted_margins(caps, [c[0] for c in cands], NgramEncoder()) > 0).mean()
    choice, margins = refine_choices(caps, cands, NgramEncoder(), rounds=3)
    assert before > 0.95
    assert np.mean(choice) > 0.9 and (margins > 0).mean() < 0.65

    m = np.array([3.0, 2.0, 1.0, -1.0, -2.0, 0.5])
    assert drop_most_detectable(m, max_accuracy=0.5, min_kept=0.0) == [0, 1]  # 2 positive of 4 left
    assert drop_most_detectable(m, max_accuracy=0.5, min_kept=0.9) == []      # floor: keep 6 of 6
    assert drop_most_detectable(m, max_accuracy=1.0, min_kept=0.0) == []


def test_eval_negatives_command(tmp_path, capsys):
    from sapretrain.cli.eval_negatives import main

    triples = templated(200, seed=3)
    path = tmp_path / "neg.jsonl"
    write_ours(path, [(f"a {s} with a {o}", f"a {s} without a {o}", "inverse") for s, _, o in triples])
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert main([str(path), str(write_sugarcrepe(tmp_path / "replace_rel.json")), "--encoder", "ngram",
                 "--bootstrap", "100", "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "inverse" in text and "sugarcrepe/replace_rel" in text
    report = json.loads(out_json.read_text())["ngram"]
    assert report["methods"]["inverse"]["pairs"] == 200 and report["methods"]["sugarcrepe/replace_rel"]["pairs"] == 3
    assert out_png.stat().st_size > 1000

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([str(empty), "--encoder", "ngram"]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
