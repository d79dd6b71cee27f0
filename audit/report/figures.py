"""Static figures (SVG) drawn from the saved run, so the PDF shows exactly what the HTML shows.

Charts are generic (bars with intervals, matrices, reliability, histograms) and exposed to the
templates, so a new probe's section can draw its figures without new Python. Never imports torch.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

plt.rcParams.update({
    "text.parse_math": False,  # class names and ids are data: "$x^2$" is drawn as typed, never parsed as math text
    "text.usetex": False,
    "svg.fonttype": "path",  # text as outlines: identical in every viewer and in the PDF
    "svg.hashsalt": "model-audit",  # deterministic ids: the same run gives the same bytes
    "font.size": 8,
    "font.family": "DejaVu Sans",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 9,
    "figure.dpi": 120,  # raster figures (sample strips): enough for inputs of up to ~100 px a panel at their printed size
})

# Colour-blind-safe and still distinct in grey-scale print (Okabe-Ito, varied lightness).
BLUE, ORANGE, GREY, DARK, GREEN, RED = "#0072B2", "#E69F00", "#999999", "#333333", "#009E73", "#D55E00"
MAX_MATRIX_CLASSES = 30


def _svg(fig: plt.Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return buffer.getvalue()


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _short(label: str, width: int = 18) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def bars(labels: Sequence[str], values: Sequence[float | None], lows: Sequence[float | None] | None = None,
         highs: Sequence[float | None] | None = None, xlabel: str = "", limit: float | None = None,
         limit_label: str = "", percent: bool = True, highlight: Sequence[bool] | None = None, unit: str | None = None) -> str:
    """Horizontal bars with optional interval whiskers and a dashed threshold line. `unit` (percent,
    points or number; default percent when `percent`) sets the axis and the value labels, which
    carry the precision the report's tables use for that unit."""
    unit = unit or ("percent" if percent else "number")
    n = len(labels)
    fig, ax = plt.subplots(figsize=(5.6, 0.9 + 0.24 * max(n, 1)))
    ys = np.arange(n)[::-1]
    vals = np.array([np.nan if v is None else v for v in values], dtype=float)
    colours = [ORANGE if (highlight and highlight[i]) else BLUE for i in range(n)]
    hatches = ["//" if (highlight and highlight[i]) else "" for i in range(n)]
    bars_ = ax.barh(ys, np.nan_to_num(vals), color=colours, height=0.6, edgecolor=DARK, linewidth=0.4)
    for bar, hatch in zip(bars_, hatches, strict=True):
        bar.set_hatch(hatch)
    if lows is not None and highs is not None:
        lo = np.array([np.nan if v is None else v for v in lows], dtype=float)
        hi = np.array([np.nan if v is None else v for v in highs], dtype=float)
        ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(vals)
        ax.errorbar(vals[ok], ys[ok], xerr=[vals[ok] - lo[ok], hi[ok] - vals[ok]], fmt="none", ecolor=DARK, elinewidth=0.8, capsize=2)
    if limit is not None:
        ax.axvline(limit, color=RED, linestyle="--", linewidth=1)
        if limit_label:
            ax.text(limit, n - 0.4, f" {limit_label}", color=RED, va="bottom", fontsize=7)
    ax.set_yticks(ys, [_short(str(l), 30) for l in labels])
    if unit == "percent":
        top = max(1.0, float(np.nanmax(vals)) if np.isfinite(vals).any() else 1.0)
        bottom = min(0.0, float(np.nanmin(vals)) if np.isfinite(vals).any() else 0.0)
        ax.set_xlim(bottom, top)
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    elif unit == "points":
        ax.axvline(0, color=GREY, linewidth=0.6)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{100 * v:+.0f}"))
    ends = vals.copy()
    if lows is not None and highs is not None:
        ends = np.where(ok, np.fmax(vals, hi), vals)  # the label goes past the whisker, not over it
    for y, v, end in zip(ys, vals, ends, strict=True):
        if np.isfinite(v):
            ax.text(end, y, f"  {value_label(v, unit)}", va="center", fontsize=7, color=DARK)
    ax.set_xlabel(xlabel)
    return _svg(fig)


def value_label(value: float, unit: str) -> str:
    """A bar's label at the precision the report's tables give the same unit."""
    if unit == "percent":
        return f"{value:.1%}"
    if unit == "points":
        return f"{100 * value:+.1f} points"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.3g}"


