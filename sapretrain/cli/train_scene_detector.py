"""Train the demo's detector: a YOLOv8n (from yolov8n.yaml, random init) on the synthetic train scenes.

    sapretrain train-scene-detector        # data/synthetic/train -> data/detector
    sapretrain train-scene-detector --epochs 5 --imgsz 224 --output data/detector-big

Needs the rendered train scenes (``sapretrain make-shards`` renders them). Writes
``OUTPUT/scenes-yolov8n.pt`` and ``OUTPUT/detector.json`` (settings, validation mAP50); run again with the
same settings it only says the detector is there. The evaluation split is never used.
"""
from __future__ import annotations

import argparse
import sys

from sapretrain.detector import DetectorError
from sapretrain.eval.scene_detector import DetectorSettings, train_scene_detector


def main(argv: list[str] | None = None) -> int:
    defaults = DetectorSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", default="data/synthetic/train", help="rendered train split (images/, manifest.jsonl)")
    p.add_argument("--output", default="data/detector", help="folder for the weights and detector.json")
    p.add_argument("--train-scenes", type=int, default=defaults.train_scenes)
    p.add_argument("--val-scenes", type=int, default=defaults.val_scenes)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--imgsz", type=int, default=defaults.imgsz)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    args = p.parse_args(argv)
    settings = DetectorSettings(args.train_scenes, args.val_scenes, args.epochs, args.imgsz, args.batch)
    try:
        train_scene_detector(args.output, args.synthetic, settings, workers=args.workers)
    except (FileNotFoundError, DetectorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
