"""The benchmarks' charts: small tables drawn as PNGs of a fixed pixel size.

Built on ``launch.commands.plot``'s figure helpers (an Agg canvas, FIGSIZE × DPI = 800 × 450 pixels, the
file written atomically), so ``rnnpipe plot`` and the benchmark figures look alike. matplotlib is
the optional ``rnnpipe[plot]`` extra.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from rnnpipe.launch.commands.plot import check_png, new_figure, save_png  # noqa: E402


def _finish(fig, ax, title: str | None, note: str | None, grid: str = "both") -> None:
    if title:
        ax.set_title(title, fontsize=11)
    if note:  # what the numbers are, under the axes, so the PNG stands on its own
        lines = textwrap.wrap(note, 150)
        # Keep the note's lines out of the constrained layout's area (about 0.028 of 4.5 in a line).
        fig.get_layout_engine().set(rect=(0, 0.03 * len(lines) + 0.01, 1, 1 - 0.03 * len(lines) - 0.01))
        fig.text(0.01, 0.008, "\n".join(lines), fontsize=7.5, color="0.3", ha="left", va="bottom")
    ax.grid(True, axis=grid, alpha=0.3)


def line_chart(
    out: str | Path,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    note: str | None = None,
    logx: bool = False,
    xticks: Sequence[float] | None = None,
) -> str:
    """One line with markers per series (name -> [(x, y), ...]); writes ``out`` and returns it.

    ``logx`` draws x on a log2 scale (sequence lengths); ``xticks`` labels exactly those x values.
    """
    from matplotlib.ticker import FixedLocator, NullLocator

    check_png(str(out))
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        points = sorted(points)
        if points:
            x, y = zip(*points, strict=True)
            ax.plot(x, y, color=f"C{i % 10}", lw=2, marker="o", ms=5, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if xticks:
        ax.xaxis.set_major_locator(FixedLocator(list(xticks)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:,g}" for t in xticks])
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(_thousands)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=9)
    _finish(fig, ax, title, note)
    return save_png(fig, str(out))


def bar_chart(
    out: str | Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    note: str | None = None,
    reference: tuple[str, float] | None = None,
) -> str:
    """Grouped bars: one group per ``groups`` entry, one bar per series in each (``None``: no bar,
    e.g. a shape the op could not run). ``reference`` (label, y): a dashed horizontal line."""
    check_png(str(out))
    fig = new_figure()
    ax = fig.add_subplot()
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        if len(values) != len(groups):
            raise ValueError(f"series {name!r}: {len(values)} values for {len(groups)} groups")
        xs = [g + (i - (n - 1) / 2) * width for g, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        ax.bar(xs, ys, width=width * 0.95, color=f"C{i % 10}", label=name)
    if reference is not None:
        label, y = reference
        ax.axhline(y, color="0.25", ls="--", lw=1.2, label=label)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.yaxis.set_major_formatter(_thousands)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8.5, ncols=2)
    _finish(fig, ax, title, note, grid="y")  # vertical lines would run through the bars
    return save_png(fig, str(out))


def _thousands(y: float, _pos: int | None = None) -> str:
    return f"{y:,.0f}" if abs(y) >= 10 or y == 0 else f"{y:g}"
