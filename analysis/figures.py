"""Figures, written as PNG and PDF: envelope shapes, learning curves, sensitivity, dynamics."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from analysis.load import ABBREVIATIONS
from envelopes.shapes import SHAPES, threshold_shapes

plt.rcParams.update({"figure.dpi": 120, "savefig.dpi": 200, "font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8})


def save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return paths


def envelope_shapes(out_dir: Path) -> list[Path]:
    """Each thresholded shape's weight (step, linear, sigmoid) against the loss, with T and the transition width marked."""
    import torch

    from envelopes import envelope_weight

    threshold, inverse_slope = 1.0, 0.8
    loss = torch.linspace(0.0, 2.0, 801, dtype=torch.float64)
    shapes = threshold_shapes()
    fig, axes = plt.subplots(1, len(shapes), figsize=(7.0 / 3 * len(shapes), 2.3), sharey=True, layout="constrained")
    for ax, shape in zip(axes, shapes):
        weight = envelope_weight(loss, shape, threshold, inverse_slope)
        ax.plot(loss.numpy(), weight.numpy(), color=SHAPES[shape].colour, lw=1.8)
        ax.axvline(threshold, color="k", ls="--", lw=0.8)
        ax.text(threshold + 0.04, 1.05, "T", ha="left", va="bottom")
        if SHAPES[shape].width:
            ax.axvspan(threshold - inverse_slope / 2, threshold + inverse_slope / 2, color="0.85", zorder=0)
            ax.annotate(
                "",
                xy=(threshold - inverse_slope / 2, 0.12),
                xytext=(threshold + inverse_slope / 2, 0.12),
                arrowprops={"arrowstyle": "<->", "lw": 0.8},
            )
            ax.text(threshold, 0.16, "invslope", ha="center", fontsize=7)
        ax.set_title(shape)
        ax.set_xlabel("loss $l$")
        ax.set_ylim(-0.05, 1.15)
    axes[0].set_ylabel("weight $w(l)$")
    fig.suptitle(f"Envelope shapes (T = {threshold}, invslope = {inverse_slope}; shaded: the transition width)")
    return save(fig, out_dir, "envelope_shapes")


def _row_colours(table: pd.DataFrame) -> list:
    """One colour per table row: the shape's colour with one loss, a qualitative cycle with several."""
    shapes = [str(s).split(" / ") for s in table["shapes"]]
    if all(len(s) == 1 and s[0] in SHAPES for s in shapes) and len({s[0] for s in shapes}) == len(shapes):
        return [SHAPES[s[0]].colour for s in shapes]
    cycle = plt.get_cmap("tab10").colors
    return [cycle[i % len(cycle)] for i in range(len(table))]


SPELLED = dict(ABBREVIATIONS.values())  # letter -> name


def readable(label: str) -> str:
    """A table's envelope label with its abbreviations spelled out, for legends.

    ``mse: linear q=0.9 w=0.3 a=0.01`` reads ``mse: linear, threshold quantile 0.9, width 0.3, step size 0.01``.
    """
    letters = "|".join(map(re.escape, SPELLED))
    return re.sub(rf" ({letters})=([^\s;]+)", lambda m: f", {SPELLED[m.group(1)]} {m.group(2)}", label)


def _step_column(metrics: pd.DataFrame) -> str:
    return "epoch" if "epoch" in metrics.columns else "step"


def _label(row) -> str:
    """A row's legend entry: what varies in its sweep (``label``), abbreviations spelled out."""
    return readable(str(row["label"] if "label" in row and isinstance(row["label"], str) else row["envelopes"]))


# points a curve is drawn with at most: a panel a few inches wide shows no more, and the per-update
# statistics of long runs (2,000 updates of PPO) drawn point by point are a band of noise
MAX_POINTS = 400


def _bin_size(curves) -> int:
    """The least number of consecutive logged steps per bin that draws each curve with at most :data:`MAX_POINTS`."""
    return max(1, -(-max((len(c) for c in curves), default=0) // MAX_POINTS))


def _binned(curve, k: int):
    """A curve (a Series or DataFrame indexed by step) as the means of bins of ``k`` consecutive logged steps,
    each at its bin's mean step; ``k = 1`` leaves it as it is."""
    if k <= 1:
        return curve
    bins = np.arange(len(curve)) // k
    binned = curve.groupby(bins).mean()
    binned.index = curve.index.to_series().groupby(bins).mean().to_numpy()
    return binned


def _bins_note(k: int) -> str:
    return f", means over bins of {k} logged steps" if k > 1 else ""


def _x_axis(ax, x: str) -> None:
    ax.set_xlabel(x)
    if x == "epoch":  # whole epochs: no ticks at 1.2, 1.4, ...
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    else:  # environment steps as 100k, 1.5M: six-digit labels run into each other in a panel of a row
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))