def reliability(curves: dict[str, list[dict[str, Any]]]) -> str:
    """Reliability diagram: accuracy against mean confidence per bin; the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot([0, 1], [0, 1], color=GREY, linestyle=":", linewidth=1, label="perfect calibration")
    styles = [(BLUE, "o", "-"), (ORANGE, "s", "--"), (GREEN, "^", "-."), (RED, "D", ":")]
    for (name, bins), (colour, marker, line) in zip(curves.items(), styles * 4, strict=False):
        points = [(b["confidence"], b["accuracy"], b["count"]) for b in bins if b["count"]]
        if not points:
            continue
        conf, acc, count = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        sizes = 8 + 60 * count / count.max()
        ax.plot(conf, acc, color=colour, linestyle=line, linewidth=1, label=name)
        ax.scatter(conf, acc, s=sizes, color=colour, marker=marker, edgecolor=DARK, linewidth=0.3, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    return _svg(fig)


def histogram(edges: Sequence[float], series: dict[str, Sequence[int]], xlabel: str = "", ylabel: str = "samples") -> str:
    """Stacked histogram of pre-binned counts (e.g. confidence of correct vs wrong predictions)."""
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    edges_ = np.asarray(edges, dtype=float)
    widths = np.diff(edges_)
    bottom = np.zeros(len(widths))
    for (name, counts), colour, hatch in zip(series.items(), [BLUE, ORANGE, GREEN, RED], ["", "//", "..", "xx"], strict=False):
        counts_ = np.asarray(counts, dtype=float)
        ax.bar(edges_[:-1], counts_, width=widths, bottom=bottom, align="edge", color=colour, hatch=hatch,
               edgecolor=DARK, linewidth=0.3, label=name)
        bottom += counts_
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, frameon=False)
    return _svg(fig)


def matrix(values: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], xlabel: str = "predicted",
           ylabel: str = "true", normalise_rows: bool = True) -> str:
    """Confusion-style matrix, row-normalised shading with raw counts written in each cell."""
    data = np.asarray(values, dtype=float)
    keep = np.arange(len(rows))
    if len(rows) > MAX_MATRIX_CLASSES:
        errors = data.sum(axis=1) - np.diag(data)
        keep = np.sort(np.argsort(-errors)[:MAX_MATRIX_CLASSES])
        data = data[np.ix_(keep, keep)]
    rows_ = [rows[i] for i in keep]
    cols_ = [cols[i] for i in keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        shade = data / data.sum(axis=1, keepdims=True) if normalise_rows else data / max(data.max(), 1)
    shade = np.nan_to_num(shade)
    size = 1.2 + 0.38 * len(rows_)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(data):
        if v:
            ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=6 if len(rows_) > 12 else 7,
                    color="white" if shade[i, j] > 0.55 else DARK)
    ax.set_xticks(range(len(cols_)), [_short(c, 12) for c in cols_], rotation=45, ha="right")
    ax.set_yticks(range(len(rows_)), [_short(r, 12) for r in rows_])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.spines[:].set_visible(False)
    return _svg(fig)


SCATTER_COLOURS = (BLUE, ORANGE, GREEN, RED, "#CC79A7", "#56B4E9", "#F0E442", DARK)
SCATTER_MAX_GROUPS = 20  # more classes than this are drawn in grey beyond the 19 largest ("other")


def scatter(x: Sequence[float], y: Sequence[float], groups: Sequence[str], order: Sequence[str] | None = None,
            xlabel: str = "", ylabel: str = "", colours: dict[str, str] | None = None) -> str:
    """A 2-D projection, one colour per group, legend below it (two maps fit side by side on A4). The
    points are rasterised inside the SVG (tens of thousands of markers stay a small file); axes and
    legend stay vector."""
    x, y, groups = np.asarray(x, float), np.asarray(y, float), np.asarray(groups, dtype=object)
    names = list(order) if order is not None else sorted({str(g) for g in groups})
    if len(names) > SCATTER_MAX_GROUPS:
        counts = {n: int((groups == n).sum()) for n in names}
        kept = sorted(names, key=lambda n: -counts[n])[: SCATTER_MAX_GROUPS - 1]
        groups = np.where(np.isin(groups, kept), groups, "other")
        names = [n for n in names if n in kept] + ["other"]
    palette = dict(colours or {})
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(n for n in names if n not in palette):
        palette[name] = SCATTER_COLOURS[i] if len(names) <= len(SCATTER_COLOURS) else cmap(i % 20)
    palette.setdefault("other", GREY)
    size = 4.0 if len(x) > 5000 else 9.0 if len(x) > 500 else 16.0
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    for name in names:
        chosen = groups == name
        if chosen.any():
            ax.scatter(x[chosen], y[chosen], s=size, c=[palette[name]], label=f"{_short(str(name))} ({int(chosen.sum())})",
                       linewidths=0, alpha=0.75, rasterized=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(names)), frameon=False, markerscale=1.5,
              fontsize=7, handletextpad=0.2, columnspacing=0.8)
    return _svg(fig)


class Charts:
    """What templates call: each method returns a data URI for an <img>."""

    def scatter(self, *args: Any, **kwargs: Any) -> str:
        return data_uri(scatter(*args, **kwargs))

    def bars(self, *args: Any, **kwargs: Any) -> str:
        return data_uri(bars(*args, **kwargs))

    def reliability(self, *args: Any, **kwargs: Any) -> str:
        return data_uri(reliability(*args, **kwargs))

    def histogram(self, *args: Any, **kwargs: Any) -> str:
        return data_uri(histogram(*args, **kwargs))

    def matrix(self, *args: Any, **kwargs: Any) -> str:
        return data_uri(matrix(*args, **kwargs))


MM_PER_INCH = 25.4
PANELS_PER_ROW = 6  # at most this many image panels side by side: each stays at least 27 mm wide on A4
PANEL_TITLE_PT = 7.0  # the smallest type on paper
HEAT_PERCENTILE = 99.0  # heatmaps are scaled to this percentile of the positive evidence, not to one hot pixel
HEAT_CMAP = "inferno"


@dataclass(frozen=True)
class Picture:
    """An encoded raster figure and the width, in millimetres, it was drawn for: shown at that
    width its type has the size it was set in."""

    data: bytes
    mime: str
    width_mm: float

    @property
    def uri(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")


def robust_scale(heat: np.ndarray) -> np.ndarray:
    """Positive evidence over its 99th percentile, clipped to [0, 1]: one extreme pixel no longer
    turns the rest of the map black."""
    positive = np.clip(np.nan_to_num(np.asarray(heat, dtype=float)), 0, None)
    values = positive[positive > 0]
    if not len(values):
        return positive
    top = float(np.percentile(values, HEAT_PERCENTILE))
    return np.clip(positive / top, 0, 1) if top > 0 else positive


def palette_png(rgb: np.ndarray) -> bytes:
    """An RGB raster as a 256-colour palette PNG: pictures of a few hundred pixels a side, with flat
    colour in their titles, stay sharp at a fraction of the size of a true-colour PNG."""
    from PIL import Image

    image = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def sample_strip(panels: Sequence[dict[str, Any]], size: float = 1.1, per_row: int = PANELS_PER_ROW) -> Picture:
    """Rows of small images: each panel an image, optionally a heatmap over it and the object's outline.

    panel = {"image": HxW or HxWx3 uint8, "heat": 2-D float or None, "outline": HxW bool or None, "caption": str}.
    At most `per_row` panels side by side (more wrap onto further rows), titles in 7 pt at the drawn
    size. Heatmaps show the positive evidence scaled per panel to its 99th percentile, in a sequential
    colour map that reads in grey-scale too, with one colour bar for the figure. `size` is a panel's
    width in inches.
    """
    columns = max(1, min(per_row, len(panels)))
    rows = -(-len(panels) // columns)
    heated = any(panel.get("heat") is not None for panel in panels)
    bar = 0.42 if heated else 0.0
    width, height = size * columns + bar, size * 1.32 * rows
    fig = plt.figure(figsize=(width, height))
    for k, panel in enumerate(panels):
        r, c = divmod(k, columns)
        ax = fig.add_axes(((c * size + 0.03 * size) / width, 1 - (r + 1) * size * 1.32 / height + 0.02 * size / height,
                           0.94 * size / width, 0.94 * size / height))
        image = panel["image"]
        h, w = image.shape[:2]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        heat = panel.get("heat")
        if heat is not None:
            ax.imshow(robust_scale(heat), cmap=HEAT_CMAP, alpha=0.6, vmin=0, vmax=1,
                      extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
        outline = panel.get("outline")
        if outline is not None and np.asarray(outline).any():
            ax.contour(np.asarray(outline, dtype=float), levels=[0.5], colors=["#00E5FF"], linewidths=0.8)
        ax.set_title(panel.get("caption", ""), fontsize=PANEL_TITLE_PT, pad=2, linespacing=1.0)
        ax.spines[:].set_visible(False)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    if heated:
        cax = fig.add_axes(((width - bar + 0.05) / width, 0.5 - 0.36 * size / height, 0.08 / width, 0.72 * size / height))
        scale = fig.colorbar(matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=HEAT_CMAP), cax=cax, ticks=[0, 1])
        scale.ax.set_yticklabels(["0", "p99"], fontsize=PANEL_TITLE_PT)
        scale.ax.tick_params(length=2, pad=1)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return Picture(palette_png(rgb), "image/png", width * MM_PER_INCH)
