"""Sample grids for reports: one titled panel per method, images at a readable size, panels in a grid.

``save_sample_grids([(title, images_uint8), ...], path)`` lays the panels out ``ncols`` to a row (default 2
or 3 by count). Each panel tiles its ``[N, C, H, W]`` uint8 images (C 1: grey, C 3: RGB) about ``sqrt(N)``
to a row, each image scaled up by a whole factor (nearest, so pixels stay crisp) to at least
``MIN_IMAGE_INCH`` (more for few images, up to the panel's minimum width and ``MAX_IMAGE_INCH``); the
caller's multi-line title is wrapped, never truncated, to the panel's width, breaking long spec strings
after ``, : ; / = |`` where it can.
"""
from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MIN_IMAGE_INCH = 0.45  # the smallest an image is shown (28 px at 120 dpi -> 2x: 0.47 in)
MAX_IMAGE_INCH = 1.1  # larger images are shown down-sampled to this
MIN_PANEL_INCH = 2.6  # a panel is at least this wide, so its title has room
PAD = 2  # source pixels between images
PAD_VALUE = 255
TITLE_PT = 9.0
CHAR_EM = 0.56  # average DejaVu Sans glyph width in em, for the wrap width


class _SpecWrapper(textwrap.TextWrapper):
    """A TextWrapper that may also break after the separators of policy specs (``fora:interval=3,...``)."""

    wordsep_re = re.compile(r"(\s+|[^\s,:;/=|]+[,:;/=|]*|[,:;/=|]+)")


def wrap_title(title: str, width: int) -> str:
    """Each line of ``title`` wrapped to ``width`` characters (long tokens broken, nothing dropped)."""
    wrapper = _SpecWrapper(width=max(8, width), break_long_words=True, break_on_hyphens=True)
    lines = []
    for line in str(title).splitlines() or [""]:
        lines += wrapper.wrap(line) or [""]
    return "\n".join(lines)


