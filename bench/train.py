#!/usr/bin/env python
"""Training throughput on CPU: our trainer against open_clip's own training script, same model,
same data, same run.

    python bench/train.py                        # 2 rounds x 3 runs of 30 steps + a profile: ~3-4 min on 2 cores
    python bench/train.py --steps 60 --warmup 10 --repeats 3 --lean --work /tmp/bench-train   # keep data and logs

The runs, each its own subprocess (a fresh interpreter: clean timing):

- ``open_clip_train (CLIP)``: ``open_clip_train.main.main(argv)``, the trainer shipped in the
  open_clip_torch wheel, with ``sa-tiny`` registered in-process first. Plain CLIP loss, a batch of
  2N image-text pairs, ``--dataset-type webdataset`` on plain ``jpg``/``txt`` shards. One shim:
  webdataset 1.0.2 ends each shard with an empty marker that open_clip_train 3.3.0 cannot read
  (KeyError 'fname', open_clip issue #935); the worker passes ``eof_value=None`` as that issue says.
- ``ours, CLIP objective``: ``launch/pretrain.py --config configs/demo.yaml`` with the loss
  switches of ``configs/ablation/clip_baseline.yaml`` (``loss.clip=true``, the SA-CLIP terms off).
  The model is unchanged: it still encodes the ROI crops and negative captions, so this row differs
  from the next one by the objective only.
- ``ours, SA-CLIP objective``: ``launch/pretrain.py --config configs/demo.yaml`` (contrastive on u
  and v, triplet).
- with ``--lean``, ``ours, CLIP objective, no ROI/SVO heads``: also ``model.use_roi=false
  model.use_svo=false``, so the model skips the crops (it still encodes the negative captions, and
  the loader still decodes the crops).
- then a profile of SA-CLIP steps (torch.profiler, the trainer's builders, one real batch; mean of
  ``--profile-steps``): forward time per part is its scope, backward time per part that of the
  autograd nodes its forward ops created (matched by sequence number).

Same on every run: the model (``sa-tiny``, random init, trained from scratch, vision tower
included), fp32, one process, one DataLoader worker, ``OMP_NUM_THREADS=1`` in each subprocess's
environment (torch then runs one intra-op thread; DataLoader workers run one anyway), AdamW with
ours' settings (configs/demo.yaml: lr, betas, eps, weight decay, warm-up), gradient clipping at
ours' norm, no TensorBoard / W&B. The data: ``write_synthetic`` renders the scenes once;
``make_shards`` (image_size 64, roi_size 64) builds our shards; the open_clip shards hold, for each
of our records, its two images (the very same 64 px JPEG bytes, ``KEY.a.jpg`` and ``KEY.p.jpg``)
with their captions, as ``KEY_a.jpg``/``KEY_a.txt`` and ``KEY_p.jpg``/``KEY_p.txt``. Scenes 2k and
2k+1 are partners, so S scenes give S/2 records = S image-text samples on both sides; there are
enough for every run to stay within one epoch.

Counting. A sample is one image with its caption. An SA-CLIP pair is 2 samples (an anchor and its
positive partner), and each sample also carries 2 ROI crops (subject, object) and a negative
caption: a step of N pairs puts 2N images + 4N crops (6N inputs) through the vision tower and 4N
captions through the text tower; open_clip at batch 2N puts 2N images and 2N captions through. The
default compares N = 16 pairs (32 samples) with open_clip's batch of 32; samples/s counts
image-text samples (2 per pair) on both sides.

Timing. Both trainers log every step; the first ``--warmup`` steps of each run are skipped
(process and worker start, shuffle buffer fill, first-touch allocations). Wall: samples / summed
step time over the other steps (and at the median step), from the trainers' own logs: ours
``metrics.jsonl`` (``pairs_per_s``, ``data_fraction`` of a one-step window), open_clip's
``out.log`` (samples/s and ``Data (t)`` of the step with ``--log-every-n-steps 1``); both time a
step from the end of the previous one to the end of its optimizer step, data wait included, the
end-of-run checkpoint outside. CPU: the training process's CPU time (``time.process_time()``,
marked at each step's log call by a hook in the subprocess) over the same steps; it leaves out the
DataLoader worker, which runs alongside, and it is far less affected than wall time by other jobs
on a shared machine. The runs go in ``--repeats`` interleaved rounds, and each row shows the round
with the best wall rate (all rounds' rates are listed). The data share is the time the training
process waited for the next batch.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"
CLIP_OBJECTIVE = ["loss.contrastive_text=false", "loss.contrastive_image=false", "loss.triplet=false", "loss.clip=true"]
NO_HEADS = ["model.use_roi=false", "model.use_svo=false"]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
            "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(PROJECT_ROOT)}


# ----- data


def prepare_data(work: Path, scenes: int) -> tuple[Path, Path]:
    """Scenes → our shards and the open_clip shards (4 each); reuses what ``work`` already holds."""
    from sapretrain.scenes.synthetic import write_synthetic
    from sapretrain.shards.writer import ShardConfig, make_shards

    manifest = write_synthetic(work / "scenes", "train", scenes, workers=2, progress=False)
    ours = work / "shards"
    cfg = ShardConfig(image_size=64, roi_size=64, shard_size=-(-scenes // 2 // 4))
    report = make_shards(str(manifest), str(ours), cfg, workers=2, progress=False)
    if report.summary["records"] != scenes // 2:
        raise SystemExit(f"make_shards kept {report.summary['records']} of {scenes // 2} records: "
                         f"{report.summary['skipped']}")
    return ours, openclip_shards(ours, work / "openclip")


def openclip_shards(ours: Path, out: Path) -> Path:
    """Our records → plain ``jpg``/``txt`` samples (anchor and partner image, their captions)."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for src in sorted(ours.glob("shard-*.tar")):
        records: dict[str, dict[str, bytes]] = {}
        with tarfile.open(src) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                records.setdefault(key, {})[ext] = tar.extractfile(member).read()
        dst = out / src.name
        with tarfile.open(dst, "w") as tar:
            for key, rec in records.items():
                meta = json.loads(rec["json"])
                for m in ("a", "p"):
                    _add(tar, f"{key}_{m}.jpg", rec[f"{m}.jpg"])
                    _add(tar, f"{key}_{m}.txt", meta[m]["caption"].encode("utf-8"))
        sizes[dst.name] = 2 * len(records)
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ----- runs


