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


def curate_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``sapretrain curate`` in a process of its own: Ray then starts and stops there, and leaves
    nothing behind in the test process."""
    pytest.importorskip("ray")
    done = subprocess.run([sys.executable, "-m", "sapretrain.cli", "curate", "--config", str(CONFIG), "--no-progress",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_the_ray_engine_gives_the_same_samples_and_resumes_by_part(one_process, tmp_path):
    out, report = one_process
    (tmp_path / "shards.yaml").write_text("image_size: 64\nroi_size: 64\nshard_size: 8\n")
    overrides = [f"output_dir={tmp_path}", f"shards.output={tmp_path}/shards", f"shards.config={tmp_path}/shards.yaml"]
    cfg = load_curation_config(str(CONFIG), overrides)
    assert [s.name for s in steps(cfg)][-2:] == ["shards", "report"]
    printed = curate_cli("--engine", "ray", "--num-parts", "2", *overrides).stdout
    ray_report = json.loads((tmp_path / "report.json").read_text())
    assert curated_set(tmp_path) == curated_set(out)
    assert ray_report["samples"] == report["samples"]
    assert "2 parts per step" in printed and "0 GPUs" in printed
    assert len(part_files(str(tmp_path / "rois.jsonl"))) == 2
    # Without GPUs every step ran as tasks, and each part once.
    timings = sorted(p.name for p in (tmp_path / "steps").glob("*.json"))
    assert len(timings) == 2 * sum(s.partitioned for s in steps(cfg)) + 1  # + the one index
    # The shards, written by the workers from the manifest's part files, pass the checker.
    from sapretrain.shards.check import check_shards

    check = check_shards(str(tmp_path / "shards"))
    assert check.ok, check.problems
    assert ray_report["shards"]["samples_read"] == report["samples"] and ray_report["shards"]["shards"] >= 2
    assert "Shards:" in (tmp_path / "report.md").read_text()

    # A lost part (its output gone, as after a node failure) is redone alone on the next run.
    lost = part_files(str(tmp_path / "rois.jsonl"))[1]
    before = (tmp_path / "steps" / "rois-part00000-of00002.json").read_text()
    redone = (tmp_path / "steps" / "rois-part00001-of00002.json").read_text()
    for suffix in ("", ".summary.json"):
        (tmp_path / f"{lost.rsplit('/', 1)[1]}{suffix}").unlink()
    curate_cli("--engine", "ray", "--num-parts", "2", *overrides)
    assert (tmp_path / "steps" / "rois-part00000-of00002.json").read_text() == before  # not rerun
    assert (tmp_path / "steps" / "rois-part00001-of00002.json").read_text() != redone
    assert curated_set(tmp_path) == curated_set(out)


@pytest.mark.slow
def test_with_gpus_the_model_steps_run_on_actor_pools(one_process, tmp_path):
    """A Ray instance that declares a GPU (there is none: the models fall back to the CPU) puts
    rois and positives_embed on GPU actor pools, and the samples stay the same."""
    pytest.importorskip("ray")
    out, _ = one_process
    script = f"""
import ray
from sapretrain.curation import ray_engine
from sapretrain.curation.curate import load_curation_config, run_curation
actors = []
class Counted(ray_engine._PartActor):
    def __init__(self, cfg, name, num_parts):
        print("actor for", name, flush=True)
        super().__init__(cfg, name, num_parts)
ray_engine._PartActor = Counted
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=True, configure_logging=False)
cfg = load_curation_config({str(CONFIG)!r}, ["output_dir={tmp_path}"])
run_curation(cfg, engine="ray", num_parts=2, log=print)
ray.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 GPUs" in done.stdout
    printed = done.stdout + done.stderr
    assert "actor for rois" in printed and "actor for positives_embed" in printed
    assert "actor for samples" not in printed and "actor for extract_svo" not in printed
    assert curated_set(tmp_path) == curated_set(out)


def test_streaming_steps_form_one_pipeline_when_the_cluster_has_room():
    from sapretrain.curation.ray_engine import pipelines

    cfg = load_curation_config(str(CONFIG))
    names = lambda groups: [[s.name for s in g] for g in groups]  # noqa: E731
    assert names(pipelines(steps(cfg)[:-1], cpus=4)) == [
        ["captions", "extract_svo", "samples", "rois", "negatives", "positives_embed"], ["positives_index"],
        ["positives_search"], ["positives_write"]]
    # Without GPUs every step is tasks: two CPUs stream the same one pipeline.
    assert pipelines(steps(cfg)[:-1], cpus=2) == pipelines(steps(cfg)[:-1], cpus=4)
    # One GPU: one GPU actor pool (rois, positives_embed) per pipeline, however many CPUs.
    assert names(pipelines(steps(cfg)[:-1], cpus=16, gpus=1))[:2] == [
        ["captions", "extract_svo", "samples", "rois", "negatives"], ["positives_embed"]]
