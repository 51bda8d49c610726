"""Run the whole curation, sources to the curated manifest that make_shards reads.

    sapretrain curate --config configs/curation/coco_fixture.yaml [key=value ...]
    sapretrain make-shards --manifest data/curation/coco_fixture/curated.jsonl --output data/shards/coco_fixture

Stages (collect, extract_svo, samples, relation filter, negatives, ROIs, positives), their files
and resume are described in sapretrain/curation/curate.py and docs/curation.md. A killed run
re-run with the same config continues where it stopped. The report is OUTPUT_DIR/report.md
(+ report.json, relations.png, kinds.png).
"""
from __future__ import annotations

import argparse
import sys

from sapretrain.config import ConfigError
from sapretrain.curation.curate import load_curation_config, run_curation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="curation config, e.g. configs/curation/coco_fixture.yaml")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. output_dir=/tmp/c")
    args = parser.parse_args(argv)
    try:
        cfg = load_curation_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        report = run_curation(cfg, progress=not args.no_progress)
    except ValueError as e:  # a stage refused its input or output, or kept nothing: the reason, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{report['samples']} curated samples: {report['manifest']}")
    print(f"report: {cfg.output_dir.rstrip('/')}/report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
