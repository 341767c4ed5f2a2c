"""Figures of `ditf analyze` and `ditf show`: matplotlib (Agg canvas) and numpy only.

No torch, no zarr: every function takes plain arrays computed elsewhere (`ditf_pipeline.analysis.analyze`)
and writes one figure, in the format its file name ends with: PNG, or PDF / SVG (vector, for
papers). Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through
pyplot, so nothing depends on (or changes) the global backend. Every figure has a fixed size
(no tight bounding box), listed with each function in pixels at the default 100 dpi; `dpi`
scales a PNG's pixels, the layout stays the same. One notation throughout: z is a block's
activation (the cached pre-AdaLN feature, or its modulated/discarded versions), |z| its magnitude.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100  # layout unit: figure sizes are given in pixels at this dpi
#: figure file formats (by file ending)
FORMATS = ("png", "pdf", "svg")
MASSIVE_COLOUR = "#d62728"
_HEAT_BINS = (256, 512)  # (tokens, channels) shown in a heat map at most; max-pooled beyond


def _figure(width_px: int, height_px: int) -> Figure:
    # +0.01 px: matplotlib < 3.9 truncates width x dpi (10.2 in x 100 = 1019.999... -> 1019 px)
    fig = Figure(figsize=((width_px + 0.01) / DPI, (height_px + 0.01) / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_format(path: Path | str) -> str:
    """png, pdf or svg from the file ending; anything else is a DitfError."""
    from ..core.errors import DitfError

    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise DitfError(f"figure {path}: write a .png, .pdf or .svg file")
    return fmt


def _save(fig: Figure, path: Path | str, dpi: int | None = None) -> Path:
    path = Path(path)
    fmt = figure_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # vector files: fixed metadata so the same figure gives the same bytes
    metadata = {"Creator": "ditf", "CreationDate": None} if fmt == "pdf" else ({"Date": None} if fmt == "svg" else None)
    fig.savefig(path, dpi=dpi or DPI, format=fmt, metadata=metadata)
    return path


def _max_pool(values: np.ndarray, bins: tuple[int, int]) -> np.ndarray:
    """Max-pool a 2-D array down to at most `bins`, so one-channel spikes stay visible."""
    out = np.asarray(values, dtype=np.float32)
    for axis, n in enumerate(bins):
        size = out.shape[axis]
        if size > n:
            step = int(np.ceil(size / n))
            pad = step * int(np.ceil(size / step)) - size
            widths = [(0, 0), (0, 0)]
            widths[axis] = (0, pad)
            out = np.pad(out, widths, constant_values=-np.inf)
            shape = list(out.shape)
            shape[axis : axis + 1] = [shape[axis] // step, step]
            out = out.reshape(shape).max(axis=axis + 1)
    return out


def _mark_massive(ax, channel_values: np.ndarray, massive: Sequence[int], label: bool = True) -> None:
    for i, c in enumerate(massive):
        ax.plot([c], [channel_values[c]], "o", color=MASSIVE_COLOUR, markersize=5, zorder=3)
        if label:
            ax.annotate(str(c), (c, channel_values[c]), textcoords="offset points", xytext=(4, 2 - 10 * (i % 3)),
                        fontsize=8, color=MASSIVE_COLOUR)


# ---- ditf analyze -----------------------------------------------------------------------------


def plot_magnitudes(path: Path | str, example: Mapping[str, np.ndarray], channel_mean: Mapping[str, np.ndarray],
                    massive: Sequence[int], title: str = "", dpi: int | None = None) -> Path:
    """Activation magnitude per channel over tokens, one column per stage (paper Figure 5).

    Top row: |z| of one image as a tokens x channels heat map (max-pooled for display); bottom
    row: mean |z| over tokens per channel, massive channels in red. 1500 x 900 pixels.
    """
    stages = list(example)
    fig = _figure(1500, 900)
    axes = fig.subplots(2, len(stages), squeeze=False)
    for i, stage in enumerate(stages):
        magnitude = np.asarray(example[stage])
        n_tokens, n_channels = magnitude.shape
        heat = _max_pool(magnitude, _HEAT_BINS)
        ax = axes[0, i]
        image = ax.imshow(heat, aspect="auto", interpolation="nearest", cmap="magma",
                          extent=(-0.5, n_channels - 0.5, n_tokens - 0.5, -0.5))
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
        ax.set_title(f"{stage}: |z| of one image")
        ax.set_xlabel("channel")
        ax.set_ylabel("token")
        ax = axes[1, i]
        mean = np.asarray(channel_mean[stage])
        ax.plot(np.arange(len(mean)), mean, lw=0.8, color="#1f77b4")
        _mark_massive(ax, mean, massive)
        ax.set_title(f"{stage}: mean |z| over tokens")
        ax.set_xlabel("channel")
        ax.set_xlim(-0.5, len(mean) - 0.5)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.07, top=0.9, wspace=0.3, hspace=0.35)
    return _save(fig, path, dpi)


def plot_gate(path: Path | str, channel_mean: np.ndarray, gate: np.ndarray, massive: Sequence[int],
              title: str = "", dpi: int | None = None) -> Path:
    """Gate vs activation per channel (paper Figure 4). 1500 x 450 pixels.

    Left: mean |z| per channel; middle: the AdaLN gate per channel; right: |gate| against mean |z|
    (log), massive channels in red, labelled with their |gate| rank.
    """
    mean = np.asarray(channel_mean, dtype=np.float64)
    gate = np.asarray(gate, dtype=np.float64)
    order = np.argsort(-np.abs(gate), kind="stable")
    rank = np.empty(len(gate), dtype=np.int64)
    rank[order] = np.arange(1, len(gate) + 1)
    fig = _figure(1500, 450)
    ax_a, ax_g, ax_s = fig.subplots(1, 3)
    channels = np.arange(len(mean))
    ax_a.plot(channels, mean, lw=0.8)
    _mark_massive(ax_a, mean, massive)
    ax_a.set(title="mean |z| over tokens", xlabel="channel")
    ax_g.plot(channels, gate, lw=0.8, color="#2ca02c")
    _mark_massive(ax_g, gate, massive)
    ax_g.axhline(0, color="grey", lw=0.5)
    ax_g.set(title="AdaLN gate (mean over images)", xlabel="channel")
    others = np.setdiff1d(channels, np.asarray(list(massive), dtype=np.int64))
    ax_s.scatter(np.abs(gate[others]), np.maximum(mean[others], 1e-12), s=6, color="#7f7f7f", label="other channels")
    if len(massive):
        m = np.asarray(list(massive), dtype=np.int64)
        ax_s.scatter(np.abs(gate[m]), np.maximum(mean[m], 1e-12), s=24, color=MASSIVE_COLOUR, label="massive")
        for i, c in enumerate(m):
            ax_s.annotate(f"{c} (gate rank {rank[c]})", (abs(gate[c]), max(mean[c], 1e-12)), textcoords="offset points",
                          xytext=(-6, -12 - 11 * i), fontsize=8, color=MASSIVE_COLOUR, ha="right")
    ax_s.set_yscale("log")
    ax_s.set(title="|gate| vs mean |z|", xlabel="|gate|", ylabel="mean |z|")
    ax_s.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.85, wspace=0.3)
    return _save(fig, path, dpi)


def pca_size(n_images: int, n_stages: int) -> tuple[int, int]:
    """Pixel size of `plot_pca`: 240 px per column (image + stages), 240 px per row + 60."""
    return 240 * (1 + n_stages), 240 * n_images + 60


def plot_pca(path: Path | str, images: Sequence[np.ndarray], maps: Mapping[str, Sequence[np.ndarray]],
             names: Sequence[str] = (), title: str = "", dpi: int | None = None) -> Path:
    """PCA-to-RGB feature maps per stage (columns) for a few images (rows); size `pca_size`."""
    stages = list(maps)
    width, height = pca_size(len(images), len(stages))
    fig = _figure(width, height)
    axes = fig.subplots(len(images), 1 + len(stages), squeeze=False)
    for r, image in enumerate(images):
        columns = [("image" if not names else str(names[r]), image)] + [(s, maps[s][r]) for s in stages]
        for c, (label, picture) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or c == 0:
                ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 50 / height, wspace=0.05, hspace=0.15)
    return _save(fig, path, dpi)


def grid_colour_range(values: np.ndarray) -> tuple[float, float]:
    """Colour limits that fit the scored cells (a 0-100 scale would flatten a 60-67 grid), padded
    when every cell holds the same value."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return 0.0, 100.0
    low, high = float(finite.min()), float(finite.max())
    return (low - 1.0, high + 1.0) if high - low < 1e-9 else (low, high)


