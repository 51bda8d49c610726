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
from sapretrain.distributed import gather_with_grad, world

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


class InterSampleContrastiveLoss(nn.Module):
    """Inter-sample contrastive loss within one modality (paper Eq. 9, NT-Xent as in SimCLR).

    For each of the ``2N`` samples of the global batch, its partner is the positive and the other
    ``2N - 2`` samples (all ranks) are the negatives; the sample itself is excluded::

        l_i = -log( exp(cos(x_i, x_p(i)) / tau) / sum_{k != i} exp(cos(x_i, x_k) / tau) )

    and the loss is the mean of ``l_i``. With ``N = 1`` the partner is the only other sample, so
    the loss is exactly 0.

    ``temperature`` is fixed, or with ``learnable=True`` becomes a parameter ``logit_scale``
    (log of ``1 / tau``, initialised to ``log(1 / temperature)``) that the trainer must put in the
    optimizer and average across ranks like any model parameter. Like CLIP's, the scale is capped
    at 100: the parameter is clamped in place before use (open_clip clamps CLIP's ``logit_scale``
    after each step; doing it here needs no trainer code). A clamp inside the graph would instead
    zero the gradient at the cap and freeze the temperature there for good.
    """

    def __init__(self, feature: str = "u", temperature: float = 0.07, learnable: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.feature = feature
        self.temperature = temperature
        self.learnable = learnable
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
        rank, _ = world()
        columns = gather_with_grad(x)  # (2N, D): rank r's block [anchors_r; partners_r] at r * 2n
        logits = self.scale() * (x @ columns.T)  # (2n, 2N)
        local = torch.arange(2 * n, device=x.device)
        own = rank * 2 * n + local  # global column of each local sample
        partner = rank * 2 * n + (local + n) % (2 * n)  # partners live in the same rank's block
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[local, own] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        return {f"contrastive_{self.feature}_loss": F.cross_entropy(logits, partner)}

    def extra_repr(self) -> str:
        return f"feature={self.feature!r}, temperature={self.temperature}, learnable={self.learnable}"


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

    ``logit_scale`` is the model's log-scale *parameter*; keep it capped at ln(100) the way
    open_clip does (clamp it in place after each optimizer step). Passing the ``exp()``-ed scale
    instead (what open_clip's ``forward`` returns) would train at ``exp(14.3)``: the first call
    checks for a value far above ln(100) and raises.
    """

    def __init__(self):
        super().__init__()
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
        rank, _ = world()
        all_image = gather_with_grad(image)  # (2N, E)
        all_text = gather_with_grad(text)  # (2N, E)
        targets = rank * image.shape[0] + torch.arange(image.shape[0], device=image.device)
        image_to_text = F.cross_entropy(scale * image @ all_text.T, targets)  # rows (2n, 2N)
        text_to_image = F.cross_entropy(scale * text @ all_image.T, targets)
        return {"clip_loss": (image_to_text + text_to_image) / 2}


@dataclass
class LossConfig:
    """Which loss terms train the model, and their weights.

    SA-CLIP (paper) = the defaults: contrastive on ``u`` and ``v`` plus triplet. The paper's
    Table 3 ablations map onto switches as follows:

    - "w/o triplet": ``triplet: false`` (here);
    - "w/o SVO branch" / "w/o ROI branch": *model* switches, not loss switches: the model drops
      ``r_svo`` from ``u`` (resp. ``r_roi`` from ``v``; ``SAClipConfig.use_svo`` / ``use_roi``)
      and the losses stay as they are;
    - "CLIP baseline": only ``clip: true`` (``contrastive_text``, ``contrastive_image`` and
      ``triplet`` false), i.e. plain CLIP fine-tuning on the same data.

    ``w_contrastive`` weights both contrastive terms. Terms are returned already weighted.
    """

    contrastive_text: bool = True  # Eq. 9 on u
    contrastive_image: bool = True  # Eq. 9 on v
    triplet: bool = True  # Eq. 10
    clip: bool = False  # plain CLIP InfoNCE on image_embed / text_embed
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
        if self.temperature <= 0:
            raise ConfigError(f"loss temperature must be > 0, got {self.temperature}")


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
                loss = InterSampleContrastiveLoss(feature, cfg.temperature, cfg.learnable_temperature)
                self._add(f"contrastive_{feature}", loss, cfg.w_contrastive)
        if cfg.triplet:
            self._add("triplet", TripletLoss(cfg.margin), cfg.w_triplet)
        if cfg.clip:
            self._add("clip", ClipLoss(), cfg.w_clip)

    def _add(self, name: str, loss: nn.Module, weight: float) -> None:
        self.terms[name] = loss
        self.weights[name] = weight

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        out = {}
        for name, loss in self.terms.items():
            for key, value in loss(features).items():
                out[key] = self.weights[name] * value
        return out
