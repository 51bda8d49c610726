r"""Label a seed subset of (caption, triplet) pairs with an LLM: is the triplet a correct reading?

    OPENAI_API_KEY=... sapretrain label-seeds --input triplets.jsonl --output labels.jsonl \
        --config configs/curation/llm.yaml [--sample 2000 --seed 0] [--source coco] \
        [--part 0 --num-parts 4] [--chunk-size 500] [--no-progress] [model=gpt-4o ...]

One output line per (caption, triplet): {"id", "caption", "triplet", "label": 0|1, "reason",
"labeler": "llm:<model>"}; human labels in the same format are read the same way. Items the LLM
failed on go to OUT.dropped.jsonl with the reason. The sample is kept as OUT.seeds.jsonl. A killed
run resumes when re-run with the same arguments, and answers are cached (cache_dir), so a re-run
costs nothing. Prints the stage summary and the request/token/cost statistics.
Details: sapretrain/curation/llm.py, docs/curation.md.
"""
from __future__ import annotations

import argparse
import logging
import sys

from sapretrain.config import ConfigError
from sapretrain.curation.stage import add_stage_arguments
from sapretrain.curation.llm import LLMFatalError, format_stats, label_seeds, load_llm_config
from sapretrain.curation.stage import format_stage_summary
from sapretrain.jobs import Parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="triplets JSONL from extract_svo (path or fsspec URL)")
    parser.add_argument("--output", required=True, help="labels JSONL (path or fsspec URL)")
    parser.add_argument("--config", default="configs/curation/llm.yaml", help="LLM client config (YAML)")
    parser.add_argument("--sample", type=int, help="label this many (caption, triplet) items (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--source", help="only records with this `source` (e.g. coco)")
    add_stage_arguments(parser, chunk_size=500, workers=False)  # the (sampled) items are the input here
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_concurrency=4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        cfg = load_llm_config(args.config, args.overrides)
        summary, stats = label_seeds(args.input, args.output, cfg, args.sample, args.seed, args.source,
                                     Parts(args.part, args.num_parts), args.chunk_size, not args.no_progress)
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
    except LLMFatalError as e:
        print(f"stopped: {e} (committed chunks are kept; re-run to resume)", file=sys.stderr)
        return 1
    if not summary.get("already_done"):
        print(f"wrote {Parts(args.part, args.num_parts).output(args.output)}")
    print(format_stage_summary(summary))
    print(format_stats(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
