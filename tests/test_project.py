"""The project's promises outside the library: entry points, Dockerfile, default dataset."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

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


def _dockerfile_runs(text: str) -> list[str]:
    """The Dockerfile's RUN commands, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


def _pins(name: str) -> dict[str, str]:
    lines = (PROJECT_ROOT / name).read_text().splitlines()
    pairs = (line.split("#")[0].strip().split("==") for line in lines if "==" in line.split("#")[0])
    return {pkg.strip().lower(): version.strip() for pkg, version in pairs}


def test_dockerfile_copies_existing_paths_and_runs_a_real_entry_point(tmp_path, monkeypatch):
    from sapretrain.config import load_config
    from sapretrain.resources import config_dir, resolve_config
    from sapretrain.train.config import TrainConfig

    text = (PROJECT_ROOT / "Dockerfile").read_text()
    copied = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (PROJECT_ROOT / src).exists(), f"Dockerfile copies missing {src}"
                copied.append(src)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:2] == ["accelerate", "launch"]
    accelerate_config = cmd[cmd.index("--config_file") + 1]
    assert (PROJECT_ROOT / accelerate_config).is_file() and any(accelerate_config.startswith(src) for src in copied)
    module = cmd[cmd.index("-m") + 1]  # accelerate launch -m: the installed package's command, not a checkout path
    assert module == "sapretrain.cli.train" and importlib.util.find_spec(module) is not None
    assert f"-m {module} " in text.split("\nARG ")[0]  # the usage comment at the top shows the same command
    config = cmd[cmd.index("--config") + 1]
    monkeypatch.chdir(tmp_path)  # the image's WORKDIR holds no configs/: the path resolves inside the package
    resolved = Path(resolve_config(config))
    assert resolved.is_file() and resolved.is_relative_to(config_dir())
    load_config(TrainConfig, config)


def test_dockerfile_installs_the_pinned_torch_from_the_lock_and_the_package_not_editable():
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    pins, lock = _pins("requirements.txt"), _pins("constraints.txt")
    assert pins["torch"] == lock["torch"] and pins["torchvision"] == lock["torchvision"]
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1) == pins["torch"]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    if base.startswith("pytorch/pytorch:"):  # a torch base image must carry the pinned torch itself
        assert base.split(":")[1].split("-")[0] == pins["torch"], base
    else:  # a plain Python image: torch comes from the lock, on the Python the lock was made with
        assert base.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}-"), base
    installs = [run for run in _dockerfile_runs(text) if "pip install" in run]
    assert any(re.search(r"-c \S*constraints\.txt", run) and re.search(r"-r \S*requirements\.txt", run)
               for run in installs), installs
    assert any("TORCH_VERSION" in run and "torch.__version__" in run for run in installs)  # the build checks it
    package = [run for run in installs if "--no-deps" in run]
    assert package and not any(re.search(r"(^|\s)(-e|--editable)(\s|$)", run) for run in installs)
    assert all(not run.split("--no-deps", 1)[1].split()[0].startswith("-") for run in package)


def test_console_scripts_tools_and_commands_are_one_list():
    import configparser

    from sapretrain.cli import ALIASES, COMMANDS

    cfg = configparser.ConfigParser()
    cfg.read(PROJECT_ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    expected = {"sapretrain": "sapretrain.cli:main", **{f"sapretrain-{n}": t for n, (t, _) in COMMANDS.items()},
                **{f"sapretrain-{a}": COMMANDS[n][0] for a, n in ALIASES.items()}}
    assert scripts == expected
    shims = {p.stem: p.read_text() for p in (PROJECT_ROOT / "tools").glob("*.py")}
    shims["train"] = (PROJECT_ROOT / "launch" / "pretrain.py").read_text()
    for name, (target, _) in COMMANDS.items():
        module = target.split(":")[0]
        stem = module.rsplit(".", 1)[1]
        assert f"from {module} import main" in shims.pop(stem), stem
    assert shims == {}, f"tools without a command: {sorted(shims)}"


def test_no_sys_path_edits_or_repository_paths_in_code():
    offenders = []
    for folder in ("sapretrain", "tools", "launch", "bench"):
        for path in (PROJECT_ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            offenders += [f"{path.relative_to(PROJECT_ROOT)}: {word}" for word in ("sys.path", "parents[2]") if word in text]
    assert offenders == []


def test_launcher_configs_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"1gpu.yaml": ("NO", 1), "8gpu.yaml": ("MULTI_GPU", 8), "multinode.yaml": ("MULTI_GPU", 16)}
    for name, (kind, processes) in expected.items():
        config = load_config_from_file(str(PROJECT_ROOT / "launch/accelerate" / name))  # raises on unknown fields
        assert (config.distributed_type.value, config.num_processes) == (kind, processes)


def test_readme_names_the_two_commands_and_ci_calls_make_test():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (PROJECT_ROOT / ".ci/run").read_text()
    assert "make test\n" in ci and "make test-slow\n" in ci  # the slow-marked tests run in CI too
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


def test_command_lines_in_readme_and_docs_use_options_the_commands_have(capsys):
    """Every ``--option`` written after a command (tools/X.py, launch/pretrain.py, sapretrain X,
    -m sapretrain.cli.X) in README.md and docs/*.md is in that command's --help."""
    from sapretrain.cli import ALIASES, COMMANDS, load_command

    by_module = {t.split(":")[0].rsplit(".", 1)[1]: n for n, (t, _) in COMMANDS.items() if t.startswith("sapretrain.cli.")}
    command_line = re.compile(r"(?:tools/(\w+)\.py|launch/(pretrain)\.py|-m sapretrain\.cli\.(\w+)|\bsapretrain ([a-z][a-z-]+))"
                              r"((?:[^`|;&#]|#(?!\s))*)")  # up to the end of the command: a pipe, `, ; or a comment
    helps: dict[str, str] = {}
    wrong, checked = [], 0
    for doc in [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n", " ", doc.read_text(encoding="utf-8"))
        for line in text.splitlines():
            for m in command_line.finditer(line):
                module = m.group(1) or m.group(3)
                name = by_module.get(module) if module else ("train" if m.group(2) else ALIASES.get(m.group(4), m.group(4)))
                if name not in COMMANDS or not COMMANDS[name][0].startswith("sapretrain.cli."):
                    continue
                if name not in helps:
                    with pytest.raises(SystemExit):
                        load_command(name)(["--help"])
                    helps[name] = capsys.readouterr().out
                for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(5)):
                    checked += 1
                    if option not in helps[name]:
                        wrong.append(f"{doc.name}: {name} has no {option}: {line.strip()[:100]}")
    assert wrong == [] and checked > 50
