"""The judge card and the likelihood-ratio judge, on judges whose answers are known:
one that reads the persona, one that ignores it, one that answers by position; and the
likelihood ratio against a hand computation on a tiny model."""

import math

import pytest

import aloe.judge_card as jc
from aloe.backends.scripted import ScriptedBackend
from aloe.config import EvaluateConfig, JudgeCardConfig, TreesConfig
from aloe.io import write_jsonl
from aloe.judging import likelihood_ratios, likelihood_score
from aloe.records import load_seeds, make_pairs, pool_records


def _pairs():
    return make_pairs(pool_records(load_seeds("eval_profiles")[:6], "profile", "seed", "eval"),
                      pool_records(load_seeds("eval_personalities")[:3], "personality", "seed", "eval"), 3, 0, "eval")


def _marker(pair):
    return pair["profile"].split()[:6]


def _convs(pairs, score_of):
    """Two turns per persona; each reply quotes a few words of its own persona's profile."""
    convs = []
    for p in pairs:
        turns = []
        for k in (1, 2):
            reply = " ".join(_marker(p)) + f" (turn {k})"
            turns.append({"turn": k, "user": f"hello {k}", "reply": reply, "score": score_of(p, reply),
                          "judge": {"method": "logprobs"}})
        convs.append({"model": "base", "persona_id": p["id"], "profile": p["profile"],
                      "personality": p["personality"], "turns": turns})
    return convs


def reads_persona(req):
    """Rubric judge that gives 5 when the reply quotes the profile in its prompt, else 1."""
    prompt = req.messages[-1]["content"]
    profile = prompt.split("The user's profile:")[1].split("\n")[0]
    reply = prompt.split('The reply: "')[1]
    match = " ".join(profile.split()[:6]) in reply
    return {c: (0.0 if c == ("5" if match else "1") else -30.0) for c in req.candidates}


def ignores_persona(req):
    return {c: -1.6 for c in req.candidates}  # uniform: every reply scores 3 against anyone


def _cfg(tmp_path, **card):
    return EvaluateConfig(experiment="t", data_root=str(tmp_path), n_personas=18, turns=2,
                          judge_card=JudgeCardConfig(**{"max_replies": 100, "n_boot": 200, **card}))


@pytest.mark.parametrize("judge_fn,own_score,expected,gap", [(reads_persona, 5.0, 1.0, 4.0),
                                                            (ignores_persona, 3.0, 0.5, 0.0)])
def test_discrimination_of_known_judges(tmp_path, judge_fn, own_score, expected, gap):
    pairs = _pairs()
    judge = ScriptedBackend("judge", logprobs=judge_fn)
    card = jc.build(_cfg(tmp_path), judge, pairs, {"base": _convs(pairs, lambda p, r: own_score)}, None)
    assert card["persona_discrimination"] == pytest.approx(expected)
    assert card["n_discrimination"] == 36
    # own minus mismatched score: 5 - 1 for the judge that reads the persona, 3 - 3 for the one that does not
    g = card["persona_gap"]
    assert g["mean"] == pytest.approx(gap, abs=1e-6) and g["median"] == pytest.approx(gap, abs=1e-6)
    assert g["ci_low"] == pytest.approx(gap, abs=1e-6) and g["ci_high"] == pytest.approx(gap, abs=1e-6)
    assert any(r["check"].startswith("(a') own minus mismatched") for r in jc.card_rows(card))
    if expected == 1.0:
        assert card["fit"] and card["persona_discrimination_ci_low"] == 1.0
    else:
        assert not card["fit"] and "persona discrimination (own persona scores above a mismatched one) is 0.50" in card["reasons"][0]
    assert card["tailored"]["value"] is None and "base is not among" in card["tailored"]["why"]


def test_a_win_rate_on_gaps_that_do_not_hold_up_is_not_fit(tmp_path):
    """14 of 18 personas' replies score a hundredth of a point above the mismatched persona, 4 score
    two points below: the win rate (0.78) clears the bar, the mean gap (-0.44) does not."""
    pairs = _pairs()
    losers = {p["id"] for p in pairs[:4]}
    judge = ScriptedBackend("judge", logprobs=ignores_persona)  # every mismatched score is 3
    card = jc.build(_cfg(tmp_path), judge, pairs,
                    {"base": _convs(pairs, lambda p, r: 1.0 if p["id"] in losers else 3.01)}, None)
    assert card["persona_discrimination"] == pytest.approx(14 / 18)
    assert card["persona_discrimination_ci_low"] > 0.5
    assert card["persona_gap"]["mean"] == pytest.approx((14 * 0.01 - 4 * 2.0) / 18, abs=1e-4)
    assert card["persona_gap"]["median"] == pytest.approx(0.01, abs=1e-4)
    assert not card["fit"] and len(card["reasons"]) == 1
    assert card["reasons"][0].startswith("the persona moves the score by -0.437 points on average")