def learning_curves(
    metrics: pd.DataFrame, table: pd.DataFrame, metric: str, out_dir: Path, suffix: str = ""
) -> list[Path]:
    """``metric`` for each row of the table (the best config per shape): mean ± std over seeds, and beside it
    each row's mean minus identity's, where the curves of near-equal envelopes would lie on top of each other."""
    if metrics.empty or metric not in metrics.columns:
        return []
    x = _step_column(metrics)
    curves = {
        row["config_id"]: metrics[metrics["config_id"] == row["config_id"]]
        .groupby(x)[metric]
        .agg(["mean", "std", "count"])
        for _, row in table.iterrows()
    }
    counts = {config: int(curve["count"].max()) for config, curve in curves.items()}
    k = _bin_size(curves.values())
    curves = {config: _binned(curve, k) for config, curve in curves.items()}
    baseline = table[table["verdict"] == "baseline"] if "verdict" in table.columns else table.iloc[:0]
    base = curves[baseline["config_id"].iloc[0]] if not baseline.empty else None
    panels = 1 if base is None or len(table) < 2 else 2
    fig, axes = plt.subplots(
        1, panels, figsize=(4.8 * panels, 3.2 + 0.18 * len(table)), layout="constrained", squeeze=False
    )
    axes = axes[0]
    for colour, (_, row) in zip(_row_colours(table), table.iterrows()):
        curve = curves[row["config_id"]]
        label = f"{_label(row)} (n={counts[row['config_id']]})"
        axes[0].plot(curve.index, curve["mean"], label=label, color=colour, lw=1.4)
        spread = curve["std"].fillna(0)
        axes[0].fill_between(
            curve.index, curve["mean"] - spread, curve["mean"] + spread, color=colour, alpha=0.12, lw=0
        )
        if panels == 2:
            difference = (curve["mean"] - base["mean"]).dropna()
            axes[1].plot(difference.index, difference.values, color=colour, lw=1.4)
    axes[0].set_ylabel(metric)
    axes[0].set_title(
        f"{metric}: mean ± std over seeds{_bins_note(k)}{' (' + suffix.strip('_') + ')' if suffix else ''}", wrap=True
    )
    if panels == 2:
        axes[1].axhline(0.0, color="0.3", lw=0.8)
        # the baseline is identity where only envelopes vary; with other factors, it is named in the title
        only_envelopes = table.attrs.get("factors", ["envelopes"]) in (["envelopes"], [])
        axes[1].set_ylabel(f"{metric} minus {'identity' if only_envelopes else 'the baseline'}'s")
        axes[1].set_title(f"difference from the baseline ({_label(baseline.iloc[0])}), mean over seeds", wrap=True)
    for ax in axes:
        _x_axis(ax, x)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", frameon=False)
    return save(fig, out_dir, f"learning_curves_{metric}{suffix}")


