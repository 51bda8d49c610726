"""Loss parity: each loss against a naive loop reference (value and gradients), and two gloo
processes with B pairs each against one process with 2B pairs.

Tolerances: everything runs in float64. Vectorised and loop references differ only by rounding
order (~1e-15 relative), so values and gradients are compared at rtol 1e-10 / atol 1e-12; the
two-process comparison adds the all-gather/all-reduce summation order, compared at rtol 1e-9 /
atol 1e-12.
"""
from __future__ import annotations

import math
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import free_port
from sapretrain.config import ConfigError, from_dict
from sapretrain.distributed import gather_with_grad, world
from sapretrain.losses import ClipLoss, InterSampleContrastiveLoss, LossConfig, SAClipLoss, TripletLoss

RTOL, ATOL = 1e-10, 1e-12  # loop reference vs vectorised, float64
DIST_RTOL, DIST_ATOL = 1e-9, 1e-12  # 2 ranks x B pairs vs 1 rank x 2B pairs, float64


def close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def unit(n_samples: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n_samples, dim, generator=g, dtype=torch.float64), dim=-1)
    return x.requires_grad_()


def raw(n_samples: int, dim: int, seed: int) -> torch.Tensor:
    """Random directions with norms in [0.5, 2): the SA-CLIP terms must normalise them."""
    g = torch.Generator().manual_seed(seed)
    norms = 0.5 + 1.5 * torch.rand(n_samples, 1, generator=g, dtype=torch.float64)
    return (unit(n_samples, dim, seed).detach() * norms).requires_grad_()


def cos(a, b):
    return torch.dot(a, b) / (torch.sqrt(torch.dot(a, a)) * torch.sqrt(torch.dot(b, b)))


# ---- naive references: one sample at a time, explicit positives and sums of exp --------------


def ref_contrastive(x, scale):
    two_n = x.shape[0]
    n = two_n // 2
    total = 0.0
    for i in range(two_n):
        positive = (i + n) % two_n
        denominator = sum(torch.exp(scale * cos(x[i], x[k])) for k in range(two_n) if k != i)
        total = total - torch.log(torch.exp(scale * cos(x[i], x[positive])) / denominator)
    return total / two_n


def ref_triplet(v, u, u_neg, margin):
    total = 0.0
    for i in range(v.shape[0]):
        vi, ui, ni = (x[i] / torch.sqrt(torch.dot(x[i], x[i])) for x in (v, u, u_neg))
        d_pos = sum((vi[d] - ui[d]) ** 2 for d in range(v.shape[1]))
        d_neg = sum((vi[d] - ni[d]) ** 2 for d in range(v.shape[1]))
        total = total + torch.clamp(d_pos - d_neg + margin, min=0)
    return total / v.shape[0]


def ref_clip(image, text, logit_scale):
    scale = torch.exp(logit_scale)
    m = image.shape[0]
    image_to_text = text_to_image = 0.0
    for i in range(m):
        to_texts = [torch.exp(scale * torch.dot(image[i], text[k])) for k in range(m)]
        to_images = [torch.exp(scale * torch.dot(text[i], image[k])) for k in range(m)]
        image_to_text = image_to_text - torch.log(to_texts[i] / sum(to_texts))  # positive: text i
        text_to_image = text_to_image - torch.log(to_images[i] / sum(to_images))  # positive: image i
    return (image_to_text / m + text_to_image / m) / 2


def grads(value, inputs):
    return torch.autograd.grad(value, inputs, allow_unused=False)


# ---- single-process parity -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("learnable", [False, True])
def test_contrastive_matches_reference(n, learnable):
    x = raw(2 * n, 8, seed=n)
    loss = InterSampleContrastiveLoss("v", temperature=0.07, learnable=learnable).double()
    out = loss({"v": x})
    assert set(out) == {"contrastive_v_loss"} and out["contrastive_v_loss"].dim() == 0
    scale = loss.logit_scale.exp() if learnable else 1 / 0.07
    expected = ref_contrastive(x, scale)
    close(out["contrastive_v_loss"], expected)
    wrt = [x, loss.logit_scale] if learnable else [x]
    for got, want in zip(grads(out["contrastive_v_loss"], wrt), grads(expected, wrt)):
        close(got, want)
    if n == 1:  # each sample's only other sample is its partner: -log(1) = 0, no gradient
        assert out["contrastive_v_loss"].abs().item() < 1e-15
        assert grads(loss({"v": x})["contrastive_v_loss"], [x])[0].abs().max().item() < 1e-15


