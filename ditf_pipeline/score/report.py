"""Render score dicts (`score.pck`) as text tables, JSON, CSV or Markdown.

Layout of a single result follows the paper's Tables 2/3: categories as columns, then Mean
(unweighted over categories), then All (pooled) last; one row per (aggregation, alpha).
`render_comparison` puts several results side by side, one row per variant (or per
(model, variant) when models differ), for the ablation tables 4/5. No torch here.

Every metric is in percent. Values are rounded to two decimals for display only: JSON keeps the
full float. Every format says what it scores: the text table and Markdown start with a context
line, CSV repeats the context in leading columns (one self-contained frame for pandas), JSON
carries every field. `write_rows` writes per-pair rows as CSV or (with pyarrow) Parquet.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

FORMATS = ("table", "json", "csv", "markdown")
#: what a result was computed from, in the order the context line and the CSV columns show it
CONTEXT = ("dataset", "split", "model", "k", "t", "variant", "protocol", "threshold_rule", "store", "prediction")
AGGREGATIONS = ("per_point", "per_image")
_SUMMARY = ("mean", "all")


def _categories(result: dict) -> list[str]:
    """Category columns in the order the scorer wrote them (everything but mean/all)."""
    for by_aggregation in result["pck"].values():
        for values in by_aggregation.values():
            return [key for key in values if key not in _SUMMARY]
    return []


def _fmt(value, fmt: str = "table") -> str:
    """Two decimals for reading; CSV (read back by programs) keeps the full float."""
    if value is None:
        return "-" if fmt != "csv" else ""
    if isinstance(value, float):
        if value != value:
            return "nan"
        return repr(value) if fmt == "csv" else f"{value:.2f}"
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

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]) + "\n"


def _context_values(result: dict, keys: Sequence[str] = CONTEXT) -> list[tuple[str, str]]:
    return [(key, "" if result.get(key) is None else str(result.get(key))) for key in keys if key in result]


def _context_line(result: dict) -> str:
    """One Markdown line: the settings, and the feature extraction settings of the store."""
    parts = [f"{key}={value}" for key, value in _context_values(result)]
    features = result.get("features") or {}
    scalars = [f"{key}={value}" for key, value in features.items() if isinstance(value, (int, float, str)) and key != "model"]
    line = "*" + "; ".join(parts) + "*  \n"
    if scalars:
        line += "*features: " + ", ".join(scalars) + "*  \n"
    return line + "*all values in percent*\n\n"


def _with_context(result: dict, header: list[str], rows: list[list[str]], fmt: str, skip: Sequence[str] = ()) -> str:
    """The grid in `fmt`, carrying the result's context (CSV: leading columns; Markdown: a line)."""
    if fmt == "csv":
        context = [(key, value) for key, value in _context_values(result) if key not in skip]
        return _grid([key for key, _ in context] + header, [[value for _, value in context] + row for row in rows], fmt)
    body = _grid(header, rows, fmt)
    return _context_line(result) + body if fmt == "markdown" else body


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        from ..core.errors import DitfError

        raise DitfError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _title(result: dict) -> str:
    parts = [f"{key}={result.get(key)}" for key in ("dataset", "split", "model", "k", "t", "variant", "protocol")]
    return (
        "PCK (%) " + " ".join(parts) + f"  pairs={result.get('n_pairs')} points={result.get('n_points')}\n"
        f"threshold rule {result.get('threshold_rule')}\n"
    )


