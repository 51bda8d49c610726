"""The curation on SLURM: one job array per step, each after the one before (part by part where it streams).

    scripts = write_scripts(cfg, "configs/curation/coco.yaml", ["output_dir=/data/c"], num_parts=16,
                            out_dir="slurm/coco", sbatch_options={"partition": "cpu", "time": "12:00:00",
                                                                  "gpus-per-task": 1, "rois": {"partition": "gpu"}})
    job_ids = submit(scripts)          # or: bash slurm/coco/submit.sh [--dry-run]

``write_scripts(cfg, config_path, overrides, num_parts, out_dir, sbatch_options=None,
command="sapretrain", max_concurrent=None, workdir=None, steps=None) -> list[Path]`` writes, for
each step of ``curate.steps(cfg)`` in order, ``OUT_DIR/NN-<step>.sbatch`` and returns their paths
in that order; next to them ``OUT_DIR/submit.sh`` submits them all, and ``OUT_DIR/logs/`` takes the
jobs' logs. A partitioned step is a job array ``--array=0-(N-1)`` (``%max_concurrent`` when
given) whose task ``I`` runs, from ``workdir`` (default: the current directory),

    srun sapretrain curate --config CONFIG --step NAME --part $SLURM_ARRAY_TASK_ID --num-parts N --no-progress OVERRIDES

and a step that is not partitioned (``positives_index``, ``report``) is one job running
``--step NAME`` alone. Every argument is shell-quoted, so a config path or an override with a
space or a quote arrives as it was given. ``command`` is what stands for ``sapretrain`` (a string
split like a shell word list, or a list: ``[sys.executable, "-m", "sapretrain.cli"]``); ``steps``
replaces ``curate.steps(cfg)`` (anything with ``name`` and ``partitioned``, and ``barrier``, False
when missing as in ``curate.Step``). Scripts of an earlier generation in ``OUT_DIR``
(``NN-*.sbatch``) are removed first, so ``submit.sh`` and the folder agree.

**The chain** (``dependency(step, before)``). Each step but the first waits for the step before:

- ``--dependency=aftercorr:<job id>`` for a *streaming* step: partitioned, not ``barrier``, after a
  partitioned step. Its task ``I`` starts as soon as task ``I`` of the step before exited 0
  (both arrays have the same ``N`` tasks), because part ``I`` reads only part ``I`` of the step
  before (``jobs.part_segments``): ``captions`` → ``extract_svo`` → ``samples`` → ... →
  ``positives_embed`` run as ``N`` independent pipelines, and a failed part stops only its own.
- ``--dependency=afterok:<job id>`` otherwise: a ``barrier`` step (its parts read every part of the
  step before: ``positives_search``, ``positives_write``, ``shards``), a one-process step
  (``positives_index``, ``report``) and the step after one. ``afterok`` on an array job waits
  for every task of the array to exit 0.

Each script names its kind in a comment line (``# dependency on the step before: KIND ...``).

``submit(scripts, sbatch="sbatch") -> list[str]`` submits the scripts in order, each but the first
with the dependency its script names on the job of the one before (``afterok`` where a script
names none, or where the two are not arrays of the same tasks), and returns the job ids.
``SlurmError`` when ``sbatch`` is not on PATH or refuses a script (the jobs already submitted are
named, to ``scancel``).

**sbatch options** (``sbatch_options``): a long option name (``time``, ``cpus_per_task`` or
``cpus-per-task``) maps to its value (``True``: the bare flag; ``None`` or ``False``: left out);
a step name maps to a dict of options for that step only, which win over the others. Every step
starts from ``DEFAULT_OPTIONS`` (one task, 4 CPUs, ``--requeue``, logs appended across requeues,
``--kill-on-invalid-dep=yes``: what waits for a failed part, its own part of the streaming steps
after it, then all of the first ``afterok`` step and every step after, is cancelled rather than
left pending with ``DependencyNeverSatisfied``). ``gpus-per-task`` given for all steps goes only
to the model steps that use a GPU (``GPU_STEPS``); ``extract_svo`` gets at least
``cfg.extract.workers`` CPUs, the processes each of its parts starts. ``array`` and
``dependency`` belong to the generator and are refused.

**Requeue and re-runs.** A step part reads the part files of the step before directly
(``jobs.part_segments``: no merge step), resumes at its last committed chunk, and a part already
finished does nothing and exits 0; so a requeued task continues, and a whole chain submitted again
redoes only what is missing: the failed parts and what was cancelled behind them
(``sbatch --array=3,7 NN-step.sbatch`` re-runs two parts of one step alone).
``launch/slurm/curate.sbatch`` is the same script for one step, written by hand.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from sapretrain.curation.curate import CurationConfig

# Every step's sbatch options before the caller's (a value None leaves the option out).
DEFAULT_OPTIONS: dict[str, Any] = {
    "ntasks": 1,
    "cpus-per-task": 4,
    "requeue": True,
    "open-mode": "append",  # a requeued task's log continues its first attempt's
    "kill-on-invalid-dep": "yes",  # a failed step cancels the steps after it instead of leaving them pending
}
GPU_STEPS = frozenset({"relation_filter", "rois", "positives_embed", "positives_search"})
GENERATED = ("array", "dependency")  # set by the generator and submit, never by sbatch_options
_OPTION = re.compile(r"^[a-z][a-z0-9-]*$")
DEPENDENCY_LINE = "# dependency on the step before: "  # then the kind (aftercorr, afterok, none)
_DEPENDENCY = re.compile("^" + re.escape(DEPENDENCY_LINE) + r"(aftercorr|afterok)\b", re.M)
_ARRAY = re.compile(r"^#SBATCH --array=([0-9,-]+)", re.M)


class SlurmError(RuntimeError):
    """sbatch is missing or refused a script."""


def dependency(step, before) -> str | None:
    """How ``step`` waits for the step ``before`` it (None: it is the first): ``aftercorr`` when it
    streams (partitioned, not ``barrier``, after a partitioned step: part I reads only part I of
    ``before``), ``afterok`` otherwise (see the module doc)."""
    if before is None:
        return None
    streams = step.partitioned and before.partitioned and not getattr(step, "barrier", False)
    return "aftercorr" if streams else "afterok"


def _option_name(key: str) -> str:
    name = str(key).replace("_", "-")
    if not _OPTION.match(name):
        raise ValueError(f"sbatch option {key!r} is not a long option name (e.g. time, cpus-per-task)")
    if name in GENERATED:
        raise ValueError(f"sbatch option {name!r} is set by the generator (parts and the dependency chain)")
    return name


def step_options(step, cfg: "CurationConfig", sbatch_options: dict[str, Any] | None, step_names: set[str]
                 ) -> dict[str, Any]:
    """The sbatch options (long name -> value; see the module doc) of one step's script."""
    common, per_step = {}, {}
    for key, value in (sbatch_options or {}).items():
        if isinstance(value, dict):
            if key not in step_names:
                raise ValueError(f"sbatch options for {key!r}: no such step (steps: {', '.join(sorted(step_names))})")
            if key == step.name:
                per_step = {_option_name(k): v for k, v in value.items()}
        else:
            common[_option_name(key)] = value
    options = dict(DEFAULT_OPTIONS) | common
    if step.name not in GPU_STEPS:
        options.pop("gpus-per-task", None)
    if step.name == "extract_svo":
        workers = int(getattr(cfg.extract, "workers", 1) or 1)
        options["cpus-per-task"] = max(int(options.get("cpus-per-task") or 1), workers)
    options |= per_step
    return {k: v for k, v in options.items() if v is not None and v is not False}


