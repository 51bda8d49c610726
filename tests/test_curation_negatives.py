"""Negative captions: rule inverses, swaps, drops, validation, LLM mode (fake), the stage and tool."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from sapretrain.curation.negatives import (
    DEFAULT_CONFIG,
    NegativeStage,
    inflect,
    is_plural,
    lexicon_map,
    load_negatives_config,
    replacements,
    validate,
)
from sapretrain.curation.stage import StageConfig, dropped_output, run_stage


@pytest.fixture(scope="module")
def nlp():
    from sapretrain.curation.svo import load_nlp

    return load_nlp()


def stage_for(nlp, cfg=None, **kw):
    stage = NegativeStage(cfg or load_negatives_config(), **kw)
    stage.nlp = nlp  # one spaCy load for the whole module
    return stage


def samples(nlp, cases):
    """One record per (caption, subject, relation): the extractor's triplet with that subject and relation."""
    from sapretrain.curation.svo import extract_triplets

    out = []
    for i, ((caption, subj, rel), doc) in enumerate(zip(cases, nlp.pipe([c[0] for c in cases]))):
        found = [t for t in extract_triplets(doc) if t["subj"]["text"] == subj and t["rel"]["text"] == rel]
        assert found, (caption, [(t["subj"]["text"], t["rel"]["text"]) for t in extract_triplets(doc)])
        out.append({"id": f"s{i}", "caption": caption, "triplet": found[0], "source": "test"})
    return out


# (caption, subject, relation) → (method, negative caption); hand-checked.
CASES = [
    (("the cat is under the table", "cat", "under"), ("inverse", "the cat is on the table")),
    (("A dog sleeping on a couch", "dog", "sleeping on"), ("inverse", "A dog sleeping under a couch")),
    (("a man to the left of a woman", "man", "to the left of"), ("inverse", "a man to the right of a woman")),
    (("A cat is to the right of a dog", "cat", "to the right of"), ("inverse", "A cat is to the left of a dog")),
    (("a car parked in front of a building", "car", "parked in front of"), ("inverse", "a car parked behind a building")),
    (("A bird sitting on top of a fence", "bird", "sitting on top of"), ("inverse", "A bird sitting underneath a fence")),
    (("A lamp hanging above the table", "lamp", "hanging above"), ("inverse", "A lamp hanging below the table")),
    (("people standing next to a bus", "people", "standing next to"), ("inverse", "people standing far from a bus")),
    (("A bench by the river", "bench", "by"), ("inverse", "A bench far from the river")),
    (("a boy walking into a room", "boy", "walking into"), ("inverse", "a boy walking out of a room")),
    (("A man holding an umbrella", "man", "holding"), ("inverse", "A man dropping an umbrella")),
    (("A woman picking up a ball", "woman", "picking up"), ("inverse", "A woman putting down a ball")),
    (("a man throwing a frisbee", "man", "throwing"), ("inverse", "a man catching a frisbee")),
    (("A woman pushes a cart", "woman", "pushes"), ("inverse", "A woman pulls a cart")),
    (("A girl opening a door", "girl", "opening"), ("inverse", "A girl closing a door")),
    (("A man wearing a hat", "man", "wearing"), ("inverse", "A man taking off a hat")),
    (("A man riding a horse", "man", "riding"), ("swap", "A horse riding a man")),
    # Symmetric for a swap, but the posture of a subject that acts can change (replace.verbs: "the
    # dog chases" below makes "dog" one).
    (("A dog sitting between two cars", "dog", "sitting between"), ("replace", "A dog standing between two cars")),
    (("Two dogs are chasing a cat", "dogs", "chasing"), ("swap", "A cat is chasing two dogs")),
    (("A horse ridden by a man", "man", "ridden by"), ("swap", "A man ridden by a horse")),
    (("the dog chases the cat", "dog", "chases"), ("swap", "the cat chases the dog")),
    (("Two men ride a horse", "men", "ride"), ("swap", "A horse rides two men")),
    (("A group of people riding horses", "people", "riding"), ("swap", "Horses riding a group of people")),
    (("Children's toy animals are strewn across a floor.", "toy animals", "strewn across"),
     ("swap", "A floor is strewn across children's toy animals.")),
]
# (caption, subject, relation) → drop detail
DROPS = [
    (("A man kissing a woman", "man", "kissing"), "symmetric: kiss"),
    (("A house between two trees", "house", "between"), "symmetric: between"),
    (("Children's toy animals are strewn across a floor.", "Children", "'s"), "symmetric: 's"),
    # "with" and a worn "in" have no opposite; "without" would be a word a text-only model spots.
    (("a child with an umbrella", "child", "with"), "symmetric: with"),
    (("A man in a white shirt", "man", "in"), "implied verb: wear"),
]