def sensitivity_heatmaps(
    agg: pd.DataFrame, loss: str, metric: str, mode: str, out_dir: Path, suffix: str = ""
) -> list[Path]:
    """``metric`` (mean over seeds) over threshold quantile x width, one panel per shape and step size.

    Where other settings vary too (another loss's envelope, a task key), a cell holds several
    configurations: it shows the mean of their means, and the title says over how many.
    """
    shape_col, q_col, w_col, a_col = (f"env_{loss}_{k}" for k in ("shape", "quantile", "width", "step_size"))
    column = f"{metric}_mean"
    if q_col not in agg.columns or column not in agg.columns:
        return []
    adaptive = agg[agg[q_col].notna() & agg[shape_col].isin(threshold_shapes())].copy()
    if adaptive.empty or adaptive[q_col].nunique() < 2:
        return []
    adaptive[w_col] = adaptive[w_col] if w_col in adaptive.columns else np.nan
    adaptive[a_col] = adaptive[a_col].fillna(1.0) if a_col in adaptive.columns else 1.0
    cell = [shape_col, a_col, q_col, w_col]
    counts = adaptive.groupby(cell, dropna=False)[column].count()
    adaptive = adaptive.groupby(cell, dropna=False, as_index=False)[column].mean()
    panels = sorted(
        {(s, a) for s, a in zip(adaptive[shape_col], adaptive[a_col])},
        key=lambda p: (threshold_shapes().index(p[0]), p[1]),
    )
    vmin, vmax = adaptive[column].min(), adaptive[column].max()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.6 * cols + 0.8, 2.3 * rows + 0.7), squeeze=False, layout="constrained"
    )
    cmap = "viridis_r" if mode == "min" else "viridis"
    image = None
    for ax, (shape, step_size) in zip(axes.flat, panels):
        panel = adaptive[(adaptive[shape_col] == shape) & (adaptive[a_col] == step_size)]
        quantiles = sorted(panel[q_col].unique())
        widths = sorted(panel[w_col].dropna().unique()) or [math.nan]
        grid = np.full((len(widths), len(quantiles)), np.nan)
        for _, r in panel.iterrows():
            wi = 0 if math.isnan(widths[0]) else widths.index(r[w_col])
            grid[wi, quantiles.index(r[q_col])] = r[column]
        image = ax.imshow(grid, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                # viridis is light at its top end: dark text there, light text elsewhere
                position = (value - vmin) / (vmax - vmin) if vmax > vmin else 0.5
                light_cell = (position < 0.4) if mode == "min" else (position > 0.6)
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=6, color="k" if light_cell else "w")
        ax.set_xticks(range(len(quantiles)), [f"{q:g}" for q in quantiles])
        ax.set_yticks(range(len(widths)), ["n/a" if math.isnan(w) else f"{w:g}" for w in widths])
        ax.set_xlabel("threshold quantile")
        ax.set_ylabel("width" if shape != "step" else "")
        ax.set_title(f"{shape}, step size {step_size:g}")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    several = int(counts.max()) > 1
    label = f"{metric} (mean over seeds" + (", then over a cell's configurations)" if several else ")")
    # below the panels: a label along a single row's height would stretch the figure
    fig.colorbar(image, ax=axes.ravel().tolist(), location="bottom", shrink=0.6, aspect=40, label=label)
    title = f"Sensitivity of {metric} ({loss} envelope); white: not in the sweep"
    if several:
        low, high = int(counts.min()), int(counts.max())
        many = f"{low}" if low == high else f"{low}-{high}"
        title += f"\neach cell: the mean of {many} configurations that differ in other settings"
    fig.suptitle(title)
    return save(fig, out_dir, f"sensitivity_{loss}_{metric}{suffix}")


# the envelope's logged series that envelope_dynamics draws: metric suffix, axis label
ENVELOPE_SERIES = (
    ("mean_weight", "mean weight"),
    ("fraction_attenuated", "fraction attenuated"),
    ("threshold", "threshold T"),
)


def envelope_dynamics(
    metrics: pd.DataFrame, table: pd.DataFrame, loss: str, out_dir: Path, suffix: str = ""
) -> list[Path]:
    """Mean weight, fraction attenuated and threshold over training, mean over seeds."""
    columns = [(f"envelope_{loss}_{n}", label) for n, label in ENVELOPE_SERIES]
    if metrics.empty or columns[0][0] not in metrics.columns:
        return []
    x = _step_column(metrics)
    rows = table[table[f"env_{loss}_shape"] != "identity"]
    if rows.empty:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 2.7 + 0.18 * len(rows)), layout="constrained")
    curves = {}  # (row, column): the mean over seeds at each logged step
    for i, (_, row) in enumerate(rows.iterrows()):
        data = metrics[metrics["config_id"] == row["config_id"]]
        for column, _ in columns:
            if column in data.columns and data[column].notna().any():
                curves[i, column] = data.groupby(x)[column].mean()
    k = _bin_size(curves.values())
    for i, (colour, (_, row)) in enumerate(zip(_row_colours(rows), rows.iterrows())):
        for ax, (column, _) in zip(axes, columns):
            if (i, column) in curves:
                curve = _binned(curves[i, column], k)
                ax.plot(curve.index, curve.values, color=colour, lw=1.3, label=_label(row))
    for ax, (_, label) in zip(axes, columns):
        _x_axis(ax, x)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylim(0, 1.02)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", frameon=False)
    fig.suptitle(
        f"Envelope dynamics ({loss}{', ' + suffix.strip('_') if suffix else ''}), mean over seeds{_bins_note(k)}"
    )
    return save(fig, out_dir, f"envelope_dynamics_{loss}{suffix}")