def _sbatch_line(name: str, value: Any) -> str:
    if value is True:
        return f"#SBATCH --{name}"
    text = str(value)
    if any(c in text for c in '"\n\r'):
        raise ValueError(f"sbatch option --{name}={text!r}: a double quote or newline cannot be written in #SBATCH")
    return f'#SBATCH --{name}="{text}"' if any(c.isspace() for c in text) else f"#SBATCH --{name}={text}"


def _command_words(command: str | Sequence[str]) -> list[str]:
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    if not words:
        raise ValueError("command is empty (it stands for `sapretrain`)")
    return words


def write_scripts(cfg: "CurationConfig", config_path: str, overrides: Sequence[str], num_parts: int,
                  out_dir: str | Path, sbatch_options: dict[str, Any] | None = None,
                  command: str | Sequence[str] = "sapretrain", max_concurrent: int | None = None,
                  workdir: str | Path | None = None, steps: Sequence | None = None) -> list[Path]:
    """One sbatch script per curation step plus ``submit.sh`` in ``out_dir`` (see the module doc);
    returns the step scripts in submission order."""
    if not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"num_parts must be a positive integer, not {num_parts!r}")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise ValueError(f"max_concurrent must be a positive integer or None, not {max_concurrent!r}")
    if steps is None:
        from sapretrain.curation.curate import steps as curation_steps

        steps = curation_steps(cfg)
    steps = list(steps)
    names = [s.name for s in steps]
    if not steps or len(set(names)) != len(names):
        raise ValueError(f"steps must be a non-empty list of distinct names, not {names}")
    words = _command_words(command)
    out = Path(out_dir).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)  # SLURM does not create the folder of --output
    workdir = Path(workdir or Path.cwd()).resolve()
    for old in out.glob("[0-9][0-9]-*.sbatch"):
        old.unlink()
    options = [step_options(s, cfg, sbatch_options, set(names)) for s in steps]
    kinds = [dependency(s, before) for s, before in zip(steps, [None, *steps[:-1]])]
    scripts = []
    for number, (step, opts, kind) in enumerate(zip(steps, options, kinds), start=1):
        path = out / f"{number:02d}-{step.name}.sbatch"
        path.write_text(_step_script(step, number, len(steps), opts, kind, words, config_path, overrides,
                                     num_parts, max_concurrent, logs, workdir))
        path.chmod(0o755)
        scripts.append(path)
    submit_sh = out / "submit.sh"
    submit_sh.write_text(_submit_script(steps, scripts, kinds, config_path, num_parts))
    submit_sh.chmod(0o755)
    return scripts


