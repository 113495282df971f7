"""The blocks a report section is made of (paragraph, table, image, code), rendered to Markdown
and to one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    head: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    path: Path  # inside the report folder
    caption: str


@dataclass(frozen=True)
class Code:
    text: str
    title: str = ""


Block = Para | Table | Image | Code




def to_markdown(title: str, sections: list[tuple[str, list[Block]]], root: Path) -> str:
    out = [f"# {title}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for b in blocks:
            if isinstance(b, Para):
                out += [b.text, ""]
            elif isinstance(b, Table):
                out.append("| " + " | ".join(_cell(h) for h in b.head) + " |")
                out.append("|" + "---|" * len(b.head))
                out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in b.rows]
                out.append("")
            elif isinstance(b, Image):
                out += [f"![{b.caption}]({b.path.relative_to(root).as_posix()})", "", f"*{b.caption}*", ""]
            elif isinstance(b, Code):
                out += ([f"`{b.title}`", ""] if b.title else []) + ["```yaml", b.text.rstrip(), "```", ""]
    return "\n".join(out)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#222}h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #bbb;padding:.3em .6em;
text-align:left}th{background:#eee}figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}
nav a{margin-right:1em}.no{color:#b00;font-weight:bold}.yes{color:#070;font-weight:bold}"""


def to_html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    """One self-contained page: inline CSS, every image a base64 data URI, no script, no links out."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
           "<nav>" + "".join(f'<a href="#s{i}">{e(h)}</a>' for i, (h, _) in enumerate(sections)) + "</nav>"]
    for i, (heading, blocks) in enumerate(sections):
        out.append(f'<section id="s{i}"><h2>{e(heading)}</h2>')
        for b in blocks:
            if isinstance(b, Para):
                out.append(f"<p>{e(b.text)}</p>")
            elif isinstance(b, Table):
                out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.head) + "</tr></thead><tbody>")
                for row in b.rows:
                    out.append("<tr>" + "".join(_td(c) for c in row) + "</tr>")
                out.append("</tbody></table>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(b.caption)}">'
                           f"<figcaption>{e(b.caption)}</figcaption></figure>")
            elif isinstance(b, Code):
                out.append((f"<p><code>{e(b.title)}</code></p>" if b.title else "") + f"<pre>{e(b.text)}</pre>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _td(text: str) -> str:
    cls = {"yes": ' class="yes"', "NO": ' class="no"'}.get(text, "")
    return f"<td{cls}>{html.escape(str(text))}</td>"


