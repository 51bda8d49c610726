#!/usr/bin/env python
"""make_shards throughput against a bare decode/resize/encode loop over the same images.

    python bench/shards.py [--copies 16] [--repeats 2]

The bare loop is the floor of the work: for each sample, read the file, decode it with PIL, resize
it to the stored size, cut the two square ROI crops and resize them, encode the three JPEGs; no
tokenizing, no tar, no manifest. make_shards does all of that plus everything else, on the same
samples (the 23 real COCO fixture photos, repeated as distinct files, paired mutually so each
sample is processed exactly once in both). Target: make_shards >= 0.8x the bare loop, with 1 and
2 workers. Both are measured in the same run, since these machines are noisy; the best of
``--repeats`` runs is reported for each.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]

from sapretrain.shards.writer import ShardConfig, make_shards  # noqa: E402

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "coco"


def build_manifest(root: Path, copies: int) -> tuple[Path, list[dict]]:
    """``copies`` x the fixture photos as distinct files, partner = same photo in the twin copy."""
    base = [json.loads(line) for line in (FIXTURES / "manifest.jsonl").read_text().splitlines() if line]
    (root / "images").mkdir(parents=True)
    samples = []
    for k in range(copies):
        for s in base:
            src = FIXTURES / s["image"]
            dst = root / "images" / f"{k}_{src.name}"
            os.symlink(src, dst)
            samples.append({**s, "id": f"{s['id']}-c{k}", "image": f"images/{dst.name}", "positive": f"{s['id']}-c{k ^ 1}"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return manifest, samples


def bare_one(args) -> int:
    """Decode, resize, crop, encode one sample the plain way (full decode, no draft)."""
    path, boxes, image_size, roi_size, quality = args
    image = Image.open(path).convert("RGB")
    w, h = image.size
    short = min(w, h)
    outs = [image.resize((round(w * image_size / short), round(h * image_size / short)), Image.BICUBIC)]
    for x0, y0, x1, y1 in boxes:
        side = round(max(x1 - x0, y1 - y0) * 1.1)
        left, top = round((x0 + x1) / 2 - side / 2), round((y0 + y1) / 2 - side / 2)
        outs.append(image.crop((left, top, left + side, top + side)).resize((roi_size, roi_size), Image.BICUBIC))
    total = 0
    for out in outs:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=quality)
        total += buf.tell()
    return total


def run_bare(root: Path, samples: list[dict], cfg: ShardConfig, workers: int) -> float:
    tasks = [
        (str(root / s["image"]), (s["boxes"]["subj"], s["boxes"]["obj"]), cfg.image_size, cfg.roi_size, cfg.jpeg_quality)
        for s in samples
    ]
    start = time.perf_counter()
    if workers == 1:
        for t in tasks:
            bare_one(t)
    else:
        with mp.get_context("fork").Pool(workers) as pool:  # as make_shards: no re-import
            pool.map(bare_one, tasks, chunksize=8)
    return len(tasks) / (time.perf_counter() - start)


def run_make_shards(root: Path, manifest: Path, cfg: ShardConfig, workers: int, tag: str) -> float:
    out = root / f"out-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = make_shards(str(manifest), str(out), cfg, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    samples = 2 * report.summary["records"]  # mutual pairs: every sample exactly once
    return samples / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=16, help="copies of the 23 fixture photos (even)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        manifest, samples = build_manifest(root, args.copies)
        # 8 shards or more, so 2 workers have work to share.
        cfg = ShardConfig(shard_size=max(1, len(samples) // 2 // 8))
        print(f"{len(samples)} samples ({args.copies} x 23 COCO photos, ~640x480), {len(samples) // 2} records,"
              f" image {cfg.image_size}, ROI {cfg.roi_size}, JPEG q{cfg.jpeg_quality}, cores {os.cpu_count()}")
        print(f"{'workers':>7} {'bare loop':>12} {'make_shards':>12} {'ratio':>6} {'no draft':>12} {'ratio':>6}")
        for workers in (1, 2):
            bare = max(run_bare(root, samples, cfg, workers) for _ in range(args.repeats))
            ours = max(run_make_shards(root, manifest, cfg, workers, f"d{workers}") for _ in range(args.repeats))
            nodraft_cfg = ShardConfig(**{**cfg.__dict__, "draft": False})
            nodraft = max(run_make_shards(root, manifest, nodraft_cfg, workers, f"n{workers}") for _ in range(args.repeats))
            print(f"{workers:>7} {bare:>9.1f}/s {ours:>9.1f}/s {ours / bare:>6.2f} {nodraft:>9.1f}/s {nodraft / bare:>6.2f}")
        print("samples/s; make_shards includes manifest reading, tokenizing, tar writing and process start-up")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
