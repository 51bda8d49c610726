"""sapretrain.jobs: contiguous parts, byte-range segments of plain and compressed files, part
files of a partitioned output, input expansion and the skip log."""
from __future__ import annotations

import gzip

import pytest

from sapretrain import jobs
from sapretrain.jobs import (Parts, Segment, SkipLog, expand_inputs, iter_chunks, iter_lines, part_files, part_segments,
                             plan_segments)


def write_files(tmp_path):
    """Two plain files and a gzipped one, lines of varied length (one longer than most shares)."""
    files, expected = [], []
    for n, (name, count) in enumerate([("a.jsonl", 23), ("b.jsonl.gz", 11), ("c.jsonl", 17)]):
        lines = [f'{{"file": {n}, "line": {i}, "pad": "{"x" * ((i * 37) % 90)}"}}' for i in range(count)]
        data = ("\n".join(lines) + "\n").encode()
        path = tmp_path / name
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        files.append(str(path))
        expected += lines
    return files, expected


@pytest.mark.parametrize("num_parts", range(1, 8))
def test_parts_read_every_line_once_in_order(tmp_path, num_parts):
    files, expected = write_files(tmp_path)
    got, compressed_owners = [], []
    for part in range(num_parts):
        segments = plan_segments(files, Parts(part, num_parts))
        compressed_owners += [part for s in segments if s.url.endswith(".gz")]
        got += list(iter_lines(segments))
    assert got == expected  # concatenated in part order: the files' lines, none twice
    assert len(compressed_owners) == 1 and all(s.end is None for s in plan_segments(files, Parts(compressed_owners[0],
                                                                                                  num_parts))
                                               if s.url.endswith(".gz"))


def test_a_line_exactly_at_a_boundary(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"aaaa\nbbbb\ncccc\ndddd\n")  # 20 bytes: two parts cut at byte 10, a line start
    first, second = (plan_segments([str(path)], Parts(p, 2)) for p in range(2))
    assert [(s.start, s.end) for s in first + second] == [(0, 10), (10, 20)]
    assert list(iter_lines(first)) == ["aaaa", "bbbb"] and list(iter_lines(second)) == ["cccc", "dddd"]
    # a cut one byte into a line: that line belongs to the part before
    left, right = jobs.Segment(str(path), 0, 11), jobs.Segment(str(path), 11, None)
    assert list(iter_lines([left])) == ["aaaa", "bbbb", "cccc"] and list(iter_lines([right])) == ["dddd"]


def test_parts_with_an_empty_share(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n')  # 9 bytes over 12 parts: most parts get no byte at all
    shares = [plan_segments([str(path)], Parts(p, 12)) for p in range(12)]
    assert sum(1 for s in shares if s) <= 9 and [line for s in shares for line in iter_lines(s)] == ['{"a": 1}']
    assert list(iter_chunks([], 5)) == [] and Parts(3, 12).share(2) == range(0, 0)
    long = tmp_path / "long.jsonl"  # one line longer than several shares: only the first part has it
    long.write_bytes(b"x" * 100 + b"\nshort\n")
    lines = [list(iter_lines(plan_segments([str(long)], Parts(p, 5)))) for p in range(5)]
    assert lines[0] == ["x" * 100] and sum(lines, []) == ["x" * 100, "short"]


def test_chunks_count_from_zero_in_each_part(tmp_path):
    files, expected = write_files(tmp_path)
    chunks = [list(iter_chunks(plan_segments(files, Parts(p, 3)), 4)) for p in range(3)]
    assert all(part[0][0] == 0 and [c for c, _ in part] == list(range(len(part))) for part in chunks if part)
    assert [line for part in chunks for _, lines in part for line in lines] == expected
    assert all(len(lines) == 4 for part in chunks for _, lines in part[:-1])


def test_parts_validation_share_and_output_names():
    for bad in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="must be in"):
            Parts(*bad)
    shares = [Parts(p, 4).share(10) for p in range(4)]
    assert [list(r) for r in shares] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert Parts(3, 16).output("s3://b/c/samples.jsonl.gz") == "s3://b/c/samples-part00003-of00016.jsonl.gz"
    assert Parts().output("out.jsonl") == "out.jsonl" and Parts(1, 2).label() == " part 1/2"


