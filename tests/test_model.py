"""SA-CLIP model: parity with open_clip, span pooling, LiT locking, ablations, checkpoints, collate.

Everything runs on the tiny ``sa-tiny`` config with random init (no weights can be downloaded).
"""
from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sapretrain.data.batch import build_preprocess, collate_records
from sapretrain.model import (
    SAClip,
    SAClipConfig,
    build_saclip,
    export_open_clip,
    load_saclip,
    masked_mean,
    register_model_configs,
    save_saclip,
)

register_model_configs()  # the tests call open_clip.create_model("sa-tiny") directly too

L = 77
D = 64  # sa-tiny embed_dim
SIZE = 64  # sa-tiny image size


def tiny(seed=0, **overrides) -> SAClip:
    torch.manual_seed(seed)
    cfg = {"name": "sa-tiny", "pretrained": None, "lock_image": False, **overrides}
    return build_saclip(cfg)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("sa-tiny")


def random_batch(n_pairs=3, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = 2 * n_pairs
    lengths = torch.randint(8, L, (2, b), generator=g)

    def caption(lengths):
        text = torch.zeros(b, L, dtype=torch.int64)
        spans = torch.zeros(b, 3, L, dtype=torch.bool)
        for i, n in enumerate(lengths.tolist()):
            text[i, 0] = 49406
            text[i, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
            text[i, n - 1] = 49407
            for p in range(3):  # 1-3 consecutive positions per part, between SOT and EOT
                start = int(torch.randint(1, n - 4, (1,), generator=g))
                spans[i, p, start : start + 1 + p] = True
        return text, spans

    text, spans = caption(lengths[0])
    neg_text, neg_spans = caption(lengths[1])
    x0y0 = torch.rand(b, 2, 2, generator=g) * 0.5
    return {
        "image": torch.randn(b, 3, SIZE, SIZE, generator=g),
        "rois": torch.randn(b, 2, 3, SIZE, SIZE, generator=g),
        "boxes": torch.cat([x0y0, x0y0 + 0.1 + torch.rand(b, 2, 2, generator=g) * 0.4], dim=-1),
        "text": text,
        "spans": spans,
        "neg_text": neg_text,
        "neg_spans": neg_spans,
    }


def assert_outputs_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ---- text path --------------------------------------------------------------------------------


@pytest.mark.parametrize("custom_text", [False, True])
def test_pooled_text_equals_open_clip_encode_text(tokenizer, custom_text):
    torch.manual_seed(0)
    clip = open_clip.create_model("sa-tiny", force_custom_text=custom_text)
    model = SAClip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False), clip).eval()
    text = tokenizer(["a red cube left of a blue sphere", "a man riding a horse", "x"])
    with torch.no_grad():
        pooled, tokens = model.text_features(text)
        expected = clip.encode_text(text)
    # Same computation; only trailing padding is trimmed (exact in float64, see the next test),
    # so float32 sums may round differently.
    torch.testing.assert_close(pooled, expected)
    assert tokens.shape == (3, L, D)
    # the per-token path is the same computation: the EOT token's feature is the pooled one
    eot = text.argmax(dim=-1)
    torch.testing.assert_close(tokens[torch.arange(3), eot], pooled, rtol=1e-5, atol=1e-6)
    spans = torch.zeros(3, 3, L, dtype=torch.bool)
    spans[:, :, 1] = True
    with torch.no_grad():
        out = model(
            {**random_batch(1), "text": text[:2], "spans": spans[:2], "neg_text": text[:2], "neg_spans": spans[:2]}
        )
    torch.testing.assert_close(out["text_embed"], F.normalize(expected[:2], dim=-1))


def test_trimming_the_padding_is_exact(tokenizer, monkeypatch):
    """Under the causal mask, dropping the batch's trailing padding changes no kept feature."""
    torch.manual_seed(0)
    model = tiny().double().eval()
    text = tokenizer(["a red cube left of a blue sphere!", "a man riding a horse", "x"])
    longest = int(text.argmax(dim=-1).max()) + 1  # the EOT of the longest caption
    assert model._trimmed_length(text, "argmax") == longest < L
    assert model._trimmed_length(text, "last") == L  # 'last' pooling reads the padding
    with torch.no_grad():
        pooled, tokens = model.text_features(text)
        monkeypatch.setattr(type(model), "_trimmed_length", lambda self, text, pool: text.shape[1])
        full_pooled, full_tokens = model.text_features(text)
    torch.testing.assert_close(pooled, full_pooled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tokens[:, :longest], full_tokens[:, :longest], rtol=1e-12, atol=1e-12)
    assert tokens.shape == full_tokens.shape and not tokens[:, longest:].any()


