r"""Triplet samples JSONL → the same lines plus a ``negative`` caption (SA-CLIP §2.3.3).

    sapretrain make-negatives --input samples.jsonl --output with_neg.jsonl \
        [--mode rules|llm] [--config configs/curation/negatives.yaml] \
        [--llm-config configs/curation/llm.yaml] [--chunk-size 5000] [--part 0 --num-parts 16] \
        [--no-progress] [swap.enabled=false ...]

Rules (default, offline): candidates from the lexicons in --config (inverse relation,
replacements by an exclusive spatial phrase, subject–object swap for asymmetric relations);
--mode llm asks the LLM of --llm-config instead. Every candidate is re-parsed and validated and
checked for fluency; per chunk, the choice is balanced so that a text-only probe cannot tell
negatives from captions, and the most detectable are dropped (refine.* in --config). Measure the
result with `sapretrain eval-negatives OUT`. Dropped lines go to OUT.dropped.jsonl with their
reason; a killed run resumes when re-run with the same arguments. Details:
sapretrain/curation/negatives.py, docs/curation.md.
"""
from __future__ import annotations

import argparse
import json

from sapretrain import storage
from sapretrain.curation.negatives import (
    DEFAULT_CONFIG,
    MODES,
    NegativeStage,
    load_negatives_config,
    method_counts,
)
from sapretrain.curation.stage import add_stage_arguments, format_stage_summary, run_stage_from_args
from sapretrain.jobs import Parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="triplet samples JSONL (path or fsspec URL)")
    parser.add_argument("--output", required=True, help="output JSONL (path or fsspec URL)")
    parser.add_argument("--mode", choices=MODES, default="rules", help="rules (default) or llm")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="lexicons (configs/curation/negatives.yaml)")
    parser.add_argument("--llm-config", help="LLM config for --mode llm (configs/curation/llm.yaml)")
    add_stage_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. swap.enabled=false")
    args = parser.parse_args(argv)

    try:
        stage = NegativeStage(load_negatives_config(args.config, args.overrides), args.mode, args.llm_config)
        summary = run_stage_from_args(stage, args)
    except ValueError as e:
        parser.error(str(e))
    out = Parts(args.part, args.num_parts).output(args.output)
    lines = storage.read_bytes(out).decode("utf-8").splitlines()
    methods = method_counts(json.loads(line) for line in lines)
    if not summary.get("already_done"):
        print(f"wrote {out}")
    print(format_stage_summary(summary))
    print("kept by method: " + (", ".join(f"{k} {v}" for k, v in methods.items()) or "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
