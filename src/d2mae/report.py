"""Tables, figures and self-contained reports in the style of the paper (Tables 2-3, Figures 2-3).

Tables (Markdown, also rendered to HTML):

* :func:`comparison_table` -- Table 2: rows = methods, columns = datasets (or metrics), cells "mean ± CI" in %,
  best in **bold**, second <u>underlined</u>, and a P-value row (best vs. runner-up, two-sided paired t-test over
  folds/seeds, :func:`d2mae.metrics.paired_ttest`).
* :func:`ablation_table` -- Table 3: groups of variants (blur range, embedding, OBS setting, search step), one metric.

Figures (PNG, matplotlib's Agg canvas, no pyplot state): :func:`roc_figure`, :func:`confusion_figure`,
:func:`metric_bars` (Figure 2), :func:`sigma_histogram` (Figure 3b), :func:`obs_strip` (Figure 3a),
:func:`training_curves`, :func:`reconstruction_figure` / :func:`image_grid`.

Reports: :class:`Report` collects headings, paragraphs, tables and images and writes ``<stem>.md`` plus a
self-contained ``<stem>.html`` (images embedded as base64 data URIs; no external file or URL is referenced).
:func:`markdown_to_html` converts the Markdown subset these reports use (headings, pipe tables, paragraphs, bullet
lists, code fences, image lines, ``**bold**``, ``<u>``, `` `code` ``), for Markdown written elsewhere.
Every file is written atomically (:mod:`d2mae.runtime`).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from d2mae.errors import D2maeError
from d2mae.metrics import MeanCI, TTestResult, mean_ci, paired_ttest
from d2mae.runtime import atomic_write_bytes, atomic_write_text

#: Per-fold/seed results of one method on one dataset: one value, a list (paired by position), or
#: ``{fold_name: value}`` (paired by name), or an already computed :class:`~d2mae.metrics.MeanCI` (no t-test).
Values = Union[float, Sequence[float], Mapping[str, float], MeanCI]


# ------------------------------------------------------------------------------------------- formatting
def format_value(value: float, scale: float = 100.0, digits: int = 2) -> str:
    """``0.8984 -> "89.84"``; NaN -> ``"n/a"``."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{float(value) * scale:.{digits}f}"


def format_mean_ci(stat: MeanCI, scale: float = 100.0, digits: int = 2) -> str:
    """``"89.84 ± 0.27"`` (mean ± half-width of the CI); just the mean when the CI is undefined (one value)."""
    if not math.isfinite(stat.mean):
        return "n/a"
    if not math.isfinite(stat.half_width):
        return format_value(stat.mean, scale, digits)
    return f"{stat.mean * scale:.{digits}f} ± {stat.half_width * scale:.{digits}f}"


def format_pvalue(p: float | None) -> str:
    """The paper's style: ``"< 0.001"``, ``"0.007"``; ``"n/a"`` when undefined."""
    if p is None or not math.isfinite(float(p)):
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.3f}"


def format_p_statement(p: float | None) -> str:
    """``"P = 0.007"``, ``"P < 0.001"`` or ``"P n/a"``."""
    text = format_pvalue(p)
    return f"P {text}" if text.startswith("<") else f"P = {text}" if text != "n/a" else "P n/a"


def _as_mean_ci(values: Values, confidence: float) -> tuple[MeanCI, Any]:
    """Summarise ``values`` as MeanCI; also return what a paired test can use (list, dict or None)."""
    if isinstance(values, MeanCI):
        return values, None
    if isinstance(values, Mapping):
        return mean_ci(list(values.values()), confidence), dict(values)
    if isinstance(values, (int, float, np.floating, np.integer)):
        return mean_ci([float(values)], confidence), [float(values)]
    seq = [float(v) for v in values]
    return mean_ci(seq, confidence), seq


def _pair(a: Any, b: Any) -> tuple[list[float], list[float], str | None]:
    """Match two methods' per-fold values: by fold name (mappings) or by position (lists)."""
    if a is None or b is None:
        return [], [], "per-fold values not available"
    if isinstance(a, dict) and isinstance(b, dict):
        common = [k for k in a if k in b]
        if not common:
            return [], [], "no fold/seed name in common: cannot pair"
        note = None if len(common) == len(a) == len(b) else f"paired on the {len(common)} folds both have"
        return [a[k] for k in common], [b[k] for k in common], note
    if isinstance(a, dict) or isinstance(b, dict):
        return [], [], "one method has named folds, the other a plain list: cannot pair"
    if len(a) != len(b):
        return [], [], f"different numbers of folds/seeds ({len(a)} vs {len(b)}): cannot pair"
    return list(a), list(b), None


