"""Run a frozen vision tower once over a shard set and write feature shards (docs/features.md).

    sapretrain cache-features --shards data/shards/demo --output data/features/demo \
        --config configs/NAME.yaml [key=value ...]   # model.*, data.image_size, run.seed from a training config
    sapretrain cache-features --shards s3://bucket/shards --output s3://bucket/features \
        --model ViT-B-32 --pretrained openai [--batch-size 512] [--part 0 --num-parts 8]

then train with ``data.features=<output>``. Re-running resumes: committed shards are kept, the
rest are written. Parts can run on different machines; the part that completes the set writes
sizes.json and summary.json. GPU when available (``--device`` to choose).
"""
from __future__ import annotations

import argparse

from sapretrain.config import ConfigError, load_config
from sapretrain.jobs import add_part_arguments, parts_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True,
                        help="source shard directory (with sizes.json), brace pattern or comma list")
    parser.add_argument("--output", required=True, help="feature shard directory or fsspec URL")
    parser.add_argument("--config", help="training config: its model.*, data.image_size and run.seed are used")
    parser.add_argument("--model", help="open_clip model name, sa-tiny, or a model JSON path (without --config)")
    parser.add_argument("--pretrained", help="open_clip tag or weights path; 'none' for random init (seeded by --seed)")
    parser.add_argument("--image-size", type=int, help="pre-resize as the loader's data.image_size (default: none)")
    parser.add_argument("--seed", type=int, help="torch seed before building the model (default: run.seed, or 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (6 per record)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    add_part_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides (with --config)")
    args = parser.parse_args(argv)
    try:
        parts_from_args(args)  # a wrong --part fails before any work
    except ValueError as e:
        parser.error(str(e))

    from sapretrain.features import build_frozen_model, cache_features
    from sapretrain.model.saclip import SAClipConfig
    from sapretrain.train.config import TrainConfig

    if args.config:
        try:
            cfg = load_config(TrainConfig, args.config, args.overrides)
        except ConfigError as e:
            parser.error(str(e))
        model_cfg, image_size, seed = cfg.model, cfg.data.image_size, cfg.run.seed
        if args.model:
            model_cfg.name = args.model
        if args.pretrained:
            model_cfg.pretrained = None if args.pretrained.lower() in ("none", "null") else args.pretrained
    elif args.model:
        if args.overrides:
            parser.error("key=value overrides need --config")
        pretrained = None if (args.pretrained or "none").lower() in ("none", "null") else args.pretrained
        model_cfg, image_size, seed = SAClipConfig(name=args.model, pretrained=pretrained), None, 0
    else:
        parser.error("give --config or --model")
    image_size = args.image_size if args.image_size is not None else image_size
    seed = args.seed if args.seed is not None else seed

    model = build_frozen_model(model_cfg, seed)
    report = cache_features(args.shards, args.output, model, image_size, args.batch_size, args.device,
                            args.part, args.num_parts, progress=not args.no_progress)
    print(f"output: {report.output}")
    print(f"shards: {report.shards_written} written now, {report.shards_skipped} already done, "
          f"{report.shards_total} in the whole set")
    rate = f" ({report.records_written / report.seconds:.1f} records/s)" if report.seconds > 0 else ""
    print(f"records written now: {report.records_written} in {report.seconds:.1f} s{rate}; "
          f"skipped: {report.records_skipped}")
    if not report.finalized:
        print("other parts are still missing: sizes.json and summary.json come with the last part")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
