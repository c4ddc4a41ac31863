"""Self-contained reports: headings, paragraphs, tables and figures, written as Markdown and as one HTML page.

:class:`Report` collects the blocks and writes ``<stem>.md`` (images linked) and ``<stem>.html``. The HTML is the
Markdown rendered by markdown-it-py (CommonMark with pipe tables), with every local image embedded as a base64 data
URI, so the page references no file or URL outside itself; remote images are refused. Raw HTML in the text is
escaped (the text holds user data: paths, column values), except ``<u>``, the runner-up's underline. :func:`markdown_to_html`
renders Markdown written elsewhere the same way. Every file is written atomically (:mod:`d2mae.runtime.files`).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import os
from pathlib import Path
from typing import Any, Iterable, Union

from markdown_it import MarkdownIt

from d2mae.eval.tables import Table
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_text

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.8em 0}th,td{border:1px solid #bbb;
padding:.3em .6em}th{background:#f0f0f0}img{max-width:100%;border:1px solid #ddd}.caption{display:block;color:#555;
font-size:.9em}code,pre{background:#f6f6f6;font-family:ui-monospace,Menlo,Consolas,monospace}pre{padding:.6em;
overflow-x:auto}"""
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
         ".gif": "image/gif"}


@dataclasses.dataclass
class _Heading:
    text: str
    level: int = 2


@dataclasses.dataclass
class _Paragraph:
    text: str


@dataclasses.dataclass
class _Bullets:
    items: list[str]


@dataclasses.dataclass
class _Code:
    text: str


@dataclasses.dataclass
class _Image:
    path: Path
    caption: str = ""


_Block = Union[_Heading, _Paragraph, _Bullets, _Code, _Image, Table]


def _data_uri(path: Path) -> str:
    if not path.is_file():
        raise D2maeError(f"report image {path} does not exist; write the figure before the report")
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise D2maeError(f"report image {path}: unsupported type '{path.suffix}'; use PNG, JPEG, GIF or SVG")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def markdown_to_html(text: str, base_dir: str | Path, title: str | None = None) -> str:
    """One self-contained HTML page of Markdown ``text``: local images (paths relative to ``base_dir``) embedded as
    data URIs, each with its alt text as a caption; remote images refused. The title is the first level-1 heading
    unless given."""
    base = Path(base_dir)
    md = MarkdownIt("commonmark", {"html": False}).enable("table")  # raw HTML escaped: text may hold user data

    def image(renderer: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        src, alt = token.attrGet("src") or "", token.content
        if "://" in src or src.startswith(("data:", "//")):
            raise D2maeError(f"Markdown image '{src}' is not a local file; a self-contained report embeds local "
                             "images only")
        caption = f'<span class="caption">{html.escape(alt)}</span>' if alt else ""
        return f'<img alt="{html.escape(alt)}" src="{_data_uri((base / src).resolve())}">{caption}'

    md.add_render_rule("image", image)
    tokens = md.parse(text)
    if title is None:
        title = next((tokens[i + 1].content for i, t in enumerate(tokens)
                      if t.type == "heading_open" and t.tag == "h1"), "") or "d2mae report"
    body = md.renderer.render(tokens, md.options, {})
    body = body.replace("&lt;u&gt;", "<u>").replace("&lt;/u&gt;", "</u>")  # the runner-up's underline (Table 2)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def write_html(md_path: str | Path, html_path: str | Path | None = None) -> Path:
    """Turn a Markdown report file into a self-contained HTML file next to it (default ``<stem>.html``)."""
    md = Path(md_path)
    if not md.is_file():
        raise D2maeError(f"Markdown report {md} does not exist")
    out = Path(html_path) if html_path is not None else md.with_suffix(".html")
    atomic_write_text(out, markdown_to_html(md.read_text(encoding="utf-8"), md.parent))
    return out


class Report:
    """A document of headings, paragraphs, tables and figures, written as Markdown and self-contained HTML.

    Example::

        rep = Report("D²MAE on BUS-BRA")
        rep.heading("Results"); rep.table(comparison_table(results)); rep.image(out / "bars.png", "Figure 2")
        rep.write(out)  # out/report.md (images linked) + out/report.html (images embedded)
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[_Block] = [_Heading(title, 1)]

    def heading(self, text: str, level: int = 2) -> "Report":
        self.blocks.append(_Heading(text, level))
        return self

    def paragraph(self, text: str) -> "Report":
        self.blocks.append(_Paragraph(text))
        return self

    def bullets(self, items: Iterable[str]) -> "Report":
        self.blocks.append(_Bullets([str(i) for i in items]))
        return self

    def code(self, text: str) -> "Report":
        self.blocks.append(_Code(text))
        return self

    def image(self, path: str | Path, caption: str = "") -> "Report":
        self.blocks.append(_Image(Path(path).resolve(), caption))
        return self

    def table(self, table: Table) -> "Report":
        self.blocks.append(table)
        return self

    def to_markdown(self, base_dir: str | Path) -> str:
        """Markdown with image paths relative to ``base_dir`` (the folder the .md file is written to)."""
        base = Path(base_dir).resolve()
        parts: list[str] = []
        for b in self.blocks:
            if isinstance(b, _Heading):
                parts.append("#" * min(max(b.level, 1), 6) + " " + b.text)
            elif isinstance(b, _Paragraph):
                parts.append(b.text)
            elif isinstance(b, _Bullets):
                parts.append("\n".join(f"- {i}" for i in b.items))
            elif isinstance(b, _Code):
                parts.append("```\n" + b.text.rstrip("\n") + "\n```")
            elif isinstance(b, _Image):
                rel = Path(os.path.relpath(b.path, base)).as_posix()
                parts.append(f"![{b.caption or b.path.name}]({rel})")
            else:
                parts.append(b.to_markdown().rstrip("\n"))
        return "\n\n".join(parts) + "\n"

    def write(self, out_dir: str | Path, stem: str = "report") -> tuple[Path, Path]:
        """Write ``out_dir/<stem>.md`` and ``out_dir/<stem>.html`` atomically; returns both paths."""
        out = Path(out_dir)
        md_path, html_path = out / f"{stem}.md", out / f"{stem}.html"
        text = self.to_markdown(out)
        page = markdown_to_html(text, out, self.title)  # first: a missing image fails before anything is written
        atomic_write_text(md_path, text)
        atomic_write_text(html_path, page)
        return md_path, html_path