def test_temperature_parameter_only_when_learnable_and_capped_like_clip():
    assert list(InterSampleContrastiveLoss(learnable=False).parameters()) == []
    loss = InterSampleContrastiveLoss("u", temperature=0.05, learnable=True).double()
    (param,) = loss.parameters()
    close(param.exp(), torch.tensor(20.0, dtype=torch.float64), rtol=1e-6, atol=0)  # 1 / temperature (float32 init)
    x = raw(6, 4, seed=0)
    loss({"u": x})["contrastive_u_loss"].backward()
    assert param.grad is not None and param.grad.abs().item() > 0

    with torch.no_grad():
        param.fill_(math.log(500.0))
    param.grad = None
    value = loss({"u": x})["contrastive_u_loss"]
    close(value, ref_contrastive(x, torch.tensor(100.0, dtype=torch.float64)))  # capped at 100
    value.backward()
    assert param.grad.abs().item() > 0  # still trainable at the cap


@pytest.mark.parametrize("n", [1, 2, 5])
def test_triplet_matches_reference(n):
    v, u, u_neg = raw(2 * n, 4, seed=10 + n), raw(2 * n, 4, seed=20 + n), raw(2 * n, 4, seed=30 + n)
    out = TripletLoss(margin=0.2)({"v": v, "u": u, "u_neg": u_neg})
    assert set(out) == {"triplet_loss"}
    expected = ref_triplet(v, u, u_neg, 0.2)
    close(out["triplet_loss"], expected)
    for got, want in zip(grads(out["triplet_loss"], [v, u, u_neg]), grads(expected, [v, u, u_neg])):
        close(got, want)


def test_triplet_data_covers_both_sides_of_the_hinge():
    v, u, u_neg = unit(10, 4, seed=25), unit(10, 4, seed=35), unit(10, 4, seed=45)
    hinge = (v - u).pow(2).sum(-1) - (v - u_neg).pow(2).sum(-1) + 0.2
    assert (hinge > 0).any() and (hinge < 0).any()


@pytest.mark.parametrize("n", [1, 2, 5])
def test_clip_matches_reference(n):
    image, text = unit(2 * n, 8, seed=40 + n), unit(2 * n, 8, seed=50 + n)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    out = ClipLoss()({"image_embed": image, "text_embed": text, "logit_scale": logit_scale})
    assert set(out) == {"clip_loss"}
    expected = ref_clip(image, text, logit_scale)
    close(out["clip_loss"], expected)
    wrt = [image, text, logit_scale]
    for got, want in zip(grads(out["clip_loss"], wrt), grads(expected, wrt)):
        close(got, want)


def features(n: int, seed: int = 0) -> dict:
    return {
        "u": raw(2 * n, 8, seed), "v": raw(2 * n, 8, seed + 1), "u_neg": raw(2 * n, 8, seed + 2),
        "image_embed": unit(2 * n, 6, seed + 3), "text_embed": unit(2 * n, 6, seed + 4),
        "logit_scale": torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True),
    }


def test_saclip_returns_enabled_terms_weighted():
    f = features(3)
    cfg = LossConfig(clip=True, w_contrastive=0.5, w_triplet=2.0, w_clip=0.25, margin=0.3, temperature=0.1)
    out = SAClipLoss(cfg)(f)
    assert set(out) == {"contrastive_u_loss", "contrastive_v_loss", "triplet_loss", "clip_loss"}
    close(out["contrastive_u_loss"], 0.5 * ref_contrastive(f["u"], 10.0))
    close(out["contrastive_v_loss"], 0.5 * ref_contrastive(f["v"], 10.0))
    close(out["triplet_loss"], 2.0 * ref_triplet(f["v"], f["u"], f["u_neg"], 0.3))
    close(out["clip_loss"], 0.25 * ref_clip(f["image_embed"], f["text_embed"], f["logit_scale"]))

    assert set(SAClipLoss()(f)) == {"contrastive_u_loss", "contrastive_v_loss", "triplet_loss"}  # paper default
    no_triplet = LossConfig(triplet=False)
    assert set(SAClipLoss(no_triplet)(f)) == {"contrastive_u_loss", "contrastive_v_loss"}
    baseline = LossConfig(contrastive_text=False, contrastive_image=False, triplet=False, clip=True)
    assert set(SAClipLoss(baseline)({"image_embed": f["image_embed"], "text_embed": f["text_embed"],
                                     "logit_scale": f["logit_scale"]})) == {"clip_loss"}
    assert len(list(SAClipLoss(LossConfig(learnable_temperature=True)).parameters())) == 2

    # The SA-CLIP terms see directions only: a feature norm other than 1 changes nothing.
    halved = {**f, **{k: f[k] / math.sqrt(2) for k in ("u", "v", "u_neg")}}
    for key, value in SAClipLoss(cfg)(halved).items():
        close(value, out[key])


