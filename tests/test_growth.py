import numpy as np
import pytest

from aloe.growth import DiversityFilter, kind_ok, split_items


@pytest.mark.parametrize(
    "reply,want",
    [
        (
            "Here are 3 new profiles:\n1. She is a 30-year-old baker.\n2) He is 41 and drives a bus.\n3: They are 20.\n\nI hope these help!",
            ["She is a 30-year-old baker.", "He is 41 and drives a bus.", "They are 20."],
        ),
        (
            "- She is a nurse.\n* He is a pilot\n  who loves jazz.\n• She is 60.",
            ["She is a nurse.", "He is a pilot who loves jazz.", "She is 60."],
        ),
        (
            'Sure! Here you go:\n\n"She is a 25-year-old poet."\n\n"He is a 52-year-old miner."',
            ["She is a 25-year-old poet.", "He is a 52-year-old miner."],
        ),
        ("Profile 1: She is a chef.\nProfile 2: He is a monk.", ["She is a chef.", "He is a monk."]),
        ("She is a dentist.\nHe is a sailor.", ["She is a dentist.", "He is a sailor."]),
        ("", []),
    ],
)
def test_split_items(reply, want):
    assert split_items(reply) == want


def test_kind_filter():
    assert kind_ok("profile", "She is a 34-year-old nurse who lives in Leeds with two cats.", 20, 300) is None
    assert (
        kind_ok("profile", "She is kind and gentle and always very warm to all people.", 20, 300)
        == "no facts (not a profile)"
    )
    assert (
        kind_ok("personality", "They are 34 years old and cheerful in every conversation.", 20, 300)
        == "has facts (not a personality)"
    )
    assert kind_ok("personality", "Too short.", 20, 300) == "too short"
    assert kind_ok("personality", "x" * 400, 20, 300) == "too long"


def unit(*v):
    a = np.array(v, dtype=np.float32)
    return a / np.linalg.norm(a)


def test_diversity_filter_decisions():
    f = DiversityFilter(threshold=0.6, dim=3)
    f.add("seed", unit(1, 0, 0))
    # cos = 0.8 to the seed: rejected; nearest reported
    assert f.offer("near", unit(0.8, 0.6, 0)) == (False, "seed", pytest.approx(0.8))
    # cos = 0 to the seed: accepted and joins the pool at once
    ok, nn, sim = f.offer("orth", unit(0, 1, 0))
    assert ok and nn == "seed" and sim == pytest.approx(0.0)
    # close to the item accepted in this same round: rejected
    assert f.offer("near-orth", unit(0.1, 1, 0))[:2] == (False, "orth")
    # exactly at the threshold is kept (<=)
    assert f.offer("edge", unit(0.6, -0.0, 0.8))[0] is True
    assert len(f) == 3


def test_filter_grows_past_initial_capacity():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(200, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    f = DiversityFilter(threshold=1.0, dim=16)
    for i, v in enumerate(vecs):
        f.add(str(i), v)
    assert len(f) == 200
    assert [f.nearest(vecs[i])[0] for i in (0, 63, 64, 199)] == ["0", "63", "64", "199"]


@pytest.mark.integration
def test_growth_with_real_model_resumes_exactly(smollm, tmp_path):
    """Two rounds in one go == one round, 'crash', rerun to two rounds (same seed and cache)."""
    from aloe.cache import CallCache
    from aloe.embedding import Embedder
    from aloe.growth import GrowthSettings, grow_pool
    from aloe.records import load_seeds, pool_records

    seeds = pool_records(load_seeds("profiles")[:6], "profile", "seed", "train")
    blocked = pool_records(load_seeds("eval_profiles")[:3], "profile", "seed", "eval")
    emb = Embedder()
    smollm.cache = CallCache(tmp_path / "cache.sqlite")
    try:
        s2 = GrowthSettings(
            target=100,
            items_per_round=5,
            requests_per_round=2,
            max_rounds=2,
            max_new_tokens=160,
            min_chars=40,
            threshold=0.8,
        )
        full, rounds, stop = grow_pool("profile", seeds, blocked, smollm, emb, s2, tmp_path / "a.jsonl")
        assert stop == "round limit" and [r["round"] for r in rounds] == [1, 2]
        assert all(r["candidates"] >= r["offered"] >= len(r["accepted"]) for r in rounds)
        s1 = GrowthSettings(**{**s2.__dict__, "max_rounds": 1})
        grow_pool("profile", seeds, blocked, smollm, emb, s1, tmp_path / "b.jsonl")  # interrupted after round 1
        resumed, rounds_b, _ = grow_pool("profile", seeds, blocked, smollm, emb, s2, tmp_path / "b.jsonl")
        assert [p["id"] for p in resumed] == [p["id"] for p in full]
        assert [r["round"] for r in rounds_b] == [1, 2]
        # every generated item respects the threshold against the pool and the blocked eval items
        assert all(p["nearest_sim"] <= 0.8 + 1e-6 for p in full if p["source"] == "generated")
    finally:
        smollm.cache = CallCache(None)
