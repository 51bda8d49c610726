r"""Triplet-level samples JSONL → the same lines plus "positive" (partner id) and "positive_score".

    sapretrain make-positives --input samples.jsonl --output with_pos.jsonl \
        [--config configs/curation/positives.yaml] [--stage all|embed|index|search|write] \
        [--part 0 --num-parts 16] [--no-progress] [min_score=0.75 search.device=cuda ...]

Each sample's partner is the most similar sample (MiniLM embedding of "subj rel obj") of another
image at or above min_score; samples without one go to OUT.dropped.jsonl (no_positive). Paths may
be local or fsspec URLs. Re-running resumes (work files under OUT.work/, kept for reuse: delete
when done). With parts: run --stage embed on every part, then --stage index once (one process: the
run's one search index), then --stage search on every part, then --stage write on every part (all
with the same --num-parts; part I writes OUT-partIIIII-ofNNNNN.jsonl). Details:
sapretrain/curation/positives.py.
"""
from __future__ import annotations

import argparse

from sapretrain.config import ConfigError, load_config
from sapretrain.curation.positives import STAGES, PositivesConfig, format_summary, make_positives
from sapretrain.jobs import Parts, add_part_arguments

DEFAULT_CONFIG = "configs/curation/positives.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="samples JSONL with a 'triplet' per line (path or fsspec URL)")
    parser.add_argument("--output", required=True, help="output JSONL (path or fsspec URL)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="PositivesConfig YAML")
    parser.add_argument("--stage", choices=STAGES, default="all", help="which step(s) to run (default all)")
    add_part_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. min_score=0.8")
    args = parser.parse_args(argv)

    try:
        parts = Parts(args.part, args.num_parts)
        cfg = load_config(PositivesConfig, args.config, args.overrides)
        result = make_positives(args.input, args.output, cfg, parts, args.stage, not args.no_progress)
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
    if "kept" in result:
        print(f"wrote {parts.output(args.output)}")
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