def test_token_features_are_causal(tokenizer):
    """Token features at position t depend only on tokens <= t (CLIP's causal mask is applied)."""
    model = tiny().eval()
    text = tokenizer(["a red cube left of a blue sphere", "a red cube behind a small green cylinder"])
    with torch.no_grad():
        _, tokens = model.text_features(text)
    shared = 4  # SOT a red cube
    assert torch.equal(text[0, :shared], text[1, :shared])
    torch.testing.assert_close(tokens[0, :shared], tokens[1, :shared], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tokens[0, shared + 1], tokens[1, shared + 1])


def naive_part_means(tokens, spans):
    out = torch.zeros(spans.shape[0], spans.shape[1], tokens.shape[-1], dtype=tokens.dtype)
    for b in range(spans.shape[0]):
        for p in range(spans.shape[1]):
            positions = [t for t in range(spans.shape[2]) if spans[b, p, t]]
            out[b, p] = sum(tokens[b, t] for t in positions) / len(positions)
    return out


def test_span_pooling_single_multi_and_truncated(tokenizer):
    model = tiny().eval()
    long_caption = "a dog " + "very " * 80 + "near a big red fire hydrant"
    text = tokenizer(["a dog on a bench", "a small brown dog on top of a wooden bench", long_caption])
    assert text[2, -1] == 49407 and (text[2] > 0).all()  # truncated: 77 ids, last forced to EOT
    spans = torch.zeros(3, 3, L, dtype=torch.bool)
    spans[0, 0, 2] = spans[0, 1, 3] = spans[0, 2, 5] = True  # single tokens: dog / on / bench
    spans[1, 0, 2:5] = True  # small brown dog
    spans[1, 1, 5:8] = True  # on top of
    spans[1, 2, 9:11] = True  # wooden bench
    spans[2, 0, 2] = True
    spans[2, 1, 70:72] = True
    spans[2, 2, 74:76] = True  # the object starts at 74 and runs past 77: only 74, 75 survive
    with torch.no_grad():
        _, tokens = model.text_features(text)
        parts = masked_mean(tokens, spans)
        r_svo = model.svo_features(tokens, spans)
        u = model.encode_text(text, spans)
    torch.testing.assert_close(parts, naive_part_means(tokens, spans), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r_svo, model.svo_proj(parts.mean(dim=1)), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(u).all() and torch.isfinite(r_svo).all()
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))


def test_forward_contract_shapes_and_norms():
    model = tiny()
    batch = random_batch(n_pairs=3)
    out = model(batch)
    for key, shape in {"u": (6, 2 * D), "u_neg": (6, 2 * D), "v": (6, 2 * D), "image_embed": (6, D),
                       "text_embed": (6, D), "r_svo": (6, D), "r_roi": (6, D)}.items():
        assert out[key].shape == shape, key
        assert torch.isfinite(out[key]).all(), key
    for key in ("u", "u_neg", "v", "image_embed", "text_embed"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(6))
    assert out["logit_scale"] is model.clip.logit_scale  # the log-scale parameter itself
    with torch.no_grad():
        model.eval()
        out = model(batch)
        torch.testing.assert_close(model.encode_text(batch["text"], batch["spans"]), out["u"])
        torch.testing.assert_close(model.encode_text(batch["neg_text"], batch["neg_spans"]), out["u_neg"])
        torch.testing.assert_close(model.encode_image(batch["image"], batch["rois"], batch["boxes"]), out["v"])
        sim = model.similarity(out["v"], out["u"])
    assert sim.shape == (6, 6) and sim.abs().max() <= 1 + 1e-6


def test_negatives_are_skipped_when_no_loss_reads_them():
    from sapretrain.losses import LossConfig
    from sapretrain.train.trainer import model_inputs

    model = tiny().eval()
    batch = random_batch(n_pairs=2)
    assert model_inputs(batch, LossConfig()) is batch  # the triplet loss reads u_neg
    lean = model_inputs(batch, LossConfig(triplet=False, clip=True))
    assert set(batch) - set(lean) == {"neg_text", "neg_spans"}
    with torch.no_grad():
        full, skipped = model(batch), model(lean)
    assert "u_neg" not in skipped and "neg_text_embed" not in skipped
    for key in ("u", "v", "text_embed", "image_embed"):
        torch.testing.assert_close(skipped[key], full[key])


def test_subject_object_roles_matter():
    """Swapping subject and object (crops and boxes) changes r_roi: concat keeps the roles."""
    model = tiny().eval()
    b = random_batch(1)
    with torch.no_grad():
        v = model.encode_image(b["image"], b["rois"], b["boxes"])
        swapped = model.encode_image(b["image"], b["rois"].flip(1), b["boxes"].flip(1))
    assert not torch.allclose(v[:, D:], swapped[:, D:])


