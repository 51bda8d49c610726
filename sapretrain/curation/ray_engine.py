"""The Ray engine: the curation's steps as Ray Data pipelines on any Ray cluster.

    sapretrain curate --config configs/curation/coco.yaml --engine ray [--address auto] [--num-parts 64]

Needs the ``ray`` extra (``pip install 'sapretrain[ray]'``). The steps of ``curate.steps`` run in
order as Ray Data pipelines over a dataset of part numbers, each step a ``map_batches`` through
``curate.run_step``. Consecutive steps whose part ``I`` reads only part ``I`` of the step before
(collect → extract → samples → filter → ROIs → negatives → positives_embed) are one streaming
pipeline: a part goes on to the next step as soon as it is done, with no barrier between steps;
a step that needs every part of the one before (``Step.barrier``: positives_search after the
index, positives_write, shards) starts a new pipeline. Within a pipeline:

- on a cluster without GPUs every step runs as Ray tasks of one CPU. Ray reuses a CPU task's
  worker process, and the stages and their models (spaCy, the relation filter, the detector,
  MiniLM) are kept per process and per config, so each worker loads a model once, and a CPU is
  held only while a part runs. (Actors would each hold a CPU for the whole pipeline: on 2 CPUs
  an idle ROI actor left one CPU for every other step, and the parts went through one at a time.)
- on a cluster with GPUs the model steps (relation_filter, rois, positives_embed,
  positives_search, LLM negatives) run on autoscaling actor pools (``ActorPoolStrategy``), one
  GPU per actor, each actor building its stage and loading its model once and then taking part
  after part (Ray does not reuse a GPU task's worker, so tasks would reload the model each part);
- ``positives_index`` builds the run's one index once, in one task (a GPU when there is one), and
  saves it in the work folder, where every search part reads it.

The parts read the previous step's part files and write their own (``sapretrain.jobs``), in
``output_dir``, which must be storage every node sees (a shared file system or ``s3://``). Resume
is the parts' own: a finished part returns at once and a killed one continues at its last
committed chunk, so a re-run after a kill, a lost node or a failed task goes on where the run
stopped. Within a run, Ray Data's own defaults apply: a task lost with its worker or node is run
again and a lost actor restarted (no limit), while an exception raised by a step stops the run
(the re-run then continues). Parts default to twice the cluster's CPUs (at least 2).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from sapretrain.jobs import Parts

INDEX_RETRIES = 3  # the index task, lost with its node, is run again this often


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'sapretrain[ray]'") from None
    return ray


def _run_part(cfg, name: str, part: int, num_parts: int, stages: dict | None = None) -> str:
    from sapretrain.curation.curate import run_step

    summary = run_step(cfg, name, Parts(part, num_parts), progress=False, stages=stages)
    return json.dumps({k: summary.get(k) for k in ("stage", "records", "kept", "dropped", "examples", "already_done")})


def _part_batch(batch: dict, cfg, name: str, num_parts: int, stages: dict | None = None) -> dict:
    """Ray Data batch function: run step ``name`` for the parts named in ``batch`` (one row each);
    the rows keep what earlier steps of the pipeline added and gain this step's summary."""
    return {**batch, f"step:{name}": [_run_part(cfg, name, int(p), num_parts, stages) for p in batch["part"]]}


_WORKER_STAGES: dict[str, dict] = {}  # per worker process: config -> its stages and models
_WORKER_CONFIGS = 4  # configs whose stages a worker keeps (a long-lived cluster runs many curations)


def _task_batch(batch: dict, cfg, name: str, num_parts: int) -> dict:
    """``_part_batch`` for a task: the stages (and models) this worker process built for ``cfg``
    before are reused."""
    key = json.dumps(asdict(cfg), sort_keys=True, default=str)
    if key not in _WORKER_STAGES and len(_WORKER_STAGES) >= _WORKER_CONFIGS:
        _WORKER_STAGES.pop(next(iter(_WORKER_STAGES)))
    return _part_batch(batch, cfg, name, num_parts, _WORKER_STAGES.setdefault(key, {}))