def run_child(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=PROJECT_ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); last lines of {log}:\n"
                 + "".join(log.read_text().splitlines(keepends=True)[-30:]))


def ours_overrides(shards: Path, pairs: int, steps: int, output_dir: Path) -> list[str]:
    return [
        f"data.shards={shards}", f"data.batch_pairs={pairs}", "data.workers=1", "data.image_size=64",
        f"optim.steps={steps}", f"run.output_dir={output_dir}", "run.log_every=1",
        f"run.checkpoint_every={steps}", "run.trackers=[]", "run.precision=no",
    ]


def run_ours(work: Path, shards: Path, args, name: str, extra: list[str]) -> dict:
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    marks = work / f"{name}.cpu.json"
    cmd = [sys.executable, __file__, "--worker", "ours", "--out", str(marks), "--",
           "--config", str(DEMO_CONFIG), *ours_overrides(shards, args.pairs, args.steps, out), *extra]
    run_child(cmd, work / f"{name}.log")
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        seconds = args.pairs / m["pairs_per_s"]  # log_every=1: one step per window
        steps.append((m["step"], seconds, m["data_fraction"] * seconds))
    return summarise(steps, json.loads(marks.read_text()), args)


OPENCLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): [\d.]+, ([\d.e+]+)/s")


def run_openclip(work: Path, shards: Path, args) -> dict:
    from sapretrain.config import load_config
    from sapretrain.train.config import TrainConfig

    logs = work / "runs"
    shutil.rmtree(logs / "open_clip", ignore_errors=True)
    names = sorted(p.name for p in shards.glob("shard-*.tar"))
    urls = f"{shards}/shard-{{{names[0][6:12]}..{names[-1][6:12]}}}.tar"
    batch = 2 * args.pairs
    optim = load_config(TrainConfig, DEMO_CONFIG).optim  # the same optimizer settings as ours
    argv = [
        "--model", "sa-tiny", "--train-data", urls, "--dataset-type", "webdataset",
        "--train-num-samples", str(args.steps * batch), "--batch-size", str(batch), "--epochs", "1",
        "--workers", "1", "--precision", "fp32", "--device", "cpu", "--lr", str(optim.lr),
        "--wd", str(optim.weight_decay), "--warmup", str(optim.warmup_steps), "--beta1", str(optim.betas[0]),
        "--beta2", str(optim.betas[1]), "--eps", str(optim.eps), "--grad-clip-norm", str(optim.grad_clip),
        "--logs", str(logs), "--name", "open_clip", "--log-every-n-steps", "1", "--seed", "0", "--report-to", "",
    ]
    marks = work / "open_clip.cpu.json"
    run_child([sys.executable, __file__, "--worker", "open_clip", "--out", str(marks), "--", *argv],
              work / "open_clip.log")
    steps = []
    for line in (logs / "open_clip" / "out.log").read_text().splitlines():
        if (m := OPENCLIP_LINE.search(line)) is not None:
            seconds = batch / float(m.group(3))  # samples/s of this step (6 significant digits)
            steps.append((int(m.group(1)) // batch, seconds, float(m.group(2))))
    return summarise(steps, json.loads(marks.read_text()), args)


def summarise(steps: list[tuple[int, float, float]], cpu_marks: list[float], args) -> dict:
    """(step, seconds, data seconds) per step and the main process's CPU time at each step's log
    → steady-state rates after the warm-up steps."""
    if [s for s, _, _ in steps] != list(range(1, args.steps + 1)) or len(cpu_marks) != args.steps:
        sys.exit(f"expected one log line per step 1..{args.steps}, got steps {[s for s, _, _ in steps]}")
    steady = steps[args.warmup:]
    total = sum(t for _, t, _ in steady)
    cpu = cpu_marks[-1] - cpu_marks[args.warmup - 1]  # CPU seconds of the steady steps
    samples = 2 * args.pairs
    return {
        "samples_per_s": samples * len(steady) / total,
        "samples_per_cpu_s": samples * len(steady) / cpu,
        "cpu_ms_per_step": 1000 * cpu / len(steady),
        "median_samples_per_s": samples / statistics.median(t for _, t, _ in steady),
        "ms_per_step": 1000 * total / len(steady),
        "data_fraction": sum(d for _, _, d in steady) / total,
    }


def run_profile(work: Path, shards: Path, args) -> dict:
    out = work / "profile.json"
    cmd = [sys.executable, __file__, "--worker", "profile", "--pairs", str(args.pairs),
           "--profile-steps", str(args.profile_steps), "--shards", str(shards), "--out", str(out)]
    run_child(cmd, work / "profile.log")
    return json.loads(out.read_text())


# ----- workers (run in the child processes)


def record_cpu_marks(out: str) -> list[float]:
    """A list the caller appends ``time.process_time()`` to at each step's log; saved at exit."""
    import atexit

    marks: list[float] = []
    atexit.register(lambda: Path(out).write_text(json.dumps(marks)))
    return marks


def ours_worker(argv: list[str], out: str) -> None:
    """``launch/pretrain.py`` main(argv), marking the CPU time at each ``MetricsLog.log`` call."""
    import runpy

    import torch

    from sapretrain.train import trainer

    marks = record_cpu_marks(out)
    log = trainer.MetricsLog.log

    def marked(self, *a, **kw):
        marks.append(time.process_time())
        return log(self, *a, **kw)

    trainer.MetricsLog.log = marked
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    sys.exit(runpy.run_path(str(PROJECT_ROOT / "launch" / "pretrain.py"))["main"](argv))


def openclip_worker(argv: list[str], out: str) -> None:
    import logging

    import open_clip_train.data
    import torch
    from open_clip_train.main import main

    from sapretrain.model.saclip import register_model_configs

    register_model_configs()
    marks = record_cpu_marks(out)

    class CpuMarks(logging.Handler):  # the CPU time at each per-step log line
        def emit(self, record):
            if record.getMessage().startswith("Train Epoch"):
                marks.append(time.process_time())

    logging.getLogger().addHandler(CpuMarks())
    # webdataset >= 0.2.96 (1.0.2 here) ends each shard with an empty {} marker that open_clip_train
    # 3.3.0's group_by_keys_nothrow cannot read (KeyError 'fname' at the first shard's end): the
    # fix from open_clip issue #935, no marker. DataLoader workers are forked and inherit it.
    open_clip_train.data.tar_file_expander = functools.partial(open_clip_train.data.tar_file_expander, eof_value=None)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    main(argv)


PARTS = {  # SAClip method → profile label
    "text_features": "text tower (2N captions + 2N negatives)",
    "svo_features": "SVO head",
    "vision_features": "vision tower (2N images + 4N ROI crops)",
    "roi_features": "ROI/box head",
}
FORWARD_REST, LOSS, BACKWARD_REST, OPTIMIZER = (
    "forward: rest (normalise, concat)", "loss (contrastive u, v + triplet)",
    "backward: grad accumulation, other", "optimizer (clip + AdamW + zero_grad)",
)


def profile_worker(args) -> None:
    """One SA-CLIP step (the trainer's builders, demo config, a real batch) under torch.profiler.

    Forward time per part is its scope; backward time per part is the time of the autograd nodes
    whose forward op ran in that scope (matched by the ops' sequence numbers).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from sapretrain.config import load_config
    from sapretrain.data.loader import build_loader
    from sapretrain.losses import SAClipLoss
    from sapretrain.data.batch import build_preprocess
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import build_model, build_optimizer

    cfg = load_config(TrainConfig, DEMO_CONFIG, ours_overrides(Path(args.shards), args.pairs, 1, Path(args.out).parent)
                      + ["data.workers=0"])
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    loss_fn = SAClipLoss(cfg.loss)
    optimizer = build_optimizer(cfg, model, loss_fn)
    loader = build_loader(cfg.data, build_preprocess(model), 0, 1, context_length=model.clip.context_length)
    batch = next(iter(loader))
    for method, label in PARTS.items():
        setattr(model, method, _scoped(getattr(model, method), label))
    model.train()

    def step():
        with record_function("forward"):
            features = model(batch)
        with record_function(LOSS):
            total = sum(loss_fn(features).values())
        with record_function("backward"):
            total.backward()
        with record_function(OPTIMIZER):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale()

    plain = []
    for i in range(3 + args.profile_steps):  # 3 warm-up steps, then the unprofiled step time
        start = time.perf_counter()
        step()
        if i >= 3:
            plain.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            step()
    parts = attribute(prof.events(), args.profile_steps)
    Path(args.out).write_text(json.dumps({"parts": parts, "step_ms": 1000 * statistics.median(plain),
                                          "threads": torch.get_num_threads()}))


def _scoped(fn, label: str):
    """``fn`` under a profiler scope named ``label``."""
    from torch.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with record_function(label):
            return fn(*a, **kw)
    return wrapper


def attribute(events, steps: int) -> dict[str, list[float]]:
    """Profiler events → {part: [forward ms, backward ms]} per step."""
    labels = set(PARTS.values()) | {"forward", LOSS}
    scope_ms: dict[str, float] = {}
    seq_part: dict[int, str] = {}
    backward_ms: dict[int, float] = {}
    for e in events:
        ms = e.time_range.elapsed_us() / 1000
        if e.name in labels | {"backward", OPTIMIZER}:
            scope_ms[e.name] = scope_ms.get(e.name, 0.0) + ms
            continue
        if e.name.startswith("autograd::engine::evaluate_function:"):
            backward_ms[e.sequence_nr] = backward_ms.get(e.sequence_nr, 0.0) + ms
            continue
        if e.sequence_nr < 0:
            continue
        parent = e.cpu_parent  # the innermost enclosing scope names the forward op's part
        while parent is not None and parent.name not in labels:
            parent = parent.cpu_parent
        if parent is not None:
            seq_part[e.sequence_nr] = FORWARD_REST if parent.name == "forward" else parent.name
    parts = {label: [scope_ms.get(label, 0.0), 0.0] for label in PARTS.values()}
    parts[FORWARD_REST] = [scope_ms["forward"] - sum(v[0] for v in parts.values()), 0.0]
    parts[LOSS] = [scope_ms[LOSS], 0.0]
    for seq, ms in backward_ms.items():
        if seq in seq_part:
            parts[seq_part[seq]][1] += ms
    parts[BACKWARD_REST] = [0.0, scope_ms["backward"] - sum(v[1] for v in parts.values())]
    parts[OPTIMIZER] = [scope_ms[OPTIMIZER], 0.0]
    return {k: [f / steps, b / steps] for k, (f, b) in parts.items()}


# ----- report


def report(results: dict[str, dict], profile: dict, args, seconds: float) -> None:
    n = args.pairs
    print(f"\nsa-tiny from scratch, fp32, CPU, 1 process, 1 DataLoader worker, OMP_NUM_THREADS=1; "
          f"{args.steps} steps, the first {args.warmup} skipped; best of {args.repeats} interleaved rounds")
    print(f"samples = image-text samples: open_clip batch {2 * n} pairs; ours {n} pairs = {2 * n} samples "
          f"(+ {4 * n} ROI crops, {2 * n} negative captions)")
    print("wall: samples/s (mean over the steady steps, and at the median step); CPU: main process CPU time "
          "(not slowed by other jobs on the machine)")
    base = results["open_clip_train (CLIP)"]
    header = (f"{'run':<40} {'samples/s':>9} {'median':>7} {'ms/step':>8} {'data %':>7} {'x o_c':>6}"
              f" {'CPU ms/step':>11} {'per CPU-s':>9} {'x o_c':>6}  samples/s of each round")
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(f"{name:<40} {r['samples_per_s']:>9.1f} {r['median_samples_per_s']:>7.1f} {r['ms_per_step']:>8.1f}"
              f" {100 * r['data_fraction']:>6.1f}% {r['samples_per_s'] / base['samples_per_s']:>5.2f}x"
              f" {r['cpu_ms_per_step']:>11.1f} {r['samples_per_cpu_s']:>9.1f}"
              f" {r['samples_per_cpu_s'] / base['samples_per_cpu_s']:>5.2f}x"
              f"  {' '.join(f'{v:.1f}' for v in r['all_samples_per_s'])}")
    sa, clip = results.get("ours, SA-CLIP objective"), results.get("ours, CLIP objective")
    if sa and clip:
        print(f"ours SA-CLIP / ours CLIP objective: {sa['samples_per_s'] / clip['samples_per_s']:.2f}x wall, "
              f"{sa['samples_per_cpu_s'] / clip['samples_per_cpu_s']:.2f}x CPU")

    parts = profile["parts"]
    total = sum(f + b for f, b in parts.values())
    print(f"\none SA-CLIP step of {n} pairs, torch.profiler, mean of {args.profile_steps} steps "
          f"({total:.0f} ms profiled; {profile['step_ms']:.0f} ms unprofiled median; threads {profile['threads']}):")
    header = f"{'part':<42} {'fwd ms':>7} {'bwd ms':>7} {'total':>7} {'share':>6}"
    print(header + "\n" + "-" * len(header))
    for name, (f, b) in parts.items():
        print(f"{name:<42} {f:>7.1f} {b:>7.1f} {f + b:>7.1f} {100 * (f + b) / total:>5.1f}%")
    if sa:
        # What the SA-CLIP model does beyond open_clip's work: 4N of the 6N vision-tower inputs (ROI
        # crops), 2N of the 4N captions (negatives) and the two heads; assumes cost linear in inputs.
        extra = (2 / 3 * sum(parts[PARTS["vision_features"]]) + 1 / 2 * sum(parts[PARTS["text_features"]])
                 + sum(parts[PARTS["svo_features"]]) + sum(parts[PARTS["roi_features"]])) / total
        ms = sa["cpu_ms_per_step"] * (1 - extra)
        print(f"estimate: ours at open_clip's model work = the SA-CLIP step less 2/3 of the vision tower, 1/2 of "
              f"the text tower and the heads ({100 * extra:.0f}% by profile share): {ms:.0f} CPU ms/step = "
              f"{2 * n * 1000 / ms / base['samples_per_cpu_s']:.2f}x open_clip per CPU-s (optimistic: cost is taken "
              f"as linear in the inputs, and smaller batches cost more per input)")
    print(f"\ntotal wall time {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=6, help="first steps left out of the rates")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all runs; the best of each is shown")
    parser.add_argument("--pairs", type=int, default=16, help="SA-CLIP pairs per step (open_clip batch: 2x)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--lean", action="store_true", help="add a run of ours without ROI/SVO heads")
    parser.add_argument("--work", help="data and logs here, kept and reused (default: a temporary directory)")
    parser.add_argument("--worker", choices=["open_clip", "ours", "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if args.worker == "open_clip":
        return openclip_worker(rest, args.out)
    if args.worker == "ours":
        return ours_worker(rest, args.out)
    if args.worker == "profile":
        return profile_worker(args)
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be in [1, --steps)")

    start = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        scenes = 2 * args.pairs * (args.steps + 1)  # one spare batch
        ours_shards, oc_shards = prepare_data(work / f"data-{scenes}", scenes)
        print(f"data: {scenes} scenes → {ours_shards} and {oc_shards} ({time.perf_counter() - start:.0f} s)",
              flush=True)
        runs = [("open_clip_train (CLIP)", lambda: run_openclip(work, oc_shards, args)),
                ("ours, CLIP objective", lambda: run_ours(work, ours_shards, args, "ours-clip", CLIP_OBJECTIVE)),
                ("ours, SA-CLIP objective", lambda: run_ours(work, ours_shards, args, "ours-saclip", []))]
        if args.lean:
            runs.append(("ours, CLIP objective, no ROI/SVO heads",
                         lambda: run_ours(work, ours_shards, args, "ours-clip-noheads", CLIP_OBJECTIVE + NO_HEADS)))
        rounds: dict[str, list[dict]] = {name: [] for name, _ in runs}
        for i in range(args.repeats):  # interleaved, so a busy spell on the machine hits every run alike
            for name, run in runs:
                t = time.perf_counter()
                rounds[name].append(run())
                print(f"round {i + 1}, {name}: {rounds[name][-1]['samples_per_s']:.1f} samples/s "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
        results = {}
        for name, rs in rounds.items():
            results[name] = max(rs, key=lambda r: r["samples_per_s"])
            results[name]["all_samples_per_s"] = [r["samples_per_s"] for r in rs]
        profile = run_profile(work, ours_shards, args)
        report(results, profile, args, time.perf_counter() - start)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
