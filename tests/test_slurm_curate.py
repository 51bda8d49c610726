"""The curation on SLURM (sapretrain/curation/slurm.py, launch/slurm/curate.sbatch): the generated
scripts, their dependency chain (aftercorr where a step streams, afterok elsewhere) and quoting, and
the whole chain run under a fake sbatch/srun against a one-process run, with a failed part that
holds back only its own and a resubmission that finishes the run."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import PROJECT_ROOT
from sapretrain.curation import curate
from sapretrain.curation.curate import load_curation_config
from sapretrain.curation.slurm import SlurmError, dependency, submit, write_scripts

CONFIG = PROJECT_ROOT / "configs" / "curation" / "coco_fixture.yaml"
COMMAND = [sys.executable, "-m", "sapretrain.cli"]
needs_steps = pytest.mark.skipif(not hasattr(curate, "steps"), reason="curate.steps (--step) not landed yet")


@dataclass
class Step:
    name: str
    partitioned: bool
    barrier: bool = False


STEPS = [Step("captions", True), Step("extract_svo", True), Step("samples", True), Step("rois", True),
         Step("positives_index", False), Step("positives_search", True, barrier=True),
         Step("positives_write", True, barrier=True), Step("report", False, barrier=True)]
# How each of STEPS waits for the one before: streaming parts, then the one-process index, the step
# after it, a barrier step after a partitioned one, the one-process report.
KINDS = [None, "aftercorr", "aftercorr", "aftercorr", "afterok", "afterok", "afterok", "afterok"]

# sbatch stand-in: records each submission in $FAKE_SLURM_STATE, refuses a dependency on a job it
# has not seen, and unless FAKE_SBATCH_RUN=0 runs the script at once, one array task after the
# other, its output to the --output path; each task's state is COMPLETED, FAILED, or (not run)
# DependencyNeverSatisfied, as SLURM decides it: afterok:J runs the job only if every task of J
# completed, aftercorr:J runs task I only if task I of J completed (both arrays of the same tasks).
FAKE_SBATCH = '''#!{python}
import json, os, re, shlex, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])
jobs = json.loads(state.read_text()) if state.exists() else []
args, dependency, script, parsable = sys.argv[1:], None, None, False
for a in args:
    if a == "--parsable":
        parsable = True
    elif a.startswith("--dependency="):
        dependency = a.split("=", 1)[1]
    elif a.startswith("-"):
        sys.exit(f"fake sbatch: unexpected option {{a}}")
    else:
        script = a
options = {{}}
for line in Path(script).read_text().splitlines():
    if line.startswith("#SBATCH "):
        for word in shlex.split(line[len("#SBATCH "):]):
            key, _, value = word[2:].partition("=")
            options[key] = value or True
by_id = {{j["id"]: j for j in jobs}}
job_id = str(1000 + len(jobs))
array = options.get("array")
if array:
    lo, hi = array.split("%")[0].split("-")
    tasks = [str(i) for i in range(int(lo), int(hi) + 1)]
else:
    tasks = [None]
ready = [True] * len(tasks)
if dependency is not None:
    m = re.fullmatch(r"(afterok|aftercorr):(\\d+)", dependency)
    if not m or m.group(2) not in by_id:
        sys.exit(f"sbatch: error: Batch job submission failed: Job dependency problem ({{dependency}})")
    kind, named = m.group(1), by_id[m.group(2)]
    if kind == "afterok":
        ready = [all(s == "COMPLETED" for s in named["states"])] * len(tasks)
    elif not array or not named["array"] or named["tasks"] != tasks:
        sys.exit(f"fake sbatch: {{dependency}} between jobs that are not arrays of the same tasks")
    else:
        ready = [s == "COMPLETED" for s in named["states"]]
states = []
for task, go in zip(tasks, ready):
    if os.environ.get("FAKE_SBATCH_RUN", "1") != "1":
        states.append("PENDING")
    elif not go:  # what squeue shows as the reason; --kill-on-invalid-dep=yes then cancels it
        states.append("DependencyNeverSatisfied")
    else:
        env = {{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}}
        env["SLURM_JOB_ID"] = job_id
        log = options["output"].replace("%j", job_id).replace("%A", job_id)
        if task is not None:
            env |= {{"SLURM_ARRAY_JOB_ID": job_id, "SLURM_ARRAY_TASK_ID": task}}
            log = log.replace("%a", task)
        with open(log, "a") as f:  # fails when the log folder is missing, as SLURM would
            rc = subprocess.run(["bash", script], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        states.append("COMPLETED" if rc == 0 else "FAILED")
jobs.append({{"id": job_id, "script": script, "dependency": dependency, "array": array, "tasks": tasks,
             "states": states, "options": options}})
state.write_text(json.dumps(jobs))
print(f"{{job_id}};fakecluster" if parsable else f"Submitted batch job {{job_id}}")
'''

# srun stand-ins: run the command (the e2e test; FAKE_SRUN_FAIL="STEP PART" makes that task exit 1
# at once, as a crashing one would) or only record its words.
FAKE_SRUN = '''#!/bin/bash
if [[ -n ${{FAKE_SRUN_FAIL:-}} && " $* " == *" --step ${{FAKE_SRUN_FAIL% *}} --part ${{FAKE_SRUN_FAIL#* }} "* ]]; then
    echo "fake srun: task $FAKE_SRUN_FAIL crashed" >&2
    exit 1
fi
exec "$@"
'''
RECORD_SRUN = ('#!{python}\nimport json, os, sys\n'
               'open(os.environ["SRUN_RECORD"], "a").write(json.dumps(sys.argv[1:]) + "\\n")\n')


def fake_bin(tmp_path: Path, srun: str = FAKE_SRUN, sbatch: bool = True) -> dict[str, str]:
    """An environment whose PATH starts with a folder holding the fake srun (and sbatch)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    programs = {"srun": srun, **({"sbatch": FAKE_SBATCH} if sbatch else {})}
    for name, text in programs.items():
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return env | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_STATE": str(tmp_path / "jobs.json"),
                  "SRUN_RECORD": str(tmp_path / "srun.jsonl")}


