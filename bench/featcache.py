#!/usr/bin/env python
"""Feature-cached training (data.features, docs/features.md) against the live frozen tower:
training pairs/s of the same model on the same records, in the same run.

    python bench/featcache.py                          # ViT-B-32, random init, locked tower, CPU, 16 pairs
    python bench/featcache.py --pairs 4 --records 16 --steps 6 --threads 2
    python bench/featcache.py --device cuda --pairs 256 --records 2048

Set-up: synthetic scenes written as 224 px shards (``make_shards``), their features cached with
``sapretrain.features.cache_features`` (the logic of tools/cache_features.py) from the same
random-init ViT-B-32 tower (LiT, as the paper), then two streaming loaders over the same records:
pixels (``data.shards``) and features (``data.features``). A timed step is the trainer's own
work: fetching the next batch from its loader (JPEG decode + preprocessing, or reading the
float16 arrays), ``train_step`` (forward, losses, backward), the optimizer step. Steps of the
two modes alternate (live, cached, live, ...) so that noise on a shared machine hits both alike;
the first ``--warmup`` of each are left out, the median of the rest is reported. One torch
thread by default (as bench/model.py: repeatable ratios on a shared machine).

Besides the measured ratio, the FLOPs of one step of each mode are counted
(``torch.utils.flop_counter``). A GPU step is compute-bound (the loader keeps up with enough
workers), so the projected GPU ratio is the FLOP ratio: the vision forward that feature mode
removes against the text tower's forward and backward that both modes keep.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def prepare(work: Path, records: int, size: int) -> Path:
    from sapretrain.scenes.synthetic import write_synthetic
    from sapretrain.shards.writer import ShardConfig, make_shards

    manifest = write_synthetic(work / "synthetic", "train", 2 * records, workers=1, progress=False)
    shards = work / "shards"
    make_shards(str(manifest), str(shards), ShardConfig(image_size=size, roi_size=size, shard_size=max(1, records // 4)),
                progress=False)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pairs", type=int, default=16, help="pairs per step (the optimizer step, the same in both modes, weighs more at small batches)")
    parser.add_argument("--records", type=int, default=32, help="records (pairs) in the shard set")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; one gives "
                        "repeatable ratios on a shared machine, see bench/model.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", help="keep data here (default: a temporary directory)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("root").setLevel(logging.ERROR)
    import torch
    from accelerate import Accelerator
    from torch.utils.flop_counter import FlopCounterMode

    from sapretrain.config import load_config
    from sapretrain.data.loader import build_loader
    from sapretrain.features import cache_features
    from sapretrain.losses import SAClipLoss
    from sapretrain.data.batch import batch_to, build_preprocess
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import build_model, build_optimizer, split_microbatches, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="featcache-"))
    started = time.perf_counter()
    cfg = load_config(TrainConfig, None, [
        f"model.name={args.model}", "model.pretrained=null", "model.lock_image=true",
        f"data.batch_pairs={args.pairs}", "data.workers=0", "data.shuffle_buffer=0", "data.resampled=true",
        "run.precision=no", "optim.warmup_steps=0",
    ])
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    size = model.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size

    t0 = time.perf_counter()
    shards = prepare(work, args.records, size)
    t1 = time.perf_counter()
    features = work / "features"
    cache_features(str(shards), str(features), model, batch_size=48, device=args.device, progress=False)
    t2 = time.perf_counter()
    print(f"{args.model} (random init, locked tower), {args.pairs} pairs/step, {torch.get_num_threads()} threads, "
          f"{args.device}; data: {args.records} records at {size} px written in {t1 - t0:.1f} s, "
          f"features cached in {t2 - t1:.1f} s ({args.records / (t2 - t1):.1f} records/s)")

    accelerator = Accelerator(cpu=args.device == "cpu")
    model = model.to(accelerator.device).train()
    loss_fn = SAClipLoss(cfg.loss).to(accelerator.device)
    optimizer = build_optimizer(cfg, model, loss_fn)
    live_cfg = dataclasses.replace(cfg.data, shards=str(shards))
    feat_cfg = dataclasses.replace(cfg.data, shards=str(shards), features=str(features))
    streams = {"live": iter(build_loader(live_cfg, build_preprocess(model), 0, 1)),
               "cached": iter(build_loader(feat_cfg, None, 0, 1))}

    def step(mode: str) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = batch_to(next(streams[mode]), accelerator.device)
        train_step(accelerator, model, loss_fn, split_microbatches(batch, 1))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {"live": [], "cached": []}
    for i in range(args.warmup + args.steps):
        for mode in times:
            t = step(mode)
            if i >= args.warmup:
                times[mode].append(t)

    # FLOPs of one step of each mode, and of the vision forward alone. The frozen tower runs in
    # train mode here (same math: no dropout in open_clip's ViT) because the flop counter does not
    # see nn.MultiheadAttention's eval-mode fast path (it would miss a third of the tower).
    flops = {}
    model.clip.visual.train()
    for mode in times:
        batch = batch_to(next(streams[mode]), accelerator.device)
        with FlopCounterMode(display=False) as counter:
            train_step(accelerator, model, loss_fn, [batch])
        optimizer.zero_grad(set_to_none=True)
        flops[mode] = counter.get_total_flops()
        if mode == "live":
            with FlopCounterMode(display=False) as counter:
                model.vision_features(batch["image"], batch["rois"])
            flops["vision"] = counter.get_total_flops()
    model.train()  # the locked tower back to eval

    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    rate = {mode: args.pairs / t for mode, t in med.items()}
    ratio = rate["cached"] / rate["live"]
    flop_ratio = flops["live"] / flops["cached"]
    print(f"\n{'mode':<8} {'step s (median)':>16} {'pairs/s':>9} {'samples/s':>10} {'GFLOP/pair':>11}   steps (s)")
    for mode in times:
        print(f"{mode:<8} {med[mode]:>16.3f} {rate[mode]:>9.2f} {2 * rate[mode]:>10.2f} "
              f"{flops[mode] / args.pairs / 1e9:>11.1f}   {' '.join(f'{t:.2f}' for t in times[mode])}")
    print(f"\nmeasured speed-up of feature mode on {args.device}: {ratio:.2f}x  (target >= 3x: "
          f"{'met' if ratio >= 3 else 'NOT met'})")
    share = flops["vision"] / flops["live"]
    print(f"vision forward share of a live step: {100 * share:.0f}% of its FLOPs "
          f"({flops['vision'] / args.pairs / 1e9:.1f} GFLOP/pair for 2 images + 4 ROI crops, forward only); "
          f"the rest is the text tower's forward + backward over caption and negative (4 per pair) "
          f"and the heads")
    print(f"projected GPU speed-up (compute-bound step, same efficiency in both modes = FLOP ratio): "
          f"{flop_ratio:.2f}x; the live mode also needs 6 JPEG decodes + resizes per pair on the CPU "
          f"(at 512 pairs/step that is 3,072 images per step), which feature mode removes")
    # What is left in a cached step: the text tower's forward + backward (run only up to the
    # batch's longest caption, SAClip._trimmed_length), the heads, and the optimizer step, whose
    # cost per step does not shrink with the batch: small --pairs understate the speed-up.
    longest = int(torch.cat([batch["text"], batch["neg_text"]]).argmax(-1).max()) + 1
    print(f"what is left in a cached step: the text tower over the first {longest} of {batch['text'].shape[1]} "
          f"positions (the batch's longest caption), the heads and the optimizer step (the same in both modes)")
    print(f"total {time.perf_counter() - started:.0f} s; data in {work}")


if __name__ == "__main__":
    main()