# ---- locked image tower (LiT) -------------------------------------------------------------------


def test_locked_tower_is_frozen_eval_and_not_optimized():
    model = tiny(lock_image=True)
    visual = dict(model.clip.visual.named_parameters())
    assert model.vision_frozen and not any(p.requires_grad for p in visual.values())
    model.train()
    assert model.training and model.clip.transformer.training and not model.clip.visual.training

    groups = model.param_groups(weight_decay=0.1)
    optimized = {id(p) for g in groups for p in g["params"]}
    assert not optimized & {id(p) for p in visual.values()}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"clip.logit_scale", "clip.token_embedding.weight", "clip.positional_embedding", "svo_proj.bias"} <= no_decay
    assert "svo_proj.weight" not in no_decay and "roi_proj.weight" not in no_decay

    before = {k: v.clone() for k, v in model.clip.visual.state_dict().items()}
    trainable_before = model.svo_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    for step in range(3):
        out = model(random_batch(2, seed=step))
        loss = sum(out[k].pow(2).sum() for k in ("u", "v", "u_neg")) - (out["u"] * out["v"]).sum()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in visual.values())
        optimizer.step()
    for k, v in model.clip.visual.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(model.svo_proj.weight, trainable_before)
    assert not out["image_embed"].requires_grad  # encoded under no_grad


def test_unlocked_groups_train_the_last_group():
    model = tiny(lock_image=True, unlock_image_groups=1)
    trainable = {n for n, p in model.clip.visual.named_parameters() if p.requires_grad}
    assert trainable == {"proj"}  # open_clip's last ViT group is the projection
    assert not model.vision_frozen
    model.train()
    assert model.clip.visual.training
    out = model(random_batch(1))
    out["v"].sum().backward()
    assert model.clip.visual.proj.grad is not None
    assert model.clip.visual.conv1.weight.grad is None


def test_precomputed_vision_features_match():
    model = tiny(lock_image=True).eval()
    b = random_batch(2)
    with torch.no_grad():
        image_features, roi_features = model.vision_features(b["image"], b["rois"])
        direct = model(b)
        cached = model({k: v for k, v in b.items() if k not in ("image", "rois")}
                       | {"image_features": image_features, "roi_features": roi_features})
    assert_outputs_equal(direct, cached)
    with pytest.raises(ValueError, match="frozen"):
        tiny(lock_image=False)({**b, "image_features": image_features, "roi_features": roi_features})


# ---- ablations --------------------------------------------------------------------------------


def test_ablation_switches_change_only_their_half():
    full = tiny().eval()
    b = random_batch(2)
    with torch.no_grad():
        ref = full(b)
        no_svo = tiny(use_svo=False)
        no_svo.load_state_dict(full.state_dict(), strict=False)
        out = no_svo.eval()(b)
        assert no_svo.svo_proj is None
        torch.testing.assert_close(out["v"], ref["v"], rtol=0, atol=0)
        torch.testing.assert_close(out["u"][:, :D], ref["text_embed"], rtol=0, atol=0)
        torch.testing.assert_close(out["u"][:, :D], ref["u"][:, :D] * math.sqrt(2))
        assert (out["u"][:, D:] == 0).all() and (out["u_neg"][:, D:] == 0).all() and (out["r_svo"] == 0).all()
        torch.testing.assert_close(out["u"].norm(dim=-1), torch.ones(4))

        no_roi = tiny(use_roi=False)
        no_roi.load_state_dict(full.state_dict(), strict=False)
        assert no_roi.box_embed is None and no_roi.roi_proj is None
        out = no_roi.eval()({k: v for k, v in b.items() if k != "rois"})  # ROI crops are not needed
        torch.testing.assert_close(out["u"], ref["u"], rtol=0, atol=0)
        torch.testing.assert_close(out["u_neg"], ref["u_neg"], rtol=0, atol=0)
        torch.testing.assert_close(out["v"][:, :D], ref["image_embed"], rtol=0, atol=0)
        assert (out["v"][:, D:] == 0).all() and (out["r_roi"] == 0).all()

        both = tiny(use_svo=False, use_roi=False)
        both.load_state_dict(full.state_dict(), strict=False)
        out = both.eval()(b)  # both off: u . v is CLIP's cosine
        torch.testing.assert_close((out["u"] * out["v"]).sum(-1), (ref["text_embed"] * ref["image_embed"]).sum(-1))


