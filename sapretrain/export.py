"""Export a trained model to share it, and write a dataset card for a shard set (no network).

    sapretrain export runs/demo/saclip --output exports/demo --eval-results runs/demo/results.json
    sapretrain export --dataset-card data/shards/demo --output exports/demo-shards
    sapretrain export runs/demo/saclip --output exports/demo license=apache-2.0 tags=[sa-clip,demo]

A model export (``SOURCE``: a run dir, a checkpoint dir or ``state.pt``, a ``save_saclip`` file,
an exported folder) writes into ``--output``:

- ``model.safetensors`` + ``config.json``: every weight of the SA-CLIP model and what rebuilds it
  (``SAClipConfig``, open_clip model and preprocess configs, the tokenizer and ROI-crop settings of
  the training shards, the training config); ``sapretrain.load(OUTPUT)`` reads it back;
- ``README.md``: a model card (YAML front matter with license / tags / library_name, the model,
  how to load it, the training config, a data summary from the shards' ``summary.json`` when
  reachable, and a table per ``--eval-results`` file, ``results.json`` of ``tools/evaluate.py``);
- ``open_clip/``: the CLIP part alone in open_clip's own layout (``open_clip_config.json``,
  ``open_clip_model.safetensors``), loadable with
  ``open_clip.create_model_and_transforms("local-dir:OUTPUT/open_clip")`` (``open_clip=false``
  leaves it out).

``--dataset-card SHARDS`` writes ``OUTPUT/README.md`` for a shard set from its ``summary.json``
(counts, skipped inputs by reason, shards), its ``config.yaml``, the manifest it was written from
(sources, licences, relation and kind histograms) and the curation ``report.json`` (stages with
kept / dropped counts and drop reasons) when they are reachable (``--manifest``,
``--curation-report`` point at them explicitly).

Positional ``key=value`` items override the card fields (``ExportConfig``). Pushing is the
user's: ``huggingface-cli upload USER/REPO OUTPUT .`` (docs/api.md).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from sapretrain import jsonl, storage
from sapretrain.config import ConfigError, load_config
from sapretrain.jobs import SkipLog, expand_inputs

MODEL_TAGS = ["sapretrain", "sa-clip", "clip", "spatial-reasoning", "zero-shot-image-classification"]
DATASET_TAGS = ["sapretrain", "sa-clip", "webdataset", "spatial-reasoning"]
MAX_METRIC_ROWS = 60  # per evaluation table


@dataclass
class ExportConfig:
    """Card fields, overridden by positional ``key=value`` items."""

    name: str | None = None  # card title (default: the output folder's name)
    license: str | None = None  # SPDX id; model default mit (this code's), dataset default from the manifest
    tags: list[str] = field(default_factory=list)  # added to the default tags
    base_model: str | None = None  # Hub id of the CLIP the training started from, if any
    description: str | None = None  # a paragraph under the title
    open_clip: bool = True  # also write open_clip/ (the CLIP part for plain open_clip)


# ----- reading what a source knows


def read_json(url: str) -> Any | None:
    """The JSON at ``url``, or None when it is not there (a card section is then left out)."""
    try:
        return json.loads(storage.read_bytes(url))
    except (FileNotFoundError, ValueError, OSError):
        return None


def training_state(source: str) -> dict[str, Any] | None:
    """The trainer's config and position of ``source`` (a run or checkpoint), else None."""
    from sapretrain.model.checkpoint import CONFIG_FILE
    from sapretrain.train.checkpoint import load_tensor_file, resolve_checkpoint

    if source.startswith("openclip:"):
        return None
    fs, path = storage.url_to_fs(source)
    if fs.isdir(path):
        if fs.exists(f"{path.rstrip('/')}/{CONFIG_FILE}"):
            return (read_json(f"{source.rstrip('/')}/{CONFIG_FILE}") or {}).get("training")
        state_url = f"{resolve_checkpoint(source)}/state.pt"
    elif source.endswith("state.pt"):
        state_url = source
    else:
        return None
    state = load_tensor_file(state_url)
    return {"checkpoint": state_url.rsplit("/", 1)[0], "position": state.get("position"), "config": state["config"]}


def shard_dir_of(training: dict[str, Any] | None) -> str | None:
    """The shard directory a training config read (a single directory), else None."""
    if not training:
        return None
    shards = (training.get("config") or {}).get("data", {}).get("shards")
    if not isinstance(shards, str) or "," in shards or "{" in shards or shards.endswith(".tar"):
        return None
    return shards.rstrip("/")


