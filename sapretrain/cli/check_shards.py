"""Decode every member of every shard against the schema; exit 1 on any problem.

    sapretrain check-shards data/shards/demo
    sapretrain check-shards s3://bucket/shards
"""
from __future__ import annotations

import argparse

from tqdm import tqdm

from sapretrain.shards.check import check_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="directory or fsspec URL holding *.tar shards")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="also require token ids below this (the model's text embedding rows)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    with tqdm(unit="rec", desc="check_shards", disable=args.no_progress) as bar:
        report = check_shards(args.root, progress=bar.update, vocab_size=args.vocab_size)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
