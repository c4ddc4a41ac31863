"""Tables in the style of the paper (Tables 2-3), as Markdown with an HTML rendering in reports.

* :func:`comparison_table` -- Table 2: rows = methods, columns = datasets (or metrics), cells "mean ± CI" in %,
  best in **bold**, second <u>underlined</u>, and a P-value row (best vs. runner-up, two-sided paired t-test over
  folds/seeds, :func:`d2mae.eval.statistics.paired_ttest`).
* :func:`ablation_table` -- Table 3: groups of variants (blur range, embedding, OBS setting, search step), one metric.
* :func:`format_value`, :func:`format_ci`, :func:`format_mean_ci`, :func:`format_pvalue`: the numbers as text.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence, Union

import numpy as np

from d2mae.eval.statistics import MeanCI, TTestResult, mean_ci, minimum_detectable_effect, paired_ttest
from d2mae.runtime.errors import D2maeError

#: Per-fold/seed results of one method on one dataset: one value, a list (paired by position), or
#: ``{fold_name: value}`` (paired by name), or an already computed :class:`~d2mae.eval.statistics.MeanCI` (no t-test).
Values = Union[float, Sequence[float], Mapping[str, float], MeanCI]


def format_value(value: float, scale: float = 100.0, digits: int = 2) -> str:
    """``0.8984 -> "89.84"``; NaN -> ``"n/a"``."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{float(value) * scale:.{digits}f}"


def format_ci(value: float | None, low: float | None, high: float | None) -> str:
    """``"89.84 [88.90, 90.71]"`` (%); without a finite interval just the value; NaN or ``None`` -> ``"n/a"``."""
    value, low, high = (math.nan if v is None else float(v) for v in (value, low, high))
    if not math.isfinite(value):
        return "n/a"
    if not (math.isfinite(low) and math.isfinite(high)):
        return format_value(value)
    return f"{format_value(value)} [{format_value(low)}, {format_value(high)}]"


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


MDE_LABEL = "MDE (P < 0.05, 80% power)"


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


def _best_vs_second(best: Any, second: Any) -> dict[str, Any]:
    """The paired t-test of the best vs. the second method's per-fold values, and its minimum detectable effect."""
    a, b, pair_note = _pair(best, second)
    test = paired_ttest(a, b) if a else TTestResult(math.nan, math.nan, 0, math.nan, None)
    return {"pvalue": test.pvalue, "statistic": test.statistic, "n_pairs": test.n,
            "note": "; ".join(x for x in (pair_note, test.note) if x) or None,
            "mde": minimum_detectable_effect(np.subtract(a, b)) if a else math.nan}


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
    p_row, mde_row = [pvalue_label] + [""] * len(info_columns), [MDE_LABEL] + [""] * len(info_columns)
    notes: list[str] = []
    for c in cols:
        have = [m for m in methods if c in stats_[m] and math.isfinite(stats_[m][c].mean)]
        order = sorted(have, key=lambda m: stats_[m][c].mean, reverse=higher_is_better)
        for i, m in enumerate(order[:2]):
            rank[c][m] = i
        entry: dict[str, Any] = {"ranking": order, "best": order[0] if order else None,
                                 "second": order[1] if len(order) > 1 else None}
        if len(order) >= 2:
            entry.update(_best_vs_second(raw[order[0]][c], raw[order[1]][c]))
            p_row.append(format_pvalue(entry["pvalue"]))
            mde_row.append(f"{entry['mde'] * scale:.{digits}f}" if math.isfinite(entry["mde"]) else "n/a")
            if entry["note"] and not math.isfinite(entry["pvalue"]):
                notes.append(f"{c}: P-value n/a ({entry['note']}).")
        else:
            entry.update(pvalue=math.nan, statistic=math.nan, n_pairs=0, note="fewer than two methods have results",
                         mde=math.nan)
            p_row.append("n/a")
            mde_row.append("n/a")
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
    rows.append(mde_row)
    unit = " (%)" if scale == 100.0 else ""
    notes.insert(0, f"Cells: mean ± half-width of the {confidence:.0%} t-interval over folds/seeds{unit}; best in "
                    "bold, second underlined; P-value: two-sided paired t-test, best vs. second; "
                    f"{MDE_LABEL}: the smallest true best − second difference"
                    f"{' in points' if scale == 100.0 else ''} "
                    "that test would detect at P < 0.05 with 80% power, given the spread of the paired differences "
                    "measured here (a non-significant result rules out a gap larger than this, at that power).")
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
            mde = minimum_detectable_effect(np.subtract(a, b)) if a else math.nan
            entry.update(pvalue=test.pvalue, note="; ".join(x for x in (pair_note, test.note) if x) or None, mde=mde)
            if math.isfinite(test.pvalue):
                notes.append(f"{g}: {order[0]} vs. {order[1]}, {format_p_statement(test.pvalue)} "
                             f"(paired t-test over {test.n} folds/seeds); minimum detectable effect "
                             f"{mde * scale:.{digits}f} (P < 0.05, 80% power).")
        data[g] = entry
        for i, (v, (s, _)) in enumerate(summ.items()):
            text = format_mean_ci(s, scale, digits)
            if order and v == order[0]:
                text = f"**{text}**"
            elif len(order) > 1 and v == order[1]:
                text = f"<u>{text}</u>"
            rows.append([g if i == 0 else "", v, text])
    return Table([group_label, variant_label, metric_label], rows, caption, notes, ["l", "l", "r"], data)