def _as_images(images) -> np.ndarray:
    """``[N, C, H, W]`` (or ``[N, H, W]``) uint8 tensor / array -> ``[N, H, W, C]`` uint8 numpy, C 1 or 3."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"sample grids take uint8 images (images_to_uint8), got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"sample grids take [N, C, H, W] images with C 1 or 3, got shape {images.shape}")
    return images.transpose(0, 2, 3, 1)


def _tile(images: np.ndarray, per_row: int) -> np.ndarray:
    """``[N, H, W, C]`` -> one ``[rows * (H + PAD) - PAD, per_row * (W + PAD) - PAD, C]`` image."""
    n, h, w, c = images.shape
    rows = max(1, math.ceil(n / per_row))
    out = np.full((rows * (h + PAD) - PAD, per_row * (w + PAD) - PAD, c), PAD_VALUE, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, per_row)
        out[r * (h + PAD):r * (h + PAD) + h, col * (w + PAD):col * (w + PAD) + w] = image
    return out


def default_ncols(n_panels: int) -> int:
    """Panels per row: all of 1-2, 2 for 4, else 3."""
    return n_panels if n_panels <= 2 else (2 if n_panels == 4 else 3)


def save_sample_grids(panels: Sequence[tuple[str, object]], path: str | os.PathLike, ncols: int | None = None, *,
                      dpi: int = 120, suptitle: str | None = None) -> Path:
    """Write one PNG of ``panels`` (``(title, images)`` with images ``[N, C, H, W]`` uint8, C 1 or 3) to
    ``path``: ``ncols`` panels to a row (default ``default_ncols``), each panel's images in a grid of
    ``ceil(sqrt(N_max))`` columns at an integer zoom of at least ``MIN_IMAGE_INCH`` each, under the caller's
    (multi-line) title wrapped to the panel's width. Returns ``Path(path)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("save_sample_grids needs at least one (title, images) panel")
    titles = [str(t) for t, _ in panels]
    images = [_as_images(x) for _, x in panels]
    ncols = max(1, min(int(ncols or default_ncols(len(panels))), len(panels)))
    nrows = math.ceil(len(panels) / ncols)

    # one image geometry for every panel: the largest images, the most images
    h = max(x.shape[1] for x in images)
    w = max(x.shape[2] for x in images)
    n_max = max(1, max(len(x) for x in images))
    per_row = math.ceil(math.sqrt(n_max))
    grid_rows = math.ceil(n_max / per_row)
    zoom = max(1, math.ceil(MIN_IMAGE_INCH * dpi / h))  # whole-pixel zoom: crisp nearest-neighbour pixels
    grid_px = per_row * (w + PAD) - PAD
    while (grid_px * (zoom + 1) / dpi <= MIN_PANEL_INCH and h * (zoom + 1) / dpi <= MAX_IMAGE_INCH):
        zoom += 1  # few images: larger, filling the panel's width
    if h * zoom / dpi > MAX_IMAGE_INCH:
        zoom = MAX_IMAGE_INCH * dpi / h  # big images: shown smaller, anti-aliased
    grid_w = (per_row * (w + PAD) - PAD) * zoom / dpi  # inches
    grid_h = (grid_rows * (h + PAD) - PAD) * zoom / dpi
    cell_w = max(grid_w, MIN_PANEL_INCH)

    chars = int(cell_w * 72 / (TITLE_PT * CHAR_EM))
    wrapped = [wrap_title(t, chars) for t in titles]
    line_h = TITLE_PT * 1.3 / 72
    title_h = [max(wrapped[i].count("\n") + 1 for i in range(r * ncols, min((r + 1) * ncols, len(panels))))
               * line_h + 0.1 for r in range(nrows)]
    gap_x, gap_y, margin = 0.3, 0.25, 0.15
    top = (0.35 if suptitle else 0.0) + margin
    fig_w = 2 * margin + ncols * cell_w + (ncols - 1) * gap_x
    fig_h = top + margin + sum(title_h) + nrows * grid_h + (nrows - 1) * gap_y

    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    if suptitle:
        fig.text(0.5, 1 - margin / fig_h, suptitle, ha="center", va="top", fontsize=TITLE_PT + 2, weight="bold")
    y = top  # inches from the top
    for r in range(nrows):
        for c in range(ncols):
            i = r * ncols + c
            if i >= len(panels):
                break
            x0 = margin + c * (cell_w + gap_x)
            left = x0 + (cell_w - grid_w) / 2
            bottom = fig_h - (y + title_h[r] + grid_h)
            # bottom-aligned just above its own grid: in a row of titles of different lengths each stays with
            # its images
            fig.text((x0 + cell_w / 2) / fig_w, (bottom + grid_h + 0.06) / fig_h, wrapped[i], ha="center",
                     va="bottom", fontsize=TITLE_PT, linespacing=1.15)
            ax = fig.add_axes((left / fig_w, bottom / fig_h, grid_w / fig_w, grid_h / fig_h))
            ax.set_axis_off()
            panel = images[i]
            if len(panel) == 0:
                ax.text(0.5, 0.5, "no images", ha="center", va="center", color="grey", transform=ax.transAxes)
                continue
            if panel.shape[1:3] != (h, w):  # a panel of smaller images: centred in the common cell
                padded = np.full((len(panel), h, w, panel.shape[3]), PAD_VALUE, dtype=np.uint8)
                oy, ox = (h - panel.shape[1]) // 2, (w - panel.shape[2]) // 2
                padded[:, oy:oy + panel.shape[1], ox:ox + panel.shape[2]] = panel
                panel = padded
            tile = _tile(panel, per_row)
            full = np.full(((grid_rows * (h + PAD) - PAD), tile.shape[1], tile.shape[2]), PAD_VALUE, np.uint8)
            full[:tile.shape[0]] = tile
            interpolation = "nearest" if float(zoom).is_integer() else "antialiased"
            if full.shape[2] == 1:
                ax.imshow(full[..., 0], cmap="gray", vmin=0, vmax=255, interpolation=interpolation, aspect="auto")
            else:
                ax.imshow(full, interpolation=interpolation, aspect="auto")
        y += title_h[r] + grid_h + gap_y
    fig.savefig(path, dpi=dpi, facecolor="white")
    return Path(path)
