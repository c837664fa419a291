"""ALOE evaluation: benchmark personas, scoring, missing judgments, the protocol on the real model."""

import csv
import json
from pathlib import Path

import pytest
from conftest import REPO
from test_trees import Scripted

from aloe.config import EvaluateConfig, JudgeCardConfig
from aloe.errors import AloeError, ConfigError
from aloe.io import read_json, read_jsonl, write_jsonl
from aloe.judging import ask, parse_score_choice
from aloe.metrics import summarize

OFFICIAL = REPO.parent / "shared" / "aloe-official"


def _eval_pairs(root: Path):
    from aloe.records import load_seeds, make_pairs, pool_records

    profiles = pool_records(load_seeds("eval_profiles"), "profile", "seed", "eval")
    personalities = pool_records(load_seeds("eval_personalities"), "personality", "seed", "eval")
    write_jsonl(root / "personas" / "pairs.jsonl", make_pairs(profiles, personalities, 5, 0, "eval"))


def test_benchmark_pairs_spread_over_profiles_and_personalities(tmp_path):
    from aloe.evaluation import benchmark_pairs

    _eval_pairs(tmp_path / "t")
    all_100 = benchmark_pairs(EvaluateConfig(experiment="t", data_root=str(tmp_path), n_personas=100))
    assert len(all_100) == len({p["id"] for p in all_100}) == 100
    first = benchmark_pairs(EvaluateConfig(experiment="t", data_root=str(tmp_path), n_personas=10))
    assert len({p["profile_id"] for p in first}) == 10 and len({p["personality_id"] for p in first}) == 5
    with pytest.raises(ConfigError, match="n_personas: 101 is out of range; allowed 1 to 100"):
        EvaluateConfig(experiment="t", data_root=str(tmp_path), n_personas=101)
    write_jsonl(tmp_path / "t" / "personas" / "pairs.jsonl", all_100[:30])  # a smaller benchmark file
    with pytest.raises(AloeError, match="31 asked, but there are 30"):
        benchmark_pairs(EvaluateConfig(experiment="t", data_root=str(tmp_path), n_personas=31))


@pytest.mark.skipif(not OFFICIAL.exists(), reason=f"official ALOE files not present at {OFFICIAL}")
def test_official_eval_files_give_100_personas(tmp_path):
    from aloe.evaluation import benchmark_pairs

    pairs = benchmark_pairs(
        EvaluateConfig(experiment="t", data_root=str(tmp_path), n_personas=100, official_dir=str(OFFICIAL))
    )
    assert len(pairs) == 100
    assert len({p["profile"] for p in pairs}) == 20 and len({p["personality"] for p in pairs}) == 5


def test_score_judge_from_messy_text_with_retries():
    from aloe.backends import ProbRequest

    reqs = [ProbRequest([{"role": "user", "content": f"rate {i}"}], tuple("12345")) for i in range(3)]
    # request 0: "Score: 4" at once; 1: prose, then "**2**"; 2: garbage every time
    be = Scripted(
        ["Score: 4", "I'd say it's pretty good, maybe 4 or 5?", "nope", "**2**", "<|im_end|>", "5 stars!!! 10/10"]
    )
    got = ask(be, reqs, parse_score_choice, retries=2)
    assert got[0].method == "text" and got[0].probs["4"] == 1.0 and got[0].raw == ["Score: 4"]
    assert got[1].method == "text" and got[1].probs["2"] == 1.0 and len(got[1].raw) == 2
    assert got[2].method == "none" and got[2].probs is None and len(got[2].raw) == 3


def test_missing_judgments_are_excluded_and_counted():
    scores = {"p1": {1: 2.0, 2: 3.0, 3: 4.0}, "p2": {1: 4.0, 2: None, 3: 2.0}, "p3": {1: None, 2: 5.0, 3: 3.0}}
    s = summarize(scores, 3, n_boot=200)
    assert [r["n"] for r in s["al"]] == [2, 2, 3]
    assert [r["al"] for r in s["al"]] == [3.0, 4.0, 3.0]  # never counted as 1, never as 0
    assert s["missing"] == 2 and s["avg"] == pytest.approx(10 / 3)
    assert s["ir"] == pytest.approx(0.0) and s["ir_ci_low"] <= 0 <= s["ir_ci_high"]
    # a turn with no usable judgment at all: AL is NaN with n = 0 and IR is undefined, not made up
    s = summarize({"p1": {1: 3.0, 2: None}}, 2, n_boot=50)
    assert s["al"][1]["n"] == 0 and s["ir"] is None


