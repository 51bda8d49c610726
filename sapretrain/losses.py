"""SA-CLIP losses (paper §2.3) and the plain CLIP loss, as ``nn.Module``s.

Every loss takes the model's feature dict and returns named ``*_loss`` scalars; the trainer sums
every ``*_loss`` key and logs each one.

Batch layout (contract with the model): a rank's batch of ``n`` pairs holds ``2n`` samples
``[anchors (n); partners (n)]``, so local sample ``i``'s positive partner is ``(i + n) % 2n``.
Feature names (first dim ``2n`` local samples, all L2-normalised by the model):

- ``u``: (2n, D) caption feature ``concat(pooled caption, r_svo)``
- ``v``: (2n, D) image feature ``concat(f_v(image), r_roi)``
- ``u_neg``: (2n, D) feature of the negative caption (inverse relation), built like ``u``
- ``image_embed`` / ``text_embed``: (2n, E) plain CLIP embeddings, for :class:`ClipLoss`
- ``logit_scale``: () the model's CLIP *log* scale, open_clip's ``CLIP.logit_scale`` parameter
  itself (``exp()`` is the scale), not the ``exp()``-ed value open_clip's ``forward`` returns
- ``groups``: (2n,) int64 image/group ids (``sapretrain.data.batch``; the model passes the
  batch's through), needed while ``mask_false_negatives`` is on

**False negatives** (``mask_false_negatives``, on by default). A global batch can hold the same
image more than once: the five COCO captions of one photo, a partner that serves several anchors
(two records ``(A, B)``, ``(C, B)``), a sample that is one record's anchor and another's partner.
Such a column is not a negative of the row, and pushing it away fights the positive. Masked out of
the denominator (supervised-contrastive style: the designated positive always stays):

- every column whose group equals the row's (the same image; the same sample; a reused copy);
- for the partner terms (Eq. 9, and CLIP with ``clip_partners``) also every column *linked* to
  the row: some sample of the row's group has a sample of the column's group as its partner in
  this batch. That covers a second copy of the row's partner and the partner of a second copy of
  the row, which are positives of the row, not negatives.

Shards without ``image_key`` group by sample id (see ``sapretrain.shards.schema.image_key_of``).

The SA-CLIP terms work on directions: they L2-normalise ``u``, ``v``, ``u_neg`` themselves
(cosine similarity, as SimCLR's NT-Xent). On the model's unit features, ablations included, this
changes nothing (same value; the gradient's radial part, which it removes, never reaches
parameters that can only produce unit vectors). It keeps temperature and margin meaningful for
any feature whose norm is not 1 (a model variant, a cached feature), instead of silently
rescaling them.

Losses that need the global batch use the local-loss form of :mod:`sapretrain.distributed`
(local rows against gathered columns, mean over local rows), so ``W`` ranks with ``n`` pairs each
equal one process with ``W * n`` pairs once DDP averages the gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sapretrain.config import ConfigError
from sapretrain.distributed import gather, gather_with_grad, world

# CLIP caps its learned logit scale at 100 (temperature 0.01).
MAX_LOGIT_SCALE = 100.0


def _feature(features: dict, name: str, loss: str) -> torch.Tensor:
    if name not in features:
        raise KeyError(f"{loss} needs the model feature {name!r}; the model returned {sorted(features)}")
    return features[name]


def _check_pairs(x: torch.Tensor, name: str) -> int:
    """Number of local pairs ``n`` of a (2n, D) feature."""
    if x.dim() != 2 or x.shape[0] % 2:
        raise ValueError(f"feature {name!r} must be (2 * pairs, dim) = [anchors; partners], got {tuple(x.shape)}")
    return x.shape[0] // 2


def _groups(features: dict, samples: int, loss: str) -> torch.Tensor:
    """The (2n,) integer image/group ids of the batch; a clear error when they are missing."""
    if "groups" not in features:
        raise KeyError(
            f"{loss} masks false negatives and needs the batch's 'groups' (image/group ids, "
            "sapretrain.data.batch collates them from the shards' image_key); pass them through the "
            "features, or set loss.mask_false_negatives=false"
        )
    groups = features["groups"]
    if groups.shape != (samples,) or groups.is_floating_point():
        raise ValueError(f"'groups' must be ({samples},) integer ids, got {tuple(groups.shape)} {groups.dtype}")
    return groups


def pair_columns(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Global columns of this rank's 2n samples and of their partners, each (2n,).

    Rank ``r``'s block ``[anchors_r; partners_r]`` sits at ``r * 2n`` in the gathered columns and a
    partner lives in the same block, ``n`` places on (mod 2n).
    """
    rank, _ = world()
    local = torch.arange(2 * n, device=device)
    return rank * 2 * n + local, rank * 2 * n + (local + n) % (2 * n)


