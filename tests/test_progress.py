"""Progress output: bars on a terminal, periodic plain lines (rate, ETA) in logs, --quiet."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.demo import make_demo
from ditf_pipeline.core.progress import LineProgress, progress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_every_ten_percent_with_rate_and_eta():
    clock, out = _Clock(), io.StringIO()
    bar = LineProgress(100, "extract flux", "img", stream=out, every_s=1e9, clock=clock)
    for _ in range(100):
        clock.now += 0.5
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10  # at 10 %, 20 %, ... 90 %, and the final line
    assert lines[0] == "extract flux: 10/100 (10%) 2.00 img/s, ETA 00:45"
    assert lines[-1] == "extract flux: 100/100 (100%) 2.00 img/s, 00:50 elapsed"


def test_log_lines_every_thirty_seconds_on_slow_runs():
    clock, out = _Clock(), io.StringIO()
    bar = LineProgress(10_000, "match", "pair", stream=out, clock=clock)
    for _ in range(5):
        clock.now += 31.0
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 5
    assert out.getvalue().splitlines()[0].startswith("match: 1/10000 (0%) 0.03 pair/s, ETA 86:")


def test_terminal_gets_a_bar_log_gets_lines_disabled_gets_nothing():
    from tqdm import tqdm

    terminal = progress(5, "x", stream=_Terminal())
    assert isinstance(terminal, tqdm)
    terminal.close()
    assert isinstance(progress(5, "x", stream=io.StringIO()), LineProgress)
    out = io.StringIO()
    silent = progress(5, "x", enabled=False, stream=out)
    silent.update(5)
    silent.set_postfix(loss=1)
    silent.close()
    assert out.getvalue() == ""


# ---- through the CLI -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_args(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("progress")
    root = make_demo("spair", tmp / "data")
    return ["--model", "tiny-dinov2", "--dataset", "spair", "--data-root", str(root), "--store", str(tmp / "s.zarr")]


def test_cli_in_a_log_prints_lines_not_bars_and_quiet_prints_none(run_args):
    result = CliRunner().invoke(app, ["extract", *run_args, "--img-size", "64", "--ensemble-size", "1"])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    assert "extract tiny-dinov2: 6/6 (100%)" in result.output and "img/s" in result.output
    quiet = CliRunner().invoke(app, ["match", *run_args, "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert "pair/s" not in quiet.output and "match: 6 pair(s) matched" in quiet.output


def test_score_per_pair_csv_and_formats_carry_the_context(run_args, tmp_path):
    CliRunner().invoke(app, ["match", *run_args, "--quiet"])
    rows_path = tmp_path / "pairs.csv"
    result = CliRunner().invoke(app, ["score", *run_args, "--format", "json", "--per-pair", str(rows_path)])
    assert result.exit_code == 0, result.output
    [summary] = json.loads(result.output[: result.output.rindex("]") + 1])
    for key in ("dataset", "split", "model", "k", "t", "variant", "protocol", "alphas", "threshold_rule", "store",
                "features"):
        assert key in summary, key
    assert summary["split"] == "test" and summary["unit"] == "percent" and summary["features"]["img_size"] == 64
    with rows_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == summary["n_pairs"] == 6
    assert {"pair_id", "category", "model", "variant", "n_points", "correct@0.1", "pck@0.1"} <= set(rows[0])
    points = sum(int(r["n_points"]) for r in rows)
    per_point = 100.0 * sum(int(r["correct@0.1"]) for r in rows) / points
    assert per_point == pytest.approx(summary["pck"]["0.1"]["per_point"]["all"])
    for fmt, marker in (("csv", "dataset,split,model,k,t,variant,protocol"), ("markdown", "*dataset=spair; split=test")):
        text = CliRunner().invoke(app, ["score", *run_args, "--format", fmt]).output
        assert text.startswith(marker), text


def test_per_pair_refuses_unknown_endings_and_parquet_without_pyarrow(run_args, tmp_path, monkeypatch):
    import sys

    bad = CliRunner().invoke(app, ["score", *run_args, "--per-pair", str(tmp_path / "rows.xlsx")])
    assert bad.exit_code == 1 and bad.output.strip() == f"error: --per-pair {tmp_path / 'rows.xlsx'}: write a .csv or .parquet file"
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    parquet = CliRunner().invoke(app, ["score", *run_args, "--per-pair", str(tmp_path / "rows.parquet")])
    assert parquet.exit_code == 1 and "Parquet needs pyarrow" in parquet.output
    assert len(parquet.output.strip().splitlines()) == 1 and not (tmp_path / "rows.parquet").exists()


def test_write_rows_csv_and_parquet(tmp_path):
    from ditf_pipeline.score.report import write_rows

    rows = [{"pair_id": "a", "pck@0.1": 2.625, "n_points": 800}, {"pair_id": "b", "pck@0.1": None, "n_points": 0}]
    write_rows(rows, tmp_path / "rows.csv")
    assert (tmp_path / "rows.csv").read_text().splitlines() == ["pair_id,pck@0.1,n_points", "a,2.625,800", "b,,0"]
    pq = pytest.importorskip("pyarrow.parquet")
    write_rows(rows, tmp_path / "rows.parquet")
    assert pq.read_table(tmp_path / "rows.parquet").to_pylist() == rows