def shard_config(shards: str | None) -> dict[str, Any]:
    """The ``ShardConfig`` the shards were written with (their ``config.yaml``), else the defaults."""
    from sapretrain.shards.writer import ShardConfig

    if shards and storage.exists(f"{shards}/config.yaml"):
        try:
            return asdict(load_config(ShardConfig, f"{shards}/config.yaml"))
        except (ConfigError, OSError):
            pass
    return asdict(ShardConfig())


# ----- model export


def export_model(source: str, output: str, cfg: ExportConfig | None = None, eval_results: Sequence[str] = (),
                 shards: str | None = None, label: str | None = None) -> dict[str, Any]:
    """Write the Hub folder (and open_clip/) for ``source`` into ``output``; returns what was written."""
    from sapretrain.eval.encode import load_model
    from sapretrain.model.checkpoint import export_open_clip_dir, save_pretrained

    cfg = cfg or ExportConfig()
    output = str(output).rstrip("/")
    model, _ = load_model(source)
    training = training_state(source)
    shards = shards or shard_dir_of(training)
    summary = read_json(f"{shards}/summary.json") if shards else None
    results = [(url, _read_results(url)) for url in eval_results]
    config = save_pretrained(model, output, extra={
        "tokenizer": {"name": shard_config(shards)["tokenizer"], "context_length": model.clip.context_length},
        "shards": shard_config(shards),
        "training": training,
        "source": source,
    })
    written = [f"{output}/model.safetensors", f"{output}/config.json"]
    open_clip_name = None
    if cfg.open_clip:
        open_clip_name = export_open_clip_dir(model, f"{output}/open_clip")
        written += [f"{output}/open_clip/open_clip_model.safetensors", f"{output}/open_clip/open_clip_config.json"]
    card = model_card(config, cfg, output, summary, shards, results, label or source, open_clip_name is not None)
    storage.write_bytes_atomic(f"{output}/README.md", card.encode())
    written.append(f"{output}/README.md")
    return {"output": output, "files": written, "open_clip": open_clip_name}


def _read_results(url: str) -> dict[str, Any]:
    if not url.endswith(".json"):
        url = f"{url.rstrip('/')}/results.json"
    report = read_json(url)
    if not isinstance(report, dict) or not isinstance(report.get("models"), dict):
        raise ValueError(f"--eval-results {url}: not a results.json of tools/evaluate.py (no 'models')")
    return report


def model_card(config: dict[str, Any], cfg: ExportConfig, output: str, summary: dict | None, shards: str | None,
               results: Sequence[tuple[str, dict]], label: str, with_open_clip: bool) -> str:
    """The README.md of an exported model folder."""
    model = config["config"]
    name = cfg.name or output.rstrip("/").rsplit("/", 1)[-1]
    front = {"license": cfg.license or "mit", "library_name": "sapretrain",
             "tags": _unique(MODEL_TAGS + list(cfg.tags)), "pipeline_tag": "zero-shot-image-classification"}
    if cfg.base_model:
        front["base_model"] = cfg.base_model
    kind = "plain CLIP" if not (model["use_svo"] or model["use_roi"]) else "SA-CLIP"
    article = "A" if kind == "plain CLIP" else "An"
    d = config["embed_dim"]
    lines = [_front_matter(front), f"# {name}", ""]
    if cfg.description:
        lines += [cfg.description, ""]
    lines += [
        f"{article} {kind} model (SA-CLIP: Li, Shao, Rajapaksha, Crespi, *Language Guided Image Spatial and Action "
        "Feature Learning*, Findings of EMNLP 2025) trained with "
        "`sapretrain`. Text embedding `u = concat(normalize(pooled caption), "
        f"normalize(r_svo)) / sqrt(2)` ({2 * d} dims), image embedding `v = concat(normalize(f_v(image)), "
        f"normalize(r_roi)) / sqrt(2)` ({2 * d} dims), scored by cosine.", "",
        "## Model", "", "| field | value |", "|---|---|",
        *[f"| `{k}` | `{json.dumps(v)}` |" for k, v in model.items()],
        f"| embedding width | {2 * d} (`u`, `v`), {d} per half |", "",
        "## How to use", "", "```python", "import sapretrain", "",
        "model = sapretrain.load(\"PATH_OR_DOWNLOAD_OF_THIS_FOLDER\")",
        "text = model.encode_text([\"a cat under a table\"])        # runs the SVO extractor (spaCy)",
        "image = model.encode_image([\"photo.jpg\"], captions=[\"a cat under a table\"],",
        "                           boxes=[{\"subj\": [10, 40, 120, 160], \"obj\": [0, 100, 300, 240]}])",
        "print(model.score(\"photo.jpg\", \"a cat under a table\"))", "```", "",
        "Without `boxes`, the subject and object are found with the pipeline's detector "
        "(`sapretrain.load(path, detector=\"yolov8n.pt\")`), else both regions are the whole frame "
        "(`image.box_source` says which).", "",
    ]
    if with_open_clip:
        lines += ["The CLIP part alone loads in plain open_clip:", "", "```python", "import open_clip", "",
                  "clip, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:PATH/open_clip\")",
                  "```", ""]
    lines += _training_section(config.get("training"), config.get("shards"))
    lines += _data_section(summary, shards)
    lines += _results_section(results, label)
    lines += ["## Limitations", "",
              "Embeddings depend on the caption's parse (the first subject-relation-object triplet the "
              "extractor finds) and on the subject/object boxes: wrong boxes give a wrong ROI half. Numbers "
              "above hold for the evaluation sets named, with the box source stated there.", ""]
    return "\n".join(lines)


