"""The project's promises outside the library: entry points, Dockerfile, default dataset."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT
from sapretrain.shards.check import check_shards
from sapretrain.shards.writer import ShardConfig, make_shards


def test_pretrain_entry_point_rejects_config_typos():
    cmd = [sys.executable, str(PROJECT_ROOT / "launch/pretrain.py"), "--config", str(PROJECT_ROOT / "configs/paper.yaml")]
    typo = subprocess.run(cmd + ["optim.lrr=1"], capture_output=True, text=True)
    assert typo.returncode == 2 and "unknown config key 'optim.lrr'" in typo.stderr
    assert "did you mean 'optim.lr'" in typo.stderr
    assert subprocess.run(cmd[:2] + ["--help"], capture_output=True).returncode == 0


@pytest.mark.parametrize("name", ["paper", "demo", "shards", "shards_demo"] + [f"ablation/{n}" for n in ("no_svo", "no_roi", "no_triplet", "clip_baseline")])
def test_shipped_configs_load(name):
    from sapretrain.config import load_config
    from sapretrain.train.config import TrainConfig

    cls = ShardConfig if name.startswith("shards") else TrainConfig
    load_config(cls, PROJECT_ROOT / "configs" / f"{name}.yaml")


def test_dockerfile_copies_existing_paths_and_runs_a_real_entry_point():
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (PROJECT_ROOT / src).exists(), f"Dockerfile copies missing {src}"
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:2] == ["accelerate", "launch"]
    paths = [arg for arg in cmd if arg.endswith((".py", ".yaml"))]
    assert "launch/pretrain.py" in paths and len(paths) == 3
    for path in paths:
        assert (PROJECT_ROOT / path).exists(), path


def test_launcher_configs_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"1gpu.yaml": ("NO", 1), "8gpu.yaml": ("MULTI_GPU", 8), "multinode.yaml": ("MULTI_GPU", 16)}
    for name, (kind, processes) in expected.items():
        config = load_config_from_file(str(PROJECT_ROOT / "launch/accelerate" / name))  # raises on unknown fields
        assert (config.distributed_type.value, config.num_processes) == (kind, processes)


def test_readme_names_the_two_commands_and_ci_calls_make_test():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (PROJECT_ROOT / ".ci/run").read_text()
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_default_dataset_builds_and_checks(tmp_path):
    from sapretrain.scenes.demo import build_demo_manifest

    manifest = build_demo_manifest(scenes=16, workers=1, progress=False, root=tmp_path / "data",
                                   extra=(PROJECT_ROOT / "tests" / "fixtures" / "coco" / "manifest.jsonl",))
    cfg = ShardConfig(image_size=96, roi_size=64, shard_size=10)
    report = make_shards(manifest, str(tmp_path / "shards"), cfg, progress=False)
    summary = report.summary
    # Every sample is an anchor once, except the second member of each mutual pair.
    assert summary["samples_read"] == 16 + 23 and summary["skipped"]["counts"] == {}
    assert summary["mutual_pairs_merged"] >= 8  # the synthetic scenes come in mutual pairs
    assert summary["records"] == 16 + 23 - summary["mutual_pairs_merged"]
    check = check_shards(str(tmp_path / "shards"))
    assert check.ok, check.problems
    assert check.samples_by_source["clevr-synthetic"] == 16
    assert check.samples_by_source["coco"] == 2 * (summary["records"] - 8)
