r"""Score triplets with a trained filter and drop those under its threshold (paper §2.1).

    sapretrain filter-triplets --input triplets.jsonl --output filtered.jsonl --model models/filter \
        [--threshold T] [--batch-size 128] [--device auto] [--chunk-size 5000] \
        [--part 0 --num-parts 16] [--no-progress]

Input lines are triplet-level ({"caption", "triplet", ...}) or caption-level ({"caption",
"triplets": [...]}, as extract_svo writes). Kept lines get "filter_score"; dropped ones go to
OUT.dropped.jsonl with "drop_reason": "low_score" and the score in "drop_detail". Resumes after
the last committed chunk when re-run with the same arguments. Details:
sapretrain/curation/relation_filter.py (FilterStage), sapretrain/curation/stage.py.
"""
from __future__ import annotations

import argparse

from sapretrain.curation.relation_filter import FilterStage
from sapretrain.curation.stage import add_stage_arguments, format_stage_summary, run_stage_from_args
from sapretrain.jobs import Parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="triplets JSONL (path or fsspec URL, .gz allowed)")
    parser.add_argument("--output", required=True, help="filtered JSONL (path or fsspec URL)")
    parser.add_argument("--model", required=True, help="folder written by sapretrain train-filter")
    parser.add_argument("--threshold", type=float, help="keep score >= this (default: the model's, chosen on validation)")
    parser.add_argument("--batch-size", type=int, default=128, help="triplets per forward pass")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_stage_arguments(parser)
    args = parser.parse_args(argv)

    try:
        stage = FilterStage(args.model, args.threshold, args.device, args.batch_size)
        summary = run_stage_from_args(stage, args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(f"wrote {Parts(args.part, args.num_parts).output(args.output)} (threshold {stage.threshold:.4f})")
    print(format_stage_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
