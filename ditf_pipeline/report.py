"""Render score dicts (`score.pck`) as text tables, JSON, CSV or Markdown.

Layout of a single result follows the paper's Tables 2/3: categories as columns, then Mean
(unweighted over categories), then All (pooled) last; one row per (aggregation, alpha).
`render_comparison` puts several results side by side, one row per variant (or per
(model, variant) when models differ), for the ablation tables 4/5. No torch here.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

FORMATS = ("table", "json", "csv", "markdown")
AGGREGATIONS = ("per_point", "per_image")
_SUMMARY = ("mean", "all")


def _categories(result: dict) -> list[str]:
    """Category columns in the order the scorer wrote them (everything but mean/all)."""
    for by_aggregation in result["pck"].values():
        for values in by_aggregation.values():
            return [key for key in values if key not in _SUMMARY]
    return []


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.2f}"
    return str(value)


def _grid(header: list[str], rows: list[list[str]], fmt: str) -> str:
    """Lay out a header and rows of strings in one of the text formats."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return out.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]) + "\n"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        from .errors import DitfError

        raise DitfError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _title(result: dict) -> str:
    parts = [f"{key}={result.get(key)}" for key in ("dataset", "model", "k", "t", "variant", "protocol")]
    return (
        "PCK (%) " + " ".join(parts) + f"  pairs={result.get('n_pairs')} points={result.get('n_points')}\n"
        f"threshold rule {result.get('threshold_rule')}\n"
    )


def _render_metrics(result: dict, fmt: str) -> str:
    """DAVIS (J&F globally and per sequence) and HPatches (accuracy at 1/3/5 px) results."""
    if "global" in result:  # DAVIS
        rows = [["global", *(_fmt(result["global"].get(n)) for n in ("J&F-Mean", "J-Mean", "F-Mean"))]]
        rows += [[name, *(_fmt(v.get(n)) for n in ("J&F-Mean", "J-Mean", "F-Mean"))]
                 for name, v in result.get("per_sequence", {}).items()]
        header = ["sequence", "J&F-Mean", "J-Mean", "F-Mean"]
    else:  # HPatches
        groups = result["accuracy"]
        columns = [c for c in next(iter(groups.values())) if c != "n"]
        header = ["sequences", "pairs", *columns]
        rows = [[name, str(v["n"]), *(_fmt(v.get(c)) for c in columns)] for name, v in groups.items()]
    body = _grid(header, rows, fmt)
    if fmt != "table":
        return body
    title = " ".join(f"{key}={result.get(key)}" for key in ("dataset", "model", "k", "t", "variant"))
    return f"{title}\nprotocol {result.get('protocol')}\n" + body


def render(result: dict, fmt: str = "table") -> str:
    """One result: rows (aggregation, alpha), columns categories..., Mean, All."""
    _check_format(fmt)
    if fmt == "json":
        return json.dumps(result, indent=2) + "\n"
    if "pck" not in result:
        return _render_metrics(result, fmt)
    categories = _categories(result)
    header = ["aggregation", "alpha", *categories, "Mean", "All"]
    rows = []
    for aggregation in AGGREGATIONS:
        for alpha, by_aggregation in result["pck"].items():
            values = by_aggregation.get(aggregation)
            if values is None:
                continue
            rows.append(
                [aggregation.replace("_", " "), alpha]
                + [_fmt(values.get(c)) for c in categories]
                + [_fmt(values.get("mean")), _fmt(values.get("all"))]
            )
    body = _grid(header, rows, fmt)
    return (_title(result) + body) if fmt == "table" else body


def _row_label(result: dict, with_model: bool) -> list[str]:
    return [str(result.get("model")), str(result.get("variant"))] if with_model else [str(result.get("variant"))]


def render_comparison(
    results: Sequence[dict],
    fmt: str = "table",
    aggregation: str = "per_point",
    alphas: Sequence[str] | None = None,
    summary: str = "all",
) -> str:
    """Several results as one table: one row per variant ((model, variant) if models differ).

    Columns: PCK@alpha of `aggregation` ("per_point" or "per_image"), value `summary`
    ("all" pooled, "mean" over categories, or a category name), for every alpha in `alphas`
    (default: the alphas of the first result).
    """
    _check_format(fmt)
    if fmt == "json":
        return json.dumps(list(results), indent=2) + "\n"
    if not results:
        return ""
    if aggregation not in AGGREGATIONS:
        from .errors import DitfError

        raise DitfError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    alphas = list(alphas) if alphas is not None else list(results[0]["pck"])
    with_model = len({r.get("model") for r in results}) > 1
    header = (["model", "variant"] if with_model else ["variant"]) + [f"PCK@{a}" for a in alphas]
    rows = []
    for result in results:
        values = [result["pck"].get(a, {}).get(aggregation, {}).get(summary) for a in alphas]
        rows.append(_row_label(result, with_model) + [_fmt(v) for v in values])
    body = _grid(header, rows, fmt)
    if fmt == "table":
        rules = sorted({str(r.get("threshold_rule")) for r in results})
        note = f"{aggregation.replace('_', ' ')} PCK (%), {summary}; threshold rule {' / '.join(rules)}\n"
        return note + body
    return body