# ---- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip_random_init(tmp_path):
    model = tiny(lock_image=True, unlock_image_groups=1).eval()
    path = tmp_path / "model.pt"
    save_saclip(model, path)  # pretrained None: frozen weights must be stored
    payload = torch.load(path, weights_only=True)
    assert payload["includes_frozen"] and "clip.visual.conv1.weight" in payload["state_dict"]
    loaded = load_saclip(path)
    assert loaded.cfg == model.cfg and not loaded.training
    b = random_batch(2)
    with torch.no_grad():
        assert_outputs_equal(model(b), loaded(b))


def test_checkpoint_rebuilds_frozen_tower_from_pretrained(tmp_path):
    torch.manual_seed(1)
    weights = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("sa-tiny").state_dict(), weights)  # stands in for pretrained='openai'
    model = build_saclip({"name": "sa-tiny", "pretrained": str(weights), "lock_image": True})
    with torch.no_grad():
        for p in model.clip.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "training" of the text tower
    path = tmp_path / "model.pt"
    save_saclip(model, path)
    payload = torch.load(path, weights_only=True)
    assert not payload["includes_frozen"]
    assert not any(k.startswith("clip.visual.") for k in payload["state_dict"])
    loaded = load_saclip(path)
    b = random_batch(2)
    with torch.no_grad():
        assert_outputs_equal(model.eval()(b), loaded(b))
    save_saclip(model, tmp_path / "full.pt", include_frozen=True)
    assert "clip.visual.conv1.weight" in torch.load(tmp_path / "full.pt", weights_only=True)["state_dict"]


def test_checkpoint_of_json_config_model_loads_without_the_file(tmp_path):
    config = tmp_path / "sa-json-test.json"
    config.write_text(json.dumps(open_clip.get_model_config("sa-tiny") | {"embed_dim": 32}))
    model = build_saclip({"name": str(config), "pretrained": None, "lock_image": False, "use_roi": False}).eval()
    assert model.embed_dim == 32
    save_saclip(model, tmp_path / "model.pt")
    config.unlink()
    loaded = load_saclip(tmp_path / "model.pt")
    b = random_batch(1)
    with torch.no_grad():
        assert_outputs_equal(model(b), loaded(b))


def test_trainer_state_rebuilds_a_random_init_frozen_tower_from_the_run_seed(tmp_path):
    from sapretrain.model.checkpoint import frozen_keys, training_weights

    model = tiny(seed=7, lock_image=True).eval()  # as the trainer builds it: set_seed(run.seed) first
    entries = training_weights(model, include_frozen=False)
    assert entries["model_excluded"] == frozen_keys(model)
    assert not any(k.startswith("clip.visual.") for k in entries["model"])  # the tower is not stored
    state = {"config": {"model": {"name": "sa-tiny", "pretrained": None, "lock_image": True}, "run": {"seed": 7}},
             **entries}
    torch.save(state, tmp_path / "state.pt")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    loaded = load_saclip(tmp_path / "state.pt")
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched
    b = random_batch(2)
    with torch.no_grad():
        assert_outputs_equal(model(b), loaded(b))
    # Another seed re-draws the tower: the seed is what rebuilds it.
    state["config"]["run"]["seed"] = 8
    torch.save(state, tmp_path / "other.pt")
    with torch.no_grad():
        assert not torch.equal(load_saclip(tmp_path / "other.pt")(b)["image_embed"], model(b)["image_embed"])
    # A key the model lacks, or a missing one that was not excluded, is an error naming the file.
    del entries["model"]["svo_proj.weight"]
    torch.save({**state, **entries, "config": {**state["config"], "run": {"seed": 7}}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: checkpoint does not match the model: missing \\['svo_proj.weight'\\]"):
        load_saclip(tmp_path / "bad.pt")


def test_save_pretrained_round_trip_is_exact(tmp_path):
    from sapretrain.model import load_pretrained, save_pretrained

    model = tiny(seed=2, lock_image=True).eval()
    config = save_pretrained(model, tmp_path / "hub", extra={"note": "x"})
    assert config["note"] == "x" and (tmp_path / "hub" / "model.safetensors").is_file()
    for loaded in (load_pretrained(tmp_path / "hub"), load_saclip(tmp_path / "hub")):
        assert loaded.cfg == model.cfg and not loaded.training
        b = random_batch(2)
        with torch.no_grad():
            assert_outputs_equal(model(b), loaded(b))
    (tmp_path / "hub" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_pretrained(tmp_path / "hub")
    with pytest.raises(ValueError, match="not an exported SA-CLIP folder"):
        load_saclip(tmp_path)


def test_export_open_clip_loads_in_create_model(tmp_path):
    model = tiny().eval()
    path = tmp_path / "open_clip.pt"
    name = export_open_clip(model, path)
    assert name == "sa-tiny"
    clip = open_clip.create_model(name, pretrained=str(path)).eval()
    b = random_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(b["image"]), model.clip.encode_image(b["image"]), rtol=0, atol=0)
        torch.testing.assert_close(clip.encode_text(b["text"]), model.clip.encode_text(b["text"]), rtol=0, atol=0)


def test_unknown_config_key_and_model_name():
    with pytest.raises(ValueError, match="typo"):
        SAClipConfig.from_dict({"name": "sa-tiny", "use_sov": False})
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_saclip({"name": "no-such-model", "pretrained": None})


# ---- collate ----------------------------------------------------------------------------------


def solid(color, size=(96, 72)) -> Image.Image:
    return Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8))


