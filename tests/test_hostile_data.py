"""Hostile data never crashes a tool or a run: it is skipped and counted by reason (issue 13).

Each test writes its hostile input itself: manifest lines (not objects, not UTF-8, lone
surrogates, absurd numbers and nesting, ids and spans of the wrong type), images (an extreme
aspect strip, 16-bit greyscale, EXIF rotation, a device, a FIFO), shard side-cars corrupted the
way a flipped bit or a careless writer would, and garbage sizes.json / summary.json.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import open_clip
import pytest
from PIL import Image

from conftest import make_image, sample_line
from sapretrain import jsonl
from sapretrain.curation.stage import parse_lines
from sapretrain.data.loader import LoaderConfig, build_loader
from sapretrain.shards.manifest import SkipLog, read_manifest
from sapretrain.shards import schema
from sapretrain.shards.check import check_shards
from sapretrain.shards.process import read_image_bytes, to_rgb
from sapretrain.shards.writer import ShardConfig, make_shards, write_shard

CFG = ShardConfig(image_size=64, roi_size=32, shard_size=4)
DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "1" + "0" * 399  # a 400-digit number


def within(seconds: float, fn):
    """Run ``fn`` in a thread; fail instead of hanging (a FIFO read would block forever)."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def write_lines(path: Path, lines: list) -> Path:
    """Lines as given: dicts as JSON, str as text, bytes verbatim (for non-UTF-8 input)."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path


# ---------------------------------------------------------------- the one JSONL reader


HOSTILE_LINES = {
    "array": ("[1, 2, 3]", "bad_json"),
    "null": ("null", "bad_json"),
    "number": ("42", "bad_json"),
    "syntax": ('{"id": "x", ', "bad_json"),
    "not_utf8": (b'{"id": "x", "caption": "caf\xe9 \xff"}', "bad_encoding"),
    "lone_surrogate": ('{"id": "x", "caption": "\\ud800"}', "bad_encoding"),
    "huge_int": ('{"id": "x", "boxes": {"subj": [0, 0, ' + HUGE + ", 5]}}", "bad_number"),
    "inf_float": ('{"id": "x", "w": 1e400}', "bad_number"),
    "nan": ('{"id": "x", "w": NaN}', "bad_number"),
    "deep": ('{"id": "x", "boxes": ' + DEEP + "}", "too_deep"),
    "deep_but_parsable": ('{"id": "x", "m": ' + "[" * 500 + "]" * 500 + "}", "too_deep"),
}


def test_jsonl_reader_counts_each_bad_line_and_keeps_the_good_ones(tmp_path):
    good = [{"id": f"g{i}", "caption": "a dog \U0001f436", "n": 2**63} for i in range(3)]
    lines = [good[0], *[line for line, _ in HOSTILE_LINES.values()], good[1], "", "   ", good[2]]
    path = write_lines(tmp_path / "x.jsonl", lines)
    skips = SkipLog()
    records = list(jsonl.read_records(str(path), skips))
    assert [r for _, r in records] == good  # a valid surrogate pair (emoji) and a uint64 pass
    assert [n for n, _ in records] == [1, len(HOSTILE_LINES) + 2, len(HOSTILE_LINES) + 5]
    assert skips.counts == Counter(reason for _, reason in HOSTILE_LINES.values())
    assert all(skips.examples[reason] for reason in skips.counts)


def test_jsonl_reader_steps_over_an_overlong_line_without_holding_it(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"id": "a"}, '{"id": "' + "x" * 5000 + '"}', {"id": "b"}])
    skips = SkipLog()
    with open(path, "rb") as f:
        got = [(n, line if isinstance(line, bytes) else line.reason) for n, line in jsonl.iter_raw_lines(f, 1000)]
    assert got == [(1, b'{"id": "a"}\n'), (2, "line_too_long"), (3, b'{"id": "b"}\n')]
    assert [r["id"] for _, r in jsonl.read_records(str(path), skips, max_line_bytes=1000)] == ["a", "b"]
    assert skips.counts == {"line_too_long": 1}


def test_stage_lines_count_the_readers_reasons_and_stay_writable(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [{"id": 1}, *[line for line, _ in HOSTILE_LINES.values()]])
    from sapretrain.jobs import iter_chunks, plan_segments

    (chunk, lines), = list(iter_chunks(plan_segments([str(path)]), 100))
    records, bad = parse_lines(lines)
    assert records == [{"id": 1}]
    assert Counter(b["drop_reason"] for b in bad) == Counter(reason for _, reason in HOSTILE_LINES.values())
    # The drop records are written back as UTF-8 JSON: the excerpts of bad bytes must survive it.
    json.dumps(bad, ensure_ascii=False).encode("utf-8")


def test_jsonl_source_counts_hostile_lines(tmp_path):
    from sapretrain.curation.sources import read_jsonl

    path = write_lines(tmp_path / "pairs.jsonl", [{"caption": "a dog on a mat", "image": "a.jpg"},
                                                  *[line for line, _ in HOSTILE_LINES.values()]])
    skips = SkipLog()
    records = list(read_jsonl(str(path), skips=skips))
    assert [r["caption"] for r in records] == ["a dog on a mat"]
    assert skips.counts == Counter(reason for _, reason in HOSTILE_LINES.values())


# ---------------------------------------------------------------- make_shards on a hostile manifest


def _png16(path: Path, size=(96, 72)) -> np.ndarray:
    """A 16-bit greyscale PNG (mode I;16): a horizontal ramp over the full 0..65535 range."""
    ramp = np.linspace(0, 65535, size[0]).astype(np.uint16)
    pixels = np.tile(ramp, (size[1], 1))
    Image.fromarray(pixels).save(path, format="PNG")
    return pixels


def test_make_shards_skips_hostile_samples_and_keeps_the_good_ones(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    size, subj, obj = (96, 72), (5, 5, 40, 50), (50, 10, 90, 60)
    for i in range(4):
        make_image(images / f"{i}.jpg", size=size, subj=subj, obj=obj, seed=i)

    def line(i, image, partner=0, **changes):
        out = sample_line(i, image, partner, size=size, subj_box=subj, obj_box=obj)
        out.update(changes)
        return out

    good = [line(i, f"images/{i}.jpg", i ^ 1) for i in range(4)]
    Image.new("RGB", (1000, 3), (200, 10, 10)).save(images / "strip.png")
    _png16(images / "grey16.png")
    Image.fromarray(np.full((72, 96), 0.5, np.float32)).save(images / "float.tif")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    Image.open(images / "0.jpg").save(images / "rotated.jpg", exif=exif)
    os.mkfifo(images / "fifo.jpg")
    span_bool = line(13, "images/0.jpg")
    span_bool["triplet"]["subj"]["start"] = False  # JSON false is Python 0: still not an offset
    lines = [
        *good,
        "[1, 2, 3]", "null", "42",
        b'{"id": "s0010", "caption": "a red box \xff is left of a blue box"}',
        json.dumps(line(11, "images/0.jpg"))[:-1] + ', "caption": "\\ud800 a red box"}',  # last key wins
        json.dumps(line(12, "images/0.jpg")).replace('"subj": [5, 5, 40, 50]', '"subj": [5, 5, ' + HUGE + ", 50]"),
        '{"id": "s0014", "boxes": ' + DEEP + "}",
        span_bool,
        line(15, "images/0.jpg", id="s0015\n"),  # the id pattern must not accept a trailing newline
        line(16, "images/0.jpg", width=True),
        line(20, "images/strip.png", size=(1000, 3), width=1000, height=3,
             boxes={"subj": [0, 0, 100, 3], "obj": [500, 0, 700, 3]}),
        line(21, "images/grey16.png", 2),
        line(22, "images/rotated.jpg"),
        line(23, "/dev/zero"),
        line(24, "images/fifo.jpg"),
        line(25, "images/float.tif"),
    ]
    manifest = write_lines(tmp_path / "m.jsonl", lines)
    out = tmp_path / "out"
    # The default stored size (224 px shorter side): the 1000x3 strip would be 74,667 px long.
    cfg = ShardConfig(roi_size=32, shard_size=4)
    report = within(120, lambda: make_shards(str(manifest), str(out), cfg, progress=False))
    assert report.summary["skipped"]["counts"] == {
        "bad_json": 3,
        "bad_encoding": 2,  # the non-UTF-8 line and the lone surrogate caption
        "bad_number": 1,
        "too_deep": 1,
        "bad_span": 1,
        "bad_id": 1,
        "bad_size": 1,
        "extreme_aspect": 1,
        "exif_rotated": 1,
        "unreadable_image": 2,  # /dev/zero and the FIFO: not regular files
        "unsupported_mode": 1,
    }
    assert report.summary["records"] == 3  # (s0000, s0001), (s0002, s0003), (s0021 16-bit, s0002)
    assert not list(out.rglob("*.tmp.*"))
    checked = check_shards(str(out))
    assert checked.ok, checked.problems
    with tarfile.open(out / "shard-000000.tar") as tar:
        grey = np.asarray(Image.open(io.BytesIO(tar.extractfile("s0021.a.jpg").read())).convert("L"), float)
    # The ramp survives (dark left, bright right), not clipped to white as PIL's convert("RGB") does.
    assert grey[:, :5].mean() < 40 and grey[:, -5:].mean() > 215 and 100 < grey.mean() < 155


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    pixels = _png16(tmp_path / "g.png")
    image = Image.open(tmp_path / "g.png")
    assert image.mode in ("I;16", "I")
    rgb = np.asarray(to_rgb(image, "g.png"))
    assert rgb.shape == (72, 96, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[..., 0].astype(int) - np.round(pixels / 257)).max() <= 1
    assert np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).mean() > 250  # what PIL alone does


def test_image_reads_are_bounded_and_only_regular_files(tmp_path):
    from sapretrain.shards.schema import BadSample

    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * 5000)
    os.mkfifo(tmp_path / "fifo.jpg")
    cases = {"/dev/zero": "unreadable_image", str(tmp_path / "fifo.jpg"): "unreadable_image",
             str(big): "image_too_large", str(tmp_path / "nope.jpg"): "missing_image",
             str(tmp_path): "missing_image", "a\0b.jpg": "missing_image"}
    for ref, reason in cases.items():
        with pytest.raises(BadSample) as e:
            within(10, lambda: read_image_bytes(ref, max_bytes=4096))
        assert e.value.reason == reason, ref
    assert read_image_bytes(str(big), max_bytes=5000) == b"\0" * 5000


def test_a_failed_shard_write_leaves_no_temporary(small_manifest, tmp_path, monkeypatch):
    import sapretrain.shards.writer as writer

    def full_disk(tar, name, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "add_file", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space"):
        make_shards(str(small_manifest), str(out), CFG, progress=False)
    assert not list(out.rglob("*.tmp.*")) and not list(out.glob("*.tar"))


def test_a_lone_surrogate_reaching_the_writer_costs_only_its_record(small_manifest, tmp_path):
    skips = SkipLog()
    samples = {s["id"]: s for s in read_manifest(str(small_manifest), skips)}
    bad = copy.deepcopy(samples["s0000"])
    bad["caption"] = bad["caption"].replace("a red", "\ud800 red")  # same length: spans still valid
    stats = write_shard(str(tmp_path), CFG, 0, [(bad, samples["s0001"]), (samples["s0002"], samples["s0003"])])
    assert stats["records"] == 1 and sum(stats["skipped"]["counts"].values()) == 1
    assert set(stats["skipped"]["counts"]) <= {"bad_caption", "bad_encoding"}
    assert not list(tmp_path.rglob("*.tmp.*"))


# ---------------------------------------------------------------- corrupt side-cars


def _flip_token(m):
    m["a"]["tokens"][1] = 59406  # 49406 with one bit flipped: past the 49408-row embedding


def _set(path, value):
    def mutate(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return mutate


SIDECAR_CORRUPTIONS = {
    "token_bit_flip": _flip_token,
    "negative_token": _set(("a", "negative", "tokens", 1), -3),
    "bool_token": _set(("p", "tokens", 1), True),
    "tokens_string": _set(("a", "tokens"), "49406 320 49407"),
    "no_eot": _set(("a", "tokens", -1), 320),
    "box_three_numbers": _set(("a", "boxes", "subj"), [0.1, 0.2, 0.3]),
    "boxes_list": _set(("p", "boxes"), [[0, 0, 1, 1], [0, 0, 1, 1]]),
    "negative_string": _set(("a", "negative"), "a red box is right of a blue box"),
    "span_outside": _set(("a", "spans", "obj"), [500]),
    "span_bool": _set(("p", "negative", "spans", "rel"), [True]),
    "char_span_outside": _set(("a", "char_spans", "subj"), [0, 10**6]),
    "header_string": _set(("context_length",), "77"),
    "spans_null": _set(("p", "spans"), None),
}
RAW_CORRUPTIONS = {  # side-cars that do not even parse
    "not_utf8": lambda data: data[:20] + b"\xff\xfe" + data[20:],
    "huge_number": lambda data: data.replace(b'"schema":1', b'"schema":' + HUGE.encode()),
    "deep": lambda data: b'{"a":' + DEEP.encode() + b"}",
}


def test_validator_refuses_each_corruption_with_its_own_error(small_manifest, tmp_path):
    make_shards(str(small_manifest), str(tmp_path / "out"), CFG, progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        key = tar.getnames()[0].split(".")[0]
        meta = json.loads(tar.extractfile(f"{key}.json").read())
    schema.validate_record(key, meta, vocab_size=49408)
    for name, mutate in SIDECAR_CORRUPTIONS.items():
        bad = copy.deepcopy(meta)
        mutate(bad)
        with pytest.raises(schema.SchemaError):
            schema.validate_record(key, bad)
    with pytest.raises(schema.SchemaError, match="not dot/slash-free"):
        schema.validate_record(key + "\n", meta)
    with pytest.raises(schema.SchemaError, match="0..99"):
        schema.validate_record(key, meta, vocab_size=100)  # the model's own (smaller) embedding


def _corrupt_shards(out: Path) -> dict[str, str]:
    """Apply one corruption to one record each, walking the shards in order; returns key -> name."""
    corruptions = [(n, "sidecar", f) for n, f in SIDECAR_CORRUPTIONS.items()]
    corruptions += [(n, "raw", f) for n, f in RAW_CORRUPTIONS.items()]
    applied = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
        rewritten = []
        for info, data in members:
            if info.name.endswith(".json") and corruptions and len(applied) < len(SIDECAR_CORRUPTIONS) + len(RAW_CORRUPTIONS):
                name, kind, fn = corruptions.pop(0)
                if kind == "sidecar":
                    meta = json.loads(data)
                    fn(meta)
                    data = json.dumps(meta).encode()
                else:
                    data = fn(data)
                applied[info.name.split(".")[0]] = name
                info.size = len(data)
            rewritten.append((info, data))
        with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in rewritten:
                tar.addfile(info, io.BytesIO(data))
    return applied


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """48 records in 8 shards, 16 of them with a corrupt side-car (one per kind)."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "images").mkdir()
    lines = []
    for i in range(96):
        make_image(root / "images" / f"{i}.jpg", size=(48, 36), subj=(2, 2, 20, 25), obj=(25, 5, 45, 30), seed=i)
        lines.append(sample_line(i, f"images/{i}.jpg", i ^ 1, size=(48, 36), subj_box=(2, 2, 20, 25),
                                 obj_box=(25, 5, 45, 30)))
    manifest = write_lines(root / "manifest.jsonl", lines)
    out = root / "shards"
    report = make_shards(str(manifest), str(out), ShardConfig(image_size=32, roi_size=32, shard_size=6), progress=False)
    assert report.summary["records"] == 48
    return out, _corrupt_shards(out)


