"""Evaluate SA-CLIP checkpoints and plain CLIP baselines (paper §3): spatial probe, VSR, DoTA, SugarCrepe.

    sapretrain evaluate --task spatial --checkpoint SA-CLIP=runs/demo/saclip \\
        --checkpoint CLIP=runs/demo/clip --baseline CLIP --output runs/demo
    sapretrain evaluate --task vsr --checkpoint runs/paper --checkpoint openclip:ViT-B-32:openai \\
        --vsr vsr/zeroshot_test.jsonl --images coco/images --instances coco/instances_all.json \\
        --dev vsr/zeroshot_dev.jsonl --output runs/eval/vsr
    sapretrain evaluate --task dota --checkpoint runs/paper --metadata DoTA/metadata_val.json \\
        --frames DoTA/frames [--annotations DoTA/annotations] --output runs/eval/dota
    sapretrain evaluate --task shards --checkpoint runs/paper --shards data/shards/coco-val \\
        [--features data/features/coco-val] --output runs/eval/coco-val
    sapretrain evaluate --task sugarcrepe --checkpoint runs/paper --checkpoint openclip:ViT-B-32:openai \\
        --sugarcrepe sugar-crepe/data --images coco/val2017 --instances coco/instances_val2017.json \\
        --lm-corpus coco/captions_train2017.json --output runs/eval/sugarcrepe

``--checkpoint`` (repeatable, ``LABEL=SPEC`` or ``SPEC``): a training run directory (its latest
checkpoint), one checkpoint directory, a ``save_saclip`` file, or ``openclip:MODEL[:TAG|WEIGHTS]``
for a plain open_clip CLIP through the same code. Writes ``OUTPUT/results.json``, ``OUTPUT/results.md``
and plots; docs/evaluation.md describes each task, its rule and its metric.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sapretrain.eval import run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=("spatial", "vsr", "dota", "shards", "sugarcrepe"))
    p.add_argument("--checkpoint", action="append", required=True, metavar="[LABEL=]SPEC",
                   help="model to evaluate (repeatable)")
    p.add_argument("--output", required=True, help="output folder for results.json, results.md and plots")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--no-progress", action="store_true")
    spatial = p.add_argument_group("spatial")
    spatial.add_argument("--scenes", type=int, default=800, help="held-apart probe scenes")
    spatial.add_argument("--k", type=int, default=10, help="neighbours of the k-NN relation classifier")
    spatial.add_argument("--baseline", help="label of the model the verdict compares the candidate with")
    spatial.add_argument("--candidate", help="label of the model the verdict is about (default: the first other)")
    spatial.add_argument("--margin", type=float, default=run.VERDICT_MARGIN,
                         help="cross-modal relation accuracy gain (headline boxes) the candidate must reach")
    spatial.add_argument("--workers", type=int, default=1, help="processes rendering the probe scenes")
    vsr = p.add_argument_group("vsr")
    vsr.add_argument("--vsr", help="VSR JSONL to evaluate (e.g. zeroshot test)")
    vsr.add_argument("--images", help="folder (or URL) of the COCO images VSR refers to")
    vsr.add_argument("--instances", help="COCO instances JSON (or our per-image JSONL) for the boxes")
    vsr.add_argument("--detector-weights", "--detector", dest="detector_weights", metavar="PATH",
                     help="YOLO weights (.pt) of the detector that finds the boxes (every task with boxes); "
                          "vsr: the headline mode, --instances then adds gold boxes as a secondary mode")
    vsr.add_argument("--rule", default="contrast", choices=("contrast", "threshold"))
    vsr.add_argument("--dev", help="VSR dev JSONL: tunes the threshold (never the evaluated file)")
    dota = p.add_argument_group("dota")
    dota.add_argument("--metadata", help="DoTA metadata JSON (metadata_val.json)")
    dota.add_argument("--frames", help="DoTA frames root: <clip>/images/NNNNNN.jpg")
    dota.add_argument("--annotations", help="DoTA per-clip annotation JSONs: adds an annotated-box row (secondary)")
    dota.add_argument("--descriptions", default=run.dota.DEFAULT_DESCRIPTIONS, help="description hierarchy YAML")
    dota.add_argument("--frame-stride", type=int, default=1, help="keep every k-th frame")
    dota.add_argument("--max-clips", type=int, help="only the first N non-ego clips")
    dota.add_argument("--bootstrap", type=int, default=run.dota.BOOTSTRAP_RESAMPLES,
                      help="clip resamples of the 95%% confidence intervals")
    dota.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    sugar = p.add_argument_group("sugarcrepe (also --images, and --instances or --detector-weights for boxes)")
    sugar.add_argument("--sugarcrepe", nargs="+", metavar="PATH", help="SugarCrepe data: <category>.json files or folders")
    sugar.add_argument("--lm-corpus", help="caption JSONL or COCO captions JSON for the bigram-LM text baseline")
    sugar.add_argument("--fallback", default="global", choices=("global", "wrong"),
                       help="SA-CLIP rows without triplet or boxes: score by the global halves, or count as wrong")
    held_out = p.add_argument_group("shards (held-out shard set)")
    held_out.add_argument("--shards", help="shard set (directory with sizes.json, pattern or URL)")
    held_out.add_argument("--features", help="its feature shards (sapretrain cache-features): the vision tower is not run")
    held_out.add_argument("--batch-pairs", type=int, default=64, help="pairs per forward pass")
    held_out.add_argument("--max-batches", type=int, help="evaluate only the first N batches")
    held_out.add_argument("--image-size", type=int, help="decode images at this size first (as data.image_size)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        models = run.parse_model_args(args.checkpoint)
        progress = not args.no_progress
        if args.task == "spatial":
            report = run.run_spatial(models, args.output, scenes=args.scenes, k=args.k, baseline=args.baseline,
                                     candidate=args.candidate, margin=args.margin,
                                     detector_weights=args.detector_weights, workers=args.workers,
                                     device=args.device, progress=progress)
        elif args.task == "vsr":
            _require(args, "vsr", "images")
            report = run.run_vsr(models, args.output, args.vsr, args.images, instances=args.instances,
                                 detector_weights=args.detector_weights, rule=args.rule, dev_file=args.dev,
                                 device=args.device, progress=progress)
        elif args.task == "sugarcrepe":
            _require(args, "sugarcrepe", "images")
            report = run.run_sugarcrepe(models, args.output, args.sugarcrepe, args.images, instances=args.instances,
                                        detector_weights=args.detector_weights, lm_corpus=args.lm_corpus,
                                        fallback=args.fallback, device=args.device, progress=progress)
        elif args.task == "shards":
            _require(args, "shards")
            report = run.run_shards(models, args.output, args.shards, features=args.features,
                                    batch_pairs=args.batch_pairs, max_batches=args.max_batches,
                                    image_size=args.image_size, device=args.device, progress=progress)
        else:
            _require(args, "metadata", "frames")
            report = run.run_dota(models, args.output, args.metadata, args.frames, detector_weights=args.detector_weights,
                                  annotations_root=args.annotations, descriptions=args.descriptions,
                                  frame_stride=args.frame_stride, max_clips=args.max_clips,
                                  bootstrap=args.bootstrap, seed=args.seed, device=args.device, progress=progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    print((Path(args.output) / "results.md").read_text(encoding="utf-8"))
    print(f"results: {Path(args.output) / 'results.json'} ({report['seconds']} s)")
    verdict = report.get("verdict")
    return 1 if verdict is not None and not verdict["pass"] else 0


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise ValueError(f"--task {args.task} needs {' and '.join(missing)}")


if __name__ == "__main__":
    raise SystemExit(main())