def plot_pck_grid(path: Path | str, ks: Sequence[int], ts: Sequence[int], values: np.ndarray, title: str = "",
                  label: str = "PCK", dpi: int | None = None) -> Path:
    """k x t heat map of PCK in percent (paper Figure 12), the colour range fitted to the values
    (`grid_colour_range`); NaN cells (not scored) left blank. 640 x 480 pixels."""
    values = np.asarray(values, dtype=np.float64).reshape(len(ks), len(ts))
    fig = _figure(640, 480)
    ax = fig.subplots()
    masked = np.ma.masked_invalid(values)
    vmin, vmax = grid_colour_range(values)
    image = ax.imshow(masked, cmap="viridis", aspect="auto", interpolation="nearest", origin="lower", vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, label=label)
    middle = (vmin + vmax) / 2
    for i in range(len(ks)):
        for j in range(len(ts)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=9,
                        color="white" if values[i, j] < middle else "black")
    ax.set_xticks(range(len(ts)), [str(t) for t in ts])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set(xlabel="timestep t", ylabel="block k", title=title)
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.12, top=0.9)
    return _save(fig, path, dpi)


# ---- ditf show --------------------------------------------------------------------------------


@dataclass
class PairView:
    """One pair to draw: images as (H, W, 3) uint8, points as (N, 2) (x, y) in original pixels."""

    src_image: np.ndarray
    trg_image: np.ndarray
    src_points: np.ndarray
    pred_points: np.ndarray
    trg_truth: np.ndarray | None = None  # ground truth in the target (keypoint view)
    correct: np.ndarray | None = None  # (N,) bool (keypoint view)
    title: str = ""
    radius: float | None = None  # alpha * threshold base, target pixels: drawn around each ground truth


