"""The real embedded model through the transformers backend, at tiny sizes."""

import pytest

from aloe.backends import ChatRequest, ProbRequest, Sampling
from aloe.cache import CallCache

pytestmark = pytest.mark.integration

QS = [
    "What is the capital of France?",
    "Name a yellow fruit and say why monkeys like it.",
    "Say hi.",
    "Count from one to five in words, please, slowly and carefully.",
]


def test_batched_generation_is_order_preserving(smollm):
    reqs = [ChatRequest([{"role": "user", "content": q}], Sampling(max_tokens=10)) for q in QS]
    batch = smollm.chat(reqs)
    assert all(c.ok and c.text for c in batch)
    assert all(0 < c.completion_tokens <= 10 for c in batch)
    # fp32 greedy with left padding: each batched answer equals the same request alone
    assert [c.text for c in batch] == [smollm.chat([r])[0].text for r in reqs]
    assert "Paris" in batch[0].text


def test_sampling_is_seeded(smollm):
    r = ChatRequest(
        [{"role": "user", "content": "Invent a name for a cat."}], Sampling(temperature=1.0, max_tokens=8, seed=3)
    )
    a, b = smollm.chat([r])[0].text, smollm.chat([r])[0].text
    assert a == b


def test_probability_call_exact_and_order_preserving(smollm):
    msgs = [
        [{"role": "user", "content": f"Rate from 1 to 5 how polite this is: '{t}'. Answer with one digit."}]
        for t in ("Thank you so much!", "Go away.", "Hello.")
    ]
    reqs = [ProbRequest(m, ("1", "2", "3", "4", "5")) for m in msgs]
    batch = smollm.logprobs(reqs)
    for r, got in zip(reqs, batch):
        alone = smollm.logprobs([r])[0]
        assert got.exact and got.ok
        for c in r.candidates:
            assert got.logprobs[c] == pytest.approx(alone.logprobs[c], abs=1e-3)
        assert sum(got.probabilities().values()) == pytest.approx(1.0)
        assert all(v < 0 for v in got.logprobs.values())
    # multi-token continuations are scored as whole sequences
    two = smollm.logprobs([ProbRequest(msgs[0], ("first", "second reply"))])[0]
    assert two.ok and set(two.logprobs) == {"first", "second reply"}


def test_cache_roundtrip_with_real_model(smollm, tmp_path):
    smollm.cache = CallCache(tmp_path / "c.sqlite")
    try:
        reqs = [ChatRequest([{"role": "user", "content": q}], Sampling(max_tokens=6)) for q in QS[:2]]
        first = smollm.chat(reqs)
        again = smollm.chat(reqs)
        assert [c.text for c in first] == [c.text for c in again]
        assert [c.cached for c in again] == [True, True]
        assert smollm.cache.stats() == {"hits": 2, "misses": 2}
        # a judge's probability call keeps what it read, so a cached one counts what it saved
        pr = ProbRequest([{"role": "user", "content": QS[2]}], ("yes", "no"))
        read = smollm.usage()["prompt_tokens"]
        sent = smollm.logprobs([pr])[0]
        assert sent.prompt_tokens == smollm.usage()["prompt_tokens"] - read > 3
        before = smollm.usage()["cached_prompt_tokens"]
        assert smollm.logprobs([pr])[0].cached
        assert smollm.usage()["cached_prompt_tokens"] - before == sent.prompt_tokens
    finally:
        smollm.cache = CallCache(None)


