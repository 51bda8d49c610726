#!/usr/bin/env python
"""The training loader's throughput against bare webdataset iteration over the same shards.

    python bench/loader.py [--shards DIR] [--max-shards 4] [--workers 2] [--batch-pairs 32] [--repeats 2]
    python bench/loader.py --epochs 4 [--step-ms 20] [...]     # epoch restarts: persistent workers or not

Bare: ``wds.WebDataset(urls).decode("pil")`` batched with the same ``collate_records`` and the same
preprocess (the model's val transform: squash resize to 224, normalise), in a DataLoader with
the same number of workers; no shuffling, no checks, no quotas. Ours: ``build_loader`` for one
epoch of one rank (planning, side-car validation, shuffle buffer, quota, counters). Both read the
same shards in the same run (alternating, best of ``--repeats``), since these machines are noisy.
Two numbers per side: records per wall second, and records per CPU second of the main process and
its DataLoader workers together (what the work costs, unaffected by other jobs sharing the
cores). Target: ours >= 0.9x bare. Shards: ``data/shards/demo`` when present (``make demo`` builds it),
else synthetic scenes written to a temporary directory; the first ``--max-shards`` of them (keep it
a multiple of the workers: bare webdataset splits whole shards between workers, so an uneven split
would slow the bare side down, not ours).

``--epochs N``: instead, the epoch restart. Our loader iterates N epochs the way the trainer does
(one ``for batch in loader`` per epoch, ``--step-ms`` of simulated training step per batch), with
``data.persistent_workers`` true and false (alternating, best of ``--repeats``): the wait for each
epoch's first batch (false: new worker processes and cold pipelines every epoch; true: batches
the workers prefetched across the boundary) and the wall time per epoch. Time it on an idle machine.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

import open_clip  # noqa: E402
import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from sapretrain.data.loader import LoaderConfig, build_loader  # noqa: E402
from sapretrain.data.batch import collate_records  # noqa: E402

DEMO_SHARDS = PROJECT_ROOT / "data" / "shards" / "demo"


def val_transform(size: int):
    """What ``build_preprocess`` gives a CLIP model of input ``size`` (squash, OpenAI mean/std)."""
    cfg = open_clip.transform.PreprocessCfg(size=size, resize_mode="squash")
    return open_clip.transform.image_transform_v2(cfg, is_train=False)


def synthetic_shards(root: Path, scenes: int) -> Path:
    from sapretrain.scenes.synthetic import write_synthetic
    from sapretrain.shards.writer import ShardConfig, make_shards

    manifest = write_synthetic(root / "scenes", "train", scenes, workers=os.cpu_count() or 1, progress=False)
    out = root / "shards"
    make_shards(str(manifest), str(out), ShardConfig(shard_size=max(1, scenes // 2 // 4)), workers=os.cpu_count() or 1,
                progress=False)
    return out


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(count_records) -> tuple[float, float]:
    """(records per wall second, records per CPU second) of one full pass."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    records = count_records()
    return records / (time.perf_counter() - wall), records / (cpu_seconds() - cpu)