# ---------------------------------------------------------------------------------------------- tables
@dataclasses.dataclass
class Table:
    """A table ready to render: header, rows of formatted cells (Markdown inline: ``**``, ``<u>``), notes.

    ``data`` keeps the numbers behind the cells (for JSON), ``align`` is one of ``l``/``r``/``c`` per column.
    """

    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    align: list[str] | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_markdown(self) -> str:
        def cell(text: str) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        align = self.align or ["l"] + ["r"] * (len(self.header) - 1)
        sep = {"l": ":---", "r": "---:", "c": ":---:"}
        lines = []
        if self.caption:
            lines += [self.caption, ""]
        lines.append("| " + " | ".join(cell(h) for h in self.header) + " |")
        lines.append("| " + " | ".join(sep.get(a, "---") for a in align) + " |")
        for row in self.rows:
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        return _render_html_blocks([_TableBlock(self)])


def comparison_table(results: Mapping[str, Mapping[str, Values]], columns: Sequence[str] | None = None,
                     higher_is_better: bool = True, scale: float = 100.0, digits: int = 2,
                     confidence: float = 0.95, info: Mapping[str, Mapping[str, str]] | None = None,
                     info_columns: Sequence[str] = (), method_label: str = "Method", caption: str = "",
                     pvalue_label: str = "P-value (best vs. second)") -> Table:
    """Table 2 of the paper: methods x datasets, "mean ± 95% CI" (%), best bold, second underlined, P-value row.

    Args:
        results: ``{method: {column: values}}`` where values are per-fold/seed metric values (fractions; a list
            paired by position or ``{fold: value}`` paired by name) or a single value. Missing cells show "-".
        columns: column order (default: order of first appearance).
        higher_is_better: rank by highest mean (False for losses).
        info / info_columns: extra text columns before the results, e.g. ``{"MAE": {"Pre-training": "US"}}``
            with ``info_columns=("Pre-training",)``.

    The P-value row is the two-sided paired t-test (``scipy.stats.ttest_rel``) of the best vs. the second method
    on the folds/seeds both have; "n/a" with a note when it is undefined (one fold, unpaired values).
    """
    methods = list(results)
    if not methods:
        raise D2maeError("comparison_table: no methods given")
    cols: list[str] = list(columns) if columns is not None else []
    if columns is None:
        for m in methods:
            cols += [c for c in results[m] if c not in cols]
    stats_: dict[str, dict[str, MeanCI]] = {m: {} for m in methods}
    raw: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for m in methods:
        for c in cols:
            if c in results[m] and results[m][c] is not None:
                stats_[m][c], raw[m][c] = _as_mean_ci(results[m][c], confidence)
    header = [method_label, *info_columns, *cols]
    rank: dict[str, dict[str, int]] = {c: {} for c in cols}
    col_data: dict[str, Any] = {}
    p_row = [pvalue_label] + [""] * len(info_columns)
    notes: list[str] = []
    for c in cols:
        have = [m for m in methods if c in stats_[m] and math.isfinite(stats_[m][c].mean)]
        order = sorted(have, key=lambda m: stats_[m][c].mean, reverse=higher_is_better)
        for i, m in enumerate(order[:2]):
            rank[c][m] = i
        entry: dict[str, Any] = {"ranking": order, "best": order[0] if order else None,
                                 "second": order[1] if len(order) > 1 else None}
        if len(order) >= 2:
            a, b, pair_note = _pair(raw[order[0]][c], raw[order[1]][c])
            test = paired_ttest(a, b) if a else TTestResult(math.nan, math.nan, 0, math.nan, None)
            note = "; ".join(x for x in (pair_note, test.note) if x) or None
            entry.update(pvalue=test.pvalue, statistic=test.statistic, n_pairs=test.n, note=note)
            p_row.append(format_pvalue(test.pvalue))
            if note and not math.isfinite(test.pvalue):
                notes.append(f"{c}: P-value n/a ({note}).")
        else:
            entry.update(pvalue=math.nan, statistic=math.nan, n_pairs=0, note="fewer than two methods have results")
            p_row.append("n/a")
            notes.append(f"{c}: P-value n/a (fewer than two methods have results).")
        col_data[c] = entry
    rows = []
    for m in methods:
        row = [m] + [str((info or {}).get(m, {}).get(k, "")) for k in info_columns]
        for c in cols:
            if c not in stats_[m]:
                row.append("-")
                continue
            text = format_mean_ci(stats_[m][c], scale, digits)
            r = rank[c].get(m)
            row.append(f"**{text}**" if r == 0 else f"<u>{text}</u>" if r == 1 else text)
        rows.append(row)
    rows.append(p_row)
    unit = " (%)" if scale == 100.0 else ""
    notes.insert(0, f"Cells: mean ± half-width of the {confidence:.0%} t-interval over folds/seeds{unit}; best in "
                    "bold, second underlined; P-value: two-sided paired t-test, best vs. second.")
    data = {"columns": col_data,
            "cells": {m: {c: s.to_dict() for c, s in stats_[m].items()} for m in methods},
            "higher_is_better": higher_is_better, "confidence": confidence}
    return Table(header, rows, caption, notes, ["l"] * (1 + len(info_columns)) + ["r"] * len(cols), data)