#: width of the figures of `ditf show`, and height per pair
SHOW_WIDTH, SHOW_ROW_HEIGHT = 1200, 440
_GAP = 10  # pixels between source and target in the side-by-side canvas


def show_size(n_pairs: int) -> tuple[int, int]:
    return SHOW_WIDTH, SHOW_ROW_HEIGHT * n_pairs


def _side_by_side(src: np.ndarray, trg: np.ndarray) -> tuple[np.ndarray, int]:
    height = max(src.shape[0], trg.shape[0])
    canvas = np.full((height, src.shape[1] + _GAP + trg.shape[1], 3), 255, dtype=np.uint8)
    canvas[: src.shape[0], : src.shape[1]] = src
    offset = src.shape[1] + _GAP
    canvas[: trg.shape[0], offset:] = trg
    return canvas, offset


def _keypoint_colours(n: int) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["tab20"](np.arange(n) % 20)


def plot_pairs(path: Path | str, views: Sequence[PairView], dpi: int | None = None) -> Path:
    """Source | target with keypoints: source point and target ground truth as dots of the same
    colour; the prediction as a circle (correct at alpha) or a cross (wrong), joined to its
    ground truth by a thin line; with `radius`, a dashed circle of radius alpha * threshold base
    around each ground truth: the region a prediction must reach to count as correct.
    Size `show_size(len(views))`."""
    from matplotlib.patches import Circle

    def draw(ax, view: PairView, offset: int) -> None:
        colours = _keypoint_colours(len(view.src_points))
        src, pred = np.asarray(view.src_points, float), np.asarray(view.pred_points, float)
        truth = np.asarray(view.trg_truth, float) if view.trg_truth is not None else None
        correct = np.asarray(view.correct, bool) if view.correct is not None else np.ones(len(src), bool)
        for i in range(len(src)):
            colour = colours[i]
            ax.plot(src[i, 0], src[i, 1], "o", color=colour, markersize=7, markeredgecolor="white", markeredgewidth=1)
            if truth is not None:
                ax.plot(truth[i, 0] + offset, truth[i, 1], "o", color=colour, markersize=5, markeredgecolor="white",
                        markeredgewidth=0.8)
                if view.radius is not None:
                    ax.add_patch(Circle((truth[i, 0] + offset, truth[i, 1]), float(view.radius), fill=False,
                                        edgecolor=colour, linestyle="--", linewidth=1.0))
                ax.plot([truth[i, 0] + offset, pred[i, 0] + offset], [truth[i, 1], pred[i, 1]], "-", color=colour, lw=0.8)
            if correct[i]:
                ax.plot(pred[i, 0] + offset, pred[i, 1], "o", markerfacecolor="none", markeredgecolor=colour,
                        markersize=13, markeredgewidth=2.2)
            else:
                ax.plot(pred[i, 0] + offset, pred[i, 1], "x", color=colour, markersize=11, markeredgewidth=2.5)

    return _pair_figure(path, views, draw, dpi)


