r"""Curated manifest + images → WebDataset tar shards.

    sapretrain make-shards        # the embedded default → data/shards/demo/
    sapretrain make-shards --manifest curated.jsonl --output s3://bucket/shards \
        [--config configs/shards.yaml] [--workers 8] [--part 0 --num-parts 16] [image_size=256 ...]

--manifest takes what every stage's input takes: a file or fsspec URL, a glob, a brace pattern, or
a partitioned curation output (curated.jsonl standing for curated-part00000-of00004.jsonl ...); the
files are read in order as one manifest, each file's relative image paths against its own folder.

Re-running resumes: committed shards are kept, the rest are written. Parts can run on different
machines; the part that completes the set writes sizes.json and summary.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from sapretrain.config import ConfigError, load_config
from sapretrain.jobs import add_part_arguments, parts_from_args

if TYPE_CHECKING:
    from sapretrain.shards.writer import ShardReport

DEFAULT_OUTPUT = "data/shards/demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="curated manifest JSONL: a path or fsspec URL, a glob or brace pattern, or a "
                        "partitioned output whose part files (NAME-partIIIII-ofNNNNN.jsonl) are the input; several "
                        "files are read in order as one manifest; omit for the embedded default")
    parser.add_argument("--output", help=f"output directory or fsspec URL (default for the embedded set: {DEFAULT_OUTPUT})")
    parser.add_argument("--config", help="ShardConfig YAML (default: configs/shards.yaml values built in)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    add_part_arguments(parser)
    parser.add_argument("--scenes", type=int, default=4000, help="embedded default: synthetic training scenes")
    parser.add_argument("--with-manifest", action="append", default=[], metavar="JSONL",
                        help="embedded default: a local manifest added to the scenes (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. image_size=256")
    args = parser.parse_args(argv)
    try:
        parts_from_args(args)  # a wrong --part fails before any work
    except ValueError as e:
        parser.error(str(e))
    from sapretrain.shards.writer import ShardConfig, make_shards  # imports open_clip: not for --help

    progress = not args.no_progress
    manifest, output, config = args.manifest, args.output, args.config
    if manifest is None:
        from sapretrain.scenes.demo import build_demo_manifest

        manifest = build_demo_manifest(scenes=args.scenes, workers=args.workers, progress=progress,
                                       extra=tuple(args.with_manifest))
        output = output or DEFAULT_OUTPUT
        config = config or "configs/shards_demo.yaml"
    elif output is None:
        parser.error("--output is required with --manifest")
    try:
        cfg = load_config(ShardConfig, config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    try:
        report = make_shards(manifest, output, cfg, args.part, args.num_parts, args.workers, progress)
    except (FileNotFoundError, ValueError) as e:  # ValueError: an unreadable file, a pattern matching nothing, a missing part
        print(f"make_shards: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    if report.summary is not None and report.summary["records"] == 0:
        # Surely a mistake (wrong manifest, wrong image root ...): the reasons are listed above.
        print("make_shards: nothing written, every manifest sample was skipped", file=sys.stderr)
        return 1
    return 0


def format_report(report: ShardReport) -> str:
    lines = [
        f"output: {report.output}",
        f"shards: {report.shards_written} written now, {report.shards_skipped} already done,"
        f" {report.shards_total} in the whole set",
        f"records written now: {report.records_written} in {report.seconds:.1f} s"
        + (f" ({report.records_written / report.seconds:.1f} records/s)" if report.seconds > 0 else ""),
    ]
    summary = report.summary
    if summary is None:
        lines.append("other parts are still missing: sizes.json and summary.json come with the last part")
        return "\n".join(lines)
    lines.append(
        f"dataset: {summary['records']} records (pairs) from {summary['samples_read']} valid manifest samples,"
        f" {summary['mutual_pairs_merged']} mutual pairs merged"
    )
    skipped = summary["skipped"]
    if skipped["counts"]:
        lines.append(f"skipped: {sum(skipped['counts'].values())}")
        for reason, n in skipped["counts"].items():
            lines.append(f"  {reason}: {n}   e.g. {skipped['examples'][reason][0]}")
    else:
        lines.append("skipped: 0")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