def sbatch_lines(script: Path) -> dict[str, str | bool]:
    options = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            for word in shlex.split(line[len("#SBATCH "):]):
                key, _, value = word[2:].partition("=")
                options[key] = value or True
    return options


@pytest.fixture
def spaced_config(tmp_path) -> Path:
    """coco_fixture.yaml copied under a folder and a name with spaces and a quote."""
    folder = tmp_path / "my configs"
    folder.mkdir()
    shutil.copy(CONFIG, folder / "coco fixture's.yaml")
    shutil.copy(CONFIG.parent / "positives.yaml", folder / "positives.yaml")  # the config names it relative
    return folder / "coco fixture's.yaml"


def chain(kinds, ids) -> list[str | None]:
    """The --dependency of each job: KIND:<id of the job before>, None for the first."""
    return [None if kind is None else f"{kind}:{before}" for kind, before in zip(kinds, [None, *ids])]


def task_states(jobs) -> list[str]:
    return [state for j in jobs for state in j["states"]]


def generate(tmp_path, config, overrides, num_parts=4, steps=STEPS, **kwargs):
    cfg = load_curation_config(str(config), overrides)
    return write_scripts(cfg, str(config), overrides, num_parts, tmp_path / "slurm", command=COMMAND,
                         workdir=PROJECT_ROOT, steps=steps, **kwargs)


# --------------------------------------------------------------------------------------------
# The scripts


