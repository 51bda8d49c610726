#!/usr/bin/env python
"""Peak memory of make_shards at 100K and 1M manifest lines: it must not grow with the manifest.

    python bench/shards_rss.py [--sizes 100000 1000000] [--modes plan make_shards] [--in-memory]

For each size a synthetic manifest is written (16 tiny JPEGs shared by reference, so image I/O
is not the cost; blocks of 10 lines: four mutual pairs, a missing partner, a one-way partner;
every 1000 lines a duplicate id and a line that is not JSON). Each measurement runs in a fresh
child process and reports its peak RSS (``resource.getrusage``), its RSS before the work (the
imports: the tokenizer pulls in open_clip and torch) and the growth between the two:

- ``plan``: ``plan_shards``: the streaming validation pass into the SQLite index, pairing and
  record numbering, then the first and last shard's records read back;
- ``make_shards``: the real entry point with ``--part 0`` of as many parts as shards, so it plans
  everything and writes shard 0 (1000 records);
- ``--in-memory``: what make_shards held before (``read_manifest`` plus the by-id maps of the
  old planner), for comparison.

Target (issue 15): make_shards' peak RSS at 1M lines <= 1.2x its RSS at 100K.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024  # ru_maxrss is in KiB on Linux


def write_images(root: Path) -> None:
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    for k in range(16):
        Image.new("RGB", (64, 48), (16 * k, 100, 200 - 8 * k)).save(root / "images" / f"{k}.jpg", quality=90)


def write_manifest(path: Path, lines: int) -> None:
    """``lines`` manifest lines, streamed to disk (the generator holds one line at a time)."""
    caption, negative = "a red box is left of a blue box", "a red box is right of a blue box"

    def triplet(text: str, rel: str) -> dict:
        r = text.index(rel)
        o = text.index("blue box")
        return {"subj": {"text": "red box", "start": 2, "end": 9}, "rel": {"text": rel, "start": r, "end": r + len(rel), "kind": "spatial"},
                "obj": {"text": "blue box", "start": o, "end": o + 8}}

    template = {"id": "", "image": "", "width": 64, "height": 48, "caption": caption, "triplet": triplet(caption, "left of"),
                "relation": "left", "boxes": {"subj": [2, 3, 30, 40], "obj": [33, 5, 62, 45]},
                "negative": {"caption": negative, "triplet": triplet(negative, "right of")}, "positive": "", "source": "bench"}
    with open(path, "w") as f:
        for n in range(lines):
            k = n % 10
            partner = n ^ 1 if k < 8 else (None if k == 8 else n - 9)
            template["id"], template["image"] = f"s{n:08d}", f"images/{n % 16}.jpg"
            template["positive"] = "gone" if partner is None else f"s{partner:08d}"
            f.write(json.dumps(template) + "\n")
            if n % 1000 == 999:  # a duplicate id and a broken line: 2 more lines every 1000
                f.write(json.dumps(template) + "\n{not json\n")


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(mode: str, manifest: str, work: str) -> dict:
    """One measurement in this (fresh) process."""
    from sapretrain.shards.manifest import SkipLog, read_manifest
    from sapretrain.shards.writer import ShardConfig, make_shards, plan_shards

    before = peak_kib()
    start = time.perf_counter()
    result: dict = {}
    if mode == "plan":
        plan = plan_shards(manifest, f"{work}/plan.sqlite", ShardConfig().shard_size, SkipLog())
        first, last = plan.shard_records(0), plan.shard_records(plan.shard_count - 1)
        assert first and last
        result = {"records": plan.records, "plan_mib": os.path.getsize(f"{work}/plan.sqlite") / 2**20}
    elif mode == "make_shards":
        cfg = ShardConfig(image_size=48, roi_size=32)
        report = make_shards(manifest, f"{work}/out", cfg, part=0, num_parts=10**9, progress=False, work_dir=work)
        assert report.records_written > 0
        result = {"records": report.records_written}
    elif mode == "in_memory":
        samples = read_manifest(manifest, SkipLog())
        by_id = {s["id"]: s for s in samples}
        order = {s["id"]: i for i, s in enumerate(samples)}
        assert len(by_id) == len(order) == len(samples)
        result = {"records": len(samples)}  # samples held, here
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return {**result, "peak_mib": peak_kib() / MIB, "before_mib": before / MIB, "seconds": time.perf_counter() - start}


def measure(mode: str, manifest: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([sys.executable, __file__, "--child", mode, str(manifest), str(work)],
                         capture_output=True, text=True)
    shutil.rmtree(work, ignore_errors=True)
    if run.returncode != 0:
        raise SystemExit(f"{mode} on {manifest} failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="manifest lines (about)")
    parser.add_argument("--modes", nargs="+", default=["plan", "make_shards"], choices=["plan", "make_shards"])
    parser.add_argument("--in-memory", action="store_true", help="also measure the old in-memory reading (slow at 1M)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MANIFEST", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    modes = args.modes + (["in_memory"] if args.in_memory else [])
    root = Path(tempfile.mkdtemp(prefix="bench-shards-rss-"))
    results: dict[tuple[str, int], dict] = {}
    try:
        write_images(root)
        print(f"{'lines':>9} {'mode':>11} {'peak RSS':>10} {'before':>10} {'growth':>9} {'seconds':>8} {'records':>8} {'plan file':>10}")
        for size in args.sizes:
            manifest = root / f"manifest-{size}.jsonl"
            write_manifest(manifest, size)
            for mode in modes:
                r = results[mode, size] = measure(mode, manifest, root / "work")
                plan_file = f"{r['plan_mib']:.0f} MiB" if "plan_mib" in r else ""
                print(f"{size:>9} {mode:>11} {r['peak_mib']:>6.0f} MiB {r['before_mib']:>6.0f} MiB"
                      f" {r['peak_mib'] - r['before_mib']:>5.0f} MiB {r['seconds']:>8.1f} {r['records']:>8} {plan_file:>10}")
            manifest.unlink()
        small, large = min(args.sizes), max(args.sizes)
        for mode in modes:
            a, b = results[mode, small], results[mode, large]
            growth_a, growth_b = a["peak_mib"] - a["before_mib"], b["peak_mib"] - b["before_mib"]
            verdict = "" if mode == "in_memory" else ("  target <= 1.2: " + ("met" if b["peak_mib"] <= 1.2 * a["peak_mib"] else "MISSED"))
            print(f"{mode}: peak RSS {large} / {small} lines = {b['peak_mib'] / a['peak_mib']:.2f}x"
                  f" (growth over the imports {growth_a:.0f} -> {growth_b:.0f} MiB){verdict}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
