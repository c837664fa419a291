"""`aloe estimate`: calls, tokens, cost and time before a run, with no key and no network."""

import json

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


def test_the_stand_in_stages_progress_stays_off_the_console(tmp_path, caplog):
    import logging

    exp, _ = _exp(tmp_path)
    with caplog.at_level(logging.INFO):
        logging.getLogger("aloe.trees").info("before: shown")
        measure(exp, sample=2)
        logging.getLogger("aloe.trees").info("after: shown")
    said = [r.getMessage() for r in caplog.records]
    # the sample's "cost so far" on scripted engines is not the run's: a reader would take it for one
    assert not [m for m in said if "cost so far" in m or "schedule" in m], said
    assert "before: shown" in said and "after: shown" in said  # the levels are put back


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


def _manifest(folder, stage, usage):
    (folder / stage).mkdir(parents=True, exist_ok=True)
    (folder / stage / "manifest.json").write_text(json.dumps({"stage": stage, "usage": usage}))


def test_an_engine_records_its_replies_lengths_per_prompt_version(tmp_path):
    from aloe.backends.base import ChatRequest, Sampling
    from aloe.cache import CallCache
    from aloe.config import BackendConfig
    from aloe.estimate import SizingBackend

    cfg = BackendConfig(kind="openai", model="gpt-x", base_url="http://127.0.0.1:9/v1")
    eng = SizingBackend(cfg, cache=CallCache(tmp_path / "calls.sqlite"), replies={("gpt-x", "simulate@v2"): 7.4})
    ask = [
        ChatRequest(({"role": "user", "content": f"q{i}"},), Sampling(max_tokens=cap), prompt_version=v)
        for i, (v, cap) in enumerate([("simulate@v2", 30), ("simulate@v2", 5), ("respond@v1", 20)])
    ]
    eng.chat(ask)
    eng.chat(ask[:1])  # from the cache: not a reply generated
    # the run's mean length where it knows the prompt (never above this request's cap), else the cap
    assert eng.usage()["replies"] == {
        "respond@v1": {"calls": 1, "completion_tokens": 20},
        "simulate@v2": {"calls": 2, "completion_tokens": 7 + 5},
    }
    assert eng.sized == [2, 1]


def test_replies_from_a_finished_run_size_the_estimate(tmp_path, caplog):
    from aloe.errors import ConfigError
    from aloe.estimate import reply_lengths
    from aloe.prompts import get

    exp, _ = _exp(tmp_path)
    at_cap = {(r["stage"], r["role"]): r for r in measure(exp, sample=4)}
    run = tmp_path / "pilot"
    tag = {n: get(n).tag for n in ("user_simulator", "infer_extract", "responder_plain", "responder_hinted")}
    replies = {tag[n]: {"calls": 4, "completion_tokens": 4 * 5} for n in ("user_simulator", "infer_extract")}
    replies[tag["responder_plain"]] = {"calls": 2, "completion_tokens": 2 * 5}
    replies[tag["responder_hinted"]] = {"calls": 2, "completion_tokens": 6}
    _manifest(run, "trees", [{"roles": ["simulator"], "model": "gpt-x", "kind": "openai", "replies": replies}])
    _manifest(run, "personas", [{"roles": ["generator"], "model": "gpt-x", "kind": "openai"}])  # an older run's
    lengths = reply_lengths(run)
    assert "fewer than 30 replies: infer_extract@v1 of gpt-x (4)" in caplog.text  # a pilot's noise is said
    assert lengths[("gpt-x", tag["responder_plain"])] == 5 and lengths[("gpt-x", tag["responder_hinted"])] == 3
    sized = {(r["stage"], r["role"]): r for r in measure(exp, sample=4, replies=lengths)}
    key = ("trees", "simulator, inferrer, responder")
    teacher, before = sized[key], at_cap[key]
    assert teacher["calls"] == before["calls"] and teacher["sized_at_cap"] == 0
    # 4 trees x 2 turns: a user message, an inference and two replies each, at 5, 5, 5 and 3 tokens
    assert teacher["completion_tokens"] == 4 * 2 * (5 + 5 + 5 + 3)
    assert teacher["prompt_tokens"] < before["prompt_tokens"]  # shorter replies, shorter history
    with pytest.raises(ConfigError, match=r"--replies-from .*empty.*usage\[\]\.replies"):
        reply_lengths(tmp_path / "empty")


def test_estimate_command_takes_a_pilot_s_folder(tmp_path, capsys):
    from aloe.cli import main

    _, p = _exp(tmp_path)
    assert main(["estimate", str(p), "--sample", "2"]) == 0
    # at the cap, the table says how to size replies closer: the pilot that gives each trees prompt 30
    # replies, one a turn (2 turns here)
    assert "a pilot, this file with 15 personas in trees and evaluation" in capsys.readouterr().out
    run = tmp_path / "pilot"
    _manifest(run, "trees", [{"model": "gpt-x", "replies": {"respond@v2": {"calls": 1, "completion_tokens": 3}}}])
    assert main(["estimate", str(p), "--sample", "2", "--replies-from", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"Replies at the mean length {run}'s run recorded" in out
    assert main(["estimate", str(p), "--replies-from", str(tmp_path / "nothing")]) == 2
    assert "no stage manifest there records" in capsys.readouterr().err


def test_each_model_under_test_answers_in_its_own_words(tmp_path):
    """A trained variant that replied exactly as base would make the simulator's later turns cache
    hits: the estimate then counted too few calls (as it did until the sizing replies named the model)."""
    exp, _ = _exp(tmp_path)
    rows = {(r["stage"], r["role"]): r for r in measure(exp, sample=4)}
    # 4 personas x 2 turns: the first user message is the same for both models, the second is not
    assert rows["evaluate", "simulator"]["calls"] == 4 * (1 + 2)
