"""Positive partners: exact blocked search vs brute force, IVF, faiss (one index per run), the
whole tool with MiniLM, resume, sentence-transformers pooling."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sapretrain.config import load_config
from sapretrain.curation import positives as P
from sapretrain.curation.positives import IVFIndex, PositivesConfig, choose_partners, make_positives, search_exact
from sapretrain.jobs import Parts

CONFIG = P.__file__.rsplit("/sapretrain/", 1)[0] + "/configs/curation/positives.yaml"


def unit(x):
    return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)


def brute(q, qi, k, ki, floor=-np.inf):
    """Best key of another image per query by a full matrix (the reference): (index, score)."""
    s = (q.float() @ k.float().T).numpy()
    s[qi.numpy()[:, None] == ki.numpy()[None, :]] = -np.inf
    best = s.argmax(1)
    score = s[np.arange(len(q)), best]
    return np.where(score >= floor, best, -1), score


def random_data(n=300, d=16, images=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = unit(torch.randn(n, d, generator=g))
    img = torch.randint(images, (n,), generator=g)
    return x, img


def test_exact_matches_brute_force_and_excludes_same_image():
    x, img = random_data()
    s, i = search_exact(x[:50], img[:50], x, img, k=4, query_block=16, key_block=64, device="cpu")
    ref, ref_s = brute(x[:50], img[:50], x, img)
    assert (i[:, 0] == ref).all()
    np.testing.assert_allclose(s[:, 0], ref_s, atol=1e-5)
    assert (img.numpy()[i] != img[:50].numpy()[:, None]).all()  # never the same image, so never itself
    assert (np.diff(s, axis=1) <= 0).all()  # top-k sorted


def test_floor_and_fewer_candidates_than_k():
    x = unit([[1, 0], [0.9, 0.1], [0, 1], [1, 0.05]])
    img = torch.tensor([0, 1, 2, 0])
    s, i = search_exact(x, img, x, img, k=3, device="cpu")
    assert i[0].tolist() == [1, 2, -1]  # 3 has the same image as 0; only two candidates
    assert np.isinf(s[0, 2])
    partner, score, rescued = choose_partners(s[:, 0], i[:, 0], min_score=0.5)
    assert partner.tolist() == [1, 3, -1, 1] and rescued == 0  # 2 has nothing above the floor


@pytest.mark.parametrize("qb,kb", [(1, 7), (13, 300), (300, 1), (64, 64)])
def test_blocked_search_independent_of_block_sizes(qb, kb):
    x, img = random_data(seed=1)
    ref_s, ref_i = search_exact(x, img, x, img, k=5, query_block=300, key_block=300, device="cpu")
    s, i = search_exact(x, img, x, img, k=5, query_block=qb, key_block=kb, device="cpu")
    assert (i == ref_i).all()
    np.testing.assert_allclose(s, ref_s, atol=1e-6)


def test_no_n_by_n_matrix(monkeypatch):
    shapes = []
    real = P._scores

    def spy(q, k):
        shapes.append((q.shape[0], k.shape[0]))
        return real(q, k)

    monkeypatch.setattr(P, "_scores", spy)
    x, img = random_data(n=400)
    search_exact(x, img, x, img, k=3, query_block=32, key_block=50, device="cpu")
    assert max(a * b for a, b in shapes) <= 32 * 50
    shapes.clear()
    IVFIndex.build(x, img, nlist=8, iters=3, block=64).search(x, img, k=3, nprobe=2, query_block=100)
    assert max(a * b for a, b in shapes) < 400 * 400 / 4


def clustered(n=2000, centres=40, d=32, noise=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unit(torch.randn(centres, d, generator=g))
    x = unit(c[torch.randint(centres, (n,), generator=g)] + noise * torch.randn(n, d, generator=g) / d ** 0.5)
    return x, torch.arange(n)  # every vector its own image


def test_ivf_recall_on_clustered_data_and_exact_with_all_lists():
    x, img = clustered()
    _, ref = search_exact(x, img, x, img, k=1, device="cpu")
    index = IVFIndex.build(x, img, nlist=40, iters=8, seed=0)
    _, approx = index.search(x, img, k=1, nprobe=4, query_block=500)
    assert (approx[:, 0] == ref[:, 0]).mean() > 0.95
    _, full = index.search(x, img, k=1, nprobe=40, query_block=700)
    assert (full[:, 0] == ref[:, 0]).all()


def test_rescue_keeps_every_partner():
    # 0 → 1 above the floor, but (as an approximate search may) 1 found nothing for itself.
    scores = np.array([0.9, -np.inf, 0.8, 0.1], np.float32)
    neighbours = np.array([1, -1, 1, 0])
    partner, score, rescued = choose_partners(scores, neighbours, min_score=0.5)
    assert rescued == 1 and partner[1] == 0 and score[1] == pytest.approx(0.9)  # the best of 0 and 2
    kept = partner >= 0
    assert kept[partner[kept]].all()
    assert partner[3] == -1


TRIPLETS = [  # (subj, rel, obj); images are distinct except where noted
    ("man", "riding", "horse"), ("person", "riding", "a horse"), ("cat", "under", "table"),
    ("kitten", "beneath", "table"), ("dog", "on", "sofa"), ("puppy", "on", "couch"),
    ("woman", "holding", "umbrella"), ("lady", "holding", "an umbrella"), ("car", "parked on", "street"),
    ("vehicle", "parked on", "road"), ("boy", "eating", "pizza"), ("child", "eating", "a slice of pizza"),
    ("bird", "on", "branch"), ("bird", "perched on", "tree branch"), ("plane", "flying over", "city"),
    ("airplane", "flying above", "town"), ("man", "surfing", "wave"), ("surfer", "riding", "wave"),
    ("girl", "playing with", "kite"), ("child", "flying", "kite"), ("cup", "next to", "laptop"),
    ("mug", "beside", "computer"), ("train", "at", "station"), ("train", "in", "train station"),
    ("skier", "going down", "slope"), ("person", "skiing down", "hill"), ("clock", "on", "tower"),
    ("zebra", "eating", "grass"), ("giraffe", "standing near", "tree"), ("quantum", "entangled with", "spreadsheet"),
]


def write_samples(path, extra=()):
    lines = []
    for n, (s, r, o) in enumerate(TRIPLETS):
        lines.append(json.dumps({"id": f"s{n}", "image": f"img{n}.jpg", "caption": f"a {s} {r} {o}",
                                 "triplet": {"subj": {"text": s}, "rel": {"text": r}, "obj": {"text": o}}}))
    lines += list(extra)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def embedder():
    return P.TextEmbedder(device="cpu")


def small_cfg(*overrides):
    return load_config(PositivesConfig, CONFIG, ["embed.chunk_size=7", "search.key_block=5", *overrides])


def read(path):
    return [json.loads(line) for line in open(path)]


def test_end_to_end_with_minilm(tmp_path, embedder, monkeypatch):
    monkeypatch.setattr(P, "TextEmbedder", lambda *a, **k: embedder)
    same_image = json.dumps({"id": "dup", "image": "img0.jpg", "caption": "a man riding a horse",
                             "triplet": {"subj": {"text": "man"}, "rel": {"text": "rides"}, "obj": {"text": "horse"}}})
    src = write_samples(tmp_path / "in.jsonl", [same_image, "{broken", json.dumps({"id": "x", "image": "i.jpg"})])
    out = tmp_path / "out.jsonl"
    summary = make_positives(src, str(out), small_cfg(), progress=False)
    kept = {r["id"]: r for r in read(out)}
    assert kept["s0"]["positive"] == "s1" and kept["s1"]["positive"] in ("s0", "dup")
    assert kept["s2"]["positive"] == "s3"  # cat under table ↔ kitten beneath table
    assert kept["dup"]["positive"] not in ("s0", "dup")  # s0 is the nearest, but the same image
    assert all(r["positive_score"] >= 0.7 for r in kept.values())
    assert all(kept[r["positive"]]["image"] != r["image"] for r in kept.values())
    assert all(r["positive"] in kept for r in kept.values())  # every partner is kept
    dropped = {r.get("id"): r["drop_reason"] for r in read(tmp_path / "out.dropped.jsonl")}
    assert dropped["s29"] == "no_positive" and dropped["x"] == "bad_record" and dropped[None] == "bad_json"
    assert summary["kept"] == len(kept) and summary["dropped"]["no_positive"] >= 1
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["score_percentiles"]["p50"] > 0.7
    assert list(kept) == [r["id"] for r in read(out)]  # input order
    # same result with IVF over all lists, and through two parts (embed[2] -> index -> search[2] -> write[2])
    ivf = small_cfg("search.exact_max=1", "search.ivf.backend=torch", "search.ivf.nlist=3", "search.ivf.nprobe=3")
    run_in_parts(src, str(tmp_path / "p.jsonl"), ivf, 2)
    parts = read(tmp_path / "p-part00000-of00002.jsonl") + read(tmp_path / "p-part00001-of00002.jsonl")
    assert {r["id"]: r["positive"] for r in parts} == {i: r["positive"] for i, r in kept.items()}


def run_in_parts(src, out, cfg, n):
    """embed[n] -> index[1] -> search[n] -> write[n], as a scheduler runs them."""
    for part in range(n):
        make_positives(src, out, cfg, Parts(part, n), "embed", progress=False)
    make_positives(src, out, cfg, stage="index", progress=False)
    for step in ("search", "write"):
        for part in range(n):
            make_positives(src, out, cfg, Parts(part, n), step, progress=False)
    return [r for part in range(n) for r in read(Parts(part, n).output(out))]


@pytest.mark.parametrize("n", [2, 3])
def test_parts_give_the_partners_of_one_process(tmp_path, embedder, monkeypatch, n):
    monkeypatch.setattr(P, "TextEmbedder", lambda *a, **k: embedder)
    src = write_samples(tmp_path / "in.jsonl", ["{broken", json.dumps({"id": "x", "image": "i.jpg"})])
    whole = make_positives(src, str(tmp_path / "whole.jsonl"), small_cfg(), progress=False)
    records = run_in_parts(src, str(tmp_path / "p.jsonl"), small_cfg(), n)
    assert {(r["id"], r["positive"]) for r in records} == {(r["id"], r["positive"]) for r in read(tmp_path / "whole.jsonl")}
    assert records == read(tmp_path / "whole.jsonl")  # contiguous parts: in part order, the one-process output
    summaries = [json.loads(open(Parts(p, n).output(str(tmp_path / "p.jsonl")) + ".summary.json").read())
                 for p in range(n)]
    assert sum(s["records"] for s in summaries) == whole["records"] == len(TRIPLETS) + 2
    dropped = {}
    for s in summaries:
        for reason, count in s["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
    assert dropped == whole["dropped"] and whole["dropped"]["bad_json"] == 1


def test_search_parts_need_the_index_step_and_the_same_num_parts(tmp_path, embedder, monkeypatch):
    monkeypatch.setattr(P, "TextEmbedder", lambda *a, **k: embedder)
    src, out, cfg = write_samples(tmp_path / "in.jsonl"), str(tmp_path / "o.jsonl"), small_cfg()
    for part in range(2):
        make_positives(src, out, cfg, Parts(part, 2), "embed", progress=False)
    with pytest.raises(ValueError, match="run the index step first"):
        make_positives(src, out, cfg, Parts(1, 2), "search", progress=False)
    with pytest.raises(ValueError, match="made with --num-parts 2, this step runs with --num-parts 3"):
        make_positives(src, out, cfg, Parts(0, 3), "search", progress=False)
    with pytest.raises(ValueError, match="made with --num-parts 2, this step runs with --num-parts 1"):
        make_positives(src, out, cfg, stage="write", progress=False)
    with pytest.raises(ValueError, match="stage=all runs every step in one process"):
        make_positives(src, out, cfg, Parts(0, 2), progress=False)
    assert make_positives(src, out, cfg, stage="index", progress=False)["index"]["method"] == "exact"
    assert make_positives(src, out, cfg, Parts(1, 2), "search", progress=False)["search"]["searched"] >= 1
    with pytest.raises(ValueError, match="finish stage=search on every part"):
        make_positives(src, out, cfg, Parts(1, 2), "write", progress=False)


def test_search_waits_for_all_embedding_parts(tmp_path, embedder, monkeypatch):
    monkeypatch.setattr(P, "TextEmbedder", lambda *a, **k: embedder)
    src = write_samples(tmp_path / "in.jsonl")
    make_positives(src, str(tmp_path / "o.jsonl"), small_cfg(), Parts(0, 2), "embed", progress=False)
    with pytest.raises(ValueError, match="finish stage=embed on every part"):
        make_positives(src, str(tmp_path / "o.jsonl"), small_cfg(), Parts(1, 2), "search", progress=False)
    with pytest.raises(ValueError, match="finish stage=embed on every part"):
        make_positives(src, str(tmp_path / "o.jsonl"), small_cfg(), stage="index", progress=False)


def test_embedding_resume_and_text_cache(tmp_path, embedder, monkeypatch):
    monkeypatch.setattr(P, "TextEmbedder", lambda *a, **k: embedder)
    src = write_samples(tmp_path / "in.jsonl", [json.dumps({"id": f"r{i}", "image": f"r{i}.jpg", "triplet": {
        "subj": {"text": "man"}, "rel": {"text": "riding"}, "obj": {"text": "horse"}}}) for i in range(10)])
    cfg, out = small_cfg(), str(tmp_path / "o.jsonl")
    calls = []
    real = P.embed_chunk

    def crash_on_third(*a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a)

    monkeypatch.setattr(P, "embed_chunk", crash_on_third)
    embedder.cache.clear()
    before = embedder.embedded
    with pytest.raises(RuntimeError):
        make_positives(src, out, cfg, stage="embed", progress=False)
    done = P.committed_chunks(P.Work.part_dir(P.Work(out, cfg).emb, 0, 1), ".emb.npy")
    assert done == {0, 1}
    monkeypatch.setattr(P, "embed_chunk", real)
    calls.clear()
    result = make_positives(src, out, cfg, stage="embed", progress=False)
    assert result["embed"] == {"chunks": 6, "embedded": 4}  # 40 lines / 7: chunks 2..5 only
    assert embedder.embedded - before == len({t for t in TRIPLETS})  # "man riding horse" x11 embedded once
    with pytest.raises(ValueError, match="other settings"):
        make_positives(src, out, small_cfg("embed.max_length=16"), stage="embed", progress=False)
    full = make_positives(src, out, cfg, progress=False)
    fresh = make_positives(src, str(tmp_path / "fresh.jsonl"), cfg, progress=False)
    assert (tmp_path / "fresh.jsonl").read_bytes() == (tmp_path / "o.jsonl").read_bytes()
    assert full["kept"] == fresh["kept"]


def test_config_file_and_typo():
    cfg = load_config(PositivesConfig, CONFIG)
    assert cfg.embed.model == "minilm" and cfg.search.top_k >= 1
    with pytest.raises(ValueError, match="min_score"):
        load_config(PositivesConfig, CONFIG, ["min_scor=0.5"])


def test_config_defaults_search_with_faiss_above_exact_max():
    s = load_config(PositivesConfig, CONFIG).search
    assert s.exact_max == 0 and s.ivf.backend == "auto" and s.ivf.nprobe == 0  # auto size, auto probe
    assert P.choose_method(100_000, s)["method"] == "exact"  # CPU: exact up to 100K keys
    meta = P.choose_method(1_000_000, s)
    assert meta == {"method": "faiss", "kind": "flat", "nlist": 4000, "train_size": 256_000, "keys": 1_000_000}
    assert P.choose_method(10_000_000, s)["kind"] == "pq"  # above flat_max: compressed codes


def test_without_faiss_clear_error_or_measured_torch_fallback(monkeypatch):
    monkeypatch.setattr(P, "faiss_available", lambda: False)
    s = load_config(PositivesConfig, CONFIG, ["search.exact_max=10"]).search
    with pytest.warns(UserWarning, match="faiss is not installed"):
        assert P.choose_method(1000, s)["method"] == "torch-ivf"
    s.ivf.backend = "faiss"
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        P.choose_method(1000, s)


# ----------------------------------------------------------------------------- faiss, one index per run

N_CLUSTERED, DIM = 3000, 32


@pytest.fixture(scope="module")
def clustered_vectors():
    x, _ = clustered(n=N_CLUSTERED, centres=60, d=DIM, noise=0.3, seed=3)
    return x.half()


class VectorEmbedder:
    """Stands in for the model: the text "x<j> r o" embeds as vector j (so the tool runs fast)."""

    def __init__(self, vectors):
        self.vectors, self.dim, self.embedded = vectors, vectors.shape[1], 0

    def embed(self, texts):
        self.embedded += len(texts)
        return self.vectors[[int(t.split()[0][1:]) for t in texts]].numpy()


def vector_samples(path, n):
    with open(path, "w") as f:
        for j in range(n):
            f.write(json.dumps({"id": f"v{j}", "image": f"img{j}.jpg", "caption": "c",
                                "triplet": {"subj": {"text": f"x{j}"}, "rel": {"text": "r"}, "obj": {"text": "o"}}}) + "\n")
    return str(path)


@pytest.fixture
def faiss_run(tmp_path, monkeypatch, clustered_vectors):
    """Run steps through the tool on the clustered vectors, counting faiss index builds."""
    pytest.importorskip("faiss")
    monkeypatch.setattr(P, "TextEmbedder", lambda *a, **k: VectorEmbedder(clustered_vectors))
    builds = []
    real = P.build_faiss_index

    def counting(*a, **k):
        builds.append(1)
        return real(*a, **k)

    monkeypatch.setattr(P, "build_faiss_index", counting)
    src = vector_samples(tmp_path / "in.jsonl", N_CLUSTERED)

    def run(name, *overrides, part=0, parts=1, stage="all"):
        cfg = load_config(PositivesConfig, CONFIG, ["embed.chunk_size=500", "search.exact_max=100",
                                                    "search.ivf.recall_sample=500", "min_score=0", *overrides])
        return make_positives(src, str(tmp_path / name), cfg, Parts(part, parts), stage, progress=False), cfg

    run.builds, run.tmp = builds, tmp_path
    return run


def top1(tmp, name, cfg):
    work = P.Work(str(tmp / name), cfg)
    return P._load_results(work, P.chunk_layout(work, None))


def test_faiss_index_built_once_across_chunks_and_parts(faiss_run):
    for part in (0, 1):
        faiss_run("f.jsonl", part=part, parts=2, stage="embed")
    faiss_run("f.jsonl", stage="index")
    for stage in ("search", "write"):
        for part in (0, 1):
            result, cfg = faiss_run("f.jsonl", part=part, parts=2, stage=stage)
    assert len(faiss_run.builds) == 1  # 6 chunks, 2 parts, one build: the index step's, loaded by both parts
    work = P.Work(str(faiss_run.tmp / "f.jsonl"), cfg)
    assert P.storage.exists(f"{work.search}/index.faiss")
    meta = result["search"]
    assert meta["method"] == "faiss" and meta["kind"] == "flat" and meta["nlist"] == P.default_nlist(N_CLUSTERED)
    assert meta["recall_at_1"] >= 0.97 and meta["recall_sample"] == 500  # tuned to the target, reported
    assert "recall@1 vs exact" in P.format_summary(result)
    # against exact search over every query: as good as it says, scores are exact cosines
    exact, ecfg = faiss_run("e.jsonl", "search.exact_max=100000")
    assert exact["search"]["method"] == "exact"
    s, i = top1(faiss_run.tmp, "f.jsonl", cfg)
    es, ei = top1(faiss_run.tmp, "e.jsonl", ecfg)
    recall = float(((i == ei) | (s >= es - 1e-4)).mean())
    assert recall >= 0.97 and abs(recall - meta["recall_at_1"]) < 0.03
    same = i == ei
    np.testing.assert_allclose(s[same], es[same], atol=1e-5)
    kept = {r["id"]: r["positive"] for r in read(faiss_run.tmp / "f-part00000-of00002.jsonl")}
    kept.update({r["id"]: r["positive"] for r in read(faiss_run.tmp / "f-part00001-of00002.jsonl")})
    assert len(kept) == N_CLUSTERED and all(p in kept for p in kept.values())  # every partner kept


def test_faiss_all_lists_gives_the_exact_partners(faiss_run):
    nlist = 20
    approx, cfg = faiss_run("f.jsonl", f"search.ivf.nlist={nlist}", f"search.ivf.nprobe={nlist}")
    exact, ecfg = faiss_run("e.jsonl", "search.exact_max=100000")
    assert approx["search"]["nprobe"] == nlist and approx["search"]["recall_at_1"] == 1.0
    assert (top1(faiss_run.tmp, "f.jsonl", cfg)[1] == top1(faiss_run.tmp, "e.jsonl", ecfg)[1]).all()
    assert read(faiss_run.tmp / "f.jsonl") == read(faiss_run.tmp / "e.jsonl")


def test_faiss_search_resumes_after_a_kill_with_the_saved_index(faiss_run, monkeypatch):
    faiss_run("f.jsonl", stage="embed")
    real, calls = P.FaissSearcher.search, []

    def killed_on_second_chunk(self, q, qi, k):
        if len(q) == 500 and k > 1:  # a chunk's queries (the recall sample is searched with k=1)
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("killed")
        return real(self, q, qi, k)

    monkeypatch.setattr(P.FaissSearcher, "search", killed_on_second_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        faiss_run("f.jsonl", stage="search")
    _, cfg = faiss_run("f.jsonl", stage="embed")
    work = P.Work(str(faiss_run.tmp / "f.jsonl"), cfg)
    assert P.committed_chunks(P.Work.part_dir(work.search, 0, 1), ".topk.npz") == {0}
    monkeypatch.setattr(P.FaissSearcher, "search", real)
    result, _ = faiss_run("f.jsonl", stage="search")
    assert result["search"]["searched"] == 5 and len(faiss_run.builds) == 1  # the saved index, not a new one
    summary, _ = faiss_run("f.jsonl", stage="write")
    assert summary["kept"] == N_CLUSTERED and summary["search"]["recall_at_1"] >= 0.97


@pytest.mark.parametrize("kind", ["pq", "hnsw"])
def test_faiss_pq_and_hnsw_tuned_to_the_target(kind, clustered_vectors, tmp_path):
    pytest.importorskip("faiss")
    cfg = load_config(PositivesConfig, CONFIG, ["search.exact_max=100", f"search.ivf.kind={kind}",
                                                "search.ivf.recall_sample=300", "search.ivf.recall_target=0.9"])
    keys, images = clustered_vectors, torch.arange(N_CLUSTERED)
    searcher, meta = P.open_index(P.Work(str(tmp_path / "o.jsonl"), cfg), keys, images, cfg)
    assert meta["kind"] == kind and meta["recall_at_1"] >= 0.9
    s, i = searcher.search(keys[:200], images[:200], 4)
    assert (i[:, 0] != np.arange(200)).all()  # never the query's own image
    exact = (keys[:200].float()[:, None, :] * keys[torch.from_numpy(i)].float()).sum(-1).numpy()
    np.testing.assert_allclose(s, exact, atol=1e-5)  # re-scored exactly, even from PQ codes


def test_sentence_transformers_pooling_is_the_models_own(tmp_path):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "man", "riding", "horse", "cat", "under", "table"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    bert_dir, st_dir = tmp_path / "bert", tmp_path / "st"
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32)).eval()
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    bert.save_pretrained(bert_dir)
    tok.save_pretrained(bert_dir)
    transformer = models.Transformer(str(bert_dir), max_seq_length=16)
    SentenceTransformer(modules=[transformer, models.Pooling(16, pooling_mode="cls")]).save(str(st_dir))

    texts = ["man riding horse", "cat under table", "man under horse table"]
    got = P.TextEmbedder(str(st_dir), device="cpu", max_length=16).embed(texts).astype(np.float32)
    with torch.no_grad():
        batch = tok(texts, padding=True, return_tensors="pt")
        hidden = bert(**batch).last_hidden_state  # (B, T, 16)
    cls = torch.nn.functional.normalize(hidden[:, 0], dim=1).numpy()
    mask = batch["attention_mask"][:, :, None].float()
    mean = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    np.testing.assert_allclose(got, cls, atol=2e-3)  # fp16 storage
    assert np.abs(got - mean).max() > 0.05  # and not what mean pooling gives
