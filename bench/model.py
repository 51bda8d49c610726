#!/usr/bin/env python
"""What SA-CLIP's extra work costs: forward+backward time and peak memory per pair, against
open_clip's plain CLIP forward+backward (CLIP loss) on the same model and batch, in the same run.

    python bench/model.py                                  # sa-tiny (16 pairs) and ViT-B-32 (4 pairs), CPU
    python bench/model.py --models sa-tiny --pairs 64 --iters 5
    python bench/model.py --device cuda --models ViT-B-32 --pairs 128

Both models are random init with the vision tower locked (LiT, as in the paper). A step is: the
model on one batch of N pairs (2N samples), the loss, backward; no optimizer step. SA-CLIP's step
is ``SAClip`` + ``SAClipLoss`` (contrastive on u and v, triplet): the tower encodes 2N images and
4N ROI crops (under no_grad), the text tower 2N captions and 2N negatives. Plain CLIP's step is
``open_clip`` CLIP + ``open_clip.ClipLoss`` on the 2N image-caption pairs. ``cached`` is SA-CLIP's
step in feature-cached mode (DESIGN.md §6): f_v of images and crops precomputed, the tower skipped.

Method. Each (model, method) runs in its own subprocess, so each memory peak is clean. Time is
the best of ``--iters`` timed steps after one warm-up step (shared CPUs are noisy; the best is the
least disturbed). Peak memory on CPU is the growth of the process's peak RSS (``ru_maxrss``) over
its RSS just before the first step, i.e. activations, gradients and temporaries of a step on top
of the resident model; on CUDA it is ``max_memory_allocated`` over the allocated memory before
the first step. Both are reported per pair (divided by N).

Threads: one by default. On a shared 2-core machine with anything else running, torch's default
(one OpenMP thread per core) stalls at every barrier whenever a thread is descheduled, and step
times swing 10x between runs (measured: SA-CLIP/CLIP ratios from 0.1 to 7 on the same code).
One thread gives repeatable ratios; ``--threads 0`` measures a dedicated machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAIRS = {"sa-tiny": 16, "ViT-B-32": 4}
METHODS = ("clip", "saclip", "cached")


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(args) -> dict:
    """One (model, method) measurement; runs in a fresh process."""
    import open_clip
    import torch

    from sapretrain.losses import SAClipLoss
    from sapretrain.model import build_saclip

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_saclip({"name": args.model, "pretrained": None, "lock_image": True}).to(device).train()
    size = model.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    n, ctx = args.pairs, model.clip.context_length
    b = 2 * n
    g = torch.Generator().manual_seed(0)

    def caption():
        text = torch.randint(1, 49000, (b, ctx), generator=g)
        text[:, 0], text[:, 20], text[:, 21:] = 49406, 49407, 0  # 20-token captions, like real ones
        spans = torch.zeros(b, 3, ctx, dtype=torch.bool)
        spans[:, 0, 1:4], spans[:, 1, 5:7], spans[:, 2, 8:11] = True, True, True
        return text.to(device), spans.to(device)

    text, spans = caption()
    neg_text, neg_spans = caption()
    batch = {
        "image": torch.randn(b, 3, size, size, generator=g).to(device),
        "rois": torch.randn(b, 2, 3, size, size, generator=g).to(device),
        "boxes": torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]]).expand(b, 2, 4).contiguous().to(device),
        "text": text, "spans": spans, "neg_text": neg_text, "neg_spans": neg_spans,
        "groups": torch.arange(b, device=device),  # every sample its own image
    }

    if args.method in ("saclip", "cached"):
        loss_fn = SAClipLoss()
        if args.method == "cached":  # frozen tower: f_v of images and crops precomputed once
            with torch.no_grad():
                image_features, roi_features = model.vision_features(batch.pop("image"), batch.pop("rois"))
            batch.update(image_features=image_features, roi_features=roi_features)

        def step():
            return sum(loss_fn(model(batch)).values())
    else:
        clip = model.clip  # the same open_clip model, tower locked the same way
        clip_loss = open_clip.ClipLoss()

        def step():
            image_features, text_features, scale = clip(batch["image"], batch["text"])
            return clip_loss(image_features, text_features, scale)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss()
    times = []
    for i in range(args.iters + 1):
        model.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        step().backward()
        sync()
        if i:  # the first step is warm-up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()
    return {"model": args.model, "method": args.method, "pairs": n, "step_s": min(times), "peak_bytes": peak - base,
            "threads": torch.get_num_threads()}


def run_one(args, model: str, method: str, pairs: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--models", model, "--method", method, "--pairs", str(pairs),
           "--iters", str(args.iters), "--device", args.device, "--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_PAIRS))
    parser.add_argument("--pairs", type=int, default=None, help="pairs per batch (default: 16 sa-tiny, 4 ViT-B-32)")
    parser.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, 0 for torch's default (all cores); see the module docstring")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.model = args.models[0]
        print(json.dumps(worker(args)))
        return

    print(f"forward+backward per step, locked vision tower, random init, device={args.device}, "
          f"best of {args.iters} after 1 warm-up, each in its own process")
    header = f"{'model':<10} {'pairs':>5} {'method':<8} {'step s':>8} {'ms/pair':>8} {'peak MiB':>9} {'MiB/pair':>9}"
    print(header)
    print("-" * len(header))
    for model in args.models:
        pairs = args.pairs or DEFAULT_PAIRS.get(model, 4)
        results = {m: run_one(args, model, m, pairs) for m in METHODS}
        for method, r in results.items():
            mib = r["peak_bytes"] / 2**20
            print(f"{model:<10} {pairs:>5} {method:<8} {r['step_s']:>8.3f} {1000 * r['step_s'] / pairs:>8.1f} "
                  f"{mib:>9.1f} {mib / pairs:>9.2f}")
        clip = results["clip"]
        for method in ("saclip", "cached"):
            r = results[method]
            print(f"{model:<10} {method} / clip: time x{r['step_s'] / clip['step_s']:.2f}, "
                  f"peak memory x{r['peak_bytes'] / max(clip['peak_bytes'], 1):.2f} (threads {r['threads']})")


if __name__ == "__main__":
    main()
