"""Prices in the parameter file, and what model calls cost."""

import pytest

from aloe.config import ConfigError, Price, load_experiment
from aloe.cost import fmt_usd, row_cost, with_cost

ROW = {
    "kind": "openai",
    "model": "gpt-x",
    "calls": 3,
    "cached_calls": 2,
    "prompt_tokens": 2_000_000,
    "completion_tokens": 500_000,
    "cached_prompt_tokens": 1_000_000,
    "cached_completion_tokens": 100_000,
}


def test_cost_is_tokens_times_the_list_price_and_the_cache_saving_is_counted_apart():
    prices = {"gpt-x": Price(input=0.15, output=0.60)}
    cost, saved = row_cost(ROW, prices)
    assert cost == pytest.approx(2 * 0.15 + 0.5 * 0.60) and saved == pytest.approx(0.15 + 0.1 * 0.60)
    (row,) = with_cost([ROW], prices)
    assert row["cost_usd"] == 0.6 and row["saved_usd"] == 0.21 and row["calls"] == 3


def test_a_local_engine_costs_nothing_and_an_unpriced_server_is_unknown_not_zero():
    assert row_cost({**ROW, "kind": "transformers"}, {}) == (0.0, 0.0)
    assert row_cost(ROW, {"other": Price(input=1, output=1)}) == (None, None)
    assert fmt_usd(None) == "unknown (no price)" and fmt_usd(0.0) == "$0.00" and fmt_usd(1234.5) == "$1,234.50"


def _params(tmp_path, prices: str):
    p = tmp_path / "p.yaml"
    p.write_text("experiment: x\nbackend: {kind: scripted, model: gpt-x}\nprices:\n" + prices)
    return p


def test_prices_are_validated_with_the_key_named(tmp_path):
    exp = load_experiment(_params(tmp_path, "  gpt-x: {input: 0.15, output: 0.6, read: '2026-11-30'}\n"))
    assert exp.stages["trees"].prices["gpt-x"] == Price(input=0.15, output=0.6, read="2026-11-30")
    with pytest.raises(ConfigError, match=r"prices\.gpt-x\.output.*(range|between|at least)"):
        load_experiment(_params(tmp_path, "  gpt-x: {input: 0.15, output: -1}\n"))
    with pytest.raises(ConfigError, match=r"prices\.gpt-x: unknown key 'inptu' \(did you mean 'input'\?\)"):
        load_experiment(_params(tmp_path, "  gpt-x: {inptu: 0.15, output: 1}\n"))
    with pytest.raises(ConfigError, match=r"prices\.gpt-x: missing required key 'input'"):
        load_experiment(_params(tmp_path, "  gpt-x: {output: 1}\n"))


def test_paper_yaml_prices_its_teacher_models():
    from pathlib import Path

    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "parameters" / "paper.yaml").read_text())
    models = {raw["backend"]["model"], raw["roles"]["generator"]["model"]}
    assert models <= set(raw["prices"]) and all(p["read"] for p in raw["prices"].values())


def test_a_progress_line_says_done_rate_time_left_failures_and_cost():
    import time

    from aloe.cost import progress_line

    line = progress_line("trees", 5, 10, 5, time.time() - 60, 1, [ROW], {"gpt-x": Price(input=0.15, output=0.60)})
    assert line.startswith("trees: 5/10 done, 5.0/min, about 1.0 min left, 1 failed, cost so far $0.60")
    assert progress_line("x", 0, 4, 0, time.time(), 0, [ROW], {}).endswith(
        "unknown left, 0 failed, cost so far unknown (no price)"
    )
