r"""Triplet samples → the same plus subject/object ``boxes`` and ``box_source`` (SA-CLIP §2.1).

    sapretrain detect-rois --input samples.jsonl --output with_boxes.jsonl \
        [--config configs/curation/rois.yaml] [--weights yolov8x.pt] [--chunk-size 5000] \
        [--part 0 --num-parts 16] [--no-progress] [key=value ...]

Ground-truth boxes where the record has ``objects`` (COCO, VG), else an ultralytics YOLO detector
(``detector.*`` in the config). Samples without both boxes go to OUT.dropped.jsonl, counted by
reason (no_box, same_box, unreadable_image, bad_triplet). A killed run resumes after its last
committed chunk when re-run with the same arguments. Details: sapretrain/curation/rois.py.
"""
from __future__ import annotations

import argparse

from sapretrain.config import ConfigError
from sapretrain.curation.rois import DEFAULT_CONFIG, RoiStage, count_box_sources, load_roi_config
from sapretrain.curation.stage import add_stage_arguments, format_stage_summary, run_stage_from_args
from sapretrain.jobs import Parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="triplet samples JSONL (path or fsspec URL, .gz allowed)")
    parser.add_argument("--output", required=True, help="output JSONL (path or fsspec URL)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="RoiConfig YAML (default: %(default)s)")
    parser.add_argument("--weights", help="detector weights (.pt), overrides detector.weights")
    add_stage_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. detector.conf=0.3")
    args = parser.parse_args(argv)

    overrides = list(args.overrides) + ([f"detector.weights={args.weights}"] if args.weights else [])
    try:
        cfg = load_roi_config(args.config, overrides)
        summary = run_stage_from_args(RoiStage(cfg), args)
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
    out = Parts(args.part, args.num_parts).output(args.output)
    if not summary.get("already_done"):
        print(f"wrote {out}")
    print(format_stage_summary(summary))
    kept = ", ".join(f"{k} {v}" for k, v in count_box_sources(out).items()) or "none"
    print(f"kept by box_source: {kept}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
