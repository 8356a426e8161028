"""CKA maps on disk: the heatmap PNG (one colour scale for every panel), and the matrices as CSV and JSON.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, so no global
figure state, no display needed, and nothing left open after a call.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.checkpoint import atomic_write

__all__ = ["Panel", "figure_size", "plot_cka_maps", "write_cka_csv", "panel_json"]

# Inches per heatmap cell, and around each panel for tick labels, axis titles and the colour bar.
_CELL = 0.75
_PANEL_MARGIN = (2.2, 2.0)  # width, height
_COLORBAR_WIDTH = 1.3
_TITLE_HEIGHT = 0.8


@dataclass
class Panel:
    """One heatmap: ``matrix[i, j]`` is the CKA of row layer i and column layer j."""

    matrix: np.ndarray
    row_layers: list[str]
    col_layers: list[str]
    row_title: str  # the rows' model, e.g. "resnet56 (teacher)"
    col_title: str  # the columns' model, e.g. "resnet20 rcka seed0"


def figure_size(panels: Sequence[Panel]) -> tuple[float, float]:
    """(width, height) in inches: every cell the same size, so panels of different shapes line up."""
    width = sum(len(p.col_layers) * _CELL + _PANEL_MARGIN[0] for p in panels) + _COLORBAR_WIDTH
    height = max(len(p.row_layers) for p in panels) * _CELL + _PANEL_MARGIN[1] + _TITLE_HEIGHT
    return width, height


def plot_cka_maps(panels: Sequence[Panel], path: str | os.PathLike, title: str, subtitle: str = "",
                  dpi: int = 100) -> tuple[int, int]:
    """Write the panels side by side as a PNG at ``path``; returns its (width, height) in pixels.

    Rows run bottom to top and columns left to right in network order (the convention of Kornblith
    et al. 2019 and Nguyen et al. 2021). Every panel shares the 0..1 colour scale and one colour bar;
    each cell also prints its value, since the unbiased estimate can stray slightly outside [0, 1].
    """
    if not panels:
        raise ValueError("plot_cka_maps needs at least one panel.")
    for p in panels:
        if p.matrix.shape != (len(p.row_layers), len(p.col_layers)):
            raise ValueError(f"matrix of shape {p.matrix.shape} does not fit {len(p.row_layers)} row and "
                             f"{len(p.col_layers)} column labels.")
    size = figure_size(panels)
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    widths = [len(p.col_layers) for p in panels]
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    image = None
    for ax, p in zip(axes, panels):
        image = ax.imshow(p.matrix, cmap="magma", vmin=0.0, vmax=1.0, origin="lower", aspect="equal")
        ax.set_xticks(range(len(p.col_layers)), p.col_layers, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(p.row_layers)), p.row_layers)
        ax.set_xlabel(p.col_title)
        ax.set_ylabel(p.row_title)
        for (i, j), value in np.ndenumerate(p.matrix):
            # Dark text on the bright end of magma, light text on the dark end.
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=list(axes), label="linear CKA (minibatch, unbiased)", shrink=0.9)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return round(size[0] * dpi), round(size[1] * dpi)


def write_cka_csv(path: str | os.PathLike, panel: Panel) -> None:
    """One row per row layer, one column per column layer; the corner cell names both models."""
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([f"{panel.row_title} \\ {panel.col_title}", *panel.col_layers])
        for layer, values in zip(panel.row_layers, panel.matrix):
            writer.writerow([layer, *(f"{v:.6f}" for v in values)])


def panel_json(panel: Panel) -> dict[str, Any]:
    return {"rows": {"model": panel.row_title, "layers": panel.row_layers},
            "columns": {"model": panel.col_title, "layers": panel.col_layers},
            "cka": [[float(v) for v in row] for row in panel.matrix]}