def test_scripts_parse_and_carry_the_parts_the_resources_and_the_logs(tmp_path, spaced_config):
    scripts = generate(tmp_path, spaced_config, [f"output_dir={tmp_path}/out", "extract.workers=8"],
                       max_concurrent=2, sbatch_options={"time": "01:00:00", "gpus_per_task": 1,
                                                         "rois": {"cpus-per-task": 2, "partition": "gpu a"}})
    assert [p.name for p in scripts] == [f"{i:02d}-{s.name}.sbatch" for i, s in enumerate(STEPS, start=1)]
    for path in scripts + [tmp_path / "slurm" / "submit.sh"]:
        check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, (path.name, check.stderr)
    for step, path in zip(STEPS, scripts):
        o = sbatch_lines(path)
        assert o["job-name"] == f"sapretrain-curate-{step.name}"
        assert o["requeue"] is True and o["time"] == "01:00:00" and o["kill-on-invalid-dep"] == "yes"
        log = Path(o["output"])
        assert log.parent.is_dir() and log.is_absolute()
        if step.partitioned:
            assert o["array"] == "0-3%2" and log.name.endswith("-%A_%a.out")
        else:
            assert "array" not in o and log.name.endswith("-%j.out")
        assert ("gpus-per-task" in o) == (step.name in ("rois", "positives_search"))  # only model steps
    for path, kind in zip(scripts, KINDS):  # the line submit() reads
        assert f"\n# dependency on the step before: {kind or 'none'} (" in path.read_text()
    by_name = {s.name: sbatch_lines(p) for s, p in zip(STEPS, scripts)}
    assert by_name["extract_svo"]["cpus-per-task"] == "8"  # one CPU per extract worker
    assert by_name["captions"]["cpus-per-task"] == "4"
    assert by_name["rois"]["cpus-per-task"] == "2" and by_name["rois"]["partition"] == "gpu a"
    assert "partition" not in by_name["samples"]


