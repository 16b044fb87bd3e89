"""A self-contained HTML page describing a run: loss and learning-rate curves (inline SVG), preview grids
over training, the resolved recipe, and evaluation figures. Written atomically; images are linked by
relative path so the page and its folder can be moved together."""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from tuner.formats.io import write_text_atomic


def svg_curve(values: Sequence[float], *, title: str, width: int = 560, height: int = 180, smooth: int = 10) -> str:
    """A line plot of ``values`` (and its moving average over ``smooth`` points) as an inline SVG."""
    if not values:
        return f"<p>{html.escape(title)}: no data</p>"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    pad = 30

    def points(series: Sequence[float]) -> str:
        n = max(1, len(series) - 1)
        return " ".join(
            f"{pad + (width - 2 * pad) * i / n:.1f},{height - pad - (height - 2 * pad) * (v - lo) / span:.1f}"
            for i, v in enumerate(series)
        )

    avg = [sum(values[max(0, i - smooth + 1) : i + 1]) / len(values[max(0, i - smooth + 1) : i + 1])
           for i in range(len(values))]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">'
        f'<rect width="100%" height="100%" fill="white" stroke="#ccc"/>'
        f'<text x="{pad}" y="18" font-size="13">{html.escape(title)} (steps 1-{len(values)})</text>'
        f'<text x="2" y="{pad + 4}" font-size="10">{hi:.4g}</text>'
        f'<text x="2" y="{height - pad}" font-size="10">{lo:.4g}</text>'
        f'<polyline fill="none" stroke="#9ab" stroke-width="1" points="{points(values)}"/>'
        f'<polyline fill="none" stroke="#c33" stroke-width="2" points="{points(avg)}"/>'
        "</svg>"
    )


def write_report(
    path: str | Path,
    *,
    title: str,
    history: Mapping[str, Sequence[float]],
    images: Sequence[tuple[str, Path]],
    recipe_toml: str,
    facts: Mapping[str, str],
    evals: Mapping[str, str] | None = None,
) -> Path:
    """Write the page. ``images``: (caption, path) pairs shown in order; ``facts``: a key/value table
    (data, timing, files); ``evals``: name -> preformatted table text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}img{image-rendering:pixelated;"
        "max-width:100%;border:1px solid #ccc}td,th{padding:2px 8px;text-align:left}pre{background:#f6f6f6;"
        "padding:8px;overflow:auto}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts.items())
        + "</table>",
        "<h2>Training curves</h2>",
        svg_curve(list(history.get("loss", [])), title="loss"),
        svg_curve(list(history.get("lr", [])), title="learning rate", smooth=1),
    ]
    if evals:
        parts.append("<h2>Evaluation</h2>")
        for name, table in evals.items():
            parts.append(f"<h3>{html.escape(name)}</h3><pre>{html.escape(table)}</pre>")
    if images:
        parts.append("<h2>Images</h2>")
        for caption, image in images:
            rel = os.path.relpath(image, path.parent)
            parts.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(caption)}' width='512'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += ["<h2>Resolved recipe</h2>", f"<pre>{html.escape(recipe_toml)}</pre>", "</body></html>"]
    write_text_atomic(path, "\n".join(parts))
    return path