def test_rule_negatives(nlp):
    records = samples(nlp, [c for c, _ in CASES] + [c for c, _ in DROPS])
    out = stage_for(nlp).process(records)
    for r, (case, (method, negative)) in zip(out, CASES):
        assert "drop_reason" not in r, (case, r.get("drop_detail"), r.get("negative_caption"))
        assert (r["negative_method"], r["negative"]["caption"]) == (method, negative), case
        neg, trip = r["negative"]["caption"], r["negative"]["triplet"]
        for part in ("subj", "rel", "obj"):
            assert neg[trip[part]["start"]:trip[part]["end"]] == trip[part]["text"]
        assert r["source"] == "test" and r["triplet"] == records[out.index(r)]["triplet"]  # fields kept
        if method == "swap":
            assert trip["subj"]["head"] == r["triplet"]["obj"]["head"]
            assert trip["obj"]["head"] == r["triplet"]["subj"]["head"]
        else:
            assert trip["subj"]["head"] == r["triplet"]["subj"]["head"]
            assert trip["rel"]["lemma"] != r["triplet"]["rel"]["lemma"]
    for r, (case, detail) in zip(out[len(CASES):], DROPS):
        assert (r["drop_reason"], r["drop_detail"]) == ("no_negative", detail), case


def test_manifest_records_get_the_same_negatives(nlp):
    """make_samples writes the manifest's triplet (no rel.lemma; the lemma is the record's
    ``relation``): the action lexicon, the symmetric list and validation still see the lemma."""
    from sapretrain.curation.svo import triplets_to_manifest_fields

    records = samples(nlp, [c for c, _ in CASES] + [c for c, _ in DROPS])
    manifest = [{**r, **triplets_to_manifest_fields(r, r["triplet"])} for r in records]
    for r, extracted in zip(manifest, records):  # make_samples keeps the head nouns (for the ROI stage)
        for part in ("subj", "obj"):
            r["triplet"][part]["head"] = extracted["triplet"][part]["head"]
    assert all("lemma" not in r["triplet"]["rel"] for r in manifest)
    out = stage_for(nlp).process(manifest)
    for r, (case, (method, negative)) in zip(out, CASES):
        assert "drop_reason" not in r, (case, r.get("drop_detail"), r.get("negative_caption"))
        assert (r["negative_method"], r["negative"]["caption"]) == (method, negative), case
        assert "lemma" not in r["triplet"]["rel"]  # the record's own triplet is written as it came
    for r, (case, detail) in zip(out[len(CASES):], DROPS):
        assert (r["drop_reason"], r["drop_detail"]) == ("no_negative", detail), case


def test_validation_rejects_a_lexicon_entry_that_changes_the_subject(nlp, tmp_path):
    cfg_path = tmp_path / "neg.yaml"
    # swap off: this test is about the inverse alone (with it on, the swap would be kept instead)
    cfg_path.write_text(f"base: {DEFAULT_CONFIG}" + "\naction:\n  one_way:\n    chase: be chased by\n"
                        + "swap:\n  enabled: false\n")
    cfg = load_negatives_config(cfg_path)
    [r] = stage_for(nlp, cfg).process(samples(nlp, [("A dog chasing a cat", "dog", "chasing")]))
    # "A dog being chased by a cat": the cat now chases; the dog is no longer the subject.
    assert r["negative_caption"] == "A dog being chased by a cat"
    assert (r["drop_reason"], r["drop_detail"], r["negative_method"]) == ("negative_invalid", "lost_subject", "inverse")


