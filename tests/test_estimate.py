"""`aloe estimate`: calls, tokens, cost and time before a run, with no key and no network."""

import pytest
from conftest import REPO

from aloe.config import load_experiment
from aloe.estimate import estimate, measure, priced, table

PARAMS = """experiment: est
data_root: {root}
cache_path: {root}/cache.sqlite
backend: {{kind: openai, base_url: "http://127.0.0.1:9/v1", model: gpt-x, max_concurrency: 4, rpm: 60}}
roles:
  policy: {{kind: scripted, model: student}}
prices:
  gpt-x: {{input: 0.15, output: 0.60, cached_input: 0.05, read: "2026-11-30, test"}}
stages:
  personas: {{target_profiles: 6, target_personalities: 6, pairs_per_profile: 2, preferences: [2, 3]}}
  trees: {{n_personas: {n}, turns: 2, max_new_tokens: 20, pair_judge: rules}}
  evaluate: {{n_personas: {n}, turns: 2, max_new_tokens: 20, models: [base, sft_preferred], score_judge: rules}}
"""


def _exp(tmp_path, n=4):
    p = tmp_path / f"est{n}.yaml"
    p.write_text(PARAMS.format(root=tmp_path / "data", n=n))
    return load_experiment(p), p


def test_estimate_runs_the_stages_code_without_a_server_and_prices_the_served_roles(tmp_path):
    exp, _ = _exp(tmp_path)
    lines = estimate(exp, sample=4, latency_s=2.0)
    by = {(ln.stage, ln.role): ln for ln in lines}
    teacher = by["trees", "simulator, inferrer, responder"]
    # per tree and turn: one user message, one inference, two replies (4 trees x 2 turns)
    assert teacher.calls == 4 * 2 * 4 and teacher.completion_tokens == 4 * 2 * 4 * 20
    assert teacher.cost_usd == pytest.approx((teacher.prompt_tokens * 0.15 + teacher.completion_tokens * 0.6) / 1e6)
    # the provider's cache serves the repeated prefix at the cached price: 0.10 per million less
    assert 0 < teacher.prefix_tokens < teacher.prompt_tokens
    assert teacher.cached_cost_usd == pytest.approx(teacher.cost_usd - teacher.prefix_tokens * 0.10 / 1e6)
    assert teacher.seconds == pytest.approx(max(teacher.calls * 2.0 / 4, teacher.calls / 60 * 60))  # rpm binds
    under_test = [ln for ln in lines if ln.stage == "evaluate" and ln.kind == "scripted"]
    assert under_test and all(ln.cost_usd == 0 and ln.seconds is None for ln in under_test)
    assert not (tmp_path / "data" / "est").exists()  # nothing written where the real run will write
    text = table(lines, 2.0, 1.0)
    assert "total" in text and "$" in text and "characters / 4" in text and "prefix cached" in text


def test_a_sample_is_scaled_to_the_file_s_size(tmp_path):
    small, _ = _exp(tmp_path, 4)
    large, _ = _exp(tmp_path, 8)
    calls = {
        n: sum(r["calls"] for r in measure(e, sample=4) if r["stage"] == "trees") for n, e in ((4, small), (8, large))
    }
    assert calls[8] == pytest.approx(2 * calls[4])


def test_only_a_served_priced_role_makes_a_run_print_its_estimate(tmp_path, capsys):
    from aloe.cli import main

    exp, p = _exp(tmp_path)
    assert priced(exp)
    assert not priced(load_experiment(REPO / "parameters" / "default.yaml"))
    assert main(["estimate", str(p), "--sample", "2"]) == 0  # `aloe estimate` as typed, in this process
    out = capsys.readouterr().out
    assert "trees" in out and "evaluate" in out and "$" in out
    assert main(["estimate", str(p), "--fill", "2"]) == 2
    assert "--fill in (0, 1]" in capsys.readouterr().err
