r"""VSR training rows + COCO boxes → a curated manifest, for the "w/o pretraining" Table 3 rows.

    sapretrain vsr-train-manifest --vsr zeroshot_train.jsonl \
        --annotations instances_train2017.json --images /data/coco/train2017 \
        --output data/vsr/train_manifest.jsonl
    sapretrain make-shards --manifest data/vsr/train_manifest.jsonl --output data/shards/vsr_train shard_size=100

Only a training split belongs here (never the dev/test rows the evaluation scores). The logic and
every skip reason: sapretrain/curation/vsr_train.py. Exits 1 when no sample could be made.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vsr", required=True, help="VSR training JSONL (e.g. zeroshot_train.jsonl)")
    parser.add_argument("--annotations", required=True,
                        help="COCO instances JSON (instances_train2017.json) or the per-image JSONL of the fixtures")
    parser.add_argument("--images", required=True, help="directory (or URL prefix) holding the COCO images")
    parser.add_argument("--output", required=True, help="manifest JSONL to write (path or fsspec URL)")
    args = parser.parse_args(argv)
    from sapretrain import storage
    from sapretrain.curation.vsr_train import vsr_train_manifest
    from sapretrain.eval.vsr import load_coco_annotations, read_vsr  # imports torch: not for --help

    if any(word in args.vsr.rsplit("/", 1)[-1] for word in ("test", "dev")):
        parser.error(f"{args.vsr} looks like an evaluation split: only training rows may train a model")
    rows, bad = read_vsr(args.vsr)
    samples, skips = vsr_train_manifest(rows, load_coco_annotations(args.annotations), args.images)
    text = "".join(json.dumps(s, sort_keys=True) + "\n" for s in samples)
    print(f"{args.vsr}: {len(rows) + len(bad)} rows, {len(bad)} unreadable, {len(samples)} samples")
    for reason, n in sorted(skips.counts.items()):
        print(f"  skipped {reason}: {n}   e.g. {skips.examples[reason][0]}")
    if not samples:
        print("no sample could be made: nothing written", file=sys.stderr)
        return 1
    storage.write_bytes_atomic(args.output, text.encode("utf-8"))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
