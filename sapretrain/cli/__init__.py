"""The console commands: ``sapretrain <command> ...``, and ``sapretrain-<command>`` for each.

    sapretrain --help                     # the commands, one line each
    sapretrain make-shards --help         # = sapretrain-make-shards --help = python tools/make_shards.py --help

Each command is a module of this package whose ``main(argv=None) -> int`` parses the arguments
and prints the result; the work is done by the library modules it calls. ``tools/*.py`` and
``launch/pretrain.py`` are shims over the same functions, and setup.cfg's console scripts point
at them too. A command's module is imported only when the command runs, so ``--help`` is quick.
Every command takes config overrides as positional ``key=value`` and names its output
``--output``.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from typing import Callable

# command -> ("module:function", one-line description); the order is the pipeline's.
COMMANDS: dict[str, tuple[str, str]] = {
    "curate": ("sapretrain.cli.curate:main", "the whole curation, caption sources to the curated manifest"),
    "collect-captions": ("sapretrain.cli.collect_captions:main", "image-caption sources -> one captions JSONL"),
    "extract-svo": ("sapretrain.cli.extract_svo:main", "captions JSONL -> the same plus SVO triplets"),
    "eval-svo": ("sapretrain.cli.eval_svo:main", "SVO extraction precision / recall / F1 against gold sets"),
    "make-samples": ("sapretrain.cli.make_samples:main", "extracted captions -> one sample per (caption, triplet)"),
    "label-seeds": ("sapretrain.cli.label_seeds:main", "label seed triplets with an LLM (correct reading or not)"),
    "gold-labels": ("sapretrain.cli.gold_labels:main", "label extracted FACTUAL triplets against the gold scene graphs"),
    "train-filter": ("sapretrain.cli.train_filter:main", "train the relation-triplet filter on labelled triplets"),
    "eval-filter": ("sapretrain.cli.eval_filter:main", "the filter vs the extractor alone and baselines on held-out FACTUAL"),
    "filter-triplets": ("sapretrain.cli.filter_triplets:main", "score triplets with the filter, drop the low ones"),
    "make-negatives": ("sapretrain.cli.make_negatives:main", "samples -> the same plus a negative caption"),
    "eval-negatives": ("sapretrain.cli.eval_negatives:main", "can the negatives be told apart without the image? (blind probe)"),
    "detect-rois": ("sapretrain.cli.detect_rois:main", "samples -> the same plus subject / object boxes"),
    "make-positives": ("sapretrain.cli.make_positives:main", "samples -> the same plus a positive partner"),
    "make-shards": ("sapretrain.cli.make_shards:main", "curated manifest + images -> WebDataset tar shards"),
    "check-shards": ("sapretrain.cli.check_shards:main", "decode every shard member against the schema"),
    "cache-features": ("sapretrain.cli.cache_features:main", "frozen vision-tower features of a shard set"),
    "vsr-train-manifest": ("sapretrain.cli.vsr_train_manifest:main", "VSR training rows + COCO boxes -> a manifest"),
    "train-scene-detector": ("sapretrain.cli.train_scene_detector:main", "train the demo's YOLO scene detector"),
    "train": ("sapretrain.cli.train:main", "pretrain SA-CLIP on shards (run it under accelerate launch)"),
    "evaluate": ("sapretrain.cli.evaluate:main", "evaluate checkpoints: spatial probe, VSR, DoTA, SugarCrepe, shards"),
    "export": ("sapretrain.export:main", "export a checkpoint: open_clip weights, Hub folder, cards"),
}
ALIASES = {"shards": "make-shards", "check": "check-shards"}


def usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    aliases = {target: alias for alias, target in ALIASES.items()}
    lines = ["usage: sapretrain <command> [options]   (sapretrain <command> --help for its options)", "",
             "commands:"]
    for name, (_, about) in COMMANDS.items():
        alias = f" (alias: {aliases[name]})" if name in aliases else ""
        lines.append(f"  {name:<{width}}{about}{alias}")
    lines += ["", "Each is also a console script, sapretrain-<command>, and tools/<command>.py in a checkout."]
    return "\n".join(lines)


def load_command(name: str) -> Callable[[list[str] | None], int]:
    """The ``main`` of command ``name`` (or an alias); ``LookupError`` with the reason when there is none."""
    name = ALIASES.get(name, name)
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, [*COMMANDS, *ALIASES], n=1)
        raise LookupError(f"unknown command {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    module_name, function = COMMANDS[name][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # a dependency of the command is missing: that traceback is the message
            raise
        raise LookupError(f"command {name!r} is not available in this installation ({module_name} is missing)") from e
    return getattr(module, function)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from sapretrain import __version__

        print(f"sapretrain {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    try:
        command = load_command(name)
    except LookupError as e:
        print(f"sapretrain: {e} (sapretrain --help lists the commands)", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [f"sapretrain {name}", *rest]  # argparse names the program after argv[0] in usage lines
    try:
        return command(rest)
    finally:
        sys.argv = saved
