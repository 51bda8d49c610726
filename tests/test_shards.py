"""Manifest → shards → read back; bad inputs; resume after SIGKILL; parts; S3; the on-disk plan
against the in-memory one."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from conftest import OBJ_COLOR, PROJECT_ROOT, SUBJ_COLOR, make_image, png_bomb, sample_line, write_manifest
from sapretrain.shards import schema
from sapretrain.shards import manifest as manifest_module
from sapretrain.shards.check import check_shards
from sapretrain.shards.manifest import SkipLog, read_manifest
from sapretrain.shards.process import hashed_image_key
from sapretrain.shards.writer import ShardConfig, claim_output, finalize, make_shards, plan_shards, write_shard

CFG = ShardConfig(image_size=64, roi_size=32, shard_size=3)


def read_back(output) -> dict[str, dict]:
    """Records of all shards through webdataset itself, keyed by __key__."""
    urls = sorted(str(p) for p in Path(output).glob("*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    return {s["__key__"]: s for s in dataset}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_roundtrip_equals_input(small_manifest, tmp_path):
    out = tmp_path / "shards"
    report = make_shards(str(small_manifest), str(out), CFG, progress=False)
    lines = {j["id"]: j for j in map(json.loads, small_manifest.read_text().splitlines())}
    # 4 mutual pairs merge into 4 records, 4 ring samples give 4 records.
    assert report.summary["records"] == 8 and report.summary["mutual_pairs_merged"] == 4
    assert report.summary["skipped"]["counts"] == {}
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 2}

    records = read_back(out)
    assert sorted(records) == ["s0000", "s0002", "s0004", "s0006", "s0008", "s0009", "s0010", "s0011"]
    for key, record in records.items():
        meta = record["json"]
        schema.validate_record(key, meta)
        assert meta["p"]["id"] == lines[key]["positive"]
        for member in schema.MEMBERS:
            sample, source = meta[member], lines[meta[member]["id"]]
            assert sample["caption"] == source["caption"]
            assert sample["negative"]["caption"] == source["negative"]["caption"]
            for part in schema.PARTS:
                span = source["triplet"][part]
                assert sample["char_spans"][part] == [span["start"], span["end"]]
            for part in ("subj", "obj"):
                x0, y0, x1, y1 = source["boxes"][part]
                assert sample["boxes"][part] == pytest.approx([x0 / 320, y0 / 240, x1 / 320, y1 / 240], abs=1e-6)
            image = record[f"{member}.jpg"]
            assert image.size == (85, 64)  # shorter side 64, aspect 4:3 kept
            # The ROI crops are centred on the drawn boxes: their centres show the box colours.
            for part, color in (("subj", SUBJ_COLOR), ("obj", OBJ_COLOR)):
                crop = np.asarray(record[f"{member}.{part}.jpg"])
                assert crop.shape == (32, 32, 3)
                centre = crop[12:20, 12:20].reshape(-1, 3).mean(0)
                assert np.abs(centre - color).max() < 25, (key, member, part, centre)
    assert check_shards(str(out)).ok


def test_token_positions_agree_with_open_clip(tmp_path):
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    images = tmp_path / "images"
    images.mkdir()
    long_tail = " and then " + "very " * 80 + "far away"
    lines = []
    for i in range(2):
        make_image(images / f"{i}.jpg", seed=i)
        line = sample_line(i, f"images/{i}.jpg", 1 - i)
        if i == 1:  # the object straddles the 77-token cut: only its first tokens survive
            line["caption"] = "a red box number 1 is left of a blue box" + long_tail
            obj_start = line["caption"].index("blue box")
            line["triplet"]["obj"] = {"text": line["caption"][obj_start:], "start": obj_start, "end": len(line["caption"])}
        lines.append(line)
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    make_shards(str(manifest), str(tmp_path / "out"), CFG, progress=False)
    record = read_back(tmp_path / "out")["s0000"]["json"]
    for sample in (record["a"], record["p"], record["a"]["negative"]):
        expected = tokenizer([sample["caption"]])[0].tolist()
        assert sample["tokens"] + [0] * (77 - len(sample["tokens"])) == expected
    anchor = record["a"]
    decoded = {part: tokenizer.decode(np.array([anchor["tokens"][p] for p in anchor["spans"][part]])) for part in schema.PARTS}
    assert decoded["subj"].strip() == "red box number 0"
    assert decoded["rel"].strip() == "left of"
    assert decoded["obj"].strip() == "blue box"
    partner = record["p"]
    assert partner["truncated"] is True and len(partner["tokens"]) == 77
    assert max(partner["spans"]["obj"]) == 75  # last content position before the end token
    assert partner["spans"]["obj"][0] == partner["tokens"].index(tokenizer.encoder["blue</w>"])


def test_bad_inputs_are_skipped_and_counted(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        make_image(images / f"good{i}.jpg", seed=i)
    make_image(images / "full.jpg", seed=9)
    (images / "truncated.jpg").write_bytes((images / "full.jpg").read_bytes()[:1500])
    (images / "text.jpg").write_text("this is not an image")
    png_bomb(images / "bomb.png")

    def good(i, partner, **kw):
        return sample_line(i, f"images/good{i}.jpg", partner, **kw)

    def bad(i, **changes):
        line = sample_line(i, "images/good0.jpg", 0)
        line["image"] = f"images/good{i}.jpg" if i < 4 else "images/good1.jpg"
        line.update(changes)
        return line

    empty = bad(10, caption="   ")
    span_out = bad(11)
    span_out["triplet"]["obj"]["end"] = 500
    span_mismatch = bad(12)
    span_mismatch["triplet"]["subj"]["text"] = "green cube"
    no_negative = bad(13)
    del no_negative["negative"]
    lines = [
        good(0, 1), good(1, 0), good(2, 3), good(3, 2),
        bad(20, image="images/missing.jpg"),
        bad(21, image="images/truncated.jpg"),
        bad(22, image="images/text.jpg"),
        bad(23, image="images/bomb.png", width=30000, height=30000),
        empty, span_out, span_mismatch, no_negative,
        bad(14, boxes={"subj": [10, 10, 50, 50], "obj": [200, 100, 400, 200]}),  # x1 > 320
        bad(15, caption=42),
        bad(16, positive="nobody"),
        "{not json",
        good(0, 1),  # duplicate id
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    report = make_shards(str(manifest), str(tmp_path / "out"), CFG, progress=False)
    counts = report.summary["skipped"]["counts"]
    assert counts == {
        "bad_caption": 1,
        "bad_json": 1,
        "bad_span": 2,
        "box_outside_image": 1,
        "decompression_bomb": 1,
        "duplicate_id": 1,
        "empty_caption": 1,
        "missing_field": 1,
        "missing_image": 1,
        "missing_partner": 1,
        "unreadable_image": 2,
    }
    assert sorted(read_back(tmp_path / "out")) == ["s0000", "s0002"]
    assert all(report.summary["skipped"]["examples"][reason] for reason in counts)
    assert check_shards(str(tmp_path / "out")).ok


def test_cli_reports_and_checker_finds_corruption(small_manifest, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "tests")}
    run = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "tools/make_shards.py"), "--manifest", str(small_manifest),
         "--output", str(out), "--no-progress", "--workers", "2", "image_size=64", "roi_size=32", "shard_size=3"],
        capture_output=True, text=True, env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "8 records (pairs)" in run.stdout and "skipped: 0" in run.stdout
    assert "image_size: 64" in (out / "config.yaml").read_text()

    check = [sys.executable, str(PROJECT_ROOT / "tools/check_shards.py"), "--no-progress", str(out)]
    assert subprocess.run(check, capture_output=True).returncode == 0

    # A JPEG member with garbage in the middle, then a truncated shard: both must be reported.
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b"\xff\xd8\xff") + 600
    data[at : at + 400] = b"\x00" * 400
    shard.write_bytes(bytes(data))
    bad = subprocess.run(check, capture_output=True, text=True)
    assert bad.returncode == 1 and "shard-000001.tar" in bad.stdout and "sha256" in bad.stdout
    (out / "shard-000002.tar").write_bytes((out / "shard-000002.tar").read_bytes()[:5000])
    report = check_shards(str(out))
    assert any("shard-000002.tar" in p and "truncated" in p for p in report.problems)


def test_unknown_config_key_is_an_error(small_manifest, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards_tool", PROJECT_ROOT / "tools/make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--manifest", str(small_manifest), "--output", str(tmp_path / "o"), "imag_size=64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'imag_size'" in err and "did you mean 'image_size'" in err


def test_parts_and_resume_after_sigkill_are_byte_identical(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    boxes = {"subj_box": (40, 50, 300, 400), "obj_box": (330, 80, 620, 460)}
    lines = []
    for i in range(24):
        make_image(images / f"{i}.jpg", size=(640, 480), subj=boxes["subj_box"], obj=boxes["obj_box"], seed=i)
        lines.append(sample_line(i, f"images/{i}.jpg", (i + 1) % 24, size=(640, 480), **boxes))
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    cfg = ShardConfig(image_size=224, roi_size=224, shard_size=4, draft=False)

    reference = tmp_path / "reference"
    make_shards(str(manifest), str(reference), cfg, progress=False)
    assert len(list(reference.glob("*.tar"))) == 6

    parts = tmp_path / "parts"
    assert make_shards(str(manifest), str(parts), cfg, part=1, num_parts=2, progress=False).summary is None
    assert make_shards(str(manifest), str(parts), cfg, part=0, num_parts=2, progress=False).finalized
    assert files_of(parts) == files_of(reference)

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(PROJECT_ROOT / "tools/make_shards.py"), "--manifest", str(manifest), "--output", str(killed),
           "--no-progress", "--workers", "1", "image_size=224", "roi_size=224", "shard_size=4", "draft=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "_progress").glob("*.json"))) < 2:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((killed / "_progress").glob("*.json")))
    assert 2 <= done_at_kill < 6, "the writer must be killed mid-run for this test to mean anything"
    assert not (killed / "summary.json").exists()
    resumed = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert f"{6 - done_at_kill} written now, {done_at_kill} already done" in resumed.stdout
    assert files_of(killed) == files_of(reference)


def test_refuses_to_mix_configs(small_manifest, tmp_path):
    make_shards(str(small_manifest), str(tmp_path / "o"), CFG, progress=False)
    with pytest.raises(SystemExit, match="different config"):
        make_shards(str(small_manifest), str(tmp_path / "o"), ShardConfig(image_size=96), progress=False)


def test_s3_input_and_output(small_manifest, tmp_path, s3_env):
    fs = s3_env
    fs.mkdir("shards-test")
    fs.put(str(small_manifest.parent / "images"), "shards-test/in/images", recursive=True)
    fs.put_file(str(small_manifest), "shards-test/in/manifest.jsonl")

    report = make_shards("s3://shards-test/in/manifest.jsonl", "s3://shards-test/out", CFG, workers=2, progress=False)
    assert report.summary["records"] == 8
    check = check_shards("s3://shards-test/out")
    assert check.ok, check.problems
    assert check.records == 8

    local = tmp_path / "local"
    make_shards(str(small_manifest), str(local), CFG, progress=False)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "sizes.json"):
        assert fs.cat_file(f"shards-test/out/{name}") == (local / name).read_bytes(), name
    assert not [p for p in fs.find("shards-test/out") if ".tmp" in p]


# ---------------------------------------------------------------- the on-disk plan vs the in-memory one


def in_memory_plan(manifest: str):
    """The planner make_shards used before the on-disk plan, verbatim: the test oracle.
    Returns (records, merged, skips, samples read)."""
    skips = SkipLog()
    samples = read_manifest(manifest, skips)
    by_id = {s["id"]: s for s in samples}
    order = {s["id"]: i for i, s in enumerate(samples)}
    records, merged = [], 0
    for i, anchor in enumerate(samples):
        partner = by_id.get(anchor["positive"])
        if partner is None:
            skips.add("missing_partner", f"{anchor['id']}: positive {anchor['positive']!r} is not a valid sample")
            continue
        same_key = anchor.get("image_key") is not None and anchor.get("image_key") == partner.get("image_key")
        if partner["id"] == anchor["id"] or partner["image"] == anchor["image"] or same_key:
            skips.add("partner_same_image", f"{anchor['id']}: positive {partner['id']!r} is the same image")
            continue
        if partner["positive"] == anchor["id"] and order[partner["id"]] < i:
            merged += 1
            continue
        records.append((anchor, partner))
    return records, merged, skips, len(samples)


def tricky_lines(n_images: int) -> list:
    """Every pairing rule and its edge cases; images ``images/{k}.jpg`` with k < n_images."""
    def line(i, partner, image=None, **extra):
        out = sample_line(i, image or f"images/{i % n_images}.jpg", 0)
        out["positive"] = partner if isinstance(partner, str) else f"s{partner:04d}"
        out.update(extra)
        return out

    lines = ["", "{not json", "[1, 2]"]
    lines += [line(0, 1), line(1, 0)]  # a mutual pair: one record
    lines += [line(2, 3), line(3, 4), line(4, 2)]  # a ring: three records
    lines += [line(5, 5)]  # its own partner
    lines += [line(6, 7), line(7, 8, image="images/6.jpg")]  # 6 and 7 show the same file
    lines += [line(8, 9, image_key=42), line(9, 10, image_key=42)]  # same image_key
    lines += [line(10, 11, image_key=43), line(11, 12, image_key="43")]  # int 43 and "43" differ
    # A manifest key equal to another sample's hashed key is the same image.
    lines += [line(12, 13, image="images/x/12.jpg"), line(13, 14, image_key=hashed_image_key("images/x/12.jpg"))]
    lines += [line(14, "nobody"), line(15, 16)]
    bad = line(16, 15)
    bad["boxes"]["subj"] = [5, 5, 1, 1]  # invalid: 15's partner is no valid sample
    lines += [bad]
    invalid_first = line(17, 18)
    del invalid_first["negative"]
    lines += [invalid_first, line(17, 18), line(18, 17)]  # the first valid line of an id counts
    lines += [line(19, 20), line(20, 19), line(21, 19), line(19, 21)]  # the second 19 is a duplicate
    lines += [line(22, 23), line(23, 22)] * 4  # six duplicates: examples keep the first five, in order
    lines += [line(30 + k, f"gone{k}") for k in range(7)]  # seven missing partners
    lines += [line(40 + k, 40 + (k + 1) % 9) for k in range(9)]  # a longer ring
    lines += [line(50, 0), line(0, 50)]  # a partner that belongs to an earlier pair; a duplicate
    return lines


def shard_plan_records(plan) -> list[tuple[dict, dict]]:
    return [record for i in range(plan.shard_count) for record in plan.shard_records(i)]


@pytest.mark.parametrize("compressed", [False, True])
def test_on_disk_plan_equals_the_in_memory_plan(tmp_path, monkeypatch, compressed):
    monkeypatch.setattr(manifest_module, "INSERT_BATCH", 3)  # several batches even for this small input
    path = write_manifest(tmp_path / "m.jsonl", tricky_lines(8))
    if compressed:  # no byte offset into a .gz means anything: the index keeps its own copy of the lines
        gz = tmp_path / "m.jsonl.gz"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        path = gz
    records, merged, skips, samples_read = in_memory_plan(str(path))
    plan_skips = SkipLog()
    plan = plan_shards(str(path), str(tmp_path / "plan.sqlite"), 4, plan_skips)
    assert (plan.records, plan.merged, plan.samples_read) == (len(records), merged, samples_read)
    assert plan.shard_count == -(-len(records) // 4)
    assert plan.shard_length(plan.shard_count - 1) == (len(records) - 1) % 4 + 1
    assert shard_plan_records(plan) == records
    assert plan_skips.to_dict() == skips.to_dict()
    # The input exercises every rule (a planner that skipped one would fail this, not pass by luck).
    counts = skips.counts
    assert merged >= 4 and counts["missing_partner"] == 9 and counts["partner_same_image"] >= 5
    assert counts["duplicate_id"] == 8 and len(skips.examples["duplicate_id"]) == 5
    assert {"bad_json", "missing_field", "bad_box"} <= set(counts)
    ids = [(a["id"], p["id"]) for a, p in records]
    assert ("s0010", "s0011") in ids and ("s0019", "s0020") in ids and ("s0050", "s0000") in ids


def test_make_shards_is_byte_identical_to_the_in_memory_writer(tmp_path):
    """The whole output (shards, sizes.json, summary.json, progress files) of make_shards against
    the writer fed by the in-memory plan, on a manifest with skips of every planning kind."""
    images = tmp_path / "images"
    (images / "x").mkdir(parents=True)
    for k in range(8):
        make_image(images / f"{k}.jpg", seed=k)
    make_image(images / "x" / "12.jpg", seed=12)
    manifest = str(write_manifest(tmp_path / "m.jsonl", tricky_lines(8)))
    cfg = ShardConfig(image_size=64, roi_size=32, shard_size=4)
    out = tmp_path / "out"
    report = make_shards(manifest, str(out), cfg, workers=2, progress=False, work_dir=str(tmp_path / "work"))
    assert report.finalized and report.shards_total == 6 and report.summary["records"] > 20
    assert not list((tmp_path / "work").iterdir()), "the plan's scratch directory is removed"

    records, merged, skips, samples_read = in_memory_plan(manifest)
    reference = tmp_path / "reference"
    claim_output(str(reference), cfg)
    shards = [records[i : i + cfg.shard_size] for i in range(0, len(records), cfg.shard_size)]
    for index, chunk in enumerate(shards):
        write_shard(str(reference), cfg, index, chunk)
    finalize(str(reference), manifest, [manifest], samples_read, len(shards), merged, skips)
    assert files_of(out) == files_of(reference)


def test_a_broken_manifest_leaves_no_plan_behind(tmp_path):
    good = json.dumps(sample_line(0, "images/0.jpg", 1)).encode() + b"\n"
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(good * 50)[:-12])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ValueError, match="damaged or truncated"):
        make_shards(str(broken), str(tmp_path / "out"), CFG, progress=False, work_dir=str(work))
    assert not list(work.iterdir()) and not list((tmp_path / "out").glob("*.tar"))
