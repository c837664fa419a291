import multiprocessing as mp
from dataclasses import replace

from aloe.backends.base import CandidateLogprobs, ChatBackend, ChatRequest, Completion, ProbRequest, Sampling
from aloe.cache import CallCache, cache_key


class Counting(ChatBackend):
    """Records what reaches the engine; fails any request whose text contains FAIL."""

    kind = "counting"

    def __init__(self, cache, model="m", revision="r"):
        super().__init__(model, revision, cache)
        self.seen = []

    def _generate(self, requests):
        self.seen += requests
        return [
            Completion(None, error="boom")
            if "FAIL" in r.messages[-1]["content"]
            else Completion(f"echo:{r.messages[-1]['content']}:{r.sampling.seed}")
            for r in requests
        ]

    def _score(self, requests):
        self.seen += requests
        return [CandidateLogprobs({c: -1.0 for c in r.candidates}) for r in requests]


def req(text, **kw):
    return ChatRequest([{"role": "user", "content": text}], **kw)


def test_key_covers_everything_that_changes_the_answer(tmp_path):
    b = Counting(CallCache(tmp_path / "c.sqlite"))
    base = req("hi", sampling=Sampling(temperature=0.7, max_tokens=10, seed=1), prompt_version="p@v1")
    variants = [
        req("hi!", sampling=base.sampling, prompt_version="p@v1"),
        replace(base, sampling=Sampling(temperature=0.8, max_tokens=10, seed=1)),
        replace(base, sampling=Sampling(temperature=0.7, top_p=0.9, max_tokens=10, seed=1)),
        replace(base, sampling=Sampling(temperature=0.7, max_tokens=11, seed=1)),
        replace(base, sampling=Sampling(temperature=0.7, max_tokens=10, seed=2)),
        replace(base, sample_index=1),
        replace(base, prompt_version="p@v2"),
        ChatRequest(
            [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
            base.sampling,
            prompt_version="p@v1",
        ),
    ]
    keys = {b.chat_key(base)} | {b.chat_key(v) for v in variants}
    assert len(keys) == 1 + len(variants)
    assert b.chat_key(base) != Counting(None, model="other").chat_key(base)
    assert b.chat_key(base) != Counting(None, revision="r2").chat_key(base)
    assert b.chat_key(base) == Counting(None).chat_key(req("hi", sampling=base.sampling, prompt_version="p@v1"))
    p = ProbRequest([{"role": "user", "content": "hi"}], ("1", "2"))
    assert b.prob_key(p) != b.prob_key(ProbRequest(p.messages, ("1", "2", "3")))
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})


def test_hits_misses_order_and_failures_not_cached(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    b = Counting(cache)
    reqs = [req("a"), req("FAIL"), req("b"), req("a")]
    out = b.chat(reqs)
    assert [c.text for c in out] == ["echo:a:0", None, "echo:b:0", "echo:a:0"]
    assert out[1].error == "boom" and not out[1].ok
    assert len(b.seen) == 3  # the duplicate "a" was generated once
    b2 = Counting(CallCache(tmp_path / "c.sqlite"))  # a new process would see the same file
    out2 = b2.chat(reqs)
    assert [c.cached for c in out2] == [True, False, True, True]
    assert [r.messages[-1]["content"] for r in b2.seen] == ["FAIL"]  # only the failure is retried
    assert b2.cache.stats() == {"hits": 3, "misses": 1}
    lp1 = b2.logprobs([ProbRequest([{"role": "user", "content": "q"}], ("1", "2"))])
    lp2 = b2.logprobs([ProbRequest([{"role": "user", "content": "q"}], ("1", "2"))])
    assert not lp1[0].cached and lp2[0].cached and lp2[0].logprobs == {"1": -1.0, "2": -1.0}


def _writer(path, worker, n):
    cache = CallCache(path)
    for i in range(n):
        cache.put_many({f"w{worker}-{i}-{j}": {"v": [worker, i, j]} for j in range(5)})


def test_concurrent_writers(tmp_path):
    path = tmp_path / "c.sqlite"
    CallCache(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = CallCache(path)
    assert len(cache) == 4 * 40 * 5
    assert cache.get_many(["w3-39-4"]) == {"w3-39-4": {"v": [3, 39, 4]}}