def test_validate_details():
    def span(text, head):
        return {"text": text, "start": 0, "end": len(text), "head": head}

    orig = {"subj": span("cat", "cat"), "rel": {"text": "on", "lemma": "on", "kind": "spatial"}, "obj": span("table", "table")}
    same = {"subj": span("cat", "cat"), "rel": {"text": "on", "lemma": "on"}, "obj": span("table", "table")}
    other_obj = {"subj": span("cat", "cat"), "rel": {"text": "under", "lemma": "under"}, "obj": span("bed", "bed")}
    good = {"subj": span("black cats", "cat"), "rel": {"text": "under", "lemma": "under"}, "obj": span("table", "table")}
    assert validate(orig, [], "inverse") == "no_triplet"
    assert validate(orig, [{**same, "subj": span("dog", "dog")}], "inverse") == "lost_subject"
    assert validate(orig, [other_obj], "inverse") == "lost_object"
    assert validate(orig, [same], "inverse") == "same_relation"
    assert validate(orig, [same, good], "inverse") is good
    swapped = {"subj": span("table", "table"), "rel": {"text": "on", "lemma": "on"}, "obj": span("cat", "cat")}
    assert validate(orig, [same], "swap") == "lost_subject"
    assert validate(orig, [swapped], "swap") is swapped
    assert validate(orig, [swapped], "llm") is swapped and validate(orig, [good], "llm") is good


def fake_llm(monkeypatch, texts):
    seen = []

    def generate_negatives_llm(client, batch):
        seen.append((client, [s["caption"] for s in batch]))
        return [texts[s["caption"]] for s in batch]

    module = types.ModuleType("sapretrain.curation.llm")
    module.generate_negatives_llm = generate_negatives_llm
    monkeypatch.setitem(sys.modules, "sapretrain.curation.llm", module)
    return seen


def test_llm_mode_validates_the_generated_text(nlp, monkeypatch):
    cases = [("the cat is under the table", "cat", "under"), ("A man riding a horse", "man", "riding"),
             ("A dog sleeping on a couch", "dog", "sleeping on"), ("A girl opening a door", "girl", "opening")]
    seen = fake_llm(monkeypatch, {"the cat is under the table": "The cat is on top of the table.",
                                  "A man riding a horse": "A horse riding a man",
                                  "A dog sleeping on a couch": "A cat sleeping on a couch",
                                  "A girl opening a door": None})
    stage = stage_for(nlp, mode="llm", llm_config="configs/curation/llm.yaml")
    stage.client = "client"
    out = stage.process(samples(nlp, cases))
    assert seen == [("client", [c[0] for c in cases])]
    assert out[0]["negative"]["caption"] == "The cat is on top of the table." and out[0]["negative_method"] == "llm"
    assert out[0]["negative"]["triplet"]["rel"]["text"] == "on top of"
    assert out[1]["negative"]["triplet"]["subj"]["text"] == "horse"
    assert (out[2]["drop_reason"], out[2]["drop_detail"]) == ("negative_invalid", "lost_subject")
    assert out[3]["drop_reason"] == "llm_failed"
    with pytest.raises(ValueError, match="LLM config"):
        NegativeStage(load_negatives_config(), mode="llm")


class Crashing(NegativeStage):
    crash_at = None

    def process(self, records):
        if self.crash_at == 0:
            raise RuntimeError("killed")
        if self.crash_at is not None:
            self.crash_at -= 1
        return super().process(records)


def test_stage_end_to_end_resume_and_bad_lines(nlp, tmp_path):
    records = samples(nlp, [c for c, _ in CASES[:6]] + [DROPS[0][0]])
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "{not json")
    lines.append(json.dumps({"id": "x", "caption": "a cat", "triplet": {"subj": {"text": "dog", "start": 0, "end": 3}}}))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    full = run_stage(stage_for(nlp), str(src), str(tmp_path / "full.jsonl"), StageConfig(chunk_size=3), progress=False)
    assert full["kept"] == 6
    assert full["dropped"] == {"bad_json": 1, "bad_record": 1, "no_negative": 1}

    crashing = Crashing(load_negatives_config())
    crashing.nlp, crashing.crash_at = nlp, 1
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(RuntimeError):
        run_stage(crashing, str(src), out, StageConfig(chunk_size=3), progress=False)
    crashing.crash_at = None
    resumed = run_stage(crashing, str(src), out, StageConfig(chunk_size=3), progress=False)
    assert resumed == {**full, "input": str(src)}
    assert open(out).read() == open(tmp_path / "full.jsonl").read()
    assert open(dropped_output(out)).read() == open(tmp_path / "full.dropped.jsonl").read()
    kept = [json.loads(line) for line in open(out)]
    assert [r["negative"]["caption"] for r in kept] == [neg for _, (_, neg) in CASES[:6]]


