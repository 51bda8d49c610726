"""Loss parity: each loss against a naive loop reference (value and gradients), false-negative
masking and CLIP with partners included, and two gloo processes with B pairs each against one
process with 2B pairs (with the same images spread over both ranks).

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


def partner_of(k, two_n):
    return (k + two_n // 2) % two_n


def linked(i, k, groups):
    """Some sample of i's group has a sample of k's group as its partner (naive: every sample c)."""
    two_n = len(groups)
    return any(groups[c] == groups[i] and groups[partner_of(c, two_n)] == groups[k] for c in range(two_n))


def ref_contrastive_masked(x, scale, groups):
    """Eq. 9 with false-negative masking, spelled out: the denominator of row i runs over every k
    but i itself, the same-image columns and the linked ones; the partner always stays."""
    two_n = x.shape[0]
    total = 0.0
    for i in range(two_n):
        positive = partner_of(i, two_n)
        kept = [k for k in range(two_n) if k == positive
                or (k != i and groups[k] != groups[i] and not linked(i, k, groups))]
        denominator = sum(torch.exp(scale * cos(x[i], x[k])) for k in kept)
        total = total - torch.log(torch.exp(scale * cos(x[i], x[positive])) / denominator)
    return total / two_n


def ref_clip_masked(image, text, logit_scale, groups, partners):
    """CLIP with masking (same image; with partners also linked columns) and, with partners, the
    partner as a second positive: minus the mean of the positives' log-probabilities."""
    scale = torch.exp(logit_scale)
    m = image.shape[0]
    directions = []
    for rows, columns in ((image, text), (text, image)):
        total = 0.0
        for i in range(m):
            positives = [i, partner_of(i, m)] if partners else [i]
            kept = [k for k in range(m) if k in positives
                    or (groups[k] != groups[i] and not (partners and linked(i, k, groups)))]
            denominator = sum(torch.exp(scale * torch.dot(rows[i], columns[k])) for k in kept)
            log_probs = [torch.log(torch.exp(scale * torch.dot(rows[i], columns[p])) / denominator) for p in positives]
            total = total - sum(log_probs) / len(log_probs)
        directions.append(total / m)
    return (directions[0] + directions[1]) / 2


def distinct(two_n):
    return torch.arange(two_n)