@pytest.mark.integration
def test_protocol_on_the_embedded_model(tmp_path, smollm):
    import aloe.evaluation

    _eval_pairs(tmp_path / "t")
    # the judge card at its smallest (its full size is e2e's): this test is the protocol's
    card = JudgeCardConfig(max_replies=4, k1_messages=1, max_k2_pairs=4, n_boot=50)
    cfg = EvaluateConfig(
        experiment="t",
        data_root=str(tmp_path),
        n_personas=2,
        turns=2,
        max_new_tokens=16,
        models=("base", "oracle", "reminder"),
        n_boot=100,
        score_judge="history",
        judge_card=card,
    )
    seen = []
    real = smollm.chat

    def spy(reqs):
        seen.extend(reqs)
        return real(reqs)

    smollm.chat = spy
    try:
        metrics = aloe.evaluation.run(cfg, smollm, progress=False)
    finally:
        del smollm.chat
    pairs = read_jsonl(tmp_path / "t" / "personas" / "pairs.jsonl")
    profiles = {p["profile"] for p in pairs}
    # the model under test never sees the persona, except the oracle
    for r in seen:
        system = r.messages[0]["content"]
        if r.prompt_version.startswith("responder_"):
            leaked = any(p in system for p in profiles)
            assert leaked == r.prompt_version.startswith("responder_oracle"), r.prompt_version
    assert set(metrics["models"]) == {"base", "oracle", "reminder"}
    for m in metrics["models"].values():
        assert [r["turn"] for r in m["al"]] == [1, 2]
        for r in m["al"]:
            assert r["n"] + 0 <= 2 and (r["n"] == 0 or 1 <= r["al"] <= 5)
    out = tmp_path / "t" / "evaluate"
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 3 * 2 * 2 and {r["model"] for r in rows} == {"base", "oracle", "reminder"}
    assert {"model", "persona", "turn", "score", "judge_raw"} <= set(rows[0])
    conv = read_jsonl(out / "transcripts.jsonl")
    assert len(conv) == 6 and all(len(c["turns"]) == 2 for c in conv)
    assert json.loads((out / "metrics.json").read_text())["judge"] == "history"
    assert read_json(out / "manifest.json")["counts"]["judgments"] == 12


@pytest.mark.integration
def test_evaluation_resumes_after_a_crash(tmp_path, smollm):
    import aloe.evaluation
    from aloe.cache import CallCache

    _eval_pairs(tmp_path / "t")
    cfg = EvaluateConfig(
        experiment="t",
        data_root=str(tmp_path),
        n_personas=2,
        turns=2,
        max_new_tokens=12,
        models=("base",),
        n_boot=50,
        judge_card=JudgeCardConfig(enabled=False),
    )
    smollm.cache = CallCache(str(tmp_path / "cache.sqlite"))
    real, calls = smollm.logprobs, {"n": 0}

    def crash_in_turn_2(reqs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(reqs)

    smollm.logprobs = crash_in_turn_2
    try:
        with pytest.raises(KeyboardInterrupt):
            aloe.evaluation.run(cfg, smollm, progress=False)
    finally:
        del smollm.logprobs
    saved = read_jsonl(tmp_path / "t" / "evaluate" / "conversations" / "base.jsonl")
    assert [len(c["turns"]) for c in saved] == [1, 1]
    hits, misses = smollm.cache.hits, smollm.cache.misses
    metrics = aloe.evaluation.run(cfg, smollm, progress=False)
    assert [r["n"] for r in metrics["models"]["base"]["al"]] == [2, 2]
    # turn 1 came from the checkpoint, not from the backend: only turn 2's user messages and
    # replies (cached before the crash) are looked up, and only its judgments are new
    assert (smollm.cache.hits - hits, smollm.cache.misses - misses) == (4, 2)
    smollm.cache = CallCache(None)


def test_repeats_over_simulator_seeds_are_pooled_per_persona(tmp_path):
    import aloe.evaluation
    from aloe.backends.scripted import ScriptedBackend
    from aloe.config import stage_config
    from aloe.evaluation import pooled_scores

    # pooling: the mean of the repeats that scored a turn; the persona stays one unit
    reps = [
        [{"persona_id": "p", "turns": [{"turn": 1, "score": 2.0}, {"turn": 2, "score": None}]}],
        [{"persona_id": "p", "turns": [{"turn": 1, "score": 4.0}, {"turn": 2, "score": 3.0}]}],
    ]
    assert pooled_scores(reps) == {"p": {1: 3.0, 2: 3.0}}
    _eval_pairs(tmp_path / "r")
    cfg = stage_config(
        "evaluate",
        experiment="r",
        data_root=str(tmp_path),
        cache_path=str(tmp_path / "c.sqlite"),
        backend={"kind": "scripted", "model": "s"},
        n_personas=3,
        turns=2,
        models=["base"],
        score_judge="likelihood",
        repeats=2,
        n_boot=50,
        judge_card={"enabled": False},
    )
    out = aloe.evaluation.run(cfg, ScriptedBackend())
    first = read_jsonl(cfg.paths.conversations("base"))
    second = read_jsonl(cfg.paths.conversations("base", 1))
    assert [c["persona_id"] for c in first] == [c["persona_id"] for c in second]
    assert [c["turns"][0]["user"] for c in first] != [c["turns"][0]["user"] for c in second]  # other seeds
    assert {c["settings"]["seed"] for c in second} == {1}
    m = read_json(cfg.paths.eval_metrics)
    assert m["repeats"] == 2 and [r["n"] for r in m["models"]["base"]["al"]] == [3, 3]
    counts = read_json(cfg.paths.manifest("evaluate"))["counts"]
    assert out["repeats"] == 2 and counts["conversation_turns"] == 2 * 3 * 2
