import pytest
from conftest import REPO

from aloe.errors import AloeError
from aloe.personas import item_id, load_seeds, make_pairs, read_aloe_pool

OFFICIAL = REPO.parent / "shared" / "aloe-official"


def test_read_aloe_pool_quirks(tmp_path):
    p = tmp_path / "pool.jsonl"
    p.write_text('"one"\n\n"two""three"\n  "four" "five"  \n"six"')  # blank line, glued strings, no final newline
    assert read_aloe_pool(p) == ["one", "two", "three", "four", "five", "six"]
    p.write_text('"ok"\n{"text": "x"}\n')
    with pytest.raises(AloeError, match=r"pool.jsonl: line 2: expected a JSON string, got dict"):
        read_aloe_pool(p)
    p.write_text('"ok"\nnot json\n')
    with pytest.raises(AloeError, match=r"pool.jsonl: line 2: not a JSON string"):
        read_aloe_pool(p)


@pytest.mark.skipif(not OFFICIAL.exists(), reason=f"official ALOE files not present at {OFFICIAL}")
def test_official_pools_count():
    # As published: profile.jsonl has 330 non-blank lines, one of which (line 6) holds two
    # JSON strings glued together -> 331 profiles; profile_eval.jsonl has no final newline.
    counts = {
        f: len(read_aloe_pool(OFFICIAL / f"{f}.jsonl"))
        for f in ("profile", "personality", "profile_eval", "personality_eval")
    }
    assert counts == {"profile": 331, "personality": 71, "profile_eval": 20, "personality_eval": 7}
    evals = read_aloe_pool(OFFICIAL / "profile_eval.jsonl")
    pers = read_aloe_pool(OFFICIAL / "personality_eval.jsonl")[:5]
    assert len({(a, b) for a in evals for b in pers}) == 100  # the ALOE benchmark's 20 x 5


def test_seeds_sizes_and_disjoint():
    sizes = {n: len(load_seeds(n)) for n in ("profiles", "personalities", "eval_profiles", "eval_personalities")}
    assert sizes["profiles"] >= 20 and sizes["personalities"] >= 20
    assert sizes["eval_profiles"] == 20 and sizes["eval_personalities"] == 5
    train = set(load_seeds("profiles")) | set(load_seeds("personalities"))
    assert not train & (set(load_seeds("eval_profiles")) | set(load_seeds("eval_personalities")))


def test_pairs_are_stable_and_seeded():
    profs = [{"id": item_id("profile", t), "text": t} for t in ("p1", "p2")]
    pers = [{"id": item_id("personality", t), "text": t} for t in ("a", "b", "c")]
    a = make_pairs(profs, pers, 2, seed=1, split="train")
    assert a == make_pairs(profs, pers, 2, seed=1, split="train") and len(a) == 4
    assert all(p["id"].startswith("pp-") and p["split"] == "train" for p in a)
    assert item_id("profile", " p1 ") == item_id("profile", "p1")


def test_benchmark_seeds_are_far_from_training_seeds_by_the_filter_measure():
    """The same MiniLM cosine the pool filter uses: no benchmark persona within 0.6 of a training seed.

    The benchmark profiles are written in the first person, the training ones in the third:
    with one shared template ("She is a 34-year-old ...") MiniLM rates unrelated people above
    0.6 (up to 0.79 here before the rewrite), so the template, not the person, set the score."""
    from aloe.embedding import Embedder

    emb = Embedder()
    for train, evals in (("profiles", "eval_profiles"), ("personalities", "eval_personalities")):
        sim = emb.encode(load_seeds(evals)) @ emb.encode(load_seeds(train)).T
        assert sim.max() <= 0.6, (evals, float(sim.max()))


def test_disclosure_embeds_each_text_on_its_own_and_remembers_it():
    """A text's vector never depends on the texts beside it (no padding), so the disclosure measure
    gives the same numbers whatever order the conversations arrive in; repeats are not re-embedded."""
    import numpy as np

    from aloe.disclosure import revealed_curve
    from aloe.embedding import Embedder

    emb = Embedder()
    texts = ["I keep a vegetarian kitchen.", "Short answers, please: I read them between meetings at work.", "ok"]
    alone = np.stack([emb.encode([t])[0] for t in texts])
    assert np.array_equal(emb.encode_each(texts), alone)
    assert np.array_equal(emb.encode_each(texts[::-1]), alone[::-1])
    assert emb.texts_embedded == 2 * len(texts)  # the second call embedded nothing
    curve = revealed_curve(
        "I keep a vegetarian kitchen.", "I am calm.", ["I keep a vegetarian kitchen.", "ok"], 0.6, emb
    )
    assert [r["revealed"] for r in curve] == [0.5, 0.5]