class _PartActor:
    """Ray Data actor for model steps on GPUs: the stage (and its model) is built once per actor."""

    def __init__(self, cfg, name: str, num_parts: int):
        self.cfg, self.name, self.num_parts, self.stages = cfg, name, num_parts, {}

    def __call__(self, batch: dict) -> dict:
        return _part_batch(batch, self.cfg, self.name, self.num_parts, self.stages)


def default_parts(ray) -> int:
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def pipelines(all_steps, cpus: int, gpus: int = 0) -> list[list]:
    """The steps as consecutive groups: partitioned steps that stream (part ``I`` of a step reads
    only part ``I`` of the one before: ``jobs.part_segments``) form one pipeline; a step that needs
    every part of the one before (``barrier``) starts a new group, and a one-process step is a group
    of its own. With GPUs a pipeline holds at least one GPU actor per model step at once, plus a
    CPU for its tasks: a group that would need more GPUs or CPUs than the cluster has is split (else
    it would wait forever). Without GPUs every step is tasks, and nothing else splits a group."""
    room = min(cpus - 1, gpus) if gpus else len(all_steps)  # actors one pipeline can hold at once
    groups: list[list] = []
    for step in all_steps:
        group = groups[-1] if groups else []
        actors = sum(s.uses_model for s in group) + step.uses_model
        if step.partitioned and group and group[-1].partitioned and not step.barrier and actors <= room:
            group.append(step)
        else:
            groups.append([step])
    return groups


def run_pipeline(ray, cfg, group, num_parts: int) -> dict[str, list[dict[str, Any]]]:
    """Every part through the steps of ``group`` as one streaming Ray Data pipeline: part ``I``
    goes on to the next step as soon as it is done, while other parts are still in earlier steps.
    Returns each step's part summaries in part order."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items([{"part": i} for i in range(num_parts)], override_num_blocks=num_parts)
    for step in group:
        if step.uses_model and gpus:
            ds = ds.map_batches(_PartActor, fn_constructor_args=(cfg, step.name, num_parts), batch_size=1,
                                batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(num_parts, gpus))),
                                num_gpus=1, num_cpus=1)
        else:
            ds = ds.map_batches(_task_batch, fn_args=(cfg, step.name, num_parts), batch_size=1, batch_format="numpy",
                                compute=ray.data.TaskPoolStrategy(size=min(num_parts, cpus)), num_cpus=1)
    rows = sorted(ds.take_all(), key=lambda r: int(r["part"]))
    return {step.name: [json.loads(r[f"step:{step.name}"]) for r in rows] for step in group}


def _run_single(cfg, name: str) -> bool:
    from sapretrain.curation.curate import run_step

    run_step(cfg, name, Parts(), progress=False)
    return True


def run_on_ray(cfg, num_parts: int | None = None, address: str | None = None, log=print) -> None:
    """Run every step but the report on Ray (started here when not already, then stopped)."""
    from sapretrain.curation.curate import _stage_line, steps
    from sapretrain.curation.stage import merge_summaries

    ray = _ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        n = num_parts or default_parts(ray)
        log(f"ray: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {ray.cluster_resources().get('GPU', 0):.0f} GPUs; "
            f"{n} parts per step")
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        for group in pipelines(steps(cfg)[:-1], cpus, gpus):
            if group[0].partitioned:
                results = run_pipeline(ray, cfg, group, n)
                for step in group:
                    summaries = results[step.name]
                    if step.name != "positives_embed" and all(s.get("records") is not None for s in summaries):
                        log(_stage_line({**merge_summaries(summaries), "stage": step.stage}))
            else:  # positives_index: one task (a GPU for faiss when there is one)
                task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=INDEX_RETRIES)(_run_single)
                ray.get(task.remote(cfg, group[0].name))
    finally:
        if started:
            ray.shutdown()
