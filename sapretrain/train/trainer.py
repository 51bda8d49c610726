"""The SA-CLIP training loop (``launch/pretrain.py`` is its command line).

Sections, top to bottom: set-up (accelerator, model, loss, optimizer, schedule, distribution),
one training step (with feature-cached accumulation), checkpoints and resume, preemption, logging,
the loop.

Distribution is DDP, or FSDP2 when the accelerate config says ``distributed_type: FSDP``
(launch/accelerate/fsdp.yaml): ``shard_model`` shards the trainable model over the ranks and leaves
the locked tower (and the 0-dim logit scale, which FSDP cannot shard) whole on every rank;
checkpoints are then written per rank (sapretrain/train/checkpoint.py, sharded checkpoints).

On SIGUSR1 or SIGTERM every rank finishes its step, a checkpoint is written at one step all ranks
agree on, and the process exits with ``REQUEUE_EXIT_CODE`` (75); ``--resume auto`` continues
exactly there (``launch/slurm/pretrain.sbatch`` turns this into ``scontrol requeue``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from sapretrain import storage
from sapretrain.config import ConfigError, save_config
from sapretrain.data.loader import build_loader
from sapretrain.losses import LossConfig, SAClipLoss
from sapretrain.data.batch import batch_to, build_preprocess
from sapretrain.model import checkpoint as model_ckpt
from sapretrain.model.saclip import SAClip, build_saclip
from sapretrain.train import checkpoint as ckpt
from sapretrain.train import tracking
from sapretrain.train.config import TrainConfig
from sapretrain.train.validate import build_validation, describe


# ----- set-up


def check_world_size(cfg: TrainConfig, world_size: int) -> None:
    """What the config cannot know alone: each rank's share of the batch splits evenly into ranks
    and micro-batches. Checked before any set-up (it would fail only at the first step)."""
    pairs = cfg.data.batch_pairs
    if pairs % world_size or (pairs // world_size) % cfg.optim.accum_freq:
        raise ConfigError(
            f"data.batch_pairs={pairs} must be a multiple of the world size {world_size} times "
            f"optim.accum_freq={cfg.optim.accum_freq} (each rank splits its batch_pairs / world size pairs "
            f"into accum_freq equal micro-batches): use e.g. "
            f"data.batch_pairs={max(1, round(pairs / (world_size * cfg.optim.accum_freq))) * world_size * cfg.optim.accum_freq}"
        )


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    trackers = [t for t in cfg.run.trackers if t != "wandb" or _wandb_available()]
    if torch.cuda.is_available():
        # TF32 matmuls and convolutions for the fp32 parts of the step (the loss, the text tower
        # under run.precision=no); bf16 and fp16 autocast are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(
        mixed_precision=cfg.run.precision,
        log_with=trackers or None,
        project_dir=log_dir(cfg),
        # Every trainable parameter gets a gradient each step (see freeze_unused), so DDP needs
        # no unused-parameter search.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    check_distribution(cfg, accelerator)
    return accelerator


def check_distribution(cfg: TrainConfig, accelerator) -> None:
    """The distributed types this trainer implements: none, DDP, FSDP version 2 (ConfigError otherwise)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError(
            "distributed_type DEEPSPEED: not supported by this trainer (DeepSpeed's engine steps the optimizer inside "
            "backward, which the feature-cached accumulation, the loss module's own parameters and the trainer's "
            "checkpoints need to do themselves); use launch/accelerate/fsdp.yaml for sharded training")
    if kind != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ConfigError(f"fsdp_version {plugin.fsdp_version}: this trainer shards with FSDP2 (fully_shard); set "
                          "fsdp_version: 2 in the accelerate config (launch/accelerate/fsdp.yaml)")
    # shard_model shards the model itself; these two would act on it after that, or never.
    if getattr(plugin, "activation_checkpointing", False):
        raise ConfigError("fsdp_activation_checkpointing: true is not used by this trainer; set it to false "
                          "and use run.grad_checkpointing=true (open_clip's own, inside each block)")
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        raise ConfigError("fsdp_cpu_ram_efficient_loading: true is not used by this trainer (every rank builds "
                          "the model, then shard_model shards it); set it to false")
    if cfg.eval.every and cfg.eval.spatial_probe:
        raise ConfigError(
            f"eval.spatial_probe={cfg.eval.spatial_probe}: the probe runs the whole model on rank 0, which FSDP's "
            "sharded parameters do not allow; set eval.spatial_probe=0 (the other val/ numbers work under FSDP) "
            "and probe a consolidated checkpoint with tools/evaluate.py --task spatial")


