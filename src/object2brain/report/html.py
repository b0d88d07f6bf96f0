"""Self-contained HTML pages: every image inline (base64), no scripts or fonts from the network."""

from __future__ import annotations

import base64
import html
import io
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #1d1d1f; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .6rem 1rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f6; }
.gallery { display: flex; flex-wrap: wrap; gap: .6rem; }
.card { width: 150px; font-size: .72rem; }
.card img { width: 150px; height: 150px; object-fit: cover; border-radius: 4px; }
figure { margin: 1rem 0; } figure img { max-width: 100%; }
figure.svg svg { max-width: 100%; height: auto; }
.scroll { overflow-x: auto; max-width: 100%; }
figcaption { font-size: .85rem; color: #555; }
table.wrap { table-layout: fixed; width: 100%; }
table.wrap th, table.wrap td { overflow-wrap: anywhere; word-break: break-word; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
"""


@dataclass
class Section:
    """One titled part of a page; ``body`` is trusted HTML built with the helpers below."""

    title: str
    body: str
    anchor: str = field(default="")


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_html(figure: Any, caption: str, *, dpi: int = 110) -> str:
    """A matplotlib figure as an inline PNG with a caption."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    uri = png_data_uri(buffer.getvalue())
    return (
        f'<figure><img src="{uri}" alt="{escape(caption)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


#: Ids of figure parts that a figure tags with ``gid="o2b-<kind>-<panel>"`` (matplotlib writes
#: them as SVG group ids): :func:`svg_figure_html` turns them into ``class="o2b-<kind>"
#: data-panel="<panel>"``, so a test can count, e.g., the ceiling bands drawn in each panel.
_TAG = re.compile(r'id="o2b-([a-z]+)-(\d+)"')
_SVG_IDS = itertools.count()


def svg_markup(figure: Any) -> str:
    """A matplotlib figure as inline ``<svg>`` markup (text kept as text).

    Every id is prefixed with a number unique in this process, so that several figures in one
    page never share ids (matplotlib numbers ``patch_1``, ``line2d_1``... afresh per figure);
    tagged parts (:data:`_TAG`) become classes with their panel number.
    """
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": None}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    markup = buffer.getvalue()
    markup = markup[markup.index("<svg") :]  # no XML declaration or doctype inside HTML
    markup = _TAG.sub(r'class="o2b-\1" data-panel="\2"', markup)
    prefix = f"f{next(_SVG_IDS)}-"
    markup = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}\1"', markup)
    return re.sub(r"(url\(#|href=\"#)([^\")]+)", rf"\1{prefix}\2", markup)


def svg_figure_html(
    figure: Any, caption: str, *, name: str, attributes: dict[str, object] | None = None
) -> str:
    """A matplotlib figure inline as SVG with a caption; ``data-figure="<name>"`` and
    ``attributes`` (written as ``data-<key>``) on the ``<figure>`` element."""
    extra = "".join(
        f' data-{escape(key)}="{escape(value)}"' for key, value in (attributes or {}).items()
    )
    return (
        f'<figure class="svg" data-figure="{escape(name)}"{extra}>{svg_markup(figure)}'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def image_card(image: Any, lines: Sequence[str], *, size: int = 150) -> str:
    """A thumbnail (PIL image) with caption lines."""
    thumb = image.copy()
    thumb.thumbnail((size * 2, size * 2))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    captions = "<br>".join(escape(line) for line in lines)
    return f'<div class="card"><img src="{png_data_uri(buffer.getvalue())}" alt="">{captions}</div>'


def table_html(frame: pd.DataFrame, *, float_format: str = "{:.3f}", wrap: bool = False) -> str:
    """A DataFrame as an HTML table (values escaped); ``wrap``: fixed layout at the page's
    width, long cells wrapped (for wide tables that must fit the page)."""
    head = "".join(f"<th>{escape(c)}</th>" for c in frame.columns)
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for value in record:
            if isinstance(value, float):
                text = "n/a" if value != value else float_format.format(value)  # NaN: n/a
            else:
                text = str(value)
            cells.append(f"<td>{escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table_class = ' class="wrap"' if wrap else ""
    return (
        f'<div class="scroll"><table{table_class}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def render_page(title: str, intro: str, sections: Sequence[Section]) -> str:
    """The whole page as one string."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        intro,
    ]
    for section in sections:
        anchor = f' id="{escape(section.anchor)}"' if section.anchor else ""
        parts.append(f"<section{anchor}><h2>{escape(section.title)}</h2>{section.body}</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(path: Path, page: str) -> Path:
    """Write the page atomically, creating its folder (as every other command does for its
    output) once the page is rendered."""
    from object2brain.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        temp.write_text(page, encoding="utf-8")
    return path
