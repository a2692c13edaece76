"""Discipline x grade heatmaps as PNG bytes, and a markdown image with a data URI that Dagster's UI renders
from ``MetadataValue.md``.

matplotlib draws on a bare ``Figure`` with the Agg canvas: no display, no pyplot, no global backend switch.
Each panel is one heatmap: disciplines down, grades across, the value written in each cell with ``fmt``; a
cell whose value is None is drawn grey and hatched with "n/a" (no number is invented for it). The PNG is
quantized to a 256-colour palette (about 40 KB for two 22 x 5 panels at 80 dpi).
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

DPI = 80
CELL_W_IN = 0.85  # inches per grade column
CELL_H_IN = 0.3  # inches per discipline row
NA_COLOR = "#d9d9d9"


@dataclass
class HeatmapPanel:
    """One heatmap: a title, values by (discipline, grade) (None: not available), how to print a value, and
    the colour scale (``vmin``/``vmax`` default to the values' range)."""

    title: str
    values: dict[tuple[str, str], float | None]
    fmt: str = "{:.2f}"
    cmap: str = "viridis"
    vmin: float | None = None
    vmax: float | None = None


def _label(name: str) -> str:
    return name.replace("_", " ")


def render_heatmaps(panels: list[HeatmapPanel], disciplines: list[str], grades: list[str]) -> bytes:
    """Side-by-side discipline x grade heatmaps, one per panel, as PNG bytes (rows: ``disciplines`` in order,
    columns: ``grades`` in order; a value missing from ``values`` counts as None)."""
    if not panels:
        raise ValueError("render_heatmaps needs at least one panel")
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n_rows, n_cols = max(len(disciplines), 1), max(len(grades), 1)
    label_w = 0.09 * max((len(_label(d)) for d in disciplines), default=4) + 0.3
    panel_w = label_w + CELL_W_IN * n_cols + 1.1  # labels + cells + colour bar
    fig = Figure(figsize=(panel_w * len(panels), CELL_H_IN * n_rows + 1.4), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        grid = np.full((n_rows, n_cols), np.nan)
        for i, d in enumerate(disciplines):
            for j, g in enumerate(grades):
                v = panel.values.get((d, g))
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    grid[i, j] = float(v)
        finite = grid[np.isfinite(grid)]
        vmin = panel.vmin if panel.vmin is not None else (float(finite.min()) if finite.size else 0.0)
        vmax = panel.vmax if panel.vmax is not None else (float(finite.max()) if finite.size else 1.0)
        if vmax <= vmin:
            vmax = vmin + 1.0
        cmap = colormaps[panel.cmap].with_extremes(bad=NA_COLOR)
        norm = Normalize(vmin=vmin, vmax=vmax)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for i in range(len(disciplines)):
            for j in range(len(grades)):
                v = grid[i, j]
                if math.isnan(v):
                    ax.add_patch(
                        Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=NA_COLOR, edgecolor="#9e9e9e", hatch="///", lw=0)
                    )
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="#555555")
                    continue
                r, g_, b, _ = cmap(norm(v))
                dark = 0.299 * r + 0.587 * g_ + 0.114 * b < 0.5
                ax.text(
                    j, i, panel.fmt.format(v), ha="center", va="center", fontsize=7, color="white" if dark else "black"
                )
        ax.set_xticks(range(len(grades)), [_label(g) for g in grades], fontsize=8, rotation=30, ha="right")
        ax.set_yticks(range(len(disciplines)), [_label(d) for d in disciplines], fontsize=8)
        ax.set_xticks([x - 0.5 for x in range(1, len(grades))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(disciplines))], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
        ax.set_title(panel.title, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03).ax.tick_params(labelsize=7)
    fig.tight_layout()
    canvas.draw()
    # A 256-colour palette PNG is a third of the RGBA one and looks the same (flat colours and text).
    from PIL import Image

    rgb = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
    buf = io.BytesIO()
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """A markdown image whose source is a base64 ``data:`` URI (renders in Dagster's metadata panel)."""
    safe_alt = alt.replace("[", "(").replace("]", ")").replace("\n", " ")
    return f"![{safe_alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