def not_negatives(groups: torch.Tensor, n: int, links: bool) -> torch.Tensor:
    """(2n, 2N) bool: global columns that are no negative of each local row (module docs).

    ``groups`` (2n,) this rank's ids, layout [anchors; partners]. Same group always; with
    ``links`` also the columns whose group is the partner group of some sample of the row's group.
    """
    all_groups = gather(groups)  # (2N,) every rank's ids, rank order
    rank, _ = world()
    m = 2 * n
    rows = all_groups[rank * m : (rank + 1) * m]
    same = rows[:, None] == all_groups[None, :]  # (2n, 2N)
    if not links:
        return same
    # Compact ids below 2N, so a (group, group) pair has an exact code a * 2N + b (no device sync).
    _, ids = torch.unique(all_groups, return_inverse=True)  # (2N,)
    width = all_groups.shape[0]
    column = torch.arange(all_groups.shape[0], device=groups.device)
    partner = column - column % m + (column % m + n) % m  # (2N,) global partner of every column
    links_code = ids * width + ids[partner]  # (2N,) both directions: the layout pairs them up
    rows_ids = ids[rank * m : (rank + 1) * m]
    linked = torch.isin(rows_ids[:, None] * width + ids[None, :], links_code)  # (2n, 2N)
    return same | linked


def multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-mean_{p in P(i)} log softmax_{k not excluded}(logits_i)_p``.

    ``logits`` (R, C); ``positives`` (R, C) bool, at least one per row, never excluded;
    ``excluded`` (R, C) bool: columns left out of the row's denominator. With one positive per row
    this is ``F.cross_entropy`` over the kept columns; with several it is supervised contrastive
    learning's L_out form (Khosla et al. 2020): the log-probabilities of the positives are averaged,
    every positive also in the denominator.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):  # the softmax in float32, as F.cross_entropy under autocast
        logits = logits.float()
    logits = logits.masked_fill(excluded & ~positives, float("-inf"))
    log_prob = F.log_softmax(logits, dim=1)  # (R, C)
    # where, not multiply: log_prob is -inf at excluded columns, and 0 * -inf is nan.
    picked = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)  # (R,)
    return -(picked / positives.sum(dim=1)).mean()


