r"""Negative captions judged without the image: blind probe accuracy, fluency, validity.

    sapretrain eval-negatives negatives.jsonl [more files ...] [--encoder minilm|ngram|minilm,ngram] \
        [--folds 2] [--split-seed 1] [--validity] [--corpus captions.jsonl] [--json report.json] [--plot report.png]
    sapretrain eval-negatives data/sugarcrepe/replace_rel.json data/aro/visual_genome_relation.json

Each file is our negatives JSONL (``make-negatives`` / ``curate`` output), a SugarCrepe file
(``{id: {caption, negative_caption}}``) or an ARO file (VG-Relation / VG-Attribution,
COCO/Flickr-Order); several files are scored together and reported per method, so anchors and
ours are measured the same way. **Blind accuracy** is the share of (caption, negative) pairs in
which a linear probe on a frozen text encoder, trained on other captions' pairs, prefers the
real caption: 0.5 means the text alone gives nothing away. ``--encoder`` takes several encoders
(comma-separated), each reported on its own. Details: sapretrain/curation/negeval.py.
"""
from __future__ import annotations

import argparse
import json
import sys

from sapretrain.curation.negeval import ENCODERS, evaluate_negatives, format_report, read_pairs


def plot_report(reports: dict[str, dict], path: str) -> None:
    """Blind accuracy with its 95 % interval per method, one bar group per encoder."""
    import matplotlib.pyplot as plt
    import numpy as np

    first = next(iter(reports.values()))
    methods = ["all"] + list(first["methods"])

    def row(rep: dict, m: str) -> dict:
        return rep["overall"] if m == "all" else rep["methods"][m]

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(methods) + 2), 3.6))
    width = 0.8 / len(reports)
    for k, (enc, rep) in enumerate(reports.items()):
        acc = np.array([row(rep, m)["blind_accuracy"] for m in methods])
        ci = np.array([row(rep, m)["ci95"] for m in methods])
        x = np.arange(len(methods)) + (k - (len(reports) - 1) / 2) * width
        ax.bar(x, acc, width, yerr=[acc - ci[:, 0], ci[:, 1] - acc], capsize=3, label=enc)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(methods)), [f"{m}\n(n={row(first, m)['pairs']})" for m in methods], fontsize=8)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("blind pairwise accuracy")
    ax.set_title("Negative told apart without the image (0.5 = no shortcut)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="negatives JSONL, SugarCrepe or ARO files (paths or fsspec URLs)")
    parser.add_argument("--encoder", default="minilm",
                        help=f"probe encoder(s), comma-separated: {', '.join(ENCODERS)}, a sentence-transformers "
                             "folder, or a+b for both side by side (default minilm)")
    parser.add_argument("--folds", type=int, default=2, help="caption folds of the cross-fitted probe (default 2)")
    parser.add_argument("--split-seed", type=int, default=1,
                        help="which caption split the probe uses (default 1; make-negatives' refinement drops on "
                             "split 0, so scoring there would grade the drops on their own split)")
    parser.add_argument("--validity", action="store_true", help="also re-parse every negative (spaCy) for validity")
    parser.add_argument("--model", help="spaCy model for --validity (default: svo.load_nlp's choice)")
    parser.add_argument("--corpus", nargs="*", default=[], help="extra caption files for the fluency counts")
    parser.add_argument("--min-expected", type=float, default=3.0,
                        help="a new bigram is 'unattested' when unseen but expected this often (default 3)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the interval")
    parser.add_argument("--device", default="auto", help="encoder device (auto, cpu, cuda)")
    parser.add_argument("--json", help="write the report(s) here")
    parser.add_argument("--plot", help="write a PNG of accuracy per method here")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error("--folds must be at least 2")

    pairs = []
    for path in args.inputs:
        try:
            found, skipped = read_pairs(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            parser.error(f"{path}: {e}")
        print(f"{path}: {len(found)} pairs" + (f", skipped {dict(skipped)}" if skipped else ""), file=sys.stderr)
        pairs += found
    if not pairs:
        print("error: no (caption, negative) pairs in the inputs: nothing to evaluate", file=sys.stderr)
        return 1
    if len({p.caption for p in pairs}) < 2 * args.folds:
        print(f"error: {len({p.caption for p in pairs})} distinct captions are too few for {args.folds} folds",
              file=sys.stderr)
        return 1
    nlp = None
    if args.validity:
        from sapretrain.curation.svo import load_nlp

        nlp = load_nlp(args.model)
    corpus = []
    if args.corpus:
        from sapretrain.curation.negeval import read_captions

        corpus = list(read_captions(args.corpus))
    reports = {}
    for enc in [e.strip() for e in args.encoder.split(",") if e.strip()]:
        rep = evaluate_negatives(pairs, encoder=enc, folds=args.folds, corpus=corpus, nlp=nlp,
                                 min_expected=args.min_expected, n_boot=args.bootstrap, device=args.device,
                                 split_seed=args.split_seed)
        nlp = None  # validity does not depend on the encoder: counted (and reported) with the first
        reports[enc] = rep
        print(format_report(rep))
    if args.json:
        from sapretrain import storage

        storage.write_bytes_atomic(args.json, json.dumps(reports, indent=1).encode("utf-8"))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot_report(reports, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