def _training_section(training: dict | None, shards_cfg: dict | None) -> list[str]:
    import yaml

    lines = ["## Training", ""]
    if not training:
        return lines + ["Not recorded (exported from a model file without its training run).", ""]
    position = training.get("position") or {}
    if position:
        lines += [f"Checkpoint `{training.get('checkpoint')}`: step {position.get('step')}"
                  f" (epoch {position.get('epoch')}).", ""]
    lines += ["Training config (`launch/pretrain.py --config`; every key):", "", "```yaml",
              yaml.safe_dump(training["config"], sort_keys=False).rstrip(), "```", ""]
    if shards_cfg:
        lines += ["Shards: " + ", ".join(f"`{k}={v}`" for k, v in shards_cfg.items()), ""]
    return lines


def _data_section(summary: dict | None, shards: str | None) -> list[str]:
    lines = ["## Training data", ""]
    if not summary:
        where = f" (`{shards}/summary.json` not reachable)" if shards else ""
        return lines + [f"No shard summary available{where}.", ""]
    skipped = (summary.get("skipped") or {}).get("counts") or {}
    lines += [f"Shard set `{shards}` (schema {summary.get('schema')}), written from `{summary.get('manifest')}`:", "",
              "| | count |", "|---|---:|",
              f"| samples read | {summary.get('samples_read')} |",
              f"| records (anchor/partner pairs) | {summary.get('records')} |",
              f"| mutual pairs merged | {summary.get('mutual_pairs_merged')} |",
              f"| shards | {len(summary.get('shards') or [])} |",
              f"| samples skipped | {sum(skipped.values())} |", ""]
    if skipped:
        lines += ["| skipped reason | count |", "|---|---:|", *[f"| {k} | {v} |" for k, v in sorted(skipped.items())], ""]
    return lines


