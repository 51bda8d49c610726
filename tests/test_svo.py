"""SVO extraction: one case per construction, spans, bad input, resume after SIGKILL, parts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapretrain.curation.extract import ExtractConfig, caption_problem, extract_file, process_lines
from sapretrain.jobs import Parts
from sapretrain.curation.svo import extract_triplets, load_nlp, triplets_to_manifest_fields

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nlp():
    return load_nlp()


def heads(nlp, caption):
    return {(t["subj"]["head"], t["rel"]["lemma"], t["obj"]["head"]) for t in extract_triplets(nlp(caption))}


# (construction, caption, expected (subject head, relation lemma, object head))
CONSTRUCTIONS = [
    ("verb + direct object", "a man riding a horse", ("man", "ride", "horse")),
    ("verb + preposition", "a dog sleeping on a couch", ("dog", "sleep on", "couch")),
    ("copular preposition", "the cat is on the bed", ("cat", "on", "bed")),
    ("multi-word: in front of", "a black motorcycle parked in front of a garage", ("motorcycle", "park in front of", "garage")),
    ("multi-word: on top of", "a cup on top of a table", ("cup", "on top of", "table")),
    ("multi-word: next to", "the dog is next to the laptop", ("dog", "next to", "laptop")),
    ("multi-word: to the left of", "a lamp to the left of the bed", ("lamp", "to the left of", "bed")),
    ("multi-word: at the right side of", "The chair is at the right side of the laptop.", ("chair", "at the right side of", "laptop")),
    ("multi-word: in the middle of", "The dog is in the middle of the chair.", ("dog", "in the middle of", "chair")),
    ("multi-word: out of", "The dog is out of the chair.", ("dog", "out of", "chair")),
    ("multi-word: far away from", "The dog is far away from the horse.", ("dog", "far away from", "horse")),
    ("relative clause", "a woman who is holding an umbrella", ("woman", "hold", "umbrella")),
    ("participial clause", "a man holding a kite", ("man", "hold", "kite")),
    ("passive with agent", "a horse ridden by a man", ("man", "ride", "horse")),
    ("passive without agent", "five boats tied to a dock", ("boat", "tie to", "dock")),
    ("coordinated subjects", "a man and a woman riding horses", ("woman", "ride", "horse")),
    ("coordinated subjects (first)", "a man and a woman riding horses", ("man", "ride", "horse")),
    ("coordinated objects", "a boy holding a bat and a ball", ("boy", "hold", "ball")),
    ("coordinated verbs", "a man sitting on a bench and reading a book", ("man", "read", "book")),
    ("there is", "there is a cat on the bed", ("cat", "on", "bed")),
    ("compound noun", "a train on the train track", ("train", "on", "track")),
    ("phrasal verb", "a man picking up a ball", ("man", "pick up", "ball")),
    ("collective noun", "a bunch of birds swimming in the water", ("bird", "swim in", "water")),
    ("stranded preposition", "the sidewalk that the people are walking on", ("people", "walk on", "sidewalk")),
    ("with ... in it", "a lake with cows in it", ("cow", "in", "lake")),
    ("possessive", "the player 's socks are green", ("player", "have", "sock")),
]


@pytest.mark.parametrize("caption,expected", [c[1:] for c in CONSTRUCTIONS], ids=[c[0] for c in CONSTRUCTIONS])
def test_construction(nlp, caption, expected):
    assert expected in heads(nlp, caption)


def test_compound_span_and_kinds(nlp):
    (t,) = extract_triplets(nlp("a train on the train track"))
    assert t["obj"]["text"] == "train track" and t["obj"]["head"] == "track"
    assert t["rel"]["kind"] == "spatial"
    kinds = {t["rel"]["lemma"]: t["rel"]["kind"] for c in ("a man riding a horse", "a dog sleeping on a couch") for t in extract_triplets(nlp(c))}
    assert kinds == {"ride": "action", "sleep on": "spatial"}  # posture verb + spatial preposition


def test_attribute_copula_is_not_a_relation(nlp):
    assert extract_triplets(nlp("the cat is black")) == []


def test_spans_match_caption(nlp):
    captions = [
        "A black Honda motorcycle parked in front of a garage.",
        "The laptop is at the left side of the dog.",
        "two dogs playing with a frisbee next to a wooden fence",
        "a horse ridden by a man on the beach",
        "A woman who is holding an umbrella walks past a red bus.",
        "man in a white shirt holding a tennis racket",
    ]
    n = 0
    for caption in captions:
        for t in extract_triplets(nlp(caption)):
            for part in ("subj", "rel", "obj"):
                span = t[part]
                assert caption[span["start"] : span["end"]] == span["text"] and span["text"]
                assert not span["text"].lower().startswith(("a ", "an ", "the ", "is "))
            assert t["rel"]["kind"] in ("spatial", "action")
            n += 1
    assert n >= len(captions)


def test_manifest_fields(nlp):
    caption = "a large red cube is behind a small blue sphere"
    record = {"caption": caption, "id": "x"}
    (t,) = extract_triplets(nlp(caption))
    fields = triplets_to_manifest_fields(record, t)
    assert fields["triplet"] == {
        "subj": {"text": "large red cube", "start": 2, "end": 16},
        "rel": {"text": "behind", "start": 20, "end": 26, "kind": "spatial"},
        "obj": {"text": "small blue sphere", "start": 29, "end": 46},
    }
    assert fields["caption"] == caption and fields["relation"] == "behind"
    bad = json.loads(json.dumps(t))
    bad["subj"]["start"] += 1
    with pytest.raises(ValueError):
        triplets_to_manifest_fields(record, bad)


def test_bad_captions_are_counted_not_fatal(nlp):
    assert caption_problem(None) == "missing"
    assert caption_problem(7) == "not_text"
    assert caption_problem("   ") == "empty"
    assert caption_problem("a dog " * 300) == "too_long"
    assert caption_problem("a dog\x00\x01 on a mat") == "binary"
    assert caption_problem("一只狗在沙发上睡觉") == "non_english"
    assert caption_problem("un chien noir dort sur le canapé rouge") == "non_english"
    assert caption_problem("large cathedral under a partly cloudy sky") is None
    lines = [
        json.dumps({"caption": "a cat on a mat", "id": 1}),
        json.dumps({"id": 2}),
        json.dumps({"caption": ["list"], "id": 3}),
        "{not json",
        json.dumps(["not", "an", "object"]),
        json.dumps({"caption": "x" * 5000, "id": 6}),
    ]
    out = [json.loads(line) for line in process_lines(nlp, lines).splitlines()]
    assert len(out) == len(lines)
    assert out[0]["id"] == 1 and out[0]["triplets"] and "skip_reason" not in out[0]
    assert [o.get("skip_reason") for o in out[1:]] == ["missing", "not_text", "bad_json", "bad_json", "too_long"]
    assert all(o["triplets"] == [] for o in out[1:])


# --------------------------------------------------------------------------- the runner

SUBJECTS = ["man", "woman", "dog", "cat", "boy", "girl", "horse", "bird"]
RELATIONS = ["sitting on", "standing next to", "holding", "is under", "riding", "lying in front of"]
OBJECTS = ["bench", "table", "car", "couch", "surfboard", "fence", "bed"]


def write_captions(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            s, r, o = SUBJECTS[i % 8], RELATIONS[(i // 8) % 6], OBJECTS[(i // 48) % 7]
            f.write(json.dumps({"id": i, "caption": f"a {s} {r} a {o}"}) + "\n")
            if i % 97 == 0:
                f.write(json.dumps({"id": f"bad{i}", "caption": ""}) + "\n")
    return path


def run_cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    cmd = [sys.executable, str(PROJECT_ROOT / "tools" / "extract_svo.py"), "--no-progress", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_resume_after_kill_is_identical(tmp_path):
    src = write_captions(tmp_path / "in.jsonl", 2000)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    extract_file(str(src), str(ref), ExtractConfig(chunk_size=100), progress=False)

    proc = run_cli(["--input", str(src), "--output", str(out), "--chunk-size", "100"])
    first = Path(f"{out}.chunks") / "00000000.jsonl"
    deadline = time.time() + 40
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    committed = len(list(Path(f"{out}.chunks").glob("*.jsonl")))
    assert 1 <= committed < 21

    proc = run_cli(["--input", str(src), "--output", str(out), "--chunk-size", "100"])
    log = proc.communicate()[0].decode()
    assert proc.returncode == 0, log
    assert out.read_bytes() == ref.read_bytes()
    assert not Path(f"{out}.chunks").exists()
    assert "captions read      2021" in log and "empty=21" in log
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["captions"] == 2021 and summary["skipped"] == {"empty": 21}


def test_parts_and_workers(tmp_path):
    src = write_captions(tmp_path / "in.jsonl", 400)
    full = tmp_path / "full.jsonl"
    extract_file(str(src), str(full), ExtractConfig(chunk_size=50), progress=False)
    lines = []
    for part in range(3):
        extract_file(str(src), str(tmp_path / "p.jsonl"), ExtractConfig(chunk_size=50), Parts(part, 3), progress=False)
        name = Parts(part, 3).output(str(tmp_path / "p.jsonl"))
        assert name.endswith(f"p-part{part:05d}-of00003.jsonl")
        lines += Path(name).read_text().splitlines()
    assert lines == full.read_text().splitlines()  # contiguous shares: the parts in order are the whole

    two = tmp_path / "two.jsonl"
    extract_file(str(src), str(two), ExtractConfig(chunk_size=50, workers=2), progress=False)
    assert two.read_bytes() == full.read_bytes()

    with pytest.raises(ValueError):
        extract_file(str(src), str(full), ExtractConfig(), Parts(3, 3), progress=False)


def test_chunk_size_change_is_refused(tmp_path):
    src = write_captions(tmp_path / "in.jsonl", 10)
    out = tmp_path / "o.jsonl"
    (tmp_path / "crash").mkdir()
    first = extract_file(str(src), str(tmp_path / "crash" / "o.jsonl"), ExtractConfig(chunk_size=5), progress=False)
    Path(f"{out}.chunks").mkdir()  # a run with chunk size 5 that stopped before its first chunk
    Path(f"{out}.chunks/config.json").write_text(json.dumps(
        {"chunk_size": 5, **first["made_from"]}, sort_keys=True))
    with pytest.raises(ValueError, match="chunk_size"):
        extract_file(str(src), str(out), ExtractConfig(chunk_size=7), progress=False)
