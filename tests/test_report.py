"""Report rendering: column order of the paper tables, every format, comparison tables."""

import csv
import io
import json

import pytest

from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.score.report import render, render_comparison


def _result(variant="adaln+cd", model="flux", scale=1.0):
    def values(base):
        return {"all": base * scale, "mean": base - 1, "aeroplane": 70.5, "bus": 33.25}

    return {
        "dataset": "spair",
        "model": model,
        "k": 28,
        "t": 260,
        "variant": variant,
        "protocol": "dift",
        "n_pairs": 5,
        "n_points": 11,
        "threshold_rule": "<=: correct if error <= alpha * threshold",
        "pck": {
            "0.05": {"per_image": values(40.0), "per_point": values(42.0)},
            "0.1": {"per_image": values(60.0), "per_point": values(67.1)},
        },
    }


def test_table_columns_categories_then_mean_then_all():
    text = render(_result(), "table")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("aggregation"))
    assert header.split() == ["aggregation", "alpha", "aeroplane", "bus", "Mean", "All"]
    assert "threshold rule <=" in text and "variant=adaln+cd" in text
    per_point_01 = next(line for line in lines if line.startswith("per point") and " 0.1 " in line)
    assert per_point_01.split()[-4:] == ["70.50", "33.25", "66.10", "67.10"]
    assert len([line for line in lines if line.startswith("per ")]) == 4


CONTEXT = ["spair", "flux", "28", "260", "adaln+cd", "dift", "<=: correct if error <= alpha * threshold"]


def test_csv_and_markdown_hold_the_same_numbers_and_the_context():
    rows = list(csv.reader(io.StringIO(render(_result(), "csv"))))
    assert rows[0] == ["dataset", "model", "k", "t", "variant", "protocol", "threshold_rule",
                       "aggregation", "alpha", "aeroplane", "bus", "Mean", "All"]
    assert [*CONTEXT, "per point", "0.1", "70.5", "33.25", "66.1", "67.1"] in rows  # CSV: full floats
    markdown = render(_result(), "markdown").splitlines()
    assert markdown[0].startswith("*dataset=spair; model=flux; k=28; t=260; variant=adaln+cd; protocol=dift;")
    assert "*all values in percent*" in markdown
    table = markdown[markdown.index("| aggregation | alpha | aeroplane | bus | Mean | All |"):]
    assert table[1].count("---") == 6
    assert "| per image | 0.05 | 70.50 | 33.25 | 39.00 | 40.00 |" in table


def test_json_round_trips():
    result = _result()
    assert json.loads(render(result, "json")) == result


def test_json_keeps_full_precision_display_rounds():
    result = _result()
    result["pck"]["0.1"]["per_point"]["all"] = 2.625
    assert json.loads(render(result, "json"))["pck"]["0.1"]["per_point"]["all"] == 2.625
    assert "2.625" in render(result, "csv")
    assert " 2.62" in render(result, "table")  # two decimals on screen only


def test_comparison_rows_per_variant_and_model():
    results = [_result("raw", scale=0.5), _result("adaln"), _result("adaln+cd", scale=1.02)]
    text = render_comparison(results, "csv", aggregation="per_point")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["dataset", "model", "k", "t", "protocol", "threshold_rule", "variant", "PCK@0.05", "PCK@0.1"]
    assert rows[1] == [*CONTEXT[:4], *CONTEXT[5:], "raw", "21.0", "33.55"]
    assert rows[3][6] == "adaln+cd"
    mixed = render_comparison([_result("adaln+cd"), _result("adaln+cd", model="sd3.5")], "markdown", summary="mean")
    assert mixed.splitlines()[0].startswith("*per point PCK (%), mean; dataset=spair; k=28; t=260;")
    assert "| model | variant | PCK@0.05 | PCK@0.1 |" in mixed.splitlines()
    assert "| sd3.5 | adaln+cd | 41.00 | 66.10 |" in mixed
    assert "threshold rule" in render_comparison(results, "table")


def test_unknown_format_and_aggregation():
    with pytest.raises(DitfError, match="table, json, csv, markdown"):
        render(_result(), "html")
    with pytest.raises(DitfError, match="aggregation"):
        render_comparison([_result()], aggregation="per_pixel")
