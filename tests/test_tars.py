"""The one tar reader (``sapretrain.tars``): webdataset's record-key rule, damage as ``BadTar``,
what each caller counts when a tar is damaged, and no webdataset patch on import."""
from __future__ import annotations

import gzip
import io
import random
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from conftest import PROJECT_ROOT
from sapretrain import storage, tars
from sapretrain.curation.sources import read_tar
from sapretrain.shards.manifest import SkipLog

# Names that exercise the rule: dotted extensions, upper case, directories (dots in them too),
# webdataset's __meta__ names, no extension, a hidden file, a key that comes back later.
NAMES = [
    "000001.json", "000001.a.subj.JPG", "000001.TXT",
    "dir/000002.jpg", "dir/000002.txt",
    "d.v2/000003.jpg", "d.v2/000003.Json",
    "__index__", "__meta__/x.json", "README",
    "img.v2.jpg", "img.v2.txt",
    "000001.cls",
    "d/.x",
]


def tar_bytes(members: list[tuple[str, bytes]], end: bool = True, directory: str | None = None,
              compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if directory:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            link = tarfile.TarInfo(f"{directory}/000002.lnk")
            link.type, link.linkname = tarfile.SYMTYPE, "000002.jpg"
            tar.addfile(link)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if not end:  # cut the end-of-archive blocks: the archive stops at a header boundary
        size = sum(512 + -(-len(d) // 512) * 512 for _, d in members)
        data = data[:size]
    return gzip.compress(data, mtime=0) if compress else data


def webdataset_key(name: str):
    """webdataset's own answer: tar_file_iterator's meta skip, base_plus_ext, lcase."""
    if name.startswith("__") and ("/" in name or name.endswith("__")):
        return None
    key, ext = base_plus_ext(name)
    return None if key is None else (key, ext.lower())


def test_the_key_rule_is_webdatasets():
    assert tars.split_key("d/000012.a.subj.JPG") == ("d/000012", "a.subj.jpg")
    assert tars.split_key("img.v2.jpg") == ("img", "v2.jpg")  # a key cannot hold a dot: ids are dot-free
    assert tars.split_key("d.v2/000003.Json") == ("d.v2/000003", "json")  # dots in directories are kept
    assert tars.split_key("README") is None and tars.split_key("dir/README") is None
    assert tars.split_key("__index__") is None and tars.split_key("__meta__/x.json") is None
    assert tars.split_key("a/__x__.json") == ("a/__x__", "json")  # only a leading __NAME__ is metadata
    assert tars.split_key("d/.x") == ("d/", "x")  # webdataset's regex, kept for compatibility
    for name in NAMES + ["a/__x__.json", ".hidden", "a..b", "x.", "a/b.c/d"]:
        assert tars.split_key(name) == webdataset_key(name), name


def test_records_equal_webdatasets_own_reading(tmp_path):
    members = [(name, f"<{name}>".encode()) for name in NAMES]
    path = tmp_path / "mixed.tar"
    path.write_bytes(tar_bytes(members, directory="dir"))
    with open(path, "rb") as f:
        ours = list(tars.records(f, str(path)))
    theirs = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"}  # noqa: E731
    assert [strip(r) for r in ours] == [strip(r) for r in theirs]
    assert [r["__key__"] for r in ours] == ["000001", "dir/000002", "d.v2/000003", "img", "000001", "d/"]
    first = ours[0]
    assert first == {"__key__": "000001", "__url__": str(path), "json": b"<000001.json>",
                     "a.subj.jpg": b"<000001.a.subj.JPG>", "txt": b"<000001.TXT>"}
    assert tars.list_keys(str(path)) == [r["__key__"] for r in ours]


def test_stray_members_are_reported_and_a_repeated_extension_is_damage():
    seen = []
    data = tar_bytes([("a.jpg", b"1"), ("README", b"2"), ("__index__", b"3"), ("b.jpg", b"4")])
    assert [r["__key__"] for r in tars.records(io.BytesIO(data), "t.tar", stray=seen.append)] == ["a", "b"]
    assert seen == ["README", "__index__"]
    twice = tar_bytes([("a.jpg", b"1"), ("a.JPG", b"2")])
    with pytest.raises(tars.BadTar, match="second .jpg member"):
        list(tars.records(io.BytesIO(twice), "t.tar"))


def test_skip_and_early_stop_read_no_member_outside_the_wanted_records():
    data = tar_bytes([(f"{k}.{ext}", b"x" * 600) for k in "abcd" for ext in ("jpg", "json")])
    read = []

    def value(member):
        read.append(member.name)
        return member.read()

    stream = tars.records(io.BytesIO(data), "t.tar", skip=1, read=value)
    assert next(stream)["__key__"] == "b"
    assert read == ["b.jpg", "b.json"]  # a's members stepped over, c's header seen but c.jpg not read
    stream.close()


@pytest.mark.parametrize("damage, match, before", [
    ("mid_member", "c.jpg truncated|unexpected end", ["a", "b"]),
    ("no_end_block", "end-of-archive block", ["a", "b"]),  # c looks whole, but more of it may be lost
    ("garbage_header", "end-of-archive block.*InvalidHeaderError", ["a"]),  # b's members may go on
    ("gzip_cut", "bad.tar", None),
])
def test_a_damaged_tar_gives_the_records_before_it_then_badtar(damage, match, before):
    members = [(f"{k}.{ext}", random.Random(k + ext).randbytes(700)) for k in "abc" for ext in ("jpg", "txt")]
    data = tar_bytes(members, end=damage != "no_end_block", compress=damage == "gzip_cut")
    if damage == "mid_member":
        data = data[: 4 * 1536 + 512 + 300]  # a, b whole; c.jpg's header and part of its data
    elif damage == "garbage_header":
        data = data[: 4 * 1536] + b"\x07" * 512 + data[4 * 1536 + 512:]  # c.jpg's header overwritten
    elif damage == "gzip_cut":
        data = data[: len(data) * 2 // 3]
    got = []
    with pytest.raises(tars.BadTar, match=match) as error:
        for record in tars.records(io.BytesIO(data), "bad.tar"):
            got.append(record["__key__"])
    assert isinstance(error.value, tarfile.ReadError) and "bad.tar" in str(error.value)
    assert error.value.members >= (2 * len(before) if before else 1)  # headers read before the damage
    assert got == before if before is not None else got in (["a"], ["a", "b"])  # c may lack members


@pytest.mark.parametrize("data", [b"", b"not a tar at all" * 64, gzip.compress(b"not a tar" * 200)])
def test_not_a_tar_is_badtar_with_no_members(data):
    with pytest.raises(tars.BadTar) as error:
        list(tars.records(io.BytesIO(data), "x.tar"))
    assert error.value.members == 0


def test_members_by_name_of_a_damaged_tar(tmp_path):
    members = [(f"{k}.jpg", random.Random(k).randbytes(700)) for k in "abc"]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar_bytes(members)[: 2 * 1536 + 512 + 100])
    assert sorted(tars.index(str(cut))) == ["a.jpg", "b.jpg", "c.jpg"]  # c's header is there, its data not
    assert tars.read_member(str(cut), "b.jpg") == members[1][1]
    with pytest.raises(OSError, match="truncated tar"):
        tars.read_member(str(cut), "c.jpg")
    with pytest.raises(FileNotFoundError):
        tars.read_member(str(cut), "d.jpg")
    gz = tmp_path / "cut.tar.gz"
    gz.write_bytes(tar_bytes(members, compress=True)[:2000])  # a whole, b cut
    assert tars.read_member(str(gz), "a.jpg") == members[0][1]  # a streaming scan reaches it
    with pytest.raises(OSError, match="damaged"):
        tars.read_member(str(gz), "c.jpg")
    assert tars.split_ref(f"{gz}#c.jpg") == (str(gz), "c.jpg") and tars.split_ref("a.jpg#b") is None


# ---------------------------------------------------------------- located references: TAR#member@offset:size

LONG = "deep/" * 25 + "000007.jpg"  # 135 bytes: the full name is in a pax or ././@LongLink header


def located_tar(path, fmt=tarfile.PAX_FORMAT, order=None) -> dict[str, bytes]:
    """A tar of short, long and non-ASCII names; returns name -> data (written in ``order``)."""
    members = {"000001.jpg": b"\xff\xd8one", LONG: b"\xff\xd8long" * 50, "café/000002.jpg": b"\xff\xd8two" * 99,
               "000003.jpg": b"\xff\xd8six", "000004.jpg": b"\xff\xd8ten"}  # 3 and 4: the same size
    with tarfile.open(path, "w", format=fmt) as tar:
        for name in order or members:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return members


def located_refs(path) -> dict[str, str]:
    """name -> located reference, from a sequential read (what collect_captions does)."""
    with open(path, "rb") as f:
        return {m.name: tars.make_ref(str(path), m.name, m.offset, m.size) for m in tars.files(f, str(path))}


class CountingOpen:
    """``open`` for tars.py that counts the files opened and the bytes each read returns."""

    def __init__(self):
        self.opened, self.reads = [], []

    def __call__(self, path, *args, **kwargs):
        self.opened.append(str(path))
        return CountedFile(open(path, *args, **kwargs), self.reads)


class CountedFile:
    def __init__(self, f, reads: list):
        self.f, self.reads = f, reads

    def read(self, size=-1):
        data = self.f.read(size)
        self.reads.append(len(data))
        return data

    def seek(self, *args):
        return self.f.seek(*args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_ref_format_round_trip():
    ref = tars.make_ref("s3://b/cc3m/00012.tar", "000120034.jpg", 1536, 48213)
    assert ref == "s3://b/cc3m/00012.tar#000120034.jpg@1536:48213"
    assert tars.parse_ref(ref) == tars.TarRef("s3://b/cc3m/00012.tar", "000120034.jpg", 1536, 48213)
    assert str(tars.parse_ref(ref)) == ref
    assert tars.split_ref(ref) == ("s3://b/cc3m/00012.tar", "000120034.jpg")  # location dropped
    assert tars.parse_ref("a.tar#x.jpg") == tars.TarRef("a.tar", "x.jpg")
    assert tars.make_ref("a.tar.gz", "x.jpg", 1536, 10) == "a.tar.gz#x.jpg"  # no random access: no location
    assert tars.parse_ref("/data/a#b.jpg@512:3") is None
    for bad in ("a.tar#x.jpg@100:3", "a.tar#x.jpg@0:3"):  # not on a block, or where a header must be
        with pytest.raises(ValueError, match="not where a tar member's data can start"):
            tars.parse_ref(bad)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_a_located_ref_is_one_ranged_read_and_builds_no_index(tmp_path, monkeypatch, fmt):
    path = tmp_path / "00000.tar"
    members = located_tar(path, fmt)
    refs = located_refs(path)
    counting = CountingOpen()
    monkeypatch.setattr(tars, "open", counting, raising=False)
    monkeypatch.setattr(tars.storage, "open_retrying", lambda *a, **k: pytest.fail("the tar was scanned"))
    tars._INDEXES.pop(str(path), None)
    for name, data in members.items():
        counting.opened.clear(), counting.reads.clear()
        assert storage.read_bytes(refs[name]) == data
        assert counting.opened == [str(path)] and counting.reads == [512 + len(data)]  # header + data
    assert str(path) not in tars._INDEXES and not tars.STALE_OFFSETS[str(path)]


def test_make_shards_reads_a_located_ref_without_indexing_the_tar(tmp_path, monkeypatch):
    """The shard writer's bounded image read takes the size from the reference (no tar scan) and
    refuses an oversized member before reading it."""
    from sapretrain.shards import process
    from sapretrain.shards.schema import BadSample

    path = tmp_path / "00000.tar"
    members = located_tar(path)
    refs = located_refs(path)
    monkeypatch.setattr(tars, "index", lambda *a, **k: pytest.fail("the tar was indexed"))
    name, data = next(iter(members.items()))
    assert process.read_image_bytes(refs[name], max_bytes=len(data)) == data
    with pytest.raises(BadSample, match="image_too_large"):
        process.read_image_bytes(refs[name], max_bytes=len(data) - 1)


def test_a_stale_offset_is_detected_and_read_by_name(tmp_path, caplog):
    path = tmp_path / "00000.tar"
    members = located_tar(path)
    refs = located_refs(path)
    names = list(members)
    located_tar(path, order=names[::-1])  # the shard rewritten: every offset moves
    tars._INDEXES.pop(str(path), None)
    tars.STALE_OFFSETS.pop(str(path), None)
    with caplog.at_level("WARNING", logger="sapretrain.tars"):
        for name, data in members.items():
            assert storage.read_bytes(refs[name]) == data  # found by name after all
    assert tars.STALE_OFFSETS[str(path)] == len(members)
    assert sum("Was the tar rewritten" in r.getMessage() for r in caplog.records) == 1  # once per tar
    # 000003/000004 swapped: same size, so only the header's name tells them apart
    located_tar(path, order=names[:3] + ["000004.jpg", "000003.jpg"])
    tars._INDEXES.pop(str(path), None)
    assert storage.read_bytes(refs["000003.jpg"]) == members["000003.jpg"]
    assert tars.STALE_OFFSETS[str(path)] == len(members) + 1
    problem = tars._header_problem(path.read_bytes()[:2048], "000001.jpg", 999)
    assert "not a 999-byte file" in problem
    assert "no tar header" in tars._header_problem(b"\xff" * 1024, "000001.jpg", 512)


def test_a_located_ref_into_a_truncated_tar_says_truncated(tmp_path):
    path = tmp_path / "cut.tar"
    members = located_tar(path)
    refs = located_refs(path)
    data = path.read_bytes()
    ref = refs["café/000002.jpg"]
    offset = tars.parse_ref(ref).offset
    path.write_bytes(data[: offset + 10])  # its header whole, its data cut
    tars._INDEXES.pop(str(path), None)
    tars.STALE_OFFSETS.pop(str(path), None)
    with pytest.raises(OSError, match=r"10 of 495 bytes \(truncated tar\)"):
        storage.read_bytes(ref)
    assert not tars.STALE_OFFSETS[str(path)]  # the header matched: damage, not a stale offset
    assert storage.read_bytes(refs["000001.jpg"]) == members["000001.jpg"]
    with pytest.raises(FileNotFoundError):  # past the end: stale, and not in what is left of the tar
        storage.read_bytes(refs["000004.jpg"])
    assert tars.STALE_OFFSETS[str(path)] == 1


# ---------------------------------------------------------------- what each caller counts


def cut_shard(tmp_path, records: int = 3) -> str:
    """``records`` records of a.jpg + json + txt, cut inside the last record's a.jpg."""
    members = [(f"k{i}.{ext}", b"z" * 700) for i in range(records) for ext in ("a.jpg", "json", "txt")]
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(tar_bytes(members)[: (records - 1) * 3 * 1536 + 512 + 100])
    return str(path)


def test_the_loader_counts_a_damaged_shard_and_keeps_the_records_before_it(tmp_path):
    from sapretrain.data.loader import Counters, Slice, read_records

    url = cut_shard(tmp_path)
    counters = Counters()
    got = list(read_records([Slice(url, 0, 3)], counters))
    assert [r["__key__"] for r in got] == ["k0", "k1"]
    assert counters.bad_shards == {url: "truncated_shard"} and counters.missing_records == 1
    counters = Counters()
    assert [r["__key__"] for r in read_records([Slice(url, 1, 2)], counters)] == ["k1"]
    assert counters.bad_shards == {}  # the damage lies past the slice: never read


def test_check_and_sources_and_features_count_a_damaged_tar(tmp_path):
    from sapretrain.features import _read_source
    from sapretrain.shards.check import CheckReport, check_shard_bytes

    url = cut_shard(tmp_path)
    report = CheckReport()
    data = open(url, "rb").read()
    assert check_shard_bytes("shard-000000.tar", data, report) == 0  # k0, k1 lack the schema's members
    assert any("unreadable tar (BadTar" in p and "after 0 records" in p for p in report.problems)
    assert sum("missing members" in p for p in report.problems) == 2

    skips = SkipLog()
    assert list(_read_source(url, skips)) == []
    assert skips.counts == Counter(incomplete_record=2, truncated_shard=1)

    skips = SkipLog()
    assert [r["id"] for r in read_tar(url, skips, "web")] == []  # k0, k1: images named a.jpg, no caption
    assert skips.counts["truncated_tar"] == 1 and "key 'k2' dropped" in skips.examples["truncated_tar"][0]


def test_importing_the_loader_patches_nothing_and_the_opener_is_opt_in():
    code = (
        "import importlib, fsspec, webdataset as wds\n"
        "table = importlib.import_module('webdataset.gopen')\n"
        "before, gopen = dict(table.gopen_schemes), table.gopen\n"
        "import sapretrain.data.loader as loader\n"
        "assert dict(table.gopen_schemes) == before and table.gopen is gopen, 'import patched webdataset.gopen'\n"
        "loader.register_fsspec_gopen(('memory', 'pipe'))\n"
        "loader.register_fsspec_gopen(('memory', 'pipe'))\n"
        "assert table.gopen_schemes['pipe'] is before['pipe'], 'an existing handler was replaced'\n"
        "assert set(table.gopen_schemes) - set(before) == {'memory'}\n"
        "import io, tarfile\n"
        "buf = io.BytesIO()\n"
        "with tarfile.open(fileobj=buf, mode='w') as t:\n"
        "    info = tarfile.TarInfo('k.txt'); info.size = 2; t.addfile(info, io.BytesIO(b'hi'))\n"
        "fsspec.filesystem('memory').pipe('/s/x.tar', buf.getvalue())\n"
        "assert [r['txt'] for r in wds.WebDataset('memory://s/x.tar', shardshuffle=False)] == [b'hi']\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