def shared_groups(two_n, seed):
    """Ids from a small alphabet: same images, reused partners, partners of one image."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, max(2, two_n // 2), (two_n,), generator=g)
    assert len(set(groups.tolist())) < two_n
    return groups


def grads(value, inputs):
    return torch.autograd.grad(value, inputs, allow_unused=False)


# ---- single-process parity -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("learnable", [False, True])
def test_contrastive_matches_reference(n, learnable):
    x = raw(2 * n, 8, seed=n)
    loss = InterSampleContrastiveLoss("v", temperature=0.07, learnable=learnable).double()
    out = loss({"v": x, "groups": distinct(2 * n)})  # masking with no shared image changes nothing
    assert set(out) == {"contrastive_v_loss"} and out["contrastive_v_loss"].dim() == 0
    scale = loss.logit_scale.exp() if learnable else 1 / 0.07
    expected = ref_contrastive(x, scale)
    close(out["contrastive_v_loss"], expected)
    wrt = [x, loss.logit_scale] if learnable else [x]
    for got, want in zip(grads(out["contrastive_v_loss"], wrt), grads(expected, wrt)):
        close(got, want)
    if n == 1:  # each sample's only other sample is its partner: -log(1) = 0, no gradient
        assert out["contrastive_v_loss"].abs().item() < 1e-15
        assert grads(loss({"v": x, "groups": distinct(2)})["contrastive_v_loss"], [x])[0].abs().max().item() < 1e-15


def test_temperature_parameter_only_when_learnable_and_capped_like_clip():
    assert list(InterSampleContrastiveLoss(learnable=False).parameters()) == []
    loss = InterSampleContrastiveLoss("u", temperature=0.05, learnable=True).double()
    (param,) = loss.parameters()
    close(param.exp(), torch.tensor(20.0, dtype=torch.float64), rtol=1e-6, atol=0)  # 1 / temperature (float32 init)
    x = raw(6, 4, seed=0)
    loss({"u": x, "groups": distinct(6)})["contrastive_u_loss"].backward()
    assert param.grad is not None and param.grad.abs().item() > 0

    with torch.no_grad():
        param.fill_(math.log(500.0))
    param.grad = None
    value = loss({"u": x, "groups": distinct(6)})["contrastive_u_loss"]
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
    out = ClipLoss(mask_false_negatives=False)({"image_embed": image, "text_embed": text, "logit_scale": logit_scale})
    assert set(out) == {"clip_loss"}
    expected = ref_clip(image, text, logit_scale)
    close(out["clip_loss"], expected)
    wrt = [image, text, logit_scale]
    for got, want in zip(grads(out["clip_loss"], wrt), grads(expected, wrt)):
        close(got, want)


# ---- false-negative masking and CLIP with partners ----------------------------------------------


@pytest.mark.parametrize("n,seed", [(2, 0), (4, 1), (6, 2)])
@pytest.mark.parametrize("learnable", [False, True])
def test_masked_contrastive_matches_reference(n, seed, learnable):
    x = raw(2 * n, 8, seed=60 + n)
    groups = shared_groups(2 * n, seed)
    loss = InterSampleContrastiveLoss("u", temperature=0.1, learnable=learnable).double()
    out = loss({"u": x, "groups": groups})["contrastive_u_loss"]
    scale = loss.logit_scale.exp() if learnable else 10.0
    expected = ref_contrastive_masked(x, scale, groups.tolist())
    close(out, expected)
    wrt = [x, loss.logit_scale] if learnable else [x]
    for got, want in zip(grads(out, wrt), grads(expected, wrt)):
        close(got, want)
    # The mask matters on this data, and switching it off gives plain Eq. 9 back.
    assert abs(out.item() - ref_contrastive(x, scale).item()) > 1e-3
    off = InterSampleContrastiveLoss("u", temperature=0.1, learnable=learnable, mask_false_negatives=False).double()
    off.load_state_dict(loss.state_dict())
    close(off({"u": x, "groups": groups})["contrastive_u_loss"], ref_contrastive(x, scale))


def test_masking_drops_exactly_the_copies_of_a_reused_partner_and_same_image_captions():
    """Records (A, B), (C, B), (D, E), (F, G) with D and F two captions of one photo.

    Row A: C and G are negatives; B's second copy (its positive again) is not, nor is A itself.
    Row D: E (partner) positive; F (same photo) and G (F's partner: linked) not negatives.
    """
    # layout [anchors A C D F ; partners B B E G]; ids: A0 C1 D/F 2 B3 E4 G5
    groups = torch.tensor([0, 1, 2, 2, 3, 3, 4, 5])
    x = raw(8, 6, seed=3)
    scale = 1 / 0.07
    got = InterSampleContrastiveLoss("u", temperature=0.07)({"u": x, "groups": groups})["contrastive_u_loss"]
    s = lambda i, k: torch.exp(scale * cos(x[i], x[k]))  # noqa: E731
    A, C, D, F, B1, B2, E, G = range(8)
    rows = {
        A: (B1, [B1, C, D, F, E, G]), C: (B2, [B2, A, D, F, E, G]),
        D: (E, [E, A, C, B1, B2]), F: (G, [G, A, C, B1, B2]),
        B1: (A, [A, D, F, E, G]), B2: (C, [C, D, F, E, G]),  # B's copies: A and C both its positives
        E: (D, [D, A, C, B1, B2, G]), G: (F, [F, A, C, B1, B2, E]),
    }
    # Row B1 keeps A (its partner) but drops C: C's partner is B2, a copy of B1 (linked).
    expected = sum(-torch.log(s(i, p) / sum(s(i, k) for k in kept)) for i, (p, kept) in rows.items()) / 8
    close(got, expected)
    close(expected, ref_contrastive_masked(x, scale, groups.tolist()))


@pytest.mark.parametrize("partners", [False, True])
@pytest.mark.parametrize("n,seed", [(1, 0), (3, 1), (5, 2)])
def test_masked_clip_matches_reference(partners, n, seed):
    image, text = unit(2 * n, 8, seed=70 + n), unit(2 * n, 8, seed=80 + n)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    groups = shared_groups(2 * n, seed) if n > 1 else distinct(2)
    f = {"image_embed": image, "text_embed": text, "logit_scale": logit_scale, "groups": groups}
    out = ClipLoss(partners=partners)(f)["clip_loss"]
    expected = ref_clip_masked(image, text, logit_scale, groups.tolist(), partners)
    close(out, expected)
    wrt = [image, text, logit_scale]
    for got, want in zip(grads(out, wrt), grads(expected, wrt)):
        close(got, want)
    if n > 1:  # the mask and the partners both change the number
        assert abs(out.item() - ref_clip(image, text, logit_scale).item()) > 1e-3
    # Distinct images, no partners: exactly plain CLIP (open_clip's loss).
    plain = ClipLoss()({**f, "groups": distinct(2 * n)})["clip_loss"]
    close(plain, ref_clip(image, text, logit_scale))


def test_clip_partners_is_a_second_positive_not_a_negative():
    """Captions that match their partner's image better than their own: the partner-positive loss
    is lower than plain CLIP's, which counts the partner as a negative."""
    n = 2
    image = unit(2 * n, 8, seed=5).detach()
    text = image[[*range(n, 2 * n), *range(n)]].clone()  # text i == image of i's partner
    text = (text + 0.3 * unit(2 * n, 8, seed=6).detach()).requires_grad_()
    logit_scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    f = {"image_embed": image, "text_embed": F.normalize(text, dim=-1), "logit_scale": logit_scale,
         "groups": distinct(2 * n)}
    with_partners = ClipLoss(partners=True)(f)["clip_loss"]
    plain = ClipLoss()(f)["clip_loss"]
    assert with_partners.item() < plain.item() - 0.5


def features(n: int, seed: int = 0) -> dict:
    return {
        "u": raw(2 * n, 8, seed), "v": raw(2 * n, 8, seed + 1), "u_neg": raw(2 * n, 8, seed + 2),
        "image_embed": unit(2 * n, 6, seed + 3), "text_embed": unit(2 * n, 6, seed + 4),
        "logit_scale": torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True),
        "groups": distinct(2 * n),
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
                                     "logit_scale": f["logit_scale"], "groups": f["groups"]})) == {"clip_loss"}
    assert len(list(SAClipLoss(LossConfig(learnable_temperature=True)).parameters())) == 2

    # The SA-CLIP terms see directions only: a feature norm other than 1 changes nothing.
    halved = {**f, **{k: f[k] / math.sqrt(2) for k in ("u", "v", "u_neg")}}
    for key, value in SAClipLoss(cfg)(halved).items():
        close(value, out[key])

    # The config switches reach every contrastive term.
    shared = {**f, "groups": shared_groups(6, 3)}
    masked = SAClipLoss(LossConfig(clip=True, clip_partners=True, temperature=0.1))(shared)
    close(masked["contrastive_u_loss"], ref_contrastive_masked(f["u"], 10.0, shared["groups"].tolist()))
    close(masked["contrastive_v_loss"], ref_contrastive_masked(f["v"], 10.0, shared["groups"].tolist()))
    close(masked["clip_loss"], ref_clip_masked(f["image_embed"], f["text_embed"], f["logit_scale"],
                                               shared["groups"].tolist(), partners=True))
    unmasked = SAClipLoss(LossConfig(clip=True, temperature=0.1, mask_false_negatives=False))(
        {k: v for k, v in shared.items() if k != "groups"})  # off: no groups needed
    close(unmasked["contrastive_u_loss"], ref_contrastive(f["u"], 10.0))
    close(unmasked["clip_loss"], ref_clip(f["image_embed"], f["text_embed"], f["logit_scale"]))


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
    with pytest.raises(KeyError, match="needs the batch's 'groups'.*mask_false_negatives=false"):
        InterSampleContrastiveLoss()({"u": unit(4, 4, 0)})
    with pytest.raises(ValueError, match=r"'groups' must be \(4,\) integer ids"):
        InterSampleContrastiveLoss()({"u": unit(4, 4, 0), "groups": torch.zeros(4)})
    with pytest.raises(ConfigError, match="clip_partners=true .* set loss.clip=true"):
        LossConfig(clip_partners=True)
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
PARITY_VARIANTS = {"masked": {}, "partners": {"clip_partners": True}, "unmasked": {"mask_false_negatives": False}}
# Image ids per rank, layout [anchors; partners]: the pair of images (1, 2) on both ranks (another
# caption of each, or one record read twice), and on rank 1 a pair whose partner shows its own
# image 4 (the positive stays a positive).
GROUPS = torch.tensor([[1, 10, 11, 2, 12, 13], [14, 4, 1, 15, 4, 2]])