def _pair_figure(path: Path | str, views: Sequence[PairView], draw, dpi: int | None) -> Path:
    """One source | target panel per view, stacked (size `show_size`); `draw(ax, view, offset)`
    adds the marks, with target x shifted right by `offset`."""
    width, height = show_size(len(views))
    fig = _figure(width, height)
    axes = fig.subplots(len(views), 1, squeeze=False)[:, 0]
    for ax, view in zip(axes, views):
        canvas, offset = _side_by_side(view.src_image, view.trg_image)
        ax.imshow(canvas)
        draw(ax, view, offset)
        _frame(ax, canvas, view.title)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.95, hspace=0.2)
    return _save(fig, path, dpi)


def _frame(ax, canvas: np.ndarray, title: str) -> None:
    """Fit a pair panel's axes to its side-by-side canvas, image style (y down, no ticks)."""
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


def plot_dense(path: Path | str, views: Sequence[PairView], dpi: int | None = None) -> Path:
    """Dense nearest-neighbour matches: a grid of source points and their matches in the target,
    joined by lines and coloured by source position within the grid (x -> red, y -> green). Size `show_size`."""

    def draw(ax, view: PairView, offset: int) -> None:
        src, pred = np.asarray(view.src_points, float), np.asarray(view.pred_points, float)
        span = np.maximum(np.ptp(src, axis=0), 1.0) if len(src) else np.ones(2)
        unit = (src - src.min(axis=0)) / span if len(src) else src
        colours = np.clip(np.stack([unit[:, 0], unit[:, 1], 1.0 - 0.5 * (unit[:, 0] + unit[:, 1])], axis=1), 0, 1)
        for i in range(len(src)):
            ax.plot([src[i, 0], pred[i, 0] + offset], [src[i, 1], pred[i, 1]], "-", color=colours[i], lw=0.7, alpha=0.8)
        ax.scatter(src[:, 0], src[:, 1], s=16, c=colours, edgecolors="white", linewidths=0.5, zorder=3)
        ax.scatter(pred[:, 0] + offset, pred[:, 1], s=16, c=colours, edgecolors="black", linewidths=0.5, zorder=3)

    return _pair_figure(path, views, draw, dpi)