def ablation_table(groups: Mapping[str, Mapping[str, Values]], metric_label: str = "F1 (%)",
                   group_label: str = "Factor", variant_label: str = "Setting", higher_is_better: bool = True,
                   scale: float = 100.0, digits: int = 2, confidence: float = 0.95, caption: str = "") -> Table:
    """Table 3 of the paper: for each factor (blur range, embedding, OBS setting, search step) its variants and
    one metric; best of each group bold, second underlined. Best-vs-second P-values (paired t-test over
    folds/seeds, when defined) are listed under the table.

    Args:
        groups: ``{factor: {variant: values}}``, values as in :func:`comparison_table`.
    """
    if not groups:
        raise D2maeError("ablation_table: no groups given")
    rows: list[list[str]] = []
    notes: list[str] = []
    data: dict[str, Any] = {}
    for g, variants in groups.items():
        summ = {v: _as_mean_ci(val, confidence) for v, val in variants.items()}
        have = [v for v in summ if math.isfinite(summ[v][0].mean)]
        order = sorted(have, key=lambda v: summ[v][0].mean, reverse=higher_is_better)
        entry: dict[str, Any] = {"ranking": order, "cells": {v: s.to_dict() for v, (s, _) in summ.items()}}
        if len(order) >= 2:
            a, b, pair_note = _pair(summ[order[0]][1], summ[order[1]][1])
            test = paired_ttest(a, b) if a else TTestResult(math.nan, math.nan, 0, math.nan, None)
            entry.update(pvalue=test.pvalue, note="; ".join(x for x in (pair_note, test.note) if x) or None)
            if math.isfinite(test.pvalue):
                notes.append(f"{g}: {order[0]} vs. {order[1]}, {format_p_statement(test.pvalue)} "
                             f"(paired t-test over {test.n} folds/seeds).")
        data[g] = entry
        for i, (v, (s, _)) in enumerate(summ.items()):
            text = format_mean_ci(s, scale, digits)
            if order and v == order[0]:
                text = f"**{text}**"
            elif len(order) > 1 and v == order[1]:
                text = f"<u>{text}</u>"
            rows.append([g if i == 0 else "", v, text])
    return Table([group_label, variant_label, metric_label], rows, caption, notes, ["l", "l", "r"], data)


# --------------------------------------------------------------------------------------------- reports
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


@dataclasses.dataclass
class _TableBlock:
    table: Table


