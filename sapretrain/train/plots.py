"""Training curves as a PNG next to ``metrics.jsonl`` (written at the end of a run).

``metrics.jsonl`` holds two kinds of records: training logs (``loss``, its terms, ``pairs_per_s``)
and validations (``val/loss``, ``val/*_loss``, ``val/relation_accuracy``, ... from
sapretrain/train/validate.py). Validation losses are drawn dashed beside the training terms of the
same name, the validation accuracies in a panel of their own.
"""
from __future__ import annotations

import json
from pathlib import Path

VAL = "val/"
# Validation metrics in [0, 1] drawn in the accuracy panel, with their legend labels.
VAL_ACCURACIES = {
    "val/relation_accuracy": "relation accuracy",
    "val/image_to_text_r1": "R@1 image→text",
    "val/text_to_image_r1": "R@1 text→image",
    "val/spatial_probe_accuracy": "spatial probe (gold boxes)",
}


def read_metrics(metrics: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl``; lines that do not parse (a torn write) are left out."""
    records = []
    for line in Path(metrics).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def metrics_figure(records: list[dict]):
    """The figure of ``records``: loss terms (training solid, validation dashed), throughput, and
    with validations a panel of validation accuracies. None when there is nothing to plot."""
    train = [m for m in records if "loss" in m]
    val = [m for m in records if f"{VAL}loss" in m]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if val else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    ax_loss, ax_speed = axes[0], axes[1]
    terms = [k for k in (train or [{}])[0] if k.endswith("_loss") or k == "loss"]
    val_terms = [k for k in val[0] if k.startswith(VAL) and (k.endswith("_loss") or k == f"{VAL}loss")] if val else []
    colors = {}
    for term in terms:
        steps, values = _series(train, term)
        (line,) = ax_loss.plot(steps, values, label=term.removesuffix("_loss"), lw=2 if term == "loss" else 1)
        colors[term] = line.get_color()
    for term in val_terms:
        name = term.removeprefix(VAL)
        steps, values = _series(val, term)
        ax_loss.plot(steps, values, ls="--", marker="o", ms=3, color=colors.get(name),
                     label=f"val {name.removesuffix('_loss')}", lw=2 if name == "loss" else 1)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss terms (dashed: validation)" if val else "loss terms")
    ax_loss.legend(fontsize="small")
    ax_speed.plot(*_series(train, "pairs_per_s"), color="tab:green")
    ax_speed.set(xlabel="step", ylabel="pairs / s", title="throughput (all ranks)")
    if val:
        ax_val = axes[2]
        for key, label in VAL_ACCURACIES.items():
            if any(key in m for m in val):
                ax_val.plot(*_series(val, key), marker="o", ms=3, label=label)
        ax_val.set(xlabel="step", ylabel="fraction", ylim=(-0.02, 1.02),
                   title=f"validation ({val[-1].get(f'{VAL}pairs', '?')} held-out pairs)")
        ax_val.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], m[key]) for m in records if key in m]
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(metrics: str | Path, out: str | Path) -> Path | None:
    """``metrics.jsonl`` drawn to the PNG ``out`` (:func:`metrics_figure`); None when there is
    nothing to plot."""
    fig = metrics_figure(read_metrics(metrics))
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
