#!/usr/bin/env python
"""GPU training throughput: our trainer's step (live frozen tower and feature cache, torch.compile
on and off) beside open_clip_train's own training step, same GPU, same data, same model, one run.

    python bench/gpu.py --json gpu.json                    # ViT-B-32, random init, locked tower, bf16, 512 pairs, one GPU
    python bench/gpu.py --configs open_clip,live,cached    # eager only (no compile time)
    python bench/gpu.py --device cpu --tiny                # sa-tiny, 4 pairs, a few steps: ~30 s on 2 cores (what the test runs)

Rows (``--configs``, in this order):

- ``open_clip`` / ``open_clip+compile``: ``open_clip_train.train.train_one_epoch``, the training
  loop shipped in the open_clip_torch wheel, called directly (not ``open_clip_train.main``: its
  data path is a WebDataset/CSV pipeline with random-crop augmentation, and the point here is the
  step). Around it, what ``main`` would build for ``--model M --lock-image --precision amp_bf16
  [--torchcompile]``: the open_clip model (the very ``CLIP`` our SA-CLIP wraps, same config and
  seed, vision tower locked with ``lock_image_tower()``), ``open_clip.create_loss`` (plain CLIP
  ``ClipLoss``), AdamW with ``main``'s parameter groups, ``open_clip_train.scheduler.cosine_lr``;
  lr, betas, eps, weight decay, warm-up and gradient clipping are ours (``TrainConfig`` defaults),
  so the optimizer work is the same. Batch: 2N image-text samples.
- ``live`` / ``live+compile``: our trainer's step on pixel batches (``data.shards``): the frozen
  tower runs forward over 2N images + 4N ROI crops; the text tower forward and backward over 2N
  captions + 2N negative captions; SA-CLIP loss (contrastive on u and v, triplet). ``compile`` is
  ``run.compile=true``: ``torch.compile(model)`` before ``accelerator.prepare``, as the trainer.
- ``cached`` / ``cached+compile``: the same step on feature batches (``data.features``,
  docs/features.md): the tower is not run.

What is timed, per row: ``--warmup`` untimed steps (compilation, cuDNN/cuBLAS autotuning, first
allocations), then ``--steps`` timed steps, ``torch.cuda.synchronize()`` before and after each.
Ours: one step of ``sapretrain.train.trainer._train``'s loop (``trainer.optimizer_step`` on a batch
``batch_to`` put on the device: ``train_step``, the device-side finite-loss flag (``FiniteCheck.record``;
the trainer reads it on the host only at log steps), gradient clipping, optimizer and scheduler step,
``zero_grad``, logit-scale clamp) with the trainer's own builders (``build_accelerator``,
``build_model``, ``SAClipLoss``, ``build_optimizer``, ``warmup_cosine``). open_clip: the time
between consecutive batches handed to ``train_one_epoch`` (synchronised at each hand-out), i.e.
its whole loop body. The batches come from the project's loader (``build_loader``, the same
records for every row: open_clip gets the pixel batches' ``image`` and ``text``, 2N each),
``--batches`` of them are read once into (pinned) CPU memory before the rows and cycled, so the
host-to-device copy is in every step but JPEG decoding is not: the rows compare the GPU step. A
live run at this batch also needs its DataLoader workers to decode 6N JPEGs per step
(bench/loader.py measures the loader); feature mode needs none.

Counting: a sample is one image with its caption; N pairs = 2N samples on both sides (samples/s =
2N x steps / their summed time). Memory: ``torch.cuda.max_memory_allocated`` over the row's
warm-up and timed steps, reset after freeing the previous row (model, optimizer state, gradients,
activations, the batch on the device); on CPU the process's peak RSS sampled during the row
(process-wide: it includes the held batches and what the allocator kept from earlier rows).
``--json PATH`` writes every number (and each step's time) for a device run to bring back; it is
rewritten after every row, so a run cut short keeps what it measured. A row that fails (an
out-of-memory, a compile error) is reported as failed and the other rows still run; the exit
status is then 1.

Time on one GPU (an estimate: this has not yet run on one): data under a minute (scenes, shards
at 224 px, features cached by the tower on the GPU, 2 batches of each mode read), each eager row
~10 s, each compiled row its inductor compilation (a minute or two; the trimmed caption length
makes a second batch shape, so a recompilation too), under 8 minutes in all.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

PROJECT_ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ("open_clip", "open_clip+compile", "live", "live+compile", "cached", "cached+compile")
BASELINE = "open_clip"
LABELS = {
    "open_clip": "open_clip_train step (CLIP)",
    "live": "ours, live frozen tower",
    "cached": "ours, feature cache",
}
GPU_DEFAULTS = dict(model="ViT-B-32", pairs=512, records=1024, warmup=5, steps=20, batches=2)
TINY_DEFAULTS = dict(model="sa-tiny", pairs=4, records=8, warmup=2, steps=3, batches=2)


def label(name: str) -> str:
    kind, _, compiled = name.partition("+")
    return LABELS[kind] + (", compiled" if compiled else "")


# ----- data


def prepare(work: Path, records: int, size: int, workers: int) -> Path:
    """Synthetic scenes (2 per record: scenes 2k and 2k+1 are partners) → pixel shards at ``size``."""
    from sapretrain.scenes.synthetic import write_synthetic
    from sapretrain.shards.writer import ShardConfig, make_shards

    manifest = write_synthetic(work / "scenes", "train", 2 * records, workers=workers, progress=False)
    shards = work / "shards"
    cfg = ShardConfig(image_size=size, roi_size=size, shard_size=max(1, -(-records // 8)))
    report = make_shards(str(manifest), str(shards), cfg, workers=workers, progress=False)
    if report.summary["records"] != records:
        raise SystemExit(f"make_shards kept {report.summary['records']} of {records} records: {report.summary['skipped']}")
    return shards


def read_batches(cfg, preprocess, count: int, context_length: int, pin: bool) -> list[dict]:
    """The first ``count`` batches of the project's loader for ``cfg.data`` (held on the CPU).

    Read in this process (``data.workers`` 0): DataLoader workers would pass each 512-pair pixel
    batch (1.9 GB of float32) through /dev/shm, which containers often keep small."""
    from sapretrain.data.loader import build_loader

    loader = iter(build_loader(dataclasses.replace(cfg.data, workers=0), preprocess, 0, 1, context_length=context_length))
    batches = [next(loader) for _ in range(count)]
    del loader
    if pin:
        batches = [{k: v.pin_memory() if not v.is_pinned() else v for k, v in b.items()} for b in batches]
    return batches


# ----- the rows


def step_ours(accelerator, model, loss_fn, optimizer, scheduler, cfg, batch, step: int, finite) -> None:
    """One optimizer step of ``trainer._train``'s loop (``trainer.optimizer_step`` with its
    device-side finite-loss flag), without its logging and checkpoints."""
    from sapretrain.data.batch import batch_to
    from sapretrain.train.trainer import optimizer_step

    optimizer_step(cfg, accelerator, model, loss_fn, optimizer, scheduler, batch_to(batch, accelerator.device),
                   step, finite)


def run_ours(cfg, accelerator, batches: list[dict], compiled: bool, args, sync) -> list[float]:
    import torch

    from sapretrain.losses import SAClipLoss
    from sapretrain.train.trainer import FiniteCheck, build_model, build_optimizer, warmup_cosine

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    loss_fn = SAClipLoss(cfg.loss)
    optimizer = build_optimizer(cfg, model, loss_fn)
    scheduler = warmup_cosine(optimizer, cfg.optim.warmup_steps, cfg.optim.steps)
    if compiled:
        model = torch.compile(model, backend=args.compile_backend)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn.to(accelerator.device)
    model.train()
    finite = FiniteCheck()
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        step_ours(accelerator, model, loss_fn, optimizer, scheduler, cfg, batches[i % len(batches)], i + 1, finite)
        sync()
        times.append(time.perf_counter() - start)
    finite.raise_if_bad(accelerator, args.warmup + args.steps)  # a row on a diverged model is no number
    accelerator.free_memory()  # drops the accelerator's references to this row's model and optimizer
    return times


class TimedBatches:
    """The dataloader ``train_one_epoch`` iterates: cycles held batches and notes a synchronised
    time at each hand-out (and after the last step), so consecutive marks bracket one step."""

    def __init__(self, batches: list[tuple], count: int, sync):
        self.batches, self.count, self.sync = batches, count, sync
        self.num_batches = count
        self.num_samples = count * len(batches[0][0])
        self.marks: list[float] = []

    def __iter__(self):
        for i in range(self.count):
            self.sync()
            self.marks.append(time.perf_counter())
            yield self.batches[i % len(self.batches)]
        self.sync()
        self.marks.append(time.perf_counter())

    def __len__(self) -> int:
        return self.count


def openclip_args(cfg, args, device: str) -> SimpleNamespace:
    """``open_clip_train.params.parse_args`` for this run, with what ``main`` derives set by hand."""
    from open_clip_train.params import parse_args

    o = cfg.optim
    ns = parse_args([
        "--model", args.model, "--lock-image", "--precision", "amp_bf16" if args.precision == "bf16" else "fp32",
        "--batch-size", str(2 * args.pairs), "--lr", str(o.lr), "--wd", str(o.weight_decay),
        "--beta1", str(o.betas[0]), "--beta2", str(o.betas[1]), "--eps", str(o.eps),
        "--warmup", str(o.warmup_steps), "--log-every-n-steps", str(10**9), "--report-to", "",
        *(["--grad-clip-norm", str(o.grad_clip)] if o.grad_clip else []),
    ])
    ns.device, ns.rank, ns.local_rank, ns.world_size, ns.distributed = device, 0, 0, 1, False
    ns.wandb = ns.tensorboard = ns.distill = False
    return ns


def run_openclip(cfg, batches: list[dict], compiled: bool, args, sync, device: str) -> list[float]:
    import open_clip
    import torch
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from sapretrain.model.saclip import build_clip

    oc = openclip_args(cfg, args, device)
    torch.manual_seed(cfg.run.seed)
    model, _ = build_clip(cfg.model)  # the open_clip CLIP our SAClip wraps, same seed
    model.output_dict = True  # as main's create_model_and_transforms(..., output_dict=True)
    model.lock_image_tower(unlocked_groups=oc.lock_image_unlocked_groups, freeze_bn_stats=oc.lock_image_freeze_bn_stats)
    model = model.to(device)
    # open_clip_train.main's AdamW parameter groups
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": oc.wd}],
        lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)
    total = args.warmup + args.steps
    scheduler = cosine_lr(optimizer, oc.lr, oc.warmup, cfg.optim.steps)
    loss = open_clip.create_loss(oc)
    if compiled:
        model = torch.compile(model, backend=args.compile_backend)  # main's --torchcompile
    loader = TimedBatches([(b["image"], b["text"]) for b in batches], total, sync)
    data = {"train": SimpleNamespace(dataloader=loader, set_epoch=lambda epoch: None)}
    train_one_epoch(model, data, loss, 0, optimizer, None, scheduler, None, oc)
    return [b - a for a, b in zip(loader.marks, loader.marks[1:])]


# ----- memory


class PeakRSS:
    """The process's peak resident set size while inside the block, sampled every few ms (Linux)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def fresh_device(cuda: bool) -> None:
    """Forget the previous row: compiled graphs, freed tensors, the peak-memory counter."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----- report


def summarise(name: str, times: list[float], memory: int, args) -> dict:
    if len(times) != args.warmup + args.steps:
        raise SystemExit(f"{name}: {len(times)} step times, expected {args.warmup + args.steps}")
    timed = times[args.warmup:]
    samples = 2 * args.pairs
    return {
        "name": name, "label": label(name), "compile": "+compile" in name,
        "samples_per_s": samples * len(timed) / sum(timed),
        "median_samples_per_s": samples / statistics.median(timed),
        "ms_per_step": 1000 * sum(timed) / len(timed),
        "warmup_s": sum(times[:args.warmup]),
        "peak_memory_bytes": memory,
        "step_s": times,
    }


def add_ratios(rows: list[dict]) -> None:
    """Each row's rate over the eager open_clip row, and over open_clip with the same compile
    setting (None where that row is missing or failed)."""
    by_name = {r["name"]: r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        base, same = by_name.get(BASELINE), by_name.get(BASELINE + "+compile" if r["compile"] else BASELINE)
        r["ratio_vs_baseline"] = r["samples_per_s"] / base["samples_per_s"] if base else None
        r["ratio_vs_same_compile"] = r["samples_per_s"] / same["samples_per_s"] if same else None


def print_table(result: dict) -> None:
    mem = "peak GPU MiB" if result["memory"] == "cuda_max_memory_allocated" else "peak RSS MiB"
    n = result["pairs"]
    print(f"\ndevice: {result['device']} ({result['device_name']}); torch {result['torch']}, open_clip "
          f"{result['open_clip']}; compile backend {result['compile_backend']}")
    print(f"model {result['model']} (random init, vision tower locked), {result['precision']} autocast, {n} pairs "
          f"= {2 * n} samples per step (open_clip: batch {2 * n}); {result['warmup']} warm-up steps untimed, "
          f"{result['steps']} timed; {result['batches']} loader batches held and cycled")
    header = (f"{'configuration':<38} {'samples/s':>10} {'median':>9} {'ms/step':>8} {'x o_c':>6} "
              f"{'x o_c same compile':>18} {mem:>13} {'warm-up s':>9}")
    print(header + "\n" + "-" * len(header))
    ratio = lambda x: f"{x:.2f}x" if x is not None else "-"  # noqa: E731
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['label']:<38} FAILED: {r['error']}")
            continue
        print(f"{r['label']:<38} {r['samples_per_s']:>10.1f} {r['median_samples_per_s']:>9.1f} {r['ms_per_step']:>8.1f} "
              f"{ratio(r['ratio_vs_baseline']):>6} {ratio(r['ratio_vs_same_compile']):>18} "
              f"{r['peak_memory_bytes'] / 2**20:>13.0f} {r['warmup_s']:>9.1f}")
    base = next((r for r in result["rows"] if r["name"] == BASELINE and "error" not in r), None)
    if base:
        print(f"x o_c: samples/s over '{label(BASELINE)}' measured in this run ({base['samples_per_s']:.1f} samples/s)")
    print(f"total {result['total_s']:.0f} s (data {result['data_s']:.0f} s)")


# ----- main


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="sa-tiny at 64 px, few pairs and steps (CPU test)")
    parser.add_argument("--model", help=f"open_clip model name (default {GPU_DEFAULTS['model']}; --tiny: sa-tiny)")
    parser.add_argument("--pairs", type=int, help="SA-CLIP pairs per step; open_clip batch is 2x (default 512)")
    parser.add_argument("--records", type=int, help="records (pairs) in the synthetic shard set (default 1024)")
    parser.add_argument("--warmup", type=int, help="untimed first steps per configuration (default 5)")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 20)")
    parser.add_argument("--batches", type=int, help="distinct loader batches held and cycled (default 2)")
    parser.add_argument("--precision", choices=["bf16", "no"], default="bf16", help="autocast (ours run.precision)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list from {','.join(CONFIGS)}; "
                        f"must include {BASELINE}")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (the test uses aot_eager)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes writing the synthetic scenes and shards")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--work", help="keep the data here (default: a temporary directory)")
    args = parser.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown --configs {unknown}; known: {list(CONFIGS)}")
    if BASELINE not in args.configs:
        parser.error(f"--configs must include {BASELINE}: every ratio is against it")
    args.configs = [c for c in CONFIGS if c in args.configs]
    if args.warmup < 1 or args.steps < 1 or args.batches < 1 or args.pairs < 1:
        parser.error("--warmup, --steps, --batches and --pairs must be >= 1")
    if args.records < args.pairs:
        parser.error("--records must be at least --pairs (one batch)")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("root").setLevel(logging.ERROR)
    import open_clip
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if not cuda:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    from sapretrain.config import load_config
    from sapretrain.features import build_frozen_model, cache_features
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import build_accelerator, build_preprocess_or_check_features

    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-"))
    overrides = [
        f"model.name={args.model}", "model.pretrained=null", "model.lock_image=true",
        f"data.batch_pairs={args.pairs}", "data.shuffle_buffer=0",
        "data.resampled=true", f"run.precision={args.precision}", "run.trackers=[]",
        f"run.output_dir={work / 'run'}", f"optim.steps={args.warmup + args.steps}",
    ]
    base = load_config(TrainConfig, None, overrides)
    frozen = build_frozen_model(base.model, base.run.seed)  # the tower the trainer builds (same seed)
    size = frozen.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    shards = prepare(work, args.records, size, max(1, args.workers))
    features = work / "features"
    cache_features(str(shards), str(features), frozen, batch_size=256, device=device, progress=False)
    live_cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, shards=str(shards)))
    feat_cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, shards=str(shards), features=str(features)))
    context = frozen.clip.context_length
    batches = {
        "live": read_batches(live_cfg, build_preprocess_or_check_features(live_cfg, frozen), args.batches, context, cuda),
        "cached": read_batches(feat_cfg, build_preprocess_or_check_features(feat_cfg, frozen, lambda *a: None),
                               args.batches, context, cuda),
    }
    del frozen
    data_s = time.perf_counter() - started
    print(f"data: {args.records} records at {size} px, features cached, {args.batches} batches of each mode read "
          f"({data_s:.0f} s)", flush=True)

    accelerator = build_accelerator(live_cfg)
    result = {
        "device": device, "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "open_clip": open_clip.__version__, "compile_backend": args.compile_backend,
        "model": args.model, "precision": args.precision, "pairs": args.pairs, "samples_per_step": 2 * args.pairs,
        "records": args.records, "warmup": args.warmup, "steps": args.steps, "batches": args.batches,
        "memory": "cuda_max_memory_allocated" if cuda else "peak_rss_sampled",
        "threads": torch.get_num_threads(), "rows": [], "data_s": data_s, "complete": False,
    }
    for name in args.configs:
        kind, compiled = name.split("+")[0], name.endswith("+compile")
        fresh_device(cuda)
        t = time.perf_counter()
        try:  # a failing row (an OOM, a compile error) is reported; the other rows still run
            with PeakRSS() if not cuda else contextlib.nullcontext() as rss:
                if kind == "open_clip":
                    times = run_openclip(live_cfg, batches["live"], compiled, args, sync, device)
                else:
                    cfg = live_cfg if kind == "live" else feat_cfg
                    times = run_ours(cfg, accelerator, batches[kind], compiled, args, sync)
            memory = torch.cuda.max_memory_allocated() if cuda else rss.peak
            result["rows"].append(summarise(name, times, memory, args))
            print(f"{label(name)}: {result['rows'][-1]['samples_per_s']:.1f} samples/s "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            accelerator.free_memory()
            result["rows"].append({"name": name, "label": label(name), "compile": compiled,
                                   "error": f"{type(e).__name__}: {str(e)[:300]}"})
        add_ratios(result["rows"])
        result["total_s"] = time.perf_counter() - started
        if args.json:  # after every row: a run cut short still brings back what it measured
            Path(args.json).write_text(json.dumps(result, indent=1))
    result["complete"] = True
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"results: {args.json}")
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    failed = [r["name"] for r in result["rows"] if "error" in r]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    return result

if __name__ == "__main__":
    main()
