#!/usr/bin/env python
r"""Triplet samples → the same plus subject/object ``boxes`` and ``box_source`` (SA-CLIP §2.1).

    python tools/detect_rois.py --input samples.jsonl --output with_boxes.jsonl \
        [--config configs/curation/rois.yaml] [--weights yolov8x.pt] [--chunk-size 5000] \
        [--part 0 --num-parts 16] [--no-progress] [key=value ...]

Ground-truth boxes where the record has ``objects`` (COCO, VG), else an ultralytics YOLO detector
(``detector.*`` in the config). Samples without both boxes go to OUT.dropped.jsonl, counted by
reason (no_box, same_box, unreadable_image, bad_triplet). A killed run resumes after its last
committed chunk when re-run with the same arguments. Details: sapretrain/curation/rois.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sapretrain.config import ConfigError  # noqa: E402
from sapretrain.curation.stage import part_output  # noqa: E402
from sapretrain.curation.rois import DEFAULT_CONFIG, RoiStage, count_box_sources, load_roi_config  # noqa: E402
from sapretrain.curation.stage import StageConfig, format_stage_summary, run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="triplet samples JSONL (path or fsspec URL, .gz allowed)")
    parser.add_argument("--output", required=True, help="output JSONL (path or fsspec URL)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="RoiConfig YAML (default: %(default)s)")
    parser.add_argument("--weights", help="detector weights (.pt), overrides detector.weights")
    parser.add_argument("--chunk-size", type=int, default=5000, help="lines per committed chunk (resume unit)")
    parser.add_argument("--part", type=int, default=0, help="which part of the input this process does")
    parser.add_argument("--num-parts", type=int, default=1, help="into how many parts the input is split")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. detector.conf=0.3")
    args = parser.parse_args(argv)

    overrides = list(args.overrides) + ([f"detector.weights={args.weights}"] if args.weights else [])
    try:
        cfg = load_roi_config(args.config, overrides)
        summary = run_stage(RoiStage(cfg), args.input, args.output, StageConfig(args.chunk_size),
                            args.part, args.num_parts, not args.no_progress)
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
    out = part_output(args.output, args.part, args.num_parts)
    print(f"wrote {out}")
    print(format_stage_summary(summary))
    kept = ", ".join(f"{k} {v}" for k, v in count_box_sources(out).items()) or "none"
    print(f"kept by box_source: {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