class FeatureModel(nn.Module):
    """A stand-in for SA-CLIP: linear maps from random inputs to the named features."""

    def __init__(self):
        super().__init__()
        self.text, self.image = nn.Linear(IN_DIM, 8), nn.Linear(IN_DIM, 8)
        self.text_proj, self.image_proj = nn.Linear(IN_DIM, 6), nn.Linear(IN_DIM, 6)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, batch, groups):
        caption, negative, image = batch.unbind(1)  # (2n, IN_DIM) each
        return {  # u, u_neg, v left unnormalised: the SA-CLIP terms normalise them
            "groups": groups,
            "u": self.text(caption),
            "u_neg": self.text(negative),
            "v": self.image(image),
            "text_embed": F.normalize(self.text_proj(caption), dim=-1),
            "image_embed": F.normalize(self.image_proj(image), dim=-1),
            "logit_scale": self.logit_scale,
        }


def build(variant: str, seed: int = 0):
    """Model, loss and per-rank batches, identical in every process (shared seed)."""
    torch.manual_seed(seed)
    cfg = LossConfig(**PARITY_CFG, **PARITY_VARIANTS[variant])
    model, loss = FeatureModel().double(), SAClipLoss(cfg).double()
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
        for variant in PARITY_VARIANTS:
            model, loss_fn, batches = build(variant)
            terms = loss_fn(model(batches[rank], GROUPS[rank]))
            sum(terms.values()).backward()
            # What DDP does: average gradients (model and loss parameters) and, for logging, losses.
            gradients = named_grads(model, loss_fn)
            for tensor in [*gradients.values(), *terms.values()]:
                tensor = tensor.detach()
                dist.all_reduce(tensor)
                tensor /= WORLD
            result[variant] = {"terms": {k: v.detach() for k, v in terms.items()}, "grads": gradients}

        # Unequal batches: rank 1 drops a pair; every rank must raise (not hang).
        local, groups = batches[rank], GROUPS[rank]
        if rank == 1:
            keep = [*range(PAIRS - 1), *range(PAIRS, 2 * PAIRS - 1)]
            local, groups = local[keep], groups[keep]
        try:
            loss_fn(model(local, groups))
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
    # every sample keeps its partner and its image id, only the order of samples differs (the
    # losses and their masks ignore it).
    single_groups = torch.cat([GROUPS[:, :PAIRS].reshape(-1), GROUPS[:, PAIRS:].reshape(-1)])
    expected = {}
    for variant in PARITY_VARIANTS:
        model, loss_fn, batches = build(variant)
        anchors, partners = batches[:, :PAIRS], batches[:, PAIRS:]
        single = torch.cat([anchors.reshape(-1, 3, IN_DIM), partners.reshape(-1, 3, IN_DIM)])
        terms = loss_fn(model(single, single_groups))
        sum(terms.values()).backward()
        expected[variant] = {"terms": {k: v.detach() for k, v in terms.items()}, "grads": named_grads(model, loss_fn)}
    # The ids do reach the losses: masking changes the contrastive and CLIP terms.
    for key in ("contrastive_u_loss", "contrastive_v_loss", "clip_loss"):
        assert abs(expected["masked"]["terms"][key] - expected["unmasked"]["terms"][key]) > 1e-4, key
    assert abs(expected["partners"]["terms"]["clip_loss"] - expected["masked"]["terms"]["clip_loss"]) > 1e-4

    for res in results:  # after the all-reduce both ranks hold the same numbers
        for variant, want in expected.items():
            got = res[variant]
            assert set(got["terms"]) == set(want["terms"]) == {"contrastive_u_loss", "contrastive_v_loss",
                                                              "triplet_loss", "clip_loss"}
            for key in want["terms"]:
                close(got["terms"][key], want["terms"][key], DIST_RTOL, DIST_ATOL)
            assert set(got["grads"]) == set(want["grads"])
            for name, grad in want["grads"].items():
                assert grad.abs().max() > 0, name
                close(got["grads"][name], grad, DIST_RTOL, DIST_ATOL)
        assert "same number of pairs per batch" in res["unequal_error"] and "[6, 4]" in res["unequal_error"]


