"""The curation as steps and parts: the same curated samples from one process, from parts run
step by step (what SLURM array tasks do), and from the Ray engine on a local Ray instance."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT
from sapretrain.curation.curate import load_curation_config, run_curation, run_step, steps
from sapretrain.jobs import Parts, part_files

CONFIG = PROJECT_ROOT / "configs" / "curation" / "coco_fixture.yaml"


def curated_set(out_dir):
    """What a curated manifest says, as a set: (id, relation, negative caption, partner)."""
    rows = set()
    for url in [out_dir / "curated.jsonl"] if (out_dir / "curated.jsonl").exists() else \
            part_files(str(out_dir / "curated.jsonl")):
        for line in open(url):
            r = json.loads(line)
            rows.add((r["id"], r["triplet"]["rel"]["text"], r["negative"]["caption"], r["positive"],
                      tuple(r["boxes"]["subj"])))
    return rows


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    report = run_curation(load_curation_config(str(CONFIG), [f"output_dir={out}"]), progress=False, log=lambda _: None)
    return out, report


def test_the_steps_of_a_run():
    cfg = load_curation_config(str(CONFIG))
    names = [s.name for s in steps(cfg)]
    assert names == ["captions", "extract_svo", "samples", "rois", "negatives", "positives_embed", "positives_index",
                     "positives_search", "positives_write", "report"]
    single = {s.name for s in steps(cfg) if not s.partitioned}
    assert single == {"positives_index", "report"}
    with_filter = load_curation_config(str(CONFIG), ["filter.model=models/filter"])
    assert "relation_filter" in [s.name for s in steps(with_filter)]
    with pytest.raises(ValueError, match="runs as one process"):
        run_step(cfg, "positives_index", Parts(0, 2))
    with pytest.raises(ValueError, match="unknown step 'negative'"):
        run_step(cfg, "negative", Parts())


def test_parts_run_step_by_step_give_the_one_process_samples(one_process, tmp_path):
    out, report = one_process
    cfg = load_curation_config(str(CONFIG), [f"output_dir={tmp_path}"])
    for step in steps(cfg):
        for part in range(3 if step.partitioned else 1):
            run_step(cfg, step.name, Parts(part, 3) if step.partitioned else Parts(), progress=False)
    assert not (tmp_path / "curated.jsonl").exists() and len(part_files(str(tmp_path / "curated.jsonl"))) == 3
    assert curated_set(tmp_path) == curated_set(out)
    parted = json.loads((tmp_path / "report.json").read_text())
    assert parted["samples"] == report["samples"]
    for a, b in zip(parted["stages"], report["stages"]):
        assert (a["stage"], a["records"], a["kept"], a["dropped"]) == (b["stage"], b["records"], b["kept"], b["dropped"])
    # A finished part does nothing when run again (a requeued array task), and says so.
    again = subprocess.run([sys.executable, "-m", "sapretrain.cli", "curate", "--config", str(CONFIG), "--step", "rois",
                            "--part", "1", "--num-parts", "3", "--no-progress", f"output_dir={tmp_path}"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "rois part 1/3: already done" in again.stdout


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_the_ray_engine_gives_the_same_samples_and_resumes_by_part(one_process, local_ray, tmp_path):
    out, report = one_process
    (tmp_path / "shards.yaml").write_text("image_size: 64\nroi_size: 64\nshard_size: 8\n")
    cfg = load_curation_config(str(CONFIG), [f"output_dir={tmp_path}", f"shards.output={tmp_path}/shards",
                                             f"shards.config={tmp_path}/shards.yaml"])
    assert [s.name for s in steps(cfg)][-2:] == ["shards", "report"]
    lines = []
    ray_report = run_curation(cfg, engine="ray", num_parts=2, log=lines.append)
    assert curated_set(tmp_path) == curated_set(out)
    assert ray_report["samples"] == report["samples"]
    assert any("2 parts per step" in line for line in lines)
    assert len(part_files(str(tmp_path / "rois.jsonl"))) == 2
    # The shards, written by the workers from the manifest's part files, pass the checker.
    from sapretrain.shards.check import check_shards

    check = check_shards(str(tmp_path / "shards"))
    assert check.ok, check.problems
    assert ray_report["shards"]["samples_read"] == report["samples"] and ray_report["shards"]["shards"] >= 2
    assert "Shards:" in (tmp_path / "report.md").read_text()

    # A lost part (its output gone, as after a node failure) is redone alone on the next run.
    lost = part_files(str(tmp_path / "rois.jsonl"))[1]
    before = (tmp_path / "steps" / "rois-part00000-of00002.json").read_text()
    for suffix in ("", ".summary.json"):
        (tmp_path / f"{lost.rsplit('/', 1)[1]}{suffix}").unlink()
    run_curation(cfg, engine="ray", num_parts=2, log=lambda _: None)
    assert (tmp_path / "steps" / "rois-part00000-of00002.json").read_text() == before  # not rerun
    assert curated_set(tmp_path) == curated_set(out)


def test_streaming_steps_form_one_pipeline_when_the_cluster_has_room():
    from sapretrain.curation.ray_engine import pipelines

    cfg = load_curation_config(str(CONFIG))
    names = lambda groups: [[s.name for s in g] for g in groups]  # noqa: E731
    assert names(pipelines(steps(cfg)[:-1], cpus=4)) == [
        ["captions", "extract_svo", "samples", "rois", "negatives", "positives_embed"], ["positives_index"],
        ["positives_search"], ["positives_write"]]
    # Two CPUs hold one actor pool and the tasks: the model steps start new pipelines.
    assert names(pipelines(steps(cfg)[:-1], cpus=2))[:3] == [["captions", "extract_svo", "samples"],
                                                            ["rois", "negatives"], ["positives_embed"]]
    # One GPU: one GPU actor per pipeline, however many CPUs.
    assert names(pipelines(steps(cfg)[:-1], cpus=16, gpus=1))[:3] == [["captions", "extract_svo", "samples"],
                                                                     ["rois", "negatives"], ["positives_embed"]]