def run_bare(urls: list[str], preprocess, pairs: int, workers: int) -> tuple[float, float]:
    collate = functools.partial(collate_records, preprocess=preprocess)
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker, empty_check=False)
        .decode("pil")
        .batched(pairs, collation_fn=collate, partial=False)
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return timed(lambda: sum(batch["text"].shape[0] // 2 for batch in loader))


def run_ours(urls: list[str], preprocess, pairs: int, workers: int) -> tuple[float, float]:
    # One epoch, its workers joined at its end (their CPU time is counted only then), as the bare
    # side's; persistent workers would read on into the next epoch (--epochs measures those).
    cfg = LoaderConfig(shards=",".join(urls), batch_pairs=pairs, workers=workers, persistent_workers=False)
    loader = build_loader(cfg, preprocess, 0, 1)
    return timed(lambda: sum(batch["text"].shape[0] // 2 for batch in loader))


def run_epochs(urls: list[str], preprocess, pairs: int, workers: int, epochs: int, persistent: bool,
               step_seconds: float) -> list[tuple[float, float]]:
    """(seconds to the epoch's first batch, epoch wall seconds) for each of ``epochs`` epochs."""
    cfg = LoaderConfig(shards=",".join(urls), batch_pairs=pairs, workers=workers, persistent_workers=persistent)
    loader = build_loader(cfg, preprocess, 0, 1)
    out = []
    for _ in range(epochs):
        start, first = time.perf_counter(), None
        for _batch in loader:
            if first is None:
                first = time.perf_counter() - start
            time.sleep(step_seconds)  # the training step, during which the workers read ahead
        out.append((first, time.perf_counter() - start))
    loader.close()
    return out


def epoch_restarts(args, urls: list[str], preprocess) -> None:
    runs: dict[bool, list[list[tuple[float, float]]]] = {True: [], False: []}
    for i in range(args.repeats):
        for persistent in (True, False) if i % 2 == 0 else (False, True):
            runs[persistent].append(run_epochs(urls, preprocess, args.batch_pairs, args.workers, args.epochs,
                                               persistent, args.step_ms / 1000))
    print(f"{'persistent_workers':>18} {'1st batch, epoch 0':>19} {'1st batch, later':>17} {'epoch, later':>13}"
          f"   (seconds, best of {args.repeats}; later: mean over epochs "
          f"{'1..' + str(args.epochs - 1) if args.epochs > 1 else '0, the only one'})")
    for persistent, repeats in runs.items():
        later = [r[1:] or r for r in repeats]  # one epoch only: that one
        print(f"{str(persistent).lower():>18} {min(r[0][0] for r in repeats):19.3f} "
              f"{min(sum(e[0] for e in r) / len(r) for r in later):17.3f} "
              f"{min(sum(e[1] for e in r) / len(r) for r in later):13.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="shard directory with sizes.json (default: data/shards/demo or synthetic)")
    parser.add_argument("--scenes", type=int, default=1600, help="synthetic scenes when no shards are given/found")
    parser.add_argument("--max-shards", type=int, default=4, help="use the first N shards (0: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-pairs", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="model input size of the preprocess")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=0,
                        help="measure the epoch restart over this many epochs instead (persistent workers or not)")
    parser.add_argument("--step-ms", type=float, default=20.0, help="--epochs: simulated training step per batch")
    args = parser.parse_args()

    tmp = None
    shards = args.shards
    if shards is None and (DEMO_SHARDS / "sizes.json").exists():
        shards = str(DEMO_SHARDS)
    if shards is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
        shards = str(synthetic_shards(tmp, args.scenes))
    try:
        sizes = json.loads(Path(shards, "sizes.json").read_text())
        names = sorted(sizes)[: args.max_shards or None]
        urls = [str(Path(shards, name)) for name in names]
        preprocess = val_transform(args.image_size)
        print(f"{shards}: {len(urls)} shards, {sum(sizes[n] for n in names)} records (6 JPEGs each), preprocess "
              f"{args.image_size}px, {args.workers} workers, {args.batch_pairs} pairs per batch, cores {os.cpu_count()}")
        if args.epochs:
            epoch_restarts(args, urls, preprocess)
            return
        bare, ours = [], []
        for i in range(args.repeats):
            # Alternate which side goes first, so warm caches and clock changes favour neither.
            if i % 2 == 0:
                bare.append(run_bare(urls, preprocess, args.batch_pairs, args.workers))
                ours.append(run_ours(urls, preprocess, args.batch_pairs, args.workers))
            else:
                ours.append(run_ours(urls, preprocess, args.batch_pairs, args.workers))
                bare.append(run_bare(urls, preprocess, args.batch_pairs, args.workers))
            print(f"  run {i + 1}: bare {bare[-1][0]:6.1f} records/s {bare[-1][1]:6.1f} per CPU-s | "
                  f"ours {ours[-1][0]:6.1f} records/s {ours[-1][1]:6.1f} per CPU-s")
        print(f"{'':>16} {'records/s':>10} {'per CPU-s':>10}   (best of {args.repeats})")
        for name, runs in (("bare webdataset", bare), ("sapretrain", ours)):
            print(f"{name:>16} {max(r[0] for r in runs):10.1f} {max(r[1] for r in runs):10.1f}")
        wall = max(r[0] for r in ours) / max(r[0] for r in bare)
        cpu = max(r[1] for r in ours) / max(r[1] for r in bare)
        print(f"{'ratio':>16} {wall:10.2f} {cpu:10.2f}   (target >= 0.90; per CPU-s is the one to trust on a busy machine)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