def _render_metrics(result: dict, fmt: str) -> str:
    """DAVIS (J&F globally and per sequence) and HPatches (accuracy at 1/3/5 px) results."""
    if "global" in result:  # DAVIS
        rows = [["global", *(_fmt(result["global"].get(n), fmt) for n in ("J&F-Mean", "J-Mean", "F-Mean"))]]
        rows += [[name, *(_fmt(v.get(n), fmt) for n in ("J&F-Mean", "J-Mean", "F-Mean"))]
                 for name, v in result.get("per_sequence", {}).items()]
        header = ["sequence", "J&F-Mean", "J-Mean", "F-Mean"]
    else:  # HPatches
        groups = result["accuracy"]
        columns = [c for c in next(iter(groups.values())) if c != "n"]
        header = ["sequences", "pairs", *columns]
        rows = [[name, str(v["n"]), *(_fmt(v.get(c), fmt) for c in columns)] for name, v in groups.items()]
    if fmt != "table":
        return _with_context(result, header, rows, fmt)
    title = " ".join(f"{key}={result.get(key)}" for key in ("dataset", "split", "model", "k", "t", "variant"))
    return f"{title}  (all values in percent)\nprotocol {result.get('protocol')}\n" + _grid(header, rows, fmt)


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
                + [_fmt(values.get(c), fmt) for c in categories]
                + [_fmt(values.get("mean"), fmt), _fmt(values.get("all"), fmt)]
            )
    if fmt == "table":
        return _title(result) + _grid(header, rows, fmt)
    return _with_context(result, header, rows, fmt)


def _row_label(result: dict, with_model: bool, with_key: bool = False) -> list[str]:
    label = [str(result.get("model")), str(result.get("variant"))] if with_model else [str(result.get("variant"))]
    return label + ([f"k{result.get('k')}/t{result.get('t')}"] if with_key else [])


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
        from ..core.errors import DitfError

        raise DitfError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    alphas = list(alphas) if alphas is not None else list(results[0]["pck"])
    with_model = len({r.get("model") for r in results}) > 1
    with_key = len({(r.get("k"), r.get("t")) for r in results}) > 1  # rows of one variant at two keys stay apart
    header = ((["model", "variant"] if with_model else ["variant"]) + (["key"] if with_key else [])
              + [f"PCK@{a}" for a in alphas])
    rows = []
    for result in results:
        values = [result["pck"].get(a, {}).get(aggregation, {}).get(summary) for a in alphas]
        rows.append(_row_label(result, with_model, with_key) + [_fmt(v, fmt) for v in values])
    if fmt == "csv":  # each row's own context in leading columns
        labels = ({"model", "variant"} if with_model else {"variant"}) | ({"k", "t"} if with_key else set())
        keys = [key for key in CONTEXT if key not in labels]
        context = [[value for _, value in _context_values(r, keys)] for r in results]
        names = [key for key, _ in _context_values(results[0], keys)]
        return _grid(names + header, [c + row for c, row in zip(context, rows)], fmt)
    body = _grid(header, rows, fmt)
    if fmt == "markdown":
        shared = {key: results[0].get(key) for key in CONTEXT
                  if all(str(r.get(key)) == str(results[0].get(key)) for r in results)}
        note = f"*{aggregation.replace('_', ' ')} PCK (%), {summary}; " + "; ".join(
            f"{key}={value}" for key, value in shared.items() if value is not None) + "*\n\n"
        return note + body
    if fmt == "table":
        rules = sorted({str(r.get("threshold_rule")) for r in results})
        note = f"{aggregation.replace('_', ' ')} PCK (%), {summary}; threshold rule {' / '.join(rules)}\n"
        return note + body
    return body


#: file endings `write_rows` knows
ROW_FORMATS = (".csv", ".parquet")


def check_rows_path(path) -> None:
    """Refuse an unknown ending, or Parquet without pyarrow, before any work is done."""
    from pathlib import Path

    from ..core.errors import DitfError

    suffix = Path(path).suffix.lower()
    if suffix not in ROW_FORMATS:
        raise DitfError(f"--per-pair {path}: write a .csv or .parquet file")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise DitfError(f"--per-pair {path}: Parquet needs pyarrow (pip install pyarrow); or write a .csv file") from None


def write_rows(rows: Sequence[dict], path) -> None:
    """Flat dict rows (same keys) as CSV, or Parquet when the file ends in .parquet (pyarrow):
    `pandas.read_csv` / `read_parquet` give one tidy frame, one row per pair."""
    from pathlib import Path

    check_rows_path(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else []
    for row in rows:
        columns += [key for key in row if key not in columns]
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path)
        return
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