def test_lexicon_is_editable(nlp, tmp_path):
    path = tmp_path / "neg.yaml"
    path.write_text('spatial:\n  pairs:\n    - [under, "on top of"]\naction:\n  one_way:\n    ride: fall off\n'
                    "swap:\n  enabled: false\n")
    cfg = load_negatives_config(path)
    out = stage_for(nlp, cfg).process(samples(nlp, [("the cat is under the table", "cat", "under"),
                                                    ("A man riding a horse", "man", "riding"),
                                                    ("Two dogs are chasing a cat", "dogs", "chasing")]))
    assert out[0]["negative"]["caption"] == "the cat is on top of the table"
    assert out[1]["negative"]["caption"] == "A man falling off a horse"
    assert (out[2]["drop_reason"], out[2]["drop_detail"]) == ("no_negative", "no inverse")
    path.write_text("spatial:\n  pairs:\n    - [under, above]\n    - [under, below]\n")
    with pytest.raises(ValueError, match="two inverses"):
        load_negatives_config(path)
    path.write_text("spatial:\n  pair: []\n")
    with pytest.raises(ValueError, match="did you mean"):
        load_negatives_config(path)


def test_default_lexicon_is_consistent():
    cfg = load_negatives_config()
    spatial = lexicon_map(cfg.spatial, "spatial")
    assert spatial["on"] == "under" and spatial["under"] == "on" and spatial["next to"] == "far from"
    assert lexicon_map(cfg.action, "action")["pick up"] == "put down"


def test_inflection_and_number():
    assert [inflect("drop", f) for f in ("base", "3sg", "past", "pp", "ing")] == ["drop", "drops", "dropped", "dropped", "dropping"]
    assert [inflect("take", f) for f in ("3sg", "past", "pp", "ing")] == ["takes", "took", "taken", "taking"]
    assert inflect("close", "ing") == "closing" and inflect("empty", "3sg") == "empties" and inflect("catch", "3sg") == "catches"
    assert is_plural("two dogs") and is_plural("people") and is_plural("the cats", "cat")
    assert not is_plural("a glass") and not is_plural("the bus", "bus")


