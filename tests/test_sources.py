"""Source readers (COCO, VG, img2dataset tars, CSV/TSV/JSONL) → captions JSONL; skips; parts; CLI."""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from sapretrain.curation.sources import READERS, collect, reader_options
from sapretrain.jobs import Parts
from sapretrain.shards.manifest import SkipLog
from sapretrain import storage
from sapretrain.tars import split_ref as split_tar_ref

SCRIPT = PROJECT_ROOT / "tools" / "collect_captions.py"


# ---------------------------------------------------------------------------------------------
# Fixtures: each writes tiny source files in tmp_path and returns the reader's options.


def write_json(path: Path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def coco_files(tmp_path: Path) -> dict:
    captions = {
        "images": [
            {"id": 1, "file_name": "000001.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "000002.jpg", "width": 50, "height": 50},
            {"id": 3, "width": 10, "height": 10},  # no file_name
            {"id": 4, "file_name": "000004.jpg", "width": 60, "height": 60},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "A man  riding a horse.\n"},
            {"id": 12, "image_id": 1, "caption": "   "},
            {"id": 21, "image_id": 2, "caption": "a cat on a mat"},
            {"id": 22, "image_id": 2, "caption": 5},
            {"id": 31, "image_id": 99, "caption": "an orphan caption"},
            {"id": 41, "image_id": 3, "caption": "image without a file"},
            {"id": 51, "caption": "no image id"},
            {"id": 13, "image_id": 1},
            {"id": 42, "image_id": 4, "caption": "a dog under a table"},
            {"id": 43, "image_id": 4, "caption": "a table over a dog"},
        ],
    }
    instances = {
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "horse"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [90.5, 70, 20, 20], "iscrowd": 0},  # clipped
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # no area
            {"id": 4, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # unknown category
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1},
        ],
    }
    return {
        "captions": write_json(tmp_path / "captions_train.json", captions),
        "instances": write_json(tmp_path / "instances_train.json", instances),
        "image_root": str(tmp_path / "train"),
    }