def test_scores_match_a_plain_forward_pass(smollm):
    """The one-pass path (one-token candidates) and the per-candidate path (longer ones)
    both equal log P(candidate | prompt) from an unbatched, unpadded forward pass."""
    import torch

    msgs = [{"role": "user", "content": "Which reply is better, 1 or 2? Answer with one digit."}]
    p = smollm._prompt_ids(msgs)

    def reference(cand):
        c = smollm.tokenizer(cand, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = smollm.model(input_ids=torch.tensor([p + c])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        return float(sum(lp[len(p) - 1 + j, t] for j, t in enumerate(c)))

    short = smollm.logprobs([ProbRequest(msgs, ("1", "2"))])[0]
    long = smollm.logprobs([ProbRequest(msgs, ("1", "the second one"))])[0]
    for got in (short, long):
        for c, v in got.logprobs.items():
            assert v == pytest.approx(reference(c), abs=1e-3)


def _assert_sharing_changes_nothing(backend, reqs):
    shared = backend._score(reqs)
    backend.share_prefix = False
    try:
        separate = backend._score(reqs)
    finally:
        backend.share_prefix = True
    for r, a, b in zip(reqs, shared, separate):
        for c in r.candidates:
            assert a.logprobs[c] == pytest.approx(b.logprobs[c], abs=1e-3), (r.candidates, c)


def test_shared_prefix_scoring_equals_separate_scoring(smollm):
    """Prompts that share a long prefix (the judge in both orders) have it encoded once;
    the scores equal scoring every prompt on its own (fp32)."""
    from aloe.backends.transformers_backend import prefix_groups

    persona = (
        "The user: a 52-year-old beekeeper in rural Wales who sings in a choir and restores old "
        "tractors with her son. Warm, blunt and impatient with jargon."
    )
    replies = [
        "Lovely! Which tractor are you restoring at the moment?",
        "Beekeeping requires careful attention to hive health, seasonal cycles and regulations.",
        "Ha, choirs and tractors, what a mix.",
    ]
    msgs = [
        [
            {"role": "system", "content": "You judge which of two replies suits a specific user better."},
            {"role": "user", "content": f'{persona}\nReply 1: "{a}"\nReply 2: "{b}"\nAnswer with 1 or 2.'},
        ]
        for a, b in ((replies[0], replies[1]), (replies[1], replies[0]), (replies[2], replies[0]))
    ]
    reqs = [ProbRequest(m, ("1", "2")) for m in msgs]
    reqs += [
        ProbRequest(msgs[0], ("1", "the second one")),
        ProbRequest([{"role": "user", "content": "Say 1."}], ("1", "2")),
    ]
    seqs = [smollm._prompt_ids(r.messages) for r in reqs]
    groups = prefix_groups(seqs, smollm.min_shared_prefix, smollm.batch_size)
    assert any(len(members) > 1 and shared > 40 for shared, members in groups)  # sharing really happens
    _assert_sharing_changes_nothing(smollm, reqs)


def test_prefix_groups_split_sorted_runs_for_the_largest_saving():
    from aloe.backends.transformers_backend import prefix_groups

    common = list(range(100, 105))  # 5 tokens everyone shares (a system prompt)
    a = common + list(range(20)) + [1]
    a2 = common + list(range(20)) + [2, 3]
    b = common + list(range(50, 70)) + [1]
    b2 = common + list(range(50, 70)) + [4]
    lone = [9, 9, 9]
    groups = prefix_groups([a, b, lone, a2, b2], min_shared=4, max_group=8)
    by_members = {tuple(sorted(m)): n for n, m in groups}
    # the two pairs share 25 tokens each; one group of four would share only 5
    assert by_members == {(0, 3): 25, (1, 4): 25, (2,): 0}
    # at most max_group members; every member keeps a token of its own
    assert all(len(m) <= 2 for _, m in prefix_groups([a] * 5, 4, 2))
    assert prefix_groups([a, a], 4, 8) == [(len(a) - 1, [0, 1])]
    # below min_shared nothing is grouped
    assert all(len(m) == 1 for _, m in prefix_groups([a, b], 6, 8))


def test_inverse_cdf_sampler_draws_from_the_tempered_top_p_distribution():
    import torch

    from aloe.backends.transformers_backend import InverseCdfSampler

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    rows = logits.repeat(20000, 1)
    picks = InverseCdfSampler(0.7, 1.0, seed=1)(None, rows).argmax(-1)
    freq = torch.bincount(picks, minlength=5).float() / len(picks)
    assert torch.allclose(freq, torch.softmax(logits / 0.7, -1), atol=0.01)
    # top_p keeps the smallest set whose mass reaches p: here the first two tokens
    p = torch.softmax(logits, -1)
    picks = InverseCdfSampler(1.0, float(p[0] + p[1] / 2), seed=1)(None, rows).argmax(-1)
    freq = torch.bincount(picks, minlength=5).float() / len(picks)
    assert set(torch.nonzero(freq).flatten().tolist()) == {0, 1}
    assert torch.allclose(freq[:2], p[:2] / p[:2].sum(), atol=0.01)
    # the same seed gives the same draws
    again = InverseCdfSampler(0.7, 1.0, seed=1)(None, rows).argmax(-1)
    assert torch.equal(again, InverseCdfSampler(0.7, 1.0, seed=1)(None, rows).argmax(-1))


def test_shared_prefix_scoring_of_multi_token_candidates(smollm):
    """Candidates of several tokens are appended to the prompt, so prompt + candidate
    sequences share the whole prompt: each must still read its own positions."""
    msgs = [
        {
            "role": "user",
            "content": "Which of the two replies suits a retired farmer from Kerry who loves "
            "hurling and hates small talk better? Answer first or second.",
        }
    ]
    reqs = [ProbRequest(msgs, ("first", "second reply", "the third one")), ProbRequest(msgs, ("1", "2"))]
    _assert_sharing_changes_nothing(smollm, reqs)


def test_int8_engine_generates_scores_and_keys_apart(tiny_model):
    """dtype int8: every Linear quantized (PyTorch dynamic int8), still a working engine, cached apart."""
    import torch

    from aloe.backends.transformers_backend import TransformersBackend

    fp32 = TransformersBackend(tiny_model, "tiny", "0", None, dtype="float32")
    int8 = TransformersBackend(tiny_model, "tiny", "0", None, dtype="int8")
    assert int8.dtype_used == "int8-dynamic" and int8.describe()["compute_dtype"] == "int8-dynamic"
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
    req = ChatRequest(messages=({"role": "user", "content": "hi"},), sampling=Sampling(temperature=0.0, max_tokens=5))
    out = int8.chat([req])[0]
    assert out.error is None and out.completion_tokens is not None and out.completion_tokens <= 5
    assert int8.chat_key(req) != fp32.chat_key(req)
    prob = ProbRequest(messages=({"role": "user", "content": "hi"},), candidates=("1", "2"))
    cand = int8.logprobs([prob])[0]
    assert set(cand.logprobs) == {"1", "2"} and all(v <= 0 for v in cand.logprobs.values())


def test_int8_is_refused_off_cpu_and_off_transformers():
    from aloe.config import BackendConfig, ConfigError

    with pytest.raises(ConfigError, match="int8.*kind transformers, not vllm"):
        BackendConfig(kind="vllm", model="m", dtype="int8")
