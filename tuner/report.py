"""A self-contained HTML page describing a run: facts (status, data, timing, peak memory), loss and
learning-rate curves (inline SVG), preview grids over training, evaluation tables, dataset summary with
tag and word frequencies, and the resolved recipe. Written atomically; images are linked by relative path
so the page and its folder can be moved together.

The page checks itself when a browser opens it: once everything has loaded, a small script counts the
images that decoded (``naturalWidth > 0``) and the plotted lines that have length, stores the counts as
``data-images-ok``, ``data-images-broken`` and ``data-plot-lines`` on ``<body>`` (``data-checked="1"``
when done; the browser test reads them), and shows a warning above the page when an image is missing.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from tuner.formats.io import write_text_atomic

MAX_POINTS = 800
"""Curves longer than this are drawn from evenly spaced samples (the page stays small on long runs)."""

_CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var body = document.body, imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var lines = Array.prototype.slice.call(document.querySelectorAll('svg polyline'))
    .filter(function (p) { return p.getTotalLength() > 0; }).length;
  body.dataset.imagesOk = ok;
  body.dataset.imagesBroken = imgs.length - ok;
  body.dataset.plotLines = lines;
  if (imgs.length > ok) {
    var note = document.createElement('p');
    note.className = 'warn';
    note.textContent = (imgs.length - ok) + ' image(s) did not load: keep report.html in its run folder ' +
      '(it links the PNGs by relative path).';
    body.insertBefore(note, body.firstChild);
  }
  body.dataset.checked = '1';
});
</script>"""

_STYLE = (
    "body{font-family:sans-serif;max-width:980px;margin:2em auto}img{image-rendering:pixelated;max-width:100%;"
    "border:1px solid #ccc}td,th{padding:2px 8px;text-align:left;vertical-align:top}pre{background:#f6f6f6;"
    "padding:8px;overflow:auto}.bar{display:inline-block;height:8px;background:#c33}.warn{background:#fdd;"
    "padding:8px}.freq{display:inline-block;margin-right:2em}"
)


def _sampled(values: Sequence[tuple[int, float]], limit: int) -> list[tuple[int, float]]:
    if len(values) <= limit:
        return list(values)
    last = len(values) - 1
    return [values[round(i * last / (limit - 1))] for i in range(limit)]


def svg_curve(values: Sequence[float], *, title: str, width: int = 560, height: int = 180, smooth: int = 10) -> str:
    """A line plot of ``values`` (and its moving average over ``smooth`` points) as an inline SVG. NaN and
    inf values (steps the numerical guard skipped) are left out of the lines and counted in the title."""
    steps = [(i, v) for i, v in enumerate(values) if math.isfinite(v)]
    if not steps:
        return f"<p>{html.escape(title)}: no data</p>"
    lo, hi = min(v for _, v in steps), max(v for _, v in steps)
    span = (hi - lo) or 1.0
    pad = 30
    n = max(1, len(values) - 1)

    def points(series: Sequence[tuple[int, float]]) -> str:
        return " ".join(
            f"{pad + (width - 2 * pad) * i / n:.1f},{height - pad - (height - 2 * pad) * (v - lo) / span:.1f}"
            for i, v in _sampled(series, MAX_POINTS)
        )

    avg, total = [], 0.0
    for k, (i, v) in enumerate(steps):  # running sum: linear in the number of steps
        total += v - (steps[k - smooth][1] if k >= smooth else 0.0)
        avg.append((i, total / min(k + 1, smooth)))
    skipped = len(values) - len(steps)
    note = f", {skipped} non-finite not drawn" if skipped else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">'
        f'<rect width="100%" height="100%" fill="white" stroke="#ccc"/>'
        f'<text x="{pad}" y="18" font-size="13">{html.escape(title)} (steps 1-{len(values)}{note})</text>'
        f'<text x="2" y="{pad + 4}" font-size="10">{hi:.4g}</text>'
        f'<text x="2" y="{height - pad}" font-size="10">{lo:.4g}</text>'
        f'<polyline fill="none" stroke="#9ab" stroke-width="1" points="{points(steps)}"/>'
        f'<polyline fill="none" stroke="#c33" stroke-width="2" points="{points(avg)}"/>'
        "</svg>"
    )


def frequency_table(title: str, counts: Mapping[str, int], *, top: int = 25) -> str:
    """The ``top`` most frequent entries of ``counts`` (already sorted) with a bar each, under ``title``."""
    if not counts:
        return f"<div class='freq'><h4>{html.escape(title)}</h4><p>none</p></div>"
    items = list(counts.items())[:top]
    most = max(items[0][1], 1)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{n}</td>"
        f"<td><span class='bar' style='width:{max(1, round(120 * n / most))}px'></span></td></tr>"
        for name, n in items
    )
    more = f"<p>... {len(counts) - top} more</p>" if len(counts) > top else ""
    return f"<div class='freq'><h4>{html.escape(title)}</h4><table>{rows}</table>{more}</div>"


def write_report(
    path: str | Path,
    *,
    title: str,
    history: Mapping[str, Sequence[float]],
    images: Mapping[str, Sequence[tuple[str, Path]]],
    recipe_toml: str,
    facts: Mapping[str, str],
    evals: Mapping[str, str] | None = None,
    dataset: str = "",
    frequencies: Mapping[str, Mapping[str, int]] | None = None,
    refresh_seconds: int = 0,
) -> Path:
    """Write the page and return its path.

    ``images``: section heading -> (caption, path) pairs shown in order (paths linked relative to the page);
    ``facts``: a key/value table (status, data, timing, memory, files); ``evals``: name -> preformatted table
    text; ``dataset``: a one-line summary; ``frequencies``: table title -> counts (sorted, most frequent
    first); ``refresh_seconds``: when > 0 the browser reloads the page that often (a run in progress).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refresh = f"<meta http-equiv='refresh' content='{int(refresh_seconds)}'>" if refresh_seconds > 0 else ""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'>{refresh}",
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
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
    for heading, section in images.items():
        if not section:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for caption, image in section:
            rel = Path(os.path.relpath(image, path.parent)).as_posix()
            parts.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(caption)}' width='512'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if dataset or frequencies:
        parts.append("<h2>Dataset</h2>")
        if dataset:
            parts.append(f"<p>{html.escape(dataset)}</p>")
        parts += [frequency_table(name, counts) for name, counts in (frequencies or {}).items()]
    parts += ["<h2>Resolved recipe</h2>", f"<pre>{html.escape(recipe_toml)}</pre>", _CHECK_SCRIPT, "</body></html>"]
    write_text_atomic(path, "\n".join(parts))
    return path
