"""SugarCrepe evaluation (sapretrain/eval/sugarcrepe.py): reading, metrics by hand, fallback, baselines, models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import PROJECT_ROOT
from sapretrain.eval import sugarcrepe as sc

FIXTURES = PROJECT_ROOT / "tests" / "fixtures"
SUGARCREPE = FIXTURES / "sugarcrepe"
IMAGES = FIXTURES / "coco" / "images"
ANNOTATIONS = FIXTURES / "coco" / "annotations.jsonl"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


@pytest.fixture(scope="module")
def nlp():
    from sapretrain.curation.svo import load_nlp

    return load_nlp()


@pytest.fixture(scope="module")
def prepared(nlp):
    rows = sc.read_sugarcrepe(str(SUGARCREPE))
    return rows, sc.prepare_rows(rows, str(IMAGES), sc.Grounding.from_annotations(str(ANNOTATIONS)), nlp=nlp,
                                 progress=False)


# --------------------------------------------------------------------------------------------
# Reading


def test_reads_the_fixture_rows_by_category():
    rows = sc.read_sugarcrepe([str(SUGARCREPE)])
    assert len(rows) == 14 and all(r["problem"] is None for r in rows)
    assert sc.categories_of(rows) == ["replace_obj", "replace_att", "replace_rel", "swap_att", "add_obj", "add_att"]
    row = next(r for r in rows if r["id"] == "replace_rel:1243")
    assert (row["filename"], row["caption"], row["negative"]) == (
        "000000397133.jpg", "A person standing by a stove in a kitchen.", "A person sitting by a stove in a kitchen.")
    shared = Path("/work/shared/data/sugarcrepe")
    if shared.is_dir():  # the fixture is the shared rows, unchanged
        for path in shared.glob("*.json"):
            assert (SUGARCREPE / path.name).read_bytes() == path.read_bytes()


def test_bad_rows_are_kept_as_unscorable_and_bad_files_are_errors(tmp_path):
    (tmp_path / "swap_obj.json").write_text(json.dumps({
        "1": {"filename": "a.jpg", "caption": "a dog on a couch", "negative_caption": "a couch on a dog"},
        "2": {"filename": "a.jpg", "caption": "a dog"},  # no negative
        "3": "not an object",
        "4": {"filename": "a.jpg", "caption": " ", "negative_caption": "x"}}))
    rows = sc.read_sugarcrepe(str(tmp_path))
    assert [(r["id"], r["problem"]) for r in rows] == [("swap_obj:1", None), ("swap_obj:2", "bad_row"),
                                                       ("swap_obj:3", "bad_row"), ("swap_obj:4", "bad_row")]
    with pytest.raises(ValueError, match="read twice"):
        sc.read_sugarcrepe([str(tmp_path / "swap_obj.json")] * 2)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="not JSON"):
        sc.read_sugarcrepe(str(tmp_path))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected SugarCrepe"):
        sc.read_sugarcrepe(str(tmp_path / "bad.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .json files"):
        sc.read_sugarcrepe(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        sc.read_sugarcrepe(str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------
# Metrics by hand, with an encoder whose scores are set per caption


class ScriptedEncoder:
    """``cos(v, u)`` of caption c is ``full[c]``; the global halves' cosine is ``glob[c]``.

    Records the boxes of every image view and the triplet of every caption it is asked to embed.
    """

    def __init__(self, full: dict[str, float], glob: dict[str, float] | None = None, spans=True, boxes=True):
        self.full, self.glob = full, glob or {}
        self.uses_spans, self.uses_boxes = spans, boxes
        self.batch_size = 3  # several chunks over the constructed rows
        self.views, self.captions = [], []
        from sapretrain.shards.tokens import SpanTokenizer

        self.tokenizer = SpanTokenizer("sa-tiny", 77)

    def images(self, samples, parts=False):
        self.views += [s.boxes for s in samples]
        one = torch.tensor([[1.0, 0.0]]).repeat(len(samples), 1)
        return {"v": one, "image_embed": one}

    def texts(self, samples, parts=False):
        self.captions += [(s.caption, s.triplet) for s in samples]
        u = torch.tensor([[self.full.get(s.caption, 0.0), 0.0] for s in samples])
        g = torch.tensor([[self.glob.get(s.caption, 0.0), 0.0] for s in samples])
        return {"u": u, "text_embed": g}


def triplet_of(caption, subj, rel, obj):
    def part(text):
        start = caption.index(text)
        return {"text": text, "start": start, "end": start + len(text), "head": text.split()[-1]}

    return {"subj": part(subj), "rel": part(rel), "obj": part(obj)}


def item(i, category, pos, neg, filename="a.jpg", problem=None, grounded=(True, True)):
    """A ``prepare_rows`` item for "a cat on a mat"-style captions, boxes per caption as given."""
    caps = {}
    for key, text, has_box in zip(sc.CAPTIONS, (pos, neg), grounded):
        words = text.split()
        t = triplet_of(text, words[1], words[2], words[-1]) if len(words) >= 4 else None
        caps[key] = {"text": text, "triplets": int(t is not None), "triplet": t,
                     "boxes": {"subj": [1, 1, 10, 10], "obj": [20, 20, 40, 40 + i]} if has_box and t else None,
                     "nouns_found": 0.0}
    return {"id": f"{category}:{i}", "category": category, "filename": filename, "caption": pos, "negative": neg,
            "problem": problem, "size": (64, 48), "captions": caps if problem is None else {}}


@pytest.fixture
def images_root(tmp_path):
    Image.new("RGB", (64, 48), (120, 40, 40)).save(tmp_path / "a.jpg")
    return str(tmp_path)


def test_accuracy_per_category_micro_and_macro_by_hand(images_root):
    items = [
        item(0, "swap_obj", "a cat on mat", "a mat on cat"),  # 0.9 > 0.1: correct
        item(1, "swap_obj", "a dog by sofa", "a sofa by dog"),  # 0.8 > 0.3: correct
        item(2, "swap_obj", "a cup in box", "a box in cup"),  # 0.5 = 0.5: a tie, 1/2
        item(3, "swap_obj", "a hat on man", "a man on hat"),  # 0.2 < 0.7: wrong
        item(4, "add_obj", "a pen near book", "a pen near book and lamp"),  # 0.6 > 0.4: correct
        item(5, "add_obj", "a car by tree", "a car by tree and dog", filename="missing.jpg", problem="missing_image"),
    ]
    full = {"a cat on mat": .9, "a mat on cat": .1, "a dog by sofa": .8, "a sofa by dog": .3, "a cup in box": .5,
            "a box in cup": .5, "a hat on man": .2, "a man on hat": .7, "a pen near book": .6,
            "a pen near book and lamp": .4}
    encoder = ScriptedEncoder(full)
    result = sc.evaluate_sugarcrepe(encoder, items, images_root, progress=False)
    assert result["per_category"]["swap_obj"] == {"n": 4, "correct": 2.5, "accuracy": 0.625, "unscorable": 0, "ties": 1}
    assert result["per_category"]["add_obj"] == {"n": 2, "correct": 1.0, "accuracy": 0.5, "unscorable": 1, "ties": 0}
    assert result["accuracy"] == pytest.approx(3.5 / 6)  # micro: over all 6 rows
    assert result["macro_accuracy"] == pytest.approx((0.625 + 0.5) / 2)
    assert result["unscorable"] == {"missing_image": 1} and result["scored"] == 5
    assert result["unscorable_rows"] == [{"id": "add_obj:5", "category": "add_obj", "reason": "missing_image"}]
    assert [p["id"] for p in result["predictions"]] == [i["id"] for i in items]  # input order
    assert result["modes"] == {"full": 5} and result["fallback"] == {}
    # Each caption was embedded with its own triplet, and each view carried that caption's boxes.
    assert all(t is not None and cap[t["rel"]["start"]:t["rel"]["end"]] == cap.split()[2]
               for cap, t in encoder.captions)
    assert [b["obj"][3] for b in encoder.views] == [40 + i for i in range(5) for _ in (0, 1)]


def test_rows_without_triplet_or_boxes_fall_back_to_the_global_halves_or_count_wrong(images_root):
    items = [
        item(0, "swap_obj", "a cat on mat", "a mat on cat"),  # full: 0.9 > 0.1
        item(1, "swap_obj", "a dog by sofa", "a sofa by dog", grounded=(True, False)),  # no_box: global 0.2 < 0.6
        item(2, "replace_rel", "a cup in box", "cup", grounded=(True, True)),  # no_triplet: global 0.7 > 0.1
    ]
    full = {"a cat on mat": .9, "a mat on cat": .1, "a dog by sofa": .9, "a sofa by dog": .0, "a cup in box": .0}
    glob = {"a dog by sofa": .2, "a sofa by dog": .6, "a cup in box": .7, "cup": .1}
    encoder = ScriptedEncoder(full, glob)
    result = sc.evaluate_sugarcrepe(encoder, items, images_root, progress=False)
    assert result["modes"] == {"full": 1, "global": 2}
    assert result["fallback"] == {"no_box": 1, "no_triplet": 1}
    assert result["correct"] == 2.0 and result["accuracy"] == pytest.approx(2 / 3)
    whole = [0.0, 0.0, 64.0, 48.0]
    assert encoder.views[2:] == [{"subj": whole, "obj": whole}] * 2  # one whole-frame view per fallback row
    assert [t["rel"] for _, t in encoder.captions[2:]] == [{"start": 0, "end": len(c)} for c, _ in encoder.captions[2:]]

    strict = sc.evaluate_sugarcrepe(ScriptedEncoder(full, glob), items, images_root, fallback="wrong", progress=False)
    assert strict["correct"] == 1.0 and strict["unscorable"] == {"no_box": 1, "no_triplet": 1}
    with pytest.raises(ValueError, match="fallback"):
        sc.evaluate_sugarcrepe(encoder, items, images_root, fallback="maybe", progress=False)

    # A plain CLIP needs neither: every row is scored by its own cosine, one view per row.
    plain = ScriptedEncoder(full, glob, spans=False, boxes=False)
    result = sc.evaluate_sugarcrepe(plain, items, images_root, progress=False)
    assert result["modes"] == {"full": 3} and result["correct"] == 2.5  # 0.9 > 0.1, 0.9 > 0.0, a tie 0.0 = 0.0
    assert plain.views == [None] * 3


# --------------------------------------------------------------------------------------------
# Preparation and models on the fixture photos


def test_fixture_triplets_and_ground_truth_boxes(prepared):
    rows, items = prepared
    by_id = {i["id"]: i for i in items}
    standing = by_id["replace_rel:1243"]["captions"]
    for key, rel in (("pos", "standing by"), ("neg", "sitting by")):
        t = standing[key]["triplet"]
        assert (t["subj"]["text"], t["rel"]["text"], t["obj"]["text"]) == ("person", rel, "stove")
        assert standing[key]["boxes"] is not None  # person and oven (stove is a synonym) are annotated
    record = next(json.loads(line) for line in ANNOTATIONS.read_text().splitlines() if "000000397133" in line)
    people = [o["bbox_xywh"] for o in record["objects"] if o["category"] == "person"]
    x, y, w, h = max(people, key=lambda b: b[2] * b[3])
    assert standing["pos"]["boxes"]["subj"] == pytest.approx([x, y, x + w, y + h], abs=0.01)  # the largest person
    # "Three rows of luggage of various color and size." has no relation between two things.
    assert by_id["replace_att:587"]["captions"]["pos"]["triplet"] is None
    assert all(i["problem"] is None and i["size"] for i in items)


def test_models_score_through_the_encoder_exactly(prepared):
    from sapretrain.eval.encode import Encoder, EvalSample, load_model
    from sapretrain.model import SAClipConfig, build_saclip

    rows, items = prepared
    torch.manual_seed(0)
    sa = Encoder(build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False)).eval())
    result = sc.evaluate_sugarcrepe(sa, items, str(IMAGES), progress=False)
    grounded = [i for i in items if all(i["captions"][k]["boxes"] for k in sc.CAPTIONS)]
    assert result["modes"]["full"] == len(grounded) >= 1 and result["scored"] == 14
    assert sum(result["fallback"].values()) == 14 - len(grounded)
    row = next(p for p in result["predictions"] if p["id"] == "replace_rel:1243")
    image = Image.open(IMAGES / "000000397133.jpg").convert("RGB")
    caps = next(i for i in items if i["id"] == "replace_rel:1243")["captions"]
    for key in sc.CAPTIONS:  # u . v with that caption's own spans and boxes
        v = sa.images([EvalSample(image=image, boxes=caps[key]["boxes"])])
        u = sa.texts([EvalSample(caption=caps[key]["text"], triplet=caps[key]["triplet"])])
        assert row[key] == pytest.approx(float(v[0] @ u[0]), abs=1e-5)

    clip = Encoder(load_model("openclip:sa-tiny")[0])
    result = sc.evaluate_sugarcrepe(clip, items, str(IMAGES), progress=False)
    assert result["modes"] == {"full": 14} and not result["fallback"]
    row = next(p for p in result["predictions"] if p["id"] == "swap_att:146")
    v = clip.images([EvalSample(image=Image.open(IMAGES / "000000255165.jpg").convert("RGB"))])
    u = clip.texts([EvalSample(caption="A computer desk with a monitor and two laptops.")])
    assert row["neg"] == pytest.approx(float(v[0] @ u[0]), abs=1e-5)


# --------------------------------------------------------------------------------------------
# Baselines


def test_shorter_caption_baseline_on_the_fixture_by_hand():
    rows = sc.read_sugarcrepe(str(SUGARCREPE))
    result = sc.score_text_baseline(rows, sc.shorter_caption)
    # Word counts (caption vs negative), counted by hand: add_* negatives add words (2 x 2 correct);
    # replace_att 12/12, 9/9, 8/8 (ties); replace_obj 12/12 tie, 11 vs 10 wrong; replace_rel 8 vs 11,
    # 11 vs 15 correct, 9/9 tie; swap_att 9/9, 9/9 ties.
    expected = {"add_att": 1.0, "add_obj": 1.0, "replace_att": 0.5, "replace_obj": 0.25,
                "replace_rel": 2.5 / 3, "swap_att": 0.5}
    assert {c: r["accuracy"] for c, r in result["per_category"].items()} == pytest.approx(expected)
    assert result["accuracy"] == pytest.approx(9.5 / 14)
    assert result["macro_accuracy"] == pytest.approx(sum(expected.values()) / 6)
    assert result["ties"] == 7


def test_bigram_lm_by_hand():
    lm = sc.BigramLM.fit(["a cat", "A dog."], lam=0.8)
    # Unigram counts over words and </s>: a 2, cat 1, dog 1, </s> 2; total 6, vocabulary 4 + unknown.
    uni = {"a": 3 / 11, "cat": 2 / 11, "dog": 2 / 11, "</s>": 3 / 11, "bird": 1 / 11}
    expected = (math.log(0.8 * 1 + 0.2 * uni["a"]) + math.log(0.8 * 0.5 + 0.2 * uni["cat"])
                + math.log(0.8 * 1 + 0.2 * uni["</s>"]))
    assert lm.score("a cat") == pytest.approx(expected)
    # An unseen context falls back to the unigram model; an unseen word gets the unknown mass.
    assert lm.score("bird") == pytest.approx(math.log(0.2 * uni["bird"]) + math.log(uni["</s>"]))
    assert lm.score("a cat") > lm.score("a cat cat")
    with pytest.raises(ValueError):
        sc.BigramLM.fit([])


def test_lm_corpus_leaves_out_the_evaluated_images_and_texts(tmp_path):
    rows = sc.read_sugarcrepe(str(SUGARCREPE))
    corpus = tmp_path / "captions.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image_id": 397133, "file_name": "000000397133.jpg", "caption": "A man is in a kitchen making pizzas."},
        {"image_id": 1, "file_name": "000000000001.jpg", "caption": "a person sitting by a stove in a kitchen"},
        {"image_id": 2, "file_name": "000000000002.jpg", "caption": "A dog on a couch."},
        {"image_id": 475678, "caption": "Rows of luggage."}]))
    pairs = sc.read_caption_corpus(str(corpus))
    kept, counts = sc.held_out_corpus(pairs, rows)
    assert kept == ["A dog on a couch."]
    assert counts == {"captions": 4, "dropped_evaluated_image": 2, "dropped_evaluated_text": 1, "kept": 1}
    coco = tmp_path / "captions_val.json"
    coco.write_text(json.dumps({"images": [{"id": 5, "file_name": "000000000005.jpg"}],
                                "annotations": [{"image_id": 5, "caption": "a bird"}]}))
    assert sc.read_caption_corpus(str(coco)) == [("a bird", "000000000005.jpg")]
    corpus.write_text('{"caption": "ok"}\n{"image": "x"}\n')
    with pytest.raises(ValueError, match="line 2: no caption"):
        sc.read_caption_corpus(str(corpus))


# --------------------------------------------------------------------------------------------
# The tool


def load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_tool", PROJECT_ROOT / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_evaluate_tool_writes_one_table_and_fails_when_nothing_is_scored(tmp_path, capsys):
    from sapretrain.model import SAClipConfig, build_saclip, save_saclip

    save_saclip(build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False)), str(tmp_path / "sa.pt"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"file_name": f"{i:012d}.jpg", "caption": c}) + "\n" for i, c in enumerate(
        ["A pile of luggage sitting on a floor.", "A man standing in a kitchen.", "Suitcases at an airport."], 1)))
    args = ["--task", "sugarcrepe", "--checkpoint", f"SA={tmp_path / 'sa.pt'}", "--checkpoint", "CLIP=openclip:sa-tiny",
            "--sugarcrepe", str(SUGARCREPE), "--images", str(IMAGES), "--instances", str(ANNOTATIONS),
            "--lm-corpus", str(corpus), "--output", str(tmp_path / "out"), "--no-progress"]
    tool = load_tool()
    assert tool.main(args) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(report["models"]) == {"SA", "CLIP"}
    assert set(report["baselines"]) == {"text: shorter caption", "text: bigram LM", "image: nouns found"}
    assert report["lm_corpus"] == {"captions": 3, "kept": 3}
    for r in [*report["models"].values(), *report["baselines"].values()]:
        assert r["n"] == 14 and sum(c["n"] for c in r["per_category"].values()) == 14
    table = (tmp_path / "out" / "results.md").read_text()
    for label in ("| SA |", "| CLIP |", "| text: bigram LM |", "| image: nouns found |", "macro", "micro"):
        assert label in table
    assert "SA: scored by the global halves" in table and table in capsys.readouterr().out
    assert len((tmp_path / "out" / "predictions-CLIP.jsonl").read_text().splitlines()) == 14

    empty = tmp_path / "no_images"
    empty.mkdir()
    args = ["--task", "sugarcrepe", "--checkpoint", "CLIP=openclip:sa-tiny", "--sugarcrepe", str(SUGARCREPE),
            "--images", str(empty), "--output", str(tmp_path / "out2"), "--no-progress"]
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    assert "no model scored any of the 14 rows" in err and "missing_image" in err
    report = json.loads((tmp_path / "out2" / "results.json").read_text())  # written before failing
    assert report["models"]["CLIP"]["unscorable"] == {"missing_image": 14}
    assert report["baselines"]["text: shorter caption"]["scored"] == 14  # text needs no image
    no_images = [a for a in args if a not in ("--images", str(empty))]
    assert tool.main(no_images) == 2
    assert "--task sugarcrepe needs --images" in capsys.readouterr().err


def test_detector_boxes_are_clipped_and_matched_like_ground_truth(nlp, tmp_path):
    calls = []

    def detector(images):  # what curation.rois.YoloDetector returns: per image [{"name", "box", "score"}]
        calls.append(len(images))
        return [[{"name": "person", "box": [-5.0, 10.0, 200.0, 400.0], "score": 0.9},
                 {"name": "oven", "box": [300.0, 50.0, 9000.0, 300.0], "score": 0.8},
                 {"name": "cup", "box": [5.0, 5.0, 6.0, 6.0], "score": 0.7}]  # under min_box_size
                for _ in images]

    rows = [r for r in sc.read_sugarcrepe(str(SUGARCREPE)) if r["filename"] == "000000397133.jpg"]
    items = sc.prepare_rows(rows, str(IMAGES), sc.Grounding("detector", detector=detector), nlp=nlp,
                            chunk_size=2, progress=False)
    assert calls == [1, 1]  # once per image per chunk: 3 rows of one photo in chunks of 2
    width = Image.open(IMAGES / "000000397133.jpg").width
    standing = next(i for i in items if i["id"] == "replace_rel:1243")["captions"]["pos"]
    assert standing["boxes"] == {"subj": [0.0, 10.0, 200.0, 400.0], "obj": [300.0, 50.0, float(width), 300.0]}
    pizzas = next(i for i in items if i["id"] == "replace_rel:46")["captions"]["pos"]
    assert pizzas["boxes"] is None and pizzas["nouns_found"] == pytest.approx(1 / 3)  # man; not kitchen, pizzas


def test_spans_past_the_context_length_fall_back(images_root):
    from sapretrain.shards.tokens import SpanTokenizer

    long_pos = "a cat and " + "very " * 10 + "on mat"
    items = [item(0, "swap_obj", "a cat on mat", "a mat on cat")]
    items[0]["captions"]["pos"].update(text=long_pos, triplet=triplet_of(long_pos, "cat", "on", "mat"))
    encoder = ScriptedEncoder({long_pos: .9, "a mat on cat": .1}, {long_pos: .2, "a mat on cat": .4})
    encoder.tokenizer = SpanTokenizer("sa-tiny", 8)  # "on mat" lies past 8 tokens
    result = sc.evaluate_sugarcrepe(encoder, items, images_root, progress=False)
    assert result["fallback"] == {"span_beyond_context": 1} and result["correct"] == 0.0  # global 0.2 < 0.4
