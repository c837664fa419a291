import math

import pytest

from aloe.metrics import (al_table, bootstrap_ci, improvement_rate, normalized_improvement_rate,
                          normalized_r2)


def test_linear_curve():
    # AL = 1, 2, 3: slope 1; normalized 0, .5, 1: slope .5, perfect fit
    assert improvement_rate([1, 2, 3]) == pytest.approx(1.0)
    assert normalized_improvement_rate([1, 2, 3]) == pytest.approx(0.5)
    assert normalized_r2([1, 2, 3]) == pytest.approx(1.0)


def test_worked_example():
    # AL = 2, 1, 3 on k = 1, 2, 3: kbar 2, ybar 2, slope = (-1*0 + 0*-1 + 1*1) / 2 = 0.5
    assert improvement_rate([2, 1, 3]) == pytest.approx(0.5)
    # normalized: .5, 0, 1 -> slope .25, intercept 0; fitted .25 .5 .75;
    # SS_res = .0625 + .25 + .0625 = .375; SS_tot = 0 + .25 + .25 = .5 -> R2 = .25
    assert normalized_improvement_rate([2, 1, 3]) == pytest.approx(0.25)
    assert normalized_r2([2, 1, 3]) == pytest.approx(0.25)


def test_decreasing_and_scale_invariance():
    assert improvement_rate([4.0, 3.5, 3.0, 2.5]) == pytest.approx(-0.5)
    # min-max normalization removes scale and offset
    assert normalized_improvement_rate([10, 20, 40]) == pytest.approx(normalized_improvement_rate([1, 2, 4]))


def test_constant_curve():
    assert improvement_rate([3, 3, 3]) == 0.0
    assert normalized_improvement_rate([3, 3, 3]) == 0.0
    assert normalized_r2([3, 3, 3]) == 0.0


def test_bad_input():
    with pytest.raises(ValueError):
        improvement_rate([3.0])
    with pytest.raises(ValueError):
        improvement_rate([1.0, math.nan])


def test_bootstrap_and_al_table():
    lo, hi = bootstrap_ci([2.0, 2.0, 2.0])
    assert lo == hi == 2.0
    lo, hi = bootstrap_ci([1.0, 5.0] * 10)
    assert 1.0 < lo < 3.0 < hi < 5.0
    rows = al_table({"a": {1: 2.0, 2: 4.0}, "b": {1: 4.0}, "c": {}}, turns=2)
    assert rows[0]["al"] == 3.0 and rows[0]["n"] == 2
    assert rows[1]["al"] == 4.0 and rows[1]["n"] == 1  # missing judgments excluded and counted