_WAITS = {
    None: "none (the first step)",
    "aftercorr": "aftercorr (task I starts when task I of it succeeded: part I reads only part I)",
    "afterok": "afterok (it starts when all of it succeeded)",
}


def _step_script(step, number: int, total: int, options: dict[str, Any], kind: str | None, words: list[str],
                 config_path: str, overrides: Sequence[str], num_parts: int, max_concurrent: int | None,
                 logs: Path, workdir: Path) -> str:
    args = [*words, "curate", "--config", str(config_path), "--step", step.name]
    if step.partitioned:
        what = f"parts 0..{num_parts - 1} of {num_parts}, one array task each"
        head = {"array": f"0-{num_parts - 1}" + (f"%{max_concurrent}" if max_concurrent else "")}
        log = logs / f"{number:02d}-{step.name}-%A_%a.out"
        part = ' --part "$SLURM_ARRAY_TASK_ID"' + f" --num-parts {num_parts}"
    else:
        what, head, log, part = "one job (not partitioned)", {}, logs / f"{number:02d}-{step.name}-%j.out", ""
    head = {"job-name": f"sapretrain-curate-{step.name}", **head, "output": str(log)} | options
    command = "srun " + " ".join(shlex.quote(w) for w in args) + part + " --no-progress"
    command += "".join(" " + shlex.quote(str(o)) for o in overrides)
    return "\n".join([
        "#!/bin/bash",
        f"# sapretrain curation, step {number} of {total}: {step.name}, {what}.",
        "# It reads the output of the step before in the config's output_dir (part files found by name,",
        "# no merge step) and writes its own there; a part already finished exits 0 at once.",
        "# Written by sapretrain.curation.slurm: submit the whole chain with submit.sh next to it"
        + (f"; re-run some\n# parts alone with `sbatch --array=I,J {number:02d}-{step.name}.sbatch`."
           if step.partitioned else "."),
        DEPENDENCY_LINE + _WAITS[kind],  # submit() reads the kind here
        *(_sbatch_line(k, v) for k, v in head.items()),
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        command,
        "",
    ])


