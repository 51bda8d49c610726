"""The wheel, installed outside the checkout: its package data, every console script, and the main
commands (shards, check, train, a stage on a shipped config) run from a directory that is not the
repository.

The fresh environment re-uses the pinned site-packages of the interpreter running the tests (a
``.pth`` line naming that directory), so nothing is downloaded. ``.pth`` files inside that
directory, such as the editable install's finder, are not processed for a directory added that
way, so ``import sapretrain`` there finds the wheel's copy only; the tests check that it does.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from sapretrain.cli import ALIASES, COMMANDS

SHIPPED = [
    "sapretrain/configs/paper.yaml", "sapretrain/configs/demo.yaml", "sapretrain/configs/shards_demo.yaml",
    "sapretrain/configs/curation/negatives.yaml", "sapretrain/configs/curation/prompts.yaml",
    "sapretrain/configs/eval/dota_descriptions.yaml", "sapretrain/model/configs/sa-tiny.json",
    "sapretrain/curation/data/exclude/vsr_images.txt", "sapretrain/cli/__init__.py",
]


class Installed:
    def __init__(self, wheel: Path, env: Path, work: Path):
        self.wheel, self.env, self.work = wheel, env, work
        self.bin = env / "bin"

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        return {**env, "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(self.env),
                "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}

    def run(self, *cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / cmd[0]), *cmd[1:]], cwd=self.work, env=self.environ(),
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy, so setuptools' build/ and *.egg-info never land in the checkout.
    src = root / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(PROJECT_ROOT / name, src / name)
    shutil.copytree(PROJECT_ROOT / "sapretrain", src / "sapretrain", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
                   check=True, cwd=root, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("sapretrain-*.whl")

    env = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    env_python = env / "bin" / "python"
    purelib = subprocess.run([str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    pinned = sysconfig.get_paths()["purelib"]  # the site-packages of the interpreter running the tests
    Path(purelib, "pinned-site-packages.pth").write_text(pinned + "\n")
    # --ignore-installed: never touch the editable install that the pinned directory also shows.
    subprocess.run(pip + ["--python", str(env_python), "install", "--no-deps", "--no-index", "--ignore-installed",
                          str(wheel)], check=True, capture_output=True, timeout=300)
    work = root / "work"  # the cwd of every command: not the repository
    work.mkdir()
    return Installed(wheel, env, work)


def test_wheel_ships_configs_lexicons_model_configs_and_the_console_scripts(installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
    assert not [n for n in SHIPPED if n not in names]
    assert not [n for n in names if n.startswith(("tests/", "tools/", "launch/", "bench/"))]
    expected = {"sapretrain": "sapretrain.cli:main"}
    expected |= {f"sapretrain-{name}": target for name, (target, _) in COMMANDS.items()}
    expected |= {f"sapretrain-{alias}": COMMANDS[name][0] for alias, name in ALIASES.items()}
    got = dict(line.split(" = ") for line in scripts.split("[console_scripts]")[1].strip().splitlines())
    assert got == expected


def test_the_environment_imports_the_wheel_not_the_checkout(installed):
    code = ("import json, sapretrain, sapretrain.resources as r, torch; "
            "print(json.dumps([sapretrain.__file__, str(r.resolve_config('configs/paper.yaml')), torch.__version__]))")
    done = installed.run("python", "-c", code)
    assert done.returncode == 0, done.stderr
    module, paper, torch_version = json.loads(done.stdout)
    assert Path(module).is_relative_to(installed.env) and Path(paper).is_relative_to(installed.env)
    assert Path(paper).is_file() and torch_version.startswith(_pinned("torch"))


# Every console script's entry point, called with --help in one process of the new environment (its
# imports are shared; a process per script costs two minutes on two loaded cores). Prints
# {script: [exit code, first line of stdout]}.
HELP_ALL = """
import contextlib, io, json, sys
from importlib.metadata import distribution
skip = set(sys.argv[1:])
out = {}
for ep in distribution("sapretrain").entry_points:
    if ep.group != "console_scripts" or ep.name in skip:
        continue
    buf = io.StringIO()
    sys.argv = [ep.name, "--help"]
    with contextlib.redirect_stdout(buf):
        try:
            code = ep.load()(["--help"])
        except SystemExit as e:
            code = e.code
    out[ep.name] = [code, buf.getvalue().splitlines()[0] if buf.getvalue() else ""]