def vg_files(tmp_path: Path) -> dict:
    regions = [
        {
            "id": 1,
            "regions": [
                {"region_id": 100, "image_id": 1, "phrase": "man on a horse", "x": 0, "y": 0, "width": 50, "height": 50},
                {"region_id": 101, "image_id": 1, "phrase": "", "x": 0, "y": 0, "width": 5, "height": 5},
                {"region_id": 102, "image_id": 1, "phrase": "sky above the man", "x": 60, "y": 0, "width": 40, "height": 20},
                {"region_id": 103, "image_id": 1, "phrase": "off the image", "x": 200, "y": 0, "width": 10, "height": 10},
            ],
        },
        {"id": 2, "regions": [{"region_id": 200, "image_id": 2, "phrase": "a dog", "x": 1, "y": 1, "width": 9, "height": 9}]},
        {"id": 3, "regions": [{"region_id": 300, "image_id": 3, "phrase": None, "x": 1, "y": 1, "width": 9, "height": 9}]},
        {"regions": []},  # no image id
    ]
    objects = [
        {
            "image_id": 1,
            "objects": [
                {"object_id": 1, "names": ["man"], "x": 5, "y": 5, "w": 20, "h": 40},
                {"object_id": 2, "names": ["horse"], "x": 10, "y": 20, "w": 30, "h": 25},
                {"object_id": 3, "names": ["sky"], "x": 60, "y": 0, "w": 40, "h": 10},
                {"object_id": 4, "names": [], "x": 1, "y": 1, "w": 2, "h": 2},
                {"object_id": 5, "names": ["dot"], "x": 1, "y": 1, "w": 0, "h": 2},
            ],
        }
    ]
    image_data = [
        {"image_id": 1, "width": 100, "height": 80, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg"},
        {"image_id": 2, "width": 20, "height": 20, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg"},
    ]
    return {
        "regions": write_json(tmp_path / "region_descriptions.json", regions),
        "objects": write_json(tmp_path / "objects.json", objects),
        "image_data": write_json(tmp_path / "image_data.json", image_data),
        "image_root": str(tmp_path / "VG"),
    }


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def wds_files(tmp_path: Path) -> dict:
    folder = tmp_path / "wds"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        add_member(tar, "000000.jpg", b"\xff\xd8jpeg0")
        add_member(tar, "000000.txt", "a bird on a wire ".encode())
        meta = {"width": 256, "height": 192, "url": "http://e.com/0.jpg", "caption": "the txt wins"}
        add_member(tar, "000000.json", json.dumps(meta).encode())
        add_member(tar, "000001.jpg", b"\xff\xd8jpeg1")  # no txt: caption from the json
        meta = {"width": 64, "height": 64, "caption": "a boat under a bridge"}
        add_member(tar, "000001.json", json.dumps(meta).encode())
        add_member(tar, "000002.jpg", b"\xff\xd8jpeg2")  # neither txt nor caption
        add_member(tar, "000002.json", json.dumps({"width": 64, "height": 64}).encode())
        add_member(tar, "000003.txt", b"a caption without an image")
        add_member(tar, "000004.png", b"png")
        add_member(tar, "000004.txt", b"a png image")
        add_member(tar, "000004.json", b"{not json")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, "000010.jpg", b"\xff\xd8" + b"a" * 2000)
        add_member(tar, "000010.txt", b"a cup on a table")
        add_member(tar, "000011.jpg", b"\xff\xd8" + b"b" * 2000)
        add_member(tar, "000011.txt", b"a lost caption")
    # Cut inside 000011.jpg's data: 000010 survives, 000011 is lost.
    (folder / "00001.tar").write_bytes(buf.getvalue()[: 512 * 11])
    return {"inputs": [str(folder / "0000*.tar"), str(folder / "00009.tar")]}  # the second is missing


CSV_TEXT = (
    "caption,path,width,height\n"
    '"a dog, on a sofa",imgs/1.jpg,640,480\n'
    ",imgs/2.jpg,10,10\n"
    "a lonely caption,,10,10\n"
    "too,many,fields,here,now\n"
    "a cat near a window,https://e.com/c.jpg,x,y\n"
    '"two\nlines",/abs/3.jpg,5,5\n'
)


def csv_files(tmp_path: Path) -> dict:
    (tmp_path / "pairs.csv").write_text(CSV_TEXT)
    return {"inputs": [str(tmp_path / "pairs.csv")]}


def tsv_files(tmp_path: Path) -> dict:
    data = (
        b'the "best" dog on a rug\thttp://e.com/1.jpg\n'
        b"three\tfields\there\n"
        b"bad bytes \xff\xfe here\thttp://e.com/2.jpg\n"
        b"a car behind a truck\thttp://e.com/3.jpg\n"
    )
    (tmp_path / "cc.tsv").write_bytes(data)
    return {"inputs": [str(tmp_path / "cc.tsv")], "columns": "caption,url"}


def jsonl_files(tmp_path: Path) -> dict:
    lines = [
        json.dumps({"caption": "a dog left of a cat", "image": "x.jpg", "width": 10, "height": 10,
                    "objects": [{"name": "dog", "box": [1, 1, 5, 5]}, {"name": "cat", "box": [5, 5, 1, 1]}]}),
        "not json",
        json.dumps({"caption": 3, "url": "http://e.com/3.jpg"}),
        "",
        json.dumps([1, 2]),
        json.dumps({"caption": "a kite above a tree", "path": "/abs/y.jpg", "id": "my id!"}),
        json.dumps({"caption": "no image at all"}),
    ]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return {"inputs": [str(tmp_path / "pairs.jsonl")]}


FIXTURES = {"coco": coco_files, "vg": vg_files, "wds": wds_files, "csv": csv_files, "tsv": tsv_files, "jsonl": jsonl_files}


def read(source: str, options: dict, parts: Parts = Parts()) -> tuple[list[dict], SkipLog]:
    skips = SkipLog()
    records = list(READERS[source](**reader_options(source, options), skips=skips, parts=parts))
    return records, skips


# ---------------------------------------------------------------------------------------------
# Readers


def test_coco_records_boxes_and_skips(tmp_path):
    records, skips = read("coco", coco_files(tmp_path))
    by_id = {r["id"]: r for r in records}
    assert list(by_id) == ["coco-1-11", "coco-2-21", "coco-4-42", "coco-4-43"]
    first = by_id["coco-1-11"]
    assert first["caption"] == "A man riding a horse."
    assert first["image"] == str(tmp_path / "train" / "000001.jpg")
    assert (first["source"], first["width"], first["height"]) == ("coco", 100, 80)
    # xywh → xyxy, clipped to the 100 x 80 image; crowd kept and marked.
    assert first["objects"] == [
        {"name": "person", "box": [10.0, 20.0, 40.0, 60.0]},
        {"name": "horse", "box": [90.5, 70.0, 100.0, 80.0]},
        {"name": "person", "box": [0.0, 0.0, 10.0, 10.0], "crowd": True},
    ]
    assert by_id["coco-2-21"]["objects"] == []  # instances given, none for this image
    assert skips.counts == Counter(
        empty_caption=1, bad_caption=1, unknown_image=1, bad_image_entry=1, bad_annotation=1, missing_caption=1,
        object_bad_box=1, object_unknown_category=1,
    )  # fmt: skip

    plain, _ = read("coco", {k: v for k, v in coco_files(tmp_path).items() if k != "instances"})
    assert [r["id"] for r in plain] == list(by_id) and all("objects" not in r for r in plain)


def test_vg_records_regions_and_objects(tmp_path):
    records, skips = read("vg", vg_files(tmp_path))
    by_id = {r["id"]: r for r in records}
    assert list(by_id) == ["vg-1-100", "vg-1-102", "vg-1-103", "vg-2-200"]
    man = by_id["vg-1-100"]
    assert man["image"] == str(tmp_path / "VG" / "VG_100K" / "1.jpg")
    assert (man["width"], man["height"], man["region"]) == (100, 80, [0.0, 0.0, 50.0, 50.0])
    assert man["objects"] == [
        {"name": "man", "box": [5.0, 5.0, 25.0, 45.0]},
        {"name": "horse", "box": [10.0, 20.0, 40.0, 45.0]},
    ]
    assert [o["name"] for o in by_id["vg-1-102"]["objects"]] == ["sky"]
    # A region outside the image keeps its phrase, has no region box, and keeps all the objects.
    assert "region" not in by_id["vg-1-103"] and len(by_id["vg-1-103"]["objects"]) == 3
    assert by_id["vg-2-200"]["image"].endswith("VG/VG_100K_2/2.jpg") and by_id["vg-2-200"]["objects"] == []
    assert skips.counts == Counter(
        empty_caption=1, missing_caption=1, bad_image_entry=1, region_bad_box=1, object_no_name=1, object_bad_box=1
    )
    everything, _ = read("vg", {**vg_files(tmp_path), "min_object_overlap": 0})
    assert len(everything[0]["objects"]) == 3


def test_wds_tars_missing_txt_and_truncation(tmp_path):
    records, skips = read("wds", {**wds_files(tmp_path), "source_name": "cc3m"})
    folder = tmp_path / "wds"
    # Image references carry the member's data offset and size (one 512-byte header per member here).
    assert records == [
        {"id": "cc3m-000000", "image": f"{folder}/00000.tar#000000.jpg@512:7", "caption": "a bird on a wire",
         "source": "cc3m", "width": 256, "height": 192, "url": "http://e.com/0.jpg"},
        {"id": "cc3m-000001", "image": f"{folder}/00000.tar#000001.jpg@3584:7", "caption": "a boat under a bridge",
         "source": "cc3m", "width": 64, "height": 64},
        {"id": "cc3m-000004", "image": f"{folder}/00000.tar#000004.png@8704:3", "caption": "a png image",
         "source": "cc3m"},
        {"id": "cc3m-000010", "image": f"{folder}/00001.tar#000010.jpg@512:2002", "caption": "a cup on a table",
         "source": "cc3m"},
    ]  # fmt: skip
    assert skips.counts == Counter(missing_caption=1, missing_image=1, sidecar_bad_json=1, truncated_tar=1, missing_input=1)
    assert split_tar_ref(records[0]["image"]) == (f"{folder}/00000.tar", "000000.jpg")
    assert split_tar_ref("/data/a#b.jpg") is None



def test_tar_member_references_are_read(tmp_path, s3_env):
    records, _ = read("wds", {**wds_files(tmp_path), "source_name": "cc3m"})
    assert storage.read_bytes(records[0]["image"]) == b"\xff\xd8jpeg0"
    assert storage.read_bytes(records[3]["image"]) == b"\xff\xd8" + b"a" * 2000  # before the damage
    folder = tmp_path / "wds"
    with pytest.raises(OSError, match="truncated"):  # header kept, data cut
        storage.read_bytes(f"{folder}/00001.tar#000011.jpg")
    with pytest.raises(FileNotFoundError, match="not in"):
        storage.read_bytes(f"{folder}/00000.tar#999999.jpg")
    with tarfile.open(folder / "c.tar.gz", "w:gz") as tar:  # compressed: a streaming scan
        add_member(tar, "k.jpg", b"gz-member")
    assert storage.read_bytes(f"{folder}/c.tar.gz#k.jpg") == b"gz-member"
    s3_env.mkdir("tar-refs")
    s3_env.pipe_file("tar-refs/web/00000.tar", (folder / "00000.tar").read_bytes())  # ranged reads on S3
    assert storage.read_bytes("s3://tar-refs/web/00000.tar#000001.jpg") == b"\xff\xd8jpeg1"


def test_make_shards_reads_images_inside_tars(tmp_path):
    from conftest import make_image, sample_line, write_manifest
    from sapretrain import tars
    from sapretrain.shards.writer import ShardConfig, make_shards

    with tarfile.open(tmp_path / "web-00000.tar", "w") as tar:
        for i in range(4):
            make_image(tmp_path / f"{i}.jpg", seed=i)
            tar.add(tmp_path / f"{i}.jpg", arcname=f"{i:06d}.jpg")
    with open(tmp_path / "web-00000.tar", "rb") as f:  # 0 and 1 located (as collect_captions writes them)
        located = {m.name: tars.make_ref("web-00000.tar", m.name, m.offset, m.size) for m in tars.files(f)}
    lines = [sample_line(i, located[f"{i:06d}.jpg"] if i < 2 else f"web-00000.tar#{i:06d}.jpg", i ^ 1)
             for i in range(4)]
    lines.append(sample_line(4, "web-00000.tar#000099.jpg", 0))  # not in the tar
    manifest = write_manifest(tmp_path / "manifest.jsonl", lines)
    report = make_shards(str(manifest), str(tmp_path / "shards"), ShardConfig(image_size=64, roi_size=64),
                         progress=False)
    assert report.summary["records"] == 2  # two mutual pairs
    assert report.summary["skipped"]["counts"] == {"missing_image": 1}


# ---------------------------------------------------------------------------------------------
# img2dataset shards: the parquet beside the tar, _stats.json, located references over S3

SHARD_ROWS = [  # key, status, caption, error_message
    ("000000000", "success", "a dog on a bench", None),
    ("000000001", "failed_to_download", "never here", "<urlopen error timed out>"),
    ("000000002", "success", "  a cat   under a table ", None),
    ("000000003", "failed_to_resize", "too small", "image size is too small"),
    ("000000004", "failed_to_download", "gone", "HTTP Error 404: Not Found"),
    ("000000005", "success", None, None),  # img2dataset keeps a sample whose caption is null
]


def img2dataset_shard(folder: Path, parquet: bool = True, stats: bool = True) -> str:
    """One shard as img2dataset writes it: 00000.tar (successes), 00000.parquet (every row),
    00000_stats.json; returns the tar's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for n, (key, status, caption, error) in enumerate(SHARD_ROWS):
            meta = {"url": f"http://e.com/{n}.jpg", "caption": caption, "key": key, "status": status,
                    "error_message": error, "width": 64 if status == "success" else None,
                    "height": 48 if status == "success" else None, "original_width": 640, "exif": "{}"}
            rows.append(meta)
            if status == "success":
                add_member(tar, f"{key}.jpg", b"\xff\xd8" + key.encode())
                if caption is not None:
                    add_member(tar, f"{key}.txt", caption.encode())
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
    if parquet:
        pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    if stats:
        counts = Counter(status for _, status, _, _ in SHARD_ROWS)
        write_json(folder / "00000_stats.json", {
            "count": len(SHARD_ROWS), "successes": counts["success"], "failed_to_download": counts["failed_to_download"],
            "failed_to_resize": counts["failed_to_resize"], "duration": 1.5, "start_time": 0.0, "end_time": 1.5,
            "status_dict": {"success": 3, "<urlopen error timed out>": 1, "HTTP Error 404: Not Found": 1}})
    return str(folder / "00000.tar")


def test_img2dataset_parquet_gives_the_captions_without_opening_the_tar(tmp_path, monkeypatch):
    import fsspec

    from sapretrain import tars

    tar = img2dataset_shard(tmp_path / "web")
    opened, real_open = [], fsspec.open
    monkeypatch.setattr(fsspec, "open", lambda url, *a, **k: opened.append(str(url)) or real_open(url, *a, **k))
    monkeypatch.setattr(tars, "files", lambda *a, **k: pytest.fail("the tar was read"))
    records, skips = read("wds", {"inputs": tar, "source_name": "cc12m"})
    assert [url for url in opened if ".tar" in url] == [] and opened == [str(tmp_path / "web" / "00000.parquet")]
    assert records == [
        {"id": "cc12m-000000000", "image": f"{tar}#000000000.jpg", "caption": "a dog on a bench", "source": "cc12m",
         "width": 64, "height": 48, "url": "http://e.com/0.jpg"},
        {"id": "cc12m-000000002", "image": f"{tar}#000000002.jpg", "caption": "a cat under a table",
         "source": "cc12m", "width": 64, "height": 48, "url": "http://e.com/2.jpg"},
    ]  # fmt: skip
    assert skips.counts == Counter(failed_to_download=2, failed_to_resize=1, missing_caption=1)
    assert "HTTP Error 404" in skips.examples["failed_to_download"][1]
    monkeypatch.undo()
    assert storage.read_bytes(records[1]["image"]) == b"\xff\xd8000000002"  # KEY.jpg is in the tar
    from sapretrain.cli.collect_captions import main

    out = tmp_path / "png.jsonl"
    assert main(["--source", "wds", "--input", tar, "--image-ext", "PNG", "--output", str(out), "--no-progress"]) == 0
    png = [json.loads(line) for line in out.read_text().splitlines()]
    assert png[0]["image"] == f"{tar}#000000000.png"  # img2dataset --encode_format png
    with pytest.raises(ValueError, match="an extension such as jpg"):
        read("wds", {"inputs": tar, "image_ext": ".jpg"})
    with pytest.raises(ValueError, match="--image-ext does not apply to --source csv"):
        reader_options("csv", {"inputs": "a.csv", "image_ext": "png"})


def test_without_a_parquet_the_tar_scan_and_stats_give_the_same_records_and_counts(tmp_path):
    with_parquet, parquet_skips = read("wds", {"inputs": img2dataset_shard(tmp_path / "a")})
    scanned, scan_skips = read("wds", {"inputs": img2dataset_shard(tmp_path / "b", parquet=False)})
    strip = lambda r: {k: v for k, v in r.items() if k != "image"}  # noqa: E731
    assert [strip(r) for r in scanned] == [strip(r) for r in with_parquet]
    assert scan_skips.counts == parquet_skips.counts == Counter(failed_to_download=2, failed_to_resize=1,
                                                                missing_caption=1)
    assert scanned[0]["image"].endswith("00000.tar#000000000.jpg@512:11")  # the scan locates the members
    no_stats, skips = read("wds", {"inputs": img2dataset_shard(tmp_path / "c", parquet=False, stats=False)})
    assert len(no_stats) == 2 and skips.counts == Counter(missing_caption=1)  # the failures are not in the tar


def test_an_unreadable_parquet_is_counted_and_the_tar_scanned(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tar = img2dataset_shard(tmp_path / "web", stats=False)
    parquet = tmp_path / "web" / "00000.parquet"
    parquet.write_bytes(b"PAR1 not really")
    records, skips = read("wds", {"inputs": tar})
    assert [r["id"] for r in records] == ["wds-000000000", "wds-000000002"] and "@" in records[0]["image"]
    assert skips.counts == Counter(unreadable_parquet=1, missing_caption=1)
    pq.write_table(pa.table({"key": ["000000000"], "caption": ["x"]}), parquet)  # no status column
    records, skips = read("wds", {"inputs": tar})
    assert len(records) == 2 and "no 'key'/'status' column" in skips.examples["unreadable_parquet"][0]
    (tmp_path / "web" / "00000.tar").unlink()
    pq.write_table(pa.Table.from_pylist([{"key": "1", "status": "success", "caption": "x"}]), parquet)
    assert read("wds", {"inputs": tar})[1].counts == Counter(missing_input=1)


class CountingFS:
    """A filesystem proxy that records each call (name, keyword arguments, bytes returned)."""

    def __init__(self, fs, calls: list):
        self._fs, self._calls = fs, calls

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            result = attr(*args, **kwargs)
            self._calls.append((name, kwargs, len(result) if isinstance(result, bytes) else None))
            return result

        return call


def test_located_refs_over_s3_are_one_ranged_read_and_a_stale_one_is_caught(tmp_path, s3_env, monkeypatch):
    from sapretrain import tars

    fs = s3_env
    fs.mkdir("web-tars")
    tar = img2dataset_shard(tmp_path / "web")
    fs.put_file(tar, "web-tars/cc12m/00000.tar")
    fs.put_file(str(tmp_path / "web" / "00000_stats.json"), "web-tars/cc12m/00000_stats.json")
    records, skips = read("wds", {"inputs": "s3://web-tars/cc12m/*.tar"})
    assert skips.counts == Counter(failed_to_download=2, failed_to_resize=1, missing_caption=1)
    ref = records[1]["image"]
    assert ref == "s3://web-tars/cc12m/00000.tar#000000002.jpg@3584:11"

    calls, real = [], storage.url_to_fs
    monkeypatch.setattr(storage, "url_to_fs", lambda url: (CountingFS(real(url)[0], calls), real(url)[1]))
    monkeypatch.setattr(storage, "open_retrying", lambda *a, **k: pytest.fail("the tar was scanned"))
    tars._INDEXES.pop("s3://web-tars/cc12m/00000.tar", None)
    assert storage.read_bytes(ref) == b"\xff\xd8000000002"
    assert calls == [("cat_file", {"start": 3584 - 512, "end": 3584 + 11}, 512 + 11)]  # one ranged GET
    assert "s3://web-tars/cc12m/00000.tar" not in tars._INDEXES
    monkeypatch.undo()

    with tarfile.open(tmp_path / "rewritten.tar", "w") as rewritten:  # the shard re-made: one more member first
        add_member(rewritten, "000000000.extra", b"x" * 700)
        with tarfile.open(tar) as original:
            for info in original:
                rewritten.addfile(info, original.extractfile(info))
    fs.put_file(str(tmp_path / "rewritten.tar"), "web-tars/cc12m/00000.tar")
    storage.url_to_fs("s3://web-tars")[0].invalidate_cache()  # the glob above listed the old object
    tars.STALE_OFFSETS.pop("s3://web-tars/cc12m/00000.tar", None)
    assert storage.read_bytes(ref) == b"\xff\xd8000000002"  # found by name (index over S3)
    assert tars.STALE_OFFSETS["s3://web-tars/cc12m/00000.tar"] == 1

    fs.put_file(str(tmp_path / "web" / "00000.parquet"), "web-tars/cc12m/00000.parquet")
    storage.url_to_fs("s3://web-tars")[0].invalidate_cache()
    from_parquet, _ = read("wds", {"inputs": "s3://web-tars/cc12m/00000.tar"})
    assert [r["image"] for r in from_parquet] == ["s3://web-tars/cc12m/00000.tar#000000000.jpg",
                                                  "s3://web-tars/cc12m/00000.tar#000000002.jpg"]


def test_csv_rows(tmp_path):
    records, skips = read("csv", csv_files(tmp_path))
    assert [(r["id"], r["caption"], r["image"]) for r in records] == [
        ("csv-pairs-0", "a dog, on a sofa", str(tmp_path / "imgs" / "1.jpg")),
        ("csv-pairs-4", "a cat near a window", "https://e.com/c.jpg"),
        ("csv-pairs-5", "two lines", "/abs/3.jpg"),
    ]
    assert (records[0]["width"], records[0]["height"]) == (640, 480) and "width" not in records[1]
    assert skips.counts == Counter(empty_caption=1, missing_image=1, bad_row=1)

    with pytest.raises(ValueError, match="no caption column 'text'"):
        read("csv", {**csv_files(tmp_path), "caption_column": "text"})
    root, _ = read("csv", {**csv_files(tmp_path), "image_root": "s3://bucket/images", "image_column": "path"})
    assert root[0]["image"] == "s3://bucket/images/imgs/1.jpg"


def test_tsv_headerless_unquoted(tmp_path):
    records, skips = read("tsv", {**tsv_files(tmp_path), "source_name": "cc3m"})
    assert [(r["id"], r["caption"], r["image"]) for r in records] == [
        ("cc3m-cc-0", 'the "best" dog on a rug', "http://e.com/1.jpg"),
        ("cc3m-cc-3", "a car behind a truck", "http://e.com/3.jpg"),
    ]
    assert skips.counts == Counter(bad_row=1, bad_encoding=1)


def test_jsonl_lines(tmp_path):
    records, skips = read("jsonl", jsonl_files(tmp_path))
    assert [(r["id"], r["image"]) for r in records] == [
        ("jsonl-pairs-0", str(tmp_path / "x.jpg")),
        ("jsonl-my_id", "/abs/y.jpg"),
    ]
    assert records[0]["objects"] == [{"name": "dog", "box": [1.0, 1.0, 5.0, 5.0]}]
    assert skips.counts == Counter(bad_json=2, bad_caption=1, missing_image=1, object_bad_box=1)


def two_jsonl_files(tmp_path: Path) -> dict:
    """Several files: parts take a share of the files (the second has an id field)."""
    first = jsonl_files(tmp_path)["inputs"][0]
    second = tmp_path / "more.jsonl"
    second.write_text("\n".join(json.dumps({"caption": f"a cup on a table {i}", "image": f"{i}.jpg"})
                                for i in range(4)) + "\nnot json\n")
    return {"inputs": [first, str(second)]}


def single_line_csv_files(tmp_path: Path) -> dict:
    """CSV_TEXT without its quoted newline: a single plain file is split by bytes."""
    (tmp_path / "pairs.csv").write_text(CSV_TEXT.replace('"two\nlines"', '"two, lines"') * 3)
    return {"inputs": [str(tmp_path / "pairs.csv")]}


PART_FIXTURES = {**FIXTURES, "csv": single_line_csv_files, "jsonl-files": two_jsonl_files}


@pytest.mark.parametrize("num_parts", [2, 3, 7])
@pytest.mark.parametrize("name", sorted(PART_FIXTURES))
def test_parts_partition_records_and_skips(tmp_path, name, num_parts):
    source = name.split("-")[0]
    options = PART_FIXTURES[name](tmp_path)
    whole, whole_skips = read(source, options)
    records, skips = [], Counter()
    for part in range(num_parts):
        part_records, part_skips = read(source, options, Parts(part, num_parts))
        records += part_records
        skips += part_skips.counts
    assert whole and records == whole  # contiguous shares: the parts in order are the whole run
    assert skips == whole_skips.counts


def test_csv_split_by_bytes_counts_a_row_across_lines(tmp_path):
    options = csv_files(tmp_path)  # its last row's quoted caption holds a newline
    whole, _ = read("csv", options)
    assert whole[-1]["caption"] == "two lines"
    records, skips = [], SkipLog()
    for part in range(2):
        part_records, part_skips = read("csv", options, Parts(part, 2))
        records += part_records
        skips.merge(part_skips)
    assert records == whole[:-1]  # the two pieces of the last row are not read as a row
    assert skips.counts["bad_row"] == 3 and sum("quoted field holds a newline" in x for x in skips.examples["bad_row"]) == 2


def test_a_single_compressed_file_goes_whole_to_part_0(tmp_path):
    with gzip.open(tmp_path / "pairs.csv.gz", "wt") as f:
        f.write(CSV_TEXT)
    options = {"inputs": [str(tmp_path / "pairs.csv.gz")]}
    whole, _ = read("csv", options)
    assert read("csv", options, Parts(0, 2))[0] == whole and read("csv", options, Parts(1, 2))[0] == []


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="--instances does not apply to --source csv"):
        reader_options("csv", {"inputs": ["a.csv"], "instances": "x.json"})
    with pytest.raises(ValueError, match="--source coco needs --captions"):
        reader_options("coco", {"image_root": "x"})
    with pytest.raises(ValueError, match="--source vg needs --image-root"):
        reader_options("vg", {"regions": "r.json"})


def test_collect_parts_write_part_files_that_read_as_the_whole_output(tmp_path):
    options = single_line_csv_files(tmp_path)
    whole = collect("csv", str(tmp_path / "whole.jsonl"), options, progress=False)
    for part in range(3):
        report = collect("csv", str(tmp_path / "caps.jsonl"), options, Parts(part, 3), progress=False)
        assert report.output == str(tmp_path / f"caps-part{part:05d}-of00003.jsonl")
    from sapretrain.jobs import expand_inputs  # the next stage reads caps.jsonl as its part files

    parts = "".join(open(u).read() for u in expand_inputs(str(tmp_path / "caps.jsonl")))
    assert whole.records and parts == (tmp_path / "whole.jsonl").read_text()


def test_collect_atomic_gzip_limit_and_resume(tmp_path):
    options = csv_files(tmp_path)
    out = tmp_path / "out" / "caps.jsonl.gz"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "caps.jsonl.gz.tmp.12345").write_text("left by a killed run")
    report = collect("csv", str(out), options, Parts(0, 1), limit=2, progress=False)
    path = out
    lines = [json.loads(x) for x in gzip.open(path, "rt")]
    assert report.records == 2 and [x["id"] for x in lines] == ["csv-pairs-0", "csv-pairs-4"]
    # no temp left behind; the marker records what the output was made from
    assert sorted(os.listdir(tmp_path / "out")) == ["caps.jsonl.gz", "caps.jsonl.gz.done.json"]
    assert collect("csv", str(out), options, limit=2, progress=False).already_done
    with pytest.raises(ValueError, match="other settings"):  # 2 records are not what an unlimited run asks for
        collect("csv", str(out), options, progress=False)


# ---------------------------------------------------------------------------------------------
# The tool


def run_tool(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *args, "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT)


def test_cli_end_to_end(tmp_path):
    files = coco_files(tmp_path)
    out = tmp_path / "captions.jsonl"
    args = ["--source", "coco", "--captions", files["captions"], "--instances", files["instances"],
            "--image-root", files["image_root"], "--output", str(out)]  # fmt: skip
    run = run_tool(*args)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["coco-1-11", "coco-2-21", "coco-4-42", "coco-4-43"]
    assert "records written: 4" in run.stdout and "unknown_image: 1" in run.stdout and "skipped: 8" in run.stdout
    assert "already exists" in run_tool(*args).stdout

    # Parts over several processes: their outputs together are the whole output.
    parts = []
    for part in range(2):
        run = run_tool(*args[:-1], str(tmp_path / "p.jsonl"), "--part", str(part), "--num-parts", "2")
        assert run.returncode == 0, run.stderr
        parts += [json.loads(x) for x in (tmp_path / f"p-part{part:05d}-of00002.jsonl").read_text().splitlines()]
    assert parts == lines

    wrong = run_tool("--source", "csv", "--input", "a.csv", "--instances", "i.json", "--output", str(tmp_path / "x.jsonl"))
    assert wrong.returncode == 2 and "--instances does not apply to --source csv" in wrong.stderr


def test_s3_inputs_and_output(tmp_path, s3_env):
    fs = s3_env
    fs.mkdir("sources-test")
    wds_files(tmp_path)
    fs.put(str(tmp_path / "wds"), "sources-test/wds", recursive=True)
    fs.put_file(coco_files(tmp_path)["captions"], "sources-test/coco/captions.json")

    options = {"inputs": ["s3://sources-test/wds/*.tar"], "source_name": "cc3m"}
    report = collect("wds", "s3://sources-test/out/cc3m.jsonl", options, progress=False)
    lines = [json.loads(x) for x in fs.cat_file("sources-test/out/cc3m.jsonl").decode().splitlines()]
    assert report.records == 4 and lines[0]["image"] == "s3://sources-test/wds/00000.tar#000000.jpg@512:7"
    assert report.skips.counts == Counter(missing_caption=1, missing_image=1, sidecar_bad_json=1, truncated_tar=1)
    assert not [p for p in fs.find("sources-test/out") if ".tmp" in p]

    coco = {"captions": "s3://sources-test/coco/captions.json", "image_root": "s3://sources-test/coco/train"}
    records, _ = read("coco", coco)
    assert records[0]["image"] == "s3://sources-test/coco/train/000001.jpg"
