#!/usr/bin/env python
"""Positive-partner retrieval at scale: the tool's one-per-run index (faiss, or the torch IVF)
against exact search: build, recall tuning, all-N search, recall@1, time and peak memory, CPU.

    python bench/positives.py [--n 1000000] [--d 384] [--queries 10000] [--data clustered|random]
                              [--backend faiss|torch] [--kind auto|flat|pq|hnsw] [--nprobe 0] [--threads 2]

Target (issue 15): 1M x 384-d clustered vectors, recall@1 >= 0.95 vs exact, index build + tuning
+ all 1M queries under 10 minutes on 2 cores (`python bench/positives.py --n 1000000`).

N L2-normalised vectors (fp16, as the tool keeps them), each its own image. "clustered": N/20
random centres + noise of norm 0.5, closer to triplet embeddings (many near-paraphrases);
"random": uniform on the sphere, every ANN index's worst case (neighbours barely nearer than
strangers). The index is made exactly as ``make_positives`` makes it (``open_index``: kind and
nlist from N, nprobe tuned on the tool's own 1000-query sample to ``recall_target``, saved to a
temporary work folder), then every key is searched as a query in 50,000-query chunks as the
tool does. Recall@1 is measured on an independent sample of --queries queries searched exactly
(blocked, the tool's defaults; that time is extrapolated to all N). Memory: ru_maxrss growth of
each phase (each delta is that phase's new peak).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

import torch

from sapretrain.config import load_config
from sapretrain.curation.positives import PositivesConfig, Work, open_index, recall_at_1, search_exact


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
    """Wall time and ru_maxrss growth of a block of code."""

    def __init__(self, name: str, rows: list):
        self.name, self.rows = name, rows

    def __enter__(self):
        self.rss, self.t0 = maxrss_mb(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.rows.append((self.name, self.seconds, maxrss_mb() - self.rss))
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--queries", type=int, default=10_000, help="exact-search query sample (recall reference)")
    parser.add_argument("--data", choices=("random", "clustered"), default="clustered")
    parser.add_argument("--backend", choices=("faiss", "torch"), default="faiss")
    parser.add_argument("--kind", choices=("auto", "flat", "pq", "hnsw"), default="auto")
    parser.add_argument("--nprobe", type=int, default=0, help="0: tuned to search.ivf.recall_target")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.backend == "faiss":
        import faiss

        faiss.omp_set_num_threads(args.threads)
    cfg = load_config(PositivesConfig, None, [f"search.ivf.backend={args.backend}", f"search.ivf.kind={args.kind}",
                                              f"search.ivf.nprobe={args.nprobe}", "search.exact_max=1",
                                              "search.device=cpu"])
    s = cfg.search
    rows: list = []

    with Phase("make vectors", rows):
        keys = make_vectors(args.n, args.d, args.data)
        images = torch.arange(args.n)
    q_rows = torch.randperm(args.n, generator=torch.Generator().manual_seed(12345))[:args.queries]
    queries, q_images = keys[q_rows], images[q_rows]
    with Phase(f"exact, {len(queries)} queries (reference)", rows) as exact:
        ref_s, ref_i = search_exact(queries, q_images, keys, images, 1, s.query_block, s.key_block, "cpu")
    with tempfile.TemporaryDirectory() as tmp, Phase("index: build + tune + save (open_index)", rows) as build:
        searcher, meta = open_index(Work(f"{tmp}/out.jsonl", cfg), keys, images, cfg)
    with Phase(f"search all {args.n} queries, top-{s.top_k}", rows) as search_all:
        for q0 in range(0, args.n, 50_000):  # the tool's chunks
            searcher.search(keys[q0:q0 + 50_000], images[q0:q0 + 50_000], s.top_k)
    sc, idx = searcher.search(queries, q_images, 1)
    recall = recall_at_1(sc, idx, ref_s, ref_i)

    print(f"N {args.n}  d {args.d}  data {args.data}  threads {torch.get_num_threads()}  "
          f"keys {keys.numel() * 2 / 2**20:.0f} MiB fp16")
    print(f"{'phase':58s} {'seconds':>9s} {'maxrss +MiB':>12s}")
    for name, sec, rss in rows:
        print(f"{name:58s} {sec:9.1f} {rss:12.0f}")
    print("index:", json.dumps({k: v for k, v in meta.items() if k != "recall_tried"}))
    print("tuning (nprobe: recall@1 on the tool's sample):", meta.get("recall_tried"))
    print(f"exact, all {args.n} queries (extrapolated)                {exact.seconds * args.n / len(queries):9.0f} s")
    total = build.seconds + search_all.seconds
    print(f"recall@1 vs exact on {len(queries)} independent queries: {recall:.4f}  (target >= 0.95)")
    print(f"index + all-N search: {total:.0f} s ({total / 60:.1f} min; target < 10 min at 1M on 2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
