"""tools/curate.py end to end on the 23 real COCO fixture photos: curate → make_shards → check_shards."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT
from sapretrain.curation.curate import load_curation_config, run_curation, stage_plan

CONFIG = PROJECT_ROOT / "configs" / "curation" / "coco_fixture.yaml"


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    out = tmp_path_factory.mktemp("curation")
    cfg = load_curation_config(str(CONFIG), [f"output_dir={out}"])
    report = run_curation(cfg, progress=False, log=lambda line: None)
    return out, cfg, report


def read(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_every_stage_feeds_the_next_and_counts_its_drops(curated):
    out, cfg, report = curated
    assert [s["stage"] for s in report["stages"]] == [name for name, _ in stage_plan(cfg)]
    assert "relation_filter" not in [s["stage"] for s in report["stages"]]  # no filter model configured
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["captions"]["kept"] == 115  # 23 photos x 5 COCO captions
    previous = None
    for s in report["stages"][2:]:
        if previous is not None:
            assert s["records"] == previous["kept"]  # each stage reads exactly what the last kept
        if s["stage"] != "samples":  # samples fan out: one per triplet
            assert s["records"] == s["kept"] + sum(s["dropped"].values())
        previous = s
    for name in ("negatives", "rois", "positives"):
        dropped = read(out / f"{stages[name]['output'].rsplit('/', 1)[1].replace('.jsonl', '.dropped.jsonl')}")
        assert len(dropped) == sum(stages[name]["dropped"].values())
        assert all(r["drop_reason"] in stages[name]["dropped"] for r in dropped)
    assert report["samples"] == stages["positives"]["kept"] > 0


def test_the_manifest_is_complete_and_consistent(curated):
    out, _, report = curated
    samples = read(out / "curated.jsonl")
    ids = {s["id"]: s for s in samples}
    assert len(ids) == len(samples) == report["samples"]
    for s in samples:
        for part in ("subj", "rel", "obj"):
            span = s["triplet"][part]
            assert s["caption"][span["start"]:span["end"]] == span["text"]
            neg = s["negative"]["triplet"][part]
            assert s["negative"]["caption"][neg["start"]:neg["end"]] == neg["text"]
        assert s["negative"]["caption"] != s["caption"]
        x0, y0, x1, y1 = s["boxes"]["subj"]
        assert 0 <= x0 < x1 <= s["width"] and 0 <= y0 < y1 <= s["height"]
        partner = ids[s["positive"]]  # in the manifest, another image
        assert partner["image"] != s["image"]
    assert set(report["kinds"]) <= {"spatial", "action"} and sum(report["kinds"].values()) == len(samples)
    for name in ("report.md", "report.json", "relations.png", "kinds.png"):
        assert (out / name).stat().st_size > 0
    assert "| rois |" in (out / "report.md").read_text()


def test_shards_from_the_curated_manifest_pass_the_checker(curated, tmp_path):
    out, _, report = curated
    from sapretrain.shards.check import check_shards
    from sapretrain.shards.writer import ShardConfig, make_shards

    shards = make_shards(str(out / "curated.jsonl"), str(tmp_path / "shards"), ShardConfig(image_size=64, roi_size=64),
                         progress=False)
    assert shards.finalized
    assert shards.summary["skipped"]["counts"] == {}  # curation left nothing make_shards rejects
    check = check_shards(str(tmp_path / "shards"))
    assert check.ok, check.problems
    assert check.records >= report["samples"] // 2  # mutual partners share a record


def test_a_rerun_skips_finished_stages(curated):
    out, cfg, report = curated
    before = (out / "curated.jsonl").read_bytes()
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "tools" / "curate.py"), "--config", str(CONFIG),
                           f"output_dir={out}", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "curated.jsonl").read_bytes() == before
    assert f"{report['samples']} curated samples" in done.stdout


def test_captions_collected_beforehand_are_used(curated, tmp_path):
    out, _, report = curated
    (tmp_path / "captions.jsonl").write_bytes((out / "captions.jsonl").read_bytes())  # e.g. by collect_captions.py
    cfg = load_curation_config(str(CONFIG), [f"output_dir={tmp_path}", "source.options.captions=/nonexistent.json"])
    again = run_curation(cfg, progress=False, log=lambda line: None)
    assert again["stages"][0]["kept"] == 115 and again["samples"] == report["samples"]


def test_sub_configs_resolve_next_to_the_config_then_in_the_package(tmp_path, monkeypatch):
    """A copied config finds its own sub-configs first, the shipped ones otherwise (from any
    directory), and a missing one is a ConfigError naming the key and the places looked."""
    from sapretrain.config import ConfigError

    monkeypatch.chdir(tmp_path)  # not a checkout: configs/ is not here
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "rois.yaml").write_text("detector:\n  enabled: false\n")
    copied = tmp_path / "mine" / "curate.yaml"
    copied.write_text("rois:\n  config: rois.yaml\n")
    cfg = load_curation_config(str(copied))
    assert cfg.rois.config == str(tmp_path / "mine" / "rois.yaml")  # next to the copied config
    shipped = PROJECT_ROOT / "sapretrain" / "configs" / "curation"
    assert cfg.negatives.config == str(shipped / "negatives.yaml")  # the default, from the package
    copied.write_text("positives:\n  config: positives_mine.yaml\n")
    with pytest.raises(ConfigError, match=r"positives\.config='positives_mine\.yaml': no such file") as e:
        load_curation_config(str(copied))
    assert str(tmp_path / "mine" / "positives_mine.yaml") in str(e.value)
    assert "Traceback" not in str(e.value)
