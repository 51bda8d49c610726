"""Training curves as a PNG next to ``metrics.jsonl`` (written at the end of a run)."""
from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics: str | Path, out: str | Path) -> Path | None:
    """One panel of loss terms and one of throughput per step; None when there is nothing to plot."""
    lines = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in lines]
    terms = [k for k in lines[0] if k.endswith("_loss") or k == "loss"]
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    for term in terms:
        ax_loss.plot(steps, [m[term] for m in lines], label=term.removesuffix("_loss"), lw=2 if term == "loss" else 1)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss terms")
    ax_loss.legend()
    ax_speed.plot(steps, [m["pairs_per_s"] for m in lines], color="tab:green")
    ax_speed.set(xlabel="step", ylabel="pairs / s", title="throughput (all ranks)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
