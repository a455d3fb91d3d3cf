"""The HTML report: sections of text, tables, pictures (paths relative to the report) and interactive Bokeh plots.

The page is self-contained and works offline: BokehJS is embedded in it (no CDN), pictures sit beside it.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from geomoe.atomic import atomic_path

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; } th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)
    plots: list[tuple[str, Any]] = field(default_factory=list)  # (caption, Bokeh model)


def write_report(path: Path, title: str, subtitle: str, sections: list[Section]) -> Path:
    plots = [p for s in sections for _, p in s.plots]
    head, divs = "", []
    if plots:
        from bokeh.embed import components
        from bokeh.resources import INLINE

        script, divs = components(plots)
        head = INLINE.render_js() + script  # BokehJS inside the page: no network needed to open it
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style>{head}</head><body><h1>{html.escape(title)}</h1>"
             f"<p class='note'>{html.escape(subtitle)}</p>"]
    divs = iter(divs)
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        for caption, df in s.tables:
            parts.append(f"<p><b>{html.escape(caption)}</b></p>")
            parts.append(df.to_html(float_format=lambda v: f"{v:.3f}", na_rep="-", border=0))
        for caption, _ in s.plots:
            parts.append(f"<figure>{next(divs)}<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
        for caption, img in s.images:
            rel = os.path.relpath(img, path.parent)
            parts.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(caption)}'>"
                         f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path
