"""The real embedded model through the transformers backend, at tiny sizes."""

import pytest

from aloe.backends import ChatRequest, ProbRequest, Sampling
from aloe.cache import CallCache

pytestmark = pytest.mark.slow

QS = ["What is the capital of France?", "Name a yellow fruit and say why monkeys like it.", "Say hi.",
      "Count from one to five in words, please, slowly and carefully."]


def test_batched_generation_is_order_preserving(smollm):
    reqs = [ChatRequest([{"role": "user", "content": q}], Sampling(max_tokens=10)) for q in QS]
    batch = smollm.chat(reqs)
    assert all(c.ok and c.text for c in batch)
    assert all(0 < c.completion_tokens <= 10 for c in batch)
    # fp32 greedy with left padding: each batched answer equals the same request alone
    assert [c.text for c in batch] == [smollm.chat([r])[0].text for r in reqs]
    assert "Paris" in batch[0].text


def test_sampling_is_seeded(smollm):
    r = ChatRequest([{"role": "user", "content": "Invent a name for a cat."}],
                    Sampling(temperature=1.0, max_tokens=8, seed=3))
    a, b = smollm.chat([r])[0].text, smollm.chat([r])[0].text
    assert a == b


def test_probability_call_exact_and_order_preserving(smollm):
    msgs = [[{"role": "user", "content": f"Rate from 1 to 5 how polite this is: '{t}'. Answer with one digit."}]
            for t in ("Thank you so much!", "Go away.", "Hello.")]
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
