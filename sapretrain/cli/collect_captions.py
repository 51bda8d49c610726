r"""Image–caption sources → one captions JSONL (the input of sapretrain extract-svo).

    sapretrain collect-captions --source coco --captions captions_train2017.json \
        [--instances instances_train2017.json] --image-root train2017 --output captions.jsonl
    sapretrain collect-captions --source vg --regions region_descriptions.json \
        [--objects objects.json] [--image-data image_data.json] --image-root VG --output vg.jsonl
    sapretrain collect-captions --source wds --input 's3://bucket/cc3m/{00000..00331}.tar' \
        --source-name cc3m --output cc3m.jsonl --part 0 --num-parts 8   # cc3m-part00000-of00008.jsonl
    sapretrain collect-captions --source tsv --input Train_GCC-training.tsv --columns caption,url \
        --source-name cc3m --output cc3m.jsonl
    sapretrain collect-captions --source csv|jsonl --input FILE [FILE ...] --output out.jsonl

Record format, image references (``tar#member@offset:size`` for tars), splitting and skip reasons are
documented in sapretrain/curation/sources.py; part I of N writes OUT with -partIIIII-ofNNNNN before
its extension (sapretrain.jobs), which later stages read as OUT. An existing output is left alone
(re-running a finished part does nothing) unless --overwrite.
"""
from __future__ import annotations

import argparse

from sapretrain.curation.sources import READERS, collect, format_report
from sapretrain.jobs import Parts, add_part_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=sorted(READERS), help="reader to use")
    parser.add_argument(
        "--output", required=True, help="captions JSONL (path or fsspec URL; .gz compresses); a part writes OUT-partIIIII-ofNNNNN.jsonl"
    )
    parser.add_argument("--source-name", help="the records' source field (default: the reader's name), e.g. cc3m")
    inputs = parser.add_argument_group("inputs (paths or fsspec URLs)")
    inputs.add_argument("--captions", help="coco: captions_*.json")
    inputs.add_argument("--instances", help="coco: instances_*.json (object names and boxes)")
    inputs.add_argument("--regions", help="vg: region_descriptions.json")
    inputs.add_argument("--objects", help="vg: objects.json (object names and boxes)")
    inputs.add_argument("--image-data", help="vg: image_data.json (sizes, image folders)")
    inputs.add_argument(
        "--input", dest="inputs", nargs="+", help="wds/csv/tsv/jsonl: files; {a..b} braces and * globs expand"
    )
    inputs.add_argument(
        "--image-root", help="coco/vg (required), csv/tsv/jsonl: folder relative image names resolve against"
    )
    inputs.add_argument(
        "--image-ext", help="wds with img2dataset parquet: the images' extension (--encode_format; default jpg)"
    )
    columns = parser.add_argument_group("csv / tsv / jsonl")
    columns.add_argument("--caption-column", help="caption column or field (default: caption)")
    columns.add_argument("--image-column", help="image column or field (default: first of path, image, url)")
    columns.add_argument("--id-column", help="column or field with a stable id (default: file stem and row)")
    columns.add_argument("--columns", help="csv/tsv without a header row: comma-separated names, e.g. caption,url")
    parser.add_argument(
        "--min-object-overlap", type=float, help="vg: keep objects at least this much inside the region (default 0.5)"
    )
    add_part_arguments(parser)
    parser.add_argument("--limit", type=int, help="write at most this many records")
    parser.add_argument("--overwrite", action="store_true", help="redo an output that already exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    options = {
        name: getattr(args, name)
        for name in (
            "captions", "instances", "regions", "objects", "image_data", "inputs", "image_root",
            "caption_column", "image_column", "id_column", "columns", "min_object_overlap", "source_name",
            "image_ext",
        )
    }  # fmt: skip
    try:
        parts = Parts(args.part, args.num_parts)
        report = collect(args.source, args.output, options, parts, args.limit, not args.no_progress, args.overwrite)
    except ValueError as e:
        parser.error(str(e))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
