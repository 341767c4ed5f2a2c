"""PCK aggregations against values computed by hand, the <= / < boundary, speed, no torch."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ditf_pipeline.datasets.base import Pair
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.score.pck import alpha_key, describe_rule, pck, per_pair_rows


def _pair(name, category, errors, base=100.0):
    """A pair whose predictions miss the ground truth by the given (dx, dy) offsets."""
    truth = np.array([[50.0 + 10 * i, 60.0] for i in range(len(errors))])
    pair = Pair(name, category, f"{name}-s", f"{name}-t", truth.copy(), truth, (500, 375), (500, 375), base)
    return pair, truth + np.array(errors, dtype=float)


# errors in pixels (threshold base 100): 10 is exactly alpha * base at alpha 0.1
CASES = [
    _pair("p1", "aeroplane", [(0, 0), (20, 0)]),
    _pair("p2", "aeroplane", [(3, 0), (0, 8), (6, 8)]),  # 3, 8, 10 (the boundary)
    _pair("p5", "aeroplane", [(30, 0)]),
    _pair("p3", "bus", [(0, 6)]),
    _pair("p4", "bus", [(50, 0), (0, 50), (30, 40), (0, 0)]),
]
PAIRS = [c[0] for c in CASES]
PREDICTIONS = [c[1] for c in CASES]


def test_alpha_keys():
    assert [alpha_key(a) for a in (0.01, 0.05, 0.1, 0.15)] == ["0.01", "0.05", "0.1", "0.15"]


def test_dift_rule_by_hand():
    result = pck(PREDICTIONS, PAIRS, alphas=(0.05, 0.1), protocol="dift", dataset="spair", model="m", k=28, t=260, variant="adaln+cd")
    assert list(result) == ["dataset", "model", "k", "t", "variant", "protocol", "n_pairs", "n_points", "threshold_rule", "alphas",
                            "unit", "pck"]
    assert (result["n_pairs"], result["n_points"]) == (5, 11)
    assert result["threshold_rule"].startswith("<=")
    # alpha 0.1, <=: per pair 1/2, 3/3, 0/1 | 1/1, 1/4
    assert _r2(result["pck"]["0.1"]["per_image"]) == {"all": 55.0, "mean": 56.25, "aeroplane": 50.0, "bus": 62.5}
    assert _r2(result["pck"]["0.1"]["per_point"]) == {"all": 54.55, "mean": 53.33, "aeroplane": 66.67, "bus": 40.0}
    # alpha 0.05: per pair 1/2, 1/3, 0/1 | 0/1, 1/4
    assert _r2(result["pck"]["0.05"]["per_image"]) == {"all": 21.67, "mean": 20.14, "aeroplane": 27.78, "bus": 12.5}
    assert _r2(result["pck"]["0.05"]["per_point"]) == {"all": 27.27, "mean": 26.67, "aeroplane": 33.33, "bus": 20.0}
    json.dumps(result)  # plain types only


def _r2(values: dict) -> dict:
    """Rounded for comparison with hand-computed two-decimal figures (the result keeps every digit)."""
    return {key: round(value, 2) for key, value in values.items()}


def test_percent_at_full_precision():
    """21 of 800 keypoints correct is 2.625 %, exactly, in the result (not 2.63 nor 2.62)."""
    truth = np.zeros((800, 2))
    pred = truth.copy()
    pred[21:] = 1000.0
    pair = Pair("p", "cat", "s", "t", truth, truth, (10, 10), (10, 10), 100.0)
    result = pck([pred], [pair], alphas=(0.1,))
    assert result["pck"]["0.1"]["per_point"]["all"] == 2.625
    assert result["pck"]["0.1"]["per_image"]["all"] == 2.625
    assert json.loads(json.dumps(result))["pck"]["0.1"]["per_point"]["all"] == 2.625
    assert result["unit"] == "percent" and result["alphas"] == [0.1]


def test_per_pair_rows_add_up_to_the_aggregates():
    result = pck(PREDICTIONS, PAIRS, alphas=(0.05, 0.1))
    rows = per_pair_rows(PREDICTIONS, PAIRS, alphas=(0.05, 0.1))
    assert [row["pair_id"] for row in rows] == [p.pair_id for p in PAIRS]
    assert sum(row["n_points"] for row in rows) == result["n_points"]
    per_point = 100.0 * sum(row["correct@0.1"] for row in rows) / result["n_points"]
    assert per_point == pytest.approx(result["pck"]["0.1"]["per_point"]["all"])
    per_image = np.mean([row["pck@0.1"] for row in rows])
    assert per_image == pytest.approx(result["pck"]["0.1"]["per_image"]["all"])
    assert {"category", "src", "trg", "threshold_base", "correct@0.05", "pck@0.05"} <= set(rows[0])


def test_geoaware_rule_is_strict_at_the_boundary():
    result = pck(PREDICTIONS, PAIRS, alphas=(0.1,), protocol="geoaware")
    assert result["threshold_rule"].startswith("<:")
    # p2's error of exactly 10 = 0.1 * 100 is now wrong: per pair 1/2, 2/3, 0/1 | 1/1, 1/4
    assert _r2(result["pck"]["0.1"]["per_image"]) == {"all": 48.33, "mean": 50.69, "aeroplane": 38.89, "bus": 62.5}
    assert _r2(result["pck"]["0.1"]["per_point"]) == {"all": 45.45, "mean": 45.0, "aeroplane": 50.0, "bus": 40.0}
    # the rule can be chosen independently of the protocol name
    forced = pck(PREDICTIONS, PAIRS, alphas=(0.1,), protocol="geoaware", rule="<=")
    assert round(forced["pck"]["0.1"]["per_point"]["all"], 2) == 54.55


def test_boundary_with_fractional_threshold():
    """Error 5 against 0.05 * 100 and 0.1 * 50: equal to the threshold, correct only under <=."""
    pair, pred = _pair("b", "cat", [(3, 4)], base=50.0)
    assert pck([pred], [pair], alphas=(0.1,))["pck"]["0.1"]["per_point"]["all"] == 100.0
    assert pck([pred], [pair], alphas=(0.1,), protocol="geoaware")["pck"]["0.1"]["per_point"]["all"] == 0.0


def test_threshold_uses_pair_base():
    pair, pred = _pair("c", "cat", [(0, 9)], base=100.0)
    small, pred_small = _pair("d", "cat", [(0, 9)], base=80.0)
    result = pck([pred, pred_small], [pair, small], alphas=(0.1,))
    assert result["pck"]["0.1"]["per_point"]["all"] == 50.0


def test_bad_inputs_are_clear():
    with pytest.raises(DitfError, match="predictions for"):
        pck(PREDICTIONS[:2], PAIRS)
    with pytest.raises(DitfError, match="shape"):
        pck([PREDICTIONS[0][:1]] + PREDICTIONS[1:], PAIRS)
    with pytest.raises(DitfError, match="protocol"):
        pck(PREDICTIONS, PAIRS, protocol="dino")
    with pytest.raises(DitfError, match="rule"):
        describe_rule("<<")


def test_scoring_spair_sized_workload():
    rng = np.random.default_rng(0)
    categories = [f"c{i}" for i in range(18)]
    pairs, predictions = [], []
    for i in range(12_234):
        n = int(rng.integers(1, 20))
        truth = rng.uniform(0, 500, (n, 2))
        pairs.append(Pair(str(i), categories[i % 18], "s", "t", truth, truth, (500, 375), (500, 375), float(rng.uniform(50, 400))))
        predictions.append(truth + rng.normal(0, 20, (n, 2)))
    result = pck(predictions, pairs)  # its time is measured by benchmarks/bench_inputs.py, not asserted here
    assert result["n_pairs"] == 12_234 and len(result["pck"]["0.1"]["per_image"]) == 20


def test_score_imports_no_torch():
    code = "import sys, ditf_pipeline.score.pck, ditf_pipeline.score.report; bad = [m for m in ('torch', 'zarr', 'ditf_pipeline.models') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