def test_tool_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    import make_negatives

    src = tmp_path / "in.jsonl"
    trip = {"subj": {"text": "cat", "start": 4, "end": 7, "head": "cat"},
            "rel": {"text": "under", "start": 11, "end": 16, "kind": "spatial", "lemma": "under"},
            "obj": {"text": "table", "start": 21, "end": 26, "head": "table"}}
    src.write_text(json.dumps({"id": "a", "caption": "the cat is under the table", "triplet": trip}) + "\n")
    assert make_negatives.main(["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "kept 1" in printed and "kept by method: inverse 1" in printed
    assert json.loads(open(tmp_path / "o.jsonl").read())["negative"]["caption"] == "the cat is on the table"


def test_replacement_candidates_exclude_synonyms():
    from sapretrain.curation.negatives import Rules, replacements

    table = replacements(load_negatives_config().replace)
    assert "under" in table["on"] and "behind" in table["on"]
    for a, b in (("on", "on top of"), ("in", "inside"), ("near", "next to"), ("on", "in"), ("next to", "beside")):
        assert b not in table.get(a, []) and a not in table.get(b, []), (a, b)
    rules = Rules(load_negatives_config())
    caption = "a cup on a table"
    t = {"subj": {"text": "cup", "start": 2, "end": 5}, "rel": {"text": "on", "start": 6, "end": 8, "kind": "spatial"},
         "obj": {"text": "table", "start": 11, "end": 16}}
    cands = rules.candidates(caption, t)
    assert [(c.method, c.caption) for c in cands][:3] == [
        ("inverse", "a cup under a table"), ("replace", "a cup next to a table"), ("replace", "a cup in front of a table")]
    assert cands[-1].method == "swap" and len({c.caption for c in cands}) == len(cands)


def test_posture_verbs_are_replaced_in_the_caption_form(nlp):
    from sapretrain.curation.negatives import Rules
    from sapretrain.curation.svo import extract_triplets

    verbs = replacements(load_negatives_config().replace, "verbs")
    assert set(verbs["sit"]) == {"stand", "lie", "lay"} and "lie" not in verbs["lay"]  # synonyms never
    rules = Rules(load_negatives_config())
    cases = {("A man sits on a bench", "sits on"): {"A man stands on a bench", "A man lies on a bench"},
             ("A dog is laying on a bed", "laying on"): {"A dog is sitting on a bed", "A dog is standing on a bed"},
             ("Two people sat in a car", "sat in"): {"Two people stood in a car", "Two people lay in a car"}}
    evidence = ["A man wearing a hat", "A man eating a pizza", "Two dogs chasing a ball", "A dog chases a cat",
                "People eating pizza", "People riding bikes", "People playing frisbee",
                "A toilet with a broken seat",  # "with" read as wear: not written as a verb
                "Men on bikes riding alongside a car", "Bikes riding down a hill", "A man riding a bike",
                "A girl riding a bike", "A woman riding a bike", "A bench watching the ocean"]  # parse errors
    agents = rules.agents(t for c in evidence for t in extract_triplets(nlp(c)))
    assert agents == {"man", "dog", "people"}, agents
    for (caption, rel), want in cases.items():
        t = next(t for t in extract_triplets(nlp(caption)) if t["rel"]["text"] == rel)
        got = {c.caption for c in rules.candidates(caption, t, agents) if c.method == "replace"}
        assert want <= got, (caption, got)
    # A thing is placed, whatever the verb: "a toilet standing in a bathroom" is no negative.
    caption = "A toilet sitting in a bathroom"
    t = next(t for t in extract_triplets(nlp(caption)) if t["rel"]["text"] == "sitting in")
    assert not [c for c in rules.candidates(caption, t, agents) if "standing" in c.caption or "lying" in c.caption]
    with pytest.raises(ValueError, match="one verb lemma"):
        load_negatives_config(overrides=["replace.verbs=[[sit down, stand]]"])


def test_fluency_rejects_a_rewrite_the_corpus_never_has(nlp, tmp_path):
    corpus = tmp_path / "corpus.txt"
    # "holding", "dropping", "onto" and "off" are common; "holding off" and "dropping onto" never
    # occur, so both rewrites of "holding onto" (inverse, replacement) are rejected.
    corpus.write_text("a man holding a cup\n" * 200 + "a cat jumping off a table\n" * 200
                      + "a man dropping a ball\n" * 200 + "a dog jumping onto a bed\n" * 200)
    cfg = load_negatives_config(DEFAULT_CONFIG, [f"fluency.corpus=[{corpus}]", "swap.enabled=false"])
    case = [("A man holding onto a rail", "man", "holding onto")]
    [r] = stage_for(nlp, cfg).process(samples(nlp, case))
    assert (r["drop_reason"], r["drop_detail"]) == ("negative_invalid", "unattested: dropping onto"), r
    cfg.fluency.enabled = False
    [r] = stage_for(nlp, cfg).process(samples(nlp, case))
    assert r["negative"]["caption"] == "A man dropping onto a rail"


def test_refinement_balances_relation_words(nlp):
    """Captions say "on" far more than anything else (as COCO's do). Inverses alone put "under" in
    almost every negative, which a text-only probe reads off; refinement chooses among inverse,
    replacements and swap so that relation words are as common in negatives as in captions."""
    from sapretrain.curation.negeval import NgramEncoder, cross_fitted_margins

    import random

    rng = random.Random(0)
    nouns = ("cup plate book phone bag hat ball box lamp clock vase bottle bowl toy shoe sign kite "
             "laptop remote pillow").split()
    places = "table desk shelf bench chair bed counter floor couch stool".split()
    cases = []
    for i in range(120):
        rel = "on" if i % 5 else rng.choice(["under", "next to", "behind"])
        cases.append((f"a {rng.choice(nouns)} {rel} a {rng.choice(places)}", None, rel))
    records = samples(nlp, [(c, c.split()[1], r) for c, _, r in cases])

    def blind(out):
        kept = [r for r in out if "negative" in r]
        acc = (cross_fitted_margins([r["caption"] for r in kept], [r["negative"]["caption"] for r in kept],
                                    NgramEncoder()) > 0).mean()
        return acc, len(kept)

    plain = load_negatives_config(DEFAULT_CONFIG, ["refine.enabled=false"])
    refined = load_negatives_config(DEFAULT_CONFIG, ["refine.min_samples=50", "refine.encoder=ngram"])
    acc_plain, kept_plain = blind(stage_for(nlp, plain).process(records))
    out = stage_for(nlp, refined).process(records)
    acc_refined, kept_refined = blind(out)
    assert acc_plain > 0.75 and kept_plain == 120
    assert acc_refined < min(0.7, acc_plain - 0.1), (acc_plain, acc_refined, kept_refined)
    assert kept_refined >= 0.8 * 120  # refine.min_kept of the samples with a candidate
    detectable = [r for r in out if r.get("drop_reason") == "negative_detectable"]
    assert all(r["drop_detail"].startswith("blind margin ") and r["negative_caption"] for r in detectable)