def _submit_script(steps, scripts: list[Path], kinds: list[str | None], config_path: str, num_parts: int) -> str:
    lines = [
        "#!/bin/bash",
        f"# Submits the {len(steps)} curation steps of {config_path} ({num_parts} parts) in order, each",
        "# after the one before: --dependency=aftercorr where it streams (array task I starts when task I",
        "# of the step before succeeded), --dependency=afterok otherwise (all of the step before succeeded).",
        "#   bash submit.sh            # submit; prints one line `STEP JOB_ID` per step",
        "#   bash submit.sh --dry-run  # print the sbatch commands, submit nothing",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "DRY_RUN=0",
        'case "${1:-}" in',
        "    --dry-run) DRY_RUN=1 ;;",
        '    "") ;;',
        '    *) echo "usage: bash $0 [--dry-run]" >&2; exit 2 ;;',
        "esac",
        "if ! (( DRY_RUN )) && ! command -v sbatch >/dev/null; then",
        '    echo "sbatch is not on PATH (run this on a SLURM login node)" >&2',
        "    exit 1",
        "fi",
        'JID=""',
        "step() {  # step NAME SCRIPT [KIND]: submits SCRIPT with --dependency=KIND:$JID (the step before), sets JID",
        "    local args=(--parsable)",
        '    [[ -n $JID ]] && args+=("--dependency=${3:?}:$JID")',
        "    if (( DRY_RUN )); then",
        '        echo "sbatch ${args[*]} $2"',
        '        JID="<$1>"',
        "        return",
        "    fi",
        '    JID=$(sbatch "${args[@]}" "$2")',
        '    JID=${JID%%;*}  # --parsable prints ID or ID;CLUSTER',
        '    echo "$1 $JID"',
        "}",
    ]
    lines += [f"step {shlex.quote(s.name)} {shlex.quote(p.name)}" + (f" {kind}" if kind else "")
              for s, p, kind in zip(steps, scripts, kinds)]
    return "\n".join(lines) + "\n"


def _script_dependency(script: Path, before: Path | None) -> str | None:
    """The kind ``script`` names (module doc), or afterok where it names none or where ``script`` and
    ``before`` are not arrays of the same tasks; None for the first."""
    if before is None:
        return None
    try:
        texts = [script.read_text(), before.read_text()]
    except (OSError, UnicodeDecodeError):
        return "afterok"  # sbatch will say what is wrong with it
    named = _DEPENDENCY.search(texts[0])
    arrays = [_ARRAY.search(t) for t in texts]
    same_tasks = all(arrays) and arrays[0].group(1) == arrays[1].group(1)
    return "aftercorr" if named and named.group(1) == "aftercorr" and same_tasks else "afterok"


def submit(scripts: Sequence[str | Path], sbatch: str = "sbatch") -> list[str]:
    """Submit ``scripts`` in order, each after the one before (with the dependency kind its script
    names: module doc); returns their job ids."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise SlurmError(f"{sbatch!r} is not on PATH: submit from a SLURM login node (the scripts are written; "
                         "bash submit.sh next to them does the same)")
    job_ids: list[str] = []
    paths = [Path(s) for s in scripts]
    for script, before in zip(paths, [None, *paths[:-1]]):
        kind = _script_dependency(script, before)
        args = [exe, "--parsable"] + ([f"--dependency={kind}:{job_ids[-1]}"] if kind else []) + [str(script)]
        done = subprocess.run(args, capture_output=True, text=True)
        job_id = done.stdout.strip().split(";", 1)[0]
        if done.returncode != 0 or not job_id:
            already = f"; already submitted: {' '.join(job_ids)} (scancel them to drop the chain)" if job_ids else ""
            raise SlurmError(f"sbatch {script} failed (exit {done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()}{already}")
        job_ids.append(job_id)
    return job_ids
