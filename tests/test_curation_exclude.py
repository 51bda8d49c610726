"""Exclusion lists (sapretrain/curation/exclude.py): evaluation images never become training samples."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT
from sapretrain.curation import curate
from sapretrain.curation.exclude import (DROP_REASON, ExcludingStage, builtin_lists, coco_id, load_exclusions,
                                         load_list)
from sapretrain.curation.samples import SampleConfig, SampleStage
from sapretrain.curation.stage import StageConfig, run_stage

FIXTURES = PROJECT_ROOT / "tests" / "fixtures"
ANNOTATIONS = FIXTURES / "coco" / "annotations.jsonl"
SUGARCREPE = FIXTURES / "sugarcrepe"
DOTA = FIXTURES / "dota" / "metadata_val_excerpt.json"


def fixture_records() -> list[dict]:
    return [json.loads(line) for line in ANNOTATIONS.read_text().splitlines() if line.strip()]


def text_list(tmp_path, *lines, name="list.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# --------------------------------------------------------------------------------------------
# Matching


@pytest.mark.parametrize("entry", ["000000397133.jpg", "397133", "COCO_val2014_000000397133.jpg",
                                   "val2017/000000397133.jpg", "http://images.cocodataset.org/val2017/000000397133.jpg",
                                   "000000397133"])
@pytest.mark.parametrize("ref", ["/data/coco/train2017/000000397133.jpg", "000000397133.jpg",
                                 "COCO_train2014_000000397133.jpg", "s3://bucket/coco/000000397133.png",
                                 "s3://bucket/shards/00012.tar#000000397133.jpg", "C:\\coco\\000000397133.jpg", 397133])
def test_a_coco_image_matches_in_every_spelling(tmp_path, entry, ref):
    exclusion = load_exclusions([text_list(tmp_path, entry)])
    assert exclusion.match(ref) == f"list.txt: {entry}"


@pytest.mark.parametrize("ref", ["/data/coco/train2017/000000397134.jpg",  # another id
                                 "/data/coco/train2017/100000397133.jpg",
                                 "frames/clip/images/397133.jpg",  # not a COCO file name
                                 "cc3m/00012.tar#000397133.jpg",  # a 9-digit tar key
                                 "/data/397133/x.jpg", None, ""])
def test_other_images_do_not_match_a_coco_entry(tmp_path, ref):
    assert load_exclusions([text_list(tmp_path, "397133")]).match(ref) is None


def test_coco_ids_are_only_read_off_coco_file_names():
    assert coco_id("a/b/000000000052.jpg") == 52
    assert coco_id("COCO_test2015_000000000052.jpg") == 52
    assert coco_id("frames/x/images/000052.jpg") is None  # a DoTA frame, 6 digits
    assert coco_id("vg/2345.jpg") is None  # Visual Genome ids are not COCO ids
    assert coco_id(7) == 7


def test_names_match_whole_path_components(tmp_path):
    exclusion = load_exclusions([text_list(tmp_path, "0qfbmt4G8Rw_000306", "abc.jpg", "shots/clip7/000001.jpg")])
    assert exclusion.match("DoTA/frames/0qfbmt4G8Rw_000306/images/000052.jpg") == "list.txt: 0qfbmt4G8Rw_000306"
    assert exclusion.match("0qfbmt4G8Rw_000306") is not None
    assert exclusion.match("DoTA/frames/0qfbmt4G8Rw_0003061/images/000052.jpg") is None  # a longer id
    assert exclusion.match("DoTA/frames/0qfbmt4G8Rw_00030/images/000052.jpg") is None  # a prefix
    assert exclusion.match("/data/x/abc.jpg") == "list.txt: abc.jpg"
    assert exclusion.match("/data/x/abc.png") is not None  # extension ignored on the last component
    assert exclusion.match("/data/x/abcd.jpg") is None
    assert exclusion.match("/root/shots/clip7/000001.jpg") == "list.txt: shots/clip7/000001.jpg"
    assert exclusion.match("/root/shots/clip8/000001.jpg") is None  # the folders must match too
    assert exclusion.match("/root/000001.jpg") is None


# --------------------------------------------------------------------------------------------
# Lists


def test_builtin_vsr_list_is_package_data_and_holds_the_fixtures_zero_shot_images():
    assert "vsr" in builtin_lists()
    [(label, entries)] = load_list("builtin:vsr")
    assert label == "vsr_images.txt" and len(entries) == len(set(entries)) == 2471  # see its header
    exclusion = load_exclusions(["builtin:vsr"])
    for record in fixture_records():
        splits = {s for row in record["vsr"] for s in row["splits"]}
        if splits & {"zeroshot_train", "zeroshot_dev"}:  # the splits the list is built from
            assert exclusion.match(record["file_name"]) is not None, record["file_name"]
        if not record["vsr"]:
            assert exclusion.match(record["file_name"]) is None, record["file_name"]


def test_vsr_jsonl_sugarcrepe_folder_dota_metadata_and_coco_annotations_are_read(tmp_path):
    vsr = tmp_path / "zeroshot_test.jsonl"
    vsr.write_text("".join(json.dumps({"image": r["file_name"], "caption": row["caption"]}) + "\n"
                           for r in fixture_records() for row in r["vsr"]))
    vsr_images = {r["file_name"] for r in fixture_records() if r["vsr"]}
    assert set(load_list(str(vsr))[0][1]) == vsr_images

    sugar = load_list(str(SUGARCREPE))
    assert [label for label, _ in sugar] == sorted(p.name for p in SUGARCREPE.glob("*.json"))
    rows = {row["filename"] for p in SUGARCREPE.glob("*.json") for row in json.loads(p.read_text()).values()}
    assert {e for _, entries in sugar for e in entries} == rows

    [(_, clips)] = load_list(str(DOTA))
    assert clips == list(json.loads(DOTA.read_text()))
    exclusion = load_exclusions([str(DOTA)])
    assert exclusion.match(f"/data/DoTA/frames/{clips[0]}/images/000010.jpg") == f"{DOTA.name}: {clips[0]}"

    [(_, names)] = load_list(str(FIXTURES / "coco" / "instances_fixture.json"))
    assert sorted(names) == sorted(r["file_name"] for r in fixture_records())

    plain = text_list(tmp_path, "# a comment line", "", "000000519208.jpg  # trailing comment", "  397133  ")
    assert load_list(plain)[0][1] == ["000000519208.jpg", "397133"]


def test_bad_lists_are_errors_not_partial_reads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "000000519208.jpg"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: not JSON"):
        load_exclusions([str(bad)])
    bad.write_text('{"image": "000000519208.jpg"}\n{"caption": "no image"}\n')
    with pytest.raises(ValueError, match="line 2: no image/filename/file_name field"):
        load_exclusions([str(bad)])
    with pytest.raises(ValueError, match="has no entries"):
        load_exclusions([text_list(tmp_path, "# only a comment")])
    with pytest.raises(ValueError, match="no built-in exclusion list builtin:vrs; known: builtin:vsr"):
        load_exclusions(["builtin:vrs"])
    with pytest.raises(ValueError, match="no such file"):
        load_exclusions([str(tmp_path / "missing.txt")])
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"a": {"b": 1}}))
    with pytest.raises(ValueError, match="not an exclusion list"):
        load_exclusions([str(odd)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .json, .jsonl, .txt files"):
        load_exclusions([str(tmp_path / "empty")])


# --------------------------------------------------------------------------------------------
# The stage and the curation


def caption_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_excluding_stage_drops_and_counts_before_the_samples_stage(tmp_path):
    def record(i, image):
        caption = "a cat on a mat"
        triplet = {"subj": {"text": "cat", "start": 2, "end": 5}, "rel": {"text": "on", "start": 6, "end": 8,
                   "kind": "spatial"}, "obj": {"text": "mat", "start": 11, "end": 14}}
        return {"id": f"c{i}", "image": image, "caption": caption, "triplets": [triplet]}

    src = caption_lines(tmp_path / "triplets.jsonl", [
        record(0, "/coco/train2017/000000519208.jpg"), record(1, "/coco/train2017/000000000001.jpg"),
        record(2, "/coco/COCO_train2014_000000519208.jpg"), record(3, "/coco/train2017/000000000002.jpg")])
    stage = ExcludingStage(SampleStage(SampleConfig()), load_exclusions([text_list(tmp_path, "519208")]))
    summary = run_stage(stage, src, str(tmp_path / "samples.jsonl"), StageConfig(chunk_size=3), progress=False)
    assert summary["records"] == 4 and summary["kept"] == 2 and summary["dropped"] == {DROP_REASON: 2}
    kept = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in kept] == ["c1-t0", "c3-t0"]
    dropped = [json.loads(line) for line in (tmp_path / "samples.dropped.jsonl").read_text().splitlines()]
    assert [(d["id"], d["drop_detail"]) for d in dropped] == [("c0", "list.txt: 519208"), ("c2", "list.txt: 519208")]

    # Another list is another output: a resume with it is refused, not mixed in.
    (tmp_path / "samples.jsonl").unlink()
    (tmp_path / "samples.jsonl.chunks").mkdir()
    (tmp_path / "samples.jsonl.chunks" / "config.json").write_text(json.dumps(
        {"stage": "samples", "chunk_size": 3, **stage.fingerprint()}, sort_keys=True))
    other = ExcludingStage(SampleStage(SampleConfig()), load_exclusions([text_list(tmp_path, "1", name="b.txt")]))
    with pytest.raises(ValueError, match="other settings"):
        run_stage(other, src, str(tmp_path / "samples.jsonl"), StageConfig(chunk_size=3), progress=False)


def test_curation_of_the_fixture_drops_the_evaluation_photos_with_a_counted_reason(tmp_path):
    """Captions → triplets → samples of the 23 fixture photos, excluding VSR and SugarCrepe images."""
    from sapretrain.curation.extract import ExtractConfig, extract_file
    from sapretrain.curation.sources import collect

    config = PROJECT_ROOT / "configs" / "curation" / "coco_fixture.yaml"
    cfg = curate.load_curation_config(str(config), [f"output_dir={tmp_path}",
                                                    f"exclude=[builtin:vsr, {SUGARCREPE}]"])
    stage = curate._record_stage("samples", cfg)
    assert isinstance(stage, ExcludingStage)
    collect(cfg.source.reader, str(tmp_path / "captions.jsonl"), dict(cfg.source.options), progress=False)
    extract_file(str(tmp_path / "captions.jsonl"), str(tmp_path / "triplets.jsonl"), ExtractConfig(), progress=False)
    summary = run_stage(stage, str(tmp_path / "triplets.jsonl"), str(tmp_path / "samples.jsonl"),
                        StageConfig(cfg.chunk_size), progress=False)

    vsr = load_exclusions(["builtin:vsr"])
    sugar = {row["filename"] for p in SUGARCREPE.glob("*.json") for row in json.loads(p.read_text()).values()}
    excluded = {r["file_name"] for r in fixture_records() if vsr.match(r["file_name"]) or r["file_name"] in sugar}
    assert excluded == {"000000519208.jpg", "000000475678.jpg", "000000397133.jpg", "000000255165.jpg"}
    assert summary["dropped"][DROP_REASON] == 5 * len(excluded)  # every caption of those photos
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and not {s["image"].rsplit("/", 1)[1] for s in samples} & excluded


def test_shipped_coco_config_excludes_vsr_and_make_samples_takes_lists(tmp_path):
    cfg = curate.load_curation_config(str(PROJECT_ROOT / "configs" / "curation" / "coco.yaml"))
    assert cfg.exclude == ["builtin:vsr"]
    caption = "a cat on a mat"
    triplet = {"subj": {"text": "cat", "start": 2, "end": 5}, "rel": {"text": "on", "start": 6, "end": 8,
               "kind": "spatial"}, "obj": {"text": "mat", "start": 11, "end": 14}}
    src = caption_lines(tmp_path / "t.jsonl", [
        {"id": "c0", "image": "/x/000000519208.jpg", "caption": caption, "triplets": [triplet]},
        {"id": "c1", "image": "/x/000000000001.jpg", "caption": caption, "triplets": [triplet]}])
    cmd = [sys.executable, str(PROJECT_ROOT / "tools" / "make_samples.py"), "--input", src,
           "--output", str(tmp_path / "s.jsonl"), "--no-progress", "--exclude", "builtin:vsr"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"dropped: {DROP_REASON} 1" in done.stdout
    typo = subprocess.run(cmd[:-1] + ["builtin:vrs"], capture_output=True, text=True)
    assert typo.returncode == 2 and "no built-in exclusion list" in typo.stderr
