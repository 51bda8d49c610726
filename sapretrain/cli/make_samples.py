"""extract_svo output (one line per caption, with ``triplets``) → one sample per (caption, triplet).

    sapretrain make-samples --input triplets.jsonl --output samples.jsonl \\
        [--kinds spatial,action] [--max-per-caption 4] [--exclude builtin:vsr vsr/test.jsonl ...] \\
        [--chunk-size 5000] [--part 0 --num-parts 16]

The samples are what the filter, negatives, ROI and positives stages read (docs/curation.md §3);
dropped captions/triplets go to OUT.dropped.jsonl with their reason. A killed run resumes.
"""
from __future__ import annotations

import argparse

from sapretrain.curation.exclude import ExcludingStage, load_exclusions
from sapretrain.curation.samples import SampleConfig, SampleStage
from sapretrain.curation.stage import add_stage_arguments, format_stage_summary, run_stage_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="extract_svo output (path or fsspec URL)")
    parser.add_argument("--output", required=True, help="samples JSONL (path or fsspec URL)")
    parser.add_argument("--kinds", default="spatial,action", help="relation kinds to keep")
    parser.add_argument("--max-per-caption", type=int, default=4, help="samples per caption at most")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="LIST",
                        help="exclusion lists of evaluation images (builtin:vsr, VSR/SugarCrepe/DoTA files, "
                             "text lists): their captions are dropped as excluded_eval_image")
    add_stage_arguments(parser)
    args = parser.parse_args(argv)
    stage = SampleStage(SampleConfig(kinds=args.kinds.split(","), max_per_caption=args.max_per_caption))
    try:
        if args.exclude:
            stage = ExcludingStage(stage, load_exclusions(args.exclude))
        summary = run_stage_from_args(stage, args)
    except ValueError as e:
        parser.error(str(e))
    print(format_stage_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