def is_sharded(accelerator) -> bool:
    """FSDP: parameters, gradients and optimizer state sharded over the ranks (``shard_model``)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _wandb_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        print("run.trackers names wandb, which is not installed: logging without it")
        return False
    return True


def log_dir(cfg: TrainConfig) -> str:
    """Local directory for logs and metrics (checkpoints may live on object storage)."""
    out = cfg.run.output_dir.rstrip("/")
    return out if not storage.is_url(out) else os.path.join("runs", out.rsplit("/", 1)[-1])


def build_model(cfg: TrainConfig) -> SAClip:
    model = build_saclip(cfg.model)
    freeze_unused(model, cfg.loss)
    if cfg.run.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    return model


def freeze_unused(model: SAClip, loss) -> None:
    """Freeze every part no enabled loss term reads.

    A trainable parameter without a gradient makes DDP wait for it forever (or search for unused
    parameters every step), and it would only decay in AdamW. Which feature feeds which term:
    u (text tower + SVO head): contrastive_text, triplet; v (vision tower + ROI head):
    contrastive_image, triplet; text_embed, image_embed and CLIP's logit scale: clip.
    """
    text = loss.contrastive_text or loss.triplet or loss.clip
    vision = loss.contrastive_image or loss.triplet or loss.clip
    parts = {
        "svo_proj": loss.contrastive_text or loss.triplet,
        "box_embed": loss.contrastive_image or loss.triplet,
        "roi_proj": loss.contrastive_image or loss.triplet,
    }
    for name, module in model.named_children():
        if name in parts and module is not None and not parts[name]:
            module.requires_grad_(False)
    model.clip.logit_scale.requires_grad_(model.clip.logit_scale.requires_grad and loss.clip)
    for name, p in model.clip.named_parameters():
        is_vision = name.startswith("visual.")
        if name != "logit_scale" and not (vision if is_vision else text):
            p.requires_grad_(False)


def build_preprocess_or_check_features(cfg: TrainConfig, model: SAClip, log=print):
    """Pixels: the model's preprocessing. Feature shards (``data.features``): no preprocessing, and
    the shards must hold this model's own frozen-tower outputs (docs/features.md)."""
    if not cfg.data.features:
        return build_preprocess(model)
    from sapretrain.features import FeatureMismatch, check_features

    try:
        header = check_features(cfg.data.features, model, cfg.data.image_size)
    except (FeatureMismatch, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    log(f"data.features: training on cached vision features from {cfg.data.features} "
          f"({header['model']['name']}, pretrained {header['model']['pretrained']}); the vision tower is not run")
    return None


def build_optimizer(cfg: TrainConfig, model: SAClip, loss_fn: SAClipLoss,
                    unsharded: list[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """AdamW over the model's groups and the loss module's parameters. ``unsharded``: the
    trainable parameters ``shard_model`` left whole, in a group of their own (after sharding, a
    group would mix DTensors and plain tensors, which the fused and foreach kernels refuse)."""
    groups = model.param_groups(cfg.optim.weight_decay)
    if unsharded:
        ids = {id(p) for p in unsharded}
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        groups = [g for g in groups if g["params"]]
        groups.append({"name": "unsharded", "params": list(unsharded), "weight_decay": 0.0})
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"name": "loss", "params": loss_params, "weight_decay": 0.0})
    # One fused kernel per step on GPU, where accelerator.prepare moves the parameters; torch's
    # default per-parameter implementation on CPU.
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             fused=torch.cuda.is_available())


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def shard_model(accelerator, model: SAClip) -> list[torch.nn.Parameter]:
    """FSDP2 (``fully_shard``) over ``model`` in place, with the accelerate config's settings (mixed
    precision policy, CPU offload, ``reshard_after_forward``, ``fsdp_transformer_layer_cls_to_wrap``:
    each such block that holds trainable parameters is its own unit, the rest is the root unit).
    Returns the trainable parameters left whole (replicated): their gradients are averaged by
    ``sync_gradients``, as the loss module's are.

    Left out of the shards (``ignored_params``): every frozen parameter, so the locked vision tower
    is whole on every rank (it never changes and has no gradient or optimizer state: sharding it would
    only add an all-gather to each of its forwards, and with ``data.features`` it is never run),
    and the 0-dim ones (CLIP's logit scale), which ``fully_shard`` cannot shard. Done here rather
    than by Accelerate's ``prepare`` because Accelerate's ``ignored_modules`` takes whole modules
    and its auto-wrap would also wrap the frozen tower's blocks. Call before building the optimizer.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    model.to(accelerator.device)  # fully_shard moves only what it shards
    whole = [p for p in model.parameters() if not p.requires_grad or p.ndim == 0]
    ignored = set(whole)
    # Weights gathered in the run's precision, as Accelerate sets it; but gradients reduced in
    # float32 and the outputs left as computed (Accelerate's policy casts both to bf16), as under
    # DDP + autocast: the logit scale the loss reads stays float32.
    policy = plugin.mixed_precision_policy or MixedPrecisionPolicy()
    policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype,
                                  reduce_dtype=torch.float32 if policy.param_dtype is not None else None,
                                  cast_forward_inputs=policy.cast_forward_inputs)
    kwargs = {"mp_policy": policy, "offload_policy": plugin.cpu_offload, "ignored_params": ignored}
    names = set(plugin.transformer_cls_names_to_wrap or ["ResidualAttentionBlock"])
    blocks = [m for m in model.modules() if type(m).__name__ in names
              and any(p not in ignored for p in m.parameters())]
    for block in reversed(blocks):  # innermost first
        fully_shard(block, reshard_after_forward=plugin.reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)  # the root: the heads, embeddings, final norms
    # Wrapped: Accelerate's prepare must not resolve the block class again (a sharded block's class
    # is now FSDP<name>; with every block sharded it would find none and raise).
    plugin.auto_wrap_policy = None
    return [p for p in whole if p.requires_grad]


def distribute(cfg: TrainConfig, accelerator, model, optimizer):
    """Accelerate's ``prepare`` (DDP; under FSDP, the model ``shard_model`` already sharded), and
    ``torch.compile`` when ``run.compile``: the one place distribution is applied."""
    if not is_sharded(accelerator):
        if cfg.run.compile:
            model = torch.compile(model)
        return accelerator.prepare(model, optimizer)
    # Accelerate's FSDP2 prepare re-points the optimizer at the model's parameters by name; the
    # loss module's are not the model's: that group is set aside and put back as it was.
    aside = [g for g in optimizer.param_groups if g.get("name") == "loss"]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g.get("name") != "loss"]
    model, optimizer = accelerator.prepare(model, optimizer)
    optimizer.optimizer.param_groups.extend(aside)
    if cfg.run.compile:  # after sharding, as torchtitan orders them
        model = torch.compile(model)
    return model, optimizer


# ----- one step


def merge_microbatches(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Features of K micro-batches → one batch in the [anchors; partners] layout the losses expect."""
    if len(features) == 1:
        return features[0]
    merged = {}
    for key, value in features[0].items():
        if value.ndim == 0:  # logit scale: one per model, not per sample
            merged[key] = value
            continue
        halves = [f[key].chunk(2) for f in features]  # each (N_k, D), (N_k, D)
        merged[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return merged


def split_microbatches(batch: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """One batch of N pairs → k micro-batches of N/k pairs, each in [anchors; partners] layout."""
    if k == 1:
        return [batch]
    n = next(iter(batch.values())).shape[0] // 2
    if n % k:
        raise ValueError(f"{n} pairs per rank do not split into optim.accum_freq={k} equal micro-batches")
    m = n // k
    return [
        {key: torch.cat([v[j * m : (j + 1) * m], v[n + j * m : n + (j + 1) * m]]) for key, v in batch.items()}
        for j in range(k)
    ]


def model_inputs(batch: dict[str, torch.Tensor], loss: LossConfig) -> dict[str, torch.Tensor]:
    """The batch without the negative captions when no loss term reads them (only the triplet
    loss does): the CLIP baseline and "w/o triplet" runs then skip half the text tower's work."""
    if loss.triplet:
        return batch
    return {k: v for k, v in batch.items() if k not in ("neg_text", "neg_spans")}


def train_step(accelerator, model, loss_fn, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    """Forward/backward over one global batch given as micro-batches; returns the loss terms.

    With several micro-batches the contrastive batch stays the whole global batch (GradCache, as
    open_clip's ``accum_freq``): features of all micro-batches are computed without gradient,
    then each micro-batch is recomputed with gradient and the loss over all features (the others
    cached) is back-propagated. Summed over micro-batches this is exactly the gradient of the
    one-shot loss, except for parameters the loss reads directly (logit scales), whose full
    gradient arrives in every pass: those are divided by K afterwards.
    """
    k = len(micro_batches)
    if k == 1:
        with accelerator.autocast():
            terms = loss_fn(model(micro_batches[0]))
            total = sum(terms.values())
        accelerator.backward(total)
        return terms
    with torch.no_grad(), accelerator.autocast():
        cached = [model(mb) for mb in micro_batches]
    for j, mb in enumerate(micro_batches):
        # Gradients are all-reduced once, in the last pass.
        sync = contextlib.nullcontext() if j == k - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                live = model(mb)
                terms = loss_fn(merge_microbatches([live if i == j else cached[i] for i in range(k)]))
                total = sum(terms.values())
            accelerator.backward(total)
    for p in direct_parameters(accelerator.unwrap_model(model), loss_fn):
        if p.grad is not None:
            p.grad.div_(k)
    return terms


def optimizer_step(cfg: TrainConfig, accelerator, model, loss_fn, optimizer, scheduler, batch: dict,
                   step: int, finite: "FiniteCheck | None" = None) -> dict[str, torch.Tensor]:
    """Optimizer step ``step`` on one batch already on the device: forward/backward, clipping, the
    update and the logit-scale clamp. Returns the loss terms. ``finite`` records on the device
    whether the loss is finite (no host sync; read at log steps and before checkpoints, see
    :class:`FiniteCheck`); None: unchecked."""
    terms = train_step(accelerator, model, loss_fn,
                       split_microbatches(model_inputs(batch, cfg.loss), cfg.optim.accum_freq))
    sync_loss_gradients(accelerator, loss_fn)
    if is_sharded(accelerator):
        sync_gradients(accelerator, unsharded_parameters(accelerator.unwrap_model(model)))
    if finite is not None:
        finite.record(step, terms)
    if cfg.optim.grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    accelerator.unwrap_model(model).clamp_logit_scale()
    return terms


class FiniteCheck:
    """The first step whose loss is not finite, kept on the device.

    Testing the loss on the host every step (``if not torch.isfinite(loss)``) waits for the step to
    finish: one device sync per step. Here each step only updates two device tensors (the first bad
    step, and its loss terms, through ``torch.where``); :meth:`raise_if_bad` reads them at log steps,
    before every validation and checkpoint (a checkpoint never holds the non-finite weights that
    the steps after a bad loss produce) and at the end. All ranks call it at the same steps: the
    first bad step is agreed over ranks, so they all stop together.
    """

    NONE = torch.iinfo(torch.int64).max  # "no bad step yet"

    def __init__(self):
        self.names: list[str] = []
        self.first: torch.Tensor | None = None  # () int64: first bad step, or NONE
        self.terms: torch.Tensor | None = None  # (T,) float32: the loss terms at that step

    def record(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        values = torch.stack([v.detach().float() for v in terms.values()])  # (T,)
        if self.first is None:
            self.names = list(terms)
            self.first = torch.full((), self.NONE, dtype=torch.int64, device=values.device)
            self.terms = torch.zeros_like(values)
        new = ~torch.isfinite(values.sum()) & (self.first == self.NONE)
        self.first = torch.where(new, step, self.first)  # a Python scalar: no host-to-device copy
        self.terms = torch.where(new, values, self.terms)

    def raise_if_bad(self, accelerator, now: int) -> None:
        """One host read (and one tiny all-reduce with several ranks): FloatingPointError naming the
        first bad step and its loss terms."""
        if self.first is None:
            return
        first = self.first.clone()
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        step = int(first.item())
        if step == self.NONE:
            return
        if int(self.first.item()) == step:
            values = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names, self.terms.tolist()))
        else:
            values = "on another rank"
        raise FloatingPointError(
            f"non-finite loss at step {step}: {values} (seen at step {now}: the check runs at log steps and "
            f"before validations and checkpoints; no checkpoint was written from step {step} on). "
            "Lower optim.lr, check the data, or use run.precision=bf16 instead of fp16"
        )


def sync_loss_gradients(accelerator, loss_fn: SAClipLoss) -> None:
    """Average the loss module's own parameters' gradients over ranks (DDP and FSDP only wrap the model)."""
    sync_gradients(accelerator, list(loss_fn.parameters()))


def sync_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average these (whole, not sharded) parameters' gradients over ranks."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(accelerator.num_processes)


def unsharded_parameters(model: SAClip) -> list[torch.nn.Parameter]:
    """The trainable parameters ``shard_model`` leaves whole (plain tensors among the DTensors)."""
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def direct_parameters(model: SAClip, loss_fn: SAClipLoss) -> list[torch.nn.Parameter]:
    """Parameters the loss uses directly rather than through per-sample features."""
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    if model.clip.logit_scale.requires_grad:
        params.append(model.clip.logit_scale)
    return params


# ----- checkpoints


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data epoch in progress
    batch: int = 0  # batches of that epoch already consumed


def plain_model(accelerator, model) -> SAClip:
    """The SAClip inside DDP and ``torch.compile`` (FSDP2 shards in place: the module itself), so
    checkpoint keys are the model's own names (a compiled module's would start ``_orig_mod.``)."""
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    return getattr(net, "_orig_mod", net)  # DDP(compiled): unwrap_model stops at the compiled module


def save_checkpoint(cfg: TrainConfig, accelerator, model, loss_fn, optimizer, scheduler, pos: Position,
                    data_state: dict) -> str:
    url = ckpt.checkpoint_dir(cfg.run.output_dir, pos.step)
    accelerator.wait_for_everyone()
    # Per rank: RNG states and the loader's exact stream position (its skip counts are per rank;
    # a resume under another world size reads every rank's, see restore_data_position).
    rank_state = {"rng": ckpt.rng_state(), "data": data_state}
    ckpt.save_tensor_file(rank_state, f"{url}/rank-{accelerator.process_index}.pt")
    sharded = is_sharded(accelerator)
    if sharded:  # every rank its own shards: no rank gathers the whole model or optimizer
        net = plain_model(accelerator, model)
        excluded = [] if cfg.run.save_frozen else model_ckpt.frozen_keys(net)
        ckpt.save_sharded(sharded_state(accelerator, model, loss_fn, optimizer, excluded),
                          f"{url}/{ckpt.SHARDED_DIR}")
    if accelerator.is_main_process:
        if sharded:
            weights = {"format": ckpt.SHARDED_FORMAT, "model_excluded": excluded, "model_cfg": net.model_cfg}
        else:
            weights = {
                # model, model_excluded, model_cfg: frozen weights are rebuilt from pretrained / run.seed
                **model_ckpt.training_weights(plain_model(accelerator, model), include_frozen=cfg.run.save_frozen),
                "loss": loss_fn.state_dict(),
                "optimizer": optimizer.state_dict(),
            }
        state = {
            "position": asdict(pos),
            "world_size": accelerator.num_processes,
            **weights,
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
            "config": json.loads(json.dumps(asdict(cfg))),
        }
        ckpt.save_tensor_file(state, f"{url}/state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        storage.write_bytes_atomic(f"{url}/DONE", b"")
        ckpt.prune(cfg.run.output_dir, cfg.run.keep_checkpoints)
    accelerator.wait_for_everyone()
    return url


def _sharded_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def sharded_state(accelerator, model, loss_fn, optimizer, excluded: list[str]) -> dict[str, dict]:
    """``{"model", "loss", "optimizer"}`` as torch.distributed.checkpoint state dicts: each rank's
    shards (DTensors) under FSDP, whole tensors otherwise (a plain run resuming a sharded
    checkpoint). The model's keys are its state dict's without ``excluded`` (``training_weights``'
    keys). The optimizer's are flat and per parameter name (``state.model.<name>.exp_avg``,
    ``param_groups.model.<name>.lr``, ``loss.<name>`` for the loss module's), not per group
    index: they survive resharding and another grouping (FSDP's "unsharded" group)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    both = torch.nn.ModuleDict({"model": plain_model(accelerator, model), "loss": loss_fn})
    weights, optim = get_state_dict(both, getattr(optimizer, "optimizer", optimizer), options=_sharded_options())
    skip = {f"model.{k}" for k in excluded}
    return {
        "model": {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.") and k not in skip},
        "loss": {k.removeprefix("loss."): v for k, v in weights.items() if k.startswith("loss.")},
        "optimizer": optim,
    }


def load_sharded_state(url: str, state: dict, accelerator, model, loss_fn, optimizer) -> None:
    """A sharded checkpoint's weights and optimizer into the prepared model and optimizer (any
    world size, FSDP or not: torch.distributed.checkpoint reshards)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    target = sharded_state(accelerator, model, loss_fn, optimizer, list(state["model_excluded"]))
    ckpt.load_sharded(target, f"{url}/{ckpt.SHARDED_DIR}")
    weights = {**{f"model.{k}": v for k, v in target["model"].items()},
               **{f"loss.{k}": v for k, v in target["loss"].items()}}
    both = torch.nn.ModuleDict({"model": plain_model(accelerator, model), "loss": loss_fn})
    optim = getattr(optimizer, "optimizer", optimizer)
    # The saved groups' settings go to this optimizer's groups by parameter name; a run with other
    # groups (FSDP's "unsharded" one, in a plain run) keeps its own group names.
    names = [g.get("name") for g in optim.param_groups]
    # strict=False: the excluded (frozen) keys are rebuilt from pretrained / run.seed, as for state.pt
    set_state_dict(both, optim, model_state_dict=weights, optim_state_dict=target["optimizer"],
                   options=replace(_sharded_options(), strict=False))
    for group, name in zip(optim.param_groups, names):
        group["name"] = name


def read_checkpoint_state(url: str | None) -> dict | None:
    """A checkpoint's ``state.pt`` (None: no resume)."""
    return ckpt.load_tensor_file(f"{url}/state.pt") if url else None


def load_checkpoint(url: str, accelerator, model, loss_fn, optimizer, scheduler,
                    state: dict | None = None) -> tuple[Position, dict | None, int]:
    """Weights, optimizer, schedule, this rank's RNG; returns the position, this rank's data state
    (None when the checkpoint had fewer ranks than this run) and the checkpoint's world size.
    A full checkpoint loads before ``distribute``, a sharded one after it (into the shards);
    ``state``: its ``state.pt`` when already read."""
    state = state if state is not None else read_checkpoint_state(url)
    if ckpt.is_sharded(state):
        load_sharded_state(url, state, accelerator, model, loss_fn, optimizer)
    elif is_sharded(accelerator):
        raise SystemExit(f"{url}: a full (DDP) checkpoint; an FSDP run resumes only sharded checkpoints "
                         "(resume it under DDP, e.g. launch/accelerate/8gpu.yaml)")
    else:
        try:
            model_ckpt.load_training_weights(model, state, url)
        except model_ckpt.CheckpointError as e:
            raise SystemExit(f"{e} (it does not fit this run's model config)") from None
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # One base rate per group of this optimizer (a sharded checkpoint may come from a run with
    # another group count, see load_sharded_state; every group starts from optim.lr).
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    if accelerator.scaler is not None and state["scaler"]:
        accelerator.scaler.load_state_dict(state["scaler"])
    if accelerator.process_index >= state["world_size"]:
        return Position(**state["position"]), None, state["world_size"]  # a new rank: its seeded RNG stays
    rank_state = ckpt.load_tensor_file(f"{url}/rank-{accelerator.process_index}.pt")
    ckpt.set_rng_state(rank_state["rng"])
    return Position(**state["position"]), rank_state["data"], state["world_size"]


def restore_data_position(loader, url: str, own: dict | None, world_size: int, log=print) -> None:
    """Put ``loader`` where the checkpoint's data stream was. Same world size and workers: this
    rank's exact position. Otherwise (elastic, epoch mode) every rank's position is read and the
    records of the epoch not yet consumed are re-planned over this run's ranks (docs/loader.md)."""
    state = own if own is not None else ckpt.load_tensor_file(f"{url}/rank-0.pt")["data"]
    if not loader.needs_every_rank(state):
        if world_size != loader.world_size and loader.cfg.resampled:
            log(f"{url} was written by {world_size} processes, this run has {loader.world_size}; in resampled "
                "mode the data position is kept but the draws differ from an uninterrupted run")
        loader.load_state_dict(state)
        return
    every_rank = [own if r == loader.rank and own is not None else ckpt.load_tensor_file(f"{url}/rank-{r}.pt")["data"]
                  for r in range(world_size)]
    loader.load_state_dict(state, every_rank=every_rank)
    log(f"elastic resume: the data position of {world_size} process(es) x {state.get('readers', '?')} reader(s) "
        f"continues under {loader.world_size} x {loader.readers}; the records of epoch {loader.epoch} not yet "
        "consumed are re-planned over them")


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    if resume is None:
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(output_dir)  # None: a fresh start
    if not storage.exists(f"{resume.rstrip('/')}/DONE"):
        raise SystemExit(f"--resume {resume}: not a complete checkpoint directory (no DONE file)")
    return resume.rstrip("/")


# ----- preemption

# Exit status of a run stopped by a signal after its checkpoint (EX_TEMPFAIL, "try again"): the
# work is not done, run the same command again with --resume auto. Not a config field: launchers
# and batch scripts test for it (launch/slurm/pretrain.sbatch).
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """SIGUSR1 / SIGTERM → every rank stops after the same step.

    The handler only sets a flag (it may fire on some ranks only, or in different steps). Ranks
    agree through a MAX all-reduce of that flag: started without waiting (``async_op``) after every
    step and read after the next one, so the read waits for a collective that finished a step ago
    (on CUDA through a pinned copy and an event, so the host never waits for the step it has just
    queued): no per-step stall, one tiny collective per step. A signal during step s stops the run
    after step s + 1 on every rank (one process: after step s).
    """

    def __init__(self):
        self.signum: int | None = None
        self._read = None  # reads the result of the reduction started after the previous step
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        # Forked DataLoader workers inherit it; loader.py makes them ignore SIGUSR1 and gives
        # SIGTERM back its default action there.
        self.signum = signum

    def agreed(self, accelerator) -> bool:
        """Called by every rank once per step, at the same point: True on all ranks at the same step."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        stop = self._read() if self._read is not None else False
        self._read = self._start(accelerator.device)
        return stop

    def _start(self, device):
        flag = torch.tensor([int(self.signum is not None)], dtype=torch.int32, device=device)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        if flag.is_cuda:
            work.wait()  # the current stream waits for the collective, the host does not
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return lambda: (done.synchronize(), bool(host.item()))[1]
        return lambda: (work.wait(), bool(flag.item()))[1]


# ----- logging


class MetricsLog:
    """Console lines, trackers (TensorBoard/W&B via Accelerate) and ``metrics.jsonl`` on rank 0."""

    def __init__(self, cfg: TrainConfig, accelerator, start_step: int):
        self.accelerator = accelerator
        self.path = os.path.join(log_dir(cfg), "metrics.jsonl")
        self.steps = cfg.optim.steps
        if accelerator.is_main_process:
            os.makedirs(log_dir(cfg), exist_ok=True)
            self._truncate_after(start_step)

    def _truncate_after(self, step: int) -> None:
        """After a resume, drop lines of steps that will be trained again, and lines that do not
        parse (a torn last line from a short write on a full disk; said in one line)."""
        if not os.path.exists(self.path):
            return
        keep, torn = [], 0
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                    line_step = record["step"] if isinstance(record, dict) else None
                except (ValueError, KeyError):
                    line_step = None
                if not isinstance(line_step, int) or isinstance(line_step, bool):
                    torn += 1
                elif line_step <= step:
                    keep.append(raw if raw.endswith(b"\n") else raw + b"\n")
        if torn:
            print(f"{self.path}: dropped {torn} line(s) that do not parse (a torn write, e.g. on a full disk)",
                  flush=True)
        storage.write_bytes_atomic(self.path, b"".join(keep))

    def log(self, step: int, terms: dict[str, float], extra: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **terms, **extra}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({**terms, **extra}, step=step)
        loss_text = " ".join(f"{k.removesuffix('_loss')} {v:.4f}" for k, v in terms.items() if k != "loss")
        print(
            f"step {step}/{self.steps}  loss {terms['loss']:.4f} ({loss_text})  "
            f"{extra['pairs_per_s']:.1f} pairs/s  data {100 * extra['data_fraction']:.0f}%  lr {extra['lr']:.2e}",
            flush=True,
        )

    def log_validation(self, step: int, values: dict[str, float]) -> None:
        """A validation's ``val/`` numbers: a record of its own in ``metrics.jsonl``, the trackers, a line."""
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log(values, step=step)
        print(describe(step, self.steps, values), flush=True)


def start_tracking(cfg: TrainConfig, accelerator, start_step: int) -> "tracking.LogMirror | None":
    """Rank 0, before ``MetricsLog``: the run id (``run.json``), the remote log copy brought back on a
    fresh node, the trackers resuming the same run. Returns the mirror to copy the logs to (URL
    outputs), else None. See sapretrain/train/tracking.py."""
    if not accelerator.is_main_process:
        return None
    remote = tracking.remote_logs(cfg.run.output_dir)
    mirror = tracking.LogMirror(log_dir(cfg), remote) if remote else None
    if mirror is not None:
        mirror.restore(start_step)
    run = tracking.run_identity(cfg.run.output_dir)
    if cfg.run.trackers:
        accelerator.init_trackers("sapretrain", config=_flat(asdict(cfg)),
                                  init_kwargs=tracking.tracker_init_kwargs(run, start_step, log_dir(cfg)))
    return mirror


def flush_trackers(accelerator) -> None:
    """TensorBoard buffers its events (up to two minutes): written out before the logs are copied."""
    for tracker in accelerator.trackers:
        writer = getattr(tracker, "writer", None)
        if writer is not None:
            writer.flush()


def plot_training(cfg: TrainConfig, metrics: str) -> str | None:
    """``training.png`` next to ``metrics.jsonl`` (None: nothing to draw yet)."""
    if not os.path.exists(metrics):
        return None
    from sapretrain.train.plots import plot_metrics

    png = plot_metrics(metrics, os.path.join(log_dir(cfg), "training.png"))
    return str(png) if png else None


# ----- the loop


def train(cfg: TrainConfig, resume: str | None = None) -> Position:
    """Train to ``cfg.optim.steps``; on SIGUSR1/SIGTERM checkpoint and ``SystemExit(REQUEUE_EXIT_CODE)``."""
    with StopRequest() as stop:  # installed first: a signal during set-up stops after the first step
        pos, stopped = _train(cfg, resume, stop)
    if stopped:
        raise SystemExit(REQUEUE_EXIT_CODE)
    return pos


def _train(cfg: TrainConfig, resume: str | None, stop: StopRequest) -> tuple[Position, bool]:
    accelerator = build_accelerator(cfg)
    check_world_size(cfg, accelerator.num_processes)
    from accelerate.utils import set_seed

    set_seed(cfg.run.seed)  # same initial weights on every rank
    model = build_model(cfg)
    loss_fn = SAClipLoss(cfg.loss)
    preprocess = build_preprocess_or_check_features(cfg, model, accelerator.print)
    context_length = model.clip.context_length
    unsharded = shard_model(accelerator, model) if is_sharded(accelerator) else []
    optimizer = build_optimizer(cfg, model, loss_fn, unsharded)
    scheduler = warmup_cosine(optimizer, cfg.optim.warmup_steps, cfg.optim.steps)

    if accelerator.is_main_process:
        os.makedirs(log_dir(cfg), exist_ok=True)
        save_config(cfg, f"{cfg.run.output_dir.rstrip('/')}/config.yaml")
    resume_url = resolve_resume(resume, cfg.run.output_dir)
    saved = read_checkpoint_state(resume_url)  # None: a fresh start
    pos, data_state, saved_world = Position(), None, accelerator.num_processes
    if saved is not None and not ckpt.is_sharded(saved):  # a full state.pt: into the plain model
        pos, data_state, saved_world = load_checkpoint(resume_url, accelerator, model, loss_fn, optimizer,
                                                       scheduler, saved)
        saved = None
    model, optimizer = distribute(cfg, accelerator, model, optimizer)
    loss_fn.to(accelerator.device)
    if saved is not None:  # a sharded checkpoint: into the prepared model and optimizer
        pos, data_state, saved_world = load_checkpoint(resume_url, accelerator, model, loss_fn, optimizer,
                                                       scheduler, saved)
    if resume_url:
        accelerator.print(f"resumed from {resume_url} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")
    validation = build_validation(cfg, accelerator.unwrap_model(model), accelerator, accelerator.print)  # None: off
    mirror = start_tracking(cfg, accelerator, pos.step)  # None: the logs are in run.output_dir itself
    metrics = MetricsLog(cfg, accelerator, pos.step)
    finite = FiniteCheck()

    model.train()
    stopped = False
    window = {"start": time.perf_counter(), "data": 0.0, "pairs": 0}
    loader = build_loader(
        cfg.data, preprocess, accelerator.process_index, accelerator.num_processes,
        epoch=pos.epoch, start_batch=pos.batch, context_length=context_length,
    )
    if resume_url:
        restore_data_position(loader, resume_url, data_state, saved_world, accelerator.print)
    while pos.step < cfg.optim.steps:
        fetch_start = time.perf_counter()
        yielded = 0
        for batch in batches_or_stop(loader, pos):  # one epoch (or forever, resampled); iterating again continues
            window["data"] += time.perf_counter() - fetch_start
            batch = batch_to(batch, accelerator.device)
            terms = optimizer_step(cfg, accelerator, model, loss_fn, optimizer, scheduler, batch, pos.step + 1, finite)
            yielded += 1
            pos.step += 1
            pos.epoch, pos.batch = loader.epoch, loader.batch
            window["pairs"] += batch["text"].shape[0] // 2 * accelerator.num_processes

            if pos.step % cfg.run.log_every == 0 or pos.step == cfg.optim.steps:
                finite.raise_if_bad(accelerator, pos.step)
                reduced = {k: accelerator.reduce(v.detach().float(), "mean").item() for k, v in terms.items()}
                reduced["loss"] = sum(reduced.values())
                elapsed = time.perf_counter() - window["start"]
                metrics.log(pos.step, reduced, {
                    "lr": scheduler.get_last_lr()[0],
                    "pairs_per_s": window["pairs"] / elapsed,
                    "data_fraction": window["data"] / elapsed,
                })
                window = {"start": time.perf_counter(), "data": 0.0, "pairs": 0}
            stopped = stop.agreed(accelerator) and pos.step < cfg.optim.steps
            # Before the checkpoint: a run resumed from it never validates this step again. Not
            # when stopping: the grace period before the kill is for the checkpoint.
            if validation is not None and validation.due(pos.step) and not stopped:
                finite.raise_if_bad(accelerator, pos.step)
                values = validation.run(model, loss_fn)
                metrics.log_validation(pos.step, values)
                window["start"] += values["val/seconds"]  # pairs/s counts training time only
            if pos.step % cfg.run.checkpoint_every == 0 or pos.step == cfg.optim.steps or stopped:
                finite.raise_if_bad(accelerator, pos.step)  # a checkpoint never holds non-finite weights
                url = save_checkpoint(cfg, accelerator, model, loss_fn, optimizer, scheduler, pos, loader.state_dict())
                if mirror is not None:
                    flush_trackers(accelerator)
                    plot_training(cfg, metrics.path)
                    mirror.sync()
            if stopped:
                by = signal.Signals(stop.signum).name if stop.signum else "a signal to another rank"
                accelerator.print(f"stopped by {by} after step {pos.step}: checkpoint {url}; exit status "
                                  f"{REQUEUE_EXIT_CODE} (run again with --resume auto)", flush=True)
            if pos.step >= cfg.optim.steps or stopped:
                break
            fetch_start = time.perf_counter()
        if yielded == 0:
            raise SystemExit(f"epoch {loader.epoch} yielded no batch: data.batch_pairs is larger than the dataset")
        if stopped:
            break
    finite.raise_if_bad(accelerator, pos.step)
    accelerator.end_training()
    if accelerator.is_main_process:
        png = plot_training(cfg, metrics.path)
        if png:
            print(f"training curves: {png}")
        if mirror is not None and mirror.sync():
            print(f"logs copied to {mirror.remote}")
    return pos, stopped


def batches_or_stop(loader, pos: Position):
    """The loader's batches. When the shard storage stays unreachable for the whole
    ``data.storage_retry_seconds``, the run stops (exit status 1) rather than skip data; the
    checkpoints written so far are complete, and ``--resume auto`` continues with exactly the
    batches a run without the outage would have seen."""
    try:
        yield from loader
    except storage.StorageUnavailable as e:
        raise SystemExit(
            f"training stopped after step {pos.step}: {e}. No data was skipped. Once the storage is "
            "reachable, rerun with --resume auto to continue exactly from the latest checkpoint "
            "(data.storage_retry_seconds sets how long an outage is waited out)."
        ) from None


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → flat scalar dict (TensorBoard's hparams take scalars only)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