def test_check_shards_reports_every_corrupt_record_without_crashing(corrupt):
    out, applied = corrupt
    report = check_shards(str(out))
    assert not report.ok
    flagged = {p.split("/", 1)[1].split(":", 1)[0] for p in report.problems if "/" in p.split(":", 1)[0]}
    assert flagged == set(applied)  # each corrupt record named, no good one
    assert report.records == 48 - len(applied)
    # The corrupted records fill the first shards (6 records each): exactly those differ from summary.json.
    assert sum("sha256 differs" in p for p in report.problems) == -(-len(applied) // 6)


def test_loader_skips_and_counts_corrupt_records_and_training_data_continues(corrupt, caplog):
    out, applied = corrupt
    preprocess = open_clip.transform.image_transform(32, is_train=False)
    loader = build_loader(LoaderConfig(shards=str(out), batch_pairs=8, workers=0, shuffle_buffer=0), preprocess,
                          rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="sapretrain.data.loader"):
        batches = list(loader)
    assert len(batches) == len(loader) == 6  # 48 // 8: the lost records are topped up by re-reads
    for batch in batches:
        assert batch["text"].shape == (16, 77) and 0 <= int(batch["text"].min()) and int(batch["text"].max()) < 49408
        assert batch["boxes"].shape == (16, 2, 4)
    stats = loader.stats()
    raw = len(RAW_CORRUPTIONS)
    assert stats["dropped"] == {"bad_sidecar": len(applied) - raw, "bad_json": raw}
    assert stats["reread_records"] > 0
    assert "bad_sidecar" in caplog.text or "bad_json" in caplog.text


# ---------------------------------------------------------------- garbage sizes.json / summary.json


@pytest.mark.parametrize("garbage, says", [
    (b"\x00garbage{", "not a JSON object"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"shard-000000.tar": true}', "record count True"),
    (b'{"../../etc/shard.tar": 4}', "not a shard file name"),
    (b'{"shard-000000.tar": -1}', "record count -1"),
])
def test_garbage_sizes_json_is_a_clear_error_and_a_check_problem(small_manifest, tmp_path, garbage, says):
    out = tmp_path / "out"
    make_shards(str(small_manifest), str(out), CFG, progress=False)
    (out / "sizes.json").write_bytes(garbage)
    (out / "summary.json").write_bytes(b'{"shards": "nope"}')
    with pytest.raises(ValueError, match=says):
        build_loader(LoaderConfig(shards=str(out), batch_pairs=2, workers=0), lambda x: x, 0, 1)
    report = check_shards(str(out))
    assert not report.ok and any("sizes.json" in p for p in report.problems)
    assert any(p.startswith("summary.json: no list") for p in report.problems)


def test_seed_labels_count_hostile_lines(tmp_path):
    from sapretrain.curation.relation_filter import load_labels

    path = write_lines(tmp_path / "labels.jsonl", [line for line, _ in HOSTILE_LINES.values()])
    labels, bad = load_labels(str(path))
    expected = Counter(reason for _, reason in HOSTILE_LINES.values())
    expected["bad_json"] -= 3  # [1, 2, 3], null and 42 parse: the label reader calls them not_object
    assert labels == [] and bad == {**expected, "not_object": 3}


def _make_shards_tool():
    import importlib.util

    from conftest import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("make_shards_tool", PROJECT_ROOT / "tools/make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_make_shards_tool_exits_1_when_every_sample_is_skipped_or_the_input_is_broken(tmp_path, capsys):
    tool = _make_shards_tool()
    manifest = write_lines(tmp_path / "m.jsonl", [line for line, _ in HOSTILE_LINES.values()])
    args = ["--no-progress", "--workers", "1", "image_size=64", "roi_size=32"]
    assert tool.main(["--manifest", str(manifest), "--output", str(tmp_path / "o"), *args]) == 1
    captured = capsys.readouterr()
    assert "nothing written, every manifest sample was skipped" in captured.err
    assert "too_deep: 2" in captured.out and "bad_encoding: 2" in captured.out
    assert tool.main(["--manifest", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o2"), *args]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    good = json.dumps(sample_line(0, "a.jpg", 1)).encode() + b"\n"
    import gzip

    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(good * 50)[:-12])  # the stream ends before its end marker
    assert tool.main(["--manifest", str(broken), "--output", str(tmp_path / "o3"), *args]) == 1
    assert "cannot be read past line" in capsys.readouterr().err


# ---------------------------------------------------------------- the validators are total


ODD_VALUES = [None, True, False, 0, -1, 10**30, 10**400, 1e308, "\ud800", -0.0, "", "x", "s0001\n", [], {}, [1, 2, 3], [True] * 4,
              {"start": 0}, [[[]]], "\u2028", 49407, 59406]


def _paths(node, prefix=()):
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, child in children:
        yield from _paths(child, prefix + (k,))


def _mutants(doc, rng, n):
    """``n`` copies of ``doc`` with one node replaced by an odd value or deleted."""
    paths = [p for p in _paths(doc) if p]
    for _ in range(n):
        bad = copy.deepcopy(doc)
        path = paths[rng.integers(len(paths))]
        node = bad
        for k in path[:-1]:
            node = node[k]
        if rng.random() < 0.15 and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = copy.deepcopy(ODD_VALUES[rng.integers(len(ODD_VALUES))])
        yield path, bad


def test_manifest_validator_is_total_and_what_it_accepts_processes(tmp_path):
    from sapretrain.shards.process import process_sample
    from sapretrain.shards.schema import BadSample, validate_manifest_sample
    from sapretrain.shards.tokens import SpanTokenizer

    make_image(tmp_path / "0.jpg", size=(96, 72), subj=(5, 5, 40, 50), obj=(50, 10, 90, 60))
    good = sample_line(0, str(tmp_path / "0.jpg"), 1, size=(96, 72), subj_box=(5, 5, 40, 50), obj_box=(50, 10, 90, 60))
    tokenizer, spec = SpanTokenizer("ViT-B-32"), CFG.image_spec()
    validate_manifest_sample(good)
    accepted = 0
    for path, bad in _mutants(good, np.random.default_rng(0), 400):
        try:
            validate_manifest_sample(bad)
        except BadSample:
            continue  # anything else (TypeError, OverflowError ...) fails the test
        accepted += 1
        try:
            process_sample(bad, spec, tokenizer)
        except BadSample:
            pass
    assert 0 < accepted < 400  # some mutants are harmless (a label's text), most are refused


def test_sidecar_validator_is_total_and_what_it_accepts_collates(small_manifest, tmp_path):
    from sapretrain.data.batch import caption_tensors, group_id
    from sapretrain.shards.schema import image_key_of

    make_shards(str(small_manifest), str(tmp_path / "out"), CFG, progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        key = tar.getnames()[0].split(".")[0]
        meta = json.loads(tar.extractfile(f"{key}.json").read())
    accepted = 0
    for path, bad in _mutants(meta, np.random.default_rng(1), 600):
        try:
            schema.validate_record(key, bad)
        except schema.SchemaError:
            continue
        accepted += 1
        for member in schema.MEMBERS:  # what collate_records does with a side-car
            sample = bad[member]
            group_id(image_key_of(sample))
            ids, masks = caption_tensors(sample, bad["context_length"])
            caption_tensors(sample["negative"], bad["context_length"])
            assert int(ids.max()) < 49408 and masks.any(dim=1).all()
            torch_boxes = np.array([sample["boxes"]["subj"], sample["boxes"]["obj"]], dtype=np.float32)
            assert torch_boxes.shape == (2, 4) and np.isfinite(torch_boxes).all()
    assert 0 < accepted < 600


def test_a_flipped_header_field_mid_shard_is_skipped_a_foreign_shard_stops_the_run(small_manifest, tmp_path):
    out = tmp_path / "out"
    make_shards(str(small_manifest), str(out), ShardConfig(image_size=32, roi_size=32, shard_size=4), progress=False)

    def rewrite(shard, index, mutate):
        with tarfile.open(shard) as tar:
            members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
        jsons = [i for i, (info, _) in enumerate(members) if info.name.endswith(".json")]
        info, data = members[jsons[index]]
        meta = json.loads(data)
        mutate(meta)
        data = json.dumps(meta).encode()
        info.size = len(data)
        members[jsons[index]] = (info, data)
        with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data))

    rewrite(out / "shard-000000.tar", 2, _set(("schema",), 3))  # 1 -> 3: one bit
    rewrite(out / "shard-000001.tar", 1, _set(("context_length",), 79))  # 77 -> 79: one bit
    cfg = LoaderConfig(shards=str(out), batch_pairs=2, workers=0, shuffle_buffer=0, shuffle_shards=False)
    loader = build_loader(cfg, open_clip.transform.image_transform(32, is_train=False), 0, 1)
    assert len(list(loader)) == len(loader) == 4
    assert loader.stats()["dropped"] == {"bad_sidecar": 2}
    rewrite(out / "shard-000000.tar", 0, _set(("schema",), 2))  # the shard's first record: another format
    with pytest.raises(ValueError, match="shard schema 2"):
        list(build_loader(cfg, open_clip.transform.image_transform(32, is_train=False), 0, 1))


def test_extract_svo_marks_hostile_lines_with_the_readers_reason():
    from sapretrain.curation.extract import SKIP_REASONS, process_lines

    class NoParser:  # no valid caption reaches the parser here
        def pipe(self, texts, batch_size):
            assert list(texts) == []
            return iter([])

    lines = [line if isinstance(line, str) else line.decode("utf-8", "surrogateescape")
             for line, _ in HOSTILE_LINES.values()]
    out = [json.loads(line) for line in process_lines(NoParser(), lines).splitlines()]
    assert [o["skip_reason"] for o in out] == [reason for _, reason in HOSTILE_LINES.values()]
    assert all(o["triplets"] == [] and o["raw"] for o in out) and set(o["skip_reason"] for o in out) <= set(SKIP_REASONS)
