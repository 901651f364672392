"""Needle-in-a-haystack figures: a depth x length heatmap per strength (the paper's and Kamradt's layout)
and one figure comparing strengths. matplotlib is imported lazily (the `eval` extra), with the Agg
backend, so plotting works headless.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ctxsteer.clients.eval.api import AUTO_STRENGTH
from ctxsteer.steering.spec import strength_to_alpha

# Kamradt's red -> yellow -> green scale: recall 0 is red, 1 is green.
COLORS = ("#F0496E", "#EBB839", "#0CD79F")


def strength_label(strength: float) -> str:
    """`1 (off)`, `1.11 (α=0.9)`: the knob, and the paper's alpha = 1/strength; `auto` (server's pick)."""
    if strength == AUTO_STRENGTH:
        return "auto"
    s = f"{strength:.3g}"
    return f"{s} (off)" if strength == 1 else f"{s} (α={strength_to_alpha(strength):.2g})"


def file_label(strength: float) -> str:
    return "auto" if strength == AUTO_STRENGTH else f"{strength:.3g}".replace(".", "_")


def _grid(cells: Iterable[dict[str, Any]]) -> tuple[list[int], list[float], dict[tuple[int, float], float]]:
    values = {(int(c["length"]), float(c["depth"])): float(c["score"]) for c in cells}
    lengths = sorted({k[0] for k in values})
    depths = sorted({k[1] for k in values})
    return lengths, depths, values


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display); ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(cells: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Rows = needle depth (0% at the top), columns = context length; each cell's recall, annotated."""
    plt = pyplot()
    from matplotlib.colors import LinearSegmentedColormap

    lengths, depths, values = _grid(cells)
    grid = [[values.get((n, d), float("nan")) for n in lengths] for d in depths]
    # grey: cells that were skipped (did not fit the context)
    cmap = LinearSegmentedColormap.from_list("nih", COLORS).with_extremes(bad="#dddddd")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(lengths) + 2.8), 0.5 * len(depths) + 2.0))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "–" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="needle recall")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def compare(cells: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Mean recall by context length and by depth, one line per strength."""
    plt = pyplot()
    strengths = sorted({float(c["strength"]) for c in cells})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for axis, field, label in (
        (axes[0], "length", "context length (tokens)"),
        (axes[1], "depth", "needle depth (%)"),
    ):
        for s in strengths:
            by: dict[float, list[float]] = {}
            for c in cells:
                if float(c["strength"]) == s:
                    by.setdefault(float(c[field]), []).append(float(c["score"]))
            xs = sorted(by)
            axis.plot(
                xs, [sum(by[x]) / len(by[x]) for x in xs], marker="o", label=f"strength {strength_label(s)}"
            )
        ticks = sorted({float(c[field]) for c in cells})
        if field == "length" and len(ticks) > 1:
            axis.set_xscale("log", base=2)  # lengths usually double
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean needle recall")
    axes[0].set_ylim(-0.03, 1.03)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def nih_figures(cells: Sequence[dict[str, Any]], out_dir: Path, model: str) -> list[Path]:
    """heatmap_strength_<s>.png per strength and strengths.png; [] (with no error) without matplotlib."""
    try:
        pyplot()
    except ImportError:
        return []
    paths = []
    strengths = sorted({float(c["strength"]) for c in cells})
    for s in strengths:
        mine = [c for c in cells if float(c["strength"]) == s]
        mean = sum(float(c["score"]) for c in mine) / len(mine)
        title = f"{model}\nsteering strength {strength_label(s)}: mean needle recall {mean:.2f}"
        paths.append(heatmap(mine, out_dir / f"heatmap_strength_{file_label(s)}.png", title=title))
    if cells:
        paths.append(
            compare(cells, out_dir / "strengths.png", title=f"{model}: needle recall by steering strength")
        )
    return paths