def flatten_metrics(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a results entry as dotted keys (configs and specs left out)."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k in ("config", "spec", "plain_clip", "predictions"):
                continue
            out.update(flatten_metrics(v, f"{prefix}{k}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix.rstrip(".")] = tree
    return out


def _results_section(results: Sequence[tuple[str, dict]], label: str) -> list[str]:
    lines = ["## Evaluation", ""]
    if not results:
        return lines + ["No evaluation results were given (`--eval-results runs/X/eval/results.json`).", ""]
    for url, report in results:
        models = report["models"]
        flat = {m: flatten_metrics(entry) for m, entry in models.items()}
        keys = _unique(k for metrics in flat.values() for k in metrics)
        names = [f"**{m}**" if m == label or models[m].get("spec") == label else m for m in models]
        lines += [f"### {report.get('task', 'evaluation')} (`{url}`)", ""]
        if report.get("headline"):
            lines += [f"Headline box condition: {report['headline']}.", ""]
        lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for key in keys[:MAX_METRIC_ROWS]:
            lines.append(f"| {key} | " + " | ".join(_num(flat[m].get(key)) for m in models) + " |")
        if len(keys) > MAX_METRIC_ROWS:
            lines.append(f"| ({len(keys) - MAX_METRIC_ROWS} more in the results file) |" + " |" * len(names))
        lines.append("")
        verdict = report.get("verdict")
        if isinstance(verdict, dict):
            lines += ["Verdict (set before the run): " + ", ".join(f"{k} {_num(v)}" for k, v in verdict.items()), ""]
    return lines


# ----- dataset card


def manifest_stats(urls: list[str]) -> dict[str, Any]:
    """Sources, licences, relations and kinds of a curated manifest (its files, in order)."""
    sources, licences, relations, kinds, samples = Counter(), Counter(), Counter(), Counter(), 0
    records = (record for url in urls for _, record in jsonl.read_records(url, SkipLog()))
    for record in records:  # streamed; lines that are not records do not count
        samples += 1
        sources[str(record.get("source", "?"))] += 1
        licences[str(record.get("license") or "unspecified")] += 1
        triplet = record.get("triplet") if isinstance(record.get("triplet"), dict) else {}
        rel = triplet.get("rel") if isinstance(triplet.get("rel"), dict) else {}
        relations[str(record.get("relation") or rel.get("text") or "?")] += 1
        kinds[str(rel.get("kind") or "?")] += 1
    return {"samples": samples, "sources": dict(sources.most_common()), "licenses": dict(licences.most_common()),
            "relations": dict(relations.most_common()), "kinds": dict(kinds.most_common())}


def dataset_card(shards: str, cfg: ExportConfig | None = None, manifest: str | None = None,
                 curation_report: str | None = None) -> str:
    """The README.md of a shard set (see the module doc)."""
    cfg = cfg or ExportConfig()
    shards = str(shards).rstrip("/")
    summary = read_json(f"{shards}/summary.json")
    if not isinstance(summary, dict):
        raise FileNotFoundError(f"--dataset-card {shards}: no summary.json (written by make_shards when every "
                                "shard is done)")
    given = manifest
    manifest = manifest or summary.get("manifest")
    if isinstance(manifest, list):  # make_shards called from Python with a list of files
        manifest = manifest[0] if len(manifest) == 1 else ", ".join(manifest)
    # The files make_shards read (a glob or a partitioned manifest names several), else the one given.
    try:
        files = expand_inputs(given) if given else summary.get("manifest_files") or ([manifest] if manifest else [])
    except ValueError:  # a partitioned manifest with a part missing: not reachable
        files = []
    stats = manifest_stats(files) if files and all(storage.exists(f) for f in files) else None
    if curation_report is None and files:
        guess = f"{files[0].rsplit('/', 1)[0]}/report.json" if "/" in files[0] else "report.json"
        curation_report = guess if storage.exists(guess) else None
    report = read_json(curation_report) if curation_report else None
    licences = sorted((stats or {}).get("licenses", {}))
    licence = cfg.license or (licences[0] if len(licences) == 1 and licences[0] != "unspecified" else "other")
    records = int(summary.get("records") or 0)
    front = {"license": licence, "tags": _unique(DATASET_TAGS + list(cfg.tags)),
             "task_categories": ["zero-shot-image-classification"], "size_categories": [_size_category(records)],
             "pretty_name": cfg.name or shards.rsplit("/", 1)[-1]}
    skipped = (summary.get("skipped") or {}).get("counts") or {}
    examples = (summary.get("skipped") or {}).get("examples") or {}
    shard_list = summary.get("shards") or []
    lines = [_front_matter(front), f"# {front['pretty_name']}", ""]
    if cfg.description:
        lines += [cfg.description, ""]
    lines += [
        "SA-CLIP training shards written by `sapretrain` (WebDataset tars, one record = an anchor sample and "
        "its positive partner, each with its image, subject/object ROI crops and boxes, caption with SVO "
        "token spans and an opposite-relation negative caption; schema in the package's `shards/schema.py`).", "",
        "## Counts (summary.json)", "", "| | count |", "|---|---:|",
        f"| samples read from the manifest | {summary.get('samples_read')} |",
        f"| records | {records} |",
        f"| mutual pairs merged | {summary.get('mutual_pairs_merged')} |",
        f"| samples skipped | {sum(skipped.values())} |",
        f"| shards | {len(shard_list)} |",
        f"| bytes | {sum(int(s.get('bytes') or 0) for s in shard_list)} |", "",
    ]
    if skipped:
        lines += ["### Skipped inputs", "", "| reason | count | example |", "|---|---:|---|",
                  *[f"| {k} | {v} | {_example(examples.get(k))} |" for k, v in sorted(skipped.items())], ""]
    config = shard_config(shards) if storage.exists(f"{shards}/config.yaml") else None
    if config:
        lines += ["## Shard settings (config.yaml)", "", ", ".join(f"`{k}={v}`" for k, v in config.items()), ""]
    if stats:
        lines += [f"## Sources and licences (manifest `{manifest}`, {stats['samples']} samples)", "",
                  "| source | samples |", "|---|---:|", *[f"| {k} | {v} |" for k, v in stats["sources"].items()], "",
                  "| licence | samples |", "|---|---:|", *[f"| {k} | {v} |" for k, v in stats["licenses"].items()], "",
                  "## Relations", "", "| kind | samples |", "|---|---:|",
                  *[f"| {k} | {v} |" for k, v in stats["kinds"].items()], "",
                  "| relation | samples |", "|---|---:|",
                  *[f"| {k} | {v} |" for k, v in list(stats["relations"].items())[:30]], ""]
        if len(stats["relations"]) > 30:
            lines += [f"({len(stats['relations']) - 30} more relations in the manifest.)", ""]
    else:
        lines += ["## Sources and licences", "", f"Manifest `{manifest}` not reachable: sources, licences and the "
                  "relation histogram are not listed. Check each source's licence before sharing.", ""]
    if report:
        lines += [f"## Curation (`{curation_report}`)", "", "| stage | records | kept | dropped (reason: count) |",
                  "|---|---:|---:|---|"]
        for stage in report.get("stages") or []:
            dropped = stage.get("dropped") or {}
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) if isinstance(dropped, dict) else dropped
            lines.append(f"| {stage.get('stage')} | {stage.get('records')} | {stage.get('kept')} | {reasons or '-'} |")
        lines.append("")
    lines += ["## Loading", "", "```python",
              "import webdataset as wds", "",
              "records = wds.WebDataset(\"PATH/shard-{000000..%06d}.tar\").decode(\"pil\")" % max(0, len(shard_list) - 1),
              "```", "", "Training reads them with `sapretrain train` (`data.shards=PATH`).", ""]
    return "\n".join(lines)


def write_dataset_card(shards: str, output: str, cfg: ExportConfig | None = None, manifest: str | None = None,
                       curation_report: str | None = None) -> str:
    url = f"{str(output).rstrip('/')}/README.md"
    storage.write_bytes_atomic(url, dataset_card(shards, cfg, manifest, curation_report).encode())
    return url


# ----- formatting


def _front_matter(values: dict[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(values, sort_keys=False).rstrip() + "\n---\n"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _example(examples: Any) -> str:
    if isinstance(examples, list) and examples:
        return str(examples[0]).replace("|", "\\|")[:80]
    return ""


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "n>10M"


# ----- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sapretrain export", description=__doc__.split("\n\n")[0],
        epilog="Push with: huggingface-cli upload USER/REPO OUTPUT . (see docs/api.md)")
    parser.add_argument("items", nargs="*", metavar="SOURCE | key=value",
                        help="the model to export (run dir, checkpoint, model file, exported folder), then "
                             "card overrides (ExportConfig: name, license, tags, base_model, description, open_clip)")
    parser.add_argument("--output", required=True, help="output folder (local or fsspec URL)")
    parser.add_argument("--eval-results", action="append", default=[], metavar="RESULTS",
                        help="a results.json of tools/evaluate.py (or its folder), for the card's tables; repeatable")
    parser.add_argument("--shards", help="the training shard directory, when the run's data.shards is not reachable")
    parser.add_argument("--label", help="the exported model's name in the results tables (default: the source)")
    parser.add_argument("--dataset-card", metavar="SHARDS", help="write a dataset card for this shard set instead")
    parser.add_argument("--manifest", help="with --dataset-card: the curated manifest (default: summary.json's)")
    parser.add_argument("--curation-report", help="with --dataset-card: the curation report.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # SOURCE and key=value on either side of the flags
    sources = [item for item in args.items if "=" not in item or storage.exists(item)]
    overrides = [item for item in args.items if item not in sources]
    try:
        cfg = load_config(ExportConfig, None, overrides)
    except ConfigError as e:
        parser.error(str(e))
    if args.dataset_card:
        if sources:
            parser.error(f"--dataset-card takes no model source (got {sources})")
        try:
            url = write_dataset_card(args.dataset_card, args.output, cfg, args.manifest, args.curation_report)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}")
            return 1
        print(f"dataset card: {url}")
        return 0
    if len(sources) != 1:
        parser.error(f"expected one model SOURCE (or --dataset-card SHARDS), got {sources or 'none'}")
    try:
        done = export_model(sources[0], args.output, cfg, args.eval_results, args.shards, args.label)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    for path in done["files"]:
        print(path)
    print(f"load back: sapretrain.load({done['output']!r})")
    if done["open_clip"]:
        print(f"open_clip: open_clip.create_model_and_transforms({done['open_clip']!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
