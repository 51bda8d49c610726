"""Positive partners: exact blocked search vs brute force, IVF, the whole tool with MiniLM, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sapretrain.config import load_config
from sapretrain.curation import positives as P
from sapretrain.curation.positives import IVFIndex, PositivesConfig, choose_partners, make_positives, search_exact

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
    # same result with IVF over all lists, and through two parts (embed, search, write per part)
    ivf = small_cfg("search.exact_max=1", "search.ivf.nlist=3", "search.ivf.nprobe=3")
    for step in ("embed", "search", "write"):
        for part in (0, 1):
            make_positives(src, str(tmp_path / "p.jsonl"), ivf, part, 2, step, progress=False)
    parts = read(tmp_path / "p-part00000-of00002.jsonl") + read(tmp_path / "p-part00001-of00002.jsonl")
    assert {r["id"]: r["positive"] for r in parts} == {i: r["positive"] for i, r in kept.items()}


def test_search_waits_for_all_embedding_parts(tmp_path, embedder, monkeypatch):
    monkeypatch.setattr(P, "TextEmbedder", lambda *a, **k: embedder)
    src = write_samples(tmp_path / "in.jsonl")
    make_positives(src, str(tmp_path / "o.jsonl"), small_cfg(), 0, 2, "embed", progress=False)
    with pytest.raises(ValueError, match="finish stage=embed on every part"):
        make_positives(src, str(tmp_path / "o.jsonl"), small_cfg(), 1, 2, "search", progress=False)


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
    done = P.committed_chunks(P.Work(out, cfg).emb, ".emb.npy")
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
