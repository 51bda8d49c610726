r"""Train the relation-triplet filter on labelled triplets (paper §2.1).

    sapretrain train-filter --labels labels.jsonl --output models/filter \
        [--config configs/curation/filter.yaml] [--no-progress] [key=value ...]

Splits the labels deterministically by hash (train / validation / test), then
  kind=text (default): fine-tunes a BERT-style 2-label classifier on "caption [SEP] subj | rel | obj",
    chooses the keep threshold on validation, writes the model in Hugging Face format;
  kind=features: gradient-boosted trees on parse features of the triplet in its caption, the
    threshold chosen on out-of-fold scores of train + validation, writes model.joblib;
both with filter_config.json (kind, threshold, metrics, config), metrics.json and pr_curve.png.
threshold_rule=precision_bound min_precision=0.85 keeps the most triplets whose precision's 95 %
lower bound is >= 0.85. Details: sapretrain/curation/relation_filter.py, feature_filter.py.
"""
from __future__ import annotations

import argparse
import json

from sapretrain.config import ConfigError, dump_config, load_config
from sapretrain.curation.relation_filter import FilterConfig, load_labels, read_filter_config, train_filter

DEFAULT_CONFIG = "configs/curation/filter.yaml"


def _fmt(m: dict) -> str:
    auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
    return f"n {m['n']} (pos {m['positives']}) P {m['precision']:.3f} R {m['recall']:.3f} F1 {m['f1']:.3f} AUC {auc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", required=True, help="labelled triplets JSONL (path or fsspec URL)")
    parser.add_argument("--output", required=True, help="model folder to write")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="FilterConfig YAML")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(FilterConfig, args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    print(dump_config(cfg), end="")

    labels, bad = load_labels(args.labels)
    print(f"{len(labels)} labelled triplets ({sum(r['label'] for r in labels)} correct); skipped: {bad or 'none'}")
    try:
        metrics = train_filter(cfg, labels, args.output, progress=not args.no_progress)
    except ValueError as e:
        parser.error(str(e))
    on = metrics.get("threshold_on", "validation")
    print(f"splits {json.dumps(metrics['split_sizes'])}; threshold {metrics['threshold']:.4f} ({cfg.threshold_rule}, on {on})")
    for name in ("validation", "test"):
        print(f"{'out-of-fold' if name == 'validation' and 'threshold_on' in metrics else name:>11}: {_fmt(metrics[name])}")
    reference = read_filter_config(args.output).get("reference") or {}
    if reference.get("caption_words"):
        low, median, high = reference["caption_words"]
        print(f"training captions: {median:.0f} words (10-90 %: {low:.0f}-{high:.0f}); on captions of another kind "
              f"its scores shift (a run keeping under half of its held-out share is warned)")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