# ---- the shards carry what the mask needs --------------------------------------------------------


def test_image_keys_travel_from_manifest_to_batch_groups(tmp_path):
    """Two captions of one photo share a group; an explicit image_key wins over the image path;
    a side-car without image_key (older shards) groups by sample id."""
    import webdataset as wds

    from conftest import make_image, sample_line, write_manifest
    from sapretrain.data.batch import collate_records, group_id
    from sapretrain.shards.schema import validate_record
    from sapretrain.shards.writer import ShardConfig, make_shards

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        make_image(images / f"{i}.jpg", seed=i)
    lines = [sample_line(0, "images/0.jpg", 2), sample_line(1, "images/0.jpg", 3),  # one photo, two captions
             sample_line(2, "images/1.jpg", 0), sample_line(3, "images/2.jpg", 1)]
    lines[3]["image_key"] = 139  # e.g. a COCO image id
    manifest = write_manifest(tmp_path / "manifest.jsonl", lines)
    make_shards(str(manifest), str(tmp_path / "shards"), ShardConfig(image_size=64, roi_size=64), progress=False)

    records = list(wds.WebDataset(str(tmp_path / "shards" / "shard-000000.tar"), shardshuffle=False).decode("pil"))
    assert [r["__key__"] for r in records] == ["s0000", "s0001"]  # (0, 2) and (1, 3): mutual pairs merged
    keys = {r["json"][m]["id"]: r["json"][m]["image_key"] for r in records for m in ("a", "p")}
    assert keys["s0000"] == keys["s0001"] and keys["s0000"].startswith("image-")
    assert "images/" not in keys["s0000"]  # a hash, not the path
    assert keys["s0003"] == "139" and len(set(keys.values())) == 3
    for r in records:
        validate_record(r["__key__"], r["json"])

    batch = collate_records(records, lambda image: torch.zeros(3, 8, 8))
    # layout [anchors s0000 s0001; partners s0002 s0003]
    groups = batch["groups"].tolist()
    assert batch["groups"].dtype == torch.int64
    assert groups[0] == groups[1] == group_id(keys["s0000"]) and len(set(groups)) == 3

    # Through the model to the losses: the shared photo changes every contrastive term.
    from sapretrain.data.batch import build_preprocess
    from sapretrain.model.saclip import SAClipConfig, build_saclip

    torch.manual_seed(0)
    model = build_saclip(SAClipConfig(name="sa-tiny", pretrained=None))
    with torch.no_grad():
        out = model(collate_records(records, build_preprocess(model)))
    assert torch.equal(out["groups"], batch["groups"])
    masked = SAClipLoss(LossConfig(clip=True))(out)
    plain = SAClipLoss(LossConfig(clip=True, mask_false_negatives=False))(out)
    for key in ("contrastive_u_loss", "contrastive_v_loss", "clip_loss"):
        assert abs(masked[key].item() - plain[key].item()) > 1e-6, key
    torch.testing.assert_close(masked["triplet_loss"], plain["triplet_loss"])

    for r in records:  # shards written before image_key: the sample id is the group
        for m in ("a", "p"):
            del r["json"][m]["image_key"]
        validate_record(r["__key__"], r["json"])
    old = collate_records(records, lambda image: torch.zeros(3, 8, 8))["groups"].tolist()
    assert old == [group_id(i) for i in ("s0000", "s0001", "s0002", "s0003")]


def test_half_precision_logits_are_reduced_in_float32():
    """bf16 logits (autocast) lose nothing beyond their own rounding: the softmax runs in float32."""
    from sapretrain.losses import multi_positive_nce

    g = torch.Generator().manual_seed(0)
    logits = (20 * torch.randn(6, 12, generator=g)).to(torch.bfloat16)
    positives = torch.zeros(6, 12, dtype=torch.bool)
    positives[torch.arange(6), torch.arange(6) + 3] = True
    excluded = torch.zeros_like(positives)
    excluded[torch.arange(6), torch.arange(6)] = True
    got = multi_positive_nce(logits, positives, excluded)
    assert got.dtype == torch.float32
    want = F.cross_entropy(logits.double().masked_fill(excluded, float("-inf")), torch.arange(6) + 3)
    close(got.double(), want, rtol=1e-6, atol=1e-6)
