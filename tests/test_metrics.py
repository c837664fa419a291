import math

import pytest

from aloe.metrics import al_table, bootstrap_ci, improvement_rate, normalized_improvement_rate, normalized_r2


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


def test_vectorized_curve_stats_equal_the_scalar_formulas():
    import numpy as np

    from aloe.metrics import curve_stats

    rng = np.random.default_rng(0)
    curves = rng.uniform(1, 5, size=(50, 4))
    curves[0] = [3, 3, 3, 3]  # flat: N-IR and N-R² are 0, as the scalar functions say
    s = curve_stats(curves)
    for i, c in enumerate(curves):
        assert s["avg"][i] == pytest.approx(c.mean())
        assert s["ir"][i] == pytest.approx(improvement_rate(c))
        assert s["n_ir"][i] == pytest.approx(normalized_improvement_rate(c))
        assert s["n_r2"][i] == pytest.approx(normalized_r2(c))
    assert all(math.isnan(v[0]) for v in curve_stats([[1.0, math.nan, 2.0]]).values())


def _model(seed, n=30, turns=3, shift=0.0):
    import random

    rng = random.Random(seed)
    return {f"p{i}": {k: rng.uniform(1, 5) + shift for k in range(1, turns + 1)} for i in range(n)}


def test_paired_difference_of_identical_models_is_centred_on_zero():
    from aloe.metrics import paired_difference

    a = _model(1)
    d = paired_difference(a, a, 3, n_boot=500)
    assert d["avg_diff"] == 0.0 and d["avg_diff_ci_low"] == d["avg_diff_ci_high"] == 0.0
    # two models with the same score distribution but independent draws: centred near 0, CI covers it
    d = paired_difference(a, _model(2), 3, n_boot=500)
    assert d["avg_diff_ci_low"] < 0 < d["avg_diff_ci_high"] and d["ir_diff_ci_low"] < 0 < d["ir_diff_ci_high"]
    assert [t["n"] for t in d["per_turn"]] == [30, 30, 30]


def test_paired_difference_sees_a_shift_the_unpaired_bands_would_miss():
    from aloe.metrics import paired_difference

    a = _model(3)
    b = {p: {k: v + 0.1 for k, v in s.items()} for p, s in a.items()}  # every persona 0.1 higher
    d = paired_difference(b, a, 3, n_boot=500)
    assert d["avg_diff"] == pytest.approx(0.1) and d["avg_diff_ci_low"] == pytest.approx(0.1)
    assert all(t["diff"] == pytest.approx(0.1) for t in d["per_turn"])
    assert d["ir_diff"] == pytest.approx(0.0, abs=1e-12)
    # personas only one model has are left out and counted
    d = paired_difference({**b, "extra": {1: 5.0}}, a, 3, n_boot=100)
    assert d["n_personas"] == 30 and d["unpaired"] == 1


def test_summarize_has_intervals_for_every_summary():
    from aloe.metrics import summarize

    s = summarize(_model(4), 3, n_boot=300)
    for stat in ("avg", "ir", "n_ir", "n_r2"):
        lo, hi = s[f"{stat}_ci_low"], s[f"{stat}_ci_high"]
        assert lo <= hi
    assert s["avg_ci_low"] <= s["avg"] <= s["avg_ci_high"]