class InterSampleContrastiveLoss(nn.Module):
    """Inter-sample contrastive loss within one modality (paper Eq. 9, NT-Xent as in SimCLR).

    For each of the ``2N`` samples of the global batch, its partner is the positive and the other
    ``2N - 2`` samples (all ranks) are the negatives; the sample itself is excluded::

        l_i = -log( exp(cos(x_i, x_p(i)) / tau) / sum_{k in K(i)} exp(cos(x_i, x_k) / tau) )

    and the loss is the mean of ``l_i``. ``K(i)`` is every sample but ``i``; with
    ``mask_false_negatives`` also without the same-image and linked columns of the module docs
    (``p(i)`` always stays). With ``N = 1`` the partner is the only other sample, so the loss is
    exactly 0.

    ``temperature`` is fixed, or with ``learnable=True`` becomes a parameter ``logit_scale``
    (log of ``1 / tau``, initialised to ``log(1 / temperature)``) that the trainer must put in the
    optimizer and average across ranks like any model parameter. Like CLIP's, the scale is capped
    at 100: the parameter is clamped in place before use (open_clip clamps CLIP's ``logit_scale``
    after each step; doing it here needs no trainer code). A clamp inside the graph would instead
    zero the gradient at the cap and freeze the temperature there for good.
    """

    def __init__(self, feature: str = "u", temperature: float = 0.07, learnable: bool = False,
                 mask_false_negatives: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.feature = feature
        self.temperature = temperature
        self.learnable = learnable
        self.mask_false_negatives = mask_false_negatives
        if learnable:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.logit_scale = None

    def scale(self) -> torch.Tensor | float:
        """The logit scale ``1 / tau``: a tensor with gradient when learnable, else a float."""
        if self.logit_scale is None:
            return 1.0 / self.temperature
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
        return self.logit_scale.exp()

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        x = _feature(features, self.feature, type(self).__name__)  # (2n, D) local samples
        n = _check_pairs(x, self.feature)
        x = F.normalize(x, dim=-1)
        columns = gather_with_grad(x)  # (2N, D): rank r's block [anchors_r; partners_r] at r * 2n
        logits = self.scale() * (x @ columns.T)  # (2n, 2N)
        own, partner = pair_columns(n, x.device)
        local = torch.arange(2 * n, device=x.device)
        positives = torch.zeros_like(logits, dtype=torch.bool)
        positives[local, partner] = True
        excluded = torch.zeros_like(positives)
        excluded[local, own] = True
        if self.mask_false_negatives:
            excluded |= not_negatives(_groups(features, 2 * n, type(self).__name__), n, links=True)
        return {f"contrastive_{self.feature}_loss": multi_positive_nce(logits, positives, excluded)}

    def extra_repr(self) -> str:
        return (f"feature={self.feature!r}, temperature={self.temperature}, learnable={self.learnable}, "
                f"mask_false_negatives={self.mask_false_negatives}")


class TripletLoss(nn.Module):
    """Triplet loss between image and captions (paper Eq. 10), on L2-normalised features::

        max(0, ||v - u||^2 - ||v - u_neg||^2 + margin)

    mean over the local samples. Purely local: every rank holds the same number of samples (the
    loader guarantees it; the contrastive terms' gather checks it), so the mean over ranks that
    DDP's gradient averaging takes is the mean over the global batch.
    """

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        name = type(self).__name__
        v = F.normalize(_feature(features, "v", name), dim=-1)  # (2n, D)
        u = F.normalize(_feature(features, "u", name), dim=-1)  # (2n, D)
        u_neg = F.normalize(_feature(features, "u_neg", name), dim=-1)  # (2n, D)
        positive = (v - u).pow(2).sum(dim=-1)  # (2n,)
        negative = (v - u_neg).pow(2).sum(dim=-1)  # (2n,)
        return {"triplet_loss": (positive - negative + self.margin).clamp(min=0).mean()}

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class ClipLoss(nn.Module):
    """Standard CLIP image-text InfoNCE, symmetric, over all 2N samples as 2N image-text pairs.

    Image ``i`` matches text ``i``; logits are ``logit_scale.exp() * image . text`` on the model's
    (normalised) embeddings, exactly as ``open_clip.ClipLoss``. The loss is the mean of the
    image->text and text->image cross-entropies, each a mean over the global batch. Local-loss
    form: local image rows against gathered texts, and local text rows against gathered images.

    ``partners=True`` (``loss.clip_partners``): the partner's caption is a second positive of an
    image, and the partner's image a second positive of a caption (sample ``i``'s partner is
    ``(i + n) mod 2n``, the batch layout), in the supervised-contrastive L_out form of
    :func:`multi_positive_nce`: ``l_i = -(log P(i -> i) + log P(i -> p(i))) / 2``, both positives
    in the denominator. This is the plain CLIP objective given the same pairs SA-CLIP learns from.

    ``mask_false_negatives``: texts (images) of the row's own group are left out of the denominator
    (another caption of the same photo is no negative); with ``partners`` the linked columns too
    (module docs). Without ``partners`` a partner is an ordinary negative, as in plain CLIP.

    ``logit_scale`` is the model's log-scale *parameter*; keep it capped at ln(100) the way
    open_clip does (clamp it in place after each optimizer step). Passing the ``exp()``-ed scale
    instead (what open_clip's ``forward`` returns) would train at ``exp(14.3)``: the first call
    checks for a value far above ln(100) and raises.
    """

    def __init__(self, partners: bool = False, mask_false_negatives: bool = True):
        super().__init__()
        self.partners = partners
        self.mask_false_negatives = mask_false_negatives
        self._checked_scale = False

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        name = type(self).__name__
        image = _feature(features, "image_embed", name)  # (2n, E)
        text = _feature(features, "text_embed", name)  # (2n, E)
        log_scale = _feature(features, "logit_scale", name)
        if not self._checked_scale:  # once: .item() is a device sync
            value = log_scale.detach().item()
            if value > math.log(MAX_LOGIT_SCALE) + 0.5:
                raise ValueError(
                    f"ClipLoss got logit_scale={value:.4g}, far above ln({MAX_LOGIT_SCALE:g}): it must be "
                    "the log of the scale (open_clip's CLIP.logit_scale parameter), not its exp()"
                )
            self._checked_scale = True
        scale = log_scale.exp()
        all_image = gather_with_grad(image)  # (2N, E)
        all_text = gather_with_grad(text)  # (2N, E)
        if not self.partners and not self.mask_false_negatives:  # plain CLIP: exactly open_clip's
            rank, _ = world()
            targets = rank * image.shape[0] + torch.arange(image.shape[0], device=image.device)
            image_to_text = F.cross_entropy(scale * image @ all_text.T, targets)  # rows (2n, 2N)
            text_to_image = F.cross_entropy(scale * text @ all_image.T, targets)
            return {"clip_loss": (image_to_text + text_to_image) / 2}
        # Sample relations are symmetric, so one (2n, 2N) mask serves both directions.
        n = _check_pairs(image, "image_embed")
        own, partner = pair_columns(n, image.device)
        local = torch.arange(2 * n, device=image.device)
        positives = torch.zeros(2 * n, all_text.shape[0], dtype=torch.bool, device=image.device)
        positives[local, own] = True
        if self.partners:
            positives[local, partner] = True
        excluded = torch.zeros_like(positives)
        if self.mask_false_negatives:
            excluded = not_negatives(_groups(features, 2 * n, name), n, links=self.partners)
        image_to_text = multi_positive_nce(scale * image @ all_text.T, positives, excluded)
        text_to_image = multi_positive_nce(scale * text @ all_image.T, positives, excluded)
        return {"clip_loss": (image_to_text + text_to_image) / 2}

    def extra_repr(self) -> str:
        return f"partners={self.partners}, mask_false_negatives={self.mask_false_negatives}"


@dataclass
class LossConfig:
    """Which loss terms train the model, and their weights.

    SA-CLIP (paper) = the defaults: contrastive on ``u`` and ``v`` plus triplet. The paper's
    Table 3 ablations map onto switches as follows (configs/ablation/, one file per row; the
    header of each names its row and command):

    - "w/o L_u" / "w/o L_v": ``contrastive_text: false`` / ``contrastive_image: false``
      (``no_lu.yaml``, ``no_lv.yaml``); "w/o triplet": ``triplet: false`` (``no_triplet.yaml``);
    - "w/o SVO branch" / "w/o ROI branch": *model* switches, not loss switches: the model drops
      ``r_svo`` from ``u`` (resp. ``r_roi`` from ``v``; ``SAClipConfig.use_svo`` / ``use_roi``)
      and the losses stay as they are (``no_svo.yaml``, ``no_roi.yaml``);
    - "CLIP baseline": only ``clip: true`` (``contrastive_text``, ``contrastive_image`` and
      ``triplet`` false), i.e. plain CLIP fine-tuning on the same data; ``clip_partners: true``
      adds the partner pairs as extra positives (``clip_partners.yaml``).

    ``mask_false_negatives`` leaves same-image (and, for the partner terms, linked) columns out
    of every contrastive denominator (module docs). ``w_contrastive`` weights both contrastive
    terms. Terms are returned already weighted.
    """

    contrastive_text: bool = True  # Eq. 9 on u
    contrastive_image: bool = True  # Eq. 9 on v
    triplet: bool = True  # Eq. 10
    clip: bool = False  # plain CLIP InfoNCE on image_embed / text_embed
    clip_partners: bool = False  # CLIP term: the partner's caption / image as a second positive
    mask_false_negatives: bool = True  # same-image (and linked) columns are no negatives
    temperature: float = 0.07  # tau of the contrastive terms (initial value when learnable)
    learnable_temperature: bool = False  # one learnable tau per contrastive term
    margin: float = 0.2  # alpha of the triplet loss
    w_contrastive: float = 1.0
    w_triplet: float = 1.0
    w_clip: float = 1.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not (self.contrastive_text or self.contrastive_image or self.triplet or self.clip):
            raise ConfigError(
                "the loss config enables no term: set at least one of contrastive_text, "
                "contrastive_image, triplet, clip to true"
            )
        if not self.temperature > 0 or not math.isfinite(self.temperature):  # NaN fails both
            raise ConfigError(f"loss.temperature={self.temperature!r}: must be a finite number > 0")
        for key in ("margin", "w_contrastive", "w_triplet", "w_clip"):
            value = getattr(self, key)
            if not value >= 0 or not math.isfinite(value):  # a negative weight or margin inverts its term
                raise ConfigError(f"loss.{key}={value!r}: must be a finite number >= 0")
        if self.clip_partners and not self.clip:
            raise ConfigError("loss.clip_partners=true changes the CLIP term, which is off: set loss.clip=true too")


class SAClipLoss(nn.Module):
    """The SA-CLIP objective: the enabled terms of :class:`LossConfig`, each weighted.

    Returns ``contrastive_u_loss``, ``contrastive_v_loss``, ``triplet_loss``, ``clip_loss`` (the
    enabled ones). With ``learnable_temperature`` this module has parameters: optimise them and
    average their gradients across ranks with the model's (e.g. wrap model and loss in one module
    before ``accelerator.prepare``).
    """

    def __init__(self, cfg: LossConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else LossConfig()
        cfg.validate()
        self.cfg = cfg
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for enabled, feature in [(cfg.contrastive_text, "u"), (cfg.contrastive_image, "v")]:
            if enabled:
                loss = InterSampleContrastiveLoss(feature, cfg.temperature, cfg.learnable_temperature,
                                                  cfg.mask_false_negatives)
                self._add(f"contrastive_{feature}", loss, cfg.w_contrastive)
        if cfg.triplet:
            self._add("triplet", TripletLoss(cfg.margin), cfg.w_triplet)
        if cfg.clip:
            self._add("clip", ClipLoss(cfg.clip_partners, cfg.mask_false_negatives), cfg.w_clip)

    def _add(self, name: str, loss: nn.Module, weight: float) -> None:
        self.terms[name] = loss
        self.weights[name] = weight

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        out = {}
        for name, loss in self.terms.items():
            for key, value in loss(features).items():
                out[key] = self.weights[name] * value
        return out
