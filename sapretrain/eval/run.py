"""Evaluation runs: models in, ``results.json`` + ``results.md`` + plots out (tools/evaluate.py).

Every task evaluates one or more models through the same code (``encode.load_model``); models are
given as ``SPEC`` or ``LABEL=SPEC``. With ``baseline`` naming one of them, the spatial probe adds a
verdict: each other model's gain in k-NN relation accuracy over the baseline, per modality,
against a target (``make demo``: SA-CLIP objective vs plain CLIP objective, +0.20).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

from sapretrain.eval import dota, shards, spatial, sugarcrepe, vsr
from sapretrain.eval.encode import Encoder, load_model, model_summary

VERDICT_TARGET = 0.20  # k-NN accuracy points the SA-CLIP objective should gain over plain CLIP


def parse_model_args(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["SA-CLIP=runs/demo/saclip", "openclip:ViT-B-32:openai"]`` → ``[(label, spec), ...]``."""
    models = []
    for item in items:
        label, sep, spec = item.partition("=")
        if not sep or label.startswith(("openclip:", "s3:", "gs:", "/", ".")):
            label, spec = item, item
        if not spec:
            raise ValueError(f"{item!r}: empty model spec")
        models.append((label, spec))
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    return models


def run_spatial(models: Sequence[tuple[str, str]], out_dir: str | Path, scenes: int = 800, k: int = 10,
                baseline: str | None = None, target: float = VERDICT_TARGET, workers: int = 1,
                device: str = "cpu", plot: bool = True, progress: bool = True) -> dict[str, Any]:
    """The spatial probe over ``models``; writes results.json, results.md and spatial_tsne.png."""
    labels = [label for label, _ in models]
    if baseline is not None and baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not one of the models {labels}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    probe = spatial.probe_set(scenes, workers=workers, progress=progress)
    embeddings, results = {}, {}
    for label, spec in models:
        model, _ = load_model(spec, device=device)
        embeddings[label] = spatial.embed(Encoder(model), probe)
        results[label] = {"spec": spec, **model_summary(model), **spatial.score(embeddings[label], probe.labels, k)}
    report: dict[str, Any] = {
        "task": "spatial",
        "probe": {"split": "eval", "scenes": scenes, "k": k, "chance": 1 / len(spatial.CONFIGURATIONS),
                  "relations": list(spatial.CONFIGURATIONS)},
        "models": results,
    }
    if baseline is not None:
        report["verdict"] = verdict(results, baseline, target)
    if plot:
        spatial.tsne_plot(embeddings, probe.labels, str(out / "spatial_tsne.png"))
        report["plots"] = ["spatial_tsne.png"]
    report["seconds"] = round(time.time() - started, 1)
    write_report(report, out, spatial_table(report))
    return report


