"""The shared curation stage runner: chunks, resume after a crash, parts, drops counted."""
from __future__ import annotations

import json

import pytest

from sapretrain.curation.stage import StageConfig, dropped_output, format_stage_summary, run_stage
from sapretrain.jobs import MAX_EXAMPLES, Parts


class DropOdd:
    """Keeps even ``n`` (adding ``half``), drops odd ones; can crash at a given chunk."""

    name = "drop_odd"

    def __init__(self, crash_at: int | None = None, factor: int = 1):
        self.crash_at, self.factor, self.calls, self.setups = crash_at, factor, 0, 0

    def setup(self):
        self.setups += 1

    def fingerprint(self):
        return {"factor": self.factor}

    def process(self, records):
        if self.calls == self.crash_at:
            raise RuntimeError("killed")
        self.calls += 1
        return [{**r, "half": r["n"] // 2 * self.factor} if r["n"] % 2 == 0
                else {**r, "drop_reason": "odd", "drop_detail": f"{r['n']} is odd"} for r in records]


def write_input(path, n=23, bad=(5,)):
    lines = [("{not json" if i in bad else json.dumps({"id": f"s{i}", "n": i})) for i in range(n)]
    path.write_text("\n".join(lines) + "\n\n")
    return str(path)


def read(path):
    return [json.loads(line) for line in open(path)]


def test_kept_dropped_and_counted(tmp_path):
    src = write_input(tmp_path / "in.jsonl")
    out = str(tmp_path / "out.jsonl")
    summary = run_stage(DropOdd(), src, out, StageConfig(chunk_size=4), progress=False)
    kept = read(out)
    assert [r["n"] for r in kept] == list(range(0, 23, 2))
    assert kept[3] == {"id": "s6", "n": 6, "half": 3}
    dropped = read(dropped_output(out))
    assert dropped_output(out).endswith("out.dropped.jsonl")
    assert sorted(r["drop_reason"] for r in dropped) == ["bad_json"] + ["odd"] * 10
    assert summary["records"] == 23 and summary["kept"] == 12
    assert summary["dropped"] == {"bad_json": 1, "odd": 10}
    assert len(summary["examples"]["odd"]) == MAX_EXAMPLES and summary["examples"]["odd"][0]["drop_detail"] == "1 is odd"
    assert json.loads(open(out + ".summary.json").read()) == summary
    assert "kept 12" in format_stage_summary(summary)
    assert not (tmp_path / "out.jsonl.chunks").exists()


def test_resume_after_a_crash_is_byte_identical(tmp_path):
    src = write_input(tmp_path / "in.jsonl")
    clean = str(tmp_path / "clean.jsonl")
    run_stage(DropOdd(), src, clean, StageConfig(chunk_size=4), progress=False)

    out = str(tmp_path / "out.jsonl")
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(DropOdd(crash_at=3), src, out, StageConfig(chunk_size=4), progress=False)
    assert len(list((tmp_path / "out.jsonl.chunks").glob("0*[0-9].jsonl"))) == 3
    again = DropOdd()
    run_stage(again, src, out, StageConfig(chunk_size=4), progress=False)
    assert again.calls == 3  # only the 3 chunks not committed before the crash (6 in all)
    assert open(out, "rb").read() == open(clean, "rb").read()
    assert open(dropped_output(out), "rb").read() == open(dropped_output(clean), "rb").read()

    finished = DropOdd()
    assert run_stage(finished, src, out, StageConfig(chunk_size=4), progress=False)["kept"] == 12
    assert finished.setups == 0  # a finished output is not recomputed


def test_other_settings_are_refused_on_resume(tmp_path):
    src = write_input(tmp_path / "in.jsonl")
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(RuntimeError):
        run_stage(DropOdd(crash_at=1), src, out, StageConfig(chunk_size=4), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        run_stage(DropOdd(factor=2), src, out, StageConfig(chunk_size=4), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        run_stage(DropOdd(), src, out, StageConfig(chunk_size=5), progress=False)


def test_parts_read_their_share_and_add_up_to_the_whole_in_order(tmp_path):
    src = write_input(tmp_path / "in.jsonl", bad=(7,))
    whole = tmp_path / "whole.jsonl"
    run_stage(DropOdd(), src, str(whole), StageConfig(chunk_size=2), progress=False)
    out = str(tmp_path / "out.jsonl")
    for n in (2, 3, 5):
        lines, records, dropped = [], 0, {}
        for part in range(n):
            s = run_stage(DropOdd(), src, out, StageConfig(chunk_size=2), Parts(part, n), progress=False)
            assert s["part"] == [part, n]
            lines += open(tmp_path / f"out-part{part:05d}-of{n:05d}.jsonl").read().splitlines()
            records += s["records"]
            for k, v in s["dropped"].items():
                dropped[k] = dropped.get(k, 0) + v
        assert lines == whole.read_text().splitlines()  # the parts in order are the one-part output
        assert records == 23 and dropped == {"bad_json": 1, "odd": 10}
    # More parts than lines: the empty shares write an empty output and say so, not an error.
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text('{"id": "a", "n": 2}\n')
    s = run_stage(DropOdd(), str(tiny), str(tmp_path / "t.jsonl"), parts=Parts(3, 4), progress=False)
    assert s["records"] == 0 and "holds no line" in format_stage_summary(s)
    assert (tmp_path / "t-part00003-of00004.jsonl").read_bytes() == b""
    s = run_stage(DropOdd(), str(tiny), str(tmp_path / "t.jsonl"), parts=Parts(0, 4), progress=False)
    assert s["kept"] == 1
    with pytest.raises(ValueError, match="--part"):
        run_stage(DropOdd(), src, out, parts=Parts(3, 3), progress=False)


def test_the_next_stage_reads_the_part_files_of_the_one_before(tmp_path):
    src = write_input(tmp_path / "in.jsonl", bad=())
    for part in range(3):
        run_stage(DropOdd(), src, str(tmp_path / "a.jsonl"), StageConfig(chunk_size=3), Parts(part, 3), progress=False)
    s = run_stage(DropOdd(factor=2), str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), progress=False)
    assert [r["n"] for r in read(tmp_path / "b.jsonl")] == list(range(0, 23, 2)) and s["records"] == 12
    (tmp_path / "a-part00001-of00003.jsonl").unlink()
    with pytest.raises(ValueError, match="1 of its 3 part files are missing"):
        run_stage(DropOdd(factor=3), str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl"), progress=False)


def test_worker_processes_give_the_same_bytes(tmp_path):
    src = write_input(tmp_path / "in.jsonl")
    run_stage(DropOdd(), src, str(tmp_path / "one.jsonl"), StageConfig(chunk_size=3), progress=False)
    s = run_stage(DropOdd(), src, str(tmp_path / "two.jsonl"), StageConfig(chunk_size=3, workers=2), progress=False)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert (tmp_path / "two.dropped.jsonl").read_bytes() == (tmp_path / "one.dropped.jsonl").read_bytes()
    assert s["kept"] == 12


# ----- caption records -> samples


def test_sample_stage_makes_one_sample_per_triplet():
    from sapretrain.curation.samples import SampleConfig, SampleStage, sample_key

    caption = "a man riding a horse next to a dog"
    def part(text, kind=None, head=None):
        start = caption.index(text)
        return {"text": text, "start": start, "end": start + len(text), **({"kind": kind} if kind else {}),
                **({"head": head} if head else {})}
    riding = {"subj": part("man", head="man"), "rel": part("riding", "action"), "obj": part("horse", head="horse")}
    next_to = {"subj": part("horse"), "rel": part("next to", "spatial"), "obj": part("dog")}
    broken = {"subj": {"text": "cat", "start": 0, "end": 3}, "rel": part("riding", "action"), "obj": part("dog")}
    records = [
        {"id": "coco/42.jpg#1", "image": "42.jpg", "width": 640, "height": 480, "source": "coco",
         "objects": [{"name": "person", "box": [0, 0, 10, 10]}], "caption": caption,
         "triplets": [riding, broken, next_to]},
        {"id": "x", "image": "x.jpg", "caption": "a sunny day", "triplets": []},
        {"id": "y", "image": "y.jpg", "caption": "", "triplets": [], "skip_reason": "empty"},
    ]
    out = SampleStage(SampleConfig(kinds=["spatial", "action"], max_per_caption=4)).process(records)
    kept = [r for r in out if "drop_reason" not in r]
    assert [r["id"] for r in kept] == ["coco_42_jpg_1-t0", "coco_42_jpg_1-t2"]
    assert kept[0]["relation"] == "riding" and kept[0]["triplet"]["subj"] == {**riding["subj"]}
    assert kept[0]["objects"] and kept[0]["width"] == 640 and kept[0]["source"] == "coco"
    assert {r["drop_reason"] for r in out if "drop_reason" in r} == {"bad_span", "no_triplet", "skipped_caption"}
    only_spatial = SampleStage(SampleConfig(kinds=["spatial"], max_per_caption=1)).process(records[:1])
    assert [(r["id"], r.get("drop_reason")) for r in only_spatial] == [
        ("coco_42_jpg_1-t0", "kind"), ("coco_42_jpg_1-t1", "bad_span"), ("coco_42_jpg_1-t2", None)]
    assert sample_key("a.b/c d") == "a_b_c_d"
