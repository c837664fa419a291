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
    return make_pairs(
        pool_records(load_seeds("eval_profiles")[:6], "profile", "seed", "eval"),
        pool_records(load_seeds("eval_personalities")[:3], "personality", "seed", "eval"),
        3,
        0,
        "eval",
    )


def _marker(pair):
    return pair["profile"].split()[:6]


def _convs(pairs, score_of):
    """Two turns per persona; each reply quotes a few words of its own persona's profile."""
    convs = []
    for p in pairs:
        turns = []
        for k in (1, 2):
            reply = " ".join(_marker(p)) + f" (turn {k})"
            turns.append(
                {
                    "turn": k,
                    "user": f"hello {k}",
                    "reply": reply,
                    "score": score_of(p, reply),
                    "judge": {"method": "logprobs"},
                }
            )
        convs.append(
            {
                "model": "base",
                "persona_id": p["id"],
                "profile": p["profile"],
                "personality": p["personality"],
                "turns": turns,
            }
        )
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
    return EvaluateConfig(
        experiment="t",
        data_root=str(tmp_path),
        n_personas=18,
        turns=2,
        judge_card=JudgeCardConfig(**{"max_replies": 100, "n_boot": 200, **card}),
    )


@pytest.mark.parametrize(
    "judge_fn,own_score,expected,gap", [(reads_persona, 5.0, 1.0, 4.0), (ignores_persona, 3.0, 0.5, 0.0)]
)
def test_discrimination_on_the_runs_replies_is_information(tmp_path, judge_fn, own_score, expected, gap):
    """(a) on the run's own replies is measured and shown, but no longer decides fit: a card with no
    known answer that counts (the judge is every role here, and no persona has checkable
    preferences) fails whatever (a) says."""
    pairs = _pairs()
    judge = ScriptedBackend("judge", logprobs=judge_fn)
    card = jc.build(_cfg(tmp_path), judge, pairs, {"base": _convs(pairs, lambda p, r: own_score)})
    assert card["persona_discrimination"] == pytest.approx(expected)
    assert card["n_discrimination"] == 36
    # own minus mismatched score: 5 - 1 for the judge that reads the persona, 3 - 3 for the one that does not
    g = card["persona_gap"]
    assert g["mean"] == pytest.approx(gap, abs=1e-6) and g["median"] == pytest.approx(gap, abs=1e-6)
    assert any(r["check"].startswith("(a) run's replies") for r in jc.card_rows(card))
    assert not card["fit"] and card["independent"] is False
    assert "no known-answer check counts (K1 not independent, K2 not measurable)" in card["reasons"]


def test_mismatched_personas_differ_in_profile_and_personality():
    pairs = _pairs()
    other = jc.mismatched(pairs)
    assert set(other) == {p["id"] for p in pairs}
    for p in pairs:
        q = other[p["id"]]
        assert q["profile_id"] != p["profile_id"] and q["personality_id"] != p["personality_id"]


def test_length_bias_fails_the_card(tmp_path):
    """A judge whose score is the reply's length: perfectly length-biased, and refused for it."""
    pairs = _pairs()[:6]
    by_len = ScriptedBackend(
        "judge",
        logprobs=lambda r: {
            c: (
                0.0
                if c == str(min(5, len(r.messages[-1]["content"].split('The reply: "')[1].split()) // 3 + 1))
                else -30.0
            )
            for c in r.candidates
        },
    )
    convs = _convs(pairs, lambda p, r: float(min(5, len(r.split()) // 3 + 1)))
    for i, c in enumerate(convs):
        c["turns"][0]["reply"] += " extra words" * i
        c["turns"][0]["score"] = float(min(5, len(c["turns"][0]["reply"].split()) // 3 + 1))
    card = jc.build(_cfg(tmp_path, max_length_corr=0.3), by_len, pairs, {"base": convs})
    assert card["length_corr"] > 0.9 and any("reply length" in r for r in card["reasons"])


def test_a_position_biased_pair_judge_shows_agreement_zero(tmp_path):
    """A judge that says "1" with probability 0.9 whatever it is shown: the two orders never agree."""
    import aloe.trees

    def position(req):
        if req.candidates == ("1", "2"):
            return {"1": math.log(0.9), "2": math.log(0.1)}
        return {c: -1.6 for c in req.candidates}

    train = make_pairs(
        pool_records(load_seeds("profiles")[:3], "profile", "seed", "train"),
        pool_records(load_seeds("personalities"), "personality", "seed", "train"),
        1,
        0,
        "train",
    )
    write_jsonl(tmp_path / "t" / "personas" / "pairs.jsonl", train)
    aloe.trees.run(
        TreesConfig(experiment="t", data_root=str(tmp_path), n_personas=3, turns=2),
        ScriptedBackend("biased", logprobs=position),
        progress=False,
    )
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
    assert likelihood_score(0.0, 0.1) == 3.0 and likelihood_score(0.1, 0.1) == pytest.approx(1 + 4 / (1 + math.e**-1))


def test_likelihood_judge_refuses_top_k_servers(tmp_path):
    from aloe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"judge: 'likelihood' needs a reply's exact log-likelihood.*'openai'"):
        EvaluateConfig(
            experiment="t",
            score_judge="likelihood",
            roles={"judge": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        )
    # and a backend that only has next-token top-k lists gives a missing judgment, never a number
    top_k = ScriptedBackend("srv", logprobs=lambda r: {c: -1.0 for c in r.candidates})
    top_k._score_orig = top_k._score

    def not_exact(reqs):
        out = top_k._score_orig(reqs)
        for o in out:
            o.exact = False
        return out

    top_k._score = not_exact
    (j,) = likelihood_ratios(
        top_k, [([{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}], "x y")], "t@v1"
    )
    assert j.llr is None and "top-k" in j.error


def test_a_writer_on_another_engine_of_the_judge_s_model_is_not_independent():
    """K1's replies must not come from the judge's own model. The policy on vLLM and the judge on
    transformers of one checkpoint differ in engine and dtype, not in weights: before, K1 took the
    policy as an independent writer and counted (found by parameters/ci-vllm.yaml)."""
    from aloe.judge_card import k1_writer

    class Engine:
        def __init__(self, kind, model, revision="r1", dtype="float32"):
            self._id = {"kind": kind, "model": model, "revision": revision, "dtype": dtype}

        def identity(self):
            return dict(self._id)

    judge = Engine("transformers", "smollm2-135m")
    same = {"judge": judge, "responder": judge, "simulator": judge, "policy": Engine("vllm", "smollm2-135m")}
    engine, role, independent = k1_writer(None, same)
    assert not independent and role == "responder"
    other = {**same, "policy": Engine("vllm", "smollm2-135m", revision="r2")}  # trained weights
    assert k1_writer(None, other)[1:] == ("policy", True)
    int8 = {**same, "simulator": Engine("transformers", "smollm2-135m", dtype="int8"), "policy": judge}
    assert k1_writer(None, int8)[2] is False