def test_loss_config_errors_are_clear():
    nothing = {"contrastive_text": False, "contrastive_image": False, "triplet": False, "clip": False}
    with pytest.raises(ConfigError, match="enables no term"):
        LossConfig(**nothing)
    with pytest.raises(ConfigError, match="enables no term"):
        from_dict(LossConfig, nothing)  # what the YAML loader does
    with pytest.raises(KeyError, match="needs the model feature 'u_neg'"):
        TripletLoss()({"u": unit(2, 4, 0), "v": unit(2, 4, 1)})
    with pytest.raises(ValueError, match=r"\[anchors; partners\]"):
        InterSampleContrastiveLoss()({"u": unit(3, 4, 0)})
    f = features(2)
    with pytest.raises(ValueError, match=r"log of the scale .* not its exp\(\)"):
        ClipLoss()({**f, "logit_scale": f["logit_scale"].exp()})  # open_clip forward's value


def test_gather_is_identity_without_a_process_group():
    assert world() == (0, 1)
    x = unit(4, 3, 0)
    assert gather_with_grad(x) is x


# ---- two processes (gloo) vs one ---------------------------------------------------------------

WORLD, PAIRS, IN_DIM = 2, 3, 5
PARITY_CFG = dict(clip=True, learnable_temperature=True, w_contrastive=0.5, w_triplet=2.0, w_clip=0.7)


class FeatureModel(nn.Module):
    """A stand-in for SA-CLIP: linear maps from random inputs to the named features."""

    def __init__(self):
        super().__init__()
        self.text, self.image = nn.Linear(IN_DIM, 8), nn.Linear(IN_DIM, 8)
        self.text_proj, self.image_proj = nn.Linear(IN_DIM, 6), nn.Linear(IN_DIM, 6)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, batch):
        caption, negative, image = batch.unbind(1)  # (2n, IN_DIM) each
        return {  # u, u_neg, v left unnormalised: the SA-CLIP terms normalise them
            "u": self.text(caption),
            "u_neg": self.text(negative),
            "v": self.image(image),
            "text_embed": F.normalize(self.text_proj(caption), dim=-1),
            "image_embed": F.normalize(self.image_proj(image), dim=-1),
            "logit_scale": self.logit_scale,
        }


def build(seed: int = 0):
    """Model, loss and per-rank batches, identical in every process (shared seed)."""
    torch.manual_seed(seed)
    model, loss = FeatureModel().double(), SAClipLoss(LossConfig(**PARITY_CFG)).double()
    batches = torch.randn(WORLD, 2 * PAIRS, 3, IN_DIM, dtype=torch.float64)  # rank r: [anchors_r; partners_r]
    return model, loss, batches


def named_grads(model, loss):
    return {name: p.grad.clone() for name, p in [*model.named_parameters(), *loss.named_parameters(prefix="loss")]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    result = {}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
        assert world() == (rank, WORLD)
        model, loss_fn, batches = build()
        terms = loss_fn(model(batches[rank]))
        sum(terms.values()).backward()
        # What DDP does: average gradients (model and loss parameters) and, for logging, losses.
        gradients = named_grads(model, loss_fn)
        for tensor in [*gradients.values(), *terms.values()]:
            tensor = tensor.detach()
            dist.all_reduce(tensor)
            tensor /= WORLD
        result["terms"] = {k: v.detach() for k, v in terms.items()}
        result["grads"] = gradients

        # Unequal batches: rank 1 drops a pair; every rank must raise (not hang).
        local = batches[rank]
        if rank == 1:
            local = torch.cat([local[: PAIRS - 1], local[PAIRS : 2 * PAIRS - 1]])
        try:
            loss_fn(model(local))
        except ValueError as err:
            result["unequal_error"] = str(err)
        dist.destroy_process_group()
    except BaseException:
        result["traceback"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_ranks_equal_one_rank_with_the_global_batch(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, str(tmp_path))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "traceback" not in res, f"rank {r} failed:\n{res['traceback']}"

    # One process, 2 * PAIRS pairs, standard layout [anchors_0, anchors_1; partners_0, partners_1]:
    # every sample keeps its partner, only the order of samples differs (the losses ignore it).
    model, loss_fn, batches = build()
    anchors, partners = batches[:, :PAIRS], batches[:, PAIRS:]
    single = torch.cat([anchors.reshape(-1, 3, IN_DIM), partners.reshape(-1, 3, IN_DIM)])
    terms = loss_fn(model(single))
    sum(terms.values()).backward()
    expected_grads = named_grads(model, loss_fn)

    for res in results:  # after the all-reduce both ranks hold the same numbers
        assert set(res["terms"]) == set(terms) == {"contrastive_u_loss", "contrastive_v_loss", "triplet_loss", "clip_loss"}
        for key in terms:
            close(res["terms"][key], terms[key].detach(), DIST_RTOL, DIST_ATOL)
        assert set(res["grads"]) == set(expected_grads)
        for name, grad in expected_grads.items():
            assert grad.abs().max() > 0, name
            close(res["grads"][name], grad, DIST_RTOL, DIST_ATOL)
        assert "same number of pairs per batch" in res["unequal_error"] and "[6, 4]" in res["unequal_error"]
