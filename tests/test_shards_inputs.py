"""make_shards' manifest is anything jobs.expand_inputs takes, read in order as one manifest: the
part files of a partitioned curation run, a glob, a brace pattern, a list."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_image, sample_line, write_manifest
from sapretrain.cli import make_shards as make_shards_cli
from sapretrain.shards.manifest import SkipLog, manifest_files, read_manifest
from sapretrain.shards.writer import ShardConfig, make_shards
from test_shards import files_of, read_back, tricky_lines

CFG = ShardConfig(image_size=64, roi_size=32, shard_size=4)


def write_parts(folder: Path, name: str, lines: list, cuts: list[int]) -> list[Path]:
    """``lines`` split at ``cuts`` into the part files of a partitioned run's ``folder/name.jsonl``."""
    bounds = [0, *cuts, len(lines)]
    n = len(bounds) - 1
    return [write_manifest(folder / f"{name}-part{i:05d}-of{n:05d}.jsonl", lines[bounds[i]:bounds[i + 1]])
            for i in range(n)]


def test_part_files_give_the_shards_of_their_concatenation(tmp_path):
    images = tmp_path / "images"
    (images / "x").mkdir(parents=True)
    for k in range(8):
        make_image(images / f"{k}.jpg", seed=k)
    make_image(images / "x" / "12.jpg", seed=12)
    lines = tricky_lines(8)
    whole = str(write_manifest(tmp_path / "whole.jsonl", lines))
    # Three parts of different sizes, the middle one empty; duplicates of ids of part 0 lie in part 2.
    parts = write_parts(tmp_path, "curated", lines, [13, 13])
    assert [p.stat().st_size == 0 for p in parts] == [False, True, False]
    curated = str(tmp_path / "curated.jsonl")  # does not exist: its part files are the manifest
    assert manifest_files(curated) == [str(p) for p in parts]

    single = make_shards(whole, str(tmp_path / "single"), CFG, progress=False)
    split = make_shards(curated, str(tmp_path / "split"), CFG, progress=False)
    assert single.finalized and split.finalized and single.summary["records"] > 20

    one, three = files_of(tmp_path / "single"), files_of(tmp_path / "split")
    summaries = [json.loads(files.pop("summary.json")) for files in (one, three)]
    assert sorted(one) == sorted(three) and any(name.endswith(".tar") for name in one)
    assert one == three  # tar bytes, sizes.json, progress records, config.yaml
    assert summaries[0].pop("manifest") == whole and summaries[1].pop("manifest") == curated
    assert summaries[0].pop("manifest_files") == [whole]
    assert summaries[1].pop("manifest_files") == [str(p) for p in parts]
    assert summaries[0] == summaries[1]  # counts, skips with their examples (global line numbers), shard hashes
    duplicates = summaries[1]["skipped"]["examples"]["duplicate_id"]
    assert summaries[1]["skipped"]["counts"]["duplicate_id"] == 8
    assert all(int(d.split()[1].rstrip(":")) > 13 for d in duplicates), "numbered after the lines of part 0"
    assert read_manifest(curated, SkipLog()) == read_manifest(whole, SkipLog())


def test_a_missing_part_file_is_an_error_naming_it(tmp_path, capsys):
    lines = [sample_line(i, f"images/{i}.jpg", i ^ 1) for i in range(6)]
    parts = write_parts(tmp_path, "curated", lines, [2, 4])
    parts[1].unlink()
    curated = str(tmp_path / "curated.jsonl")
    with pytest.raises(ValueError, match=r"curated.jsonl: 1 of its 3 part files are missing \(parts 1\)"):
        make_shards(curated, str(tmp_path / "out"), CFG, progress=False)
    assert not list((tmp_path / "out").glob("*.tar"))

    rc = make_shards_cli.main(["--manifest", curated, "--output", str(tmp_path / "cli"), "--workers", "1",
                               "--no-progress", "image_size=64", "roi_size=32"])
    err = capsys.readouterr().err
    assert rc == 1 and "part files are missing (parts 1)" in err and "Traceback" not in err

    with pytest.raises(ValueError, match="matches no files"):
        make_shards(str(tmp_path / "nothing-*.jsonl"), str(tmp_path / "out"), CFG, progress=False)


def test_relative_images_resolve_against_each_files_own_folder(tmp_path):
    """Two manifests in different folders, each with its images beside it; partners across the
    two. Resolved against the wrong folder, an image would not exist (unreadable_image)."""
    folders = {"a": (0, 1), "b": (2, 3)}
    for folder, ids in folders.items():
        (tmp_path / folder / "images").mkdir(parents=True)
        for i in ids:
            make_image(tmp_path / folder / "images" / f"{i}.jpg", seed=i)
        # 0 <-> 2 and 1 <-> 3: every pair has one member in each file.
        write_manifest(tmp_path / folder / "m.jsonl", [sample_line(i, f"images/{i}.jpg", i ^ 2) for i in ids])
    pattern = str(tmp_path / "*" / "m.jsonl")
    assert manifest_files(pattern) == [str(tmp_path / f / "m.jsonl") for f in folders]

    samples = read_manifest(pattern, SkipLog())
    assert {s["id"]: s["image"] for s in samples} == {
        f"s{i:04d}": str(tmp_path / f / "images" / f"{i}.jpg") for f, ids in folders.items() for i in ids}
    # A brace pattern and a list name the same files, in the same order.
    assert read_manifest(str(tmp_path / "{a,b}" / "m.jsonl"), SkipLog()) == samples
    assert read_manifest([str(tmp_path / f / "m.jsonl") for f in folders], SkipLog()) == samples

    out = tmp_path / "out"
    report = make_shards(pattern, str(out), CFG, progress=False)
    assert report.summary["skipped"]["counts"] == {}
    assert report.summary["records"] == 2 and report.summary["mutual_pairs_merged"] == 2
    assert report.summary["manifest_files"] == [str(tmp_path / f / "m.jsonl") for f in folders]
    records = read_back(out)
    assert {key: record["json"]["p"]["id"] for key, record in records.items()} == {"s0000": "s0002", "s0001": "s0003"}