def run_vsr(models: Sequence[tuple[str, str]], out_dir: str | Path, vsr_file: str, images_root: str,
            instances: str | None = None, detector_weights: str | None = None, rule: str = "contrast",
            dev_file: str | None = None, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """VSR accuracy of ``models`` over all rows of ``vsr_file``, beside the box-geometry baseline.

    Box modes: ``detector`` (a YOLO from ``detector_weights``: the headline) and ``gold`` (COCO
    ``instances``: secondary); every model and the baseline is scored in each mode given. Writes
    results.json, results.md and a predictions file per model and mode (every row, skipped ones
    with their reason); raises ``ValueError`` (after writing them) when a mode scored no row.
    """
    if instances is None and detector_weights is None:
        raise ValueError("VSR needs subject/object boxes: give detector weights and/or COCO instance annotations")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows, bad_lines = vsr.read_vsr(vsr_file)
    dev_rows = vsr.read_vsr(dev_file)[0] if dev_file else None
    sources = {}  # mode -> keyword arguments of the box source; the headline first
    if detector_weights:
        sources["detector"] = {"detector": vsr.YoloBoxes(detector_weights, device=device)}
    if instances:
        sources["gold"] = {"annotations": vsr.load_coco_annotations(instances)}
    nlp = vsr._default_nlp()
    results: dict[str, dict] = {}
    table: dict[str, dict] = {}
    tables = []

    def keep(label: str, mode: str, result: dict, extra: dict) -> None:
        predictions = result.pop("predictions")
        name = f"predictions-{_slug(label)}-{mode}.jsonl"
        (out / name).write_text("".join(json.dumps(p) + "\n" for p in predictions), encoding="utf-8")
        results.setdefault(label, {**extra, "modes": {}})["modes"][mode] = {**result, "predictions_file": name}
        table.setdefault(label, {})[mode] = result
        tables.append(f"## {label}, {mode} boxes\n\n{vsr.format_vsr_table(result)}")

    for label, spec in models:
        model, _ = load_model(spec, device=device)
        for mode, source in sources.items():
            result = vsr.evaluate_vsr(Encoder(model), rows, images_root, rule=rule, dev_rows=dev_rows,
                                      bad_lines=bad_lines, progress=progress, nlp=nlp, **source)
            keep(label, mode, result, {"spec": spec, **model_summary(model)})
    for mode, source in sources.items():
        result = vsr.evaluate_geometry(rows, images_root, dev_rows=dev_rows, bad_lines=bad_lines, nlp=nlp, **source)
        keep(vsr.GEOMETRY_LABEL, mode, result, {"spec": None, "baseline": True})
    headline = next(iter(sources))
    report = {"task": "vsr", "file": vsr_file, "rows": len(rows) + len(bad_lines),
              "bad_lines": dict(vsr.bad_line_counts(bad_lines)), "rule": rule, "headline_boxes": headline,
              "box_modes": list(sources), "models": results, "seconds": round(time.time() - started, 1)}
    header = (f"VSR {vsr_file}: {report['rows']} rows; accuracy over all rows (a row that cannot be scored "
              f"counts as wrong). Headline boxes: {headline}" + ("; gold COCO boxes secondary" if
                                                               headline != "gold" and "gold" in sources else "") + "\n\n")
    # Skips never depend on the model: a mode that scored nothing did so for every model.
    geometry = table[vsr.GEOMETRY_LABEL]
    empty = [mode for mode in sources if not any(table[label][mode]["scored"] for label in table)]
    report["empty_modes"] = empty
    warning = "".join(f"WARNING: no row could be scored with {mode} boxes (skipped {geometry[mode]['skipped']})\n\n"
                      for mode in empty)
    write_report(report, out, header + warning + vsr.format_vsr_summary(table) + "\n" + "\n\n".join(tables) + "\n")
    if len(empty) == len(sources):
        raise ValueError(f"VSR: no row of {vsr_file} could be scored ({report['rows']} rows; "
                         + "; ".join(f"{mode} boxes: skipped {geometry[mode]['skipped']}" for mode in empty) + ")")
    return report


def run_dota(models: Sequence[tuple[str, str]], out_dir: str | Path, metadata: str, frames_root: str,
             detector_weights: str | None = None, annotations_root: str | None = None,
             descriptions: str = dota.DEFAULT_DESCRIPTIONS, frame_stride: int = 1, max_clips: int | None = None,
             bootstrap: int = dota.BOOTSTRAP_RESAMPLES, seed: int = 0, device: str = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """DoTA frame-level anomaly ROC-AUC (Eq. 11) of ``models`` beside no-learning baselines.

    Boxes: a YOLO detector on every frame (``detector_weights``), else the whole frame (labelled).
    ``annotations_root`` adds the annotated-box scores of box-using models as a secondary row.
    Writes results.json, results.md and one ROC plot per model; raises ``ValueError`` (after
    writing them) when no clip could be scored.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if detector_weights:
        from sapretrain.curation.rois import YoloDetector

        boxes = dota.DetectorBoxes(YoloDetector(detector_weights, device=device), name=str(detector_weights))
    else:
        boxes = dota.WholeFrameBoxes()
    options = dict(descriptions=descriptions, frame_stride=frame_stride, max_clips=max_clips, bootstrap=bootstrap,
                   seed=seed, progress=progress)
    results, tables, plots, annotated, baselines = {}, [], [], {}, None
    for i, (label, spec) in enumerate(models):
        model, _ = load_model(spec, device=device)
        encoder = Encoder(model)
        result = dota.evaluate_dota(encoder, metadata, frames_root, boxes=boxes, baselines=i == 0, **options)
        baselines = result.pop("baselines", baselines)  # same frames for every model: computed once
        if annotations_root and encoder.uses_boxes:
            extra = dota.evaluate_dota(encoder, metadata, frames_root, boxes=dota.AnnotationBoxes(annotations_root),
                                       **options)
            annotated[label] = {"boxes": extra["boxes"], "groups": extra["groups"]}
            result["annotated_boxes"] = annotated[label]
        plot = f"dota_roc-{_slug(label)}.png"
        dota.plot_dota(result, out / plot)
        plots.append(plot)
        results[label] = {"spec": spec, **model_summary(model), **result}
        tables.append(f"## {label}\n\n{dota.format_dota_table(result, label)}")
    report = {"task": "dota", "metadata": metadata, "descriptions": str(descriptions),
              "boxes": boxes.describe(), "models": results, "baselines": baselines,
              "plots": plots, "seconds": round(time.time() - started, 1)}
    summary = dota.format_dota_summary({k: v for k, v in results.items()}, baselines, annotated)
    write_report(report, out, summary + "\n" + "\n\n".join(tables) + "\n")
    if results and not any(r["clips_evaluated"] for r in results.values()):
        first = next(iter(results.values()))
        raise ValueError(f"DoTA: no clip could be scored (skipped {first['skipped']}, excluded {first['excluded']}); "
                         f"check --frames {frames_root} (expected <clip_id>/images/000000.jpg)")
    return report


def run_sugarcrepe(models: Sequence[tuple[str, str]], out_dir: str | Path, data: Sequence[str], images_root: str,
                   instances: str | None = None, detector_weights: str | None = None, lm_corpus: str | None = None,
                   fallback: str = "global", device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """SugarCrepe accuracy of ``models`` beside no-learning baselines, in one table (sugarcrepe.py).

    Boxes (SA-CLIP's ROI branch) from COCO ``instances`` or a YOLO detector; ``lm_corpus`` (caption
    JSONL or COCO captions JSON) fits the bigram-LM baseline. Raises ``ValueError`` (after writing
    results.json / results.md) when no model scored a row.
    """
    from sapretrain.curation.svo import load_nlp

    if instances and detector_weights:
        raise ValueError("SugarCrepe boxes: give COCO instance annotations or detector weights, not both")
    data = [data] if isinstance(data, str) else list(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = sugarcrepe.read_sugarcrepe(data)
    if not rows:
        raise ValueError(f"no SugarCrepe rows in {data}")
    grounding = (sugarcrepe.Grounding.from_detector(detector_weights, device=device) if detector_weights
                 else sugarcrepe.Grounding.from_annotations(instances) if instances else None)
    try:
        nlp, no_nlp = load_nlp(), None
    except (ImportError, RuntimeError) as e:
        nlp, no_nlp = None, f"SugarCrepe: SA-CLIP's spans and the noun baseline need a spaCy model ({e})"
    if no_nlp and grounding is not None:
        raise ValueError(no_nlp)
    prepared = sugarcrepe.prepare_rows(rows, images_root, grounding, nlp=nlp, progress=progress)
    results = {}
    for label, spec in models:
        model, _ = load_model(spec, device=device)
        if no_nlp and (model.cfg.use_svo or model.cfg.use_roi):
            raise ValueError(no_nlp)
        result = sugarcrepe.evaluate_sugarcrepe(Encoder(model), prepared, images_root, fallback=fallback,
                                                progress=progress)
        name = f"predictions-{_slug(label)}.jsonl"
        (out / name).write_text("".join(json.dumps(p) + "\n" for p in result.pop("predictions")), encoding="utf-8")
        results[label] = {"spec": spec, **model_summary(model), **result, "predictions_file": name}
    corpus = sugarcrepe.read_caption_corpus(lm_corpus) if lm_corpus else None
    baselines, notes = sugarcrepe.evaluate_baselines(rows, prepared, corpus, grounding is not None)
    for result in baselines.values():
        result.pop("predictions")
    categories = sugarcrepe.categories_of(rows)
    report = {"task": "sugarcrepe", "data": data, "images": images_root,
              "boxes": grounding.source if grounding else "none", "fallback": fallback,
              "categories": categories, "models": results, "baselines": baselines, **notes,
              "seconds": round(time.time() - started, 1)}
    title = (f"SugarCrepe: {len(rows)} rows, boxes {report['boxes']}, SA-CLIP fallback `{fallback}`; "
             f"accuracy (%) over all rows\n\n")
    write_report(report, out, title + sugarcrepe.format_sugarcrepe_table({**results, **baselines}, categories))
    if results and not sugarcrepe.scorable(results):
        reasons = next(iter(results.values()))["unscorable"]
        raise ValueError(f"SugarCrepe: no model scored any of the {len(rows)} rows ({reasons}); "
                         f"check --images {images_root}")
    return report


def run_shards(models: Sequence[tuple[str, str]], out_dir: str | Path, shard_set: str, features: str | None = None,
               batch_pairs: int = 64, max_batches: int | None = None, image_size: int | None = None,
               device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Relation accuracy and retrieval on held-out shards (or their feature shards)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {}
    for label, spec in models:
        model, _ = load_model(spec, device=device)
        emb = shards.embed_shards(model, shard_set, features=features, batch_pairs=batch_pairs,
                                  max_batches=max_batches, image_size=image_size, progress=progress)
        results[label] = {"spec": spec, **model_summary(model), **shards.score_shards(emb)}
    report = {"task": "shards", "shards": shard_set, "features": features, "batch_pairs": batch_pairs,
              "models": results, "seconds": round(time.time() - started, 1)}
    write_report(report, out, shards.format_shards_table(results))
    return report


def _overview(report: dict[str, Any], metric: str) -> str:
    lines = [f"| model | {metric} | n |", "|---|---:|---:|"]
    for label, r in report["models"].items():
        value = "-" if r.get(metric) is None else f"{r[metric]:.3f}"
        lines.append(f"| {label} | {value} | {r.get('n', '-')} |")
    return "\n".join(lines) + "\n"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def verdict(results: dict[str, dict], baseline: str, target: float) -> dict[str, Any]:
    """Gain of every model over ``baseline`` in k-NN accuracy, per modality; pass = all gains >= target."""
    base = results[baseline]
    gains = {
        label: {m: round(r[m]["knn_accuracy"] - base[m]["knn_accuracy"], 4) for m in spatial.MODALITIES}
        for label, r in results.items() if label != baseline
    }
    passed = bool(gains) and all(g >= target for by_modality in gains.values() for g in by_modality.values())
    return {"baseline": baseline, "target": target, "gains": gains, "pass": passed}


def spatial_table(report: dict[str, Any]) -> str:
    probe = report["probe"]
    lines = [
        f"Spatial probe: {probe['scenes']} held-apart scenes, 8 relations (chance {probe['chance']:.3f}), "
        f"leave-one-out {probe['k']}-NN",
        "",
        "| model | text k-NN | image k-NN | text silhouette | image silhouette |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in report["models"].items():
        lines.append(f"| {label} | {r['text']['knn_accuracy']:.3f} | {r['image']['knn_accuracy']:.3f} | "
                     f"{r['text']['silhouette']:.3f} | {r['image']['silhouette']:.3f} |")
    v = report.get("verdict")
    if v:
        lines.append("")
        for label, g in v["gains"].items():
            lines.append(f"{label} vs {v['baseline']}: text {g['text']:+.3f}, image {g['image']:+.3f} "
                         f"(target {v['target']:+.2f} each)")
        lines.append(f"verdict: {'PASS' if v['pass'] else 'FAIL'}")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path, table: str) -> None:
    """results.json and results.md, each written whole (temporary file + rename)."""
    for name, text in (("results.json", json.dumps(report, indent=2) + "\n"), ("results.md", table)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