def test_mismatched_personas_differ_in_profile_and_personality():
    pairs = _pairs()
    other = jc.mismatched(pairs)
    assert set(other) == {p["id"] for p in pairs}
    for p in pairs:
        q = other[p["id"]]
        assert q["profile_id"] != p["profile_id"] and q["personality_id"] != p["personality_id"]


def test_tailored_probe_and_length_bias(tmp_path):
    pairs = _pairs()[:6]
    # the policy, told the persona, quotes it; the judge reads the persona: tailored wins every time
    policy = ScriptedBackend("policy", texts=lambda r: " ".join(r.messages[0]["content"].split("is:")[1].split()[:6]))
    judge = ScriptedBackend("judge", logprobs=reads_persona)
    base = _convs(pairs, lambda p, r: 1.0)
    for c in base:
        for t in c["turns"]:
            t["reply"] = "Plain words that fit nobody in particular at all."
    cfg = _cfg(tmp_path)
    probe = jc.tailored_probe(cfg, policy, judge, pairs, base)
    assert len(probe) == 12 and all(r["tailored_score"] == pytest.approx(5.0) for r in probe)
    card = jc.build(cfg, judge, pairs, {"base": base}, probe)
    assert card["tailored"]["value"] == 1.0 and card["tailored"]["ci_low"] == 1.0
    # a judge whose score is the reply's length: perfectly length-biased, and refused for it
    by_len = ScriptedBackend("judge", logprobs=lambda r: {c: (0.0 if c == str(min(5, len(
        r.messages[-1]["content"].split('The reply: "')[1].split()) // 3 + 1)) else -30.0) for c in r.candidates})
    convs = _convs(pairs, lambda p, r: float(min(5, len(r.split()) // 3 + 1)))
    for i, c in enumerate(convs):
        c["turns"][0]["reply"] += " extra words" * i
        c["turns"][0]["score"] = float(min(5, len(c["turns"][0]["reply"].split()) // 3 + 1))
    card = jc.build(_cfg(tmp_path, max_length_corr=0.3), by_len, pairs, {"base": convs}, None)
    assert card["length_corr"] > 0.9 and any("reply length" in r for r in card["reasons"])


def test_a_position_biased_pair_judge_shows_agreement_zero(tmp_path):
    """A judge that says "1" with probability 0.9 whatever it is shown: the two orders never agree."""
    import aloe.trees

    def position(req):
        if req.candidates == ("1", "2"):
            return {"1": math.log(0.9), "2": math.log(0.1)}
        return {c: -1.6 for c in req.candidates}

    train = make_pairs(pool_records(load_seeds("profiles")[:3], "profile", "seed", "train"),
                       pool_records(load_seeds("personalities"), "personality", "seed", "train"), 1, 0, "train")
    write_jsonl(tmp_path / "t" / "personas" / "pairs.jsonl", train)
    aloe.trees.run(TreesConfig(experiment="t", data_root=str(tmp_path), n_personas=3, turns=2),
                   ScriptedBackend("biased", logprobs=position), progress=False)
    pc = jc.position_consistency(_cfg(tmp_path))
    assert pc["value"] == 0.0 and pc["n"] == 6


def test_likelihood_ratio_equals_a_hand_computation(tiny_model):
    """mean over the reply's tokens of log P(token | persona prompt) - log P(token | plain prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aloe.backends.transformers_backend import TransformersBackend
    from aloe.conversation import likelihood_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    be = TransformersBackend(tiny_model, "tiny", "0", None, dtype="float32", model=model, tokenizer=tok)
    reply = "Sounds lovely, swimming in the cold sea every morning!"
    aware, plain, tag = likelihood_prompts("She is 67 and swims daily.", "Warm and chatty.", [], "I went swimming.")
    (got,) = likelihood_ratios(be, [(aware, plain, reply)], tag)

    def by_hand(messages):
        prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
        ids = tok(reply, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].float(), -1)
        return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)), len(ids)

    (a, n), (p, _) = by_hand(aware), by_hand(plain)
    assert got.tokens == n and got.llr == pytest.approx((a - p) / n, abs=1e-4)
    assert got.aware == pytest.approx(a, abs=1e-4) and got.plain == pytest.approx(p, abs=1e-4)
    assert likelihood_score(0.0, 0.1) == 3.0 and likelihood_score(0.1, 0.1) == pytest.approx(1 + 4 / (1 + math.e ** -1))


def test_likelihood_judge_refuses_top_k_servers(tmp_path):
    from aloe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"judge: 'likelihood' needs a reply's exact log-likelihood.*'openai'"):
        EvaluateConfig(experiment="t", judge="likelihood",
                       roles={"judge": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}})
    # and a backend that only has next-token top-k lists gives a missing judgment, never a number
    top_k = ScriptedBackend("srv", logprobs=lambda r: {c: -1.0 for c in r.candidates})
    top_k._score_orig = top_k._score

    def not_exact(reqs):
        out = top_k._score_orig(reqs)
        for o in out:
            o.exact = False
        return out

    top_k._score = not_exact
    (j,) = likelihood_ratios(top_k, [([{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}], "x y")],
                             "t@v1")
    assert j.llr is None and "top-k" in j.error