def side(i: int, member: str, n_tokens: int) -> dict:
    base = 100 * i + (50 if member == "p" else 0)
    tokens = [49406] + [base + k for k in range(1, n_tokens - 1)] + [49407]
    spans = {"subj": [1], "rel": [2, 3], "obj": list(range(4, n_tokens - 1))}
    return {
        "id": f"r{i}-{member}",
        "tokens": tokens,
        "spans": spans,
        "negative": {"tokens": tokens[:2] + [7] + tokens[3:], "spans": spans},
        "boxes": {"subj": [0.1 * i, 0.1, 0.3, 0.4 if member == "a" else 0.5], "obj": [0.5, 0.5, 0.9, 0.8]},
    }


def records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        rec = {"__key__": f"r{i}", "json": {"schema": 1, "a": side(i, "a", 7 + i), "p": side(i, "p", 9)}}
        for member, shade in (("a", 40), ("p", 200)):
            rec[f"{member}.jpg"] = solid((shade, 10 * i, 0))
            rec[f"{member}.subj.jpg"] = solid((shade, 10 * i, 100), size=(64, 64))
            rec[f"{member}.obj.jpg"] = solid((shade, 10 * i, 200), size=(64, 64))
        out.append(rec)
    return out


def test_collate_records_contract():
    model = tiny().eval()
    preprocess = build_preprocess(model)
    recs = records(3)
    batch = collate_records(recs, preprocess)
    assert batch["image"].shape == (6, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["rois"].shape == (6, 2, 3, SIZE, SIZE)
    assert batch["boxes"].shape == (6, 2, 4)
    for key in ("text", "neg_text"):
        assert batch[key].shape == (6, L) and batch[key].dtype == torch.int64
    for key in ("spans", "neg_spans"):
        assert batch[key].shape == (6, 3, L) and batch[key].dtype == torch.bool

    for j, (i, member) in enumerate([(0, "a"), (1, "a"), (2, "a"), (0, "p"), (1, "p"), (2, "p")]):  # anchors first
        rec, s = recs[i], recs[i]["json"][member]
        torch.testing.assert_close(batch["image"][j], preprocess(rec[f"{member}.jpg"]))
        torch.testing.assert_close(batch["rois"][j, 1], preprocess(rec[f"{member}.obj.jpg"]))
        n = len(s["tokens"])
        assert batch["text"][j, :n].tolist() == s["tokens"] and (batch["text"][j, n:] == 0).all()
        assert batch["neg_text"][j, :n].tolist() == s["negative"]["tokens"]
        for p, part in enumerate(("subj", "rel", "obj")):
            assert batch["spans"][j, p].nonzero().flatten().tolist() == s["spans"][part]
        torch.testing.assert_close(batch["boxes"][j], torch.tensor([s["boxes"]["subj"], s["boxes"]["obj"]]))
    # pixel normalisation is the model's: a mid-grey pixel maps to (0.5 - mean) / std
    grey = preprocess(solid((128, 128, 128)))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    torch.testing.assert_close(grey, ((128 / 255 - mean) / std).expand(3, SIZE, SIZE), rtol=0, atol=1e-5)

    with torch.no_grad():
        out = model(batch)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_collate_records_rejects_bad_spans():
    recs = records(1)
    recs[0]["json"]["p"]["spans"] = {"subj": [1], "rel": [], "obj": [4]}
    with pytest.raises(ValueError, match="r0.p caption: rel span has no token"):
        collate_records(recs, build_preprocess(tiny()))
    recs = records(1)
    recs[0]["json"]["a"]["negative"]["spans"] = {"subj": [1], "rel": [2], "obj": [40]}
    with pytest.raises(ValueError, match="outside"):
        collate_records(recs, build_preprocess(tiny()))
