"""Plots as inline SVG, drawn with matplotlib (the ``[report]`` extra) when it is installed.

matplotlib is imported here, inside the functions, and only when a report is built: a run's
start and ``import shardeval`` never pay for it. The SVG is deterministic (fixed hash salt,
no date or creator metadata, text kept as text) and self-contained: the XML prolog, the
DOCTYPE and the namespace declarations (the only URLs in matplotlib's output, none of them
fetched) are dropped, since SVG inline in HTML needs none of them. Element ids get a per-plot
prefix so that several plots in one page never share an id.

Every function returns None when matplotlib is missing; the page then shows the same
numbers as CSS bars and tables.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from functools import cache
from typing import Any

INSTALL_HINT = "pip install 'shardeval[report]'"
BLUE = "#4c78a8"
ORANGE = "#f58518"

_RC: dict[Any, Any] = {
    "svg.hashsalt": "shardeval",
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10,
}
_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


@cache
def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    """A figure with fixed margins for one axes with a title and both labels.

    Not ``layout="constrained"``: its solver measured every text twice per plot, a third of
    the report's time at the end of every run, for plots whose layout never changes.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.2, top=0.88)
    return fig


def _svg(fig: Any, prefix: str) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buffer, format="svg", metadata=_METADATA)
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text, count=2)
    text = text.replace('id="', f'id="{prefix}-').replace("url(#", f"url(#{prefix}-")
    return text.replace('href="#', f'href="#{prefix}-')


def histogram(
    values: Sequence[float],
    *,
    title: str,
    xlabel: str,
    prefix: str,
    bins: int | Sequence[float] = 30,
    log_y: bool = False,
) -> str | None:
    """A histogram of ``values`` as SVG (None without matplotlib or without values)."""
    if not available() or not values:
        return None
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _figure(4.2, 2.4)
        ax = fig.add_subplot()
        counts, edges = _binned_counts(values, bins)
        ax.hist(
            edges[:-1], bins=edges, weights=counts, color=BLUE, edgecolor="white", linewidth=0.5
        )
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rows")
        if log_y:
            ax.set_yscale("log")
        return _svg(fig, prefix)


def _binned_counts(values: Sequence[float], bins: Any) -> tuple[Any, Any]:
    """``numpy.histogram`` of ``values``: matplotlib then draws a few bars, not a million rows.

    Handing ``ax.hist`` the raw values makes it copy them several times over (a million-row
    run's largest memory use); the bars drawn from the counts are the same.
    """
    import numpy as np

    return np.histogram(np.asarray(values, dtype=float), bins=bins)


def two_histograms(
    first: Sequence[float],
    second: Sequence[float],
    *,
    labels: tuple[str, str],
    title: str,
    xlabel: str,
    prefix: str,
) -> str | None:
    """Two overlaid histograms (prompt and completion tokens) on shared bins."""
    if not available() or not (first or second):
        return None
    import matplotlib
    import numpy as np

    with matplotlib.rc_context(_RC):
        both = np.asarray([*first, *second], dtype=float)
        edges = np.histogram_bin_edges(both, bins=30)
        fig = _figure(4.2, 2.4)
        ax = fig.add_subplot()
        for values, color, label in ((first, BLUE, labels[0]), (second, ORANGE, labels[1])):
            counts, _ = _binned_counts(values, edges)
            ax.hist(edges[:-1], bins=edges, weights=counts, color=color, alpha=0.75, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rows")
        ax.legend(frameon=False)
        return _svg(fig, prefix)


def history(
    points: Sequence[tuple[str, float, float | None, float | None]],
    *,
    title: str,
    prefix: str,
) -> str | None:
    """A metric over runs: (label, mean, ci low, ci high) in order, with the CI as a band."""
    if not available() or not points:
        return None
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _figure(4.2, 2.2)
        ax = fig.add_subplot()
        xs = list(range(len(points)))
        means = [p[1] for p in points]
        lows = [p[2] if p[2] is not None else p[1] for p in points]
        highs = [p[3] if p[3] is not None else p[1] for p in points]
        ax.fill_between(xs, lows, highs, color=BLUE, alpha=0.2, linewidth=0)
        ax.plot(xs, means, color=BLUE, marker="o", markersize=3)
        ax.set_xticks(xs, [p[0] for p in points], rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
        return _svg(fig, prefix)
