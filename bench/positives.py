#!/usr/bin/env python
"""Positive-partner retrieval: exact blocked search vs the IVF index, time and peak memory, CPU.

    python bench/positives.py [--n 1000000] [--d 384] [--queries 10000] [--data random|clustered]
                              [--nlist 0] [--nprobe 16] [--threads 2]

N L2-normalised vectors (fp16 stored, fp32 compute, as the tool keeps them), each its own image.
"random": uniform on the sphere, the worst case for IVF (no cluster structure; neighbours barely
nearer than strangers); "clustered": N/20 random centres + noise, closer to triplet embeddings,
where many texts are near-paraphrases. Exact: a sample of --queries queries against all N keys
(blocked, the tool's defaults), extrapolated to all N queries. IVF: train + assign all keys, then
all N queries; recall@1 = same top-1 as exact on the query sample. Memory: ru_maxrss growth of each
phase (run in increasing order of need, so each delta is that phase's new peak) and tracemalloc's
peak for numpy/Python allocations (torch's CPU allocator is invisible to tracemalloc).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc

import numpy as np
import torch

from sapretrain.curation.positives import IVFIndex, SearchConfig, default_nlist, search_exact  # noqa: E402


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_vectors(n: int, d: int, data: str, seed: int = 0, block: int = 100_000) -> torch.Tensor:
    """(n, d) fp16 unit vectors, made in blocks so fp32 never holds all of them."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, d, dtype=torch.float16)
    centres = torch.nn.functional.normalize(torch.randn(max(1, n // 20), d, generator=g), dim=1)
    for i in range(0, n, block):
        m = min(block, n - i)
        x = torch.randn(m, d, generator=g)
        if data == "clustered":
            x = centres[torch.randint(len(centres), (m,), generator=g)] + 0.5 * x / d ** 0.5
        out[i:i + m] = torch.nn.functional.normalize(x, dim=1).half()
    return out


class Phase:
    """Wall time, ru_maxrss growth and tracemalloc peak of a block of code."""

    def __init__(self, name: str, rows: list):
        self.name, self.rows = name, rows

    def __enter__(self):
        tracemalloc.reset_peak()
        self.rss, self.t0 = maxrss_mb(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.rows.append((self.name, self.seconds, maxrss_mb() - self.rss, tracemalloc.get_traced_memory()[1] / 2**20))
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--queries", type=int, default=10_000, help="exact-search query sample (recall reference)")
    parser.add_argument("--data", choices=("random", "clustered"), default="random")
    parser.add_argument("--nlist", type=int, default=0, help="0: 4*sqrt(N)")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = SearchConfig()
    tracemalloc.start()
    rows: list = []

    with Phase("make vectors", rows):
        keys = make_vectors(args.n, args.d, args.data)
        images = torch.arange(args.n)
    q_rows = torch.randperm(args.n, generator=torch.Generator().manual_seed(1))[:args.queries]
    queries, q_images = keys[q_rows], images[q_rows]

    with Phase(f"exact, {len(queries)} queries", rows) as exact:
        _, ref = search_exact(queries, q_images, keys, images, cfg.top_k, cfg.query_block, cfg.key_block, "cpu")
    nlist = args.nlist or default_nlist(args.n)
    with Phase(f"IVF build (nlist {nlist}, train {min(args.n, 32 * nlist)}, {cfg.ivf.iters} iters)", rows):
        index = IVFIndex.build(keys, images, nlist, cfg.ivf.train_size, cfg.ivf.iters, cfg.ivf.seed, cfg.key_block)
    with Phase(f"IVF search, {len(queries)} queries", rows):
        _, approx = index.search(queries, q_images, cfg.top_k, args.nprobe, cfg.ivf.query_block)
    with Phase(f"IVF search, all {args.n} queries", rows) as ivf_all:
        index.search(keys, images, cfg.top_k, args.nprobe, cfg.ivf.query_block)
    recall = float((approx[:, 0] == ref[:, 0]).mean())
    recall_k = float(np.mean([ref[i, 0] in approx[i] for i in range(len(ref))]))

    print(f"N {args.n}  d {args.d}  data {args.data}  threads {torch.get_num_threads()}  "
          f"keys {keys.numel() * 2 / 2**20:.0f} MiB fp16")
    print(f"{'phase':58s} {'seconds':>9s} {'maxrss +MiB':>12s} {'tracemalloc MiB':>16s}")
    for name, sec, rss, traced in rows:
        print(f"{name:58s} {sec:9.1f} {rss:12.0f} {traced:16.0f}")
    print(f"exact, all {args.n} queries (extrapolated)                {exact.seconds * args.n / len(queries):9.0f} s")
    print(f"IVF recall@1 vs exact (nprobe {args.nprobe}/{nlist})           {recall:.3f}  "
          f"(exact top-1 within IVF top-{cfg.top_k}: {recall_k:.3f})")
    speedup = exact.seconds * args.n / len(queries) / ivf_all.seconds
    print(f"IVF all-queries speed-up over exact (search only)    {speedup:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