print(json.dumps(out))
"""


def test_every_console_script_answers_help_from_another_directory(installed):
    scripts = sorted(p.name for p in installed.bin.glob("sapretrain*"))
    assert len(scripts) == 1 + len(COMMANDS) + len(ALIASES)
    assert all((installed.bin / s).read_text().startswith(f"#!{installed.bin / 'python'}") for s in scripts)
    skip = [] if (PROJECT_ROOT / "sapretrain" / "export.py").exists() else ["sapretrain-export"]  # another change
    done = installed.run("python", "-c", HELP_ALL, *skip)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.splitlines()[-1])
    assert sorted(answers) == sorted(set(scripts) - set(skip))
    assert {s: a for s, a in answers.items() if a[0] != 0 or not a[1].startswith("usage:")} == {}
    # The script files themselves, as a user types them (the umbrella's list, a shard tool, the trainer).
    for script in ("sapretrain", "sapretrain-shards", "sapretrain-check", "sapretrain-train"):
        run = installed.run(script, "--help", timeout=120)
        assert run.returncode == 0 and run.stdout.startswith(f"usage: {script}"), (script, run.stderr[-1000:])
        if script == "sapretrain":
            assert all(f"  {name} " in run.stdout for name in COMMANDS)


def test_shards_check_and_train_from_another_directory(installed):
    made = installed.run("sapretrain-shards", "--scenes", "16", "--output", "shards", "--workers", "1",
                         "--no-progress", "image_size=64", "roi_size=64", "shard_size=8")
    assert made.returncode == 0, made.stderr[-2000:]
    assert "dataset: 8 records (pairs) from 16 valid manifest samples" in made.stdout
    checked = installed.run("sapretrain-check", "--no-progress", "shards")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    overrides = {"data.shards": "shards", "data.batch_pairs": 4, "data.workers": 1, "data.shuffle_buffer": 8,
                 "optim.steps": 2, "optim.warmup_steps": 1, "run.log_every": 1, "run.checkpoint_every": 2,
                 "run.trackers": "[]", "run.output_dir": "runs/tiny"}
    trained = installed.run("sapretrain-train", "--config", "configs/demo.yaml", *[f"{k}={v}" for k, v in overrides.items()])
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = installed.work / "runs" / "tiny"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (run / "checkpoints" / "step-00000002" / "DONE").exists()
    assert "data/shards/demo" not in (run / "config.yaml").read_text()  # the override won, from the shipped config


def test_a_stage_runs_on_its_shipped_lexicons_and_overrides_are_key_value(installed):
    def sample(i, caption, subj, rel, obj):
        span = lambda text: {"text": text, "start": caption.index(text), "end": caption.index(text) + len(text)}  # noqa: E731
        trip = {"subj": {**span(subj), "head": subj}, "rel": {**span(rel), "kind": "spatial", "lemma": rel},
                "obj": {**span(obj), "head": obj}}
        return json.dumps({"id": f"s{i}", "caption": caption, "triplet": trip})

    lines = [sample(0, "the cat is under the table", "cat", "under", "table"),
             sample(1, "a cup is on the desk", "cup", "on", "desk"),
             sample(2, "the dog is behind the car", "dog", "behind", "car")]
    (installed.work / "samples.jsonl").write_text("\n".join(lines) + "\n")
    done = installed.run("sapretrain-make-negatives", "--input", "samples.jsonl", "--output", "neg.jsonl", "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kept 3" in done.stdout
    negatives = [json.loads(line)["negative"]["caption"] for line in (installed.work / "neg.jsonl").read_text().splitlines()]
    assert negatives == ["the cat is on the table", "a cup is under the desk", "the dog is in front of the car"]
    typo = installed.run("sapretrain-make-negatives", "--input", "samples.jsonl", "--output", "neg2.jsonl", "swapp.enabled=false")
    assert typo.returncode == 2 and "swapp" in typo.stderr


def _pinned(name: str) -> str:
    for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==")[1].split("#")[0].strip()
    raise AssertionError(f"{name} is not pinned in requirements.txt")
