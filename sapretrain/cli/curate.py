"""Run the whole curation, sources to the curated manifest that make_shards reads.

    sapretrain curate --config configs/curation/coco_fixture.yaml [key=value ...]
    sapretrain make-shards --manifest data/curation/coco_fixture/curated.jsonl --output data/shards/coco_fixture

Engines: local (default: every step in this process), ray (``--engine ray [--address auto]
[--num-parts N]``: every step's parts as Ray Data pipelines on a Ray cluster; needs
``pip install 'sapretrain[ray]'``). One part of one step: ``--step NAME [--part I --num-parts N]``
(what a SLURM array task or any other scheduler runs; ``--step report`` writes the report once
every step is done). slurm (``--engine slurm --num-parts N [--sbatch time=12:00:00 ...]
[--submit]``): one sbatch job array per step in OUTPUT_DIR/slurm (or ``--slurm-dir``), chained with
``--dependency=afterok``, and submit.sh; ``--submit`` submits them (docs/curation.md "Running on
SLURM"). Steps: captions, extract_svo, samples, [relation_filter], rois, negatives,
positives_embed, positives_index, positives_search, positives_write, report.

Stages (collect, extract_svo, samples, relation filter, negatives, ROIs, positives), their files
and resume are described in sapretrain/curation/curate.py and docs/curation.md. A killed run
re-run with the same config continues where it stopped. The report is OUTPUT_DIR/report.md
(+ report.json, relations.png, kinds.png).
"""
from __future__ import annotations

import argparse
import sys

from sapretrain.config import ConfigError
from sapretrain.curation.curate import format_step_summary, load_curation_config, run_curation, run_step
from sapretrain.jobs import Parts, add_part_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="curation config, e.g. configs/curation/coco_fixture.yaml")
    parser.add_argument("--engine", choices=("local", "ray", "slurm"), default="local", help="where the steps run")
    parser.add_argument("--address", help="Ray cluster address (--engine ray; default: a local Ray, or RAY_ADDRESS)")
    parser.add_argument("--step", help="run only this step (with --part/--num-parts for its part)")
    add_part_arguments(parser)
    parser.add_argument("--slurm-dir", help="--engine slurm: where the job scripts go (default OUTPUT_DIR/slurm)")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION=VALUE",
                        help="--engine slurm: an sbatch option for every step, or STEP:OPTION=VALUE for one")
    parser.add_argument("--submit", action="store_true", help="--engine slurm: submit the scripts with sbatch")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. output_dir=/tmp/c")
    args = parser.parse_args(argv)
    try:
        cfg = load_curation_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        if args.step:
            summary = run_step(cfg, args.step, Parts(args.part, args.num_parts), progress=not args.no_progress)
            print(format_step_summary(args.step, Parts(args.part, args.num_parts), summary))
            return 0
        if args.part:
            raise ValueError("--part needs --step (an engine runs every part itself)")
        if args.engine == "slurm":
            return _slurm(cfg, args)
        num_parts = args.num_parts if args.num_parts != 1 else None
        report = run_curation(cfg, progress=not args.no_progress, engine=args.engine, num_parts=num_parts,
                              address=args.address)
    except ValueError as e:  # a stage refused its input or output, or kept nothing: the reason, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{report['samples']} curated samples: {report['manifest']}")
    for note in report.get("warnings", []):
        print(f"warning: {note}")
    print(f"report: {cfg.output_dir.rstrip('/')}/report.md")
    return 0


def _slurm(cfg, args) -> int:
    from sapretrain.curation.slurm import SlurmError, submit, write_scripts

    options: dict = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--sbatch {item!r}: expected OPTION=VALUE or STEP:OPTION=VALUE")
        step, colon, key = key.rpartition(":")
        (options.setdefault(step, {}) if colon else options)[key] = value
    from sapretrain import storage

    if not args.slurm_dir and storage.is_url(cfg.output_dir):
        raise ValueError(f"output_dir {cfg.output_dir} is not a local folder: give --slurm-dir for the job scripts")
    out_dir = args.slurm_dir or f"{cfg.output_dir.rstrip('/')}/slurm"
    scripts = write_scripts(cfg, args.config, args.overrides, args.num_parts, out_dir, options)
    print(f"wrote {len(scripts)} job scripts and {out_dir}/submit.sh ({args.num_parts} parts per step)")
    if not args.submit:
        print(f"submit with: bash {out_dir}/submit.sh")
        return 0
    try:
        ids = submit(scripts)
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("submitted: " + " -> ".join(ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