_Block = Union[_Heading, _Paragraph, _Bullets, _Code, _Image, _TableBlock]

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.8em 0}th,td{border:1px solid #bbb;
padding:.3em .6em}th{background:#f0f0f0}td.r,th.r{text-align:right}td.c,th.c{text-align:center}caption{caption-side:top;
text-align:left;padding:.3em 0;font-weight:600}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{color:#555;font-size:.9em}code,pre{background:#f6f6f6;font-family:ui-monospace,Menlo,Consolas,monospace}
pre{padding:.6em;overflow-x:auto}"""


def _inline_html(text: str) -> str:
    """Markdown inline subset -> HTML: escape everything, keep ``<u>``, turn ``**x**`` and `` `x` `` into tags."""
    out = html.escape(str(text), quote=False)
    out = out.replace("&lt;u&gt;", "<u>").replace("&lt;/u&gt;", "</u>")
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return out


def _data_uri(path: Path) -> str:
    if not path.is_file():
        raise D2maeError(f"report image {path} does not exist; write the figure before the report")
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
            ".gif": "image/gif"}.get(path.suffix.lower())
    if mime is None:
        raise D2maeError(f"report image {path}: unsupported type '{path.suffix}'; use PNG, JPEG, GIF or SVG")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _render_html_blocks(blocks: Iterable[_Block]) -> str:
    parts: list[str] = []
    for b in blocks:
        if isinstance(b, _Heading):
            lvl = min(max(b.level, 1), 6)
            parts.append(f"<h{lvl}>{_inline_html(b.text)}</h{lvl}>")
        elif isinstance(b, _Paragraph):
            parts.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, _Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, _Code):
            parts.append(f"<pre><code>{html.escape(b.text, quote=False)}</code></pre>")
        elif isinstance(b, _Image):
            alt = html.escape(b.caption or b.path.name)
            cap = f"<figcaption>{_inline_html(b.caption)}</figcaption>" if b.caption else ""
            parts.append(f'<figure><img alt="{alt}" src="{_data_uri(b.path)}">{cap}</figure>')
        elif isinstance(b, _TableBlock):
            t = b.table
            align = t.align or ["l"] + ["r"] * (len(t.header) - 1)
            cls = [f' class="{a}"' if a in ("r", "c") else "" for a in align] + [""] * len(t.header)
            rows = ["<tr>" + "".join(f"<th{cls[i]}>{_inline_html(h)}</th>" for i, h in enumerate(t.header))
                    + "</tr>"]
            for row in t.rows:
                rows.append("<tr>" + "".join(f"<td{cls[i]}>{_inline_html(c)}</td>" for i, c in enumerate(row))
                            + "</tr>")
            cap = f"<caption>{_inline_html(t.caption)}</caption>" if t.caption else ""
            parts.append(f"<table>{cap}{''.join(rows)}</table>")
            if t.notes:
                parts.append("<ul>" + "".join(f"<li>{_inline_html(n)}</li>" for n in t.notes) + "</ul>")
        else:  # pragma: no cover - blocks are created only by this module
            raise TypeError(type(b))
    return "\n".join(parts)


def _html_page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


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
        self.blocks.append(_TableBlock(table))
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
            elif isinstance(b, _TableBlock):
                parts.append(b.table.to_markdown().rstrip("\n"))
        return "\n\n".join(parts) + "\n"

    def to_html(self) -> str:
        """One HTML page, images embedded as data URIs (nothing outside the file is referenced)."""
        return _html_page(self.title, _render_html_blocks(self.blocks))

    def write(self, out_dir: str | Path, stem: str = "report") -> tuple[Path, Path]:
        """Write ``out_dir/<stem>.md`` and ``out_dir/<stem>.html`` atomically; returns both paths."""
        out = Path(out_dir)
        md_path, html_path = out / f"{stem}.md", out / f"{stem}.html"
        html_text = self.to_html()  # first: a missing image fails before anything is written
        atomic_write_text(md_path, self.to_markdown(out))
        atomic_write_text(html_path, html_text)
        return md_path, html_path


_TABLE_SEP = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_IMAGE_LINE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)\s*$")


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells = re.split(r"(?<!\\)\|", line)
    return [c.strip().replace("\\|", "|") for c in cells]


def _parse_markdown(text: str, base_dir: Path) -> tuple[list[_Block], str]:
    """Parse the Markdown subset written by :class:`Report` into blocks; returns (blocks, first h1 title)."""
    blocks: list[_Block] = []
    title = ""
    lines = text.splitlines()
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            blocks.append(_Paragraph(" ".join(s.strip() for s in para)))
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            i += 1
            continue
        if stripped.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            blocks.append(_Code("\n".join(lines[i + 1:j])))
            i = j + 1
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if m:
            flush()
            blocks.append(_Heading(m.group(2).strip(), len(m.group(1))))
            title = title or (m.group(2).strip() if len(m.group(1)) == 1 else "")
            i += 1
            continue
        m = _IMAGE_LINE.match(stripped)
        if m:
            flush()
            src = m.group("src")
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", src):
                raise D2maeError(f"Markdown image '{src}' is not a local file; a self-contained report embeds "
                                 "local images only")
            blocks.append(_Image((base_dir / src).resolve(), m.group("alt")))
            i += 1
            continue
        if stripped.startswith("|") and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1].strip()):
            flush()
            header = _split_row(stripped)
            align = []
            for spec in _split_row(lines[i + 1].strip()):
                align.append("c" if spec.startswith(":") and spec.endswith(":") else
                             "r" if spec.endswith(":") else "l")
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                rows.append(_split_row(lines[j].strip()))
                j += 1
            blocks.append(_TableBlock(Table(header, rows, align=align)))
            i = j
            continue
        if re.match(r"^[-*]\s+", stripped):
            flush()
            items = []
            while i < len(lines) and re.match(r"^[-*]\s+", lines[i].strip()):
                items.append(re.sub(r"^[-*]\s+", "", lines[i].strip()))
                i += 1
            blocks.append(_Bullets(items))
            continue
        para.append(line)
        i += 1
    flush()
    return blocks, title


def markdown_to_html(text: str, base_dir: str | Path, title: str | None = None) -> str:
    """Convert the Markdown subset of :class:`Report` to one self-contained HTML page.

    Local images (paths relative to ``base_dir``) are embedded as base64 data URIs; remote images are refused.
    """
    blocks, first_title = _parse_markdown(text, Path(base_dir))
    return _html_page(title or first_title or "d2mae report", _render_html_blocks(blocks))


def write_html(md_path: str | Path, html_path: str | Path | None = None) -> Path:
    """Turn a Markdown report file into a self-contained HTML file next to it (default ``<stem>.html``)."""
    md = Path(md_path)
    if not md.is_file():
        raise D2maeError(f"Markdown report {md} does not exist")
    out = Path(html_path) if html_path is not None else md.with_suffix(".html")
    atomic_write_text(out, markdown_to_html(md.read_text(encoding="utf-8"), md.parent))
    return out


# --------------------------------------------------------------------------------------------- figures
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory and write it atomically."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _display(img: Any) -> np.ndarray:
    """An image for ``imshow``: ``[H, W]`` gray or ``[H, W, 3]`` RGB; accepts ``[C, H, W]`` (C = 1 or 3) and
    torch tensors. Values in [0, 1] are shown as is; other ranges are min-max scaled per image."""
    if hasattr(img, "detach"):
        img = img.detach().float().cpu().numpy()
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # [C, H, W] -> [H, W, C]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise D2maeError(f"cannot show an image of shape {np.shape(img)}; expected [H, W], [H, W, 1|3] or [1|3, H, W]")
    finite = a[np.isfinite(a)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        lo, hi = finite.min(), finite.max()
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a


def _imshow(ax: Any, img: np.ndarray, cmap: str = "gray", vmin: float = 0.0, vmax: float = 1.0) -> None:
    import matplotlib

    cm = matplotlib.colormaps[cmap].with_extremes(bad="#7f7f7f")  # NaN (e.g. masked patches) shows mid-gray
    if img.ndim == 3:
        ax.imshow(np.nan_to_num(np.clip(img, 0, 1), nan=0.5))
    else:
        ax.imshow(np.ma.masked_invalid(img), cmap=cm, vmin=vmin, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])


def roc_figure(curves: Mapping[str, tuple[Any, Any]], path: str | Path, classes: Sequence[str] | None = None,
               title: str = "ROC") -> Path:
    """ROC curves: per fold and their mean (binary), or one-vs-rest per class (multi-class, all folds pooled).

    Args:
        curves: ``{fold_name: (y_true [N], probs [N, K])}``.

    Binary: each fold's curve, and with several folds the mean curve (TPR interpolated on a common FPR grid) with a
    ±1 s.d. band; the legend gives each AUROC. Multi-class: each class vs. rest on the pooled predictions plus the
    macro-average curve. Folds or classes on which AUROC is undefined are named in the legend, not drawn.
    """
    from sklearn.metrics import auc, roc_curve

    from d2mae.metrics import as_arrays

    if not curves:
        raise D2maeError("roc_figure: no predictions given")
    data = {name: as_arrays(y, p) for name, (y, p) in curves.items()}
    k = next(iter(data.values()))[1].shape[1]
    names = list(classes) if classes is not None else [str(i) for i in range(k)]
    grid = np.linspace(0.0, 1.0, 201)
    fig = _new_figure(5.6, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="chance")
    if k == 2:
        tprs, aucs = [], []
        many = len(data) > 1
        for name, (y, p, _) in data.items():
            if np.unique(y).size < 2:
                ax.plot([], [], " ", label=f"{name}: AUROC undefined (one class)")
                continue
            fpr, tpr, _ = roc_curve(y, p[:, 1])
            a = auc(fpr, tpr)
            aucs.append(a)
            ax.plot(fpr, tpr, lw=1 if many else 2, alpha=0.45 if many else 1.0,
                    label=f"{name} (AUROC {a * 100:.1f})")
            interp = np.interp(grid, fpr, tpr)
            interp[0] = 0.0
            tprs.append(interp)
        if many and tprs:
            mean_tpr = np.mean(tprs, axis=0)
            mean_tpr[-1] = 1.0
            std = np.std(tprs, axis=0)
            ax.plot(grid, mean_tpr, color="black", lw=2.2,
                    label=f"mean (AUROC {np.mean(aucs) * 100:.1f} ± {np.std(aucs) * 100:.1f} s.d.)")
            ax.fill_between(grid, np.clip(mean_tpr - std, 0, 1), np.clip(mean_tpr + std, 0, 1), color="gray",
                            alpha=0.2, label="± 1 s.d.")
    else:
        y = np.concatenate([d[0] for d in data.values()])
        p = np.concatenate([d[1] for d in data.values()])
        tprs = []
        for c in range(k):
            pos = y == c
            if pos.all() or not pos.any():
                ax.plot([], [], " ", label=f"{names[c]}: AUROC undefined (class absent)")
                continue
            fpr, tpr, _ = roc_curve(pos, p[:, c])
            ax.plot(fpr, tpr, lw=1.2, label=f"{names[c]} vs rest (AUROC {auc(fpr, tpr) * 100:.1f})")
            tprs.append(np.interp(grid, fpr, tpr))
        if tprs:
            macro = np.mean(tprs, axis=0)
            ax.plot(grid, macro, color="black", lw=2.2, label=f"macro average (AUROC {auc(grid, macro) * 100:.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, path)


def confusion_figure(cm: Any, classes: Sequence[str], path: str | Path, title: str = "Confusion matrix") -> Path:
    """Confusion matrix (rows = true, columns = predicted): colour = share of the true class, text = count (%)."""
    m = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    if m.shape != (k, k):
        raise D2maeError(f"confusion matrix of shape {m.shape} does not match {k} classes")
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(m.sum(axis=1, keepdims=True) > 0, m / m.sum(axis=1, keepdims=True), 0.0)
    size = 2.2 + 0.75 * k
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    font = 10 if k <= 4 else 8 if k <= 8 else 6
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(m[i, j])}\n({share[i, j] * 100:.0f}%)", ha="center", va="center", fontsize=font,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), labels=list(classes), rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    return save_figure(fig, path)


def _bar_stat(value: Any, confidence: float) -> tuple[float, float, float]:
    """(mean, low, high) from a MeanCI, a {"mean","low","high"} mapping, a list of fold values or one value."""
    if isinstance(value, MeanCI):
        return value.mean, value.low, value.high
    if isinstance(value, Mapping):
        if "mean" in value:
            get = lambda key: math.nan if value.get(key) is None else float(value[key])  # noqa: E731
            return get("mean"), get("low"), get("high")
        value = list(value.values())
    if isinstance(value, (int, float, np.floating, np.integer)):
        return float(value), math.nan, math.nan
    s = mean_ci([float(v) for v in value], confidence)
    return s.mean, s.low, s.high


def metric_bars(data: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path, scale: float = 100.0,
                ylabel: str = "%", title: str = "", confidence: float = 0.95) -> Path:
    """Figure 2 of the paper: grouped bars with 95% CI error bars, one panel per metric.

    Args:
        data: ``{panel (e.g. "ACC"): {group (dataset): {method: value}}}`` where a value is a
            :class:`~d2mae.metrics.MeanCI`, a mapping with ``mean``/``low``/``high`` (as in metrics.json), a list
            of per-fold values (mean ± t-interval) or one number (no error bar).
    """
    import matplotlib

    if not data:
        raise D2maeError("metric_bars: no data given")
    panels = list(data)
    methods: list[str] = []
    for panel in panels:
        for grp in data[panel].values():
            methods += [m for m in grp if m not in methods]
    colors = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    n_groups = max(len(data[p]) for p in panels)
    fig = _new_figure(max(4.5, 1.0 + n_groups * (0.35 * len(methods) + 0.6)) * len(panels) ** 0.5 + 1.5, 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    width = 0.8 / max(1, len(methods))
    lows_all = []
    for ax, panel in zip(axes, panels):
        groups = list(data[panel])
        for j, method in enumerate(methods):
            xs, ys, err = [], [], [[], []]
            for i, g in enumerate(groups):
                if method not in data[panel][g]:
                    continue
                mean, low, high = _bar_stat(data[panel][g][method], confidence)
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(mean * scale)
                err[0].append((mean - low) * scale if math.isfinite(low) else 0.0)
                err[1].append((high - mean) * scale if math.isfinite(high) else 0.0)
                lows_all.append((low if math.isfinite(low) else mean) * scale)
            ax.bar(xs, ys, width * 0.92, yerr=err, capsize=3, color=colors(j % colors.N),
                   label=method if ax is axes[0] else None, error_kw={"lw": 1})
        ax.set_xticks(range(len(groups)), labels=groups)
        ax.set_title(panel)
        ax.set_ylabel(f"{panel} ({ylabel})" if ylabel else panel)
        ax.grid(axis="y", alpha=0.3)
    if lows_all:  # start the axis below the lowest bar's CI, like the paper's zoomed-in bars
        bottom = max(0.0, math.floor((min(lows_all) - 5.0) / 5.0) * 5.0)
        for ax in axes:
            ax.set_ylim(bottom=bottom)
    fig.legend(loc="outside lower center", ncols=min(len(methods), 5), fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def sigma_histogram(values: Any, path: str | Path, groups: Sequence[Any] | None = None, title: str = "",
                    xlabel: str = "σ* (optimal blurriness)", max_groups: int = 24,
                    group_order: Sequence[str] | None = None) -> Path:
    """Figure 3b of the paper: the distribution of σ* (or t*) chosen by OBS, one panel per group.

    Args:
        values: ``[N]`` σ* per image (discrete levels; NaN = no OBS value, counted in the title).
        groups: ``[N]`` group of each image (class, scanner, dataset); ``None`` = one panel.
        max_groups: the largest groups are drawn, and the title says how many were left out.
        group_order: panel order (e.g. the class order); default: sorted names.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    g = np.asarray(["all"] * v.size if groups is None else [str(x) for x in groups], dtype=object)
    if g.size != v.size:
        raise D2maeError(f"sigma_histogram: {v.size} values but {g.size} group labels")
    keep = np.isfinite(v)
    if not keep.any():
        raise D2maeError("sigma_histogram: no finite σ* values to plot")
    n_missing = int((~keep).sum())
    v, g = v[keep], g[keep]
    levels = np.unique(np.round(v, 6))  # the discrete σ levels actually chosen
    names, counts = np.unique(g, return_counts=True)
    order = [names[i] for i in np.argsort(-counts, kind="stable")]
    shown = order[:max_groups]
    if len(order) > 1 and groups is not None:
        rank = {str(n): i for i, n in enumerate(group_order or [])}
        shown = sorted(shown, key=lambda n: (rank.get(str(n), len(rank)), str(n)))
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = _new_figure(3.2 * ncols + 0.5, 2.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    step = float(np.min(np.diff(levels))) if levels.size > 1 else 0.1
    for ax, name in zip(axes.ravel(), shown):
        sel = np.round(v[g == name], 6)
        frac = np.array([(sel == lv).mean() for lv in levels])
        ax.bar(levels, frac * 100.0, width=step * 0.8, color="#4c72b0")
        ax.axvline(float(np.mean(sel)), color="#c44e52", lw=1.2, ls="--")
        ax.set_title(f"{name} (n={sel.size}, mean {np.mean(sel):.2f})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if levels.size <= 12:
            ax.set_xticks(levels, labels=[f"{lv:g}" for lv in levels], fontsize=8)
    for ax in axes.ravel()[len(shown):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel("% of images")
    extra = []
    if len(order) > len(shown):
        extra.append(f"{len(shown)} largest of {len(order)} groups shown")
    if n_missing:
        extra.append(f"{n_missing} image(s) without a value left out")
    full = title or "Distribution of the optimal blurriness"
    fig.suptitle(full + (f" ({'; '.join(extra)})" if extra else ""), fontsize=10)
    return save_figure(fig, path)


def obs_strip(original: Any, blurred: Sequence[Any], deblurred: Sequence[Any], sigmas: Sequence[float],
              losses: Sequence[float], path: str | Path, chosen: int | None = None,
              title: str = "Optimal blurriness search") -> Path:
    """Figure 3a of the paper: the OBS procedure on one image (Eq. 4-5).

    Columns are the searched levels; rows show the blurred input G_σt(x), the deblurred output x̂^(t), and the
    absolute difference |x̂^(t) - x| (one colour scale for all levels); the original sits at the left, and the
    bottom panel plots L_deblur^(t) against σ_t. The chosen level (default: argmin of ``losses``) is framed in red.

    Args:
        original: ``[H, W]`` (or ``[H, W, C]`` / ``[C, H, W]``) image in [0, 1].
        blurred, deblurred: ``L`` images of the same shape (or arrays ``[L, ...]``).
        sigmas, losses: ``[L]`` σ of each searched level and its deblurring loss.
    """
    n = len(sigmas)
    if not (len(blurred) == len(deblurred) == len(losses) == n) or n == 0:
        raise D2maeError(f"obs_strip: need the same number (>0) of blurred ({len(blurred)}), deblurred "
                         f"({len(deblurred)}), sigmas ({n}) and losses ({len(losses)})")
    loss = np.asarray(losses, dtype=np.float64)
    best = int(np.nanargmin(loss)) if chosen is None else int(chosen)
    if not 0 <= best < n:
        raise D2maeError(f"obs_strip: chosen level {chosen} is outside 0..{n - 1}")
    orig = _display(original)
    blur = [_display(b) for b in blurred]
    deb = [_display(d) for d in deblurred]
    for name, arr in (("blurred", blur), ("deblurred", deb)):
        if any(a.shape != orig.shape for a in arr):
            raise D2maeError(f"obs_strip: every {name} image must have the original's shape {orig.shape}")
    diff = [np.abs(d - orig) if d.ndim == 2 else np.abs(d - orig).mean(axis=-1) for d in deb]
    dmax = max(float(np.nanmax(d)) for d in diff) or 1.0
    fig = _new_figure(1.55 * (n + 1) + 0.8, 1.6 * 3 + 2.2)
    gs = fig.add_gridspec(4, n + 1, height_ratios=[1, 1, 1, 1.15])
    ax = fig.add_subplot(gs[0, 0])
    _imshow(ax, orig)
    ax.set_title("original", fontsize=9)
    for r, label in enumerate(("blurred\nG_σ(x)", "deblurred\nx̂(t)", "difference\n|x̂(t) − x|")):
        if r > 0:
            ax = fig.add_subplot(gs[r, 0])
            ax.axis("off")
            ax.text(0.5, 0.5, label, ha="center", va="center", fontsize=9, transform=ax.transAxes)
        else:
            ax.set_ylabel(label, fontsize=8)
    for c in range(n):
        for r, img in enumerate((blur[c], deb[c], diff[c])):
            ax = fig.add_subplot(gs[r, c + 1])
            if r == 2:
                _imshow(ax, img, cmap="magma", vmin=0.0, vmax=dmax)
            else:
                _imshow(ax, img)
            if r == 0:
                ax.set_title(f"σ = {float(sigmas[c]):.2f}" + (" (σ*)" if c == best else ""), fontsize=9,
                             color="#d62728" if c == best else "black", fontweight="bold" if c == best else None)
            if c == best:
                ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, ec="#d62728", lw=3,
                                       clip_on=False))
    ax = fig.add_subplot(gs[3, :])
    s = np.asarray(sigmas, dtype=np.float64)
    ax.plot(s, loss, marker="o", color="#4c72b0")
    ax.plot([s[best]], [loss[best]], marker="o", ms=11, mfc="none", mec="#d62728", mew=2,
            label=f"σ* = {s[best]:.2f} (min loss {loss[best]:.4g})")
    ax.set_xlabel("σ_t")
    ax.set_ylabel("L_deblur(t)")
    ax.set_xticks(s)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def read_records(source: str | Path) -> list[dict[str, float]]:
    """Numeric records from a ``metrics.jsonl`` (one JSON object per line) or a CSV with a header row.

    Non-numeric fields are dropped; a malformed line is a :class:`D2maeError` naming the file and line.
    """
    path = Path(source)
    if not path.is_file():
        raise D2maeError(f"metrics file {path} does not exist")
    records: list[dict[str, float]] = []

    def numeric(row: Mapping[str, Any]) -> dict[str, float]:
        out = {}
        for k, v in row.items():
            if isinstance(v, bool) or v is None or v == "":
                continue
            try:
                out[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
        return out

    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                records.append(numeric(row))
    else:
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise D2maeError(f"metrics file {path}, line {no}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise D2maeError(f"metrics file {path}, line {no}: expected a JSON object per line")
            records.append(numeric(obj))
    return records


_AXIS_KEYS = ("step", "global_step", "iteration", "iter", "epoch", "time", "elapsed", "wall_time")


def training_curves(source: str | Path | Sequence[Mapping[str, Any]], path: str | Path,
                    keys: Sequence[str] | None = None, title: str = "Training") -> Path:
    """Loss against step (or epoch) and validation metrics against epoch, from metrics.jsonl / CSV records.

    Panels, by column name: every column containing "loss" (x = ``step`` when the record has it, else ``epoch``);
    columns starting with "val" (validation loss and validation metrics in separate panels, x = ``epoch`` when
    present); learning rate columns ("lr"). Pass ``keys`` to plot exactly those columns in one panel.
    """
    src_name = str(source) if isinstance(source, (str, Path)) else "records"
    records = read_records(source) if isinstance(source, (str, Path)) else [
        {k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for r in source]
    if not records:
        raise D2maeError(f"metrics file {src_name} holds no records")
    all_keys: list[str] = []
    for r in records:
        all_keys += [k for k in r if k not in all_keys and k not in _AXIS_KEYS]
    if keys is not None:
        missing = [k for k in keys if k not in all_keys]
        if missing:
            raise D2maeError(f"metrics file {src_name} has no column(s) {missing}; it has {all_keys}")
        panels = [("", list(keys), "step")]
    else:
        low = {k: k.lower() for k in all_keys}
        loss = [k for k in all_keys if "loss" in low[k] and not low[k].startswith("val")]
        val_loss = [k for k in all_keys if "loss" in low[k] and low[k].startswith("val")]
        val = [k for k in all_keys if low[k].startswith("val") and "loss" not in low[k]]
        lr = [k for k in all_keys if low[k] == "lr" or low[k].endswith("_lr") or low[k].startswith("lr")]
        panels = [(n, ks, x) for n, ks, x in (("Training loss", loss, "step"), ("Validation loss", val_loss, "epoch"),
                                               ("Validation metrics", val, "epoch"), ("Learning rate", lr, "step"))
                  if ks]
        if not panels:
            raise D2maeError(f"metrics file {src_name}: no column with 'loss', 'val' or 'lr' in its name "
                             f"(columns: {all_keys}); pass keys=[...]")
    fig = _new_figure(4.6 * len(panels) + 0.4, 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, ks, prefer) in zip(axes, panels):
        xlabels = set()
        for k in ks:
            rows = [r for r in records if k in r and math.isfinite(r[k])]
            xkey = prefer if rows and all(prefer in r for r in rows) else next(
                (a for a in ("step", "epoch", "global_step", "iteration") if rows and all(a in r for r in rows)), None)
            xs = [r[xkey] for r in rows] if xkey else list(range(len(rows)))
            xlabels.add(xkey or "record")
            ax.plot(xs, [r[k] for r in rows], marker="o" if len(rows) < 30 else None, ms=3, lw=1.3, label=k)
        ax.set_xlabel(" / ".join(sorted(xlabels)))
        ax.set_title(name)
        if name == "Learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def image_grid(columns: Mapping[str, Any], path: str | Path, row_labels: Sequence[str] | None = None,
               max_rows: int = 8, title: str = "") -> Path:
    """A grid of images: one column per entry of ``columns`` (each ``[B, H, W]``, ``[B, H, W, C]`` or
    ``[B, C, H, W]``, values in [0, 1]; NaN pixels show gray), one row per image (at most ``max_rows``)."""
    if not columns:
        raise D2maeError("image_grid: no columns given")
    arrays = {k: (v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
              for k, v in columns.items()}
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise D2maeError(f"image_grid: columns hold different numbers of images: {sizes}")
    b = min(next(iter(sizes.values())), max_rows)
    if b == 0:
        raise D2maeError("image_grid: no images given")
    fig = _new_figure(1.9 * len(arrays) + (0.8 if row_labels else 0.2), 1.9 * b + 0.5)
    axes = fig.subplots(b, len(arrays), squeeze=False)
    for j, (name, arr) in enumerate(arrays.items()):
        for i in range(b):
            _imshow(axes[i, j], _display(arr[i]))
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
            if j == 0 and row_labels is not None and i < len(row_labels):
                axes[i, j].set_ylabel(str(row_labels[i]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def reconstruction_figure(original: Any, masked: Any, reconstruction: Any, path: str | Path,
                          blurred: Any | None = None, row_labels: Sequence[str] | None = None,
                          max_rows: int = 8, title: str = "Masked reconstruction") -> Path:
    """Pre-training reconstructions (Eq. 1-3): original x, optionally the blurred x_b, the masked input x_b^m
    (masked patches as NaN or any fill value), and the reconstruction x̂, one row per image."""
    cols: dict[str, Any] = {"original x": original}
    if blurred is not None:
        cols["blurred x_b"] = blurred
    cols["masked input"] = masked
    cols["reconstruction x̂"] = reconstruction
    return image_grid(cols, path, row_labels=row_labels, max_rows=max_rows, title=title)