def test_part_files_found_missing_and_mixed(tmp_path):
    out = tmp_path / "curated.jsonl"
    assert part_files(str(out)) is None
    for p in (0, 2):
        (tmp_path / f"curated-part{p:05d}-of00003.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"1 of its 3 part files are missing \(parts 1\)"):
        part_files(str(out))
    (tmp_path / "curated-part00001-of00003.jsonl").write_text("{}\n")
    assert part_files(str(out)) == [str(tmp_path / f"curated-part{p:05d}-of00003.jsonl") for p in range(3)]
    (tmp_path / "curated-part00000-of00002.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"different --num-parts \(\[2, 3\]\)"):
        part_files(str(out))


def test_expand_inputs_glob_brace_and_parts_of_an_output(tmp_path):
    for name in ("s-00000.tar", "s-00001.tar", "s-00002.tar"):
        (tmp_path / name).write_text("")
    assert expand_inputs(str(tmp_path / "s-*.tar")) == [str(tmp_path / f"s-0000{i}.tar") for i in range(3)]
    assert expand_inputs(str(tmp_path / "s-{00002..00001}.tar")) == [str(tmp_path / "s-00002.tar"),
                                                                     str(tmp_path / "s-00001.tar")]
    assert expand_inputs([str(tmp_path / "s-00001.tar"), str(tmp_path / "none.tar")]) == [
        str(tmp_path / "s-00001.tar"), str(tmp_path / "none.tar")]  # a missing plain URL stays (the reader says so)
    for p in range(2):
        (tmp_path / f"t-part{p:05d}-of00002.jsonl").write_text(f"{p}\n")
    parts = [str(tmp_path / f"t-part{p:05d}-of00002.jsonl") for p in range(2)]
    assert expand_inputs(str(tmp_path / "t.jsonl")) == parts
    (tmp_path / "t.jsonl").write_text("whole\n")  # OUT itself wins over its parts
    assert expand_inputs(str(tmp_path / "t.jsonl")) == [str(tmp_path / "t.jsonl")]


def test_skip_log_merge_keeps_counts_and_the_first_examples():
    a, b = SkipLog(), SkipLog()
    for i in range(4):
        a.add("bad_json", f"a{i}")
    for i in range(4):
        b.add("bad_json", f"b{i}")
    b.add("too_deep", "b")
    a.merge(b)
    assert a.counts == {"bad_json": 8, "too_deep": 1} and a.total() == 9
    assert a.examples["bad_json"] == ["a0", "a1", "a2", "a3", "b0"]  # MAX_EXAMPLES, the earliest first
    assert SkipLog.from_dict(a.to_dict()) == a
    from sapretrain.shards.manifest import SkipLog as ManifestSkipLog

    assert ManifestSkipLog is SkipLog and jobs.MAX_EXAMPLES == 5


def test_with_as_many_files_as_parts_each_part_reads_whole_files(tmp_path):
    """Part I of N over the N part files of a step reads exactly file I: steps line up one to one."""
    files = []
    for i, n in enumerate((5, 1, 9, 0)):
        path = tmp_path / f"a-part{i:05d}-of00004.jsonl"
        path.write_text("".join(f'{{"f": {i}, "n": {k}}}\n' for k in range(n)))
        files.append(str(path))
    assert expand_inputs(str(tmp_path / "a.jsonl")) == files
    for part in range(4):
        assert plan_segments(files, Parts(part, 4)) == [Segment(files[part])]
    assert [s.url for s in plan_segments(files, Parts(1, 2))] == files[2:]  # more files than parts: whole files
    one = plan_segments(files[:1], Parts(1, 2))  # fewer files than parts: bytes
    assert one and one[0].start > 0


def test_a_part_takes_its_file_of_the_step_before_while_others_are_still_being_written(tmp_path):
    (tmp_path / "a-part00001-of00003.jsonl").write_text('{"n": 1}\n')
    out = str(tmp_path / "a.jsonl")
    assert part_segments(out, Parts(1, 3)) == [Segment(str(tmp_path / "a-part00001-of00003.jsonl"))]
    with pytest.raises(ValueError, match="2 of its 3 part files are missing"):
        part_segments(out, Parts(0, 3))  # its own file is not there yet: the full check speaks
    with pytest.raises(ValueError, match="part files are missing"):
        part_segments(out, Parts(1, 2))  # another N: not its file
