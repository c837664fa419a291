import math

import pytest

from aloe.backends.base import CandidateLogprobs, match_candidates
from aloe.judging import expected_score, pair_verdict, parse_score


def lp(d, **kw):
    return CandidateLogprobs({k: (math.log(v) if v is not None else None) for k, v in d.items()}, **kw)


def test_expected_score_from_logprobs():
    assert expected_score(lp({"1": 0.0 + 1e-12, "2": 1e-12, "3": 1e-12, "4": 1.0, "5": 1e-12})) == pytest.approx(4.0)
    # renormalized over the candidates: .2*1 + .2*2 + .2*3 + .2*4 + .2*5 = 3
    assert expected_score(lp({c: 0.05 for c in "12345"})) == pytest.approx(3.0)
    # only some seen (HTTP top-k): renormalize over those: (.3*4 + .1*5)/.4 = 4.25
    assert expected_score(lp({"1": None, "2": None, "3": None, "4": 0.3, "5": 0.1}, exact=False)) == pytest.approx(4.25)


def test_unusable_judgment_is_missing():
    assert expected_score(lp({c: None for c in "12345"})) is None
    assert expected_score(CandidateLogprobs({c: None for c in "12345"}, error="HTTP 500")) is None


@pytest.mark.parametrize(
    "text,want",
    [
        ("4", 4),
        (" 5.", 5),
        ("Score: 3", 3),
        ("**2**", 2),
        ("4/5", 4),
        ("rating = 1", 1),
        ("", None),
        (None, None),
        ("6", None),
        ("I'd say 4 or 5", None),
        ("45", None),
        ("four", None),
        ("The reply is good. 4", None),
    ],
)
def test_parse_score_strict(text, want):
    assert parse_score(text) == want


def test_pair_verdict_consistent_and_not():
    # A shown first: P(1)=.8 ; A shown second: P(2)=.7 -> both prefer A
    v = pair_verdict(lp({"1": 0.8, "2": 0.2}), lp({"1": 0.3, "2": 0.7}))
    assert v.preferred == "a" and v.consistent is True and v.p_a == pytest.approx(0.75)
    # position bias: the judge always says "1" -> orders disagree
    v = pair_verdict(lp({"1": 0.9, "2": 0.1}), lp({"1": 0.9, "2": 0.1}))
    assert v.consistent is False and v.p_a == pytest.approx(0.5)
    # one order unusable -> no verdict at all
    v = pair_verdict(lp({"1": 0.9, "2": None}, exact=False), lp({"1": 0.1, "2": 0.9}))
    assert v.preferred is None and v.consistent is None


def test_match_candidates_topk():
    top = {" 4": math.log(0.5), "4": math.log(0.1), "3": math.log(0.2), "The": math.log(0.1), "fir": math.log(0.05)}
    m = match_candidates(top, ["1", "2", "3", "4", "5"])
    assert m["4"] == pytest.approx(math.log(0.6)) and m["3"] == pytest.approx(math.log(0.2))
    assert m["1"] is None and m["5"] is None
    m = match_candidates(top, ["first", "second"])
    assert m["first"] == pytest.approx(math.log(0.05)) and m["second"] is None


def test_a_judgment_says_which_candidates_the_engine_did_not_report():
    from aloe.backends import ProbRequest
    from aloe.backends.scripted import ScriptedBackend
    from aloe.judging import ask, parse_score_choice

    be = ScriptedBackend(logprobs=lambda r: {"1": None, "2": None, "3": None, "4": -0.2, "5": -1.8})
    got = ask(be, [ProbRequest([{"role": "user", "content": "rate"}], tuple("12345"))], parse_score_choice)[0]
    assert got.method == "logprobs" and got.missing == ["1", "2", "3"]
    assert got.to_json()["missing"] == ["1", "2", "3"]
    full = ScriptedBackend(logprobs=lambda r: {c: -1.0 for c in "12345"})
    assert (
        "missing"
        not in ask(full, [ProbRequest([{"role": "user", "content": "x"}], tuple("12345"))], parse_score_choice)[
            0
        ].to_json()
    )