def test_each_script_runs_its_step_and_part_with_the_overrides_quoted(tmp_path, spaced_config):
    overrides = [f"output_dir={tmp_path}/out dir", "negatives.mode=rules", "rois.weights=$HOME/it's `x`.pt"]
    scripts = generate(tmp_path, spaced_config, overrides, num_parts=3)
    env = fake_bin(tmp_path, srun=RECORD_SRUN, sbatch=False)
    for step, path in zip(STEPS, scripts):
        task = {"SLURM_ARRAY_TASK_ID": "2"} if step.partitioned else {}
        done = subprocess.run(["bash", str(path)], env=env | task, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    recorded = [json.loads(line) for line in open(tmp_path / "srun.jsonl")]
    for step, argv in zip(STEPS, recorded):
        part = ["--part", "2", "--num-parts", "3"] if step.partitioned else []
        assert argv == [*COMMAND, "curate", "--config", str(spaced_config), "--step", step.name, *part,
                        "--no-progress", *overrides]


def test_streaming_steps_wait_part_by_part_the_others_for_the_whole_step_before():
    assert [dependency(s, before) for s, before in zip(STEPS, [None, *STEPS])] == KINDS
    part, whole = Step("a", True), Step("b", False)
    assert dependency(Step("c", True), part) == "aftercorr"
    assert dependency(Step("c", True, barrier=True), part) == "afterok"  # reads every part of a
    assert dependency(Step("c", True), whole) == "afterok"  # one job: nothing to correspond to
    assert dependency(Step("c", False), part) == "afterok"
    assert dependency(SimpleNamespace(name="c", partitioned=True), part) == "aftercorr"  # barrier: False
    assert dependency(part, None) is None


def test_submit_sh_chains_the_steps_in_order_and_dry_run_submits_nothing(tmp_path, spaced_config):
    scripts = generate(tmp_path, spaced_config, [f"output_dir={tmp_path}/out"])
    submit_sh = tmp_path / "slurm" / "submit.sh"
    env = fake_bin(tmp_path) | {"FAKE_SBATCH_RUN": "0"}
    dry = subprocess.run(["bash", str(submit_sh), "--dry-run"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "jobs.json").exists()
    assert dry.stdout.splitlines() == [f"sbatch --parsable {p.name}" if kind is None else
                                       f"sbatch --parsable --dependency={kind}:<{before.name}> {p.name}"
                                       for p, kind, before in zip(scripts, KINDS, [None, *STEPS])]
    done = subprocess.run(["bash", str(submit_sh)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    jobs = json.loads((tmp_path / "jobs.json").read_text())
    assert [Path(j["script"]).name for j in jobs] == [p.name for p in scripts]
    assert [j["dependency"] for j in jobs] == chain(KINDS, [j["id"] for j in jobs])
    assert done.stdout.splitlines() == [f"{s.name} {j['id']}" for s, j in zip(STEPS, jobs)]  # ;cluster cut
    bad = subprocess.run(["bash", str(submit_sh), "--now"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_python_submit_chains_and_fails_clearly(tmp_path, spaced_config, monkeypatch):
    scripts = generate(tmp_path, spaced_config, [f"output_dir={tmp_path}/out"])
    env = fake_bin(tmp_path) | {"FAKE_SBATCH_RUN": "0"}
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_SLURM_STATE", env["FAKE_SLURM_STATE"])
    monkeypatch.setenv("FAKE_SBATCH_RUN", "0")
    ids = submit(scripts)
    jobs = json.loads((tmp_path / "jobs.json").read_text())
    assert ids == [j["id"] for j in jobs] and len(set(ids)) == len(scripts)
    assert [j["dependency"] for j in jobs] == chain(KINDS, ids)
    # A subset goes in order too; aftercorr only between arrays of the same tasks, else afterok.
    ids = submit([scripts[1], scripts[2], scripts[4]])
    assert [j["dependency"] for j in json.loads((tmp_path / "jobs.json").read_text())[-3:]] == \
        [None, f"aftercorr:{ids[0]}", f"afterok:{ids[1]}"]
    other = generate(tmp_path / "other", spaced_config, [], num_parts=3, steps=STEPS[:3])  # 3 tasks, not 4
    ids = submit([scripts[0], other[1]])
    assert json.loads((tmp_path / "jobs.json").read_text())[-1]["dependency"] == f"afterok:{ids[0]}"
    broken = tmp_path / "missing.sbatch"  # sbatch cannot read it: the chain stops, naming what went in
    monkeypatch.setenv("FAKE_SLURM_STATE", str(tmp_path / "other.json"))
    with pytest.raises(SlurmError, match=r"already submitted: 1000 .*scancel"):
        submit([scripts[0], str(broken)])
    with pytest.raises(SlurmError, match="not on PATH"):
        submit(scripts, sbatch="no-such-sbatch")


def test_bad_options_are_refused_and_stale_scripts_removed(tmp_path, spaced_config):
    with pytest.raises(ValueError, match="set by the generator"):
        generate(tmp_path, spaced_config, [], sbatch_options={"array": "0-9"})
    with pytest.raises(ValueError, match="no such step"):
        generate(tmp_path, spaced_config, [], sbatch_options={"roi": {"time": "1:00:00"}})
    with pytest.raises(ValueError, match="long option"):
        generate(tmp_path, spaced_config, [], sbatch_options={"--time": "1:00:00"})
    with pytest.raises(ValueError, match="num_parts"):
        generate(tmp_path, spaced_config, [], num_parts=0)
    generate(tmp_path, spaced_config, [])
    scripts = generate(tmp_path, spaced_config, [], steps=STEPS[:3])
    assert sorted((tmp_path / "slurm").glob("*.sbatch")) == scripts
    assert "report" not in (tmp_path / "slurm" / "submit.sh").read_text()


def test_the_hand_written_example_runs_the_same_command(tmp_path):
    script = PROJECT_ROOT / "launch" / "slurm" / "curate.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = fake_bin(tmp_path, srun=RECORD_SRUN, sbatch=False)
    for task in ("5", None):
        extra = {"SLURM_ARRAY_TASK_ID": task} if task else {}
        done = subprocess.run(["bash", str(script), "rois", "8", "my config.yaml", "output_dir=/a b"],
                              env=env | extra, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    part, whole = [json.loads(line) for line in open(tmp_path / "srun.jsonl")]
    assert part == ["sapretrain", "curate", "--config", "my config.yaml", "--step", "rois", "--part", "5",
                    "--num-parts", "8", "--no-progress", "output_dir=/a b"]
    assert whole == ["sapretrain", "curate", "--config", "my config.yaml", "--step", "rois", "--no-progress",
                     "output_dir=/a b"]
    assert "#SBATCH --requeue" in script.read_text()


# How each step of the coco fixture waits for the one before (None: the first step).
REAL_CHAIN = {"captions": None, "extract_svo": "aftercorr", "samples": "aftercorr", "rois": "aftercorr",
              "negatives": "aftercorr", "positives_embed": "aftercorr",  # part I reads part I only
              "positives_index": "afterok",  # one process: the index of all embeddings
              "positives_search": "afterok",  # after a one-process step (and a barrier: searches the index)
              "positives_write": "afterok",  # barrier: every part of the search results
              "report": "afterok"}  # one process over everything


@needs_steps
def test_the_real_steps_make_the_documented_chain(tmp_path, monkeypatch):
    names = list(REAL_CHAIN)
    cfg = load_curation_config(str(CONFIG), [])
    assert [s.name for s in curate.steps(cfg)] == names
    scripts = write_scripts(cfg, str(CONFIG), [], 2, tmp_path / "slurm", sbatch_options={"gpus-per-task": 1})
    for step, path in zip(curate.steps(cfg), scripts):
        o = sbatch_lines(path)
        assert ("array" in o) == (step.name not in ("positives_index", "report")) == step.partitioned
        assert ("gpus-per-task" in o) == (step.name in ("rois", "positives_embed", "positives_search"))
        assert f"--step {step.name}" in path.read_text()
    with_filter = load_curation_config(str(CONFIG), ["filter.model=models/filter"])
    assert [s.name for s in curate.steps(with_filter)] == names[:3] + ["relation_filter"] + names[3:]
    with_shards = load_curation_config(str(CONFIG), [f"shards.output={tmp_path}/shards"])
    assert [s.name for s in curate.steps(with_shards)] == names[:-1] + ["shards", "report"]

    # The kinds: from the rule, in submit.sh (dry run: the whole output), and from submit().
    def kinds(c):
        found = curate.steps(c)
        return {s.name: dependency(s, before) for s, before in zip(found, [None, *found])}

    assert kinds(cfg) == REAL_CHAIN
    assert kinds(with_filter) == REAL_CHAIN | {"relation_filter": "aftercorr"}
    assert kinds(with_shards) == REAL_CHAIN | {"shards": "afterok"}  # a barrier: plans the whole manifest
    env = fake_bin(tmp_path) | {"FAKE_SBATCH_RUN": "0"}
    dry = subprocess.run(["bash", str(tmp_path / "slurm" / "submit.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True)
    assert dry.returncode == 0 and not (tmp_path / "jobs.json").exists(), dry.stderr
    assert dry.stdout.splitlines() == [
        "sbatch --parsable 01-captions.sbatch",
        "sbatch --parsable --dependency=aftercorr:<captions> 02-extract_svo.sbatch",
        "sbatch --parsable --dependency=aftercorr:<extract_svo> 03-samples.sbatch",
        "sbatch --parsable --dependency=aftercorr:<samples> 04-rois.sbatch",
        "sbatch --parsable --dependency=aftercorr:<rois> 05-negatives.sbatch",
        "sbatch --parsable --dependency=aftercorr:<negatives> 06-positives_embed.sbatch",
        "sbatch --parsable --dependency=afterok:<positives_embed> 07-positives_index.sbatch",
        "sbatch --parsable --dependency=afterok:<positives_index> 08-positives_search.sbatch",
        "sbatch --parsable --dependency=afterok:<positives_search> 09-positives_write.sbatch",
        "sbatch --parsable --dependency=afterok:<positives_write> 10-report.sbatch",
    ]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ids = submit(scripts)
    jobs = json.loads((tmp_path / "jobs.json").read_text())
    assert [j["dependency"] for j in jobs] == chain(REAL_CHAIN.values(), ids)

    # The hand-written script's example chain says the same.
    example = (PROJECT_ROOT / "launch" / "slurm" / "curate.sbatch").read_text()
    lines = re.findall(r"^#   .*?sbatch (?:--parsable )?(?:--array=\S+ )?(?:--dependency=(\w+):\$J\d+ )?\$S (\w+) ",
                       example, re.M)
    assert {name: kind or None for kind, name in lines} == REAL_CHAIN and len(lines) == len(REAL_CHAIN)


# --------------------------------------------------------------------------------------------
# The whole chain under the fake scheduler


def curated_samples(manifest: Path) -> set[tuple]:
    from sapretrain.jobs import expand_inputs

    rows = []
    for url in expand_inputs(str(manifest)):  # the manifest itself or its part files
        rows += [json.loads(line) for line in open(url) if line.strip()]
    return {(r["id"], r["negative"]["caption"], r["positive"]) for r in rows}


def part_files(out: Path, output: str) -> list[str]:
    """The part files of ``output`` in ``out`` (not their .dropped.jsonl or summaries)."""
    stem, ext = output.rsplit(".", 1)
    pattern = re.compile(rf"{re.escape(stem)}-part\d{{5}}-of\d{{5}}\.{re.escape(ext)}")
    return sorted(p.name for p in out.iterdir() if pattern.fullmatch(p.name))


@pytest.mark.slow
@needs_steps
def test_a_failed_part_holds_back_only_its_own_and_the_chain_again_curates_what_one_process_does(
        tmp_path, spaced_config):
    # All 115 fixture captions: source.limit holds per part, so a limited 2-part run reads more.
    reference = tmp_path / "one process"
    one = subprocess.run([*COMMAND, "curate", "--config", str(spaced_config), "--no-progress",
                          f"output_dir={reference}"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]

    out = tmp_path / "sliced out"
    overrides = [f"output_dir={out}"]
    cfg = load_curation_config(str(spaced_config), overrides)
    steps = curate.steps(cfg)
    assert [s.name for s in steps] == list(REAL_CHAIN)
    scripts = write_scripts(cfg, str(spaced_config), overrides, 2, tmp_path / "slurm", command=COMMAND,
                            workdir=PROJECT_ROOT, sbatch_options={"gpus-per-task": 1})
    env = fake_bin(tmp_path)
    logs = tmp_path / "slurm" / "logs"

    def read_logs():
        return "\n".join(p.read_text()[-2000:] for p in sorted(logs.iterdir()))

    # Part 1 of extract_svo crashes: part 1 of every streaming step after it never runs, part 0
    # goes down the whole pipeline (reading only part 0 of each step before, part 1 being absent),
    # and positives_index, waiting for all of positives_embed, never runs, nor anything after it.
    first = subprocess.run(["bash", str(tmp_path / "slurm" / "submit.sh")], env=env | {"FAKE_SRUN_FAIL": "extract_svo 1"},
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr  # submitting worked; the scheduler ran what it could
    jobs = json.loads((tmp_path / "jobs.json").read_text())
    assert [j["dependency"] for j in jobs] == chain(REAL_CHAIN.values(), [j["id"] for j in jobs])
    done, never = "COMPLETED", "DependencyNeverSatisfied"
    assert {s.name: j["states"] for s, j in zip(steps, jobs)} == {
        "captions": [done, done], "extract_svo": [done, "FAILED"],
        **{name: [done, never] for name in ("samples", "rois", "negatives", "positives_embed")},
        "positives_index": [never], "positives_search": [never, never], "positives_write": [never, never],
        "report": [never]}, read_logs()
    assert "fake srun: task extract_svo 1 crashed" in read_logs()
    for step in steps[:5]:  # captions .. negatives (positives_embed writes under a work folder)
        assert part_files(out, step.output) == [step.output.replace(".", f"-part{i:05d}-of00002.", 1)
                                                for i in (range(2) if step.name == "captions" else [0])]
    assert not (out / "report.json").exists()

    # Fixed and submitted again (from Python this time): the parts that were done exit 0 at once
    # without rewriting anything, the rest runs, and the result is the one-process run's.
    before = {p: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = subprocess.run([sys.executable, "-c", "import sys; from sapretrain.curation.slurm import submit; "
                            "print(submit(sys.argv[1:]))", *map(str, scripts)],
                           env=env, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert again.returncode == 0, again.stderr
    jobs = json.loads((tmp_path / "jobs.json").read_text())[len(steps):]
    assert [j["dependency"] for j in jobs] == chain(REAL_CHAIN.values(), [j["id"] for j in jobs])
    assert set(task_states(jobs)) == {done}, read_logs()
    assert [len(j["tasks"]) for j in jobs] == [2 if s.partitioned else 1 for s in steps]
    assert {p: p.read_bytes() for p in before} == before  # summaries too: nothing done was redone
    assert len(before) < len([p for p in out.iterdir() if p.is_file()])

    expected = curated_samples(reference / "curated.jsonl")
    assert expected and curated_samples(out / "curated.jsonl") == expected
    assert json.loads((out / "report.json").read_text())["samples"] == len(expected)
